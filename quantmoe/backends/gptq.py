"""The gptq and rtn backends: quantmoe's streamed GPTQ pipeline (``quantmoe.stages.quantize``).

Both write GPTQ v1 checkpoints (``P.qweight``/``qzeros``/``scales``/``g_idx`` per linear);
rtn is the round-to-nearest baseline of the same format, without calibration Hessians.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..base.errors import QuantMoeError
from ..base.options import QuantConfig, RunOptions, options_of
from ..stages.quantize import quantize
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

    def quantize(self, model, out, options: RunOptions = RunOptions(), config: QuantConfig | None = None) -> dict:
        qcfg = config if config is not None else self.configure()
        if not isinstance(qcfg, QuantConfig) or qcfg.backend != self.name:
            raise QuantMoeError(f"the {self.name} backend was given settings for another backend ({qcfg!r}); "
                                f"make them with backends.get({self.name!r}).configure(...)")
        return quantize(model, out, qcfg, **asdict(options))


BACKENDS = (
    GptqBackend("gptq", "GPTQ (Hessian-corrected rounding, calibrated per expert); GPTQ v1 int4/int8 checkpoint"),
    GptqBackend("rtn", "round-to-nearest baseline in the same GPTQ v1 format (no Hessian)"),
)

