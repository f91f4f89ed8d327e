"""Stage 4: perplexity of a checkpoint (original or quantized) under one stated protocol.

Protocol (as in the GPTQ paper): the evaluation documents are joined with "\\n\\n" and
tokenized once without special tokens; the stream is cut into non-overlapping windows
of ``seqlen`` tokens (the trailing partial window is dropped); perplexity is
exp(mean token-level negative log-likelihood) over every predicted position
(seqlen - 1 per window). The model runs layer by layer (see stream.py) in fp32; each layer is read as
stored while the one before it runs, and converted (a quantized layer's weights dequantized,
formats.base.StoredWeight) on the device as it loads.
"""

from __future__ import annotations

import hashlib
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from ..base.errors import QuantMoeError, note
from ..base.files import made_from, save_safetensors
from ..base.measure import Stopwatch, stage
from ..base.paths import (
    DEFAULT_MODEL,
    EVAL_DATA,
    beyond_context,
    default_seqlen,
    published_name,
)
from ..formats import READERS
from ..gptq.core import tf32_matmuls
from ..model.checkpoint import READ_WINDOW, Checkpoint
from ..model.stream import Batch, LayerStream, default_batch_size, pick_device
from .calibrate import check_count, read_documents, token_stream, tokenizer_fingerprint
from .export import checkpoint_stats

TF32 = "float32 with TF32 matrix products"  # the protocol's dtype under --tf32 on CUDA
# The forward passes' dtypes (--dtype); the head's logits, log-softmax, losses and KL are float32 in each.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BF16 = "bfloat16 (float32 accumulation; logits, log-softmax, losses and KL in float32)"


def protocol_dtype(dtype: str, tf32: bool, device: str) -> str:
    """The protocol's ``dtype`` line for forward passes in ``dtype`` (a DTYPES key) on ``device``."""
    if dtype == "bfloat16":
        return BF16
    return TF32 if tf32 and device.startswith("cuda") else "float32"


@dataclass(frozen=True)
class Protocol:
    data: str
    seqlen: int
    join: str = "\\n\\n"
    special_tokens: bool = False
    windows: str = "non-overlapping, trailing partial window dropped"
    metric: str = "token-level perplexity, exp(mean NLL over seqlen-1 predicted tokens per window)"
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return asdict(self)


