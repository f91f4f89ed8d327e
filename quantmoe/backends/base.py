"""The backend interface: what every quantization method in quantmoe provides.

A backend turns a source checkpoint folder into a quantized checkpoint folder, and
knows how to read its own folders back: which tensors store each quantized linear and
how to dequantize one. Everything else (the streamed loader, evaluation, the
measurements in a compare table) is generic and built on those two methods, so adding
a backend is one file in this package (see ``quantmoe/backends/__init__.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import QuantMoeError

if TYPE_CHECKING:
    import torch
    from torch import Tensor


@dataclass(frozen=True)
class Options:
    """How one quantize run goes; the same for every backend.

    ``config`` is the backend's own frozen settings (``QuantConfig`` for gptq/rtn,
    ``BnbConfig`` for bnb-*), made by ``backend.configure(...)``; None means its defaults.
    """

    config: Any = None
    calib: str | Path | None = None       # calibration data (backends that need none ignore it)
    nsamples: int | None = None           # calibration sequences [default: 128]
    seqlen: int | None = None             # calibration sequence length [default: min(2048, context)]
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda
    max_shard_size: str | int = "2GB"
    overwrite: bool = False
    resume: bool = True                   # reuse the finished layers a stopped run left (backends that can)
    run_eval: bool = True                 # measure the perplexity gap after export
    eval_data: str | Path | None = None   # held-out text [default: the bundled held-out text]
    batch_size: int | None = None         # sequences per forward pass [default: stream.default_batch_size]
    quiet: bool = False
    # The GPTQ pipeline's speed knobs (gptq/rtn; other backends have no use for them).
    tf32: bool = False                    # TF32 matrix products on CUDA
    prefetch: bool = True                 # read the next layer in a background thread
    block_kernel: str = "auto"            # how GPTQ's column loop runs (pipeline.BLOCK_KERNELS)


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized linear as stored in a checkpoint."""

    module: str                 # full on-disk module path, e.g. model.layers.0.block_sparse_moe.experts.3.w1
    shape: tuple[int, int]      # the weight it stands for: (out_features, in_features)
    tensors: tuple[str, ...]    # every tensor name that stores it (packed weight, scales, ...)


class Backend(Protocol):
    """One quantization method. Implementations subclass this to inherit ``load`` and ``stats``."""

    name: str                   # what follows --backend, e.g. "bnb-nf4"
    summary: str                # one line for --help and the docs
    needs_calibration: bool     # False: --calib/--nsamples/--seqlen do not apply
    resumable: bool             # True: a stopped quantize continues from the work folder it left

    def settings(self) -> frozenset[str]:
        """The keyword options ``configure`` takes (field names of its frozen settings)."""
        ...

    def configure(self, **settings) -> Any:
        """The backend's frozen settings from keyword options; a setting it does not take is a QuantMoeError."""
        ...

    def quantize(self, model: str | Path | None, out: str | Path | None, options: Options) -> dict:
        """Quantize ``model`` into ``out``; returns a summary (out, report, stages, fallbacks, notes)."""
        ...

    def recognizes(self, quantization: dict) -> bool:
        """True when a checkpoint's ``quantization_config`` was written by this backend."""
        ...

    def describe(self, quantization: dict) -> dict:
        """Method, label and settings of a checkpoint of this backend, for reports."""
        ...

    def quantized_linears(self, ckpt) -> dict[str, QuantizedLinear]:
        """Every quantized linear of a checkpoint written by this backend, keyed by module path."""
        ...

    def dequantize(self, ckpt, linear: QuantizedLinear) -> Tensor:
        """The weight (out, in) that ``linear`` stands for, in the dtype its quantization restores."""
        ...

    def load(self, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
        """A plain transformers model computing what the checkpoint stands for (weights dequantized; float32 by default)."""
        import torch

        from ..api import load_quantized

        return load_quantized(path, device, dtype or torch.float32)

    def stats(self, path: str | Path) -> dict:
        """Bits per weight, size and fractions quantized, measured from the saved tensors."""
        from ..export import checkpoint_stats

        return checkpoint_stats(Path(path))


def unknown_settings(backend: str, settings: dict, accepted: set[str]) -> None:
    """Raise a one-line error naming the first option the backend does not take."""
    extra = sorted(set(settings) - accepted)
    if extra:
        flag = "--" + extra[0].replace("_", "-")
        raise QuantMoeError(f"{flag} does not apply to the {backend} backend; drop it "
                            f"(options of {backend}: {', '.join('--' + a.replace('_', '-') for a in sorted(accepted))})")
