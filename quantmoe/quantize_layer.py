"""Quantize one decoder layer: attention first, then the MoE block, then shared/dense MLPs.

Order inside a layer (true-sequential): q/k/v share one Hessian; o_proj sees the
quantized q/k/v; every expert's gate and up share one Hessian built from exactly the
tokens the original router sends it; its down_proj's Hessian comes from the quantized
gate/up outputs of those tokens. Experts of a layer are solved together in one batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .architectures import MLP, LayerPlan, plan_layer
from .config import QuantConfig
from .gptq import QuantResult, QuantSpec, accumulate_hessian, gptq_quantize, rtn_quantize
from .packing import pack_result
from .stream import Batch, LayerStream

TOKEN_CHUNK = 32768  # tokens per matmul when building Hessians, to bound temporary memory


@dataclass
class LayerResult:
    tensors: dict[str, Tensor]                        # packed GPTQ tensors under full on-disk names
    log: list[dict] = field(default_factory=list)     # one entry per quantized module
    expert_tokens: list[int] = field(default_factory=list)
    outputs: list[Batch] = field(default_factory=list)  # the next layer's inputs


def spec_of(qcfg: QuantConfig) -> QuantSpec:
    return QuantSpec(bits=qcfg.bits, group_size=qcfg.group_size, sym=qcfg.sym)


def solve(W: Tensor, H: Tensor | None, qcfg: QuantConfig) -> QuantResult:
    """W (B, R, C) with Hessians H (B, C, C); RTN when the backend is rtn or there is no Hessian."""
    if qcfg.backend == "rtn" or H is None:
        return rtn_quantize(W, spec_of(qcfg))
    return gptq_quantize(W, H, spec_of(qcfg), qcfg.damp, qcfg.act_order, qcfg.block_size)


def hessian(chunks: Iterable[Tensor], columns: int, device) -> tuple[Tensor, int]:
    """2/n X^T X over row chunks of X, in fp32."""
    H = torch.zeros(columns, columns, device=device)
    n = 0
    for X in chunks:
        H, n = accumulate_hessian(H, X, n)
    return H, n


def _chunks(X: Tensor) -> Iterable[Tensor]:
    for start in range(0, X.shape[0], TOKEN_CHUNK):
        yield X[start:start + TOKEN_CHUNK]


def mlp_hidden(X: Tensor, Wg: Tensor, Wu: Tensor, act) -> Iterable[Tensor]:
    """act(X Wg^T) * (X Wu^T), the input of down_proj, chunk by chunk."""
    for x in _chunks(X):
        yield act(x @ Wg.t()) * (x @ Wu.t())


def _log(name: str, kind: str, res: QuantResult, b: int, W: Tensor, tokens: int, seconds: float,
         fallback: str | None = None) -> dict:
    return {
        "module": name, "kind": kind, "shape": list(W.shape[-2:]), "tokens": int(tokens),
        "loss": float(res.loss[b].sum()), "damp": float(res.damp[b]), "fallback": fallback,
        "seconds": round(seconds, 4),
    }


class LayerQuantizer:
    """Holds one materialised layer and writes quantized weights back into it as it goes."""

    def __init__(self, stream: LayerStream, index: int, batches: list[Batch], qcfg: QuantConfig):
        self.stream, self.index, self.batches, self.qcfg = stream, index, batches, qcfg
        self.arch = stream.arch
        self.plan: LayerPlan = plan_layer(self.arch, stream.config, index, qcfg.layout)
        self.state = stream.layer_state(index)
        self.layer: nn.Module = stream.load_layer(index, self.state)
        self.prefix = f"model.layers.{index}."
        self.result = LayerResult(tensors={})

    # -- bookkeeping ----------------------------------------------------------------
    def _store(self, names: list[str], res: QuantResult) -> None:
        for name, packed in zip(names, pack_result(res, self.qcfg.bits)):
            for suffix, t in packed.items():
                self.result.tensors[f"{self.prefix}{name}.{suffix}"] = t

    def _set_linear(self, name: str, W: Tensor) -> None:
        self.layer.get_submodule(self.arch.to_memory(name)).weight.data.copy_(W)

    # -- attention ------------------------------------------------------------------
    def attention(self) -> None:
        for group in self.plan.attention:
            t0 = time.perf_counter()
            first = self.arch.to_memory(group[0])
            columns = self.state[f"{group[0]}.weight"].shape[1]
            H = None
            n = 0
            if self.qcfg.backend != "rtn":
                H, n = hessian(self.stream.capture(self.layer, self.batches, first), columns, self.stream.device)
                H = H[None]
            Ws = [self.state[f"{name}.weight"].to(self.stream.device) for name in group]
            # Rows are independent in GPTQ, so linears sharing an input are solved as one matrix.
            res = solve(torch.cat(Ws)[None], H, self.qcfg)
            rows = [W.shape[0] for W in Ws]
            parts = _split_rows(res, rows)
            seconds = time.perf_counter() - t0
            for name, part, W in zip(group, parts, Ws):
                self._set_linear(name, part.W[0])
                self._store([name], part)
                self.result.log.append(_log(self.prefix + name, "attention", part, 0, W, n, seconds / len(group)))

    # -- MLPs -----------------------------------------------------------------------
    def mlps(self) -> None:
        plan, arch = self.plan, self.arch
        if plan.experts is not None:
            X = torch.cat(list(self.stream.capture(self.layer, self.batches, arch.moe_module)))  # (T, H)
            self.experts(X)
            if plan.shared_expert is not None:
                self.dense(plan.shared_expert, X, "shared_expert")
        if plan.dense_mlp is not None:
            X = torch.cat(list(self.stream.capture(self.layer, self.batches, arch.to_memory(plan.dense_mlp.prefix))))
            self.dense(plan.dense_mlp, X, "dense_mlp")

    def route(self, X: Tensor) -> list[Tensor]:
        """Token indices the original router sends to each expert (top-k, as in the forward pass)."""
        router = self.layer.get_submodule(self.arch.moe_module).gate
        out = router(X)
        top_k_index = out[-1] if isinstance(out, tuple) else out
        return [
            (top_k_index == e).any(dim=-1).nonzero().squeeze(-1)
            for e in range(self.plan.num_experts)
        ]

    def rare_threshold(self, columns: int, inner: int) -> int:
        return self.qcfg.rare_expert_tokens or max(columns, inner)

    def experts(self, X: Tensor) -> None:
        """All routed experts of the layer, solved as one batch."""
        qcfg, arch, mlp = self.qcfg, self.arch, self.plan.experts
        E = self.plan.num_experts
        fused = self.layer.get_submodule(arch.experts_module)
        act = fused.act_fn
        gate_up = fused.gate_up_proj.data  # (E, 2I, H)
        I = gate_up.shape[1] // 2
        C = X.shape[1]
        dev = X.device
        t0 = time.perf_counter()
        tokens = self.route(X)
        counts = [int(t.numel()) for t in tokens]
        self.result.expert_tokens = counts
        threshold = self.rare_threshold(C, I)
        rare = [e for e in range(E) if counts[e] < threshold]
        fallback = {e: self._fallback_note(counts[e], threshold) for e in rare}
        use_rtn = qcfg.backend == "rtn"

        H_gu = None
        if not use_rtn:
            H_gu = torch.stack([hessian(_chunks(X[tokens[e]]), C, dev)[0] for e in range(E)])
            if rare and qcfg.rare_expert != "rtn":
                H_all = hessian(_chunks(X), C, dev)[0]
                for e in rare:
                    H_gu[e] = _blend(H_gu[e], H_all, counts[e], threshold, qcfg.rare_expert)
        res_gu = solve(gate_up, H_gu, qcfg)
        if not use_rtn and rare and qcfg.rare_expert == "rtn":
            res_gu = _replace(res_gu, rtn_quantize(gate_up[rare], spec_of(qcfg)), rare)
        t1 = time.perf_counter()

        orig_gate, orig_up = gate_up[:, :I], gate_up[:, I:]
        Wq = res_gu.W  # (E, 2I, H)
        fused.gate_up_proj.data.copy_(Wq)
        Wg, Wu = (Wq[:, :I], Wq[:, I:]) if qcfg.true_sequential else (orig_gate, orig_up)
        down = fused.down_proj.data  # (E, H, I)
        H_d = None
        if not use_rtn:
            H_d = torch.stack([
                hessian(mlp_hidden(X[tokens[e]], Wg[e], Wu[e], act), I, dev)[0] for e in range(E)
            ])
            if qcfg.rare_expert != "rtn":
                for e in rare:
                    H_all = hessian(mlp_hidden(X, Wg[e], Wu[e], act), I, dev)[0]
                    H_d[e] = _blend(H_d[e], H_all, counts[e], threshold, qcfg.rare_expert)
        res_d = solve(down, H_d, qcfg)
        if not use_rtn and rare and qcfg.rare_expert == "rtn":
            res_d = _replace(res_d, rtn_quantize(down[rare], spec_of(qcfg)), rare)
        fused.down_proj.data.copy_(res_d.W)
        t2 = time.perf_counter()

        parts_gu = _split_rows(res_gu, [I, I])
        for e in range(E):
            names = [mlp.linear(w, e) for w in ("gate", "up", "down")]
            for name, part, W, secs in ((names[0], parts_gu[0], orig_gate, (t1 - t0) / E / 2),
                                        (names[1], parts_gu[1], orig_up, (t1 - t0) / E / 2),
                                        (names[2], res_d, down, (t2 - t1) / E)):
                self._store([name], _select(part, e))
                self.result.log.append(_log(self.prefix + name, "expert", part, e, W[e], counts[e], secs,
                                            fallback.get(e)))

    def dense(self, mlp: MLP, X: Tensor, kind: str) -> None:
        """A gated MLP fed every token: a shared expert or a dense layer's MLP."""
        qcfg = self.qcfg
        module = self.layer.get_submodule(self.arch.to_memory(mlp.prefix))
        names = [mlp.linear(w) for w in ("gate", "up", "down")]
        Wg, Wu, Wd = (self.state[f"{n}.weight"].to(X.device) for n in names)
        C, I = X.shape[1], Wg.shape[0]
        t0 = time.perf_counter()
        H_gu = None if qcfg.backend == "rtn" else hessian(_chunks(X), C, X.device)[0][None]
        res_gu = solve(torch.cat([Wg, Wu])[None], H_gu, qcfg)
        gq, uq = _split_rows(res_gu, [I, I])
        self._set_linear(names[0], gq.W[0])
        self._set_linear(names[1], uq.W[0])
        t1 = time.perf_counter()
        src_g, src_u = (gq.W[0], uq.W[0]) if qcfg.true_sequential else (Wg, Wu)
        H_d = None
        if qcfg.backend != "rtn":
            H_d = hessian(mlp_hidden(X, src_g, src_u, module.act_fn), I, X.device)[0][None]
        res_d = solve(Wd[None], H_d, qcfg)
        self._set_linear(names[2], res_d.W[0])
        t2 = time.perf_counter()
        for name, part, W, secs in ((names[0], gq, Wg, (t1 - t0) / 2), (names[1], uq, Wu, (t1 - t0) / 2),
                                    (names[2], res_d, Wd, t2 - t1)):
            self._store([name], part)
            self.result.log.append(_log(self.prefix + name, kind, part, 0, W, X.shape[0], secs))

    def _fallback_note(self, count: int, threshold: int) -> str:
        policy = self.qcfg.rare_expert
        if policy == "blend":
            return f"blend: {count} routed tokens < {threshold}; Hessian = {count}/{threshold} routed + rest all-token"
        if policy == "all-tokens":
            return f"all-tokens: {count} routed tokens < {threshold}; Hessian of all tokens entering the MoE block"
        return f"rtn: {count} routed tokens < {threshold}; round-to-nearest"

    def run(self) -> LayerResult:
        self.attention()
        self.mlps()
        self.result.outputs = self.stream.run_layer(self.layer, self.batches)
        self.stream.release_layer(self.index)
        return self.result


