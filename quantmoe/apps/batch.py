"""Batch jobs: several models x several recipes, quantized one after another from a jobs file.

A jobs file is TOML (or YAML with the same structure)::

    [defaults]                      # every job starts from these (optional)
    calib = "calib.jsonl"           # relative paths are looked up beside the jobs file first
    eval_data = "heldout.jsonl"
    seqlen = 2048                   # calibration sequence length

    [[jobs]]                        # one table per job
    name = "mixtral-gptq-int4"      # its output folder: ROOT/<name>
    model = "mistralai/Mixtral-8x7B-v0.1"
    backend = "gptq"
    bits = 4
    group_size = 128

    [matrix]                        # models x recipes -> jobs named <model folder name>-<recipe name>
    models = ["models/a", "models/b"]
    recipes = [{backend = "gptq", bits = 4}, {name = "rtn8", backend = "rtn", bits = 8}, {backend = "bnb-nf4"}]

Job keys are ``name``, ``model``, ``backend`` (a name from ``quantmoe.backends``: gptq, rtn,
bnb-nf4, ...; default gptq), the settings that backend takes (gptq/rtn: the ``QuantConfig`` fields
bits, group_size, sym, act_order, damp, ...; bnb-nf4/fp4: compute_dtype, double_quant, blocksize)
and the run options (calib, eval_data, seqlen, nsamples, seed, device, batch_size, max_shard_size,
eval, ...): every field of base/options.py's records that is not the batch's own (``job_keys``,
which ``quantmoe batch --help`` lists). Hyphens may stand for underscores. A setting written in a job
or recipe that its backend does not take is an error; one from ``[defaults]`` reaches only the
jobs whose backend takes it (a ``group_size`` default leaves a bnb-nf4 recipe alone). Backends
without calibration ignore calib, nsamples and seqlen. The whole file is checked before any job runs.

Each job is one ``backend.quantize`` call into ``ROOT/<name>``, never with ``overwrite``:
- a folder that is present and matches its manifest (and the job's backend and options) is skipped;
- a missing folder means the job never finished; quantize is called again on the same ``out``.
  A resumable backend (every backend of the one pipeline) continues from the finished layers it
  left in the work folder beside it (``.<name>.quantmoe-work``); another starts the job again;
- a failure is recorded and the next job runs.
After every job ``ROOT/batch_summary.json`` and ``.md`` are rewritten; their perplexities, bits
per weight and sizes are copied from each job's own ``eval_report.json``, never recomputed.

Several workers (a Slurm job array, a Kubernetes indexed job) split one jobs file with
``--shard i/N`` (``Shard``): worker i takes job k, counted from 0 in the order above ([[jobs]]
tables first, then each matrix's models x recipes), when k mod N == i, so every job belongs to
exactly one worker. A worker writes ``ROOT/batch_summary.shard-i-of-N.{json,md}`` and, when its
share is done, merges every share's summary into ``batch_summary.{json,md}`` (``merge_summaries``;
``quantmoe batch JOBS --summary`` merges again once all are done). See docs/distributed.md.
"""

from __future__ import annotations

import gc
import json
import os
import re
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any, Callable

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from ..backends import get
from ..base.errors import QuantMoeError
from ..base.files import (
    MANIFEST,
    atomic_write_json,
    atomic_write_text,
    check_manifest,
    versions,
)
from ..base.options import RECIPES, RunOptions, job_keys, options_of
from ..base.paths import published_name
from ..base.provenance import git_commit, machine, optional_versions
from ..formats import reader_for
from ..stages.export import checkpoint_stats
from ..stages.quantize import work_dir

SUMMARY_NAME = "batch_summary"

# Run options a job may set are RunOptions' fields with ``job`` (base.options.job_keys); ``overwrite``,
# ``resume`` and ``quiet`` belong to the batch, not to a job.
RUN_OPTIONS = tuple(o.name for o in options_of(RunOptions) if o.job)
CALIBRATION_OPTIONS = tuple(o.name for o in options_of(RunOptions) if o.calibration)
# A jobs file spells a field as its flag does: eval = false (run_eval).
ALIASES = {o.key: o.name for record in (*RECIPES.values(), RunOptions) for o in options_of(record) if o.key != o.name}
PATH_KEYS = ("model", "calib", "eval_data", "recipe")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@cache
def setting_types() -> dict[str, tuple[type, ...]]:
    """Every backend's settings (the recipes' fields a job may set) and the types of their values."""
    return {o.name: o.types for record in RECIPES.values() for o in options_of(record) if o.job}


