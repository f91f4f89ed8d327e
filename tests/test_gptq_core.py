"""The GPTQ core and the GPTQ v1 packing, on random matrices."""

import pytest
import torch

from quantmoe.formats.gptq_v1 import (
    dequantize_linear,
    pack_result,
    unpack_levels,
    unpack_linear,
)
from quantmoe.gptq import core
from quantmoe.gptq.core import (
    ORDERS,
    QuantSpec,
    accumulate_hessian,
    accumulate_moment,
    dequantize,
    dequantize_grouped,
    finish_moment,
    gptq_quantize,
    moment_sum,
    rtn_quantize,
)
from quantmoe.stages.experts import Levels


def correlated_inputs(T=2048, C=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, C, generator=g) @ torch.randn(C, C, generator=g) * 0.2


def hessian_of(X):
    H, _ = accumulate_hessian(torch.zeros(X.shape[1], X.shape[1]), X, 0)
    return H


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("order", ORDERS)
def test_gptq_beats_rtn_and_packing_round_trips(bits, group_size, sym, order):
    X = correlated_inputs()
    W = torch.randn(2, 64, 128)
    spec = QuantSpec(bits, group_size, sym)
    res = gptq_quantize(W, hessian_of(X).expand(2, 128, 128), spec, order=order)
    rtn = rtn_quantize(W, spec)
    err_gptq = ((X @ (res.W[0] - W[0]).T) ** 2).mean()
    err_rtn = ((X @ (rtn.W[0] - W[0]).T) ** 2).mean()
    assert err_gptq < 0.7 * err_rtn
    assert torch.equal(res.W, dequantize(res.q, res.scales, res.zeros, res.g_idx))
    for b, packed in enumerate(pack_result(res, bits)):
        assert torch.equal(dequantize_linear(packed, bits), res.W[b])
        q, scales, zeros, g_idx = unpack_linear(packed, bits)
        assert torch.equal(q, res.q[b].long()) and torch.equal(zeros, res.zeros[b].long())
        # read back as the levels a resumed run replays its experts from (resume.expert_levels), never widened
        held = Levels(1, 64, 128, scales.shape[1], bits, torch.device("cpu"))
        held.q[0], held.scales[0], held.zeros[0] = unpack_levels(packed, bits)
        assert torch.equal(held.levels(0), res.q[b]) and torch.equal(held.weight(0), res.W[b])


