"""The gptq and rtn backends: quantmoe's streamed GPTQ pipeline (``quantmoe.pipeline``).

Both write GPTQ v1 checkpoints (``P.qweight``/``qzeros``/``scales``/``g_idx`` per linear);
rtn is the round-to-nearest baseline of the same format, without calibration Hessians.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from ..config import QuantConfig
from .base import Backend, Options, QuantizedLinear, unknown_settings

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class GptqBackend(Backend):
    name: str
    summary: str
    needs_calibration: bool = True
    resumable: bool = True  # finished layers are kept in the work folder (quantmoe.resume)

    def settings(self) -> frozenset[str]:
        return frozenset(f.name for f in fields(QuantConfig)) - {"backend"}

    def configure(self, **settings) -> QuantConfig:
        unknown_settings(self.name, settings, self.settings())
        return QuantConfig(backend=self.name, **settings)

    def quantize(self, model, out, options: Options) -> dict:
        from ..pipeline import quantize

        qcfg = options.config if options.config is not None else self.configure()
        return quantize(model, out, qcfg, calib=options.calib, nsamples=options.nsamples, seqlen=options.seqlen,
                        seed=options.seed, device=options.device, max_shard_size=options.max_shard_size,
                        overwrite=options.overwrite, run_eval=options.run_eval, eval_data=options.eval_data,
                        batch_size=options.batch_size, quiet=options.quiet, resume=options.resume, tf32=options.tf32,
                        prefetch=options.prefetch, block_kernel=options.block_kernel)

    def recognizes(self, quantization: dict) -> bool:
        return quantization.get("quant_method") == "gptq" and \
            (quantization.get("meta") or {}).get("backend", "gptq") == self.name

    def describe(self, quantization: dict) -> dict:
        q = quantization
        layout = (q.get("meta") or {}).get("layout", "source")
        return {"method": "gptq", "backend": self.name, "bits": q.get("bits"), "group_size": q.get("group_size"),
                "sym": q.get("sym"), "layout": layout,
                "label": f"{self.name} int{q.get('bits')} g{q.get('group_size')}"
                         + ("" if layout == "source" else f" ({layout} layout)")}

    def quantized_linears(self, ckpt) -> dict[str, QuantizedLinear]:
        from ..packing import GPTQ_SUFFIXES

        out = {}
        for name in ckpt.names():
            if name.endswith(".qweight"):
                module = name[: -len(".qweight")]
                inputs = ckpt.shape(f"{module}.g_idx")[0]
                outputs = ckpt.shape(f"{module}.scales")[1]
                out[module] = QuantizedLinear(module, (outputs, inputs), tuple(f"{module}.{s}" for s in GPTQ_SUFFIXES))
        return out

    def dequantize(self, ckpt, linear: QuantizedLinear) -> Tensor:
        from ..packing import GPTQ_SUFFIXES, dequantize_linear

        parts = {s: ckpt.tensor(f"{linear.module}.{s}") for s in GPTQ_SUFFIXES}
        return dequantize_linear(parts, int(ckpt.quantization["bits"]))


BACKENDS = (
    GptqBackend("gptq", "GPTQ (Hessian-corrected rounding, calibrated per expert); GPTQ v1 int4/int8 checkpoint"),
    GptqBackend("rtn", "round-to-nearest baseline in the same GPTQ v1 format (no Hessian)"),
)