@cache
def key_types() -> dict[str, tuple[type, ...]]:
    return job_keys()


@dataclass(frozen=True)
class Job:
    """One quantize call: ``model`` with ``backend`` and its frozen settings ``config`` into ROOT/``name``.

    ``run``: the RunOptions fields it sets; ``notes``: what the job set that its backend ignores.
    """

    name: str
    model: str
    backend: str
    config: Any
    run: dict
    notes: tuple[str, ...] = ()

    def recipe(self) -> str:
        """``gptq int4 g128`` for a backend with bits and groups, else the backend's name (``bnb-nf4``)."""
        c = self.config
        if hasattr(c, "bits") and hasattr(c, "group_size"):
            return f"{self.backend} int{c.bits} g{c.group_size}" + (f" {c.recipe}" if getattr(c, "recipe", "") else "") \
                + (" compressed-tensors" if getattr(c, "format", "gptq") != "gptq" else "")
        return self.backend

    def options(self, quiet: bool = False) -> RunOptions:
        return RunOptions(overwrite=False, quiet=quiet, **self.run)


# ---------------------------------------------------------------------------------------------
# Reading and checking the jobs file


def read_jobs_file(path: Path) -> dict:
    """The jobs file as a dict: TOML for .toml, YAML for .yaml/.yml."""
    path = Path(path)
    if not path.is_file():
        raise QuantMoeError(f"jobs file {path} does not exist; check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QuantMoeError(f"{path} is not UTF-8 text (byte {exc.start}); save the jobs file as UTF-8") from None
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise QuantMoeError(f"{path} is not valid TOML ({exc}); fix the line it names") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise QuantMoeError(f"reading {path} needs PyYAML: pip install 'quantmoe[yaml]' "
                                "(or write the jobs file as TOML)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise QuantMoeError(f"{path} is not valid YAML ({' '.join(str(exc).split())}); fix the line it names") from None
    else:
        raise QuantMoeError(f"jobs file {path} must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise QuantMoeError(f"{path} holds no tables; write [[jobs]] tables or a [matrix] (see quantmoe batch --help)")
    return data


def _normalize(table: dict, where: str, file: Path) -> dict:
    """Keys with hyphens -> underscores and aliases applied; unknown keys and wrong types refused."""
    if not isinstance(table, dict):
        raise QuantMoeError(f"{file}: {where} is not a table of key = value pairs")
    out = {}
    for key, value in table.items():
        k = key.replace("-", "_")
        k = ALIASES.get(k, k)
        if k not in key_types():
            raise QuantMoeError(f"{file}: {where} has unknown key {key!r}; known keys: "
                                f"{', '.join(sorted(set(key_types()) - set(ALIASES.values()) | set(ALIASES)))}")
        types = key_types()[k]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise QuantMoeError(f"{file}: {where}: {key} = {value!r} should be {' or '.join(t.__name__ for t in types)}")
        out[k] = value
    return out


def _resolve_path(value: str, base: Path) -> str:
    """A relative path that exists beside the jobs file is taken from there; anything else
    (a Hub id, a datasets name, a path relative to the current folder) is passed on unchanged."""
    p = Path(value).expanduser()
    if not p.is_absolute() and (base / p).exists():
        return os.path.abspath(base / p)  # not resolve(): a symlinked model keeps the name it was given
    return str(p) if p.exists() else value


def make_job(defaults: dict, own: dict, where: str, file: Path) -> Job:
    """A Job from normalized ``[defaults]`` and the job's ``own`` keys (which win). The backend checks
    the recipe now, not hours later; a default setting the backend does not take is left out."""
    options = {**defaults, **own}
    name = options.get("name")
    if name is None:
        raise QuantMoeError(f"{file}: {where} has no name; add name = \"...\" (it is the output folder ROOT/<name>)")
    if not NAME_RE.fullmatch(name):
        raise QuantMoeError(f"{file}: job {name!r}: the name must be a plain folder name "
                            "(letters, digits, . _ + -, not starting with . or -)")
    if "model" not in options:
        raise QuantMoeError(f"{file}: job {name!r} has no model; add model = \"<folder or Hub id>\"")
    base = file.parent
    options = {k: _resolve_path(v, base) if k in PATH_KEYS else v for k, v in options.items()}
    try:
        backend = get(options.get("backend", "gptq"))
        config = backend.configure(**{k: v for k, v in options.items()
                                      if k in setting_types() and (k in own or k in backend.settings())})
    except QuantMoeError as exc:
        raise QuantMoeError(f"{file}: job {name!r}: {exc}") from None
    notes = () if backend.needs_calibration else tuple(
        f"{backend.name} uses no calibration data; {k} is ignored" for k in CALIBRATION_OPTIONS if k in own)
    run = {k: v for k, v in options.items() if k in RUN_OPTIONS}
    try:
        RunOptions(**run)  # its choices (device, block_kernel) checked now, not when the job runs
    except QuantMoeError as exc:
        raise QuantMoeError(f"{file}: job {name!r}: {exc}") from None
    return Job(name=name, model=options["model"], backend=backend.name, config=config, run=run, notes=notes)


def _recipe_label(recipe: dict) -> str:
    """A recipe's name as quantize's default --out spells it: <backend>-int<bits>[-g<group>] for a
    backend with bits (gptq, rtn), otherwise the backend's name (bnb-nf4)."""
    backend = get(recipe.get("backend", "gptq"))
    config = backend.configure(**{k: v for k, v in recipe.items() if k in backend.settings()})
    if not hasattr(config, "bits"):
        return backend.name
    group = getattr(config, "group_size", -1)
    label = f"{backend.name}-int{config.bits}" + ("" if group == -1 else f"-g{group}")
    if getattr(config, "recipe", ""):  # a preset's name or the recipe file's stem
        label += f"-{Path(config.recipe).stem}"
    return label + ("-ct" if getattr(config, "format", "gptq") == "compressed-tensors" else "")


def _matrix_jobs(matrix: dict, defaults: dict, file: Path) -> list[Job]:
    if not isinstance(matrix, dict):
        raise QuantMoeError(f"{file}: [matrix] must be a table with models = [...] and recipes = [...]")
    unknown = set(matrix) - {"models", "recipes"}
    if unknown:
        raise QuantMoeError(f"{file}: [matrix] has unknown key {sorted(unknown)[0]!r}; it takes models and recipes")
    models, recipes = matrix.get("models"), matrix.get("recipes")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise QuantMoeError(f"{file}: [matrix] models must be a non-empty list of model folders or Hub ids")
    if not isinstance(recipes, list) or not recipes:
        raise QuantMoeError(f"{file}: [matrix] recipes must be a non-empty list of tables such as "
                            "{backend = \"gptq\", bits = 4}")
    jobs = []
    for model in models:
        for r, recipe in enumerate(recipes, 1):
            if not isinstance(recipe, dict):
                raise QuantMoeError(f"{file}: [matrix] recipe {r} is not a table")
            label = recipe.get("name")
            body = _normalize({k: v for k, v in recipe.items() if k != "name"}, f"[matrix] recipe {r}", file)
            if "model" in body:
                raise QuantMoeError(f"{file}: [matrix] recipe {r} sets model; models come from [matrix] models")
            if label is None:
                try:
                    label = _recipe_label({**defaults, **body})
                except QuantMoeError as exc:
                    raise QuantMoeError(f"{file}: [matrix] recipe {r}: {exc}") from None
            name = f"{Path(model.rstrip('/')).name}-{label}"
            jobs.append(make_job(defaults, {**body, "model": model, "name": name}, f"job {name!r}", file))
    return jobs


def load_jobs(path: str | Path) -> list[Job]:
    """Every job of a jobs file, checked: unknown keys, wrong types, bad recipes and duplicate names fail here."""
    file = Path(path)
    data = read_jobs_file(file)
    unknown = set(data) - {"defaults", "jobs", "matrix"}
    if unknown:
        raise QuantMoeError(f"{file}: unknown top-level key {sorted(unknown)[0]!r}; use [defaults], [[jobs]] and [matrix]")
    defaults = _normalize(data.get("defaults", {}), "[defaults]", file)
    if "name" in defaults:
        raise QuantMoeError(f"{file}: [defaults] sets name; each job needs its own name")
    tables = data.get("jobs", [])
    if not isinstance(tables, list):
        raise QuantMoeError(f"{file}: jobs must be a list of tables; write each one as [[jobs]]")
    jobs = []
    for n, table in enumerate(tables, 1):
        where = f"job {table.get('name')!r}" if isinstance(table, dict) and "name" in table else f"job {n}"
        jobs.append(make_job(defaults, _normalize(table, where, file), where, file))
    matrices = data.get("matrix", [])
    for matrix in matrices if isinstance(matrices, list) else [matrices]:
        jobs += _matrix_jobs(matrix, defaults, file)
    if not jobs:
        raise QuantMoeError(f"{file} lists no jobs; add [[jobs]] tables or a [matrix]")
    seen = set()
    for job in jobs:
        if job.name in seen:
            raise QuantMoeError(f"{file}: two jobs are named {job.name!r}; give each job its own name")
        seen.add(job.name)
    return jobs


# ---------------------------------------------------------------------------------------------
# Running


def _option_mismatch(job: Job, out: Path) -> str | None:
    """Why a finished folder does not belong to this job (its backend, recipe or model changed), or None."""
    try:
        made_by = reader_for(json.loads((out / "config.json").read_text()).get("quantization_config"))
    except (OSError, ValueError, QuantMoeError):
        made_by = None
    # A compressed-tensors export names the backend that made it (gptq, rtn) in its config's meta.
    made_by = made_by and made_by.describe(json.loads((out / "config.json").read_text())["quantization_config"])["backend"]
    if made_by != job.backend:
        return f"backend {made_by!r}, but the jobs file asks for {job.backend!r}"
    manifest = json.loads((out / MANIFEST).read_text())
    recorded = manifest.get("options") if isinstance(manifest.get("options"), dict) else {}
    calibration = ("seed", "nsamples", "seqlen") if get(job.backend).needs_calibration else ()
    # as JSON has them (the recipe's rules: a tuple of tables, recorded as a list)
    ran = {k: job.run[k] for k in (*calibration, "mtp") if k in job.run}
    wanted = json.loads(json.dumps({**asdict(job.config), **ran}))
    for key, value in wanted.items():
        if key in recorded and recorded[key] != value:
            return f"{key} {recorded[key]!r}, but the jobs file asks for {value!r}"
    base = manifest.get("base_model")
    if isinstance(base, str) and base and Path(job.model).is_dir():
        # Manifests name the model as quantize saw it (links resolved) by folder name or Hub id
        # (published_name), or by its path (--record-paths).
        same = Path(job.model).resolve() == Path(base).resolve() if Path(base).is_absolute() \
            else published_name(Path(job.model).resolve()) == base
        if not same:
            return f"model {base}, but the jobs file asks for {job.model}"
    return None


def job_state(job: Job, out: Path) -> str:
    """'complete' (skip it), 'resume' (a resumable backend left a work folder), 'restart' (another
    backend left one: it starts again) or 'new'.

    Raises QuantMoeError when ``out`` exists but is damaged or was made by another recipe:
    quantize would refuse to write there, and skipping it would report a result that is not this job's.
    """

    if out.exists():
        problems = check_manifest(out)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise QuantMoeError(f"{out} exists but does not match its manifest: {problems[0]}{more}; "
                                "delete the folder to run the job again")
        why = _option_mismatch(job, out)
        if why:
            raise QuantMoeError(f"{out} was made with {why}; delete the folder or rename the job")
        return "complete"
    if not work_dir(out).exists():
        return "new"
    return "resume" if get(job.backend).resumable else "restart"


def finished_layers(out: Path) -> int:
    """How many layer files an interrupted run left in ``out``'s work folder (quantize checks each one's
    fingerprint before reusing it; this count is for the progress line)."""

    return len(list((work_dir(out) / "layers").glob("layer-*.json")))


def result_row(job: Job, out: Path, status: str, seconds: float, error: str | None = None) -> dict:
    """One summary row; the numbers come from the job's own eval_report.json (or, without eval, its files)."""
    row = {"job": job.name, "status": status, "model": job.model, "recipe": job.recipe(), "out": str(out),
           "ppl_original": None, "ppl_quantized": None, "gap_absolute": None, "gap_relative": None,
           "kl": None, "bits_per_weight": None, "size_bytes": None, "wall_seconds": round(seconds, 3), "error": error}
    if status not in ("done", "skipped"):
        return row
    report_path = out / "eval_report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        results, gap, q = report.get("results", {}), report.get("gap") or {}, report.get("quantization", {})
        row.update(ppl_original=results.get("original", {}).get("perplexity"),
                   ppl_quantized=results.get("quantized", results.get("model", {})).get("perplexity"),
                   gap_absolute=gap.get("absolute"), gap_relative=gap.get("relative"),
                   kl=(report.get("kl") or {}).get("mean"),
                   bits_per_weight=q.get("bits_per_weight"), size_bytes=q.get("size_bytes"))
    else:  # the job ran with eval = false: no perplexity, but the files still say how big it is

        stats = checkpoint_stats(out)
        row.update(bits_per_weight=stats["bits_per_weight"], size_bytes=stats["size_bytes"])
    return row


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _milli(x: float | None) -> float | None:
    return None if x is None else 1000 * x


def summary_markdown(summary: dict) -> str:
    c = summary["counts"]
    share = f" (shard {summary['shard']})" if summary.get("shard") else ""
    merged = "".join(f"; merged from shard {s['shard']} ({s['updated']})" for s in summary.get("shards", []))
    lines = [f"# quantmoe batch: {summary['jobs_file']}{share}", "",
             f"Output root `{summary['root']}`; {c['done']} done, {c['skipped']} skipped, {c['failed']} failed"
             + (f", {c['pending']} not run" if c.get("pending") else "") + f" ({summary['updated']}{merged}).", "",
             f"quantmoe commit `{summary.get('commit')}`; {summary.get('machine')}.", "",
             "| job | status | recipe | ppl original | ppl quantized | gap | KL (1e-3) | bits/weight | size (MB) | "
             "wall time (s) | error |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in summary["jobs"]:
        gap = "-" if r["gap_relative"] is None else f"{r['gap_absolute']:+.4f} ({100 * r['gap_relative']:+.2f}%)"
        size = None if r["size_bytes"] is None else r["size_bytes"] / 1e6
        error = (r["error"] or "").replace("|", "\\|")
        lines.append(f"| {r['job']} | {r['status']} | {r['recipe']} | {_fmt(r['ppl_original'], '.4f')} | "
                     f"{_fmt(r['ppl_quantized'], '.4f')} | {gap} | {_fmt(_milli(r.get('kl')), '.2f')} | "
                     f"{_fmt(r['bits_per_weight'], '.3f')} | "
                     f"{_fmt(size, '.2f')} | {_fmt(r['wall_seconds'], '.1f')} | {error} |")
    lines += ["", "Perplexity, gap, KL to the original, bits/weight and size are copied from each job's "
              "`eval_report.json`; "
              "wall time is this run's (a skipped job only had its files checked).", ""]
    return "\n".join(lines)


@cache
def provenance() -> dict:
    """The quantmoe commit, machine and library versions the numbers come from (computed once per process)."""

    return {"commit": git_commit(), "machine": machine()["summary"], "versions": {**versions(), **optional_versions()}}


def write_summary(root: Path, jobs_file: Path, rows: list[dict], name: str = SUMMARY_NAME,
                  extra: dict | None = None) -> dict:
    """ROOT/<name>.json and .md; ``extra`` adds keys (a share's ``shard``) or replaces them (a merge's provenance)."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed", "pending")}
    summary = {"jobs_file": str(jobs_file), "root": str(root),
               "updated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), **provenance(),
               "counts": counts, "jobs": rows, **(extra or {})}
    atomic_write_json(root / f"{name}.json", summary)
    atomic_write_text(root / f"{name}.md", summary_markdown(summary))
    return summary


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, QuantMoeError) else f"{type(exc).__name__}: {text}"


def run_batch(jobs: list[Job], root: str | Path, jobs_file: str | Path = "", quiet: bool = False,
              log: Callable[[str], None] = print, shard: Shard | None = None) -> dict:
    """Run ``jobs`` one after another into ``root``/<name>; returns the summary written to root/batch_summary.json.

    ``log`` receives one line per job start and end (job i/n, what it does, time, batch ETA);
    the layer bar with its own ETA comes from the backend's quantize unless ``quiet``.
    ``shard``: run only that worker's share of ``jobs`` (every job of the file, not just the share),
    write its summary to root/batch_summary.shard-i-of-N.json, then merge every share's summary.
    """
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    if shard is not None:
        log(f"[batch] {shard.describe(jobs)}")
        everything, jobs = jobs, shard.take(jobs)
    name, extra = (SUMMARY_NAME, None) if shard is None else (shard.summary_name, {"shard": str(shard)})
    rows = [result_row(job, root / job.name, "pending", 0.0) for job in jobs]
    ran: list[float] = []  # wall times of jobs that did work, for the ETA
    n = len(jobs)
    for i, job in enumerate(jobs):
        tag = f"[job {i + 1}/{n}] {job.name}"
        out = root / job.name
        t0 = time.perf_counter()
        try:
            state = job_state(job, out)
            if state == "complete":
                rows[i] = result_row(job, out, "skipped", time.perf_counter() - t0)
                log(f"{tag}: already complete in {out} (manifest valid); skipped")
            else:
                doing = {"new": "starting",
                         "resume": f"resuming ({finished_layers(out)} finished layers left by an interrupted run)",
                         "restart": f"restarting ({job.backend} does not resume; its unfinished work folder is discarded)",
                         }[state]
                log(f"{tag}: {doing} {job.recipe()} of {job.model}")
                for line in job.notes:
                    log(f"{tag}: note: {line}")
                get(job.backend).quantize(job.model, out, job.options(quiet), job.config)
                rows[i] = r = result_row(job, out, "done", time.perf_counter() - t0)
                ran.append(r["wall_seconds"])
                ppl = ("" if r["gap_relative"] is None else
                       f"; ppl {r['ppl_original']:.4f} -> {r['ppl_quantized']:.4f} ({100 * r['gap_relative']:+.2f}%)")
                log(f"{tag}: done in {_duration(r['wall_seconds'])}{ppl}")
        except KeyboardInterrupt:
            rows[i] = result_row(job, out, "failed", time.perf_counter() - t0, "interrupted")
            write_summary(root, Path(jobs_file), rows, name, extra)
            raise
        except Exception as exc:  # noqa: BLE001 - one job's failure, whatever it is, must not stop the others
            rows[i] = result_row(job, out, "failed", time.perf_counter() - t0, _one_line(exc))
            if not isinstance(exc, QuantMoeError):
                rows[i]["traceback"] = traceback.format_exc()
            log(f"{tag}: FAILED: {rows[i]['error']}")
        finally:
            gc.collect()  # the next job should not inherit this one's tensors
        left = [j for j in jobs[i + 1:] if not (root / j.name).exists()]
        if left and ran:  # ETA from the jobs that did work; skipped and failed ones took no time to speak of
            log(f"[batch] {len(left)} job(s) left to run, ETA {_duration(len(left) * sum(ran) / len(ran))}")
        write_summary(root, Path(jobs_file), rows, name, extra)
    summary = write_summary(root, Path(jobs_file), rows, name, extra)
    if shard is not None:
        try:
            merged = merge_summaries(everything, root, jobs_file)
            log(f"[batch] merged the summaries of every share into {root / SUMMARY_NAME}.md "
                f"({merged['counts']['pending']} job(s) of other shares not finished yet)")
        except QuantMoeError as exc:  # another share's file is damaged: this share's work still stands
            log(f"[batch] the merged summary was not written: {exc}")
    return summary


def plan(jobs: list[Job], root: str | Path) -> list[tuple[Job, str]]:
    """What run_batch would do with each job: 'skip', 'resume', 'run', or 'fail: <why>'."""
    root = Path(root).expanduser().resolve()
    out = []
    for job in jobs:
        try:
            state = job_state(job, root / job.name)
            out.append((job, {"complete": "skip", "resume": "resume", "restart": "run again", "new": "run"}[state]))
        except QuantMoeError as exc:
            out.append((job, f"fail: {exc}"))
    return out


# ---------------------------------------------------------------------------------------------
# Splitting the jobs between workers (--shard i/N) and merging their summaries

SHARD_FILE_RE = re.compile(re.escape(SUMMARY_NAME) + r"\.shard-(\d+)-of-(\d+)\.json")


@dataclass(frozen=True)
class Shard:
    """Worker ``index`` of ``count`` (from 0). It takes job k of the file, counted from 0 in
    ``load_jobs`` order, when k mod count == index: the shares are disjoint, cover every job, differ
    in size by at most one, and depend on nothing but the file (not on names, hashes or the host)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/N"`` -> Shard(i, N); anything else is a QuantMoeError naming the fix."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if m is None:
            raise QuantMoeError(f"--shard {text!r} is not i/N; write the worker's number and the number of "
                                "workers, e.g. --shard 0/4 (workers count from 0)")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1:
            raise QuantMoeError(f"--shard {text}: the number of workers N must be at least 1")
        if index >= count:
            raise QuantMoeError(f"--shard {text}: workers count from 0, so i must be below N: "
                                f"0/{count} ... {count - 1}/{count}")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def take(self, jobs: list[Job]) -> list[Job]:
        """This worker's share of every job of the file."""
        return [job for k, job in enumerate(jobs) if k % self.count == self.index]

    def describe(self, jobs: list[Job]) -> str:
        mine = [k for k in range(len(jobs)) if k % self.count == self.index]
        return (f"shard {self}: {len(mine)} of {len(jobs)} jobs (job k of the file, counted from 0, goes to shard "
                f"k mod {self.count}): {', '.join(f'#{k} {jobs[k].name}' for k in mine) or 'none'}")

    @property
    def summary_name(self) -> str:
        return f"{SUMMARY_NAME}.shard-{self.index}-of-{self.count}"


def summary_name(shard: Shard | None) -> str:
    """The file name (without .json/.md) of the summary a batch writes: its share's, or the whole batch's."""
    return SUMMARY_NAME if shard is None else shard.summary_name


def _read_share(path: Path, jobs: dict[str, Job], root: Path) -> dict:
    """A share's summary, its rows checked (a row of a job the file no longer lists is dropped)."""
    def damaged(why: str) -> QuantMoeError:
        return QuantMoeError(f"{path} is not a share summary quantmoe batch --shard wrote ({why}); "
                             "delete it and run that shard again")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise damaged(" ".join(str(exc).split())) from None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise damaged("no list of jobs")
    rows = {}
    for row in data["jobs"]:
        if not isinstance(row, dict) or not isinstance(row.get("job"), str):
            raise damaged("a row without a job name")
        if row.get("status") not in ("done", "skipped", "failed", "pending"):
            raise damaged(f"job {row['job']!r} has status {row.get('status')!r}")
        job = jobs.get(row["job"])
        if job is not None:  # every key a row has, even from an older quantmoe
            rows[job.name] = {**result_row(job, root / job.name, "pending", 0.0), **row}
    m = SHARD_FILE_RE.fullmatch(path.name)
    return {"rows": rows, "shard": f"{m.group(1)}/{m.group(2)}", "updated": str(data.get("updated")),
            "commit": data.get("commit"), "machine": data.get("machine")}


def merge_summaries(jobs: list[Job], root: str | Path, jobs_file: str | Path = "") -> dict:
    """ROOT/batch_summary.{json,md} from the share summaries in ROOT (batch_summary.shard-i-of-N.json).

    One row per job of ``jobs`` (the whole file), in file order: the row of the newest share
    summary that lists the job (the shares of an earlier split, say 0/2 before 0/3, count too, but
    a newer one wins), or ``pending`` where none does. The commit and machine are each share's.
    """
    root = Path(root).expanduser().resolve()
    files = sorted((p for p in root.glob(f"{SUMMARY_NAME}.shard-*-of-*.json") if SHARD_FILE_RE.fullmatch(p.name)),
                   key=lambda p: (p.stat().st_mtime_ns, p.name))
    if not files:
        raise QuantMoeError(f"{root} holds no share summaries ({SUMMARY_NAME}.shard-i-of-N.json); run "
                            "quantmoe batch JOBS --out ROOT --shard i/N on each worker first")
    by_name = {job.name: job for job in jobs}
    rows: dict[str, dict] = {}
    shares = []
    for path in files:  # oldest first: a newer share's row replaces an older one
        share = _read_share(path, by_name, root)
        rows.update(share.pop("rows"))
        shares.append(share)
    merged = [rows.get(job.name) or result_row(job, root / job.name, "pending", 0.0) for job in jobs]
    distinct = lambda key: "; ".join(dict.fromkeys(str(s[key]) for s in shares))  # noqa: E731
    return write_summary(root, Path(jobs_file), merged, extra={"commit": distinct("commit"),
                                                              "machine": distinct("machine"), "shards": shares})
