"""The backend interface: what every quantization method in quantmoe provides.

A backend configures itself from the run's options and turns a source checkpoint folder into
a quantized checkpoint folder. Reading a folder back (which tensors store each quantized linear,
how to dequantize one) belongs to its format in ``quantmoe.formats``; the streamed loader,
evaluation and the measurements of a compare table are generic and built on that, so adding a
backend is one file in this package (see ``quantmoe/backends/__init__.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..base.errors import QuantMoeError


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
    gpu_memory: str | int | None = None   # device memory the run may use ("40GB"); default: what is free
    host_memory: str | int | None = None  # host memory the run may hold ("32GB"); default: what is available
    record_paths: bool = False            # published files name sources by local path, not by Hub id/folder name


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


def unknown_settings(backend: str, settings: dict, accepted: set[str]) -> None:
    """Raise a one-line error naming the first option the backend does not take."""
    extra = sorted(set(settings) - accepted)
    if extra:
        flag = "--" + extra[0].replace("_", "-")
        raise QuantMoeError(f"{flag} does not apply to the {backend} backend; drop it "
                            f"(options of {backend}: {', '.join('--' + a.replace('_', '-') for a in sorted(accepted))})")
