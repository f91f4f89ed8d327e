"""The bitsandbytes backends: bnb-nf4, bnb-fp4 and bnb-int8, with every expert quantized.

Why this exists: transformers 5.x swaps only ``nn.Linear`` modules for bitsandbytes
ones (``integrations/bitsandbytes.py: replace_with_bnb_linear`` tests
``type(module) is nn.Linear``), and an MoE's routed experts are fused 3D parameters
(``mlp.experts.gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)), so
``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` leaves them in
16 bit: a "4-bit Mixtral" that way keeps ~96% of its weights unquantized. Neither the
4-bit nor the 8-bit quantizer of transformers 5.23 unfuses experts or quantizes 3D
parameters.

What these backends do, inside the one pipeline (``quantmoe.stages.quantize.run``, which
streams the checkpoint one decoder layer at a time, keeps finished layers in the work folder
so that a stopped run resumes, writes the shards and finishes the export): quantize, with
bitsandbytes' own functions, every linear the architecture row names: attention, each routed
expert, shared experts and dense MLPs. Routers (named in the row), norms, embeddings and the
LM head are copied unchanged. Experts are quantized one at a time: from each expert's own
tensors where the checkpoint stores them (most families), or cut out of the fused on-disk
tensors where the row's ``fused.on_disk`` says it stores them fused (GraniteMoE's
``input_linear`` (E, 2I, H) / ``output_linear`` (E, H, I)); either way they are written under
the row's per-expert names (``experts.linear(which, e)``), as the GPTQ export does, and the
fused tensors are not kept. An FP8 release (``formats.fp8``) is read one linear at a time,
dequantized to BF16, its scales left out. Layers beyond ``num_hidden_layers`` (multi-token
prediction) are not exported by these backends. The tensors of each linear are those
transformers' bitsandbytes serialization writes for one ``Linear4bit`` / ``Linear8bitLt``; the
on-disk format and the ``quantization_config`` are described and read in ``quantmoe.formats.bnb``.

What plain transformers (5.23) does with it: attention, shared-expert and dense-MLP
linears are in its own format and would load as bitsandbytes modules, but the routed
experts cannot, because its Mixtral/Qwen2-MoE conversion merges ``experts.*.w1/w3.weight``
into the fused 16-bit ``gate_up_proj`` and knows no quantized experts:

- 4-bit: the packed shapes do not fit, so ``from_pretrained`` stops with a size-mismatch
  error (never pass ``ignore_mismatched_sizes=True``: it re-initialises the experts at random);
- int8: the codes have the weights' shape, so ``from_pretrained`` returns a model whose fused
  expert tensors hold the raw int8 codes without their scales (its load report lists the
  expert tensors as UNEXPECTED) and whose first forward fails with a dtype error;
- rows whose experts are fused on disk (GraniteMoE): transformers maps only the fused names,
  so ``from_pretrained`` loads without an error, with the per-expert tensors UNEXPECTED and
  every routed expert initialised at random (both 4-bit and int8).

``quantmoe.load_quantized`` reads every linear back, dequantized with bitsandbytes'
``dequantize_4bit`` / ``int8_vectorwise_dequant`` into the weights the bitsandbytes
kernels compute with (quantmoe's evaluation reads them the same way), or, with
``kernels="bitsandbytes"``, as bitsandbytes modules that keep the weights quantized.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from ..base.errors import QuantMoeError
from ..base.measure import PeakRSS
from ..base.options import BnbConfig, RunOptions
from ..base.version import __version__
from ..formats.bnb import (
    BnbReader,
    dequantize_weight,
    quantization_config,
    quantize_weight,
    require_bitsandbytes,
)
from ..model.architectures import (
    Architecture,
    LayerPlan,
    architecture_for,
    plan_layer,
    unfuse_experts,
)
from ..model.checkpoint import Checkpoint
from ..model.distributed import Ranks
from ..model.stream import model_config, pick_device, skeleton
from ..stages.export import FinishedLayers, as_stored, source_tensors
from ..stages.method import Calibration, LayerOutput, Source, unquantized_prefixes
from ..stages.report import base_model_name, gap_table, protocol_text
from .base import Backend, unknown_settings


# -- the backend ---------------------------------------------------------------------
@dataclass(frozen=True)
class BnbBackend(Backend):
    name: str
    summary: str
    quant_type: str
    needs_calibration: bool = False
    resumable: bool = True  # finished layers are kept in the work folder, as gptq's are

    def settings(self) -> frozenset[str]:
        return frozenset({"compute_dtype", "double_quant", "blocksize"} if self.quant_type != "int8"
                         else {"int8_threshold"})

    def configure(self, **settings) -> BnbConfig:
        unknown_settings(self.name, settings, self.settings())
        return BnbConfig(quant_type=self.quant_type, **settings)

    def method(self, config: BnbConfig) -> BnbMethod:
        if not isinstance(config, BnbConfig) or config.quant_type != self.quant_type:
            raise QuantMoeError(f"the {self.name} backend was given settings for another backend ({config!r}); "
                                f"make them with backends.get({self.name!r}).configure(...)")
        return BnbMethod(self.name, config)


BACKENDS = (
    BnbBackend("bnb-nf4", "bitsandbytes NF4 (4-bit normal-float, blockwise absmax), experts included; no calibration",
               "nf4"),
    BnbBackend("bnb-fp4", "bitsandbytes FP4 (4-bit float, blockwise absmax), experts included; no calibration", "fp4"),
    BnbBackend("bnb-int8", "bitsandbytes LLM.int8() (8-bit, per-row absmax), experts included; no calibration",
               "int8"),
)


@dataclass(frozen=True)
class BnbMethod:
    """bitsandbytes in the pipeline (stages.method.Method): each layer's linears quantized from their
    weights alone, one linear at a time."""

    name: str
    config: BnbConfig
    needs_calibration: bool = False
    layout: str = "source"
    config_files: tuple[str, ...] = ()
    in_place: bool = True  # the export: a linear's tensors where its source weight stands, as bnb exports always were

    def default_out(self, model: Path) -> Path:
        return Path("quantmoe-out") / f"{model.name}-{self.name}"

    def check(self, ckpt: Checkpoint, arch: Architecture, ranks: Ranks) -> list[str]:
        if ranks.world > 1:
            raise QuantMoeError(f"the {self.name} backend runs in one process (torchrun spreads GPTQ's experts); "
                                "run it without torchrun")
        require_bitsandbytes(self.name)
        if ckpt.quantization is not None and not getattr(ckpt.format, "source", False):  # FP8 releases are read
            raise QuantMoeError(f"{ckpt.path} is already quantized ({ckpt.quantization.get('quant_method')}); "
                                "quantize the original checkpoint")
        for i in range(ckpt.config.num_hidden_layers):
            prefix = ckpt.layer_prefix(i)
            plan = plan_layer(arch, ckpt.config, i)
            readable = plan.linear_shapes(ckpt.layer_shapes(i))
            missing = [m for m in plan.quantized_linears() if m not in readable]
            if missing:
                raise QuantMoeError(f"{prefix}{missing[0]}.weight is not in {ckpt.path}, neither as its own tensor "
                                    f"nor in a fused expert tensor; is the checkpoint complete and a "
                                    f"{arch.model_type} one?")
        return []

    def start(self, source: Source, calibration: Calibration | None, options: RunOptions, ranks: Ranks) -> BnbRun:
        return BnbRun(source.ckpt, source.arch, self.config, pick_device(options.device), options.batch_size)

    def quantization_config(self, ckpt: Checkpoint, arch: Architecture, extra_layers: dict[int, list[str]]) -> dict:
        plans = [plan_layer(arch, ckpt.config, i) for i in range(ckpt.config.num_hidden_layers)]
        routers = [f"{ckpt.layer_prefix(p.index)}{r}" for p in plans for r in p.routers]
        skip = [f"{ckpt.layer_prefix(p.index)}{module_to_memory(arch, r)}" for p in plans for r in p.routers]
        # The multi-token-prediction layers (mtp="keep"), whole (a loader matching skips by prefix, as vLLM's
        # bitsandbytes one does, then builds them unquantized), and each of their modules with a 2-D weight.
        skip += [ckpt.layer_prefix(i)[:-1] for i in extra_layers]
        # Whatever else is copied unquantized (Qwen3-Next's MTP block, a nested release's vision tower), whole.
        skip += [p.rstrip(".") for p in unquantized_prefixes(ckpt, arch) if ckpt.names(p)]
        not_quantized = routers + [m for ms in extra_layers.values() for m in ms]
        return quantization_config(self.config, self.name, [ckpt.stored_name(m) for m in skip],
                                   [ckpt.stored_name(m) for m in not_quantized], __version__)

    def export_layer(self, ckpt: Checkpoint, arch: Architecture, index: int,
                     tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], frozenset[str]]:
        return as_stored(index, tensors)

    def versions(self) -> dict[str, str]:
        return {"bitsandbytes": require_bitsandbytes(self.name).__version__}

    def model_card(self, report: dict | None, info: dict) -> str:
        return model_card(report, info)


@dataclass(frozen=True)
class BnbRun:
    ckpt: Checkpoint
    arch: Architecture
    config: BnbConfig
    device: torch.device
    batch_size: int | None  # the eval's

    @property
    def fingerprint(self) -> dict:
        return {"device": self.device.type}

    @property
    def record(self) -> dict:
        return {"device": str(self.device)}

    def layers(self, work: Path, done: int, rss: PeakRSS, export: FinishedLayers | None = None
               ) -> Iterator[LayerOutput]:
        for i in range(done, self.ckpt.config.num_hidden_layers):
            t0 = time.perf_counter()
            tensors, modules = quantize_layer(self.ckpt, plan_layer(self.arch, self.ckpt.config, i), self.config,
                                              self.device)
            entry = {"index": i, "seconds": round(time.perf_counter() - t0, 3), "timings": {},
                     "peak_rss_mb": rss.take(), "modules": modules}
            yield LayerOutput(i, tensors, entry)


def module_to_memory(arch, path: str) -> str:
    """The in-memory path of an on-disk, layer-relative *module* path.

    ``Architecture.to_memory`` maps tensor names, and a rename may be keyed on a prefix ending in
    "." (Phi-MoE: ``block_sparse_moe.gate.`` -> ``mlp.router.``), so map the path as a prefix.
    """
    return arch.to_memory(path + ".")[:-1]


def quantize_layer(ckpt: Checkpoint, plan: LayerPlan, cfg: BnbConfig,
                   device: torch.device) -> tuple[dict[str, Tensor], list[dict]]:
    """Every linear ``plan`` names in its layer, quantized with bitsandbytes: (the tensors by full on-disk
    name, one log entry per linear).

    Experts stored fused on disk (the row's ``fused.disk_gate_up`` / ``disk_down``) are cut per expert
    (``unfuse_experts``) and quantized under the row's per-expert names, as GPTQ does; per-expert
    tensors on disk win over a fused copy, as on loading. Memory holds one source tensor (one fused
    expert tensor for such rows) and the layer's quantized tensors.
    """
    prefix = ckpt.layer_prefix(plan.index)
    kinds = plan.linear_kinds()
    fused = plan.fused_disk_tensors()
    tensors: dict[str, Tensor] = {}
    log = []
    # source_tensors: an FP8 release's linears come dequantized, their scales left out.
    for name, tensor in source_tensors(ckpt, ckpt.names(prefix)):
        rel = name[len(prefix):]
        if rel in fused:
            weights = {n: W for n, W in unfuse_experts(plan, rel, tensor).items() if not ckpt.has(prefix + n)}
        elif rel.endswith(".weight") and rel[: -len(".weight")] in kinds:
            weights = {rel: tensor}
        else:
            continue
        for weight, W in weights.items():
            module = weight[: -len(".weight")]
            parts, entry = quantize_linear(W, cfg, device)
            tensors.update({f"{prefix}{module}.{suffix}": t for suffix, t in parts.items()})
            log.append({"module": prefix + module, "kind": kinds[module], **entry})
    return tensors, log


def quantize_linear(W: Tensor, cfg: BnbConfig, device: torch.device) -> tuple[dict[str, Tensor], dict]:
    """One linear's weight W (out, in) -> its bitsandbytes tensors (names relative to the module, on the
    host) and its log entry: shape, bytes, relative error ||W - Wq|| / ||W||."""
    W = W.to(device).contiguous()  # an expert cut from a fused tensor stored transposed is a strided view
    parts = quantize_weight(W, cfg)
    Wq = dequantize_weight(parts, f"bnb-{cfg.quant_type}").float()
    W = W.float()
    return {suffix: t.cpu() for suffix, t in parts.items()}, {
        "shape": list(W.shape), "bytes": sum(t.numel() * t.element_size() for t in parts.values()),
        "relative_error": float((Wq - W).norm() / W.norm().clamp_min(1e-12))}


def model_card(report: dict | None, info: dict) -> str:
    """README.md of a bnb export, with every section ``report.CARD_SECTIONS`` asks for (so ``quantmoe push``
    takes it): base model, method, bits per weight, calibration, protocol, perplexity, and loading,
    saying plainly which loaders cannot read quantized experts."""

    cfg: BnbConfig = info["config"]
    q = info["quantization_config"]
    base = base_model_name(info["base_model"])
    hub_id = base if "/" in base else None
    stats = (report or {}).get("quantization", {})
    if cfg.four_bit:
        double = {"on": "on", "off": "off", "auto": "where it makes the linear smaller (auto)"}[cfg.double_quant]
        method = (f"{cfg.quant_type.upper()} 4-bit, one absmax per {cfg.blocksize} weights, double quantization "
                  f"{double}; compute dtype {cfg.compute_dtype} (bnb_4bit_compute_dtype)")
    else:
        method = f"LLM.int8(): 8-bit, one absmax per row; outlier threshold {cfg.int8_threshold} (llm_int8_threshold)"
    lines = [
        "---", "library_name: transformers", *([f"base_model: {hub_id}"] if hub_id else []),
        f"tags: [quantmoe, bitsandbytes, moe, {cfg.quant_type}]", "---",
        f"# {info['name']}", "",
        f"bitsandbytes {cfg.quant_type} quantization of `{base}` ({info['model_type']}), every expert included, "
        f"made with quantmoe {info['version']} (backend `{info['backend']}`).", "",
        "## Base model", "",
        f"`{base}` ({info['model_type']})" + (f", https://huggingface.co/{hub_id}" if hub_id else "") + ".", "",
        "## Method", "",
        f"- bitsandbytes {method}",
        f"- {info['linears']} linears quantized: every attention projection, every routed expert (each expert "
        + ("separately, cut from the base model's fused expert tensors and saved under per-expert names"
           if info.get("fused_on_disk") else "separately, from its own tensors")
        + ") and every shared-expert / dense-MLP projection",
        f"- not quantized: {', '.join(f'`{m}`' for m in q['quantmoe']['modules_not_quantized'])} (routers), norms, "
        "embeddings and the LM head",
        "- per-linear relative weight errors in `quantization_log.json`", "",
    ]
    if stats.get("bits_per_weight") is not None:
        lines += [f"Bits per weight: {stats['bits_per_weight']:.3f} in the quantized projections (codes, absmax "
                  f"scales and bitsandbytes' tables, measured from the files); {100 * stats['fraction_quantized']:.1f}% "
                  f"of all parameters and {100 * stats['decoder_linear_fraction']:.1f}% of the decoder layers' linear "
                  f"weights are quantized; {stats['size_bytes'] / 1e6:.2f} MB on disk.", ""]
    lines += ["## Calibration data", "", "None: bitsandbytes rounds each weight block to its own absmax scale.", ""]
    if report is not None:
        lines += ["## Evaluation protocol", "", protocol_text(report) + " Weights dequantized with bitsandbytes.",
                  f"Text sha256 `{report['data']['text_sha256']}`.", "",
                  "## Perplexity", "", gap_table(report), ""]
    if info.get("experts_unread"):  # transformers reads this family's experts from fused names it no longer finds
        plain = ("loads WITHOUT an error but with every routed expert initialised at random (its load report lists "
                 "the per-expert tensors as UNEXPECTED and the fused `gate_up_proj` / `down_proj` as MISSING): "
                 "never use a model loaded that way")
    elif cfg.four_bit:
        plain = ("stops with a size-mismatch error (do not pass `ignore_mismatched_sizes=True`: it re-initialises "
                 "the experts at random)")
    else:
        plain = ("returns a model whose fused expert tensors hold the raw int8 codes without their scales (its load "
                 "report lists the expert tensors as UNEXPECTED); the first forward fails with a dtype error")
    lines += [
        "## Loading", "",
        "`./this-folder` stands for this folder, or for its Hub repo id once it is published.", "",
        "### quantmoe", "",
        "Every linear dequantized with bitsandbytes into a plain transformers model (CPU or GPU), or kept 4/8-bit "
        "in memory in bitsandbytes' own modules, experts included:",
        "```python", "import quantmoe", "model = quantmoe.load_quantized('./this-folder')",
        "model = quantmoe.load_quantized('./this-folder', kernels='bitsandbytes')", "```", "",
        "### transformers", "",
        "Not loadable with `AutoModelForCausalLM.from_pretrained` alone: transformers 5.x quantizes only "
        "`nn.Linear` modules with bitsandbytes, and its MoE experts are fused 3D parameters, so it cannot place the "
        f"per-expert bitsandbytes tensors (`...experts.E.<proj>.weight` + statistics); it {plain}. Attention and "
        "shared-expert tensors are in transformers' own bitsandbytes format. Use `quantmoe.load_quantized` "
        "above, which returns a transformers model.", "",
        "### vLLM", "",
        "Not tested with this per-expert bitsandbytes layout; for vLLM serving quantize with "
        "`quantmoe quantize --backend gptq`.", "",
        "### GPTQModel", "",
        "Does not apply: GPTQModel loads GPTQ checkpoints (`quantmoe quantize --backend gptq`).", "",
        "Files: `quantization_log.json` (per linear: kind, shape, bytes, relative weight error), "
        "`eval_report.json` / `eval_report.md`, and `manifest.json` (sha256 of every file, options, versions).", "",
    ]
    return "\n".join(lines)


# -- serving with bitsandbytes' own kernels ----------------------------------------------
def _experts_module():
    """BnbExperts, defined on first use so that importing this file needs no torch."""

    class BnbExperts(nn.Module):
        """Routed experts as bitsandbytes linears, one per projection and expert.

        Stands in for transformers' fused experts module (same forward signature, same
        arithmetic as its eager loop): x -> down(act(gate(x)) * up(x)) * routing weight.
        """

        def __init__(self, gate: list, up: list, down: list, act_fn):
            super().__init__()
            self.gate, self.up, self.down = nn.ModuleList(gate), nn.ModuleList(up), nn.ModuleList(down)
            self.num_experts = len(gate)
            self.act_fn = act_fn

        def forward(self, hidden_states, top_k_index, top_k_weights):  # (T, H), (T, k), (T, k) -> (T, H)

            out = torch.zeros_like(hidden_states)
            for e in top_k_index.unique().tolist():
                if e >= self.num_experts:  # transformers' padding slot for tokens routed nowhere
                    continue
                token_idx, slot = torch.where(top_k_index == e)
                x = hidden_states[token_idx]
                y = self.down[e](self.act_fn(self.gate[e](x)) * self.up[e](x))
                out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
            return out

    return BnbExperts


def _bnb_linear(bnb, tensors: dict, bias, shape: tuple[int, int], quantization: dict, device, compute_dtype):
    """One bitsandbytes module from its saved tensors (names relative to the module)."""

    out_features, in_features = shape
    if "SCB" in tensors:
        # Linear8bitLt only takes saved int8 weights once it is itself quantized, hence .to() first.
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                    threshold=quantization.get("llm_int8_threshold", 6.0)).to(device)
        layer.load_state_dict({**tensors, **({"bias": bias} if bias is not None else {})})
        return layer.to(device)
    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype)
    stats = {k: v for k, v in tensors.items() if k != "weight"}
    layer.weight = bnb.nn.Params4bit.from_prequantized(tensors["weight"], stats, requires_grad=False,
                                                       device=torch.device(device), module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device, compute_dtype), requires_grad=False)
    # bitsandbytes' AVX512-BF16 CPU path repacks the weight in tiles of 32 rows x one absmax block
    # of columns and fails on other shapes; such linears keep its generic dequantize-then-matmul path.
    if out_features % 32 or in_features % layer.weight.blocksize:
        layer.support_avx512bf16_for_cpu = False
    return layer


def load_with_kernels(path, device: str = "auto"):
    """A transformers model of a bnb checkpoint that runs bitsandbytes' own kernels, experts included.

    Attention, shared-expert and dense linears become ``Linear4bit`` / ``Linear8bitLt``; each
    MoE block's fused experts module becomes ``BnbExperts`` (one bitsandbytes linear per
    expert projection). Weights stay quantized in memory: this is the model that delivers
    the 4-bit memory footprint. Non-quantized parts are in the compute dtype (4-bit:
    ``bnb_4bit_compute_dtype``; int8: float16). Outputs match ``load_quantized``'s
    dequantized model up to the kernels' rounding (bf16/int8 activations), not bit for bit.
    """


    ckpt = Checkpoint(path)
    backend = ckpt.format
    if not isinstance(backend, BnbReader):
        raise QuantMoeError(f"{ckpt.path} is not a bitsandbytes checkpoint "
                            f"({backend.name if backend else 'not quantized'}); kernels='bitsandbytes' needs one "
                            "made with --backend bnb-nf4/bnb-fp4/bnb-int8")
    bnb = require_bitsandbytes(backend.name)
    dev = pick_device(device)
    q = ckpt.quantization
    compute = getattr(torch, q.get("bnb_4bit_compute_dtype", "bfloat16")) if backend.quant_type != "int8" else torch.float16
    config = model_config(ckpt)
    arch = architecture_for(config)
    model = skeleton(config, compute)
    linears = ckpt.quantized_linears
    stored = {t for lin in linears.values() for t in lin.tensors}

    def module_for(full: str):
        lin = linears[full]
        bias = f"{full}.bias"
        stored.add(bias)
        return _bnb_linear(bnb, {n[len(full) + 1:]: ckpt.tensor(n) for n in lin.tensors},
                           ckpt.tensor(bias) if ckpt.has(bias) else None, lin.shape, q, dev, compute)

    for i, layer in enumerate(model.model.layers):
        prefix = ckpt.layer_prefix(i)
        plan = plan_layer(arch, config, i)
        experts = plan.experts
        for name in plan.quantized_linears():
            if experts is not None and name.startswith(experts.prefix.split("{e}")[0]):
                continue
            layer.set_submodule(module_to_memory(arch, name), module_for(prefix + name))
        if experts is not None:
            fused = layer.get_submodule(arch.fused.module)
            built = {w: [module_for(prefix + experts.linear(w, e)) for e in range(plan.num_experts)]
                     for w in ("gate", "up", "down")}
            layer.set_submodule(arch.fused.module, _experts_module()(built["gate"], built["up"], built["down"],
                                                                        fused.act_fn))
    # Everything else (embeddings, norms, routers, biases, head) from the checkpoint, in the compute dtype.
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    copied = unquantized_prefixes(ckpt, arch)  # no module of the model holds them, as no MTP layer's tensor
    for name in ckpt.names():
        if name in stored or name.startswith(copied):
            continue
        target = name
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            if index >= config.num_hidden_layers:
                continue
            target = ckpt.layer_prefix(index) + arch.to_memory(name[len(ckpt.layer_prefix(index)):])
        if target not in params and target not in buffers:
            raise QuantMoeError(f"tensor {name} of {ckpt.path} has no place in the {config.model_type} model; "
                                "is the checkpoint complete and of this architecture?")
        module_name, _, attr = target.rpartition(".")
        if target in buffers:  # e.g. DeepSeek's e_score_correction_bias: a buffer, kept in its stored dtype
            model.get_submodule(module_name).register_buffer(attr, ckpt.tensor(name).to(dev))
        else:
            setattr(model.get_submodule(module_name), attr,
                    torch.nn.Parameter(ckpt.tensor(name).to(dev, compute), requires_grad=False))
    if model.lm_head.weight.is_meta and getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:
        model.model.rotary_emb = type(rotary)(config=config).to(dev)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise QuantMoeError(f"{ckpt.path} lacks {left[0]} (and {len(left) - 1} more); is the checkpoint complete?")
    return model.eval()
