"""Run a checkpoint one decoder layer at a time.

The model skeleton is built on the ``meta`` device (no memory); only the embeddings,
the rotary tables, the current decoder layer and, at the end, the head are ever
materialised. Activations for all sequences are kept between layers, so peak memory is
one layer plus the activations, whatever the depth.

This is the one input-capture path: quantization, evaluation and loading all use it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import (
    AttentionInterface,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.integrations import sdpa_attention
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..base.errors import QuantMoeError
from ..base.measure import register_pinned_in_parallel
from ..formats.base import StoredWeight
from ..formats.fp8 import FP8_STORED, Fp8Experts, Fp8Weight, dequantize_stored
from ..gptq.core import half_products, tf32_matmuls
from .architectures import (
    Architecture,
    FusedExperts,
    architecture_for,
    plan_layer,
    reused_keys_window,
)
from .checkpoint import Checkpoint
from .distributed import SINGLE, Ranks, broadcast, spread


class _Stop(Exception):
    """Raised by a capture hook to skip the rest of a forward pass."""


@dataclass
class Batch:
    """A mini-batch of sequences between two layers. Under several processes each holds the hidden states
    of its share of the batches only (``LayerStream.embed``); the others' are meta tensors (their shape and
    dtype, no memory), which writes leave alone."""

    hidden: Tensor  # (b, L, hidden) activations entering the next layer
    kwargs: dict    # what the model passes every layer: position embeddings, mask, ...


ATTENTION_SCORES_BYTES = 2 * 2**30  # what one batch's attention scores may take
# Layers larger than this are read ahead in ordinary host memory (see LayerStream.read_ahead_state): it bounds
# the page-locked memory a read holds (PyTorch keeps such blocks cached for reuse, each rounded up to a power of
# two). A DeepSeek-V3 MoE layer in FP8 is read into it (its experts copy to the device several times faster
# from there); a layer larger than this one is copied from ordinary memory.
PIN_BYTES = 16 << 30
# How much of a fused expert tensor stored transposed is moved to the device at a time to be laid out there.
FUSED_CHUNK_BYTES = 256 << 20


def default_batch_size(config, seqlen: int) -> int:
    """Sequences per forward pass when none is asked for: the largest batch, at most 8, whose
    fp32 attention scores (batch, heads, seqlen, seqlen) take at most 2 GiB.

    transformers' SDPA path materialises those scores in fp32; at Mixtral-8x7B's 32 heads and
    2048 tokens a batch of 8 holds 4 GiB per tensor and peaked at 28.6 GB of GPU memory, a batch
    of 4 at 22.7 GB with the same speed (benchmarks/README.md). Small models keep 8.
    """
    per_sequence = int(getattr(config, "num_attention_heads", 1) or 1) * seqlen * seqlen * 4
    return max(1, min(8, ATTENTION_SCORES_BYTES // per_sequence))


def pick_device(device: str) -> torch.device:
    """The device ``--device`` names ("auto": CUDA where visible); for CUDA, page-locked host memory set up to be
    allocated in parallel (base.measure.register_pinned_in_parallel)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QuantMoeError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
        register_pinned_in_parallel()
    return torch.device(device)


def model_config(ckpt: Checkpoint):
    """The config to build the plain (unquantized) model class from."""
    config = ckpt.config
    if getattr(config, "quantization_config", None) is not None:
        config = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    config._attn_implementation = "sdpa"
    # Routed experts run transformers' eager loop, one expert at a time: the computation the quantize
    # stage's StoredExperts (stages/experts.py) repeats with weights rebuilt per expert, so every pass
    # (quantize, a resume's replay, evaluation) rounds alike whatever memory the experts are kept in
    # (under --tf32 on CUDA, quantize's and the replay's experts take fp16 operands: StoredExperts).
    config._experts_implementation = "eager"
    return config


def fp32_attention_without_scores() -> None:
    """Let fp32 attention on CUDA run without materialising its (batch, heads, seq, seq) scores.

    For grouped KV heads transformers' SDPA path asks PyTorch for GQA (``enable_gqa``) when there
    is no mask; in fp32 on CUDA only the math kernel takes that, and it builds the scores and
    their softmax: 2 GiB each for a batch of 4 of Mixtral-8x7B's 32 heads and 2048 tokens, 5-6 GB
    of every capture pass's peak (benchmarks/README.md). With the K/V heads repeated instead,
    SDPA takes its memory-efficient kernel. The same attention, another kernel's rounding; CPU
    and half-precision inputs keep transformers' choice. Idempotent; a transformers without
    the hook is left alone.
    """
    original = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if original is None or getattr(original, "quantmoe", False):
        return

    def use_gqa_in_sdpa(attention_mask, key, value) -> bool:
        if key.is_cuda and key.dtype == torch.float32:
            return False  # transformers then repeats the K/V heads itself
        return original(attention_mask, key, value)

    use_gqa_in_sdpa.quantmoe = True
    sdpa_attention.use_gqa_in_sdpa = use_gqa_in_sdpa


_SDPA = sdpa_attention.sdpa_attention_forward  # transformers' own, whatever is registered as "sdpa"
_HALF_ATTENTION = ContextVar("half_attention", default=False)
# Where the largest magnitude of each of attention's inputs lands in fp16 (whose largest finite value is 65504):
# every value down to 2^-28 of it keeps fp16's full 10-bit mantissa, TF32's.
HALF_ATTENTION_PEAK = 2.0**14


