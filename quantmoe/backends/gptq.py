"""The gptq and rtn backends: quantmoe's streamed GPTQ method (``quantmoe.stages.gptq_method``).

Both write GPTQ v1 checkpoints (``P.qweight``/``qzeros``/``scales``/``g_idx`` per linear);
rtn is the round-to-nearest baseline of the same format, without calibration Hessians.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base.errors import QuantMoeError
from ..base.options import QuantConfig, options_of
from ..stages.gptq_method import GptqMethod
from .base import Backend, unknown_settings


@dataclass(frozen=True)
class GptqBackend(Backend):
    name: str
    summary: str
    needs_calibration: bool = True
    resumable: bool = True  # finished layers are kept in the work folder (quantmoe.stages.resume)

    def settings(self) -> frozenset[str]:
        return frozenset(o.name for o in options_of(QuantConfig)) - {"backend"}

    def configure(self, **settings) -> QuantConfig:
        unknown_settings(self.name, settings, self.settings())
        return QuantConfig(backend=self.name, **settings)

    def method(self, config: QuantConfig) -> GptqMethod:
        if not isinstance(config, QuantConfig) or config.backend != self.name:
            raise QuantMoeError(f"the {self.name} backend was given settings for another backend ({config!r}); "
                                f"make them with backends.get({self.name!r}).configure(...)")
        return GptqMethod(config)


BACKENDS = (
    GptqBackend("gptq", "GPTQ (Hessian-corrected rounding, calibrated per expert); GPTQ v1 int4/int8 checkpoint"),
    GptqBackend("rtn", "round-to-nearest baseline in the same GPTQ v1 format (no Hessian)"),
)