def eval_windows(tokenizer, data: str | Path, seqlen: int) -> tuple[Tensor, dict]:
    """Token windows (N, seqlen) of the eval text, and what they were made from."""
    check_count("--seqlen", seqlen, least=2)
    docs = read_documents(data)
    stream = token_stream(tokenizer, docs)
    n = stream.numel() // seqlen
    if n == 0:
        raise QuantMoeError(f"the eval text has {stream.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
                            "give more text or a smaller --seqlen")
    text_hash = hashlib.sha256("\n\n".join(docs).encode()).hexdigest()
    meta = {"path": str(data), "text_sha256": text_hash, "documents": len(docs), "tokens": int(stream.numel()),
            "windows": n, "tokens_scored": n * (seqlen - 1), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
    return stream[: n * seqlen].reshape(n, seqlen), meta


class Reference:
    """A model's next-token log-probabilities on the evaluation windows, for the KL of another model
    to it: its last hidden states, batch by batch (kept on the CPU: windows x seqlen x hidden x 4
    bytes, as much as the evaluation's own activations), and its head."""

    def __init__(self, stream: LayerStream, hidden: list[Tensor]):
        self.stream, self.hidden = stream, hidden
        self.starts = [0]
        for h in hidden:
            self.starts.append(self.starts[-1] + h.shape[0])

    def logp(self, start: int, stop: int, device: torch.device) -> Tensor:
        """Log-probabilities (stop - start, L - 1, V) of windows start..stop-1 at their predicted positions."""
        parts = [h[max(start, a) - a:min(stop, a + h.shape[0]) - a]
                 for h, a in zip(self.hidden, self.starts) if max(start, a) < min(stop, a + h.shape[0])]
        logits = self.stream.logits(torch.cat(parts).to(device))
        return torch.log_softmax(logits[:, :-1].float(), dim=-1)

    def save(self, path: Path) -> None:
        """The hidden states to a file (atomically), for ``load`` in another process."""

        save_safetensors(path, {f"hidden.{j}": h for j, h in enumerate(self.hidden)})

    @classmethod
    def load(cls, model: str | Path, path: Path, device: str = "auto") -> Reference:
        """``model``'s Reference from the hidden states ``save`` wrote: only its head is loaded."""

        stream = LayerStream(Checkpoint(model), pick_device(device))
        stream.load_head()
        tensors = load_file(str(path))
        return cls(stream, [tensors[f"hidden.{j}"] for j in range(len(tensors))])


@torch.no_grad()
def perplexity(model: str | Path, windows: Tensor, device: str = "auto", batch_size: int | None = None,
               progress=None, keep_reference: bool = False, reference: Reference | None = None,
               tf32: bool = False, dtype: str = "float32") -> dict:
    """Perplexity of ``model`` on token windows (N, L), streamed one decoder layer at a time
    (``batch_size`` None: ``stream.default_batch_size``), with each window's mean NLL (``window_nll``) and each
    layer's seconds (``layer_timings``: waiting for its read, loading it, running it; the first layers' reads
    also allocate the page-locked memory the later ones reuse).

    ``keep_reference``: also return ``reference``, this model's ``Reference`` on these windows.
    ``reference``: another model's, made with the same windows; returns ``window_kl``,
    each window's mean KL(reference || this model) over its predicted positions, and
    ``top1_agreement``, the share of positions where both put the same token first.
    ``tf32``: on CUDA, the forward passes' and the head's fp32 matrix products run as TF32 (log-softmax,
    losses and KL stay fp32). ``dtype``: the forward passes' (a DTYPES key: the weights and the activations
    between layers are held in it; the logits are made float32)."""
    t0 = time.perf_counter()
    dev = pick_device(device)
    if dtype not in DTYPES:
        raise QuantMoeError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}; choose one of them")
    with tf32_matmuls(tf32 and dev.type == "cuda"):
        return _perplexity(model, windows, dev, batch_size, progress, keep_reference, reference, t0, DTYPES[dtype])


def _perplexity(model: str | Path, windows: Tensor, dev: torch.device, batch_size: int | None, progress,
                keep_reference: bool, reference: Reference | None, t0: float, dtype: torch.dtype) -> dict:
    if batch_size:  # 0 or None: the default
        check_count("--batch-size", batch_size)
    stream = LayerStream(Checkpoint(model), dev, dtype)
    batch_size = batch_size or default_batch_size(stream.config, windows.shape[1])
    clock = Stopwatch(dev, peaks=False)  # the peak is evaluate()'s stage's
    batches = stream.embed(windows, batch_size)
    layer_timings: list[dict] = []
    batches = run_layers(stream, batches, clock, progress, layer_timings)
    with clock("head"):
        stream.load_head()
    nll, count = 0.0, 0
    window_nll: list[float] = []
    window_kl: list[float] = []
    same_top1 = 0
    for start, b in zip(range(0, windows.shape[0], batch_size), batches):
        ids = windows[start:start + batch_size].to(dev)
        logits = stream.logits(b.hidden)
        flat_logits, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        nll += float(torch.nn.functional.cross_entropy(flat_logits, targets, reduction="sum"))
        count += targets.numel()
        loss = torch.nn.functional.cross_entropy(flat_logits, targets, reduction="none")
        window_nll += loss.reshape(ids.shape[0], -1).double().mean(1).tolist()
        del flat_logits, loss
        if reference is not None:
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            logp0 = reference.logp(start, start + ids.shape[0], dev)
            window_kl += (logp0.exp() * (logp0 - logp)).sum(-1).double().mean(1).tolist()
            same_top1 += int((logp.argmax(-1) == logp0.argmax(-1)).sum())
            del logp, logp0
        del logits
    mean = nll / count
    if not math.isfinite(mean):
        raise QuantMoeError(f"{model} produced non-finite log-likelihoods; run quantmoe verify on it")
    out = {"perplexity": math.exp(mean), "mean_nll": mean, "tokens_scored": count,
           "seconds": round(time.perf_counter() - t0, 3), "timings": clock.rounded(),
           "layer_timings": layer_timings, "device": str(dev),
           "window_nll": window_nll}
    if keep_reference:
        out["reference"] = Reference(stream, [b.hidden.cpu() for b in batches])
    if reference is not None:
        out["window_kl"] = window_kl
        out["top1_agreement"] = same_top1 / count
    return out