def test_packed_shapes_and_dtypes():
    res = rtn_quantize(torch.randn(1, 96, 256), QuantSpec(4, 128, True))
    packed = pack_result(res, 4)[0]
    assert packed["qweight"].shape == (256 * 4 // 32, 96) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (2, 96 * 4 // 32) and packed["qzeros"].dtype == torch.int32
    assert packed["scales"].shape == (2, 96) and packed["scales"].dtype == torch.float16
    assert packed["g_idx"].shape == (256,) and packed["g_idx"].dtype == torch.int32


def test_v1_zero_convention_and_low_bits_first():
    """Symmetric 4-bit zero is 8, stored as 7 in every nibble; level of column 0 sits in the low bits."""
    res = rtn_quantize(torch.randn(1, 8, 32), QuantSpec(4, 32, True))
    packed = pack_result(res, 4)[0]
    assert int(packed["qzeros"][0, 0]) == 0x77777777
    assert int(packed["qweight"][0, 0]) & 0xF == int(res.q[0, 0, 0])


@pytest.mark.parametrize("order", ORDERS)
def test_every_order_keeps_g_idx_monotonic(order):
    X = correlated_inputs()
    res = gptq_quantize(torch.randn(1, 32, 128), hessian_of(X)[None], QuantSpec(4, 32, True), order=order)
    assert torch.equal(res.g_idx, torch.arange(128, dtype=torch.int32) // 32)


def test_singular_hessian_raises_dampening_and_stays_finite():
    """A rank-1 Hessian with one dead input: Cholesky needs more dampening; nothing is NaN or zeroed."""
    x = torch.randn(1, 64)
    x[0, 5] = 0
    H = (x.T @ x)[None]
    W = torch.randn(1, 16, 64)
    res = gptq_quantize(W, H, QuantSpec(4, 32, True), damp=1e-12)
    assert torch.isfinite(res.W).all()
    assert res.damp[0] > 1e-12
    assert res.W[0, :, 5].abs().sum() > 0  # a dead input keeps its (rounded) weights


def test_hessian_accumulates_as_a_mean():
    X = torch.randn(100, 8)
    H = torch.zeros(8, 8)
    n = 0
    for chunk in X.split(30):
        H, n = accumulate_hessian(H, chunk, n)
    assert n == 100
    assert torch.allclose(H, 2 * X.T @ X / 100, atol=1e-5)


def test_inverse_factor_matches_cholesky_of_the_inverse():
    """U from the reversed factorisation is the upper Cholesky factor of (H + damp)^-1 (float64 reference)."""
    from quantmoe.gptq.core import damped_inverse_cholesky

    X = correlated_inputs(T=512, C=96).double()
    H = (2 * X.T @ X / 512)[None].repeat(2, 1, 1)
    H[1] *= 3
    damp = 0.01
    reference = torch.stack([
        torch.linalg.cholesky(torch.linalg.inv(h + damp * torch.diagonal(h).mean() * torch.eye(96, dtype=h.dtype)),
                              upper=True) for h in H])
    U, used = damped_inverse_cholesky(H.clone(), damp)
    assert torch.allclose(U, reference, rtol=1e-8, atol=1e-10)
    assert torch.equal(U, U.triu()) and torch.equal(used, torch.full((2,), damp, dtype=H.dtype))


def test_overwrite_H_gives_the_same_result_and_consumes_H():
    X = correlated_inputs()
    H = hessian_of(X).expand(2, 128, 128).contiguous()
    W = torch.randn(2, 64, 128)
    kept = gptq_quantize(W, H, QuantSpec(4, 32, True))
    H_copy = H.clone()
    handed_over = gptq_quantize(W, H_copy, QuantSpec(4, 32, True), overwrite_H=True)
    assert torch.equal(kept.q, handed_over.q) and torch.equal(kept.W, handed_over.W)
    assert not torch.equal(H_copy, H)  # it now holds the inverse factor


@pytest.mark.parametrize("order,group_size,outer", [("static", 32, 64), ("group", 32, 64), ("none", 32, 70),
                                                     ("static", -1, 70)])
def test_the_error_spread_in_two_steps_is_the_one_step_spread_regrouped(order, group_size, outer, monkeypatch):
    """gptq_quantize's ``outer`` (spans of whole blocks and groups; 70 rounds down to 64): each column gets the same
    errors in fewer sums, so in float64 the levels, grids and losses are the one-step spread's to rounding, while
    the columns after a span get its errors in one product per span; the default off CUDA is one step, the same
    bits as ``outer=0``."""
    from quantmoe.gptq import core

    X = correlated_inputs(C=160).double()
    H = hessian_of(X).expand(2, 160, 160).contiguous()
    W = torch.randn(2, 48, 160, dtype=torch.float64)
    spec = QuantSpec(4, group_size, True)
    one = gptq_quantize(W, H, spec, order=order, block_size=16, outer=0)
    widths = []  # the errors each nonempty spread takes at once
    spread = core._propagate
    monkeypatch.setattr(core, "_propagate", lambda W, E, Hi: (W.shape[-1] and widths.append(E.shape[-1]),
                                                              spread(W, E, Hi)))
    two = gptq_quantize(W, H, spec, order=order, block_size=16, outer=outer)
    assert sorted(set(widths)) == [16, 64] and widths.count(64) == 2  # after the spans ending at 64 and 128
    assert torch.equal(one.q, two.q) and torch.equal(one.scales, two.scales)
    assert torch.allclose(one.loss, two.loss, rtol=1e-6)
    default = gptq_quantize(W.float(), H.float(), spec, order=order, block_size=16)
    assert torch.equal(default.q, gptq_quantize(W.float(), H.float(), spec, order=order, block_size=16, outer=0).q)


def test_tf32_context_restores_the_matmul_precision():
    from quantmoe.gptq.core import tf32_matmuls

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with tf32_matmuls(True):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with tf32_matmuls(False):
        assert matmul.fp32_precision == before


def heavy_tailed(B=2, R=64, C=256, seed=0):
    """Weights with a few outliers per row, where clipping them pays off."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(B, R, C, generator=g) * 0.02
    spikes = torch.rand(B, R, C, generator=g) < 0.01
    return torch.where(spikes, W * 8, W)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_clip_search_never_loses_to_min_max(sym, weighted):
    """The searched grid's weighted rounding error is at most min/max's for every row; levels stay in range."""
    from quantmoe.gptq.core import (
        ClipSearch,
        find_params,
        quantize_levels,
        rounding_error,
        search_params,
    )

    spec = QuantSpec(4, 128, sym)
    W = heavy_tailed().reshape(2, 64, 2, 128)
    g = torch.Generator().manual_seed(1)
    importance = torch.rand(2, 1, 2, 128, generator=g) * 10 if weighted else None
    s0, z0 = find_params(W, spec)
    s, z = search_params(W, spec, ClipSearch(steps=20, min_ratio=0.5, max_ratio=1.1), importance)
    before = rounding_error(W, s0, z0, spec.maxq, importance)
    after = rounding_error(W, s, z, spec.maxq, importance)
    assert torch.isfinite(after).all() and torch.isfinite(s).all() and (s > 0).all()
    assert (after <= before).all()
    assert after.sum() < 0.95 * before.sum()  # outliers make clipping worth it on many rows
    assert torch.equal(s, s.half().float())  # fp16-exact, as exported
    levels = quantize_levels(W, s[..., None], z[..., None], spec.maxq)
    assert levels.min() >= 0 and levels.max() <= spec.maxq
    if sym:
        assert (z == 8).all()
    else:
        assert z.min() >= 1 and z.max() <= spec.maxq


def test_clip_search_off_is_min_max():
    from quantmoe.gptq.core import ClipSearch, find_params, search_params

    W = heavy_tailed().reshape(2, 64, 2, 128)
    s0, z0 = find_params(W, QuantSpec(4, 128, True))
    s, z = search_params(W, QuantSpec(4, 128, True), ClipSearch(steps=0))
    assert torch.equal(s, s0) and torch.equal(z, z0)


@pytest.mark.parametrize("order", ORDERS)
def test_gptq_with_clip_search_is_valid_v1(order):
    """Searched grids through GPTQ: finite, symmetric int4 levels in range, static g_idx, and the
    output error no worse than RTN's with the same search."""
    from quantmoe.gptq.core import ClipSearch

    X = correlated_inputs(C=256)
    W = heavy_tailed()
    spec, search = QuantSpec(4, 128, True), ClipSearch(steps=16)
    res = gptq_quantize(W, hessian_of(X).expand(2, 256, 256), spec, order=order, search=search)
    assert torch.isfinite(res.W).all() and res.q.max() <= 15 and (res.zeros == 8).all()
    assert torch.equal(res.g_idx, torch.arange(256, dtype=torch.int32) // 128)
    assert torch.equal(res.W, dequantize(res.q, res.scales, res.zeros, res.g_idx))
    rtn = rtn_quantize(W, spec, search)
    err = ((X @ (res.W[0] - W[0]).T) ** 2).mean()
    assert err < ((X @ (rtn.W[0] - W[0]).T) ** 2).mean()


def test_group_order_keeps_groups_together():
    """Group-aware act-order: each group's columns are quantized together, by decreasing Hessian
    diagonal, and groups go by decreasing largest diagonal."""
    from quantmoe.gptq.core import column_order

    g = torch.Generator().manual_seed(0)
    diag = torch.rand(3, 512, generator=g)
    perm = column_order(diag, "group", 128)
    for b in range(3):
        assert torch.equal(perm[b].sort().values, torch.arange(512))
        chunks = perm[b].reshape(4, 128)
        assert all(len(set((chunk // 128).tolist())) == 1 for chunk in chunks)
        d = diag[b][chunks]
        assert (d[:, :-1] >= d[:, 1:]).all()
        assert (d[:-1, 0] >= d[1:, 0]).all()
        assert torch.equal(d[:, 0], diag[b].reshape(4, 128).amax(-1).sort(descending=True).values)


def test_weighted_hessian_counts_weighted_rows():
    X = torch.randn(50, 8)
    w = torch.rand(50)
    H, n = accumulate_hessian(torch.zeros(8, 8), X[:20], 0, w[:20])
    H, n = accumulate_hessian(H, X[20:], n, w[20:])
    assert abs(n - float((w ** 2).sum())) < 1e-4
    assert torch.allclose(H, 2 * (X * w[:, None]).T @ (X * w[:, None]) / (w ** 2).sum(), atol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_a_moment_summed_at_once_is_the_running_mean_up_to_rounding(weighted):
    """moment_sum + finish_moment (the routed experts' statistics: all rows at once, no host sync) give
    accumulate_moment's batch-by-batch 2/n mean and n; an expert with no rows keeps a zero moment."""
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(300, 16, generator=g), torch.randn(300, 8, generator=g)
    w = torch.rand(300, generator=g) if weighted else None
    P, n = torch.zeros(8, 16), 0
    for start in range(0, 300, 70):
        P, n = accumulate_moment(P, Y[start:start + 70], X[start:start + 70], n,
                                 None if w is None else w[start:start + 70])
    S = torch.zeros(8, 16)
    m = moment_sum(S, Y[:150], X[:150], None if w is None else w[:150])
    m = m + moment_sum(S, Y[150:], X[150:], None if w is None else w[150:])
    finish_moment(S, m)
    assert abs(float(m) - n) < 1e-3 and torch.allclose(S, P, rtol=1e-5, atol=1e-6)
    assert not torch.equal(S, torch.zeros_like(S))
    empty = torch.zeros(8, 16)
    finish_moment(empty, moment_sum(empty, Y[:0], X[:0], None if w is None else w[:0]))
    assert torch.equal(empty, torch.zeros_like(empty))
    zero_weights = torch.zeros(8, 16)
    finish_moment(zero_weights, moment_sum(zero_weights, Y, X, torch.zeros(300)))
    assert torch.isfinite(zero_weights).all() and not zero_weights.any()


@pytest.mark.parametrize("weighted", [False, True])
def test_a_wide_hessian_built_from_its_lower_half_is_the_whole_product_up_to_rounding(monkeypatch, weighted):
    """A Hessian at least GRAM_MIN wide is built block by block from its lower half and mirrored (_gram): the
    running mean and the summed moment both give the whole product's values up to fp32 rounding, every entry
    (above the diagonal blocks too), mirrored exactly; summed chunk by chunk without mirroring, the mirror made
    once by finish_moment gives the same bits as mirroring every chunk; a narrower one is the one product it
    was, bit for bit."""
    monkeypatch.setattr(core, "GRAM_BLOCK", 8)
    monkeypatch.setattr(core, "GRAM_MIN", 16)
    widths = []
    gram = core._gram
    monkeypatch.setattr(core, "_gram", lambda S, X, alpha=1.0, mirror=True: widths.append(X.t.shape[1])
                        or gram(S, X, alpha, mirror))
    g = torch.Generator().manual_seed(2)
    X = torch.randn(300, 37, generator=g) @ torch.randn(37, 37, generator=g)  # 37: a partial last block
    w = torch.rand(300, generator=g) if weighted else None
    Xw = X.double() if w is None else X.double() * w.double()[:, None]
    exact = 2 * Xw.T @ Xw / (300 if w is None else float((w.double() ** 2).sum()))
    H, n = torch.zeros(37, 37), 0
    for start in range(0, 300, 70):
        H, n = accumulate_hessian(H, X[start:start + 70], n, None if w is None else w[start:start + 70])
    S = torch.zeros(37, 37)
    finish_moment(S, moment_sum(S, X, X, w))
    block = torch.arange(37) // 8
    mirrored = block[:, None] != block[None, :]  # outside the diagonal blocks, which one product each makes whole
    for built in (H, S):
        assert torch.equal(built[mirrored], built.T[mirrored])
        assert torch.allclose(built.double(), exact, rtol=1e-5, atol=1e-4 * float(exact.abs().max()))
    assert widths == [37] * 6  # five batches of the running mean, one sum
    chunked, late = torch.zeros(37, 37), torch.zeros(37, 37)
    n = 0
    for start in range(0, 300, 70):
        rows, part = X[start:start + 70], None if w is None else w[start:start + 70]
        n = n + moment_sum(chunked, rows, rows, part)
        moment_sum(late, rows, rows, part, mirror=False)
    assert not torch.equal(late[mirrored], late.T[mirrored])  # the upper part is not there yet
    assert torch.equal(finish_moment(late, n, mirror=True), finish_moment(chunked, n))
    widths.clear()
    narrow = X[:, :15]
    S = torch.zeros(15, 15)
    moment_sum(S, narrow, narrow)
    assert torch.equal(S, torch.zeros(15, 15).addmm_(narrow.t(), narrow)) and widths == []


def test_grouped_dequantization_is_the_gathered_one_bit_for_bit():
    """dequantize_grouped (GPTQ's own layout) gives exactly dequantize's values, one group or several."""
    g = torch.Generator().manual_seed(2)
    for groups in (1, 4):
        q = torch.randint(0, 16, (3, 6, 32), generator=g, dtype=torch.uint8)
        scales = torch.rand(3, 6, groups, generator=g).half()
        zeros = torch.randint(0, 16, (3, 6, groups), generator=g, dtype=torch.uint8)
        g_idx = (torch.arange(32) // (32 // groups)).int()
        assert torch.equal(dequantize_grouped(q, scales, zeros), dequantize(q, scales, zeros, g_idx))


def test_target_of_matching_inputs_changes_nothing_and_fits_shifted_ones():
    """P = W H (the inputs are the original ones) gives GPTQ's own result; when the inputs seen
    differ from the original ones, the fitted weights map them closer to the original outputs."""
    X = correlated_inputs(C=128)
    W = torch.randn(1, 64, 128) * 0.1
    H = hessian_of(X)[None]
    spec = QuantSpec(4, 128, True)
    plain = gptq_quantize(W, H, spec)
    same = gptq_quantize(W, H, spec, target=W @ H)
    assert torch.allclose(plain.W, same.W, atol=1e-5) or (plain.q != same.q).float().mean() < 0.01
    g = torch.Generator().manual_seed(3)
    Xq = X + 0.3 * torch.randn(X.shape, generator=g) @ torch.randn(128, 128, generator=g) * 0.05  # inputs behind quantized layers
    Hq = hessian_of(Xq)[None]
    P = (2 * (X @ W[0].T).T @ Xq / X.shape[0])[None]
    fitted = gptq_quantize(W, Hq, spec, target=P)
    unfitted = gptq_quantize(W, Hq, spec)
    Y = X @ W[0].T
    assert ((Xq @ fitted.W[0].T - Y) ** 2).mean() < 0.9 * ((Xq @ unfitted.W[0].T - Y) ** 2).mean()


@pytest.mark.parametrize("order", ORDERS)
def test_refine_lowers_gptq_loss_and_keeps_the_format(order):
    """Coordinate descent after GPTQ: the error GPTQ minimises never grows (row by row), levels stay
    in range, the grids and g_idx are GPTQ's, and W is what the levels dequantize to."""
    X = correlated_inputs(C=256)
    W = heavy_tailed()
    H = hessian_of(X).expand(2, 256, 256)
    spec = QuantSpec(4, 128, True)
    plain = gptq_quantize(W, H, spec, order=order)
    refined = gptq_quantize(W, H, spec, order=order, refine=2)
    Hd = H[0] + 0.01 * torch.diagonal(H[0]).mean() * torch.eye(256)

    def proxy(res):
        E = W - res.W
        return torch.einsum("brc,cd,brd->br", E, Hd, E)

    assert (proxy(refined) <= proxy(plain) * (1 + 1e-4) + 1e-9).all()
    assert proxy(refined).sum() < proxy(plain).sum()
    assert torch.allclose(refined.loss, proxy(refined) / 2, rtol=1e-3)
    assert torch.equal(refined.scales, plain.scales) and torch.equal(refined.g_idx, plain.g_idx)
    assert refined.q.max() <= 15 and torch.isfinite(refined.W).all()
    assert torch.equal(refined.W, dequantize(refined.q, refined.scales, refined.zeros, refined.g_idx))


def batch_independence_mismatches(device: str = "cpu", block_fn=None, tf32: bool = False) -> list[str]:
    """Solve 8 matrices (stream-fit targets, clipping search, act-order) as one batch, as two
    batches of 4 and one by one, as 1, 2 or 8 processes would share them; return what differs.
    ``tf32``: gptq_quantize's (TF32 products in the fit, the inverse and the error spread, on CUDA)."""
    from quantmoe.gptq.core import ClipSearch, quantize_block

    g = torch.Generator(device=device).manual_seed(5)
    B, R, C = 8, 96, 256
    W = torch.randn(B, R, C, device=device, generator=g) * 0.02
    H, X0 = torch.empty(B, C, C, device=device), torch.empty(B, C, C, device=device)
    for b in range(B):
        X = torch.randn(512, C, device=device, generator=g)
        X = X + 0.5 * X.roll(1, dims=1)
        H[b] = 2 * X.T @ X / 512
        X0[b] = 2 * (X + 0.1 * torch.randn(512, C, device=device, generator=g)).T @ X / 512
    spec, search = QuantSpec(4, 128, True), ClipSearch(20, 0.6, 1.0, "residual")

    def run(idx, **fit):
        return gptq_quantize(W[idx], H[idx], spec, block_fn=block_fn or quantize_block, search=search, tf32=tf32,
                             **{k: v[idx] for k, v in fit.items()})

    bad = []
    for fit in ({}, {"cross": X0}, {"target": W @ X0}):
        whole = run(list(range(B)), **fit)
        for idx in ([0, 1, 2, 3], [4, 5, 6, 7], *([b] for b in range(B))):
            part = run(idx, **fit)
            for name in ("q", "scales", "zeros", "W", "damp"):
                if not torch.equal(getattr(whole, name)[idx], getattr(part, name)):
                    bad.append(f"{sorted(fit)} {idx} {name}")
    return bad


def test_a_matrix_gets_the_same_bits_whatever_else_is_in_its_batch():
    """Processes share a layer's experts, so a matrix's result must not depend on which others are
    solved beside it (a batched mean of the Hessian diagonals once made 2 GPUs differ from 1)."""
    assert batch_independence_mismatches() == []


def test_cross_moment_gives_the_target_result():
    """cross C = 2/n sum x0 x^T stands for target P = W C: the same fit, rounded otherwise."""
    X = correlated_inputs(C=128)
    g = torch.Generator().manual_seed(4)
    Xq = X @ (torch.eye(128) + 0.05 * torch.randn(128, 128, generator=g))  # inputs behind quantized layers
    W = torch.randn(2, 192, 128, generator=g) * 0.1
    Hq = hessian_of(Xq).expand(2, 128, 128)
    C0 = (2 * X.T @ Xq / X.shape[0]).expand(2, 128, 128)
    spec = QuantSpec(4, 128, True)
    by_target = gptq_quantize(W, Hq, spec, target=W @ C0)
    by_cross = gptq_quantize(W, Hq, spec, cross=C0)
    plain = gptq_quantize(W, Hq, spec)
    assert (by_cross.q != by_target.q).float().mean() < 0.01
    assert (by_cross.q != plain.q).float().mean() > 0.05  # the fit did move the weights
    Y = X @ W[0].T
    err = lambda res: float(((Xq @ res.W[0].T - Y) ** 2).mean())  # noqa: E731
    assert err(by_cross) == pytest.approx(err(by_target), rel=0.02) and err(by_cross) < 0.9 * err(plain)


def test_chunked_grid_search_gives_each_matrix_its_own_bits(monkeypatch):
    """The clipping search and the static grids run over chunks of matrices (gptq.matrix_chunks): a matrix's
    grid is bit for bit the one it gets alone, in a batch of 5 held in one chunk and in chunks of 2."""
    from quantmoe.gptq import core
    from quantmoe.gptq.core import ClipSearch, group_params, static_grids

    g = torch.Generator().manual_seed(11)
    B, R, C = 5, 24, 200  # 200 columns: the last group of 64 is padded
    W = torch.randn(B, R, C, generator=g) * 0.02
    importance = torch.rand(B, C, generator=g) + 0.1
    perm = torch.stack([torch.randperm(C, generator=g) for _ in range(B)])
    spec, search = QuantSpec(4, 64, False), ClipSearch(20, 0.6, 1.0)
    alone = [(group_params(W[b:b + 1], spec, search, importance[b:b + 1]),
              static_grids(W[b:b + 1], perm[b:b + 1], spec, search, importance[b:b + 1])) for b in range(B)]

    def bits_equal(a, b):
        return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))

    for chunk_bytes in (core.CHUNK_BYTES, 2 * R * C * 4):  # all five at once; chunks of 2, 2 and 1
        monkeypatch.setattr(core, "CHUNK_BYTES", chunk_bytes)
        grouped = group_params(W, spec, search, importance)
        static = static_grids(W, perm, spec, search, importance)
        for b, (one, one_static) in enumerate(alone):
            for got, want in ((grouped, one), (static, one_static)):
                assert bits_equal(got[0][b:b + 1], want[0]) and bits_equal(got[1][b:b + 1], want[1]), (chunk_bytes, b)
    assert [(s.start, s.stop) for s in core.matrix_chunks(B, R * C * 4)] == [(0, 2), (2, 4), (4, 5)]
    natural = torch.empty_like(W)
    for b in range(B):
        natural[b][:, perm[b]] = W[b]  # W[b][:, k] is column perm[b, k]
    unpermuted = group_params(natural, spec, search, importance)
    assert bits_equal(static[0], unpermuted[0]) and bits_equal(static[1], unpermuted[1])
    assert not torch.equal(static[0], grouped[0])  # the permutation was undone, not ignored


def test_dampening_retries_wait_for_the_device_once_and_keep_each_matrix_bits():
    """Matrices whose Cholesky fails are redone after the others, from the lower half kept in H: each gets the
    dampening and the bits it gets alone, and U is zero below the diagonal."""
    from quantmoe.gptq.core import damped_inverse_cholesky

    g = torch.Generator().manual_seed(3)
    X = torch.randn(16, 160, generator=g)
    low_rank = 2 * X.T @ X / 16  # rank 16: needs more dampening than 1e-9 of its mean diagonal
    H = torch.stack([low_rank, hessian_of(torch.randn(640, 160, generator=g)), low_rank * 3])
    U, used = damped_inverse_cholesky(H.clone(), 1e-9)
    assert used[1] == pytest.approx(1e-9) and (used[[0, 2]] > 1e-9).all()
    assert torch.isfinite(U).all() and torch.equal(U, U.triu())
    for b in range(3):
        Ub, used_b = damped_inverse_cholesky(H[b:b + 1].clone(), 1e-9)
        assert torch.equal(Ub[0].view(torch.int32), U[b].view(torch.int32)) and torch.equal(used_b[0], used[b])
        # A retry starts from exactly J H J: the result is a first try's with the dampening that worked.
        first_try, _ = damped_inverse_cholesky(H[b:b + 1].clone(), float(used[b]))
        assert torch.equal(first_try[0].view(torch.int32), U[b].view(torch.int32))


def _relative_error(X: torch.Tensor, reference: torch.Tensor) -> float:
    return float((X.double() - reference).norm() / reference.norm())


@pytest.mark.parametrize("kind", ["well-conditioned", "hessian", "ill-conditioned"])
@pytest.mark.parametrize("C,leaf", [(300, 512), (700, 128), (1000, 96)])
def test_triangular_inverse_is_a_triangular_solve_up_to_fp32_rounding(kind, C, leaf):
    """The blocked inverse (leaves by solve_triangular, the rest by products; 700/128 and 1000/96 recurse
    unevenly) is as close to the float64 inverse as fp32 solve_triangular against an identity is, on a
    well-conditioned factor, on a damped Hessian of correlated inputs as GPTQ sees and on one of a
    product of random matrices, barely damped (condition number about 1e5); it is zero above the
    diagonal, and written into a transposed view, as damped_inverse_cholesky does, it gives the same bits."""
    from quantmoe.gptq.core import triangular_inverse

    g = torch.Generator().manual_seed(C)
    if kind == "well-conditioned":
        A = torch.randn(C, C, generator=g, dtype=torch.float64) / C**0.5
        H = A @ A.T + torch.eye(C, dtype=torch.float64)
    else:
        X = torch.randn(4 * C, C, generator=g, dtype=torch.float64)
        X = X + 0.5 * X.roll(1, dims=1) + 0.3 * X[:, :1]  # correlated columns, as activations are
        if kind == "ill-conditioned":
            X = torch.randn(C, C, generator=g, dtype=torch.float64) @ torch.randn(C, C, generator=g, dtype=torch.float64)
        H = 2 * X.T @ X / X.shape[0]
        H += (0.01 if kind == "hessian" else 1e-4) * H.diagonal().mean() * torch.eye(C, dtype=torch.float64)
    L = torch.linalg.cholesky(H).float()
    reference = torch.linalg.solve_triangular(L.double(), torch.eye(C, dtype=torch.float64), upper=False)
    solved = torch.linalg.solve_triangular(L, torch.eye(C), upper=False)
    L_before = L.clone()
    inverse = triangular_inverse(L, leaf)
    assert torch.equal(L, L_before)
    assert torch.equal(inverse.triu(1), torch.zeros(C, C))
    assert _relative_error(inverse, reference) <= 1.6 * _relative_error(solved, reference)
    assert _relative_error(inverse, reference) < (2e-7 if kind == "well-conditioned" else 1e-6)
    storage = torch.full((C, C), float("nan"))
    into_view = triangular_inverse(L, leaf, out=storage.mT)
    assert into_view.data_ptr() == storage.data_ptr()
    assert torch.equal(storage.mT.view(torch.int32), inverse.view(torch.int32))


def test_inverse_factor_wider_than_a_leaf_matches_cholesky_of_the_inverse():
    """At 700 columns damped_inverse_cholesky's triangular inverse recurses (leaves of 512): U is still
    the upper Cholesky factor of (H + damp)^-1 (float64), and in fp32 a matrix gets the same bits alone
    as in a batch of three."""
    from quantmoe.gptq.core import damped_inverse_cholesky

    C = 700
    X = correlated_inputs(T=2 * C, C=C).double()
    H = (2 * X.T @ X / X.shape[0])[None].repeat(3, 1, 1)
    H[1] *= 3
    H[2] += torch.diag(torch.linspace(0, 1, C, dtype=H.dtype))
    reference = torch.stack([
        torch.linalg.cholesky(torch.linalg.inv(h + 0.01 * torch.diagonal(h).mean() * torch.eye(C, dtype=h.dtype)),
                              upper=True) for h in H])
    U, _ = damped_inverse_cholesky(H.clone(), 0.01)
    assert torch.allclose(U, reference, rtol=1e-7, atol=1e-9) and torch.equal(U, U.triu())
    U32, used = damped_inverse_cholesky(H.float(), 0.01)
    for b in range(3):
        alone, _ = damped_inverse_cholesky(H[b:b + 1].float(), 0.01)
        assert torch.equal(alone[0].view(torch.int32), U32[b].view(torch.int32))