@contextlib.contextmanager
def tensor_core_passes(enabled: bool) -> Iterator[None]:
    """The forward passes' precision under ``--tf32`` (on CUDA): fp32 matrix products as TF32
    (gptq.core.tf32_matmuls), the statistics' and the routed experts' products on scaled fp16 operands
    (gptq.core.half_products) and attention on fp16 copies of its inputs (``half_sdpa``), all rounding the
    inputs of tensor-core products to a 10-bit mantissa and accumulating in fp32."""
    token = _HALF_ATTENTION.set(enabled)
    try:
        with tf32_matmuls(enabled), half_products(enabled):
            yield
    finally:
        _HALF_ATTENTION.reset(token)


def half_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              *args, scaling: float | None = None, **kwargs) -> tuple[Tensor, Tensor | None]:
    """transformers' SDPA attention; inside ``tensor_core_passes`` on CUDA, for fp32 inputs without an additive
    mask, on fp16 copies of the queries, keys and values, each first multiplied by the power of two that
    brings its largest magnitude to HALF_ATTENTION_PEAK (exact; undone in the softmax's scale and on the
    output): fp16 tensor-core kernels with fp32 accumulation and softmax instead of fp32 ones, where the
    attention takes most of a pass through a layer with many heads. Inputs holding a non-finite value keep
    the fp32 kernel. Costs one device-to-host read of the three largest magnitudes per call."""
    if not (_HALF_ATTENTION.get() and query.is_cuda and query.dtype == torch.float32
            and (attention_mask is None or attention_mask.dtype == torch.bool)):
        return _SDPA(module, query, key, value, attention_mask, *args, scaling=scaling, **kwargs)
    return scaled_half_sdpa(module, query, key, value, attention_mask, *args, scaling=scaling, **kwargs)


def scaled_half_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     *args, scaling: float | None = None, **kwargs) -> tuple[Tensor, Tensor | None]:
    """``half_sdpa``'s fp16 attention on any device (the CPU runs it too, slowly: for tests)."""
    peaks = torch.stack([t.abs().amax() for t in (query, key, value)]).tolist()
    if not all(math.isfinite(p) for p in peaks):
        return _SDPA(module, query, key, value, attention_mask, *args, scaling=scaling, **kwargs)
    sq, sk, sv = (2.0 ** math.floor(math.log2(HALF_ATTENTION_PEAK / p)) if p > 0 else 1.0 for p in peaks)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out, weights = _SDPA(module, (query * sq).half(), (key * sk).half(), (value * sv).half(), attention_mask,
                         *args, scaling=scaling / (sq * sk), **kwargs)
    return out.float().mul_(1.0 / sv), weights


def half_attention_in_sdpa() -> None:
    """Route transformers' "sdpa" attention through ``half_sdpa``, which is SDPA itself outside
    ``tensor_core_passes``. Idempotent."""
    if AttentionInterface()["sdpa"] is not half_sdpa:
        AttentionInterface.register("sdpa", half_sdpa)


# What transformers' model outputs call the cache ("cache" from transformers 5.2x, "past_key_values" before).
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class HeadedLM(PreTrainedModel, GenerationMixin):
    """The causal LM of a language model that transformers builds only as a base model (Qwen3-VL-MoE's, whose
    releases run it inside a vision-language model under that model's head): the base model (``AutoModel``) as
    ``model`` and an LM head as ``lm_head``, the names a text-only checkpoint gives them. Its forward returns the
    logits (and the loss for ``labels``), and it generates, as a causal-LM class of transformers does."""

    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True

    def __init__(self, config):
        super().__init__(config)
        self.model = AutoModel.from_config(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(self, input_ids: Tensor | None = None, labels: Tensor | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, **kwargs)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE: getattr(out, _CACHE, None)})


