"""CUDA code paths, checked against the plain path: CUDA graphs and the Triton kernels must give
the same bits, TF32 must change results by rounding only, the bnb backends must quantize on CUDA
as on CPU.
Skipped without a GPU (conftest.py)."""

from __future__ import annotations

import pytest
import torch

from quantmoe.gptq.core import (
    QuantSpec,
    accumulate_hessian,
    bf16_statistics,
    gptq_quantize,
    half_products,
    half_rows,
    moment_sum,
    stat_mm,
    tf32_matmuls,
)
from quantmoe.gptq.cuda_graphs import GraphedBlocks


def inputs(T, C, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    X = torch.randn(T, C, device=device, generator=g)
    return X + 0.5 * X.roll(1, dims=1)  # correlated columns, as activations are


def hessian(X):
    H, _ = accumulate_hessian(torch.zeros(X.shape[1], X.shape[1], device=X.device), X, 0)
    return H


@pytest.mark.gpu
@pytest.mark.parametrize("order,group_size", [("static", 128), ("none", 64), ("group", 64), ("static", -1)])
def test_cuda_graphs_give_the_same_bits_as_eager(order, group_size):
    graphs = GraphedBlocks()
    spec = QuantSpec(4, group_size, True)
    for seed in (0, 1):  # the second call replays the graphs captured by the first, on new data
        X = inputs(4096, 1024, seed)
        H = hessian(X).expand(3, 1024, 1024).contiguous()
        W = inputs(3 * 256, 1024, seed + 10).reshape(3, 256, 1024) * 0.02
        eager = gptq_quantize(W, H, spec, order=order)
        graphed = gptq_quantize(W, H, spec, order=order, block_fn=graphs)
        for name in ("q", "scales", "zeros", "W", "loss", "damp"):
            assert torch.equal(getattr(eager, name), getattr(graphed, name)), name
    assert len(graphs.graphs) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("order,group_size,bits", [("static", 128, 4), ("none", 64, 4), ("group", 64, 8),
                                                   ("static", -1, 4), ("static", 96, 8)])
def test_the_triton_block_kernel_gives_the_same_bits_as_eager(order, group_size, bits):
    """One Triton kernel per block of columns: every level, scale and loss as quantize_block's,
    with rows that do not fill the kernel's last tile (257) and blocks narrower than 128 columns."""
    from quantmoe.gptq.core import ClipSearch
    from quantmoe.gptq.triton_kernels import TritonBlocks, available

    if not available("cuda"):
        pytest.skip("Triton is not installed")
    spec = QuantSpec(bits, group_size, True)
    for seed in (0, 1):
        X = inputs(4096, 960, seed)
        H = hessian(X).expand(3, 960, 960).contiguous()
        W = inputs(3 * 257, 960, seed + 10).reshape(3, 257, 960) * 0.02
        W[0, 1] *= 1e-37  # subnormal weights: a whole row, and a stretch among normal ones (kept, not flushed)
        W[1, 2, 100:300] *= 1e-37
        eager = gptq_quantize(W, H, spec, order=order, search=ClipSearch(20))
        for rows, warps in ((32, 4), (16, 2)):
            kernel = gptq_quantize(W, H, spec, order=order, search=ClipSearch(20), block_fn=TritonBlocks(rows, warps))
            for name in ("q", "scales", "zeros", "W", "loss", "damp"):
                assert torch.equal(getattr(eager, name), getattr(kernel, name)), (name, rows)


@pytest.mark.gpu
@pytest.mark.parametrize("sym", [True, False])
def test_the_search_kernel_finds_pytorchs_grids_but_where_candidates_tie_to_rounding(sym):
    """The clipping search in one Triton kernel (search_grids): each group's grid is the one PyTorch's chain of
    kernels finds, except where the two grids' errors (in float64) agree to within fp32's rounding of a sum of
    128 terms; with and without importance, asymmetric and symmetric, and through a whole GPTQ run (losses
    within rounding). Every grid the kernel keeps is one of the candidates PyTorch makes (its grids are computed
    with PyTorch's CUDA rounding, division by maxq included). Flat and all-zero groups get PyTorch's grid."""
    from quantmoe.gptq import triton_kernels as gptq_triton
    from quantmoe.gptq.core import ClipSearch, _grid, rounding_error, search_params

    if not gptq_triton.available("cuda"):
        pytest.skip("Triton is not installed")
    spec = QuantSpec(4, 128, sym)
    W = inputs(2 * 300, 640, 3).reshape(2, 300, 5, 128) * 0.02
    W[0, 0, 0] = 0.0
    W[0, 1, 1] = 0.01
    W[1, 2, 3] *= 1e-37  # subnormal weights (kept, not flushed)
    importance = inputs(2, 640, 4).abs().reshape(2, 1, 5, 128)
    search = ClipSearch(20)
    for imp in (importance, None):
        fused = gptq_triton.search_grids(W, spec, search.ratios(), imp)
        chain = search_params(W, spec, search, imp)
        same = (fused[0] == chain[0]) & (fused[1] == chain[1])
        assert same.float().mean() > 0.99 and same[0, 0, 0] and same[0, 1, 1] and same[1, 2, 3]
        lo, hi = W.amin(-1).clamp(max=0), W.amax(-1).clamp(min=0)
        candidates = [_grid(lo, hi, spec)] + [_grid(lo * r, hi * r, spec) for r in search.ratios()]
        assert torch.stack([(fused[0] == s) & (fused[1] == z) for s, z in candidates]).any(0).all()
        # each grid's fp32 error terms (the kernel's and PyTorch's alike), summed in float64: where the two picks
        # differ, their errors agree to within two fp32 sums' rounding of 128 positive terms
        e_fused, e_chain = (rounding_error(W, s, z, spec.maxq, imp, dtype=torch.float64) for s, z in (fused, chain))
        assert ((e_fused - e_chain).abs() <= 2e-5 * e_chain.abs() + 1e-30)[~same].all(), \
            ((e_fused - e_chain).abs() / e_chain.abs())[~same].max()
    X = inputs(4096, 1024, 5)
    H = hessian(X).expand(2, 1024, 1024).contiguous()
    W = inputs(2 * 257, 1024, 6).reshape(2, 257, 1024) * 0.02
    fused = gptq_quantize(W, H, spec, search=ClipSearch(20, kernel=gptq_triton.search_grids))
    chained = gptq_quantize(W, H, spec, search=ClipSearch(20))  # the chain of tensor-wide kernels
    assert (fused.scales == chained.scales).float().mean() > 0.99
    assert torch.allclose(fused.loss.sum(), chained.loss.sum(), rtol=1e-3)


@pytest.mark.gpu
def test_auto_block_kernel_on_cuda_is_triton_where_installed():
    from quantmoe.gptq.triton_kernels import TritonBlocks, available
    from quantmoe.stages.gptq_method import block_function

    cuda = torch.device("cuda")
    assert isinstance(block_function("auto", cuda), TritonBlocks if available(cuda) else GraphedBlocks)
    assert isinstance(block_function("cuda-graphs", cuda), GraphedBlocks)


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True])
def test_a_matrix_gets_the_same_bits_whatever_else_is_in_its_batch_on_cuda(tf32):
    """As on CPU (test_gptq_core), with CUDA graphs: on an H200 a batched mean once made one expert
    of a 2-GPU run differ from the 1-GPU run. Also with the solve's TF32 products (--tf32)."""
    from test_gptq_core import batch_independence_mismatches

    assert batch_independence_mismatches("cuda", GraphedBlocks(), tf32=tf32) == []


