"""Fuzzing the untrusted inputs (issue 23): generated malformed configs, indexes, safetensors
headers, eval reports, calibration files and jobs files, each given to the command that reads it.

Every generated input is malformed by construction, so every run must end in one ``error:`` line
that names the problem (not the CLI's catch-all "internal error"), a non-zero exit, no traceback,
no hang past its time limit, and an untouched previous output. Commands run in this process
(click's runner), so the suite stays within a minute; examples are derandomized, so CI sees the
same ones on every run.

Needs hypothesis (``pip install -e '.[test]'``); skipped without it.
"""

from __future__ import annotations

import json
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz suite needs hypothesis: pip install -e '.[test]'")
from click.testing import CliRunner  # noqa: E402
from clirun import digest, time_limit  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tiny import make_model, write_text  # noqa: E402

from quantmoe.apps.batch import ALIASES, key_types  # noqa: E402
from quantmoe.base.files import MANIFEST, atomic_write_json, versions  # noqa: E402
from quantmoe.cli import main  # noqa: E402
from quantmoe.model.architectures import COUNTS, LAYER_LIMIT, POSITIVE_SIZES, SIZE_LIMIT  # noqa: E402
from quantmoe.stages.calibrate import write_calibration  # noqa: E402

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
LIMIT = 60  # seconds one command may take before it counts as a hang




@pytest.fixture(scope="module")
def ground(tmp_path_factory):
    """A tiny model and a scratch copy to damage, text, and previous outputs that must survive."""
    root = tmp_path_factory.mktemp("fuzz")
    model = make_model("mixtral", root / "model")
    previous = root / "previous"  # what quantize --overwrite would replace: a quantmoe output
    previous.mkdir()
    (previous / "weights.txt").write_text("an earlier export\n")
    atomic_write_json(previous / MANIFEST, {"files": {}, "versions": versions()})
    tokens = root / "tokens.safetensors"  # what calibrate --overwrite would replace
    import torch

    write_calibration(tokens, torch.zeros(2, 8, dtype=torch.int64), {"tokenizer_fingerprint": ""})
    batch_root = root / "batch"
    batch_root.mkdir()
    (batch_root / "batch_summary.json").write_text('{"earlier": true}\n')
    return {"root": root, "model": model, "scratch": Path(shutil.copytree(model, root / "scratch")),
            "text": write_text(root / "docs.jsonl", repeats=4), "previous": previous, "tokens": tokens,
            "batch": batch_root, "digests": {p: digest(p) if p.is_dir() else p.read_bytes()
                                             for p in (previous, tokens, batch_root)}}


def run(*args):
    with time_limit(LIMIT):
        return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, ground, status: int = 2) -> None:
    """One clean ``error:`` line naming the problem, status ``status``, every previous output as it was."""
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"a traceback: {type(result.exception).__name__}: {result.exception}"
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert result.exit_code == status, f"status {result.exit_code}:\n{result.stderr}{result.stdout[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "internal error" not in lines[0], lines[0]
    for path, before in ground["digests"].items():
        assert (digest(path) if path.is_dir() else path.read_bytes()) == before, f"{path} changed"


def quantize(ground):
    return run("quantize", ground["scratch"], "--out", ground["previous"], "--overwrite", "--backend", "rtn",
               "--calib", ground["text"], "--nsamples", "2", "--seqlen", "16", "--group-size", "32", "--no-eval",
               "--quiet", "--device", "cpu")


@contextmanager
def damaged(ground, name: str, content: bytes | None):
    """The scratch model with file ``name`` holding ``content`` (None: removed), restored afterwards."""
    path = ground["scratch"] / name
    original = (ground["model"] / name).read_bytes() if (ground["model"] / name).exists() else None
    try:
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content)
        yield path
    finally:
        if original is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(original)


# -- values ------------------------------------------------------------------------------------
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                              st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                          max_leaves=6)
not_an_object = st.one_of(json_leaf, st.lists(json_value, max_size=3))  # any JSON but an object
not_an_int = st.one_of(st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                       st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                             max_size=2))


