"""quantmoe regress: two eval reports of the same model, protocol and data compared with the
gap/perplexity limits; anything else refused, naming the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantmoe.base.options import QuantConfig
from quantmoe.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tiny_rtn_export) -> dict:
    """A real eval_report.json, from quantize on a tiny MoE."""
    return json.loads((tiny_rtn_export / "eval_report.json").read_text())


def regress(tmp_path: Path, baseline: dict, new: dict, *options):
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))
    (tmp_path / "new.json").write_text(json.dumps(new))
    return CliRunner().invoke(main, ["regress", str(tmp_path / "baseline.json"), str(tmp_path / "new.json"), *options])


def worse(report: dict, gap_pp: float) -> dict:
    """``report`` with the quantized perplexity raised so that the relative gap grows by gap_pp points."""
    new = copy.deepcopy(report)
    orig = new["results"]["original"]["perplexity"]
    rel = new["gap"]["relative"] + gap_pp / 100
    new["results"]["quantized"]["perplexity"] = orig * (1 + rel)
    new["gap"] = {"absolute": orig * rel, "relative": rel}
    return new


def test_identical_reports_pass(report, tmp_path):
    result = regress(tmp_path, report, report)
    assert result.exit_code == 0, result.output
    assert "| gap (relative) |" in result.output and "+0.000 pp" in result.output and "no regression" in result.output


def test_the_kl_and_the_gaps_error_are_shown_and_older_reports_still_compare(report, tmp_path):
    """Reports carry the KL to the original and the gap's standard error; regress shows both (a higher
    KL alone is no regression: no limit applies to it), and a report from before they existed still
    compares, without those rows."""
    assert report["kl"]["mean"] > 0 and 0 < report["kl"]["top1_agreement"] <= 1 and report["gap"]["relative_se"] > 0
    higher = copy.deepcopy(report)
    higher["kl"] = {**report["kl"], "mean": 2 * report["kl"]["mean"] + 0.01}
    result = regress(tmp_path, report, higher)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| KL to the original"))
    assert f"{1000 * report['kl']['mean']:.2f} ± {1000 * report['kl']['se']:.2f}" in row
    assert f"+{1000 * (report['kl']['mean'] + 0.01):.2f} |" in row
    assert f"± {100 * report['gap']['relative_se']:.3f}" in result.output
    old = copy.deepcopy(report)
    del old["kl"], old["gap"]["relative_se"]
    result = regress(tmp_path, old, report)
    assert result.exit_code == 0, result.output
    assert "KL to the original" not in result.output and "no regression" in result.output


def test_max_gap_increase_is_in_percentage_points_of_relative_gap(report, tmp_path):
    assert regress(tmp_path, report, worse(report, 0.4)).exit_code == 0
    result = regress(tmp_path, report, worse(report, 0.6))
    assert result.exit_code == 1
    assert "REGRESSION" in result.output and "grew by 0.600 pp" in result.output
    assert regress(tmp_path, report, worse(report, 0.6), "--max-gap-increase", "1").exit_code == 0
    # an improvement is never a regression
    assert regress(tmp_path, worse(report, 2.0), report).exit_code == 0


def test_max_ppl_increase_is_percent_of_the_baseline_quantized_perplexity(report, tmp_path):
    new = worse(report, 0.3)
    rise = 100 * (new["results"]["quantized"]["perplexity"] / report["results"]["quantized"]["perplexity"] - 1)
    assert regress(tmp_path, report, new, "--max-ppl-increase", f"{rise + 0.01}").exit_code == 0
    result = regress(tmp_path, report, new, "--max-ppl-increase", f"{rise - 0.01}")
    assert result.exit_code == 1 and "quantized perplexity rose" in result.output


def test_a_committed_baseline_from_another_machine_compares(report, tmp_path):
    """Paths differ between machines (eval/results/ vs a CI checkout); the text hash decides."""
    moved = copy.deepcopy(report)
    moved["protocol"]["data"] = moved["data"]["path"] = "/home/runner/work/quantmoe/eval/data/heldout.jsonl"
    moved["baseline"] = f"/home/runner/work/quantmoe/models/{Path(report['baseline']).name}"
    moved["model"] = "/home/runner/out/q"
    moved["results"]["original"]["perplexity"] *= 1 + 1e-6  # another CPU's float rounding
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "eval_report.json").write_text(json.dumps(moved))
    (tmp_path / "baseline.json").write_text(json.dumps(report))
    result = CliRunner().invoke(main, ["regress", str(tmp_path / "baseline.json"), str(tmp_path / "new")])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("edit, field", [
    (lambda r: r["protocol"].update(seqlen=r["protocol"]["seqlen"] * 2), "protocol.seqlen"),
    (lambda r: r["protocol"].update(dtype="bfloat16"), "protocol.dtype"),
    (lambda r: r["protocol"].update(windows="sliding, stride 512"), "protocol.windows"),
    (lambda r: r["data"].update(text_sha256="0" * 64), "data.text_sha256"),
    (lambda r: r["data"].update(tokenizer_fingerprint="feedface"), "data.tokenizer_fingerprint"),
    (lambda r: r.update(baseline="/models/tiny-qwen"), "baseline (the original model)"),
    (lambda r: r["results"]["original"].update(perplexity=r["results"]["original"]["perplexity"] * 1.01),
     "results.original.perplexity"),
])
def test_mismatched_reports_are_refused_naming_the_field(report, tmp_path, edit, field):
    other = copy.deepcopy(report)
    edit(other)
    result = regress(tmp_path, report, other)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: refusing to compare: {field} differs") and result.stderr.count("\n") == 1


def test_an_original_that_is_not_the_source_is_said_in_eval_and_regress(report, tiny_model, tiny_rtn_export, tmp_path):
    """eval --baseline checks the baseline against the source the export's manifest records: its own source is
    stated (as quantize's report states it), another model of the same tokenizer gives a note, the report's
    baseline_is_source False and a line in its Markdown; regress compares such a report with a note naming it."""
    from tiny import make_model

    from quantmoe.stages.report import render_markdown

    assert report["baseline_is_source"] is True
    other = make_model("mixtral", tmp_path / "other", seed=1)
    data = tiny_rtn_export.parent / "heldout.jsonl"
    runs = {}
    for name, baseline in (("own", tiny_model("mixtral")), ("other", other)):
        result = CliRunner().invoke(main, ["eval", str(tiny_rtn_export), "--baseline", str(baseline), "--data",
                                           str(data), "--seqlen", "32", "--quiet", "--report",
                                           str(tmp_path / f"{name}.json")])
        assert result.exit_code == 0, result.output
        runs[name] = (result.stderr, json.loads((tmp_path / f"{name}.json").read_text()))
    assert runs["own"][1]["baseline_is_source"] is True and "note:" not in runs["own"][0]
    stderr, odd = runs["other"]
    assert odd["baseline_is_source"] is False
    assert f"note: the baseline {other} is not the model {tiny_rtn_export} was quantized from" in stderr
    assert "**Baseline.**" in render_markdown(odd) and "**Baseline.**" not in render_markdown(runs["own"][1])
    result = regress(tmp_path, runs["own"][1], {**odd, "baseline": runs["own"][1]["baseline"]})
    assert result.exit_code == 2 and "results.original.perplexity differs" in result.output  # told apart as well
    result = regress(tmp_path, runs["own"][1], {**runs["own"][1], "baseline_is_source": False})
    assert result.exit_code == 0 and "note: the new report's original is not the model it was quantized from" \
        in result.output


def test_a_report_without_original_run_is_refused(report, tmp_path):
    single = copy.deepcopy(report)
    single["results"] = {"model": single["results"]["quantized"]}
    single.pop("gap")
    result = regress(tmp_path, report, single)
    assert result.exit_code == 2 and "the new report has no original-model run" in result.stderr
    # two single-model reports compare on perplexity alone, when asked to
    assert regress(tmp_path, single, single).exit_code == 2
    assert regress(tmp_path, single, single, "--max-ppl-increase", "0.5").exit_code == 0


def test_not_a_report_is_refused(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    result = CliRunner().invoke(main, ["regress", str(tmp_path / "x.json"), str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "is not a quantmoe eval report (no 'protocol')" in result.stderr


def _ci_doc() -> tuple[list[dict], list[str], str]:
    """docs/ci-regression.md: the workflow's steps, its quantmoe commands, and the baseline's bash block."""
    import re

    import yaml

    doc = (REPO / "docs" / "ci-regression.md").read_text()
    steps = yaml.safe_load(re.search(r"```yaml\n(.*?)```", doc, re.S).group(1))["jobs"]["regress"]["steps"]
    runs = [s["run"] for s in steps if "run" in s]
    commands = [line.split("|")[0].strip() for r in runs for line in r.replace("\n", " ").split("&&")
                if line.strip().startswith("quantmoe ")]
    return steps, commands, re.search(r"```bash\n(.*?)```", doc, re.S).group(1)


def test_ci_doc_workflow_is_valid_and_matches_the_baseline_recipe():
    """docs/ci-regression.md: the workflow parses, pins CPU torch, and its quantmoe commands parse
    with the real CLI; the baseline is made with the very quantize command CI runs."""
    import shlex

    steps, commands, baseline_block = _ci_doc()
    assert any("pip install torch==2.13.0" in s["run"] and "whl/cpu" in s["run"] for s in steps if "run" in s)
    assert [c.split()[1] for c in commands] == ["quantize", "regress"]
    for command in commands:
        _, name, *args = shlex.split(command)
        main.get_command(None, name).make_context(name, args)  # raises on an unknown option or bad value
    assert commands[0] in baseline_block
    _, _, committed, produced, *_ = shlex.split(commands[1])
    assert committed.startswith("eval/results/") and f"cp {produced} {committed}" in baseline_block


def test_the_committed_ci_baseline_matches_what_the_ci_command_produces():
    """The baseline the CI example compares with is committed, and describes the run CI makes: the report
    quantize writes for the bundled demo model (default recipe, default output folder), on the bundled
    held-out text and tokenizer as they are now. Changing that text or the defaults needs a new baseline."""
    import hashlib
    import shlex

    from quantmoe.apps.regress import compare, load_report
    from quantmoe.base.paths import DEFAULT_MODEL, EVAL_DATA, default_seqlen
    from quantmoe.model.checkpoint import Checkpoint
    from quantmoe.stages.calibrate import read_documents, tokenizer_fingerprint
    from quantmoe.stages.gptq_method import default_out
    from quantmoe.stages.report import base_model_name

    _, commands, _ = _ci_doc()
    params = main.get_command(None, "quantize").make_context("quantize", shlex.split(commands[0])[2:]).params
    _, _, committed, produced, *_ = shlex.split(commands[1])
    # the README's default run: bundled model and data, default recipe and output folder, CPU
    assert (params["model"], params["out"], params["calib"], params["nsamples"], params["eval_data"]) == (None,) * 5
    assert (params["backend"], params["bits"], params["group_size"], params["seed"], params["device"]) == (
        "gptq", 4, 128, 0, "cpu")
    assert Path(produced) == default_out(DEFAULT_MODEL, QuantConfig()) / "eval_report.json"
    report = load_report(REPO / committed)
    demo = Checkpoint(DEFAULT_MODEL)
    assert base_model_name(report["baseline"]) == DEFAULT_MODEL.name
    assert report["quantization"]["label"] == "gptq int4 g128" and report["device"] == "cpu"
    assert report["protocol"]["seqlen"] == default_seqlen(demo.config)
    assert report["data"]["text_sha256"] == hashlib.sha256("\n\n".join(read_documents(EVAL_DATA)).encode()).hexdigest()
    assert report["data"]["tokenizer_fingerprint"] == tokenizer_fingerprint(demo.tokenizer())
    assert (REPO / committed).with_suffix(".md").is_file()
    assert not compare(report, report).regressions
