"""The one options model (base/options.py) and what is derived from it: the options of
``quantmoe quantize``, the keys of a batch jobs file (and ``quantmoe batch --help``), and the
keyword options of ``stages.quantize.quantize``. A field added to QuantConfig, BnbConfig or
RunOptions reaches all of them, or a test here fails."""

from __future__ import annotations

import inspect
import re
from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

from quantmoe import backends
from quantmoe.apps import batch
from quantmoe.base.errors import QuantMoeError
from quantmoe.base.options import (
    RECIPES,
    BnbConfig,
    QuantConfig,
    RunOptions,
    job_keys,
    options_of,
    run_options,
)
from quantmoe.cli import BACKEND_SETTINGS, CALIBRATION_OPTIONS, main

RECORDS = (QuantConfig, BnbConfig, RunOptions)
# The command's own arguments, not fields of a record.
COMMAND_OWN = {"model", "out", "backend"}
# Fields that are deliberately not options of `quantmoe quantize`: fixed by --backend, or Python/jobs-file only.
NOT_ON_THE_COMMAND_LINE = {"backend", "quant_type", "block_size", "blocksize"}
# Fields that are deliberately not job keys: fixed by `backend`, or the batch's own.
NOT_JOB_KEYS = {"backend", "quant_type", "overwrite", "resume", "quiet"}
# Every flag `quantmoe quantize` had before the options were derived: users' scripts spell them so.
FLAGS = {
    "--out", "--backend", "--bits", "--group-size", "--sym", "--asym", "--act-order", "--damp", "--true-sequential",
    "--no-true-sequential", "--rare-expert", "--rare-expert-tokens", "--layout", "--clip-steps", "--clip-min",
    "--clip-max", "--clip-weight", "--refine", "--expert-hessian", "--fit", "--compute-dtype", "--double-quant",
    "--int8-threshold", "--calib", "--nsamples", "--seqlen", "--seed", "--device", "--batch-size", "--max-shard-size",
    "--overwrite", "--resume", "--restart", "--eval", "--no-eval", "--eval-data", "--quiet", "--tf32", "--no-tf32",
    "--prefetch", "--no-prefetch", "--block-kernel", "--mtp", "--record-paths", "--gpu-memory",
    "--format", "--recipe", "--host-memory", "--hessian-dtype",
}


def _all_fields() -> set[str]:
    """Every field one sets (not those derived from others: QuantConfig.rules, read from its recipe)."""
    return {f.name for record in RECORDS for f in fields(record) if f.init}


def _quantize_params() -> dict[str, click.Parameter]:
    return {p.name: p for p in main.commands["quantize"].params if p.name != "help"}


def test_no_field_is_declared_twice():
    names = [f.name for record in RECORDS for f in fields(record)]
    assert len(names) == len(set(names))


def test_the_quantize_command_has_an_option_per_field_with_its_spelling_default_and_choices():
    params = _quantize_params()
    assert set(params) == COMMAND_OWN | (_all_fields() - NOT_ON_THE_COMMAND_LINE)
    assert {o.name for r in RECORDS for o in options_of(r) if not o.cli} == NOT_ON_THE_COMMAND_LINE
    assert {flag for p in params.values() if isinstance(p, click.Option) for flag in (*p.opts, *p.secondary_opts)} \
        == FLAGS
    for record in RECORDS:
        for o in options_of(record):
            if not o.cli:
                continue
            p = params[o.name]
            assert [*p.opts, *p.secondary_opts] == o.flag.split("/"), o.name
            assert p.default == o.default == getattr(record(), o.name), o.name
            if o.choices:
                assert tuple(p.type.choices) == o.choices, o.name
            assert p.help == o.help
    # The settings passed to a backend are exactly its recipes' command-line fields, and each backend's
    # settings are fields of a recipe.
    assert set(BACKEND_SETTINGS) == {o.name for r in RECIPES.values() for o in options_of(r) if o.cli}
    assert set(CALIBRATION_OPTIONS) == {"calib", "nsamples", "seqlen"}
    recipe_fields = {f.name for r in RECIPES.values() for f in fields(r)}
    for backend in backends.registry().values():
        assert backend.settings() <= recipe_fields, backend.name


