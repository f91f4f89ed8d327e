"""The options of a quantize run, declared once: ``QuantConfig`` (the gptq/rtn recipe), ``BnbConfig``
(the bitsandbytes recipe) and ``RunOptions`` (how one run goes, the same for every backend).

They are frozen records passed into every stage; nothing reads globals or the environment. Each
field carries its command-line description in its metadata (``option``: help text, flag spelling,
choices), and everything else is derived from these fields: the options of ``quantmoe quantize``
(cli.py), the keys of a batch jobs file and their types (``job_keys``, which ``quantmoe batch
--help`` lists), and the keyword options of ``stages.quantize.quantize`` (``run_options``).
tests/test_options.py checks that these are the same sets, so a new field cannot be forgotten.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any

from .errors import QuantMoeError
from .recipe import Rule, first_rule, load_recipe

RARE_EXPERT_POLICIES = ("blend", "all-tokens", "rtn")
# Tensor naming of the export: "source" keeps the checkpoint's own names (vLLM reads these);
# "gptqmodel" uses GPTQModel's (in-memory module paths, experts as E.gate_proj/up_proj/down_proj).
LAYOUTS = ("source", "gptqmodel")
# Backends that QuantConfig drives; anything else would silently run GPTQ, so it is refused here.
# Other backends bring their own frozen config (BnbConfig for bnb-*).
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
# How GPTQ's column loop runs (quantize.block_function); not part of the recipe: every one gives the same bits.
BLOCK_KERNELS = ("auto", "triton", "cuda-graphs", "eager")
HESSIAN_DTYPES = ("float32", "bfloat16")  # the inputs of the statistics' products (gptq.core.bf16_statistics)
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
DEVICES = ("auto", "cpu", "cuda")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
DOUBLE_QUANT = ("auto", "on", "off")
BNB_QUANT_TYPES = ("nf4", "fp4", "int8")


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
           cli: bool = True, job: bool = True, calibration: bool = False):
    """A dataclass field with its command-line description.

    ``help``: the ``--help`` text. ``flag``: how the command line spells it [default: ``--field-name``,
    ``--field-name/--no-field-name`` for a bool; one name alone makes a bool an on-switch].
    ``choices``: the values it takes (checked on construction). ``cli=False``: not an option of
    ``quantmoe quantize`` (set from Python or a jobs file); ``job=False``: not a key of a batch jobs
    file. ``calibration``: backends without calibration ignore it (with a note).
    """
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "cli": cli,
                                            "job": job, "calibration": calibration})


@dataclass(frozen=True)
class Option:
    """One field of an options record, as the command line and the jobs file see it."""

    name: str                       # the field (and keyword) name: run_eval
    default: Any
    types: tuple[type, ...]         # what a value may be, None left out: (str,), (int, float), (str, int) ...
    flag: str                       # --eval/--no-eval
    help: str
    choices: tuple[str, ...] | None
    cli: bool                       # an option of quantmoe quantize
    job: bool                       # a key of a batch jobs file
    calibration: bool               # ignored by backends without calibration

    @property
    def switch(self) -> bool:
        """A bool: a --x/--no-x pair, or one on-switch (--overwrite)."""
        return self.types == (bool,)

    @property
    def key(self) -> str:
        """Its name in a jobs file: the flag's first spelling (``eval`` for run_eval), hyphens as underscores."""
        return self.flag.split("/")[0].lstrip("-").replace("-", "_")


def _types(annotation) -> tuple[type, ...]:
    """``int | None`` -> (int,); ``str | Path | None`` -> (str,) (a path is written as text); float -> (int, float)."""
    out: list[type] = []
    for t in typing.get_args(annotation) or (annotation,):
        t = {Path: str, type(None): None}.get(t, t)
        if t is float:
            out += [int, float]
        elif t is not None:
            out.append(t)
    return tuple(dict.fromkeys(out))


@cache
def options_of(record: type) -> tuple[Option, ...]:
    """The fields of an options record (QuantConfig, BnbConfig, RunOptions), in declaration order."""
    hints = typing.get_type_hints(record)
    out = []
    for f in fields(record):
        m = f.metadata
        if "help" not in m:  # derived from other fields (QuantConfig.rules), not an option
            continue
        types = _types(hints[f.name])
        dashed = "--" + f.name.replace("_", "-")
        flag = m["flag"] or (f"{dashed}/--no-{dashed[2:]}" if types == (bool,) else dashed)
        out.append(Option(f.name, None if f.default is MISSING else f.default, types, flag, m["help"], m["choices"],
                          m["cli"], m["job"], m["calibration"]))
    return tuple(out)


