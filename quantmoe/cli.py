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
from .base.options import BACKEND_NAMES

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
            if isinstance(exc, MemoryError):
                fail("out of memory; lower --batch-size or --nsamples, or use --device cuda")
            if _gpu_out_of_memory(exc):
                fail(GPU_OUT_OF_MEMORY)
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
BACKEND_SETTINGS = ("bits", "group_size", "sym", "act_order", "damp", "true_sequential", "rare_expert",
                    "rare_expert_tokens", "layout", "clip_steps", "clip_min", "clip_max", "clip_weight", "refine",
                    "expert_hessian", "fit", "mtp", "format", "recipe",
                    "compute_dtype", "double_quant", "int8_threshold")
CALIBRATION_OPTIONS = ("calib", "nsamples", "seqlen")


def _typed(ctx: click.Context, names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` given on the command line (not left at their defaults)."""
    return [n for n in names if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)]


@main.command()
@click.argument("model", required=False)
@click.option("--out", type=click.Path(path_type=Path),
              help="Output folder [default: quantmoe-out/<model>-<backend>-int<bits>-g<group>, or <model>-bnb-nf4 ...].")
@click.option("--backend", type=click.Choice(_backend_names()), default="gptq", show_default=True,
              help="gptq/rtn: GPTQ v1 checkpoint; bnb-*: bitsandbytes, experts included (pip install 'quantmoe[bnb]').")
@click.option("--bits", type=int, default=4, show_default=True, help="4 or 8.")
@click.option("--group-size", type=int, default=128, show_default=True, help="-1, 32, 64 or 128.")
@click.option("--sym/--asym", default=True, show_default=True)
@click.option("--act-order", type=click.Choice(["static", "group", "none"]), default="static", show_default=True,
              help="GPTQ's column order: by Hessian diagonal with static groups, group-aware, or natural.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="Dampening, fraction of mean(diag H).")
@click.option("--true-sequential/--no-true-sequential", default=True, show_default=True)
@click.option("--rare-expert", type=click.Choice(["blend", "all-tokens", "rtn"]), default="blend", show_default=True,
              help="Hessian fallback for experts that see few calibration tokens.")
@click.option("--rare-expert-tokens", type=int, default=0, show_default=True,
              help="Routed tokens below which the fallback applies; 0 = the expert's widest input size.")
@click.option("--layout", type=click.Choice(["source", "gptqmodel"]), default="source", show_default=True,
              help="Tensor names: the checkpoint's own (vLLM) or GPTQModel's (see docs/interop.md).")
@click.option("--clip-steps", type=int, default=20, show_default=True,
              help="Clipping ratios tried per group grid, keeping the one with the least Hessian-weighted error; 0 = min/max.")
@click.option("--clip-min", type=float, default=0.6, show_default=True, help="Smallest clipping ratio tried.")
@click.option("--clip-max", type=float, default=1.0, show_default=True, help="Largest clipping ratio tried.")
@click.option("--clip-weight", type=click.Choice(["residual", "hessian"]), default="residual", show_default=True,
              help="A column's error weight in the clipping search: what GPTQ cannot spread of it, or the Hessian diagonal.")
@click.option("--refine", type=int, default=0, show_default=True,
              help="Coordinate-descent passes over GPTQ's levels, each lowering the same error GPTQ minimises.")
@click.option("--expert-hessian", type=click.Choice(["routed", "weighted", "all"]), default="weighted", show_default=True,
              help="Tokens of a routed expert's Hessian: those routed to it, the same weighted by router score, or all.")
@click.option("--fit", type=click.Choice(["none", "mlp", "layer", "stream"]), default="stream", show_default=True,
              help="Fit linears to the original model's outputs: every linear from the quantized model's inputs "
                   "(stream: a full-precision stream runs beside, slower than none, with a copy of the layer and twice the "
                   "activations in memory); down_proj only, from the quantized gate/up (mlp); also o_proj and gate/up "
                   "on the layer's own inputs (layer); plain GPTQ (none: the least memory).")
@click.option("--mtp", type=click.Choice(["keep", "drop"]), default="keep", show_default=True,
              help="Layers stored beyond num_hidden_layers (multi-token prediction, DeepSeek-V3/GLM-4.5): "
                   "copy them unquantized in BF16, declared so loaders keep them so (keep), or leave them out (drop).")
@click.option("--format", type=click.Choice(["gptq", "compressed-tensors"]), default="gptq", show_default=True,
              help="gptq/rtn: on-disk format, GPTQ v1 or compressed-tensors pack-quantized (vLLM's native "
                   "WNA16 path); the same levels and scales (see docs/interop.md).")
@click.option("--recipe", default="", metavar="FILE|experts-only|attention-int8",
              help="gptq/rtn: per-module precision, a TOML file of [[rules]] (match = a source module name or "
                   "re:regex; bits, group_size, sym or skip = true; the first match wins) or a preset: experts-only "
                   "(attention, shared experts, dense MLPs in 16 bits), attention-int8 (see docs/interop.md).")
@click.option("--compute-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="bnb-nf4/fp4: dtype bitsandbytes multiplies in when the model is served.")
@click.option("--double-quant", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="bnb-nf4/fp4: quantize the 4-bit scales again (fewer bits per weight on large linears); "
                   "auto: where it makes the linear smaller.")
@click.option("--int8-threshold", type=float, default=6.0, show_default=True,
              help="bnb-int8: LLM.int8() outlier threshold used when served; 0 = no outlier columns.")
@click.option("--calib", help="Calibration text/JSONL file, folder, datasets name, or a token file from `quantmoe calibrate`.")
@click.option("--nsamples", type=int, help="Calibration sequences [default: 128].")
@click.option("--seqlen", type=int, help="Calibration sequence length [default: min(2048, context)].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--batch-size", type=int, default=None,
              help="Sequences per forward pass [default: the largest up to 8 whose attention scores fit 2 GiB].")
@click.option("--max-shard-size", default="2GB", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (only once the new one is complete; "
              "only a folder quantmoe wrote).")
@click.option("--record-paths", is_flag=True, help="Name the model, data and output by their local paths in the "
              "card, manifest, logs and eval report (for private use) [default: Hub id or folder name].")
@click.option("--resume/--restart", default=True, show_default=True,
              help="Reuse the finished layers a stopped run left in the work folder beside --out, or start from scratch.")
@click.option("--eval/--no-eval", "run_eval", default=True, show_default=True, help="Measure the perplexity gap after export.")
@click.option("--eval-data", help="Held-out text for --eval [default: the bundled held-out text].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--tf32/--no-tf32", default=False, show_default=True,
              help="TF32 matrix products for Hessians, forward passes and the evaluation on CUDA: faster, differs "
                   "by rounding only (the eval report states it).")
@click.option("--prefetch/--no-prefetch", default=True, show_default=True,
              help="Read the next layer from disk in a background thread.")
@click.option("--block-kernel", type=click.Choice(["auto", "triton", "cuda-graphs", "eager"]), default="auto",
              show_default=True,
              help="How GPTQ's column loop runs on CUDA (every choice gives the same bits): one Triton kernel "
                   "per block of columns, a CUDA-graph replay, or eager PyTorch; auto: Triton where it is "
                   "installed, else CUDA graphs (eager on CPU).")
@click.option("--gpu-memory", help="Device memory the run may use, e.g. 40GB: a layer's experts are quantized in "
              "groups that fit it, with the same output for any budget [default: what the GPU has free].")
@click.option("--host-memory", help="Host memory the run may hold, e.g. 32GB: the read-ahead of the next layer and "
              "the pinned copies of captured activations are sized to it, with the same output for any budget "
              "[default: what the machine has available].")
@click.pass_context
@friendly
def quantize(ctx, model, out, backend, calib, nsamples, seqlen, seed, device, batch_size, max_shard_size, overwrite,
             record_paths, resume, run_eval, eval_data, quiet, tf32, prefetch, block_kernel, gpu_memory, host_memory,
             **settings):
    """Quantize MODEL (a checkpoint folder or Hub id; default: the bundled demo MoE).

    Under `torchrun --nproc-per-node N -m quantmoe quantize ...` each layer's experts are
    spread over the N processes (one GPU each, or CPU processes over gloo), on one node or
    several (--nnodes; docs/distributed.md); rank 0 writes, and a stopped run resumes.
    """
    from .backends import Options, get

    chosen = get(backend)
    config = chosen.configure(**{k: settings[k] for k in _typed(ctx, BACKEND_SETTINGS)})
    if not chosen.needs_calibration:
        for name in _typed(ctx, CALIBRATION_OPTIONS):
            click.echo(f"note: {backend} uses no calibration data; --{name} is ignored", err=True)
    options = Options(config=config, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device,
                      max_shard_size=max_shard_size, overwrite=overwrite, resume=resume, run_eval=run_eval,
                      eval_data=eval_data, batch_size=batch_size, quiet=quiet, tf32=tf32, prefetch=prefetch,
                      block_kernel=block_kernel, gpu_memory=gpu_memory, record_paths=record_paths,
                      host_memory=host_memory)
    from .model.distributed import (  # these import torch: after the cheap option checks
        Ranks,
        leave,
    )

    ranks = Ranks.from_env(os.environ)
    try:
        summary = chosen.quantize(model, out, options)
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
@click.option("--quiet", is_flag=True)
@friendly
def eval_(model, baseline, data, seqlen, device, batch_size, report_path, overwrite, backend, tf32, quiet):
    """Perplexity of MODEL (default: the bundled demo MoE), and its gap to --baseline."""
    from .stages.evaluate import evaluate
    from .stages.report import check_report_out, gap_table, protocol_text, write_report

    if report_path is not None:
        check_report_out(report_path, overwrite)  # before the work, not after it
    report = evaluate(model, baseline=baseline, data=data, seqlen=seqlen, device=device, batch_size=batch_size,
                      quiet=quiet, backend=backend, tf32=tf32)
    if baseline is not None:
        click.echo(gap_table(report))
    else:
        click.echo(f"perplexity {report['results']['model']['perplexity']:.4f}")
    click.echo(protocol_text(report))
    if report_path is not None:
        write_report(report, report_path, overwrite)
        click.echo(f"wrote {report_path}")


@main.command()
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
    """Quantize every job of JOBS_FILE (TOML, or YAML), one after another.

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

    Other job keys: the backend's settings (gptq/rtn: sym, act_order, damp, true_sequential,
    rare_expert, rare_expert_tokens, block_size, layout; bnb-*: compute_dtype, double_quant,
    int8_threshold) and nsamples, seed, device, batch_size, max_shard_size, eval. A [defaults]
    setting reaches only the jobs whose backend takes it. A job whose folder is complete
    (manifest valid, same backend and options) is skipped; an unfinished one is run again
    (gptq/rtn continue from their finished layers). A failed job does not stop the others. Exit
    status: 0 when every job is done or skipped, 1 when a job failed (with --summary: or has not
    run yet), 2 when the jobs file is wrong, 130 when interrupted.
    """
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
    from .backends import Options

    options = Options(calib=calib, nsamples=nsamples, seed=seed, device=device, batch_size=batch_size, quiet=True)
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
