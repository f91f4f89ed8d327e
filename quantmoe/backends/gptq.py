"""The gptq and rtn backends: quantmoe's streamed GPTQ pipeline (``quantmoe.stages.quantize``).

Both write GPTQ v1 checkpoints (``P.qweight``/``qzeros``/``scales``/``g_idx`` per linear);
rtn is the round-to-nearest baseline of the same format, without calibration Hessians.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..base.options import QuantConfig
from ..stages.quantize import quantize
from .base import Backend, Options, unknown_settings


@dataclass(frozen=True)
class GptqBackend(Backend):
    name: str
    summary: str
    needs_calibration: bool = True
    resumable: bool = True  # finished layers are kept in the work folder (quantmoe.stages.resume)

    def settings(self) -> frozenset[str]:
        return frozenset(f.name for f in fields(QuantConfig) if f.init) - {"backend"}

    def configure(self, **settings) -> QuantConfig:
        unknown_settings(self.name, settings, self.settings())
        return QuantConfig(backend=self.name, **settings)

    def quantize(self, model, out, options: Options) -> dict:

        qcfg = options.config if options.config is not None else self.configure()
        return quantize(model, out, qcfg, calib=options.calib, nsamples=options.nsamples, seqlen=options.seqlen,
                        seed=options.seed, device=options.device, max_shard_size=options.max_shard_size,
                        overwrite=options.overwrite, run_eval=options.run_eval, eval_data=options.eval_data,
                        batch_size=options.batch_size, quiet=options.quiet, resume=options.resume, tf32=options.tf32,
                        prefetch=options.prefetch, block_kernel=options.block_kernel,
                        gpu_memory=options.gpu_memory, record_paths=options.record_paths,
                        host_memory=options.host_memory)


BACKENDS = (
    GptqBackend("gptq", "GPTQ (Hessian-corrected rounding, calibrated per expert); GPTQ v1 int4/int8 checkpoint"),
    GptqBackend("rtn", "round-to-nearest baseline in the same GPTQ v1 format (no Hessian)"),
)