def run_layers(stream: LayerStream, batches: list[Batch], clock: Stopwatch, progress=None,
               per_layer: list[dict] | None = None) -> list[Batch]:
    """Every decoder layer of ``stream`` over ``batches``, each output written over its input. Each layer is
    read as stored (``LayerStream.read_ahead_state``: converted and dequantized on the device as it loads) in
    a background thread while the layer before it runs, when host memory has room for it. ``clock`` times
    ``read`` (waiting for a layer's tensors), ``load`` and ``layers`` (the forward passes); ``per_layer`` (a list)
    receives each layer's own seconds of them, in order."""
    n = stream.num_layers
    with ThreadPoolExecutor(1, thread_name_prefix="quantmoe-read") as reader:
        pending = reader.submit(stream.read_ahead_state, 0)
        for i in range(n):
            before = dict(clock.seconds)
            with clock("read"):
                state = pending.result() if pending is not None else stream.read_ahead_state(i)
            with clock("load"):
                layer = stream.load_layer(i, state)
                del state  # its page-locked blocks go back to PyTorch's cache for the next read to reuse
            pending = None
            if i + 1 < n and stream.layer_bytes(i + 1) + READ_WINDOW <= psutil.virtual_memory().available:
                pending = reader.submit(stream.read_ahead_state, i + 1)
            with clock("layers"):
                batches = stream.run_layer(layer, batches, in_place=True)
            stream.release_layer(i)
            if per_layer is not None:
                per_layer.append({k: round(clock.seconds[k] - before.get(k, 0.0), 3) for k in ("read", "load", "layers")})
            if progress is not None:
                progress.update(1)
    return batches


def gap(original: float, quantized: float, original_windows: list[float] | None = None,
        quantized_windows: list[float] | None = None) -> dict:
    """The perplexity gap; given both models' mean NLL per window (``perplexity``'s ``window_nll``, the
    same windows), also its standard error over windows (``relative_se``, see ``paired_se``)."""
    out = {"absolute": quantized - original, "relative": (quantized - original) / original}
    if original_windows is not None and quantized_windows is not None and len(original_windows) > 1:
        out["relative_se"] = (quantized / original) * paired_se(quantized_windows, original_windows)
    return out


def standard_error(values: list[float]) -> float:
    """Standard error of the mean of per-window ``values``, the windows taken as independent: how far
    the mean would move with another sample of evaluation windows of the same text. It does not
    cover another calibration draw."""
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.std() / math.sqrt(v.numel()))


def paired_se(a: list[float], b: list[float]) -> float:
    """Standard error of mean(a - b) over the same windows (a gap: a difference of mean NLLs, the log of
    a perplexity ratio)."""
    return standard_error([x - y for x, y in zip(a, b)])


def kl_summary(result: dict) -> dict:
    """The KL part of a report from ``perplexity(..., reference=...)``'s result (whose per-window
    values it takes out)."""
    window_kl = result.pop("window_kl")
    return {"mean": sum(window_kl) / len(window_kl),
            "se": standard_error(window_kl) if len(window_kl) > 1 else None,
            "top1_agreement": result.pop("top1_agreement"),
            "definition": "mean over predicted positions of KL(original || quantized), in nats, over the whole "
                          "vocabulary; se: its standard error over windows; top1_agreement: the share of "
                          "positions where both models put the same token first"}


