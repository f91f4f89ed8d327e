"""Stage 5, for every backend: the finish sequence that turns finished layers into ``--out``.

Into the staging folder ``<work>/export`` (``staging_dir``), where the export has written the shards
and config beside the layers (export.BackgroundExport): ``quantization_log.json``, the optional
evaluation (``eval_report.json`` / ``.md``), the model card ``README.md`` and ``manifest.json``
(sha256 of every file); then one atomic rename over ``--out`` and the work folder is removed. On any
exception (disk full, Ctrl-C, a failed eval) the partial export is dropped, since it may be what filled
the disk, and the finished layers are kept, so the same command resumes at the export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from ..base.files import (
    atomic_write_json,
    atomic_write_text,
    file_hashes,
    replace_dir,
    write_manifest,
)
from ..base.measure import stage
from .evaluate import evaluate
from .report import render_markdown


def staging_dir(work: Path) -> Path:
    """Where a run's export is staged before it is renamed over --out."""
    return work / "export"


def finalize(work: Path, out: Path, hashed: dict[str, str], log: dict, manifest: dict,
             model_card: Callable[[dict | None, dict], str], card_info: dict, evaluation: dict | None,
             overwrite: bool, stages: dict, shown_out: str) -> dict | None:
    """Finish the export in ``staging_dir(work)`` and rename it over ``out``; returns the eval report.

    ``hashed``: the sha256 of the files the export hashed as it wrote them (by name in the staging folder),
    which manifest.json records without reading them again. ``log``: quantization_log.json (its
    ``fallbacks`` are copied into the eval report). ``manifest``: what manifest.json records besides the
    files and ``stages``. ``model_card(report, info)``: the README, with ``info`` = ``card_info`` plus the
    export's ``quantization_config``. ``evaluation``: evaluate's keyword arguments (baseline, data, device,
    batch_size, quiet, record_paths), or None for no eval. ``stages``: timings so far; "manifest" (hashing
    the files) is added.
    ``shown_out``: how the eval report names ``out`` (its folder name, or its path with --record-paths).
    """
    staging = staging_dir(work)
    try:
        atomic_write_json(staging / "quantization_log.json", log)
        report = None
        if evaluation is not None:
            report = evaluate(staging, source=(manifest.get("inputs") or {}).get("model"), **evaluation)
            report["model"] = shown_out
            report["fallbacks"] = log["fallbacks"]
            report["stages"] = {**stages, **report["stages"]}
            atomic_write_json(staging / "eval_report.json", report)
            atomic_write_text(staging / "eval_report.md", render_markdown(report))
        qconfig = json.loads((staging / "config.json").read_text())["quantization_config"]
        atomic_write_text(staging / "README.md", model_card(report, {**card_info, "quantization_config": qconfig}))
        with stage(stages, "manifest"):  # hashed apart from the write, so that manifest.json records its time
            files = file_hashes(staging, hashed)
        write_manifest(staging, {**manifest, "stages": stages}, files)
        replace_dir(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return report