@pytest.mark.gpu
def test_the_blocked_triangular_inverse_on_cuda_is_a_triangular_solve_up_to_rounding():
    """gptq.triangular_inverse on CUDA at a width that recurses three levels, against float64: as close as
    cuBLAS's triangular solve against an identity; and damped_inverse_cholesky, which uses it, gives a
    matrix the same bits alone as in a batch of three."""
    from quantmoe.gptq.core import damped_inverse_cholesky, triangular_inverse

    C = 3000
    H = torch.stack([hessian(inputs(2 * C, C, seed)) for seed in range(3)])
    L = torch.linalg.cholesky(H[0] + 0.01 * H[0].diagonal().mean() * torch.eye(C, device="cuda"))
    reference = torch.linalg.solve_triangular(L.double(), torch.eye(C, device="cuda", dtype=torch.float64),
                                              upper=False)
    error = lambda X: float((X.double() - reference).norm() / reference.norm())  # noqa: E731
    solved = torch.linalg.solve_triangular(L, torch.eye(C, device="cuda"), upper=False)
    inverse = triangular_inverse(L)
    assert torch.equal(inverse.triu(1), torch.zeros_like(inverse))
    assert error(inverse) <= 1.6 * error(solved) and error(inverse) < 1e-6
    U, used = damped_inverse_cholesky(H.clone(), 0.01)
    for b in range(3):
        alone, used_alone = damped_inverse_cholesky(H[b:b + 1].clone(), 0.01)
        assert torch.equal(alone[0].view(torch.int32), U[b].view(torch.int32)) and torch.equal(used_alone[0], used[b])


@pytest.mark.gpu
def test_tf32_hessians_change_the_result_by_rounding_only():
    X = inputs(16384, 1024, 0)
    W = inputs(512, 1024, 1).reshape(1, 512, 1024) * 0.02
    H = hessian(X)
    with tf32_matmuls(True):
        H_tf32 = hessian(X)
    rel = float((H_tf32 - H).norm() / H.norm())
    assert 0 < rel < 2e-3  # TF32 was used, and only rounded its inputs (10-bit mantissa: ~5e-4)
    spec = QuantSpec(4, 128, True)
    ref, tf = gptq_quantize(W, H[None], spec), gptq_quantize(W, H_tf32[None], spec)

    def output_error(res):
        return float(((X @ (res.W[0] - W[0]).T) ** 2).mean())

    assert output_error(tf) == pytest.approx(output_error(ref), rel=0.01)
    assert float(tf.loss.sum()) == pytest.approx(float(ref.loss.sum()), rel=0.01)
    assert float((tf.q != ref.q).float().mean()) < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("fit", ["none", "cross"])
def test_tf32_solve_changes_the_result_by_rounding_only(fit):
    """gptq_quantize's ``tf32`` (the inverse's products and the error spread as TF32, as --tf32 runs them)
    changes some levels but neither GPTQ's loss nor the output error beyond rounding, against fp32."""
    C = 2048  # the triangular inverse recurses (blocks of 512), 16 blocks of errors are spread
    X = inputs(4 * C, C, 0)
    X = X * torch.linspace(0.1, 3.0, C, device="cuda")  # channels of unequal scale, as activations have
    W = inputs(768, C, 1).reshape(1, 768, C) * 0.02
    H = hessian(X)[None]
    extra = {"cross": hessian(X + 0.05 * inputs(4 * C, C, 2))[None]} if fit == "cross" else {}
    spec = QuantSpec(4, 128, True)
    ref = gptq_quantize(W, H, spec, **extra)
    tf = gptq_quantize(W, H, spec, tf32=True, **extra)
    differ = float((tf.q != ref.q).float().mean())
    assert 0 < differ < 0.15  # TF32 was used; near-ties round the other way

    def output_error(res):
        return float(((X @ (res.W[0] - W[0]).T) ** 2).mean())

    assert output_error(tf) == pytest.approx(output_error(ref), rel=0.005)
    assert float(tf.loss.sum()) == pytest.approx(float(ref.loss.sum()), rel=0.005)
    assert torch.equal(tf.damp, ref.damp)