@st.composite
def bad_size(draw):
    """(config key, a value no config may hold there)."""
    key = draw(st.sampled_from(POSITIVE_SIZES + COUNTS))
    least = 1 if key in POSITIVE_SIZES else 0
    limit = LAYER_LIMIT if key == "num_hidden_layers" else SIZE_LIMIT
    value = draw(st.one_of(not_an_int, st.integers(max_value=least - 1), st.integers(min_value=limit + 1)))
    return key, value


NOT_UTF8 = st.tuples(st.binary(max_size=6), st.sampled_from([b"\xff", b"\xfe", b"\xc0\x80", b"\xe9 "]),
                     st.binary(max_size=6)).map(b"".join).filter(lambda b: not _utf8(b))


# -- configs -----------------------------------------------------------------------------------
@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_malformed_configs_are_refused(ground, data):
    config = json.loads((ground["model"] / "config.json").read_text())
    kind = data.draw(st.sampled_from(["size", "nested object", "not an object", "not JSON"]), label="kind")
    if kind == "size":
        key, value = data.draw(bad_size(), label="size")
        content = json.dumps({**config, key: value}).encode()
    elif kind == "nested object":  # a list or scalar where transformers or quantmoe expect an object
        key = data.draw(st.sampled_from(["quantization_config", "rope_scaling", "rope_parameters"]), label="key")
        value = data.draw(st.one_of(st.lists(json_leaf, min_size=1, max_size=3), st.integers(), st.text(min_size=1)),
                          label="value")
        content = json.dumps({**config, key: value}).encode()
    elif kind == "not an object":
        content = json.dumps(data.draw(not_an_object, label="value")).encode()
    else:
        content = data.draw(st.binary(max_size=64).filter(lambda b: not _json_object(b)), label="bytes")
    with damaged(ground, "config.json", content):
        assert_refused(quantize(ground), ground)


def _json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


# -- indexes -----------------------------------------------------------------------------------
HOSTILE_SHARDS = st.one_of(
    st.sampled_from(["../model.safetensors", "/etc/passwd", "sub/model.safetensors", "", ".", "..", "a\x00b",
                     "missing.safetensors", "config.json", "tokenizer.json", "model.safetensors.index.json"]),
    st.text(min_size=1, max_size=12).map(lambda t: "../" + t), st.text(min_size=1, max_size=12).map(lambda t: t + "/x"))


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_malformed_indexes_are_refused(ground, data):
    from safetensors import safe_open

    with safe_open(str(ground["model"] / "model.safetensors"), framework="pt") as f:
        names = sorted(f.keys())
    kind = data.draw(st.sampled_from(["hostile shard", "not a string", "weight_map not an object", "not an object",
                                      "tensors left out"]), label="kind")
    if kind == "hostile shard":
        shard = data.draw(HOSTILE_SHARDS, label="shard")
        picked = data.draw(st.sets(st.sampled_from(names), min_size=1), label="tensors")
        index = {"weight_map": {n: shard if n in picked else "model.safetensors" for n in names}}
    elif kind == "not a string":
        value = data.draw(st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2),
                                    st.booleans()), label="value")
        index = {"weight_map": {**{n: "model.safetensors" for n in names}, data.draw(st.sampled_from(names)): value}}
    elif kind == "weight_map not an object":
        index = {"weight_map": data.draw(not_an_object, label="weight_map")}
    elif kind == "not an object":
        index = data.draw(not_an_object, label="index")
    else:  # an index that leaves out tensors the model needs (every tensor of the tiny model is needed)
        dropped = data.draw(st.sets(st.sampled_from(names), min_size=1), label="dropped")
        index = {"weight_map": {n: "model.safetensors" for n in names if n not in dropped}}
    with damaged(ground, "model.safetensors.index.json", json.dumps(index).encode()):
        assert_refused(quantize(ground), ground)