def evaluate(model: str | Path | None = None, baseline: str | Path | None = None, data: str | Path | None = None,
             seqlen: int | None = None, device: str = "auto", batch_size: int | None = None, quiet: bool = False,
             backend: str | None = None, record_paths: bool = False, tf32: bool = False,
             dtype: str = "float32", source: str | None = None) -> dict:
    """Perplexity of ``model`` (and of ``baseline``, with the gap) under the stated protocol.
    ``tf32``: TF32 matrix products on CUDA; ``dtype``: the forward passes' (``perplexity``); both stated in
    the protocol's dtype.

    The checkpoint's backend is read from its config.json; ``backend`` (a name from
    ``quantmoe.backends``) makes it an error for ``model`` to be anything else.
    ``source``: the identity (``Checkpoint.identity``) of the model ``model`` was quantized from (default: what
    its manifest records); with a ``baseline``, the report says whether that is the baseline (``baseline_is_source``)
    and a note says where it is not.
    Returns the report dict (see report.render_markdown for its Markdown form). The report names
    the models and the data by Hub id or folder/file name (``published_name``: reports get
    published), or by their local paths with ``record_paths``.
    """


    model = Path(model) if model is not None else DEFAULT_MODEL
    data = data if data is not None else EVAL_DATA
    ckpt = Checkpoint(model)
    if backend is not None:
        check_backend(ckpt, backend)
    seqlen = seqlen or default_seqlen(ckpt.config)
    tokenizer = ckpt.tokenizer()
    windows, meta = eval_windows(tokenizer, data, seqlen)
    beyond = beyond_context(ckpt.config, seqlen)
    if beyond is not None:
        note(beyond)
    is_source = None  # whether the baseline is the model ``model`` was quantized from (None: not known)
    if baseline is not None:
        base = Checkpoint(baseline)
        if tokenizer_fingerprint(base.tokenizer()) != meta["tokenizer_fingerprint"]:
            raise QuantMoeError(f"{model} and the baseline {baseline} use different tokenizers; "
                                "compare a quantized model with its own original")
        source = source or made_from(ckpt.path)
        is_source = None if source is None else source == base.identity
        if is_source is False:
            note(f"the baseline {baseline} is not the model {model} was quantized from (its manifest records another "
                 "config, or other shards or weights): the gap and KL compare two different models; pass that "
                 "original as --baseline to measure the quantization")
    stages: dict = {}
    results: dict = {}
    runs = ([("original", baseline)] if baseline is not None else []) + [("quantized" if baseline else "model", model)]
    reference = None  # the original's, for the quantized model's KL to it
    for label, path in runs:
        n = Checkpoint(path).config.num_hidden_layers
        with tqdm(total=n, desc=f"eval {label}", unit="layer", disable=quiet, leave=False) as bar, \
                stage(stages, f"eval_{label}"):
            results[label] = perplexity(path, windows, device, batch_size, progress=bar,
                                        keep_reference=label == "original", reference=reference, tf32=tf32,
                                        dtype=dtype)
        reference = results[label].pop("reference", None)
    del reference
    per_window = {label: r.pop("window_nll") for label, r in results.items()}
    shown = str if record_paths else published_name
    report = {
        "model": shown(model),
        "baseline": shown(baseline) if baseline is not None else None,
        **({} if is_source is None else {"baseline_is_source": is_source}),
        "protocol": Protocol(data=shown(data), seqlen=seqlen,
                             dtype=protocol_dtype(dtype, tf32, results[runs[-1][0]]["device"])).to_dict(),
        "data": {**meta, "path": shown(meta["path"])},
        "device": results[runs[-1][0]]["device"],
        "results": results,
        "stages": stages,
    }
    if baseline is not None:
        report["gap"] = gap(results["original"]["perplexity"], results["quantized"]["perplexity"],
                            per_window["original"], per_window["quantized"])
        report["kl"] = kl_summary(results["quantized"])
        report["original_size_bytes"] = checkpoint_stats(baseline)["size_bytes"]
    if ckpt.format is not None:
        report["quantization"] = {**checkpoint_stats(model), **ckpt.format.describe(ckpt.quantization)}
    return report


def check_backend(ckpt: Checkpoint, backend: str) -> None:
    """Fail unless ``ckpt`` was written by ``backend`` (what ``quantmoe eval --backend`` asserts)."""
    known = [r.name for r in READERS]
    if backend not in known:
        raise QuantMoeError(f"unknown backend {backend!r}; choose one of {', '.join(known)}")
    if ckpt.format is None:
        raise QuantMoeError(f"{ckpt.path} is not quantized; make it with `quantmoe quantize --backend {backend}` "
                            "or drop --backend")
    made_by = ckpt.format.describe(ckpt.quantization)["backend"]  # a compressed-tensors export: gptq or rtn
    if made_by != backend:
        raise QuantMoeError(f"{ckpt.path} was quantized with {made_by}, not {backend}; "
                            f"pass --backend {made_by} or drop --backend")