@pytest.mark.gpu
def test_bf16_statistics_on_cuda_sum_the_rounded_inputs_in_fp32_and_change_the_result_by_rounding_only():
    X = inputs(16384, 1024, 0)
    Xr = X.bfloat16().double()
    exact = 2 * Xr.t() @ Xr / X.shape[0]  # the Hessian of the rounded inputs, summed exactly
    H = hessian(X)
    with bf16_statistics(True):
        H_bf16 = hessian(X)
        S = torch.zeros(1024, 1024, device="cuda")
        moment_sum(S, X[:8192], X[:8192])
        moment_sum(S, X[8192:], X[8192:])  # out= adds to S in place, it does not replace it
        M = stat_mm(X[:64], X[:64].t())
    assert H_bf16.dtype == S.dtype == M.dtype == torch.float32
    # Sums of the rounded inputs with an fp32 result: the tensor cores' sums round more than IEEE fp32 in order
    # (an error that grows with the rows; benchmarks/README.md), but they are no bf16 sums (those are ~1e-3 off).
    assert float((H_bf16.double() - exact).norm() / exact.norm()) < 2e-4
    assert float((2 * S.double() / X.shape[0] - exact).norm() / exact.norm()) < 2e-4
    assert float((M.double() - Xr[:64] @ Xr[:64].t()).norm() / M.double().norm()) < 2e-4
    rel = float((H_bf16 - H).norm() / H.norm())
    assert 0 < rel < 1e-2  # rounded: an 8-bit mantissa
    W = inputs(512, 1024, 1).reshape(1, 512, 1024) * 0.02
    spec = QuantSpec(4, 128, True)
    ref, low = gptq_quantize(W, H[None], spec), gptq_quantize(W, H_bf16[None], spec)

    def output_error(res):
        return float(((X @ (res.W[0] - W[0]).T) ** 2).mean())

    assert output_error(low) == pytest.approx(output_error(ref), rel=0.02)
    assert float((low.q != ref.q).float().mean()) < 0.1


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True])
def test_the_triangular_inverse_with_batched_leaves_on_cuda_is_a_triangular_solve_up_to_rounding(tf32):
    """On CUDA the blocked triangular inverse (every whole leaf inverted in one batched solve, a narrower last one
    alone, the rest by products, under TF32 as --tf32 runs it) is as close to the float64 inverse as fp32
    solve_triangular is (TF32: within its products' rounding), zero above the diagonal, the same bits into a transposed
    view, and a matrix's bits do not depend on the others factorised beside it."""
    from quantmoe.gptq.core import damped_inverse_cholesky, triangular_inverse

    C = 2 * 512 + 300
    X = inputs(4 * C, C, 3)
    H = 2 * X.T @ X / X.shape[0]
    H += 0.01 * H.diagonal().mean() * torch.eye(C, device="cuda")
    L = torch.linalg.cholesky(H.double()).float()
    reference = torch.linalg.solve_triangular(L.double(), torch.eye(C, device="cuda", dtype=torch.float64), upper=False)
    solved = torch.linalg.solve_triangular(L, torch.eye(C, device="cuda"), upper=False)

    def error(M):
        return float((M.double() - reference).norm() / reference.norm())

    with tf32_matmuls(tf32):
        inverse = triangular_inverse(L)
        storage = torch.full((C, C), float("nan"), device="cuda")
        triangular_inverse(L, out=storage.mT)
        alone, _ = damped_inverse_cholesky(H[None].clone(), 0.01, tf32=tf32)
        beside, _ = damped_inverse_cholesky(torch.stack([H, H.flip(0, 1)]), 0.01, tf32=tf32)
    assert torch.equal(inverse.triu(1), torch.zeros_like(inverse))
    assert error(inverse) <= (0.05 if tf32 else 2 * error(solved) + 1e-7)  # TF32: its products' rounding, no worse
    assert torch.equal(storage.mT, inverse)
    assert torch.equal(alone[0], beside[0])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp32", "tf32", "bf16", "fp16"])
def test_a_wide_hessian_from_its_lower_half_on_cuda_is_the_whole_product_up_to_rounding(mode):
    """On CUDA a Hessian GRAM_MIN wide or wider, built block by block from its lower half (gptq.core._gram), in
    fp32, TF32 or from bf16 or fp16 inputs: within its mode's rounding of the exact sums (those of the inputs as
    the mode rounds them), as close to them as the one product it replaces, and mirrored exactly outside the
    diagonal blocks."""
    from quantmoe.gptq import core

    C = 2 * core.GRAM_MIN + 512  # several blocks and a partial one
    X = inputs(8192, C, 2)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    Xr = (X if low is None else X.to(low)).double()
    exact = 2 * Xr.t() @ Xr / X.shape[0]
    with tf32_matmuls(mode == "tf32"), bf16_statistics(mode == "bf16"), half_products(mode == "fp16"):
        H = hessian(X)
        rounded = X if low is None else X.to(low)
        whole = torch.zeros(C, C, device="cuda")
        core._addmm(whole, rounded.t(), rounded, alpha=2 / X.shape[0])  # the one product
    error = float((H.double() - exact).norm() / exact.norm())
    assert error < {"fp32": 1e-6, "tf32": 2e-3, "bf16": 2e-4, "fp16": 2e-4}[mode]
    assert error < 2 * float((whole.double() - exact).norm() / exact.norm()) + 1e-7
    block = torch.arange(C, device="cuda") // core.GRAM_BLOCK
    mirrored = block[:, None] != block[None, :]
    assert torch.equal(H[mirrored], H.t()[mirrored])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["bnb-nf4", "bnb-int8"])
def test_bnb_on_cuda_matches_cpu_and_its_kernels_model_runs(tmp_path, name):
    """The bnb backends quantize on CUDA as on CPU (the same codes up to bitsandbytes' own CPU/CUDA
    rounding), and the bitsandbytes-kernels model runs on the GPU with the dequantized model's outputs."""
    pytest.importorskip("bitsandbytes")
    from tiny import make_model

    import quantmoe
    from quantmoe.backends import Options, get
    from quantmoe.model.checkpoint import Checkpoint

    src = make_model("mixtral", tmp_path / "src")
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / device
        get(name).quantize(src, outs[device], Options(device=device, run_eval=False, quiet=True))
    cpu, gpu = Checkpoint(outs["cpu"]), Checkpoint(outs["cuda"])
    assert set(cpu.names()) == set(gpu.names())
    for module, linear in cpu.quantized_linears.items():
        w_cpu = cpu.format.dequantize(cpu, linear).float()
        w_gpu = gpu.format.dequantize(gpu, gpu.quantized_linears[module]).float().cpu()
        assert torch.isfinite(w_gpu).all() and w_gpu.abs().sum() > 0, module
        assert (w_cpu - w_gpu).norm() <= 0.02 * w_cpu.norm(), module  # same codes but for rare ties
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    dequantized = quantmoe.load_quantized(outs["cuda"], device="cuda")
    kernels = quantmoe.load_quantized(outs["cuda"], device="cuda", kernels="bitsandbytes")
    with torch.no_grad():
        want, got = dequantized(ids).logits.float(), kernels(ids).logits.float()
    cos = torch.nn.functional.cosine_similarity(want.flatten(1), got.flatten(1)).min()
    assert cos > 0.99, float(cos)


