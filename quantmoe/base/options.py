"""Frozen option records passed into every stage; nothing reads globals or the environment."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .errors import QuantMoeError
from .recipe import Rule, first_rule, load_recipe

RARE_EXPERT_POLICIES = ("blend", "all-tokens", "rtn")
# Tensor naming of the export: "source" keeps the checkpoint's own names (vLLM reads these);
# "gptqmodel" uses GPTQModel's (in-memory module paths, experts as E.gate_proj/up_proj/down_proj).
LAYOUTS = ("source", "gptqmodel")
# Backends that quantize_layer knows; anything else would silently run GPTQ, so it is refused here.
# QuantConfig drives the GPTQ pipeline only; other backends (quantmoe.backends, e.g. bnb-nf4)
# bring their own frozen config.
BACKENDS = ("gptq", "rtn")
# Every backend of quantmoe.backends, by name, for the command line's choices (tests/test_bnb.py checks the
# registry against it), so that the command line lists them without importing the backends.
BACKEND_NAMES = ("bnb-nf4", "bnb-fp4", "bnb-int8", "gptq", "rtn")
# Column orders of GPTQ (gptq.column_order); True/False are read as "static"/"none".
ACT_ORDERS = ("static", "group", "none")
# Which tokens make a routed expert's Hessians: the tokens its router sends it ("routed"), the
# same weighted by the router's score for it ("weighted": the expert's output is scaled by it),
# or every token entering the MoE block ("all").
EXPERT_HESSIANS = ("routed", "weighted", "all")
# How the clipping search weighs a column's rounding error (gptq.ClipSearch.weight).
CLIP_WEIGHTS = ("residual", "hessian")
# How GPTQ's column loop runs (pipeline.block_function); not part of the recipe: every one gives the same bits.
BLOCK_KERNELS = ("auto", "triton", "cuda-graphs", "eager")
# Which linears GPTQ fits to the original model's outputs rather than to their own weights
# (gptq.fitted_weights): "mlp" = every down_proj, from the outputs of its quantized gate/up;
# "layer" = also o_proj and the MLPs' gate/up, from the layer's inputs through its quantized parts
# to what its original parts give on the same inputs (measured worse than "mlp" on the demo models);
# "stream" = every linear, from the inputs the quantized model gives it to the outputs the
# original model gives (a second, full-precision stream of activations runs beside the first).
FITS = ("none", "mlp", "layer", "stream")
# What the export does with layers stored beyond num_hidden_layers (DeepSeek-V3's and GLM-4.5's
# multi-token-prediction layer): copy them unquantized, FP8 ones as BF16, declared so that loaders
# leave them unquantized ("keep"), or leave them out ("drop"). See docs/architectures.md.
MTP_CHOICES = ("keep", "drop")
# On-disk format of the gptq/rtn export: GPTQ v1 (formats.gptq_v1) or compressed-tensors pack-quantized
# (formats.compressed_tensors: vLLM's native WNA16 path, what llm-compressor writes). Same levels and scales.
FORMATS = ("gptq", "compressed-tensors")


@dataclass(frozen=True)
class QuantConfig:
    """How weights are quantized. Defaults are quantmoe's recommended int4 recipe."""

    backend: str = "gptq"          # "gptq" or "rtn" (round-to-nearest baseline)
    bits: int = 4                  # 4 or 8
    group_size: int = 128          # columns sharing one scale; -1 = one group per row
    sym: bool = True               # symmetric (zero fixed at 2**(bits-1)); Marlin needs this
    act_order: str = "static"      # static | group | none: GPTQ's column order (see ACT_ORDERS)
    damp: float = 0.01             # dampening, as a fraction of mean(diag(H)); raised on Cholesky failure
    block_size: int = 128          # GPTQ lazy-batch width
    true_sequential: bool = True   # inputs of later projections come from already-quantized ones
    rare_expert_tokens: int = 0    # below this many routed tokens an expert's Hessian is blended; 0 = auto (its input width)
    rare_expert: str = "blend"     # blend | all-tokens | rtn: the fallback for rare experts
    layout: str = "source"         # source | gptqmodel: tensor names of the export (see LAYOUTS)
    clip_steps: int = 20           # clipping ratios tried per grid (0 = plain min/max)
    clip_min: float = 0.6          # smallest clipping ratio tried
    clip_max: float = 1.0          # largest clipping ratio tried
    clip_weight: str = "residual"  # residual | hessian: how each column's rounding error counts (gptq.ClipSearch)
    refine: int = 0                # coordinate-descent passes over GPTQ's levels (gptq.refine_levels)
    expert_hessian: str = "weighted"  # routed | weighted | all (see EXPERT_HESSIANS)
    fit: str = "stream"            # none | mlp | layer | stream (see FITS)
    mtp: str = "keep"              # keep | drop: layers beyond num_hidden_layers in BF16, or left out (see MTP_CHOICES)
    format: str = "gptq"           # gptq | compressed-tensors: the export's on-disk format (see FORMATS)
    recipe: str = ""               # per-module precision: a TOML file or a preset (base.recipe); "" = none
    # The recipe's rules, read once from ``recipe`` (so the work folder's fingerprint covers a file's content).
    rules: tuple[Rule, ...] = field(default=(), init=False)

    def __post_init__(self):
        if isinstance(self.act_order, bool):  # the boolean form of earlier versions
            object.__setattr__(self, "act_order", "static" if self.act_order else "none")
        if self.act_order not in ACT_ORDERS:
            raise QuantMoeError(f"--act-order {self.act_order!r} is unknown; use one of {', '.join(ACT_ORDERS)}")
        if self.expert_hessian not in EXPERT_HESSIANS:
            raise QuantMoeError(f"--expert-hessian {self.expert_hessian!r} is unknown; "
                                f"use one of {', '.join(EXPERT_HESSIANS)}")
        if self.clip_weight not in CLIP_WEIGHTS:
            raise QuantMoeError(f"--clip-weight {self.clip_weight!r} is unknown; use one of {', '.join(CLIP_WEIGHTS)}")
        if self.fit not in FITS:
            raise QuantMoeError(f"--fit {self.fit!r} is unknown; use one of {', '.join(FITS)}")
        if self.mtp not in MTP_CHOICES:
            raise QuantMoeError(f"--mtp {self.mtp!r} is unknown; use one of {', '.join(MTP_CHOICES)}")
        if self.refine < 0:
            raise QuantMoeError(f"--refine {self.refine} is invalid; use 0 (off) or a number of passes such as 2")
        if self.clip_steps < 0 or not 0 < self.clip_min <= self.clip_max:
            raise QuantMoeError(f"--clip-steps {self.clip_steps} / --clip-min {self.clip_min} / --clip-max "
                                f"{self.clip_max} are invalid; use steps >= 0 and 0 < min <= max, e.g. 20, 0.6, 1.0")
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
        if self.format not in FORMATS:
            raise QuantMoeError(f"--format {self.format!r} is unknown; use one of {', '.join(FORMATS)}")
        if self.format == "compressed-tensors" and self.layout != "source":
            raise QuantMoeError("--format compressed-tensors keeps the checkpoint's own tensor names (what vLLM reads); "
                                "drop --layout gptqmodel, or use --format gptq with it")
        object.__setattr__(self, "rules", load_recipe(self.recipe))
        if self.rules and self.layout != "source":
            raise QuantMoeError("--recipe matches the checkpoint's own module names; drop --layout gptqmodel, "
                                "or drop --recipe")
        if self.rare_expert not in RARE_EXPERT_POLICIES:
            raise QuantMoeError(f"--rare-expert {self.rare_expert!r} is unknown; use one of {', '.join(RARE_EXPERT_POLICIES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def module_config(self, name: str, kind: str) -> QuantConfig | None:
        """The settings of one module (``name``: its source path; ``kind``: attention, expert,
        shared_expert or dense_mlp) under the recipe: these settings where no rule names it, None where
        the first rule that does skips it (16 bits), else these with that rule's bits/group_size/sym
        (and no recipe: the result is for that module alone)."""
        rule = first_rule(self.rules, name, kind)
        if rule is None:
            return self
        if rule.skip:
            return None
        return replace(self, recipe="", bits=self.bits if rule.bits is None else rule.bits,
                       group_size=self.group_size if rule.group_size is None else rule.group_size,
                       sym=self.sym if rule.sym is None else rule.sym)
