"""Reports as JSON and Markdown, and the model card that ships with an export."""

from __future__ import annotations

import json
from pathlib import Path

from ..base.errors import QuantMoeError
from ..base.files import atomic_write_json, atomic_write_text
from ..base.paths import published_name
from .export import class_text


def ranges(values) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    values = sorted(set(values))
    parts, start = [], None
    for k, v in enumerate(values):
        if start is None:
            start = v
        if k + 1 == len(values) or values[k + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def gap_table(report: dict) -> str:
    """The perplexity table: original vs quantized, with the gap, bits per weight and size."""
    q = report.get("quantization", {})
    rows = ["| model | perplexity | gap (abs) | gap (rel) | bits/weight | size (MB) | quantized params |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    orig = report["results"].get("original")
    quant = report["results"].get("quantized")
    if orig:
        rows.append(f"| original | {_fmt(orig['perplexity'])} | | | 16 | "
                    f"{_fmt(report.get('original_size_bytes', 0) / 1e6, 2)} | 0% |")
    if quant:
        g = report.get("gap") or {}
        rows.append(
            f"| {q.get('label', 'quantized')} | {_fmt(quant['perplexity'])} | {_fmt(g.get('absolute'))} | "
            f"{relative_gap_text(g)} | {_fmt(q.get('bits_per_weight'), 3)} | "
            f"{_fmt(q.get('size_bytes', 0) / 1e6, 2)} | {_fmt(100 * q.get('fraction_quantized', 0), 1)}% |")
    kl = report.get("kl")
    if quant and kl:
        se = "" if kl.get("se") is None else f" ± {1000 * kl['se']:.2f}e-3"
        rows += ["", f"KL(original ‖ quantized): {1000 * kl['mean']:.2f}e-3{se} nats per predicted token; "
                     f"the same most likely next token as the original at {100 * kl['top1_agreement']:.2f}% of "
                     "positions."]
    return "\n".join(rows)


def relative_gap_text(g: dict) -> str:
    """+0.22% ± 0.04% (the standard error over windows, where the report has it)."""
    rel, se = g.get("relative"), g.get("relative_se")
    if rel is None:
        return "-"
    return f"{100 * rel:+.2f}%" + ("" if se is None else f" ± {100 * se:.2f}%")


def kl_text(kl: dict | None) -> str:
    """A report's KL in units of 1e-3: 13.35 ± 0.19 (- for reports from before the KL was measured)."""
    if kl is None:
        return "-"
    return f"{1000 * kl['mean']:.2f}" + ("" if kl.get("se") is None else f" ± {1000 * kl['se']:.2f}")


def protocol_text(report: dict) -> str:
    p = report["protocol"]
    d = report["data"]
    return (f"Data `{d['path']}` ({d['documents']} documents, {d['tokens']} tokens, {d['windows']} windows of "
            f"{p['seqlen']}); documents joined with \"\\n\\n\", tokenized once without special tokens; "
            f"{p['windows']}; {p['metric']}; {p['dtype']} on {report.get('device', '?')}."
            + (" The gap's ± is one standard error over the windows, paired (both models score the same windows): "
               "how much another sample of text could move it; another calibration draw can move it more."
               if (report.get("gap") or {}).get("relative_se") is not None else ""))


def stages_table(stages: dict) -> str:
    rows = ["| stage | wall time (s) | peak RSS (MB) | peak GPU (MB) |", "| --- | ---: | ---: | ---: |"]
    for name, s in stages.items():
        if "background_seconds" in s:  # the export, written beside the layers: its row times what came after them
            name = f"{name} (after the layers; {_fmt(s['background_seconds'], 2)} s beside them)"
        rows.append(f"| {name} | {_fmt(s['seconds'], 2)} | {_fmt(s['peak_rss_mb'], 1)} | {_fmt(s.get('peak_gpu_mb'), 1)} |")
    return "\n".join(rows)


MARKDOWN_TITLE = "# quantmoe eval report"


def check_report_out(path: Path, overwrite: bool) -> None:
    """Raise unless the eval report ``path`` (.json) and its Markdown beside it (.md) may be written: they
    do not exist, or ``overwrite`` is set and each is a quantmoe eval report; nothing else is replaced."""
    path = Path(path)
    if path.suffix != ".json":
        raise QuantMoeError(f"--report {path} must name a .json file (the Markdown report goes beside it as .md)")
    for target in (path, path.with_suffix(".md")):
        if not (target.exists() or target.is_symlink()):
            continue
        if not overwrite:
            raise QuantMoeError(f"{target} already exists; pass --overwrite to replace it, or choose another --report")
        if not _is_eval_report(target):
            raise QuantMoeError(f"{target} is not a quantmoe eval report, so --overwrite leaves it alone (it "
                                "replaces only reports quantmoe wrote); choose another --report")


def _is_eval_report(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".md":
            return text.startswith(MARKDOWN_TITLE)
        report = json.loads(text)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and all(k in report for k in ("protocol", "data", "results"))


def write_report(report: dict, path: Path, overwrite: bool) -> None:
    """The eval report as ``path`` (JSON) and Markdown beside it (``check_report_out`` first)."""
    check_report_out(path, overwrite)
    atomic_write_json(path, report)
    atomic_write_text(Path(path).with_suffix(".md"), render_markdown(report))


def render_markdown(report: dict) -> str:
    parts = [f"{MARKDOWN_TITLE}: {report.get('model', '')}", "", gap_table(report), ""]
    classes = (report.get("quantization") or {}).get("classes")
    if classes:
        parts += ["**Bits per module class** (stored width; bits per weight with scales and zeros): "
                  + class_text(classes) + ".", ""]
    parts += ["**Protocol.** " + protocol_text(report), ""]
    if report.get("baseline_is_source") is False:
        parts += [f"**Baseline.** {report.get('baseline')} is not the model {report.get('model')} was quantized from "
                  "(its manifest records another): the gap and KL compare two different models.", ""]
    if report.get("fallbacks"):
        parts += ["**Rare-expert fallbacks.**", ""] + [f"- `{f['module']}`: {f['fallback']}" for f in report["fallbacks"]] + [""]
    if report.get("stages"):
        parts += ["## Stages", "", stages_table(report["stages"]), ""]
    return "\n".join(parts)


# What a model card must state before `quantmoe push` publishes it: the thing, and the line that states it.
# model_card writes every one of them; publish.check_card looks for them.
# How the model card names each column order (QuantConfig.act_order); True/False: cards of older runs.
ORDER_WORDS = {"static": "on (static groups)", "group": "group-aware (groups by largest Hessian diagonal)",
               "none": "off", True: "on (static groups)", False: "off"}
CARD_SECTIONS = {
    "the base model": "## Base model",
    "the method and its options": "## Method",
    "the calibration data": "## Calibration data",
    "the eval protocol": "## Evaluation protocol",
    "the perplexity table": "## Perplexity",
    "the bits per weight": "Bits per weight:",
    "how to load it in vLLM": "### vLLM",
    "how to load it in transformers": "### transformers",
    "how to load it in GPTQModel": "### GPTQModel",
}


# The name a card shows for a base model: ``org/name`` for a Hub download, otherwise the folder name
# (never a local path).
base_model_name = published_name


def _in_layers(module: str, layers: list[int]) -> bool:
    return any(module.startswith(f"model.layers.{i}.") for i in layers)


def model_card(report: dict | None, info: dict) -> str:
    """README.md of an export: base model, method, calibration, protocol, results and how to load it.

    ``info``: name, base_model (path or Hub cache path), model_type, version, quantization_config,
    options, fallback_count, calibration, and optionally notes (the run's, a section of their own). Every entry
    of CARD_SECTIONS is written when ``report`` is given.
    """
    q, opts = info["quantization_config"], info["options"]
    ct = q.get("quant_method") == "compressed-tensors"
    if ct:  # the same settings, read from the run's options; the 16-bit modules from ``ignore``
        q = {"bits": opts["bits"], "group_size": opts["group_size"], "sym": opts["sym"], "damp_percent": opts["damp"],
             "true_sequential": opts["true_sequential"], "meta": q.get("meta"),
             "modules_not_quantized": [m for m in q["ignore"] if m != "lm_head" and not m.startswith("re:")]}
    base = base_model_name(info["base_model"])
    hub_id = base if "/" in base else None
    stats = (report or {}).get("quantization", {})
    extra = (q.get("meta") or {}).get("full_precision_layers", [])
    lines = [
        "---",
        "library_name: transformers",
        *([f"base_model: {hub_id}"] if hub_id else []),
        f"tags: [quantmoe, {'compressed-tensors' if ct else 'gptq'}, moe, int{q['bits']}]",
        "---",
        f"# {info['name']}",
        "",
        f"{'compressed-tensors' if ct else 'GPTQ'} int{q['bits']} quantization of `{base}` ({info['model_type']}) made with quantmoe {info['version']}.",
        "",
        "## Base model",
        "",
        f"`{base}` ({info['model_type']})" + (f", https://huggingface.co/{hub_id}" if hub_id else "") + ".",
        "",
        "## Method",
        "",
        f"- backend: {info['options']['backend']}; bits {q['bits']}; group size {q['group_size']}; "
        f"{'symmetric' if q['sym'] else 'asymmetric'}; act-order {ORDER_WORDS.get(info['options']['act_order'], info['options']['act_order'])}; "
        f"damp {q['damp_percent']}; true-sequential {q['true_sequential']}",
    ]
    recipe = (info["options"].get("recipe") or "") if isinstance(info["options"], dict) else ""
    if recipe:  # per-module precision: the classes say what each got; the config declares each module
        lines.append(f"- per-module precision: recipe `{published_name(recipe)}`, declared in the config's "
                     + ("`config_groups` and `ignore`" if ct else "`dynamic`") + "; routers, embeddings, norms and "
                     "the LM head are not quantized")
    else:
        lines.append(f"- every attention and expert projection is quantized; not quantized: "
                     f"{', '.join(f'`{m}`' for m in q['modules_not_quantized'] if not _in_layers(m, extra))}, "
                     "embeddings, norms and the LM head")
    if stats.get("classes"):
        lines.append(f"- bits per module class: {class_text(stats['classes'])}")
    if extra:
        lines.append(f"- the multi-token prediction layer{'s' if len(extra) > 1 else ''} "
                     f"{', '.join(map(str, extra))} (beyond `num_hidden_layers`, for speculative decoding) "
                     "kept unquantized in BF16, declared in `modules_not_quantized` and `dynamic`")
    lines += [
        f"- rare experts (fewer than the threshold of routed calibration tokens): `{info['options']['rare_expert']}` "
        f"fallback; {info['fallback_count']} expert projections used it (see `quantization_log.json`)",
        "",
    ]
    if stats.get("bits_per_weight") is not None:
        lines += [f"Bits per weight: {stats['bits_per_weight']:.3f} in the quantized projections (packed weights, "
                  f"scales, zeros and g_idx, measured from the files); {100 * stats['fraction_quantized']:.1f}% of "
                  f"all parameters are quantized; {stats['size_bytes'] / 1e6:.2f} MB on disk.", ""]
    lines += ["## Calibration data", "", f"{info['calibration']}.", ""]
    if report is not None:
        lines += ["## Evaluation protocol", "", protocol_text(report),
                  f"Text sha256 `{report['data']['text_sha256']}`.", "",
                  "## Perplexity", "", gap_table(report), ""]
    if info.get("notes"):  # what the run's checks found (quantize printed them too)
        lines += ["## Notes", "", *(f"- {n}" for n in info["notes"]), ""]
    vllm_quant = "compressed-tensors" if ct else "gptq_marlin" if q["sym"] else "gptq"  # Marlin: symmetric only
    lines += [
        "## Loading",
        "",
        "`./this-folder` stands for this folder, or for its Hub repo id once it is published.",
        "",
        "### vLLM",
        "",
        "```bash",
        f"vllm serve ./this-folder --quantization {vllm_quant}",
        "```",
        "",
    ]
    lines += ["### transformers", ""]
    if info.get("moe", True):
        lines += [
            "transformers 5 does not run this checkpoint's routed experts quantized: it holds each layer's experts "
            "as fused 3-D parameters, and its GPTQ and compressed-tensors loaders replace only `nn.Linear` modules, "
            "so the experts would come up randomly initialised. Serve it with vLLM, load it with GPTQModel, or "
            "load it dequantized with quantmoe (below).",
            "",
        ]
    else:
        lines += [
            "With compressed-tensors installed (`pip install compressed-tensors`):" if ct
            else "With optimum and gptqmodel installed:",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "model = AutoModelForCausalLM.from_pretrained('./this-folder', device_map='auto')",
            "```",
            "",
        ]
    lines += ["### GPTQModel", ""]
    if ct:
        lines += [
            "GPTQModel reads GPTQ checkpoints, not compressed-tensors ones: quantize with `--format gptq` "
            "(and `--layout gptqmodel` for Mixtral-style experts) to load it there.",
            "",
        ]
    else:
        lines += [
            "```python",
            "from gptqmodel import GPTQModel",
            "model = GPTQModel.load('./this-folder')",
            "```",
            "",
        ]
    lines += [
        "### quantmoe",
        "",
        "Dequantized into a plain transformers model, CPU or GPU:",
        "```python",
        "import quantmoe",
        "model = quantmoe.load_quantized('./this-folder')",
        "```",
        "",
        "Files: `quantization_log.json` (per module: tokens seen, GPTQ loss, fallback, time), "
        "`eval_report.json` / `eval_report.md`, and `manifest.json` (sha256 of every file, options, versions); "
        "`quantmoe verify ./this-folder` checks them.",
        "",
    ]
    return "\n".join(lines)