@pytest.mark.gpu
def test_fp32_attention_on_cuda_does_not_materialise_the_scores():
    """With grouped KV heads and fp32 inputs, attention runs without a (batch, heads, seq, seq)
    tensor (quantmoe.model.stream.fp32_attention_without_scores), and computes what eager attention does."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from quantmoe.model.stream import fp32_attention_without_scores

    fp32_attention_without_scores()
    config = MixtralConfig(hidden_size=1024, intermediate_size=64, num_attention_heads=16, num_key_value_heads=4,
                           num_hidden_layers=1, num_local_experts=2, vocab_size=128)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).cuda().eval()
    ids = torch.randint(0, 128, (4, 2048), device="cuda")
    scores_bytes = 4 * 16 * 2048 * 2048 * 4  # 1 GiB
    with torch.no_grad():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = model(ids).logits
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before < scores_bytes / 2
        model.config._attn_implementation = "eager"
        for layer in model.model.layers:
            layer.self_attn.config._attn_implementation = "eager"
        ref = model(ids).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_an_fp32_checkpoint_on_cuda_quantizes_to_the_bits_of_its_fp16_source(tmp_path):
    """As tests/test_pipeline.py checks on CPU: the default --fit stream on CUDA must not use the
    full-precision stream's fp32 originals as GPTQ's working storage."""
    from tiny import make_model, upcast_to_fp32, write_text

    import quantmoe
    from quantmoe.base.options import QuantConfig
    from quantmoe.formats.gptq_v1 import GPTQ_SUFFIXES
    from quantmoe.model.checkpoint import Checkpoint

    text = write_text(tmp_path / "text.jsonl")
    src = make_model("qwen2_moe", tmp_path / "fp16")
    fp32 = upcast_to_fp32(src, tmp_path / "fp32")
    outs = {}
    for name, model in (("fp16", src), ("fp32", fp32)):
        outs[name] = tmp_path / f"out-{name}"
        quantmoe.quantize(model, outs[name], QuantConfig(group_size=32), calib=text, nsamples=8, seqlen=64,
                          device="cuda", run_eval=False, quiet=True)
    a, b = Checkpoint(outs["fp16"]), Checkpoint(outs["fp32"])
    names = [n for n in a.names() if n.endswith(GPTQ_SUFFIXES)]
    assert names and [n for n in names if not torch.equal(a.tensor(n), b.tensor(n))] == []


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_gathering_scaled_residual_rows_on_cuda_gives_the_bits_of_norming_every_batch(tmp_path, monkeypatch,
                                                                                       model_type):
    """As tests/test_architectures.py checks on CPU, with --tf32: a gather pass's rows of the residual scaled with each
    token's norm scale (LayerStream.norm_scales) give the export of norming every batch; the scales are taken."""
    from tiny import make_model, spy_taken, write_text

    import quantmoe
    from quantmoe.base.options import QuantConfig
    from quantmoe.model import stream
    from quantmoe.model.checkpoint import Checkpoint

    text = write_text(tmp_path / "text.jsonl")
    src = make_model(model_type, tmp_path / "model")

    def run(name: str) -> Checkpoint:
        quantmoe.quantize(src, tmp_path / name, QuantConfig(group_size=32), calib=text, nsamples=8, seqlen=64,
                          device="cuda", tf32=True, run_eval=False, quiet=True)
        return Checkpoint(tmp_path / name)

    made = spy_taken(monkeypatch, stream.LayerStream, "norm_scales")
    a = run("scaled")
    assert made and all(made)
    monkeypatch.setattr(stream.LayerStream, "norm_scales", lambda self, *a: None)
    b = run("normed")
    assert sorted(a.names()) == sorted(b.names())
    assert [n for n in a.names() if not torch.equal(a.tensor(n), b.tensor(n))] == []


@pytest.mark.gpu
def test_eval_on_cuda_gives_the_cpu_gap_and_kl(tmp_path):
    """The evaluator on CUDA (activations, the original's kept hidden states moved back per batch for
    the KL) reports what it reports on CPU, up to float rounding."""
    from tiny import make_model, write_text

    import quantmoe
    from quantmoe.base.options import QuantConfig
    from quantmoe.stages.evaluate import evaluate

    text = write_text(tmp_path / "text.jsonl")
    src = make_model("mixtral", tmp_path / "src")
    out = tmp_path / "out"
    quantmoe.quantize(src, out, QuantConfig(group_size=32), calib=text, nsamples=8, seqlen=64, device="cuda",
                      run_eval=False, quiet=True)
    reports = {d: evaluate(out, baseline=src, data=text, seqlen=64, device=d, quiet=True) for d in ("cpu", "cuda")}
    cpu, gpu = reports["cpu"], reports["cuda"]
    assert gpu["device"].startswith("cuda")
    assert gpu["results"]["quantized"]["perplexity"] == pytest.approx(cpu["results"]["quantized"]["perplexity"], rel=1e-4)
    assert gpu["gap"]["relative_se"] == pytest.approx(cpu["gap"]["relative_se"], rel=1e-2)
    assert cpu["kl"]["mean"] > 0
    assert gpu["kl"]["mean"] == pytest.approx(cpu["kl"]["mean"], rel=1e-2)
    assert gpu["kl"]["top1_agreement"] == pytest.approx(cpu["kl"]["top1_agreement"], abs=0.01)


@pytest.mark.gpu
def test_tf32_eval_on_cuda_gives_the_fp32_gap_and_kl_within_their_errors(tmp_path):
    """`quantmoe eval --tf32` (tensor-core matrix products) reports the fp32 evaluation's gap and KL within
    their standard errors, and says it used TF32."""
    from tiny import make_model, write_text

    import quantmoe
    from quantmoe.base.options import QuantConfig
    from quantmoe.stages.evaluate import TF32, evaluate

    text = write_text(tmp_path / "text.jsonl")
    src = make_model("mixtral", tmp_path / "src")
    out = tmp_path / "out"
    quantmoe.quantize(src, out, QuantConfig(group_size=32), calib=text, nsamples=8, seqlen=64, device="cuda",
                      run_eval=False, quiet=True)
    fp32, tf32 = (evaluate(out, baseline=src, data=text, seqlen=64, device="cuda", quiet=True, tf32=t)
                  for t in (False, True))
    assert fp32["protocol"]["dtype"] == "float32" and tf32["protocol"]["dtype"] == TF32
    assert abs(tf32["gap"]["relative"] - fp32["gap"]["relative"]) <= fp32["gap"]["relative_se"]
    assert abs(tf32["kl"]["mean"] - fp32["kl"]["mean"]) <= fp32["kl"]["se"]