def test_the_batch_keys_are_the_fields_and_the_help_lists_every_one():
    keys = batch.key_types()
    assert set(keys) == {"name", "model", "backend"} | (_all_fields() - NOT_JOB_KEYS)
    assert keys == job_keys()
    assert {o.name for r in RECORDS for o in options_of(r) if not o.job} == NOT_JOB_KEYS
    assert keys["act_order"] == (str, bool) and keys["damp"] == (int, float) and keys["calib"] == (str,)
    assert keys["max_shard_size"] == (str, int) and keys["run_eval"] == (bool,)
    # every backend's settings are job keys
    assert set().union(*(b.settings() for b in backends.registry().values())) == set(batch.setting_types())
    assert batch.ALIASES == {"eval": "run_eval"}
    text = " ".join(CliRunner().invoke(main, ["batch", "--help"]).output.split())
    listed = set(re.findall(r"[a-z0-9_]+", text.split("Other job keys:")[1].split(". ")[0]))
    assert {o.key for r in RECORDS for o in options_of(r) if o.job} <= listed


def test_a_jobs_file_sets_a_run_option_and_its_choices_are_checked(tmp_path):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[jobs]]\nname = "a"\nmodel = "m"\ntf32 = true\nblock-kernel = "eager"\neval = false\n')
    job = batch.load_jobs(jobs)[0]
    assert job.options() == RunOptions(tf32=True, block_kernel="eager", run_eval=False, overwrite=False)
    jobs.write_text('[[jobs]]\nname = "a"\nmodel = "m"\ndevice = "tpu"\n')
    with pytest.raises(QuantMoeError, match=r"job 'a': --device tpu is unknown; use one of auto, cpu, cuda"):
        batch.load_jobs(jobs)


def test_quantize_takes_the_run_options_as_keywords_and_names_a_wrong_one(tmp_path):
    from quantmoe.stages.quantize import quantize

    signature = inspect.signature(quantize)
    assert [p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY] == ["ranks"]
    assert run_options(**{o.name: o.default for o in options_of(RunOptions)}) == RunOptions()
    out = tmp_path / "out"
    with pytest.raises(QuantMoeError) as err:
        quantize(None, out, QuantConfig(), nsample=4, quiet=True)
    assert "unknown option 'nsample'" in str(err.value) and "nsamples" in str(err.value)
    assert "\n" not in str(err.value)
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(QuantMoeError, match="--block-kernel warp is unknown"):
        run_options(block_kernel="warp")


@pytest.mark.parametrize(("settings", "message"), [
    ({"damp": float("nan")}, "--damp nan is out of range"),
    ({"refine": -1}, "--refine -1 is invalid"),
    ({"block_size": 0}, "block_size 0 is invalid; use a positive number of columns"),
    ({"rare_expert_tokens": -3}, "--rare-expert-tokens -3 is invalid; use 0"),
])
def test_numbers_out_of_range_are_refused_naming_the_option(settings, message):
    """A negative rare-expert threshold silently turned the fallback off, and a block of 0 columns failed inside
    GPTQ; each is refused with the option and a value that works."""
    with pytest.raises(QuantMoeError, match=message):
        QuantConfig(**settings)


def test_rtn_is_a_property_of_the_recipe():
    assert QuantConfig().uses_hessians and QuantConfig().effective_fit == "stream"
    rtn = QuantConfig(backend="rtn", fit="layer")
    assert not rtn.uses_hessians and rtn.effective_fit == "none" and rtn.fit == "layer"


@pytest.mark.parametrize(("record", "settings", "message"), [
    (QuantConfig, {"fit": "all"}, "--fit all is unknown; use one of none, mlp, layer, stream"),
    (QuantConfig, {"act_order": "random"}, "--act-order random is unknown"),
    (BnbConfig, {"compute_dtype": "int4"}, "--compute-dtype int4 is unknown; use one of bfloat16, float16, float32"),
    (RunOptions, {"device": "tpu"}, "--device tpu is unknown"),
])
def test_choices_are_checked_from_the_declaration(record, settings, message):
    with pytest.raises(QuantMoeError, match=message):
        record(**settings)
    assert QuantConfig(act_order=False).act_order == "none"  # the boolean form of earlier versions
