"""quantmoe: GPTQ and bitsandbytes quantization for Mixture-of-Experts checkpoints.

Pipeline: calibrate -> quantize (streamed, one decoder layer at a time) -> export
(GPTQ v1 shards) -> eval (perplexity gap). Each stage is a function here and a
``quantmoe`` CLI command.
"""

__version__ = "0.1.0"

from .config import QuantConfig  # noqa: E402
from .errors import QuantMoeError  # noqa: E402


def quantize(*args, **kwargs):
    from .pipeline import quantize as _quantize

    return _quantize(*args, **kwargs)


def calibrate(*args, **kwargs):
    from .api import calibrate as _calibrate

    return _calibrate(*args, **kwargs)


def evaluate(*args, **kwargs):
    from .evaluation import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def load_quantized(*args, **kwargs):
    from .api import load_quantized as _load

    return _load(*args, **kwargs)


__all__ = ["QuantConfig", "QuantMoeError", "quantize", "calibrate", "evaluate", "load_quantized", "__version__"]