@pytest.mark.gpu
def test_page_locked_blocks_registered_in_parallel_hold_device_copies():
    """After pick_device("cuda") (page-locked blocks malloc'd, touched by several threads and registered), a queued
    copy from the device lands in a page-locked block with the device's values, and a copy back matches."""
    from quantmoe.model.stream import pick_device

    dev = pick_device("cuda")
    x = torch.arange(1 << 26, device=dev, dtype=torch.int32)
    host = x.to("cpu", non_blocking=True)
    torch.cuda.synchronize()
    assert host.is_pinned()
    assert torch.equal(host, torch.arange(1 << 26, dtype=torch.int32))
    assert torch.equal(host.to(dev, non_blocking=True), x)


@pytest.mark.gpu
def test_release_pinned_memory_hands_the_cached_page_locked_blocks_back():
    import psutil

    from quantmoe.base.measure import release_pinned_memory

    proc = psutil.Process()
    block = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    block.fill_(1)
    del block  # cached by PyTorch's host allocator, still resident
    held = proc.memory_info().rss
    release_pinned_memory()
    assert proc.memory_info().rss < held - (3 << 28), "the freed 1 GiB page-locked block is still resident"


@pytest.mark.gpu
def test_a_layer_read_into_page_locked_memory_is_the_plain_read(tmp_path):
    """read_prefix(pin=True) makes each copy in page-locked memory (stored weights of a quantized export and an
    FP8 release's codes and scales too), holding the same values as the plain read."""
    from tiny import make_model, router_or_mtp_extra, write_text

    import quantmoe
    from quantmoe.base.options import QuantConfig
    from quantmoe.formats.fp8 import Fp8Weight, write_fp8_release
    from quantmoe.model.checkpoint import Checkpoint

    text = write_text(tmp_path / "text.jsonl")
    src = make_model("mixtral", tmp_path / "src")
    out = tmp_path / "out"
    quantmoe.quantize(src, out, QuantConfig(group_size=32), calib=text, nsamples=8, seqlen=64, device="cuda",
                      run_eval=False, quiet=True)
    bf16 = make_model("deepseek_v3", tmp_path / "bf16", dtype=torch.bfloat16)
    fp8 = write_fp8_release(bf16, tmp_path / "fp8", block=(32, 32), skip=router_or_mtp_extra("deepseek_v3"))
    for folder in (src, out, fp8):
        ckpt = Checkpoint(folder)
        plain = ckpt.read_prefix("model.layers.1.", None, defer=True)
        pinned = ckpt.read_prefix("model.layers.1.", None, defer=True, pin=True)
        assert plain.keys() == pinned.keys()
        for name, t in pinned.items():
            parts = {"codes": t.codes, "scale": t.scale} if isinstance(t, Fp8Weight) else \
                t.parts if hasattr(t, "parts") else {"": t}
            assert all(p.is_pinned() for p in parts.values()), name
            want = plain[name].dequantize() if hasattr(t, "dequantize") else plain[name]
            got = t.dequantize() if hasattr(t, "dequantize") else t
            assert torch.equal(got, want), name
        if folder == fp8:
            assert any(isinstance(t, Fp8Weight) for t in pinned.values())


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_tensor_core_passes_run_attention_in_fp16_and_change_the_outputs_by_rounding_only(family):
    """Under --tf32 the forward passes' attention runs on scaled fp16 copies of its inputs (model.stream.half_sdpa):
    logits of a model with MLA (DeepSeek-V3: query/key heads wider than value heads) or grouped KV heads differ
    from those with TF32 products alone (fp16 was used) by rounding only, as TF32's own differ from fp32's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantmoe.model.stream import half_attention_in_sdpa, tensor_core_passes

    half_attention_in_sdpa()
    sizes = {"deepseek_v3": dict(hidden_size=512, intermediate_size=256, moe_intermediate_size=64, num_attention_heads=8,
                                 num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=64,
                                 qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=4, num_experts_per_tok=2,
                                 first_k_dense_replace=1, n_group=1, topk_group=1),
             "mixtral": dict(hidden_size=512, intermediate_size=256, num_attention_heads=16, num_key_value_heads=4,
                             num_local_experts=2)}[family]
    config = AutoConfig.for_model(family, num_hidden_layers=1, vocab_size=256, **sizes)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).cuda().eval()
    ids = torch.randint(0, 256, (2, 1024), device="cuda")
    with torch.no_grad():
        fp32 = model(ids).logits
        with tf32_matmuls(True):
            tf32 = model(ids).logits
        with tensor_core_passes(True):
            half = model(ids).logits

    def relative(a):
        return float((a - fp32).norm() / fp32.norm())

    assert 0 < relative(tf32) and (half != tf32).any()
    assert relative(half) < max(4 * relative(tf32), 1e-4)


@pytest.mark.gpu
def test_the_two_step_error_spread_on_cuda_changes_the_result_by_rounding_only():
    """gptq_quantize on CUDA from OUTER_MIN columns spreads its errors in two steps by default (gptq.OUTER_BLOCK): the
    one-step spread's levels to rounding (a level in a thousand at most moves, by one step) and its loss."""
    from quantmoe.gptq.core import OUTER_MIN

    X = inputs(2 * OUTER_MIN, OUTER_MIN, 0)
    W = inputs(2 * 128, OUTER_MIN, 1).reshape(2, 128, OUTER_MIN) * 0.02
    H = hessian(X).expand(2, OUTER_MIN, OUTER_MIN).contiguous()
    one = gptq_quantize(W, H, QuantSpec(4, 128, True), outer=0)
    two = gptq_quantize(W, H, QuantSpec(4, 128, True))
    moved = (one.q.int() - two.q.int()).abs()
    assert moved.max() <= 1 and (moved > 0).float().mean() < 1e-3
    assert torch.allclose(one.loss.sum(), two.loss.sum(), rtol=1e-3)