def _check_choices(record) -> None:
    for o in options_of(type(record)):
        value = getattr(record, o.name)
        if o.choices is not None and value not in o.choices:
            raise QuantMoeError(f"{o.flag.split('/')[0]} {value} is unknown; use one of {', '.join(o.choices)}")


@dataclass(frozen=True)
class QuantConfig:
    """How weights are quantized by the gptq and rtn backends. Defaults are quantmoe's recommended int4 recipe."""

    backend: str = option("gptq", "gptq, or rtn (the round-to-nearest baseline)",
                          cli=False, job=False)  # --backend (a job's backend) picks it
    bits: int = option(4, "4 or 8.")
    group_size: int = option(128, "Columns sharing one scale: -1 (one group per row), 32, 64 or 128.")
    sym: bool = option(True, "Symmetric (zero fixed at 2**(bits-1); Marlin needs it) or asymmetric.",
                       flag="--sym/--asym")
    act_order: str | bool = option("static", "GPTQ's column order: by Hessian diagonal with static groups, "
                                   "group-aware, or natural.", choices=ACT_ORDERS)  # a bool: earlier versions' form
    damp: float = option(0.01, "Dampening, as a fraction of mean(diag H); raised on Cholesky failure.")
    block_size: int = option(128, "GPTQ's lazy-batch width (columns updated together).", cli=False)
    true_sequential: bool = option(True, "Inputs of later projections come from the already-quantized ones.")
    rare_expert_tokens: int = option(0, "Routed tokens below which the rare-expert fallback applies; "
                                     "0 = the expert's widest input size.")
    rare_expert: str = option("blend", "Hessian fallback for experts that see few calibration tokens.",
                              choices=RARE_EXPERT_POLICIES)
    layout: str = option("source", "Tensor names: the checkpoint's own (vLLM) or GPTQModel's (see docs/interop.md).",
                         choices=LAYOUTS)
    clip_steps: int = option(20, "Clipping ratios tried per group grid, keeping the one with the least "
                             "Hessian-weighted error; 0 = plain min/max.")
    clip_min: float = option(0.6, "Smallest clipping ratio tried.")
    clip_max: float = option(1.0, "Largest clipping ratio tried.")
    clip_weight: str = option("residual", "A column's error weight in the clipping search: what GPTQ cannot "
                              "spread of it, or the Hessian diagonal (gptq.ClipSearch).", choices=CLIP_WEIGHTS)
    refine: int = option(0, "Coordinate-descent passes over GPTQ's levels, each lowering the same error GPTQ "
                         "minimises (gptq.refine_levels); 0 = off.")
    expert_hessian: str = option("weighted", "Tokens of a routed expert's Hessian: those routed to it, the same "
                                 "weighted by router score, or all.", choices=EXPERT_HESSIANS)
    fit: str = option("stream", "Fit linears to the original model's outputs: every linear from the quantized "
                      "model's inputs (stream: a full-precision stream runs beside, slower than none, with a copy of "
                      "the layer and twice the activations in memory); down_proj only, from the quantized gate/up "
                      "(mlp); also o_proj and gate/up on the layer's own inputs (layer); plain GPTQ (none: the least "
                      "memory).", choices=FITS)
    format: str = option("gptq", "gptq/rtn: on-disk format, GPTQ v1 or compressed-tensors pack-quantized (vLLM's native "
                         "WNA16 path); the same levels and scales (see docs/interop.md).", choices=FORMATS)
    recipe: str = option("", "gptq/rtn: per-module precision (FILE|experts-only|attention-int8): a TOML file of [[rules]] "
                         "(match = a source module name or re:regex; bits, group_size, sym or skip = true; the first "
                         "match wins) or a preset: experts-only (attention, shared experts, dense MLPs in 16 bits), "
                         "attention-int8 (see docs/interop.md) [default: none].")
    # The recipe's rules, read once from ``recipe`` (so the work folder's fingerprint covers a file's content);
    # not an option (no metadata): derived from ``recipe``.
    rules: tuple[Rule, ...] = field(default=(), init=False)

    def __post_init__(self):
        if isinstance(self.act_order, bool):  # the boolean form of earlier versions
            object.__setattr__(self, "act_order", "static" if self.act_order else "none")
        if self.backend not in BACKENDS:
            raise QuantMoeError(f"backend {self.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        _check_choices(self)
        if self.refine < 0:
            raise QuantMoeError(f"--refine {self.refine} is invalid; use 0 (off) or a number of passes such as 2")
        if self.clip_steps < 0 or not 0 < self.clip_min <= self.clip_max:
            raise QuantMoeError(f"--clip-steps {self.clip_steps} / --clip-min {self.clip_min} / --clip-max "
                                f"{self.clip_max} are invalid; use steps >= 0 and 0 < min <= max, e.g. 20, 0.6, 1.0")
        if self.bits not in (4, 8):
            raise QuantMoeError(f"--bits {self.bits} is not supported by the {self.backend} backend; use 4 or 8")
        if self.group_size != -1 and self.group_size <= 0:
            raise QuantMoeError(f"--group-size {self.group_size} is invalid; use -1 or a positive size such as 128")
        if not 0 < self.damp < 1:
            raise QuantMoeError(f"--damp {self.damp} is out of range; use a value in (0, 1), e.g. 0.01")
        if self.block_size <= 0:
            raise QuantMoeError(f"block_size {self.block_size} is invalid; use a positive number of columns such as 128")
        if self.rare_expert_tokens < 0:
            raise QuantMoeError(f"--rare-expert-tokens {self.rare_expert_tokens} is invalid; use 0 (the expert's "
                                "widest input size) or a number of routed tokens such as 4096")
        if self.format == "compressed-tensors" and self.layout != "source":
            raise QuantMoeError("--format compressed-tensors keeps the checkpoint's own tensor names (what vLLM reads); "
                                "drop --layout gptqmodel, or use --format gptq with it")
        object.__setattr__(self, "rules", load_recipe(self.recipe))
        if self.rules and self.layout != "source":
            raise QuantMoeError("--recipe matches the checkpoint's own module names; drop --layout gptqmodel, "
                                "or drop --recipe")

    @property
    def uses_hessians(self) -> bool:
        """False for the rtn baseline: no Hessians, no fitting, plain round-to-nearest on min/max grids."""
        return self.backend != "rtn"

    @property
    def effective_fit(self) -> str:
        """The ``fit`` that really runs: rtn fits nothing."""
        return self.fit if self.uses_hessians else "none"

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

@dataclass(frozen=True)
class BnbConfig:
    """How bitsandbytes quantizes (the bnb-* backends); ``quant_type`` is fixed by the backend name."""

    quant_type: str = option("nf4", "nf4 | fp4 (4-bit, blockwise absmax) | int8 (LLM.int8(), per-row absmax)",
                             cli=False, job=False)  # --backend bnb-nf4 / bnb-fp4 / bnb-int8 picks it
    compute_dtype: str = option("bfloat16", "bnb-nf4/fp4: dtype bitsandbytes multiplies in when the model is "
                                "served (bnb_4bit_compute_dtype).", choices=COMPUTE_DTYPES)
    double_quant: str = option("auto", "bnb-nf4/fp4: quantize the 4-bit scales again (fewer bits per weight on "
                               "large linears); auto: where it makes the linear smaller.", choices=DOUBLE_QUANT)
    blocksize: int = option(64, "bnb-nf4/fp4: weights sharing one absmax (bitsandbytes' default).", cli=False)
    int8_threshold: float = option(6.0, "bnb-int8: LLM.int8() outlier threshold used when served (input features "
                                   "above it run in 16 bit); 0 = no outlier columns.")

    def __post_init__(self):
        if self.quant_type not in BNB_QUANT_TYPES:
            raise QuantMoeError(f"bitsandbytes quant type {self.quant_type!r} is unknown; use nf4, fp4 or int8")
        _check_choices(self)
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise QuantMoeError(f"4-bit blocksize {self.blocksize} is not one bitsandbytes takes; use 64")
        if self.int8_threshold < 0:
            raise QuantMoeError(f"--int8-threshold {self.int8_threshold} is negative; use 0 (no outliers) or e.g. 6.0")

    @property
    def four_bit(self) -> bool:
        return self.quant_type != "int8"

    def double_quantize(self, numel: int) -> bool:
        """Whether a 4-bit linear of ``numel`` weights gets double quantization.

        "auto" compares the bytes of its statistics both ways: double quantization turns each
        block's float32 absmax into one byte plus a float32 per 256 blocks, but adds a fixed
        256-entry float32 code table (1 KB) and ~90 bytes of metadata, so it only pays from
        ~380 blocks (~24k weights at blocksize 64) up: every linear of a real Mixtral, not the
        128 x 128 experts of a small demo model.
        """
        if self.double_quant != "auto":
            return self.double_quant == "on"
        blocks = -(-numel // self.blocksize)
        return blocks + 4 * -(-blocks // 256) + 1024 + 90 < 4 * blocks

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunOptions:
    """How one quantize run goes, the same for every backend (the recipe is the backend's config)."""

    calib: str | Path | None = option(None, "Calibration text/JSONL file, folder, datasets name, or a token file "
                                      "from `quantmoe calibrate` [default: the bundled calibration text].",
                                      calibration=True)
    nsamples: int | None = option(None, "Calibration sequences [default: 128].", calibration=True)
    seqlen: int | None = option(None, "Calibration sequence length [default: min(2048, context)].", calibration=True)
    seed: int = option(0, "Seed of the calibration sample (and of torch).")
    device: str = option("auto", "Where layers are quantized: auto takes CUDA where there is one.", choices=DEVICES)
    batch_size: int | None = option(None, "Sequences per forward pass [default: the largest up to 8 whose "
                                    "attention scores fit 2 GiB].")
    max_shard_size: str | int = option("2GB", "Largest shard of the export, e.g. 2GB or 500MB (or a byte count).")
    # The export's, for every backend (the layers' results do not depend on it).
    mtp: str = option("keep", "Layers stored beyond num_hidden_layers (multi-token prediction, DeepSeek-V3/GLM-4.5): "
                      "copy them unquantized in BF16, declared so loaders keep them so (keep), or leave them out "
                      "(drop).", choices=MTP_CHOICES)
    overwrite: bool = option(False, "Replace an existing --out (only once the new one is complete; only a folder "
                             "quantmoe wrote).", flag="--overwrite",
                             job=False)  # a batch never overwrites: a finished job is skipped
    record_paths: bool = option(False, "Name the model, data and output by their local paths in the card, manifest, "
                                "logs and eval report (for private use) [default: Hub id or folder name].",
                                flag="--record-paths")
    resume: bool = option(True, "Reuse the finished layers a stopped run left in the work folder beside --out, "
                          "or start from scratch.", flag="--resume/--restart",
                          job=False)  # a batch always resumes an unfinished job
    run_eval: bool = option(True, "Measure the perplexity gap after export.", flag="--eval/--no-eval")
    eval_data: str | Path | None = option(None, "Held-out text for --eval [default: the bundled held-out text].")
    quiet: bool = option(False, "No progress bars.", flag="--quiet", job=False)  # quantmoe batch --quiet
    # The GPTQ pipeline's speed knobs (gptq/rtn; other backends have no use for them): none changes the bits.
    tf32: bool = option(False, "Tensor-core precision on CUDA: TF32 matrix products for forward passes, GPTQ's "
                        "error spread and inverse factor and the evaluation, and in quantize the attention and the "
                        "Hessians' and moments' products on fp16 inputs scaled by powers of two (TF32's 10-bit "
                        "mantissa): faster, differs by rounding only (the eval report states it).")
    hessian_dtype: str = option("float32", "The inputs of the products that make the Hessians and the fit's moments "
                                "(and the down projections' inputs for them): float32, or bfloat16 summed in fp32, "
                                "which bf16 tensor cores run on CUDA: faster, rounds the statistics (docs/method.md "
                                "says what it changes).", choices=HESSIAN_DTYPES)
    prefetch: bool = option(True, "Read the next layer from disk in a background thread.")
    block_kernel: str = option("auto", "How GPTQ's column loop runs on CUDA (every choice gives the same bits): one "
                               "Triton kernel per block of columns, a CUDA-graph replay, or eager PyTorch; auto: "
                               "Triton where it is installed, else CUDA graphs (eager on CPU).", choices=BLOCK_KERNELS)
    gpu_memory: str | int | None = option(None, "Device memory the run may use, e.g. 40GB: a layer's experts are "
                                          "quantized in groups that fit it, with the same output for any budget "
                                          "[default, and at most: what the GPU has free].")
    host_memory: str | int | None = option(None, "Host memory the run may hold, e.g. 32GB: the read-ahead of the next "
                                           "layer and the pinned copies of captured activations are sized to what the "
                                           "export, written beside the layers, leaves of it, with the same output for "
                                           "any budget [default, and at most: what the machine has available].")

    def __post_init__(self):
        _check_choices(self)


def run_options(**keywords) -> RunOptions:
    """RunOptions from keyword options; one that is not a RunOptions field is a QuantMoeError naming it."""
    known = [o.name for o in options_of(RunOptions)]
    unknown = sorted(set(keywords) - set(known))
    if unknown:
        raise QuantMoeError(f"unknown option {unknown[0]!r}; the run options are {', '.join(known)} "
                            "(the recipe goes in the QuantConfig)")
    return RunOptions(**keywords)


# The records whose fields a backend's settings are (QuantConfig for gptq/rtn, BnbConfig for bnb-*), with the
# backends each one serves, as `quantmoe batch --help` names them.
RECIPES: dict[str, type] = {"gptq/rtn": QuantConfig, "bnb-*": BnbConfig}


def job_keys() -> dict[str, tuple[type, ...]]:
    """Every key a batch job may set, with the types its value may have: name, model, backend, the
    recipes' settings and the run options (those with ``job``), by field name."""
    keys: dict[str, tuple[type, ...]] = {"name": (str,), "model": (str,), "backend": (str,)}
    for record in (*RECIPES.values(), RunOptions):
        keys.update({o.name: o.types for o in options_of(record) if o.job})
    return keys
