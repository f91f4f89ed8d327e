"""``quantmoe compare``: one model, several backends, one table.

Each backend quantizes the model into its own subfolder of ``out`` in a fresh process,
so the wall time and peak memory in the table are that backend's alone; then the
result is evaluated on the same held-out token windows as the original (saved once as
``out/eval_windows.safetensors``). Sizes, bits per weight and the fractions quantized
are measured from the saved tensors (``export.checkpoint_stats``), never assumed.

Writes ``out/compare.json`` and ``out/compare.md`` (and, with ``report``, a copy of both).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from safetensors.torch import load_file

from ..backends import resolve
from ..base.errors import QuantMoeError
from ..base.files import (
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    save_safetensors,
    versions,
)
from ..base.measure import stage
from ..base.options import RunOptions
from ..base.paths import DEFAULT_MODEL, EVAL_DATA, default_seqlen
from ..base.provenance import (
    CHECKOUT,
    git_commit,
    load_average,
    machine,
    optional_versions,
)
from ..model.checkpoint import Checkpoint
from ..stages.evaluate import (
    Protocol,
    Reference,
    eval_windows,
    gap,
    kl_summary,
    perplexity,
)
from ..stages.export import checkpoint_stats, class_text
from ..stages.report import kl_text, relative_gap_text

DEFAULT_SPECS = ("gptq-int4", "rtn-int4", "bnb-nf4", "bnb-int8")
WINDOWS_FILE = "eval_windows.safetensors"
# The original's last hidden states on those windows, for each row's KL to it (removed at the end).
REFERENCE_FILE = ".original_hidden.safetensors"


def compare(model: str | Path | None = None, specs: tuple[str, ...] | list[str] = DEFAULT_SPECS,
            out: str | Path | None = None, options: RunOptions = RunOptions(), data: str | Path | None = None,
            seqlen: int | None = None, report: str | Path | None = None, isolate: bool = True) -> dict:
    """Quantize ``model`` with each backend spec (``gptq-int4``, ``bnb-nf4`` ...) and tabulate the results.

    ``options`` applies to every backend (each spec brings its own config); ``seqlen`` is the eval
    window (and calibration) length [default: min(2048, context)].
    ``isolate=False`` runs everything in this process (faster; memory columns then include
    what earlier rows left behind). Returns the table as a dict (see ``render_markdown``).
    """

    ckpt = Checkpoint(model if model is not None else DEFAULT_MODEL)
    specs = [s.strip() for s in specs if s.strip()]
    if not specs:
        raise QuantMoeError("--backends is empty; name at least one, e.g. --backends gptq-int4,bnb-nf4")
    if len(set(specs)) != len(specs):
        raise QuantMoeError(f"--backends names one backend twice ({','.join(specs)}); list each once")
    for spec in specs:
        resolve(spec)  # every spec valid before any work starts
    out = Path(out) if out is not None else Path("quantmoe-out") / f"compare-{ckpt.path.name}"
    out = out.expanduser().resolve()
    if out == ckpt.path or ckpt.path in out.parents:
        raise QuantMoeError(f"--out {out} is inside the model folder {ckpt.path}; choose a folder outside it")
    for spec in specs:  # each backend replaces its folder: only one an earlier compare (quantmoe) wrote
        check_replaceable(out / spec, overwrite=True)
    out.mkdir(parents=True, exist_ok=True)
    seqlen = seqlen or default_seqlen(ckpt.config)
    data = data if data is not None else EVAL_DATA
    windows, meta = eval_windows(ckpt.tokenizer(), data, seqlen)
    meta["path"] = _shown(data)
    save_safetensors(out / WINDOWS_FILE, {"input_ids": windows})
    options = replace(options, seqlen=options.seqlen or seqlen, run_eval=False, overwrite=True)

    t0 = time.perf_counter()
    load_before = load_average()
    reference = out / REFERENCE_FILE
    try:
        original = _call(isolate, measure_original, str(ckpt.path), str(out / WINDOWS_FILE), options, str(reference))
        rows = []
        for spec in specs:
            try:
                row = _call(isolate, measure_backend, spec, str(ckpt.path), str(out / spec), str(out / WINDOWS_FILE),
                            options, str(reference))
            except QuantMoeError as exc:
                row = {"backend": spec, "error": str(exc)}
            if "perplexity" in row:
                g = gap(original["perplexity"], row["perplexity"], original["window_nll"], row.pop("window_nll"))
                row["gap"], row["gap_se"] = g["relative"], g.get("relative_se")
            rows.append(row)
    finally:
        reference.unlink(missing_ok=True)
    del original["window_nll"]
    table = {
        "model": ckpt.path.name,
        "model_path": _shown(ckpt.path),
        "model_type": ckpt.model_label,
        "out": str(out),
        "protocol": Protocol(data=_shown(data), seqlen=seqlen).to_dict(),
        "data": meta,
        "options": {k: (_shown(v) if k in ("calib", "eval_data") and v is not None else v)
                    for k, v in asdict(options).items() if k != "config"},
        "isolated": isolate,
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": load_average()},
        "commit": git_commit(),
        "versions": {**versions(), **optional_versions()},
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 1),
        "original": original,
        "rows": rows,
    }
    markdown = render_markdown(table)
    targets = [out / "compare.json"] + ([Path(report)] if report is not None else [])
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, table)
        atomic_write_text(path.with_suffix(".md"), markdown)
    return table


def _shown(path: str | Path) -> str:
    """A path as the table shows it: relative to the quantmoe checkout when inside it (tables get committed)."""

    try:
        return str(Path(path).resolve().relative_to(CHECKOUT))
    except (ValueError, OSError):
        return str(path)


def _call(isolate: bool, fn, *args):
    """fn(*args), in a fresh Python process when ``isolate`` (so its wall time and peak RSS are its own).

    A plain subprocess rather than multiprocessing: spawn would re-run the caller's main
    script, which breaks scripts without an ``if __name__ == "__main__"`` guard.
    """
    if not isolate:
        return fn(*args)
    with tempfile.TemporaryDirectory(prefix="quantmoe-compare-") as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        job.write_bytes(pickle.dumps((fn.__name__, args)))
        proc = subprocess.run([sys.executable, "-m", "quantmoe.apps.compare", str(job), str(result)])
        if not result.is_file():
            raise QuantMoeError(f"{fn.__name__}{args[:1]} crashed (exit status {proc.returncode}; its traceback is "
                                "above); rerun that backend alone with quantmoe quantize to see why")
        ok, value = pickle.loads(result.read_bytes())
    if not ok:
        raise value
    return value


def _child(job: str, result: str) -> None:
    """The other end of ``_call``: run one function, pickle its value or its QuantMoeError."""
    name, args = pickle.loads(Path(job).read_bytes())
    try:
        outcome = (True, globals()[name](*args))
    except QuantMoeError as exc:
        outcome = (False, exc)
    Path(result).write_bytes(pickle.dumps(outcome))


def _windows(path: str):

    return load_file(path)["input_ids"]


def measure_original(model: str, windows_file: str, options: RunOptions, reference_file: str) -> dict:
    """Perplexity and stats of the unquantized model; its last hidden states go to ``reference_file``."""

    record: dict = {}
    with stage(record, "eval"):
        result = perplexity(model, _windows(windows_file), options.device, options.batch_size, keep_reference=True)
    result["reference"].save(Path(reference_file))
    return {"backend": "original", "label": "original (16 bit)", **checkpoint_stats(Path(model)),
            "perplexity": result["perplexity"], "tokens_scored": result["tokens_scored"], "eval": record["eval"],
            "window_nll": result["window_nll"]}


def measure_backend(spec: str, model: str, folder: str, windows_file: str, options: RunOptions,
                    reference_file: str) -> dict:
    """Quantize ``model`` into ``folder`` with one backend spec, then measure it (with its KL to the
    original, whose hidden states ``measure_original`` left in ``reference_file``)."""

    backend, config = resolve(spec)
    record: dict = {}
    with stage(record, "quantize"):
        backend.quantize(model, folder, replace(options, quiet=True), config)
    with stage(record, "eval"):
        reference = Reference.load(model, Path(reference_file), options.device)
        result = perplexity(folder, _windows(windows_file), options.device, options.batch_size, reference=reference)
        del reference
    stats = checkpoint_stats(Path(folder))
    saved = Checkpoint(folder)
    return {**saved.format.describe(saved.quantization), "backend": spec, "backend_name": backend.name, **stats,
            "perplexity": result["perplexity"], "tokens_scored": result["tokens_scored"],
            "kl": kl_summary(result), "window_nll": result["window_nll"],
            "quantize": record["quantize"], "eval": record["eval"], "folder": folder}


def _mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def _pct(x, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"




def _loads(m: dict) -> str:
    before, after = m.get("load_average_before"), m.get("load_average_after")
    return "unknown" if before is None else f"{before[0]:.1f} before, {after[0]:.1f} after (1-minute)"


def render_markdown(table: dict) -> str:
    """The comparison as Markdown: one row per backend, then protocol and provenance."""

    head = ("| backend | bits/weight | size (MB) | quantized (all params) | quantized (decoder linears) | "
            "decoder bytes / bf16 | perplexity | gap | KL (1e-3) | same top token | quantize time (s) | "
            "quantize peak RSS (MB) | eval time (s) |")
    rows = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    o = table["original"]
    rows.append(f"| original | 16 | {_mb(o['size_bytes'])} | 0.0% | 0.0% | "
                f"{o['decoder_bytes'] / o['decoder_bf16_bytes']:.3f} | {o['perplexity']:.4f} | | | | | | "
                f"{o['eval']['seconds']:.1f} |")
    for r in table["rows"]:
        if "error" in r:
            rows.append(f"| {r['backend']} | failed: {r['error']} | | | | | | | | | | | |")
            continue
        q = r["quantize"]
        peak = f"{q['peak_rss_mb']:.0f}" + (f" (GPU {q['peak_gpu_mb']:.0f})" if q.get("peak_gpu_mb") else "")
        rows.append(f"| {r['label']} | {r['bits_per_weight']:.3f} | {_mb(r['size_bytes'])} | "
                    f"{_pct(r['fraction_quantized'])} | {_pct(r['decoder_linear_fraction'])} | "
                    f"{r['decoder_bytes'] / r['decoder_bf16_bytes']:.3f} | {r['perplexity']:.4f} | "
                    f"{relative_gap_text({'relative': r['gap'], 'relative_se': r.get('gap_se')})} | {kl_text(r.get('kl'))} | "
                    f"{_pct((r.get('kl') or {}).get('top1_agreement'), 2)} | {q['seconds']:.1f} | {peak} | "
                    f"{r['eval']['seconds']:.1f} |")
    p, d = table["protocol"], table["data"]
    opts = table["options"]
    lines = [
        f"# quantmoe compare: {table['model']} ({table['model_type']})", "",
        "\n".join(rows), "",
        "- **bits/weight**: bits of every tensor storing a quantized linear (codes, scales, zeros, statistics) "
        "over the weights they stand for. **quantized (all params)**: quantized weights over all parameters, "
        "embeddings and LM head included. **quantized (decoder linears)**: over the linear weights of the "
        "decoder layers, routers excluded. **decoder bytes / bf16**: bytes of every tensor under `model.layers.` "
        "over what those parameters take in bf16. All measured from the saved files.",
        *[f"- **{r['label']}, per module class**: {class_text(r['classes'])}." for r in table["rows"]
          if r.get("classes")],
        f"- **Perplexity**: `{d['path']}` ({d['documents']} documents, {d['tokens']} tokens, {d['windows']} "
        f"windows of {p['seqlen']}, the same windows for every row); documents joined with \"\\n\\n\", tokenized "
        f"once without special tokens; {p['windows']}; {p['metric']}; weights dequantized, {p['dtype']} "
        "activations. **gap** is relative to the original, ± its standard error over the windows (paired). "
        "**KL**: mean KL(original ‖ quantized) per predicted token over the whole vocabulary, ± its standard "
        "error over the windows; **same top token**: positions where the row's most likely next token is "
        "the original's.",
        "- **Time and memory**: wall time and peak RSS (sampled every 50 ms) of the quantize stage, "
        + ("each row in a fresh process. " if table["isolated"] else "all rows in one process (RSS includes "
           "what earlier rows left). ")
        + "gptq/rtn calibration: "
        f"{opts.get('nsamples') or 128} x {opts.get('seqlen')} tokens from "
        f"`{opts.get('calib') or 'the bundled calibration text'}`.",
        f"- **Machine**: {table['machine']['summary']}, {table['machine']['memory_gb']} GB RAM; "
        f"load average {_loads(table['machine'])}; "
        f"device `{opts['device']}`. quantmoe commit `{table['commit']}`, {table['date']}; "
        + ", ".join(f"{k} {v}" for k, v in table["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