@pytest.mark.gpu
def test_a_stage_inside_another_is_timed_on_the_device_without_waiting_for_it(monkeypatch):
    """base.Stopwatch on CUDA: an outermost stage waits for the device as it begins and ends, the stages inside it
    (a pass's per-batch ones) never do; their seconds are the device's time between two events, added when the
    outermost stage ends, and fit inside it. Only the outermost stage reads and resets the peak-memory counter
    (a read builds PyTorch's whole table of statistics); the stages inside it get its peak."""
    from quantmoe.base.measure import Stopwatch

    clock = Stopwatch(torch.device("cuda"))
    waits, reads, resets = [], [], []
    synchronize, peak, reset = torch.cuda.synchronize, torch.cuda.max_memory_allocated, torch.cuda.reset_peak_memory_stats
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: waits.append(a) or synchronize(*a))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: reads.append(a) or peak(*a))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: resets.append(a) or reset(*a))
    X = torch.randn(4096, 4096, device="cuda")
    with clock("outer"):
        for _ in range(5):
            with clock("inner"):
                Y = X @ X
            assert "inner" not in clock.seconds  # not added before the outermost stage ends
            del Y
        Z = torch.empty(2 * X.numel(), device="cuda")  # the outer stage's own peak, beyond any inner one's
        del Z
    assert len(waits) == 2 and len(reads) == 1 and len(resets) == 1
    assert 0 < clock.seconds["inner"] <= clock.seconds["outer"]
    assert clock.peak_gpu_mb["inner"] == clock.peak_gpu_mb["outer"] >= 3 * X.numel() * 4 / 2**20


@pytest.mark.gpu
def test_half_products_on_cuda_are_tf32s_rounding_at_any_scale():
    """Under half_products (--tf32's statistics), products take fp16 operands scaled by powers of
    two: a Hessian, a moment and a product of inputs far beyond fp16's range or far below its normal numbers are
    as close to float64 as TF32's (the same 10-bit mantissa), and finite; the results are fp32."""
    X, Y = inputs(8192, 1024, 4), inputs(8192, 512, 5)

    def products(X, Y):  # a Hessian (mirrored), a moment, a product
        S = torch.zeros(512, 1024, device="cuda")
        moment_sum(S, Y, X)
        return [hessian(X), S, stat_mm(X[:256], X[:512].t())]

    for scale in (1.0, 1e7, 1e-9):
        Xs, Ys = X * scale, Y * scale
        Xd, Yd = Xs.double(), Ys.double()
        exact = [2 * Xd.t() @ Xd / Xd.shape[0], Yd.t() @ Xd, Xd[:256] @ Xd[:512].t()]
        with tf32_matmuls(True):
            tf32 = products(Xs, Ys)
        with half_products(True):
            half = products(Xs, Ys)
        for h, t, e in zip(half, tf32, exact):
            assert h.dtype == torch.float32 and torch.isfinite(h).all()
            err = float((h.double() - e).norm() / e.norm())
            assert err < max(2 * float((t.double() - e).norm() / e.norm()), 1e-5), scale


@pytest.mark.gpu
def test_the_experts_fp16_forward_on_cuda_is_tf32s_rounding_and_holds_each_rows_result():
    """Under half_products (--tf32) the routed experts' forward (StoredExperts.run_deferred) takes fp16 operands,
    each input row and weight matrix scaled by its own power of two: as close to float64 as the TF32 forward for
    inputs of any magnitude, finite, and each row's result the same whichever rows are computed with it (a
    resumed run's replay computes them batch by batch)."""
    from quantmoe.stages.experts import StoredExperts

    g = torch.Generator(device="cuda").manual_seed(0)
    E, I, C, T, k = 8, 512, 256, 1024, 2
    store = StoredExperts(torch.randn(E, 2 * I, C, device="cuda", generator=g) * 0.05,
                          torch.randn(E, C, I, device="cuda", generator=g) * 0.05, torch.nn.SiLU())
    store.half = True  # as for wide experts (half_forward)
    calls = []
    for scale in (1.0, 1e-9, 1e7):
        index = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
        calls.append((torch.randn(T, C, device="cuda", generator=g) * scale, index,
                      torch.rand(T, k, device="cuda", generator=g)))

    def reference(hidden, index, weights):  # transformers' experts loop in float64
        out = torch.zeros(hidden.shape, dtype=torch.float64, device="cuda")
        for e in range(E):
            tokens, slots = (index == e).nonzero(as_tuple=True)
            gate, up = (hidden[tokens].double() @ store.gate_up[e].double().t()).chunk(2, dim=-1)
            y = (torch.nn.functional.silu(gate) * up) @ store.down[e].double().t()
            out.index_add_(0, tokens, y * weights[tokens, slots, None].double())
        return out

    exact = [reference(*c) for c in calls]
    with tf32_matmuls(True):
        tf32 = store.run_deferred(calls)
    with half_products(True):
        together = store.run_deferred(calls)
        alone = [store.run_deferred([c])[0] for c in calls]
    for h, a, t, e in zip(together, alone, tf32, exact):
        assert h.dtype == torch.float32 and torch.isfinite(h).all() and torch.equal(h, a)
        err = float((h.double() - e).norm() / e.norm())
        assert err < max(2 * float((t.double() - e).norm() / e.norm()), 1e-5)


