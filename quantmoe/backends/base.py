"""The backend interface: what every quantization method in quantmoe provides.

A backend configures itself from the run's options and turns a source checkpoint folder into
a quantized checkpoint folder. Reading a folder back (which tensors store each quantized linear,
how to dequantize one) belongs to its format in ``quantmoe.formats``; the streamed loader,
evaluation and the measurements of a compare table are generic and built on that, so adding a
backend is one file in this package (see ``quantmoe/backends/__init__.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..base.errors import QuantMoeError
from ..base.options import RunOptions


# The name of RunOptions before the options were declared in one place (base/options.py).
Options = RunOptions


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

    def quantize(self, model: str | Path | None, out: str | Path | None, options: RunOptions = RunOptions(),
                 config: Any = None) -> dict:
        """Quantize ``model`` into ``out`` with ``config`` (the backend's frozen settings, made by
        ``configure``; None: its defaults); returns a summary (out, report, stages, fallbacks, notes)."""
        ...


def unknown_settings(backend: str, settings: dict, accepted: set[str]) -> None:
    """Raise a one-line error naming the first option the backend does not take."""
    extra = sorted(set(settings) - accepted)
    if extra:
        flag = "--" + extra[0].replace("_", "-")
        raise QuantMoeError(f"{flag} does not apply to the {backend} backend; drop it "
                            f"(options of {backend}: {', '.join('--' + a.replace('_', '-') for a in sorted(accepted))})")
