"""The ``quantmoe`` command line: parse options, call the Python API, print results.

Every QuantMoeError is printed as one ``error: ...`` line with exit status 2, and so is any other
exception (as an internal error): inputs are untrusted, and a traceback is no answer to a bad one.
``quantmoe --debug ...`` (or QUANTMOE_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from functools import wraps
from pathlib import Path

import click

from .base.errors import QuantMoeError
from .base.options import BACKEND_NAMES, RECIPES, Option, RunOptions, options_of

INTERRUPTED = ("interrupted; --out was left as it was (re-run the same command: quantize resumes from its last "
               "finished layer)")


DEBUG_ENV = "QUANTMOE_DEBUG"


def friendly(fn):
    """Turn every exception and Ctrl-C into one line and a non-zero exit, never a traceback (unless
    --debug / QUANTMOE_DEBUG=1: then any exception but a QuantMoeError keeps its traceback)."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        # A Ctrl-C that lands inside a C extension (safetensors, torch) can come out as some other
        # error; remembering that it happened keeps the message and the status (130) right.
        interrupted = []

        def on_sigint(signum, frame):
            interrupted.append(signum)
            raise KeyboardInterrupt

        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            fail(INTERRUPTED, 130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own: usage errors and exits, which click reports itself
        except Exception as exc:
            if interrupted:
                fail(INTERRUPTED, 130)
            if isinstance(exc, QuantMoeError):
                fail(str(exc))
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            evaluating = fn.__name__ == "eval_"  # the eval command: --nsamples, --fit and torchrun are not its own
            if isinstance(exc, MemoryError):
                fail("out of memory; lower --batch-size, or use --device cuda" if evaluating else
                     "out of memory; lower --batch-size or --nsamples, or use --device cuda")
            if _gpu_out_of_memory(exc):
                fail(EVAL_GPU_OUT_OF_MEMORY if evaluating else GPU_OUT_OF_MEMORY)
            if isinstance(exc, OSError):  # what the stages did not foresee: still one line naming the file
                where = f": {exc.filename}" if exc.filename else ""
                fix = ("free disk space, then re-run the same command to resume" if exc.errno == errno.ENOSPC
                       else "check the path and its permissions")
                fail(f"{exc.strerror or exc}{where}; {fix}")
            # Anything else is a bug, or an input no check foresaw: one line that says how to see more.
            detail = " ".join(str(exc).split())[:300]
            fail(f"internal error ({type(exc).__name__}: {detail}); this is a bug in quantmoe or an input it "
                 f"does not check yet: re-run with quantmoe --debug (or {DEBUG_ENV}=1) for the traceback, and "
                 "report it (see SECURITY.md)")
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
    return wrapper


GPU_OUT_OF_MEMORY = (
    "the GPU ran out of memory; the default recipe (--fit stream) holds two copies of a layer and two sets of "
    "activations: use --fit none, a lower --batch-size, or more GPUs (torchrun --nproc-per-node N -m quantmoe "
    "quantize ...); finished layers of the same recipe are kept (benchmarks/README.md lists measured peaks)")


EVAL_GPU_OUT_OF_MEMORY = (
    "the GPU ran out of memory; eval holds one layer at a time, its weights and the activations in the forward "
    "passes' dtype: use --dtype bfloat16 (half of float32's memory) or a lower --batch-size")


def _gpu_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def fail(message: str, status: int = 2) -> None:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(status)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quantmoe")
@click.option("--debug", is_flag=True, help=f"Show the traceback of an unexpected error (also {DEBUG_ENV}=1).")
def main(debug):
    """Quantize Mixture-of-Experts checkpoints to GPTQ int4/int8, streamed one layer at a time."""
    if debug:
        os.environ[DEBUG_ENV] = "1"  # for friendly, and for compare's child processes
    # OpenMP threads that finish early sleep instead of spinning (unless the user chose otherwise): spinning
    # threads burn the cores another process needs (benchmarks/README.md). Set here, before any command
    # imports torch, and only for the command line's own process.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Optional extras log import-time warnings that are not about the user's run (torchao, pulled in by
    # gptqmodel, cannot load its CUDA kernels on a CPU machine); errors must stay one line.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _backend_names() -> list[str]:
    return list(BACKEND_NAMES)  # the registry's names, without importing the backends (torch) at start-up


# Options that belong to one backend's settings; only those the user typed are passed on,
# so a backend can reject one that does not apply to it (e.g. --bits with bnb-nf4).
BACKEND_SETTINGS = tuple(o.name for recipe in RECIPES.values() for o in options_of(recipe) if o.cli)
CALIBRATION_OPTIONS = tuple(o.name for o in options_of(RunOptions) if o.calibration)


def _typed(ctx: click.Context, names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` given on the command line (not left at their defaults)."""
    return [n for n in names if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)]


def _click_option(o: Option):
    """The click option of one field of base.options (its flag, default, choices and help)."""
    if o.switch and "/" not in o.flag:
        return click.option(o.flag, o.name, is_flag=True, default=o.default, help=o.help)
    kind = click.Choice(o.choices) if o.choices else o.types[0] if o.types in ((int,), (float,)) else None
    return click.option(o.flag, o.name, type=kind, default=o.default, show_default=o.default is not None,
                        help=o.help)


def options_from(*records: type):
    """Decorate a command with a click option for every command-line field of ``records``, in their order."""
    def decorate(command):
        for o in reversed([o for record in records for o in options_of(record) if o.cli]):
            command = _click_option(o)(command)
        return command
    return decorate


@main.command()
@click.argument("model", required=False)
@click.option("--out", type=click.Path(path_type=Path),
              help="Output folder [default: quantmoe-out/<model>-<backend>-int<bits>-g<group>, or <model>-bnb-nf4 ...].")
@click.option("--backend", type=click.Choice(_backend_names()), default="gptq", show_default=True,
              help="gptq/rtn: GPTQ v1 checkpoint; bnb-*: bitsandbytes, experts included (pip install 'quantmoe[bnb]').")
@options_from(*RECIPES.values(), RunOptions)
@click.pass_context
@friendly
def quantize(ctx, model, out, backend, **options):
    """Quantize MODEL (a checkpoint folder or Hub id; default: the bundled demo MoE).

    Under `torchrun --nproc-per-node N -m quantmoe quantize ...` each layer's experts are
    spread over the N processes (one GPU each, or CPU processes over gloo), on one node or
    several (--nnodes; docs/distributed.md); rank 0 writes, and a stopped run resumes.
    """
    from .backends import get

    chosen = get(backend)
    config = chosen.configure(**{k: options[k] for k in _typed(ctx, BACKEND_SETTINGS)})
    if not chosen.needs_calibration:
        for name in _typed(ctx, CALIBRATION_OPTIONS):
            click.echo(f"note: {backend} uses no calibration data; --{name} is ignored", err=True)
    run = RunOptions(**{o.name: options[o.name] for o in options_of(RunOptions)})
    from .model.distributed import (  # these import torch: after the cheap option checks
        Ranks,
        leave,
    )

    ranks = Ranks.from_env(os.environ)
    try:
        summary = chosen.quantize(model, out, run, config)
    finally:
        leave()
    if ranks.writes:
        _print_summary(summary)


def _print_summary(summary: dict) -> None:
    from .stages.report import gap_table, protocol_text

    for note in summary.get("notes", []):
        click.echo(f"note: {note}", err=True)
    if summary["fallbacks"]:
        click.echo(f"{len(summary['fallbacks'])} expert projections used the rare-expert fallback "
                   "(listed in quantization_log.json)", err=True)
    if summary["report"] is not None:
        click.echo(gap_table(summary["report"]))
        click.echo("")
        click.echo(protocol_text(summary["report"]))
    click.echo(f"wrote {summary['out']}")


@main.command()
@click.option("--data", help="Text/JSONL file, folder or datasets name [default: the bundled calibration text].")
@click.option("--tokenizer", help="Model folder whose tokenizer to use [default: the bundled demo MoE].")
@click.option("--nsamples", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, help="[default: min(2048, context)]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("calib.safetensors"), show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (only a token file quantmoe wrote).")
@friendly
def calibrate(data, tokenizer, nsamples, seqlen, seed, out, overwrite):
    """Build a calibration token file (safetensors input_ids int64 [N, L])."""
    from .api import calibrate as run

    path = run(data, tokenizer, nsamples, seqlen, seed, out, overwrite)
    click.echo(f"wrote {path} ({nsamples} x {seqlen or 'context'} tokens)")


@main.command("eval")
@click.argument("model", required=False)
@click.option("--baseline", help="The original model, to report the gap.")
@click.option("--data", help="Held-out text [default: the bundled held-out text].")
@click.option("--seqlen", type=int, help="Window length [default: min(2048, context)].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", type=int, default=None,
              help="Sequences per forward pass [default: the largest up to 8 whose attention scores fit 2 GiB].")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the JSON report here (and .md beside it).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --report (only a report quantmoe wrote).")
@click.option("--backend", type=click.Choice(_backend_names()),
              help="Fail unless MODEL was quantized with this backend [default: read it from config.json].")
@click.option("--tf32/--no-tf32", default=False, show_default=True,
              help="On CUDA, run the forward passes' matrix products as TF32 (faster; the report states it).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="The forward passes' dtype: bfloat16 is faster on GPUs (float32 accumulation; the logits, losses "
                   "and KL stay float32; the report states it). Compare reports made with the same dtype.")
@click.option("--quiet", is_flag=True)
@friendly
def eval_(model, baseline, data, seqlen, device, batch_size, report_path, overwrite, backend, tf32, dtype, quiet):
    """Perplexity of MODEL (default: the bundled demo MoE), and its gap to --baseline."""
    from .stages.evaluate import evaluate
    from .stages.report import check_report_out, gap_table, protocol_text, write_report

    if report_path is not None:
        check_report_out(report_path, overwrite)  # before the work, not after it
    report = evaluate(model, baseline=baseline, data=data, seqlen=seqlen, device=device, batch_size=batch_size,
                      quiet=quiet, backend=backend, tf32=tf32, dtype=dtype)
    if baseline is not None:
        click.echo(gap_table(report))
    else:
        click.echo(f"perplexity {report['results']['model']['perplexity']:.4f}")
    click.echo(protocol_text(report))
    if report_path is not None:
        write_report(report, report_path, overwrite)
        click.echo(f"wrote {report_path}")


def _job_keys_text() -> str:
    """`quantmoe batch --help`'s paragraph of job keys, from the fields of base.options (job_keys)."""
    recipes = "; ".join(f"{who}: {', '.join(o.key for o in options_of(record) if o.job)}"
                        for who, record in RECIPES.items())
    run = ", ".join(o.key for o in options_of(RunOptions) if o.job)
    return f"Other job keys: the backend's settings ({recipes}) and the run options {run}."


BATCH_HELP = """Quantize every job of JOBS_FILE (TOML, or YAML), one after another.

\b
[defaults]                      # optional, applied to every job
calib = "calib.jsonl"           # relative paths: beside the jobs file first
eval_data = "heldout.jsonl"
seqlen = 512                    # calibration sequence length
[[jobs]]
name = "mix-gptq-int4"          # output folder ROOT/<name>
model = "models/mixtral-demo"
backend = "gptq"
bits = 4
group_size = 128
[matrix]                        # models x recipes, jobs named <model>-<recipe>
models = ["models/a", "models/b"]
recipes = [{backend = "gptq", bits = 4}, {name = "rtn", backend = "rtn"}, {backend = "bnb-nf4"}]

""" + _job_keys_text() + """ Hyphens may stand for underscores. A [defaults] setting reaches only the jobs whose
backend takes it. A job whose folder is complete (manifest valid, same backend and options) is skipped; an
unfinished one is run again, continuing from its finished layers. A failed job does not stop the others. Exit
status: 0 when every job is done or skipped, 1 when a job failed (with --summary: or has not run yet), 2 when the
jobs file is wrong, 130 when interrupted.
"""


@main.command(help=BATCH_HELP)
@click.argument("jobs_file", type=click.Path(path_type=Path))
@click.option("--out", "root", type=click.Path(path_type=Path), default=Path("quantmoe-out"), show_default=True,
              help="Root folder; each job writes ROOT/<name>, and the summary goes to ROOT/batch_summary.{md,json}.")
@click.option("--dry-run", is_flag=True, help="Check the jobs file and show what each job would do; run nothing.")
@click.option("--quiet", is_flag=True, help="No layer progress bars (the one-line job progress stays).")
@click.option("--shard", metavar="i/N",
              help="Run only worker i's share of N (i from 0): job k of the file, counted from 0, is worker "
                   "k mod N's. Its summary goes to ROOT/batch_summary.shard-i-of-N.{md,json}; when its share is "
                   "done it merges every share's into ROOT/batch_summary.{md,json} (docs/distributed.md).")
@click.option("--summary", "merge", is_flag=True,
              help="Run nothing: merge the summaries the --shard workers wrote in ROOT into "
                   "ROOT/batch_summary.{md,json}.")
@friendly
def batch(jobs_file, root, dry_run, quiet, shard, merge):
    # The help text is BATCH_HELP, whose list of job keys is generated from base.options.
    from .apps.batch import (
        Shard,
        load_jobs,
        merge_summaries,
        plan,
        run_batch,
        summary_name,
    )

    share = Shard.parse(shard) if shard is not None else None
    if merge and (share or dry_run):
        raise QuantMoeError("--summary merges every share's summary and runs nothing; drop --shard and --dry-run")
    jobs = load_jobs(jobs_file)
    if dry_run:
        if share:
            click.echo(share.describe(jobs))
        for job, action in plan(share.take(jobs) if share else jobs, root):
            click.echo(f"{job.name}: {action} ({job.recipe()} of {job.model})")
        return
    summary = merge_summaries(jobs, root, jobs_file) if merge else \
        run_batch(jobs, root, jobs_file, quiet=quiet, log=lambda line: click.echo(line, err=True), shard=share)
    md = Path(summary["root"]) / f"{summary_name(share)}.md"
    click.echo(md.read_text())
    c, n = summary["counts"], len(summary["jobs"])
    if c["failed"]:
        click.echo(f"error: {c['failed']} of {n} jobs failed (see {md})", err=True)
        sys.exit(1)
    if c["pending"]:
        click.echo(f"error: {c['pending']} of {n} jobs have not run yet (no share's summary lists them; see {md})",
                   err=True)
        sys.exit(1)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--revision", help="Branch to upload to (created if missing) [default: main].")
@click.option("--dry-run", is_flag=True, help="Validate and list the files, upload nothing.")
@friendly
def push(folder, repo_id, private, revision, dry_run):
    """Validate the export FOLDER and upload it to the Hub repo REPO_ID.

    Refuses a folder whose files do not match manifest.json, that holds stray files, whose
    config.json has no quantization_config, or whose README.md model card does not state the
    base model, method, calibration data, eval protocol, perplexity table, bits per weight and
    how to load it. The token comes from HF_TOKEN or `hf auth login`. Needs quantmoe[hub].
    """
    from .apps.publish import push as run

    url = run(folder, repo_id, private=private, revision=revision, dry_run=dry_run, log=click.echo)
    if url:
        click.echo(f"uploaded: {url}")


@main.command()
@click.argument("baseline", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option("--max-gap-increase", type=float, default=0.5, show_default=True, metavar="PP",
              help="Largest allowed rise of the relative perplexity gap, in percentage points: the new "
                   "(ppl_quantized/ppl_original - 1) x 100 may exceed the baseline's by at most PP "
                   "(baseline +3.50%, new +4.10% is +0.60 pp).")
@click.option("--max-ppl-increase", type=float, metavar="PCT",
              help="Largest allowed rise of the quantized perplexity itself, in percent of the baseline's "
                   "[default: not checked].")
@friendly
def regress(baseline, new, max_gap_increase, max_ppl_increase):
    """Compare the eval report NEW with BASELINE; exit 1 on a regression.

    BASELINE and NEW are eval_report.json files (or folders holding one), e.g. a report
    committed under eval/results/. Reports of different models (base model name or original
    perplexity), protocols (any protocol field) or eval data (text sha256, tokenizer, token
    counts) are refused with exit status 2, naming the field that differs.
    """
    from .apps.regress import compare, load_report

    result = compare(load_report(baseline), load_report(new), max_gap_increase, max_ppl_increase)
    click.echo(result.markdown())
    if result.regressions:
        sys.exit(1)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@friendly
def verify(folder):
    """Check an exported checkpoint: manifest hashes, index, shapes and dtypes against the config,
    NaN/Inf, all-zero modules (GPTQ; bitsandbytes and compressed-tensors linears are read back
    through their backend). Exits 1 with the list of problems, 0 when sound."""
    from .apps.verify import verify as run

    report = run(folder)
    if report.problems:
        for problem in report.problems:
            click.echo(f"- {problem}")
        fail(f"{len(report.problems)} problem(s) found in {folder}; re-export it or restore it from a good copy", 1)
    click.echo(report.summary())


@main.command()
@click.argument("model", required=False)
@click.option("--backends", "specs", default="gptq-int4,rtn-int4,bnb-nf4,bnb-int8", show_default=True,
              help="Comma-separated: gptq-int4, gptq-int8, rtn-int4, rtn-int8, bnb-nf4, bnb-fp4, bnb-int8.")
@click.option("--out", type=click.Path(path_type=Path), help="Folder for one subfolder per backend and compare.json/.md "
              "[default: quantmoe-out/compare-<model>].")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Also write the table here (JSON, and .md beside it), e.g. eval/results/compare-<model>.json.")
@click.option("--data", help="Held-out text [default: the bundled held-out text].")
@click.option("--seqlen", type=int, help="Eval window and calibration length [default: min(2048, context)].")
@click.option("--calib", help="Calibration data for gptq/rtn [default: the bundled calibration text].")
@click.option("--nsamples", type=int, help="Calibration sequences for gptq/rtn [default: 128].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", type=int, default=None,
              help="Sequences per forward pass [default: the largest up to 8 whose attention scores fit 2 GiB].")
@friendly
def compare(model, specs, out, report_path, data, seqlen, calib, nsamples, seed, device, batch_size):
    """Quantize MODEL with several backends and write one table: size, bits, fraction quantized, perplexity, time, memory."""
    from .apps.compare import compare as run

    options = RunOptions(calib=calib, nsamples=nsamples, seed=seed, device=device, batch_size=batch_size, quiet=True)
    table = run(model, specs.split(","), out, options, data=data, seqlen=seqlen, report=report_path)
    click.echo(_table_only(table))
    failed = [r for r in table["rows"] if "error" in r]
    for r in failed:
        click.echo(f"error: {r['backend']}: {r['error']}", err=True)
    click.echo(f"wrote {Path(table['out']) / 'compare.json'}" + (f" and {report_path}" if report_path else ""))
    if failed:
        sys.exit(2)


def _table_only(table: dict) -> str:
    from .apps.compare import render_markdown

    return "\n".join(line for line in render_markdown(table).splitlines() if line.startswith("|"))


@main.command("inspect")
@click.argument("model", required=False)
@click.option("--bits", type=int, default=4, show_default=True, help="4 or 8, for the size estimate.")
@click.option("--group-size", type=int, default=128, show_default=True, help="-1, 32, 64 or 128, for the size estimate.")
@click.option("--mtp", type=click.Choice(["keep", "drop"]), default="keep", show_default=True,
              help="Count the multi-token-prediction layers in the estimate (keep) or not (drop), as quantize --mtp.")
@click.option("--recipe", default="", metavar="FILE|experts-only|attention-int8",
              help="Estimate each linear at its own settings, as quantize --recipe.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@friendly
def inspect_(model, bits, group_size, mtp, recipe, as_json):
    """Classify every tensor of MODEL (attention, routed/shared expert, router, dense MLP, not quantized)
    and estimate its size at --bits/--group-size, reading only headers (default: the bundled demo MoE)."""
    import json

    from .apps.inspection import inspect_model, render_text
    from .base.paths import DEFAULT_MODEL

    report = inspect_model(model if model is not None else DEFAULT_MODEL, bits, group_size, mtp, recipe)
    click.echo(json.dumps(report, indent=2) if as_json else render_text(report))


if __name__ == "__main__":
    main()