@pytest.mark.gpu
def test_the_silu_kernel_gives_the_bits_of_pytorchs_activation_and_half_rows():
    """triton_kernels.silu_mul_half_rows: a gate/up product's rows times their powers of two, silu(gate) * up and
    its fp16 operand scaled row by row, the bits PyTorch's CUDA operations give (half_rows), for rows of any
    magnitude, subnormal ones included, of zeros, and holding a NaN or an infinity (those keep the scale 1)."""
    from quantmoe.gptq.triton_kernels import available, silu_mul_half_rows

    if not available("cuda"):
        pytest.skip("Triton is not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    n, I = 64, 14336 + 96  # a width that is not a multiple of the kernel's block
    Y = torch.randn(n, 2 * I, device="cuda", generator=g) * 4
    Y[1] = 0.0
    Y[2, 5] = float("nan")
    Y[3, I + 7] = float("inf")
    Y[4] *= 1e-20
    Y[5] *= 1e15
    f = 2.0 ** torch.randint(-30, 30, (n,), device="cuda", generator=g).float()
    Y[6] *= 1e-38  # subnormal products and activations: kept, then scaled up (not flushed to zero)
    f[6] = 1.0
    H, inv = silu_mul_half_rows(Y, f)
    with half_products(True):
        gate, up = (Y * f[:, None]).chunk(2, dim=-1)
        ref_h, ref_inv = half_rows(torch.nn.functional.silu(gate) * up)
    assert torch.equal(inv, ref_inv)
    assert torch.equal(H.isnan(), ref_h.isnan())
    assert torch.equal(H.nan_to_num(0.0), ref_h.nan_to_num(0.0))


def _experts_and_calls(seed: int, device: str = "cuda"):
    """8 routed experts of 1536 on 512 features (StoredExperts) and one call of 2048 tokens, 2 experts each."""
    from quantmoe.stages.experts import StoredExperts

    g = torch.Generator(device=device).manual_seed(seed)
    E, I, C, T, k = 8, 1536, 512, 2048, 2
    store = StoredExperts(torch.randn(E, 2 * I, C, device=device, generator=g) * 0.02,
                          torch.randn(E, C, I, device=device, generator=g) * 0.02, torch.nn.SiLU())
    index = torch.stack([torch.randperm(E, device=device, generator=g)[:k] for _ in range(T)])
    return store, [(torch.randn(T, C, device=device, generator=g), index,
                    torch.rand(T, k, device=device, generator=g))]


@pytest.mark.gpu
def test_the_experts_fp16_forward_gives_the_same_bits_with_and_without_the_silu_kernel():
    """StoredExperts.run_deferred on fp16 operands (wide experts under --tf32): the fused silu kernel, where it
    applies, changes no bit of the outputs."""
    from quantmoe.gptq.triton_kernels import available

    if not available("cuda"):
        pytest.skip("Triton is not installed")
    store, calls = _experts_and_calls(1)
    store.half = True
    with half_products(True):
        fused = store.run_deferred(calls)
        store.silu = False
        plain = store.run_deferred(calls)
    assert torch.equal(fused[0], plain[0])


@pytest.mark.gpu
def test_the_silu_mul_kernel_gives_the_bits_of_pytorchs_gated_rows():
    """triton_kernels.silu_mul and the statistics' gated (stages.layer.gated) with it: silu(g) * u times each row's
    router weight, the bits of PyTorch's CUDA silu, product and row product, NaN and infinity where they are, and
    subnormal results kept (Triton's libdevice would flush them)."""
    from quantmoe.gptq.triton_kernels import available, silu_mul
    from quantmoe.stages import layer

    if not available("cuda"):
        pytest.skip("Triton is not installed")
    g = torch.Generator(device="cuda").manual_seed(2)
    T, I = 3000, 2048 + 40
    G = torch.randn(T, I, device="cuda", generator=g) * 6
    U = torch.randn(T, I, device="cuda", generator=g)
    G[0, 1], G[1, 2], U[2, 3], G[3] = float("nan"), float("inf"), float("-inf"), 1e-39
    w = torch.rand(T, device="cuda", generator=g)
    for weights in (None, w, w.bfloat16()):
        ref = torch.nn.functional.silu(G) * U
        ref = ref if weights is None else ref * weights.float().reshape(-1, 1)
        out = silu_mul(G.clone(), U, weights)
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(0.0), ref.nan_to_num(0.0))
    x = torch.randn(T, 512, device="cuda", generator=g)
    Wg, Wu = (torch.randn(512, I, device="cuda", generator=g) * 0.02 for _ in range(2))
    with half_products(True):
        fused = layer.gated(x, Wg, Wu, torch.nn.SiLU(), w)
        plain = layer.gated(x, Wg, Wu, lambda t: torch.nn.functional.silu(t), w)  # not a SiLU module: PyTorch
    assert torch.equal(fused, plain)


def _bits(t):
    return t.contiguous().view(torch.int32)  # -0.0 apart from 0.0, and NaNs compared by their bits


@pytest.mark.gpu
def test_the_elementwise_forward_kernels_give_the_bits_of_pytorchs_steps():
    """triton_kernels.silu_mul_rows is transformers' ``act_fn(gate) * up`` after ``chunk(2, dim=-1)``, and
    add_scaled_rows ``out.index_add_(0, index, X * scores[:, None])``: the same bits, NaN, infinity and subnormal
    values included, router weights in fp32 or bf16."""
    from quantmoe.gptq.triton_kernels import add_scaled_rows, available, silu_mul_rows

    if not available("cuda"):
        pytest.skip("Triton is not installed")
    g = torch.Generator(device="cuda").manual_seed(3)
    n, I, T, C = 700, 2048 + 40, 3000, 1024 + 24
    Y = torch.randn(n, 2 * I, device="cuda", generator=g) * 6
    Y[0, 1], Y[1, I + 2], Y[2, 3] = float("nan"), float("inf"), float("-inf")
    Y[3] *= 1e-39  # subnormal gates and ups: kept
    gate, up = Y.chunk(2, dim=-1)
    assert torch.equal(_bits(silu_mul_rows(Y)), _bits(torch.nn.functional.silu(gate) * up))
    X = torch.randn(n, C, device="cuda", generator=g)
    X[4] *= 1e-38  # subnormal products
    index = torch.randperm(T, device="cuda", generator=g)[:n]
    base = torch.randn(T, C, device="cuda", generator=g)
    for scores in (torch.rand(n, device="cuda", generator=g), torch.rand(n, device="cuda", generator=g).bfloat16()):
        ref = base.clone().index_add_(0, index, X * scores[:, None])
        out = base.clone()
        assert add_scaled_rows(out, index, X, scores)
        assert torch.equal(_bits(out), _bits(ref))


