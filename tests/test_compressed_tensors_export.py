"""``--format compressed-tensors``: the gptq/rtn levels and scales written as vLLM's compressed-tensors
WNA16 loader reads them (pack-quantized), and read back by quantmoe's own reader to exactly the
weights of the GPTQ v1 export of the same run."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import ARCH_NAMES

import quantmoe
from quantmoe.base.errors import QuantMoeError
from quantmoe.base.options import QuantConfig
from quantmoe.formats.base import StoredWeight
from quantmoe.formats.compressed_tensors import (
    dequantize_compressed,
    from_gptq,
    pack_int32,
    unpack_int32,
)
from quantmoe.formats.gptq_v1 import dequantize_linear, pack_linear
from quantmoe.model.architectures import ARCHITECTURES, plan_layer
from quantmoe.model.checkpoint import Checkpoint
from quantmoe.model.stream import LayerStream

# (model_type, backend, bits, sym): GPTQ once per family, the other settings with the cheaper rtn.
CASES = [("mixtral", "gptq", 4, True), ("qwen2_moe", "gptq", 4, True),
         ("mixtral", "rtn", 4, False), ("mixtral", "rtn", 8, True), ("mixtral", "rtn", 8, False),
         ("qwen2_moe", "rtn", 4, False), ("qwen2_moe", "rtn", 8, True), ("qwen2_moe", "rtn", 8, False)]
IDS = ["-".join(map(str, c)) for c in CASES]


@pytest.fixture(scope="module")
def pair(tiny_model, text_file, tmp_path_factory):
    """case -> (GPTQ export, compressed-tensors export) of the same run settings."""
    cache = {}

    def run(model_type, backend, bits, sym):
        key = (model_type, backend, bits, sym)
        if key not in cache:
            base = tmp_path_factory.mktemp("ct")
            outs = []
            for fmt in ("gptq", "compressed-tensors"):
                qcfg = QuantConfig(backend=backend, bits=bits, sym=sym, group_size=32, format=fmt)
                quantmoe.quantize(tiny_model(model_type), base / fmt, qcfg, calib=text_file, nsamples=8, seqlen=64,
                                  run_eval=False, quiet=True)
                outs.append(base / fmt)
            cache[key] = tuple(outs)
        return cache[key]

    return run


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compressed_tensors_reads_back_to_the_gptq_weights(pair, case):
    gptq, ct = (Checkpoint(f) for f in pair(*case))
    assert ct.format.name == "compressed-tensors" and gptq.format.name == case[1]
    assert set(ct.quantized_linears) == set(gptq.quantized_linears)
    for i in range(gptq.config.num_hidden_layers):
        a, b = gptq.read_prefix(f"model.layers.{i}."), ct.read_prefix(f"model.layers.{i}.")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tensors_and_config_are_what_vllm_reads(pair, case):
    model_type, _, bits, sym = case
    folder = pair(*case)[1]
    ckpt = Checkpoint(folder)
    names = set(ckpt.names())
    qc = ckpt.quantization
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    w = group["weights"]
    assert (w["num_bits"], w["symmetric"], w["strategy"], w["group_size"]) == (bits, sym, "group", 32)
    assert w["actorder"] in ("weight", None) and w["dynamic"] is False
    assert not (folder / "quantize_config.json").exists()
    arch = ARCHITECTURES[model_type]
    routers = {f"model.layers.{i}.{r}" for i in range(ckpt.config.num_hidden_layers)
               for r in plan_layer(arch, ckpt.config, i).routers}
    assert routers and routers <= set(qc["ignore"]) and "lm_head" in qc["ignore"]
    for module, linear in ckpt.quantized_linears.items():
        out, inp = linear.shape
        packed = ckpt.tensor(f"{module}.weight_packed")
        assert packed.dtype == torch.int32 and tuple(packed.shape) == (out, inp * bits // 32)
        assert tuple(ckpt.shape(f"{module}.weight_scale")) == (out, inp // 32)
        assert ckpt.tensor(f"{module}.weight_shape").tolist() == [out, inp]
        assert f"{module}.weight" not in names and f"{module}.weight_g_idx" not in names
        if sym:
            assert f"{module}.weight_zero_point" not in names
        else:
            zp = ckpt.tensor(f"{module}.weight_zero_point")
            assert zp.dtype == torch.int32 and tuple(zp.shape) == (out * bits // 32, inp // 32)
    for router in routers:  # kept as they were
        assert f"{router}.weight" in names and f"{router}.weight_packed" not in names


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_from_gptq_keeps_levels_and_scales(bits, sym):
    torch.manual_seed(bits)
    rows, cols, gs = 16, 64, 32
    maxq = 2**bits - 1
    q = torch.randint(0, maxq + 1, (rows, cols))
    zeros = torch.full((rows, cols // gs), 2 ** (bits - 1)) if sym else torch.randint(1, maxq + 1, (rows, cols // gs))
    scales = torch.rand(rows, cols // gs) + 0.01
    g_idx = torch.arange(cols) // gs
    gptq = pack_linear(q, scales, zeros, g_idx, bits)
    ct = from_gptq(gptq, bits, sym)
    assert torch.equal(unpack_int32(ct["weight_packed"], bits, cols), q)
    assert torch.equal(dequantize_compressed(ct), dequantize_linear(gptq, bits))
    assert ("weight_zero_point" in ct) is not sym


def test_pack_int32_inverts_unpack_and_pads_the_tail():
    values = torch.randint(0, 16, (3, 13))
    packed = pack_int32(values, 4)
    assert packed.shape == (3, 2)
    assert torch.equal(unpack_int32(packed, 4, 13), values)


def test_symmetric_zero_points_must_be_the_midpoint():
    g = pack_linear(torch.zeros(8, 32, dtype=torch.long), torch.ones(8, 1), torch.full((8, 1), 3), torch.zeros(32), 4)
    with pytest.raises(QuantMoeError, match="symmetric"):
        from_gptq(g, 4, True)


def test_format_refuses_the_gptqmodel_layout():
    with pytest.raises(QuantMoeError, match="--format compressed-tensors"):
        QuantConfig(format="compressed-tensors", layout="gptqmodel")
    with pytest.raises(QuantMoeError, match="--format exl2 is unknown"):
        QuantConfig(format="exl2")


def test_default_folder_name_marks_the_format(tmp_path):
    from quantmoe.stages.gptq_method import default_out

    assert default_out(tmp_path / "m", QuantConfig()).name == "m-gptq-int4-g128"
    assert default_out(tmp_path / "m", QuantConfig(format="compressed-tensors")).name == "m-gptq-int4-g128-ct"


def test_card_of_a_compressed_tensors_export(pair):
    folder = pair("mixtral", "rtn", 8, False)[1]
    card = (folder / "README.md").read_text()
    assert "compressed-tensors int8 quantization" in card
    assert "--quantization compressed-tensors" in card and "GPTQModel.load" not in card
    from quantmoe.apps.publish import check_card

    missing = check_card(folder)  # what push requires (this run had no eval: no perplexity table)
    assert missing and not [m for m in missing if "how to load" in m or "method" in m]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["meta"]["backend"] == "rtn"


def library_scheme(qc: dict, module: str):
    """The compressed-tensors library's QuantizationScheme for ``module``, found the way vLLM finds it:
    ``ignore`` first, then the first name/regex target in order, then a class target ("Linear")."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name

    config = QuantizationConfig.model_validate(qc)
    if any(match_name(module, t) for t in config.ignore):
        return None
    for scheme in config.config_groups.values():
        if any(match_name(module, t) for t in scheme.targets if t != "Linear"):
            return scheme
    return next(s for s in config.config_groups.values() if "Linear" in s.targets)


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                    reason="the compressed-tensors library is not installed (pip install 'quantmoe[test]')")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_compressed_tensors_library_decompresses_to_our_weights(pair, case):
    """The library's own pack-quantized decompressor, given our tensors and our config's scheme for each
    module, gives our reader's weights (in the scale's dtype, fp16: the same products, rounded once)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    ckpt = Checkpoint(pair(*case)[1])
    assert ckpt.quantized_linears
    for module, linear in ckpt.quantized_linears.items():
        scheme = library_scheme(ckpt.quantization, module)
        assert scheme is not None and scheme.weights.num_bits == case[2] and scheme.weights.symmetric == case[3]
        parts = {t.rpartition(".")[2]: ckpt.tensor(t) for t in linear.tensors}
        theirs = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
        ours = ckpt.format.dequantize(ckpt, linear)
        assert theirs.shape == ours.shape
        assert torch.equal(theirs, ours.to(theirs.dtype)), module


@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_every_architecture_reads_back_the_same_through_compressed_tensors(tiny_model, text_file, tmp_path, model_type):
    """RTN (quick) in both formats, every row of the table: the same weights come back, and verify passes."""
    from quantmoe.stages.verify import verify

    outs = {}
    for fmt in ("gptq", "compressed-tensors"):
        outs[fmt] = tmp_path / fmt
        quantmoe.quantize(tiny_model(model_type), outs[fmt], QuantConfig(backend="rtn", group_size=32, format=fmt),
                          calib=text_file, nsamples=4, seqlen=32, run_eval=False, quiet=True)
    gptq, ct = Checkpoint(outs["gptq"]), Checkpoint(outs["compressed-tensors"])
    assert set(ct.quantized_linears) == set(gptq.quantized_linears)
    for i in range(gptq.config.num_hidden_layers):
        a, b = gptq.read_prefix(f"model.layers.{i}."), ct.read_prefix(f"model.layers.{i}.")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert verify(outs["compressed-tensors"]).ok


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_the_layer_stream_dequantizes_an_export_where_it_loads_the_layer_to_the_same_weights(pair, case):
    """An export's quantized linears reach the layer stream as stored (StoredWeight: packed, checked), not
    dequantized on the host, and the loaded layer holds exactly the host-dequantized weights, both formats."""
    for folder in pair(*case):
        ckpt = Checkpoint(folder)
        stream = LayerStream(ckpt, torch.device("cpu"))
        for i in range(ckpt.config.num_hidden_layers):
            prefix = ckpt.layer_prefix(i)
            state = stream.layer_state(i)
            stored = {n for n, t in state.items() if isinstance(t, StoredWeight)}
            assert stored == {m[len(prefix):] + ".weight" for m in ckpt.quantized_linears if m.startswith(prefix)}
            deferred = {k: v.clone() for k, v in stream.load_layer(i, state).state_dict().items()}
            stream.release_layer(i)
            host = stream.load_layer(i, ckpt.read_prefix(prefix, stream.dtype)).state_dict()
            assert deferred.keys() == host.keys() and all(torch.equal(deferred[k], host[k]) for k in host)
            stream.release_layer(i)
