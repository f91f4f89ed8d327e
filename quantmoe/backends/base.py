"""The backend interface: what every quantization method in quantmoe provides.

A backend configures itself from the run's options and says how a layer is quantized (its
``Method``); the one pipeline (``quantmoe.stages.quantize.run``) does the rest: input checks,
calibration, the work folder, the shards and the finish sequence. Reading a folder back
(which tensors store each quantized linear, how to dequantize one) belongs to its format in
``quantmoe.formats``; the streamed loader, evaluation and the measurements of a compare table
are generic and built on that (docs/backends.md: adding a backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..base.errors import QuantMoeError
from ..base.options import RunOptions
from ..stages.method import Method
from ..stages.quantize import run

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

    def method(self, config: Any) -> Method:
        """What this backend brings to the pipeline (stages.method.Method), quantizing with ``config``
        (its frozen settings, from ``configure``); settings of another backend are a QuantMoeError."""
        ...

    def quantize(self, model: str | Path | None, out: str | Path | None, options: RunOptions = RunOptions(),
                 config: Any = None) -> dict:
        """Quantize ``model`` into ``out`` with ``config`` (None: this backend's defaults), through the one
        pipeline (stages.quantize.run); returns a summary (out, report, stages, fallbacks, notes)."""
        return run(model, out, self.method(config if config is not None else self.configure()), options)


def unknown_settings(backend: str, settings: dict, accepted: set[str]) -> None:
    """Raise a one-line error naming the first option the backend does not take."""
    extra = sorted(set(settings) - accepted)
    if extra:
        flag = "--" + extra[0].replace("_", "-")
        raise QuantMoeError(f"{flag} does not apply to the {backend} backend; drop it "
                            f"(options of {backend}: {', '.join('--' + a.replace('_', '-') for a in sorted(accepted))})")