# -- safetensors headers -----------------------------------------------------------------------
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_malformed_shards_are_refused(ground, data):
    raw = (ground["model"] / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, body = raw[8:8 + length], raw[8 + length:]
    kind = data.draw(st.sampled_from(["truncated", "header length", "header replaced", "NaN in the data"]),
                     label="kind")
    if kind == "truncated":
        content = raw[:data.draw(st.integers(0, len(raw) - 1), label="size")]
    elif kind == "header length":
        wrong = data.draw(st.integers(0, 2**64 - 1).filter(lambda n: n != length), label="length")
        content = struct.pack("<Q", wrong) + raw[8:]
    elif kind == "header replaced":  # any JSON at all, padded to the header's size: never a valid index
        other = json.dumps(data.draw(json_value, label="header")).encode()
        content = struct.pack("<Q", max(len(other), 1)) + (other or b" ") + body
    else:  # 0xFFFF is a NaN in fp16 (the tiny model's dtype): the data stays well-formed
        meta = json.loads(header)
        name = data.draw(st.sampled_from(sorted(n for n in meta if n != "__metadata__")), label="tensor")
        start, stop = meta[name]["data_offsets"]
        at = 8 + length + start + 2 * data.draw(st.integers(0, (stop - start) // 2 - 1), label="element")
        content = raw[:at] + b"\xff\xff" + raw[at + 2:]
    with damaged(ground, "model.safetensors", content):
        assert_refused(quantize(ground), ground)


# -- eval reports ------------------------------------------------------------------------------
REPORT = {
    "model": "q", "baseline": "model",
    "protocol": {"data": "heldout.jsonl", "seqlen": 32, "dtype": "float32"},
    "data": {"path": "heldout.jsonl", "text_sha256": "0" * 64, "tokens": 1000},
    "results": {"original": {"perplexity": 10.0}, "quantized": {"perplexity": 10.2}},
    "gap": {"absolute": 0.2, "relative": 0.02, "relative_se": 0.001},
    "kl": {"mean": 0.01, "se": 0.001, "top1_agreement": 0.95},
    "quantization": {"bits_per_weight": 4.2, "size_bytes": 1000, "label": "gptq int4 g128"},
}
NUMBERS = [("results", "original", "perplexity"), ("results", "quantized", "perplexity"), ("gap", "relative"),
           ("gap", "absolute"), ("kl", "mean"), ("kl", "top1_agreement")]
DELETE = object()
hostile_number = st.one_of(st.sampled_from([float("nan"), float("inf"), float("-inf"), None, True, DELETE]),
                           st.text(max_size=5), st.lists(st.floats(), max_size=2),
                           st.dictionaries(st.text(max_size=3), st.floats(), max_size=2))


def test_the_fuzzed_report_is_valid_to_begin_with(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(REPORT))
    result = run("regress", tmp_path / "a.json", tmp_path / "a.json")
    assert result.exit_code == 0 and "no regression" in result.output, result.output


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_malformed_reports_never_pass_as_no_regression(ground, tmp_path, data):
    base, new = json.loads(json.dumps(REPORT)), json.loads(json.dumps(REPORT))
    which = data.draw(st.sampled_from(["baseline", "new"]), label="which")
    target = base if which == "baseline" else new
    kind = data.draw(st.sampled_from(["number", "section", "document"]), label="kind")
    if kind == "number":
        *path, key = data.draw(st.sampled_from(NUMBERS), label="field")
        value = data.draw(hostile_number, label="value")
        holder = target
        for part in path:
            holder = holder[part]
        if value is DELETE:
            del holder[key]
        else:
            holder[key] = value
        text = json.dumps(target)
    elif kind == "section":
        section = data.draw(st.sampled_from(["protocol", "data", "results", "gap", "kl", "quantization"]))
        target[section] = data.draw(not_an_object.filter(lambda v: v is not None))
        text = json.dumps(target)
    else:
        text = data.draw(st.one_of(st.text(max_size=30).filter(lambda t: not _json_object(t.encode())),
                                   not_an_object.map(json.dumps)))
    (tmp_path / "baseline.json").write_text(json.dumps(base) if which == "new" else text)
    (tmp_path / "new.json").write_text(json.dumps(new) if which == "baseline" else text)
    result = run("regress", tmp_path / "baseline.json", tmp_path / "new.json")
    assert "no regression" not in result.output
    if result.exit_code == 1:  # a NaN or infinite number in the new report: a regression, said so
        assert "REGRESSION" in result.output and "not a finite number" in result.output
    else:
        assert_refused(result, ground)


# -- calibration files -------------------------------------------------------------------------
def _good_line(line: str) -> bool:
    try:
        value = json.loads(line)
    except ValueError:
        return not line.strip()  # blank lines are skipped
    return isinstance(value, dict) and isinstance(value.get("text"), str)


bad_line = st.one_of(
    st.text(min_size=1, max_size=20).map(lambda t: "{" + t),
    not_an_object.map(json.dumps),
    st.dictionaries(st.text(max_size=5).filter(lambda k: k != "text"), json_leaf, max_size=2).map(json.dumps),
    json_value.filter(lambda v: not isinstance(v, str)).map(lambda v: json.dumps({"text": v})),
).filter(lambda line: "\n" not in line and "\r" not in line and line.strip() and not _good_line(line))


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_malformed_calibration_files_are_refused(ground, tmp_path, data):
    good = [json.dumps({"text": "plain words for calibration " * 4})] * data.draw(st.integers(0, 3), label="good")
    if data.draw(st.booleans(), label="binary"):
        content = "\n".join(good).encode() + b"\n" + data.draw(NOT_UTF8, label="bytes")
    else:
        lines = good + [data.draw(bad_line, label="bad")]
        content = "\n".join(data.draw(st.permutations(lines), label="order")).encode()
    (tmp_path / "calib.jsonl").write_bytes(content)
    result = run("calibrate", "--tokenizer", ground["model"], "--data", tmp_path / "calib.jsonl", "--nsamples", "2",
                 "--seqlen", "8", "--out", ground["tokens"], "--overwrite")
    assert_refused(result, ground)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# -- jobs files --------------------------------------------------------------------------------
def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


STRING_KEYS, INT_KEYS, BOOL_KEYS = ("name", "model", "backend", "calib", "device"), \
    ("bits", "group_size", "nsamples", "seqlen", "seed", "batch_size"), ("eval", "sym")
KNOWN = set(key_types()) | set(ALIASES)


@st.composite
def wrong_key(draw) -> tuple[str, str]:
    """(key, TOML value) a job may not hold: an unknown key, or a known one with the wrong type."""
    kind = draw(st.sampled_from(["unknown", "string key", "int key", "bool key"]))
    if kind == "unknown":
        key = draw(st.from_regex(r"[a-z][a-z_]{0,9}", fullmatch=True).filter(lambda k: k not in KNOWN))
        return key, toml_value(draw(st.integers(0, 9)))
    keys, wrong = {"string key": (STRING_KEYS, st.one_of(st.integers(), st.booleans(), st.lists(st.integers(),
                                                                                                 max_size=2))),
                   "int key": (INT_KEYS, st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(),
                                                                                                max_size=2),
                                                   st.floats(allow_nan=False, allow_infinity=False))),
                   "bool key": (BOOL_KEYS, st.one_of(st.integers(), st.text(max_size=5)))}[kind]
    return draw(st.sampled_from(keys)), toml_value(draw(wrong))


@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_malformed_jobs_files_are_refused(ground, tmp_path, data):
    jobs = tmp_path / "jobs.toml"
    if data.draw(st.booleans(), label="binary"):
        jobs.write_bytes(b'[[jobs]]\nname = "' + data.draw(NOT_UTF8, label="bytes") + b'"\n')
    else:
        key, value = data.draw(wrong_key(), label="key")
        job = {"name": '"j"', "model": json.dumps(str(ground["model"])), "backend": '"rtn"', key: value}
        jobs.write_text("[[jobs]]\n" + "".join(f"{k} = {v}\n" for k, v in job.items()))
    assert_refused(run("batch", jobs, "--out", ground["batch"]), ground)