def skeleton(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of ``config`` on the meta device: every module and shape, no memory."""

    try:
        with torch.device("meta"):
            if not architecture_for(config).causal_lm:
                return HeadedLM(config).to(dtype)
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise QuantMoeError(f"a {config.model_type!r} model is not a causal LM; "
                                "quantmoe quantizes decoder-only language models") from None
        raise _config_error(config, exc) from None
    except (TypeError, ArithmeticError, AttributeError, KeyError, IndexError, RuntimeError) as exc:
        raise _config_error(config, exc) from None


def _config_error(config, exc: Exception) -> QuantMoeError:
    detail = " ".join(str(exc).split())[:160]
    return QuantMoeError(f"transformers cannot build a {config.model_type!r} model from this config.json "
                         f"({type(exc).__name__}: {detail}); restore the checkpoint's config.json")


class LayerStream:
    """A causal LM whose parts are loaded on demand from a Checkpoint."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype = torch.float32):
        self.ckpt = ckpt
        self.device = device
        self.dtype = dtype
        self.config = model_config(ckpt)
        fp32_attention_without_scores()  # every forward pass of quantmoe runs through a LayerStream
        half_attention_in_sdpa()
        self.arch: Architecture = architecture_for(self.config)
        ckpt.check_layers()  # before a skeleton of that many layers is built
        self.model = skeleton(self.config, dtype)
        self.model.eval()
        inner = self.model.model
        # Each MoE layer's fused expert tensors as its config shapes them, before a load replaces them
        # (load_layer checks what the checkpoint holds against them).
        self._expert_shapes = {i: {name: tuple(getattr(module, attr).shape)
                                   for name, (module, attr) in self._fused_params(layer, i).items()}
                               for i, layer in enumerate(inner.layers)}
        for name, shape in self.outer_shapes() + self.expert_shapes():  # before anything is allocated for them
            check_shape(ckpt, name, shape)
        inner.embed_tokens.to_empty(device=device)
        inner.embed_tokens.weight.data.copy_(ckpt.tensor("model.embed_tokens.weight"))
        rotary = getattr(inner, "rotary_emb", None)
        if rotary is not None:
            inner.rotary_emb = type(rotary)(config=self.config).to(device)

    @property
    def experts_per_token(self) -> int | None:
        """The routed experts each token goes to (the config's ``num_experts_per_tok``; None where it has none)."""
        return getattr(self.config, "num_experts_per_tok", None)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def outer_tensors(self) -> list[tuple[str, Tensor]]:
        """(stored tensor name, the parameter it fills) for everything outside the decoder layers:
        embeddings, final norm and head (the embeddings where the head is tied to them)."""
        inner, head = self.model.model, self.model.lm_head
        return [("model.embed_tokens.weight", inner.embed_tokens.weight), (self.head_tensor(), head.weight),
                *((f"model.norm.{k}", v) for k, v in inner.norm.named_parameters()),
                *([("lm_head.bias", head.bias)] if head.bias is not None else [])]

    def outer_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(stored tensor name, the shape its config gives it) for everything outside the decoder layers."""
        return [(name, tuple(param.shape)) for name, param in self.outer_tensors()]

    def expert_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(stored tensor name, the shape its config gives it) for every routed expert's weight stored one linear
        per expert as the weight itself, or as an FP8 release's codes of its shape (a quantized export's packed
        weights are checked as each layer loads instead: load_layer), from each MoE layer's fused tensors as its
        config shapes them."""
        quantized = self.ckpt.quantized_linears
        out = []
        for index, fused in self._expert_shapes.items():
            if not fused:
                continue
            plan = plan_layer(self.arch, self.config, index)
            _, rows, columns = fused[f"{plan.fused.module}.{plan.fused.gate_up}"]  # (E, 2I, C); down (E, C, I)
            shapes = {h: (rows // len(plan.fused.halves), columns) for h in plan.fused.halves}
            shapes["down"] = fused[f"{plan.fused.module}.{plan.fused.down}"][1:]
            for e in range(plan.num_experts):
                for w, shape in shapes.items():
                    module = f"{self.ckpt.layer_prefix(index)}{plan.experts.linear(w, e)}"
                    name = f"{module}.weight"
                    if self.ckpt.has(name) and (module not in quantized or self.ckpt.dtype(name) in FP8_STORED):
                        out.append((name, shape))
        return out

    def head_tensor(self) -> str:
        """The stored tensor the LM head's weight comes from: ``lm_head.weight``, or the embeddings when
        the config ties the two (a head missing from an untied checkpoint is an error, not a substitute)."""
        if self.ckpt.has("lm_head.weight"):
            return "lm_head.weight"
        if not getattr(self.config, "tie_word_embeddings", False):
            raise QuantMoeError(f"{self.ckpt.path} has no lm_head.weight, and its config does not tie the head to the "
                                "embeddings; the checkpoint is incomplete: re-download it")
        return "model.embed_tokens.weight"

    # -- embeddings ----------------------------------------------------------------
    @torch.no_grad()
    def embed(self, input_ids: Tensor, batch_size: int, ranks: Ranks = SINGLE) -> list[Batch]:
        """Token ids (N, L) -> the inputs of layer 0, in mini-batches. Under several processes (``ranks``) each
        keeps the hidden states of the batches whose forward passes it runs (``distributed.spread``: every
        world-th, from its rank on); the others' are meta tensors. Every process keeps every batch's kwargs."""
        first = self.model.model.layers[0]
        grabbed: list[Batch] = []

        def grab(_module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            grabbed.append(Batch(hidden, kwargs))
            raise _Stop

        handle = first.register_forward_pre_hook(grab, with_kwargs=True)
        every_key = self.every_key(input_ids.shape[1])
        try:
            for start in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[start:start + batch_size].to(self.device)
                with contextlib.suppress(_Stop):
                    self.model.model(input_ids=ids, use_cache=False)
                if every_key is not None:
                    grabbed[-1].kwargs[self.arch.indexer_keys] = every_key.expand(ids.shape[0], -1, -1)
                if (len(grabbed) - 1) % ranks.world != ranks.rank:  # another process's batch
                    grabbed[-1].hidden = grabbed[-1].hidden.to("meta")
        finally:
            handle.remove()
        return grabbed

    def every_key(self, seqlen: int) -> Tensor | None:
        """For a model with layers that attend to the keys an earlier layer's indexer chose (the row's
        ``indexer_keys``: GLM-5.2's "shared" layers), every key of a window of ``seqlen`` tokens, (1, seqlen, seqlen)
        int32: the indexer's choice while ``seqlen`` is no longer than its ``index_topk`` (the causal mask then does
        the rest), so passing it gives those layers exactly the model's attention. None for other models."""
        if not self.arch.reuses_keys(self.config):
            return None
        refused = reused_keys_window(self.arch, self.config, seqlen)
        if refused is not None:
            raise QuantMoeError(refused)
        return torch.arange(seqlen, dtype=torch.int32, device=self.device).expand(1, seqlen, seqlen)

    # -- decoder layers ------------------------------------------------------------
    def layer_bytes(self, index: int, experts: range | None = None) -> int:
        """Bytes of layer ``index`` in the shards that a read of its routed experts ``experts`` (``expert_share``;
        None: all) takes: what the read holds in host memory."""
        prefix, keep = self.ckpt.layer_prefix(index), self.reads(index, experts)
        return sum(self.ckpt.nbytes(name) for name in self.ckpt.names(prefix) if keep is None or keep(name[len(prefix):]))

    def read_ahead_state(self, index: int, experts: range | None = None) -> dict[str, Tensor]:
        """``layer_state`` for a read that runs while the layer before it is worked on: as stored (converted
        on the device), and on CUDA in page-locked memory (read straight into it) unless the read is larger
        than PIN_BYTES."""
        pin = self.device.type == "cuda" and self.layer_bytes(index, experts) <= PIN_BYTES
        return self.layer_state(index, keep_dtype=True, pin=pin, experts=experts)

    def expert_share(self, index: int, ranks: Ranks) -> range | None:
        """The routed experts of layer ``index`` this process holds under several processes (``Ranks.share``,
        as stages.experts.StoredExperts keeps them); None: all of them (one process, or no routed experts)."""
        plan = plan_layer(self.arch, self.config, index)
        return None if ranks.world == 1 or plan.experts is None else ranks.share(plan.num_experts)

    def reads(self, index: int, experts: range | None) -> Callable[[str], bool] | None:
        """Which of layer ``index``'s tensors (by layer-relative on-disk name) a load of the routed experts
        ``experts`` reads: all but the other experts' (None: all). An empty share still reads the last
        expert, whose shapes give its (empty) fused tensors."""
        if experts is None:
            return None
        num = plan_layer(self.arch, self.config, index).num_experts
        wanted = experts if len(experts) else range(num - 1, num)

        def keep(name: str) -> bool:
            e = self.arch.expert_of(name)
            return e is None or e in wanted
        return keep

    def layer_state(self, index: int, keep_dtype: bool = False, pin: bool = False,
                    experts: range | None = None) -> dict[str, Tensor]:
        """Layer ``index``'s tensors under source on-disk names relative to the layer, in host memory
        (an export with unfused expert names, GPTQModel's or llm-compressor's, is recognised by its
        names and mapped back). ``experts``: the routed experts to read (``expert_share``; None: all):
        the other experts' tensors are not read from the shards (of fused ones, GraniteMoE's, only the
        experts' rows are read).

        ``keep_dtype`` leaves them as stored (bf16 for most checkpoints: half the bytes to
        read and to copy to the device, where ``load_layer`` converts them). Safe to call
        from a background thread while another layer is being worked on. ``pin``: read straight into
        page-locked memory, which a GPU copies from asynchronously and several times faster.
        """
        if pin and self.device.index is not None:
            # Under this process's GPU: a reading thread starts on device 0, where a second process
            # must not make a CUDA context (torchrun: rank 1 would hold one on rank 0's GPU).
            torch.cuda.set_device(self.device)
        fused = plan_layer(self.arch, self.config, index).fused_disk_tensors() if experts is not None else ()
        state = self.ckpt.read_prefix(self.ckpt.layer_prefix(index), None if keep_dtype else self.dtype, defer=True,
                                      pin=pin, only=self.reads(index, experts), rows=dict.fromkeys(fused, experts))
        if self.arch.uses_unfused_names(state):
            state = {self.arch.from_gptqmodel_name(k): v for k, v in state.items()}
        return state

    def experts_dtype(self, index: int, state: dict[str, Tensor]) -> torch.dtype:
        """The dtype layer ``index``'s routed experts are stored in, in its on-disk ``state`` (``layer_state``'s
        ``keep_dtype``): that of the first expert read (under several processes, of this process's share);
        fp32 where there are none."""
        plan = plan_layer(self.arch, self.config, index)
        fused, mlp = plan.fused, plan.experts
        if fused is None or mlp is None:
            return torch.float32
        names = [fused.disk_gate_up] if fused.on_disk else []
        names += [f"{mlp.linear(fused.halves[0], e)}.weight" for e in range(plan.num_experts)]
        return next((state[n].dtype for n in names if n in state), torch.float32)

    def load_layer(self, index: int, state: dict[str, Tensor], experts_dtype: torch.dtype | None = None,
                   keep_fp8: bool = False, experts: range | None = None) -> nn.Module:
        """Materialise decoder layer ``index`` from on-disk tensors (fusing experts as transformers 5 does).

        Tensors are moved to the device first, so dequantizing an FP8 release (formats.fp8.Fp8Weight:
        a bad scale stops the run with one line naming the tensor) and converting to the stream's dtype
        run there rather than on the host; the routed experts are moved one expert at a time, straight
        into their fused tensors, so the device never holds a layer's experts twice. ``experts_dtype``:
        the dtype of the fused expert tensors (default: the stream's). ``keep_fp8``: an FP8 release's
        routed experts stay as stored, each fused tensor a ``formats.fp8.Fp8Experts`` (codes and scales:
        half the bytes of BF16) set on the experts module in place of its parameter, for the caller to
        dequantize an expert at a time (stages.experts.StoredExperts); ``release_layer`` drops them.
        ``experts``: the routed experts to hold (``expert_share``; None: all): the fused tensors then hold
        only those, in order (len(experts), ...), and ``state`` needs no others (``layer_state``'s ``experts``).
        """
        layer = self.model.model.layers[index]
        fused = self._fused_params(layer, index)
        for module, attr in fused.values():  # allocated below, in their own dtype, not by to_empty
            setattr(module, attr, nn.Parameter(torch.empty(0, device="meta"), requires_grad=False))
        layer.to_empty(device=self.device)
        plan = plan_layer(self.arch, self.config, index)
        per_expert = set(self._expert_tensor_names(plan, state)) if fused else set()
        state = {name: t if name in per_expert else t.to(self.device, non_blocking=True) for name, t in state.items()}
        state = dequantize_stored(state, skip=per_expert)
        try:
            mapped = self.to_memory(index, state, experts_dtype or self.dtype, keep_fp8, experts)
            for name, (module, attr) in fused.items():
                value = mapped.pop(name)
                want = self._expert_shapes.get(index, {}).get(name)
                if want is not None and (tuple(value.shape[1:]) != want[1:]
                                         or value.shape[0] != (want[0] if experts is None else len(experts))):
                    raise QuantMoeError(
                        f"layer {index} of {self.ckpt.path} does not match its {self.config.model_type} config: its "
                        f"experts make {name} {list(value.shape)}, where config.json makes it {list(want)}; restore "
                        "config.json or re-download the checkpoint")
                if isinstance(value, Fp8Experts):
                    delattr(module, attr)  # a plain attribute now: no Parameter holds FP8 codes
                    setattr(module, attr, value)
                else:
                    setattr(module, attr, nn.Parameter(value, requires_grad=False))
            missing = layer.load_state_dict(mapped, strict=False)
        except (RuntimeError, KeyError, IndexError) as exc:  # a tensor of the wrong shape, a missing expert
            detail = " ".join(str(exc).split())[:240]
            raise QuantMoeError(f"layer {index} of {self.ckpt.path} does not match its {self.config.model_type} "
                                f"config ({type(exc).__name__}: {detail}); is the checkpoint complete and of "
                                "this architecture?") from None
        absent = [k for k in missing.missing_keys if k not in fused]
        if absent or missing.unexpected_keys:
            raise QuantMoeError(
                f"layer {index} of {self.ckpt.path} does not match its {self.config.model_type} config "
                f"(missing {absent[:3]}, unexpected {missing.unexpected_keys[:3]}); "
                "is the checkpoint complete and of this architecture?")
        return layer

    def _fused_params(self, layer: nn.Module, index: int) -> dict[str, tuple[nn.Module, str]]:
        """The routed experts' fused parameters of ``layer`` (their module and attribute), by their names
        in the layer's state dict."""
        plan = plan_layer(self.arch, self.config, index)
        if plan.experts is None:
            return {}
        module = layer.get_submodule(plan.fused.module)
        return {f"{plan.fused.module}.{attr}": (module, attr) for attr in (plan.fused.gate_up, plan.fused.down)}

    def _on_device(self, t):
        """A layer tensor on the stream's device: a weight as stored (an FP8 release's Fp8Weight, a quantized
        export's StoredWeight) dequantized there."""
        t = t.to(self.device, non_blocking=True)
        return t.dequantize() if isinstance(t, (Fp8Weight, StoredWeight)) else t

    def _fused_in_memory(self, fused: FusedExperts, stored: Tensor, dtype: torch.dtype) -> Tensor:
        """A fused expert tensor as stored (on the host) -> on the device in ``dtype``, in its in-memory layout. One
        stored transposed (Qwen3-VL-MoE's) is laid out a few experts at a time (FUSED_CHUNK_BYTES), so the device
        holds the layer's tensor and one chunk, not the tensor twice."""
        if not fused.transposed:
            return stored.to(self.device, dtype)
        out = torch.empty(fused.memory_shape(tuple(stored.shape)), device=self.device, dtype=dtype)
        step = max(1, FUSED_CHUNK_BYTES // max(1, math.prod(stored.shape[1:]) * out.element_size()))
        for a in range(0, stored.shape[0], step):
            out[a:a + step].copy_(fused.in_memory(stored[a:a + step].to(self.device, dtype)))
        return out

    @staticmethod
    def _expert_tensor_names(plan, state: dict[str, Tensor]) -> list[str]:
        """The per-expert (or fused on-disk) expert tensors of a layer's on-disk state."""
        fused = plan.fused
        names = [f"{plan.experts.linear(w, e)}.weight" for e in range(plan.num_experts) for w in (*fused.halves, "down")]
        if fused.on_disk:
            names += [fused.disk_gate_up, fused.disk_down]
        return [n for n in names if n in state]

    def release_layer(self, index: int) -> None:
        layer = self.model.model.layers[index]
        for module, attr in self._fused_params(layer, index).values():
            if isinstance(getattr(module, attr), Fp8Experts):  # load_layer's keep_fp8: not a parameter to empty
                setattr(module, attr, nn.Parameter(torch.empty(0, device="meta"), requires_grad=False))
        layer.to_empty(device="meta")

    def release_embeddings(self) -> None:
        """Free the embeddings on the device (once ``embed`` has made the first layer's inputs)."""
        self.model.model.embed_tokens.to_empty(device="meta")

    def to_memory(self, index: int, state: dict[str, Tensor], experts_dtype: torch.dtype | None = None,
                  keep_fp8: bool = False, experts: range | None = None) -> dict[str, Tensor]:
        """On-disk layer tensors -> the layer module's state dict (experts stacked and fused).

        Experts come either one linear per expert (Hub checkpoints of most families, and every
        quantmoe export) or already fused (GraniteMoE's checkpoints); both end up as the row's
        in-memory (E, 2I, H) gate_up and (E, H, I) down tensors, on the stream's device in
        ``experts_dtype`` (default: as stored), filled one expert at a time from ``state``, whose
        per-expert tensors are taken out of it as they are used (so each can be freed at once).
        ``keep_fp8``: per-expert FP8 weights (formats.fp8.Fp8Weight) of one layout become two
        ``Fp8Experts`` instead, as stored. ``experts``: the routed experts the fused tensors hold
        (None: all); ``state``'s other experts are left out.
        """
        arch = self.arch
        plan = plan_layer(arch, self.config, index)
        state = dict(state)  # the caller's dict stays whole
        out: dict[str, Tensor] = {}
        consumed: set[str] = set()
        if plan.experts is not None:
            fused = plan.fused
            held = range(plan.num_experts) if experts is None else experts
            # the expert whose tensors give the shapes: the first held, or for an empty share the one read (reads)
            shapes = held.start if len(held) else plan.num_experts - 1
            gate_up_name, down_name = f"{fused.module}.{fused.gate_up}", f"{fused.module}.{fused.down}"
            per_expert = f"{plan.experts.linear(fused.halves[0], shapes)}.weight" in state
            if fused.on_disk:
                consumed.update((fused.disk_gate_up, fused.disk_down))
            if experts is not None:  # the other experts' tensors, if the state holds them, are not the layer's here
                consumed.update(self._expert_tensor_names(plan, state))
            if fused.on_disk and not per_expert:
                for name, n in ((gate_up_name, fused.disk_gate_up), (down_name, fused.disk_down)):
                    t, dtype = state[n], experts_dtype or state[n].dtype
                    if experts is not None:  # the share's rows (layer_state's), or cut out of every expert's
                        if t.shape[0] == plan.num_experts:
                            t = t[held.start:held.stop].clone()  # the whole tensor's storage can then go
                        if t.shape[0] != len(held):
                            raise IndexError(f"{n} holds {t.shape[0]} experts, not the {len(held)} of this share")
                    out[name] = self._fused_in_memory(fused, t, dtype)
            elif keep_fp8 and self._fp8_experts(plan, state, held, shapes):
                out[gate_up_name], out[down_name] = self._stacked_fp8(plan, state, consumed, held, shapes)
            else:  # per-expert tensors win over fused ones: they are what a quantized export holds
                first = [state[f"{plan.experts.linear(w, shapes)}.weight"] for w in (fused.halves[0], "down")]
                dtype = experts_dtype or first[0].dtype
                I, C = first[0].shape
                gate_up = torch.empty(len(held), len(fused.halves) * I, C, device=self.device, dtype=dtype)
                down = torch.empty(len(held), *first[1].shape, device=self.device, dtype=dtype)
                del first
                for j, e in enumerate(held):
                    for k, w in enumerate(fused.halves):  # (2I, H): the halves in the row's order
                        name = f"{plan.experts.linear(w, e)}.weight"
                        gate_up[j, k * I:(k + 1) * I].copy_(self._on_device(state.pop(name)), non_blocking=True)
                        consumed.add(name)
                    name = f"{plan.experts.linear('down', e)}.weight"
                    down[j].copy_(self._on_device(state.pop(name)), non_blocking=True)  # (H, I)
                    consumed.add(name)
                out[gate_up_name], out[down_name] = gate_up, down
        consumed.update(arch.unloaded)  # tensors no module holds (Kimi K2's rotary tables)
        for name, t in state.items():
            if name not in consumed:
                out[arch.to_memory(name)] = t
        return out

    @staticmethod
    def _expert_parts(plan, experts: range | list[int]) -> list[list[str]]:
        """Per fused tensor (gate_up, down), per expert of ``experts``, the on-disk names of its row blocks in order."""
        fused = plan.fused
        return [[[f"{plan.experts.linear(w, e)}.weight" for w in ws] for e in experts]
                for ws in (fused.halves, ("down",))]

    def _fp8_experts(self, plan, state: dict, held: range, shapes: int) -> bool:
        """Whether the per-expert weights of the experts ``held`` (or, none held, of expert ``shapes``) are FP8
        of one layout (Fp8Experts.fits), each kind."""
        return all(all(n in state for names in kind for n in names)
                   and Fp8Experts.fits([[state[n] for n in names] for names in kind])
                   for kind in self._expert_parts(plan, held if len(held) else [shapes]))

    def _stacked_fp8(self, plan, state: dict, consumed: set[str], held: range, shapes: int
                     ) -> tuple[Fp8Experts, Fp8Experts]:
        """(gate_up, down) of the experts ``held`` as Fp8Experts on the device (expert ``shapes``'s parts give
        the layout), filled one expert part at a time from ``state``."""
        out = []
        for kind, template in zip(self._expert_parts(plan, held), self._expert_parts(plan, [shapes])):
            stack = Fp8Experts(len(kind), [state[n] for n in template[0]], self.device)
            for e, names in enumerate(kind):
                for k, name in enumerate(names):
                    stack.put(e, k, state.pop(name).to(self.device, non_blocking=True))
                    consumed.add(name)
            out.append(stack)
        return out[0], out[1]

    @torch.no_grad()
    def run_layer(self, layer: nn.Module, batches: list[Batch], ranks: Ranks = SINGLE,
                  in_place: bool = False) -> list[Batch]:
        """Outputs of ``layer`` for every batch: the next layer's inputs (with several processes,
        each runs its share of the batches and every process gets all outputs). ``in_place``:
        each output overwrites its batch's input, so the activations never exist twice."""
        def forward(b: Batch) -> Tensor:
            h = layer(b.hidden, **b.kwargs)
            return h[0] if isinstance(h, tuple) else h

        return _outputs(batches, spread(batches, forward, ranks, self.device), in_place)

    # -- the MLP half of a pre-norm layer (the row's ``mlp_tail``) ---------------------
    @torch.no_grad()
    def to_residual(self, layer: nn.Module, batches: list[Batch], ranks: Ranks = SINGLE,
                    projection_inputs: list[Tensor] | None = None, projection: str | None = None,
                    returns: int = 2) -> Iterator[Tensor]:
        """Turn every batch's hidden state, the layer's input, into the residual stream after
        attention (the input of the row's post-attention norm), in place, and yield the MLP's
        input for each batch, (tokens, features). Attention runs once more here and never again
        for this layer: later MLP inputs and the layer's outputs start from the residual.

        ``projection_inputs``: each batch's input of attention's output ``projection`` (a layer-relative
        path, e.g. ``self_attn.o_proj``), captured by an earlier pass through the same attention weights
        (one process): the attention module then only runs that projection on it (``ProjectionOnly``),
        the same bits as running attention again (``returns``: how many values the attention module returns, the
        layer plan's ``attention_outputs``). The list is emptied as the batches go."""
        norm = layer.get_submodule(self.arch.mlp_tail[0])
        attention = stand_in = None
        if projection_inputs is not None:
            attention = projection.rpartition(".")[0]
            stand_in = layer.get_submodule(attention)
            layer.set_submodule(attention, ProjectionOnly(layer.get_submodule(projection), projection_inputs, returns))
        try:
            for b, h in zip(batches, self.capture(layer, batches, self.arch.mlp_tail[0], ranks)):
                b.hidden.copy_(h.view_as(b.hidden))
                # norm.forward: the capture's hook on the norm stays registered until the last batch.
                mlp_input = norm.forward(h.view_as(b.hidden) if b.hidden.is_meta else b.hidden)
                yield mlp_input.reshape(-1, b.hidden.shape[-1])
        finally:
            if stand_in is not None:
                layer.set_submodule(attention, stand_in)

    @torch.no_grad()
    def residuals(self, layer: nn.Module, batches: list[Batch], ranks: Ranks = SINGLE) -> None:
        """``to_residual`` without the MLP's input: every batch's hidden state, the layer's input, turned into
        the residual stream after attention (the input of the row's post-attention norm), in place."""
        for b, h in zip(batches, self.capture(layer, batches, self.arch.mlp_tail[0], ranks)):
            b.hidden.copy_(h.view_as(b.hidden))

    @torch.no_grad()
    def capture_to_residual(self, layer: nn.Module, batches: list[Batch], module_path: str,
                            ranks: Ranks = SINGLE) -> Iterator[Tensor]:
        """``capture`` of a module before the post-attention norm, in a pass that goes on to the norm
        and does what ``to_residual`` does: for a stream whose attention will not change (the
        full-precision one), the last pass through attention serves both."""
        module = layer.get_submodule(module_path)
        norm = layer.get_submodule(self.arch.mlp_tail[0])
        grabbed: list[Tensor] = []

        def grab(_module, args, kwargs):  # the module's input; the pass goes on
            grabbed.append(_first_input(args, kwargs))

        def stop(_module, args, kwargs):  # the residual after attention; the pass ends here
            grabbed.append(_first_input(args, kwargs))
            raise _Stop

        def one(b: Batch) -> Tensor:  # both as one flat tensor, for spread
            with contextlib.suppress(_Stop):
                layer(b.hidden, **b.kwargs)
            h = grabbed.pop()
            return torch.cat([grabbed.pop().reshape(-1), h.reshape(-1)])

        handles = [module.register_forward_pre_hook(grab, with_kwargs=True),
                   norm.register_forward_pre_hook(stop, with_kwargs=True)]
        try:
            for b, both in zip(batches, spread(batches, one, ranks, self.device)):
                x = both[:-b.hidden.numel()]
                b.hidden.copy_(both[-b.hidden.numel():].view_as(b.hidden))
                yield x.view(b.hidden.numel() // b.hidden.shape[-1], -1)
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def norm_scales(self, layer: nn.Module, batches: list[Batch]) -> list[Tensor] | None:
        """For batches that hold the residual after attention (one process), each token's scale in the row's
        post-attention norm, (tokens, 1): an RMSNorm of transformers' form (``weight``, ``variance_epsilon``, fp32)
        computes ``weight * (h * scale)``, and with these scales a caller may make the MLP's input of any rows of
        the residual without norming the rest. Each scale is made by the norm's own operations on its whole batch,
        and the first batch's MLP input is checked against the norm's bit for bit; None where it differs or the
        norm is of another kind, and the caller runs the norm itself."""
        norm = layer.get_submodule(self.arch.mlp_tail[0])
        eps, weight = getattr(norm, "variance_epsilon", None), getattr(norm, "weight", None)
        if not batches or not isinstance(eps, float) or not isinstance(weight, Tensor) \
                or weight.dtype != torch.float32 or any(b.hidden.dtype != torch.float32 for b in batches):
            return None
        scales = [torch.rsqrt(b.hidden.pow(2).mean(-1, keepdim=True) + eps).reshape(-1, 1) for b in batches]
        h = batches[0].hidden
        if not torch.equal(norm(h).reshape(-1, h.shape[-1]), weight * (h.reshape(-1, h.shape[-1]) * scales[0])):
            return None
        return scales

    @torch.no_grad()
    def norm_rows(self, layer: nn.Module, rows: Tensor, scales: Tensor) -> Tensor:
        """Rows of the residual, (rows, features), made the MLP's input in place with their ``norm_scales``:
        the norm's last two products, in its order (``weight * (h * scale)``), the norm's bits for those rows."""
        return rows.mul_(scales).mul_(layer.get_submodule(self.arch.mlp_tail[0]).weight)

    @torch.no_grad()
    def mlp_inputs(self, layer: nn.Module, batches: list[Batch], ranks: Ranks = SINGLE) -> Iterator[Tensor]:
        """The MLP's input for batches that hold the residual after attention (``to_residual``); with several
        processes each computes its batches' and every process gets all."""
        norm = layer.get_submodule(self.arch.mlp_tail[0])
        yield from spread(batches, lambda b: norm(b.hidden).reshape(-1, b.hidden.shape[-1]), ranks, self.device)

    def hidden_states(self, batches: list[Batch], ranks: Ranks, first: int = 0) -> Iterator[Tensor]:
        """Every batch's hidden state on every process, one batch at a time: each sent by the process that
        holds it (``embed``: batch ``first + j`` of the layer's list by process (first + j) % world). A
        process's own batches come as they are, the others' in new tensors."""
        for j, b in enumerate(batches):
            if ranks.world == 1:
                yield b.hidden
                continue
            owner = (first + j) % ranks.world
            h = b.hidden if owner == ranks.rank else torch.empty(b.hidden.shape, dtype=b.hidden.dtype,
                                                                   device=self.device)
            yield broadcast(h, owner)

    @torch.no_grad()
    def run_tail(self, layer: nn.Module, batches: list[Batch], ranks: Ranks = SINGLE) -> list[Batch]:
        """The layer's outputs for batches that hold the residual after attention, written in place:
        residual + mlp(norm(residual)), the last lines of the layer's own forward."""
        norm, mlp = (layer.get_submodule(path) for path in self.arch.mlp_tail)

        def forward(b: Batch) -> Tensor:
            out = mlp(norm(b.hidden))
            return b.hidden + (out[0] if isinstance(out, tuple) else out)

        return _outputs(batches, spread(batches, forward, ranks, self.device), True)

    @torch.no_grad()
    def capture(self, layer: nn.Module, batches: list[Batch], module_path: str,
                ranks: Ranks = SINGLE) -> Iterator[Tensor]:
        """The input of ``layer.<module_path>`` for each batch, flattened to (tokens, features).

        The forward pass stops at that module, so nothing after it is computed. With several
        processes each runs its share of the batches; every process gets every batch's input.
        """
        module = layer.get_submodule(module_path)
        grabbed: list[Tensor] = []

        def grab(_module, args, kwargs):
            x = _first_input(args, kwargs)
            grabbed.append(x.reshape(-1, x.shape[-1]))
            raise _Stop

        def one(b: Batch) -> Tensor:
            with contextlib.suppress(_Stop):
                layer(b.hidden, **b.kwargs)
            return grabbed.pop()

        handle = module.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            yield from spread(batches, one, ranks, self.device)
        finally:
            handle.remove()

    # -- head ----------------------------------------------------------------------
    @torch.no_grad()
    def load_head(self) -> None:
        inner = self.model.model
        head = self.model.lm_head
        name = self.head_tensor()
        inner.norm.to_empty(device=self.device)
        inner.norm.load_state_dict({k: v.to(self.dtype) for k, v in self.ckpt.read_prefix("model.norm.").items()})
        head.to_empty(device=self.device)
        head.weight.data.copy_(self.ckpt.tensor(name))
        if head.bias is not None:
            head.bias.data.copy_(self.ckpt.tensor("lm_head.bias"))

    @torch.no_grad()
    def logits(self, hidden: Tensor) -> Tensor:
        logits = self.model.lm_head(self.model.model.norm(hidden)).float()
        if self.arch.logits_divisor is not None:  # as the model's own forward does (GraniteMoE)
            logits = logits / getattr(self.config, self.arch.logits_divisor)
        return logits


def check_shape(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> None:
    """Raise unless tensor ``name`` is stored with ``shape``, the one the config sizes it to (read from the
    shard's header: nothing is loaded or allocated)."""
    stored = ckpt.shape(name)
    if stored != tuple(shape):
        raise QuantMoeError(f"{name} in {ckpt.path} is {list(stored)}, but its config.json needs "
                            f"{list(shape)}; the config does not match the weights: restore it or "
                            "re-download the checkpoint")


class ProjectionOnly(nn.Module):
    """Stands in for an attention module whose output projection's inputs are known (``to_residual``):
    each call takes the next batch's (tokens, features) input and returns (projection(input), None, ...), shaped
    as the call's hidden states, as the attention module returns its output and no weights. ``outputs``: how many
    values the module it stands in for returns (the layer plan's ``attention_outputs``), the rest None (1: the
    output alone, not in a tuple); the pass it serves stops before the layer would use them."""

    def __init__(self, projection: nn.Module, inputs: list[Tensor], outputs: int = 2):
        super().__init__()
        self.projection = projection
        self.inputs = inputs
        self.outputs = outputs

    def forward(self, *args, **kwargs) -> Tensor | tuple[Tensor | None, ...]:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        x = self.inputs.pop(0)  # each is let go of once used
        out = self.projection(x.view(*hidden.shape[:-1], x.shape[-1]))
        return out if self.outputs == 1 else (out, *(None,) * (self.outputs - 1))


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    """The tensor a forward pre-hook's module is called on."""
    return args[0] if args else next(iter(kwargs.values()))


def _outputs(batches: list[Batch], outputs: Iterator[Tensor], in_place: bool) -> list[Batch]:
    """The batches with ``outputs`` as their hidden states: written into the same tensors
    (``in_place``; each output is computed before its batch is overwritten) or as new batches."""
    if not in_place:  # another process's batch stays a meta tensor
        return [Batch(b.hidden if b.hidden.is_meta else h, b.kwargs) for h, b in zip(outputs, batches)]
    for b, h in zip(batches, outputs):
        b.hidden.copy_(h.view_as(b.hidden))
    return batches
