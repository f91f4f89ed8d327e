"""Frozen option records passed into every stage; nothing reads globals or the environment."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import QuantMoeError

RARE_EXPERT_POLICIES = ("blend", "all-tokens", "rtn")
# Tensor naming of the export: "source" keeps the checkpoint's own names (vLLM reads these);
# "gptqmodel" uses GPTQModel's (in-memory module paths, experts as E.gate_proj/up_proj/down_proj).
LAYOUTS = ("source", "gptqmodel")
# Backends that quantize_layer knows; anything else would silently run GPTQ, so it is refused here.
# QuantConfig drives the GPTQ pipeline only; other backends (quantmoe.backends, e.g. bnb-nf4)
# bring their own frozen config.
BACKENDS = ("gptq", "rtn")


@dataclass(frozen=True)
class QuantConfig:
    """How weights are quantized. Defaults are quantmoe's recommended int4 recipe."""

    backend: str = "gptq"          # "gptq" or "rtn" (round-to-nearest baseline)
    bits: int = 4                  # 4 or 8
    group_size: int = 128          # columns sharing one scale; -1 = one group per row
    sym: bool = True               # symmetric (zero fixed at 2**(bits-1)); Marlin needs this
    act_order: bool = True         # quantize columns by decreasing Hessian diagonal (static groups)
    damp: float = 0.01             # dampening, as a fraction of mean(diag(H)); raised on Cholesky failure
    block_size: int = 128          # GPTQ lazy-batch width
    true_sequential: bool = True   # inputs of later projections come from already-quantized ones
    rare_expert_tokens: int = 0    # below this many routed tokens an expert's Hessian is blended; 0 = auto (its input width)
    rare_expert: str = "blend"     # blend | all-tokens | rtn: the fallback for rare experts
    layout: str = "source"         # source | gptqmodel: tensor names of the export (see LAYOUTS)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise QuantMoeError(f"backend {self.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        if self.bits not in (4, 8):
            raise QuantMoeError(f"--bits {self.bits} is not supported by the {self.backend} backend; use 4 or 8")
        if self.group_size != -1 and self.group_size <= 0:
            raise QuantMoeError(f"--group-size {self.group_size} is invalid; use -1 or a positive size such as 128")
        if not 0 < self.damp < 1:
            raise QuantMoeError(f"--damp {self.damp} is out of range; use a value in (0, 1), e.g. 0.01")
        if self.layout not in LAYOUTS:
            raise QuantMoeError(f"--layout {self.layout!r} is unknown; use one of {', '.join(LAYOUTS)}")
        if self.rare_expert not in RARE_EXPERT_POLICIES:
            raise QuantMoeError(f"--rare-expert {self.rare_expert!r} is unknown; use one of {', '.join(RARE_EXPERT_POLICIES)}")

    def to_dict(self) -> dict:
        return asdict(self)