def _blend(H_routed: Tensor, H_all: Tensor, count: int, threshold: int, policy: str) -> Tensor:
    """The Hessian of a rare expert: routed tokens weighted count/threshold, the rest from all tokens."""
    if policy == "all-tokens" or count == 0:
        return H_all
    alpha = count / threshold
    return alpha * H_routed + (1 - alpha) * H_all


def _split_rows(res: QuantResult, rows: list[int]) -> list[QuantResult]:
    """Cut a result over concatenated linears back into one result per linear."""
    out, start = [], 0
    for r in rows:
        sl = slice(start, start + r)
        out.append(QuantResult(q=res.q[:, sl], scales=res.scales[:, sl], zeros=res.zeros[:, sl], g_idx=res.g_idx,
                               W=res.W[:, sl], loss=res.loss[:, sl], damp=res.damp))
        start += r
    return out


def _select(res: QuantResult, b: int) -> QuantResult:
    return QuantResult(q=res.q[b:b + 1], scales=res.scales[b:b + 1], zeros=res.zeros[b:b + 1], g_idx=res.g_idx,
                       W=res.W[b:b + 1], loss=res.loss[b:b + 1], damp=res.damp[b:b + 1])


def _replace(res: QuantResult, sub: QuantResult, idx: list[int]) -> QuantResult:
    """res with the matrices at batch positions idx replaced by sub's."""
    for field_name in ("q", "scales", "zeros", "W", "loss", "damp"):
        getattr(res, field_name)[idx] = getattr(sub, field_name)
    return res