@pytest.mark.gpu
def test_the_fp8_block_kernel_gives_the_bits_of_the_releases_dequantization():
    """triton_kernels.fp8_blocks_as_bf16: every float8_e4m3fn code but NaN times its block's scale, rounded to BF16,
    as formats.fp8 dequantizes a release's weights (float32 codes times the scale, then to BF16), ragged blocks,
    signed zeros and BF16 subnormals included; and Fp8Experts.weights gives the same numbers through it."""
    from quantmoe.formats import fp8
    from quantmoe.gptq.triton_kernels import available, fp8_blocks_as_bf16

    if not available("cuda"):
        pytest.skip("Triton is not installed")
    g = torch.Generator(device="cuda").manual_seed(4)
    R, C, block = 300, 200, (128, 128)
    byte = torch.randint(0, 256, (R, C), device="cuda", generator=g, dtype=torch.int32)
    byte.view(-1)[:254] = torch.tensor([b for b in range(256) if b & 127 != 127], device="cuda")
    byte[(byte & 127) == 127] = 0x80  # no NaN codes (Fp8Experts keeps those dequantized); -0.0 instead
    codes = byte.to(torch.uint8).view(torch.float8_e4m3fn)
    # every code (the first 254 weights) at an ordinary scale; BF16 subnormal results in two blocks
    scale = torch.tensor([[0.013, 2.0 ** -135 * 1.37], [3.1, 2.0 ** -120], [1e-3, 7.7e-6]], device="cuda")
    out = torch.empty(R, C, device="cuda")
    assert fp8_blocks_as_bf16(codes, scale, block, out)
    ref = fp8._scaled(codes, scale, block).to(torch.bfloat16).float()
    assert torch.equal(_bits(out), _bits(ref))
    assert (ref.abs() < torch.finfo(torch.float32).tiny).logical_and(ref != 0).any()  # subnormals were compared
    experts = fp8.Fp8Experts(2, [fp8.Fp8Weight(codes[:128], scale[:1], block, "gate"),
                                 fp8.Fp8Weight(codes[128:], scale[1:], block, "up")], torch.device("cuda"))
    experts.codes[:] = codes
    for e in range(2):
        experts.scales[0][e], experts.scales[1][e] = scale[:1], scale[1:]
    assert torch.equal(_bits(experts.weights(0, 2, torch.float32)), _bits(ref.expand(2, R, C)))


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, -1), (8, 64)])
def test_the_levels_kernel_gives_the_bits_of_dequantize_grouped(bits, group_size):
    """triton_kernels.dequantize_levels, from levels packed two to a byte (stages.experts.Levels) or one to a byte
    (a QuantResult's): gptq.core.dequantize_grouped's bits, fp16 subnormal scales included."""
    from quantmoe.gptq.core import QuantResult, dequantize_grouped
    from quantmoe.gptq.triton_kernels import available, dequantize_levels
    from quantmoe.stages.experts import Levels

    if not available("cuda"):
        pytest.skip("Triton is not installed")
    g = torch.Generator(device="cuda").manual_seed(5)
    B, R, C = 3, 96, 512
    G = 1 if group_size == -1 else C // group_size
    q = torch.randint(0, 2 ** bits, (B, R, C), device="cuda", generator=g, dtype=torch.int32).to(torch.uint8)
    scales = (torch.rand(B, R, G, device="cuda", generator=g) * 0.05).half()
    scales[0, 0] = 3e-7  # fp16 subnormal
    zeros = torch.randint(0, 2 ** bits, (B, R, G), device="cuda", generator=g, dtype=torch.int32).to(torch.uint8)
    levels = Levels(B, R, C, G, bits, torch.device("cuda"))
    levels.put(0, QuantResult(q=q, scales=scales, zeros=zeros, g_idx=None, W=None, loss=torch.zeros(B, R, device="cuda"),
                              damp=torch.zeros(B, device="cuda")))
    assert levels.packed == (bits == 4)
    for b in range(B):
        ref = dequantize_grouped(q[b], scales[b], zeros[b])
        assert torch.equal(_bits(levels.weight(b)), _bits(ref))
        assert torch.equal(_bits(dequantize_levels(q[b], scales[b], zeros[b], C, packed=False)), _bits(ref))


@pytest.mark.gpu
def test_the_experts_fp32_forward_gives_the_same_bits_with_and_without_its_kernels(monkeypatch):
    """StoredExperts.run_deferred on fp32 operands, from original and from quantized weights: the fused kernels
    (silu(gate) * up, the rows times their router weights added into the output, the levels' dequantization)
    change no bit of the outputs."""
    from quantmoe.gptq.triton_kernels import available
    from quantmoe.stages import experts as experts_mod
    from quantmoe.stages.experts import Levels

    if not available("cuda"):
        pytest.skip("Triton is not installed")
    store, calls = _experts_and_calls(6)
    assert not store.half
    E = store.num_experts
    spec = QuantSpec(bits=4, group_size=128)
    levels = []
    for W in (store.gate_up, store.down):
        res = gptq_quantize(W, torch.eye(W.shape[-1], device="cuda").expand(E, -1, -1), spec)
        lv = Levels(E, W.shape[1], W.shape[2], spec.groups(W.shape[2]), 4, torch.device("cuda"))
        lv.put(0, res)
        levels.append(lv)
    store.quantized = tuple(levels)
    outputs = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(experts_mod, "silu_mul_rows", lambda Y: None)
            monkeypatch.setattr(experts_mod, "add_scaled_rows", lambda *a: False)
            monkeypatch.setattr(experts_mod, "dequantize_levels", lambda *a: None)
        for quantized in (False, True):
            store.use_quantized = quantized
            outputs[fused, quantized] = store.run_deferred(calls)[0]
    for quantized in (False, True):
        assert torch.equal(_bits(outputs[True, quantized]), _bits(outputs[False, quantized]))
    assert not torch.equal(outputs[True, False], outputs[True, True])


@pytest.mark.gpu
def test_experts_stored_fused_and_transposed_quantize_on_cuda_as_stored_per_expert(tmp_path):
    """Qwen3-VL-MoE's BF16 releases store the routed experts fused and transposed (gate_up (E, H, 2I)); read onto
    the device and laid out there, they give on CUDA the bytes of the same weights stored one linear per expert."""
    from tiny import make_nested_release, write_text

    import quantmoe
    from quantmoe.base.options import QuantConfig

    text = write_text(tmp_path / "text.jsonl")
    fused = make_nested_release(tmp_path / "fused", family="qwen3_vl_moe")
    per_expert = make_nested_release(tmp_path / "per-expert", fused=False, family="qwen3_vl_moe")
    outs = []
    for src in (fused, per_expert):
        out = tmp_path / f"out-{src.name}"
        quantmoe.quantize(src, out, QuantConfig(group_size=32), calib=text, nsamples=8, seqlen=64, device="cuda",
                          tf32=True, run_eval=False, quiet=True)
        outs.append(next(out.glob("*.safetensors")).read_bytes())
    assert outs[0] == outs[1]
