"""quantmoe: GPTQ and bitsandbytes quantization for Mixture-of-Experts checkpoints.

Pipeline: calibrate -> quantize (streamed, one decoder layer at a time) -> export
(GPTQ v1 shards) -> eval (perplexity gap). Each stage is a function here and a
``quantmoe`` CLI command. The functions are loaded on first use, so that ``import quantmoe``
(and the command line's start) does not import torch.
"""

from .base.errors import QuantMoeError
from .base.options import QuantConfig
from .base.version import __version__

_API = ("quantize", "calibrate", "evaluate", "load_quantized")


def __getattr__(name: str):
    if name in _API:
        from . import api  # the lazy start: api imports torch and transformers

        return getattr(api, name)
    raise AttributeError(f"module 'quantmoe' has no attribute {name!r}")


__all__ = ["QuantConfig", "QuantMoeError", *_API, "__version__"]
