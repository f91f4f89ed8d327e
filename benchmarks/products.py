"""Matrix products on one GPU: what `--tf32`'s statistics gain from fp16 operands, and what narrow inverse
factors gain from several CUDA streams (rejected: see benchmarks/README.md).

    PYTHONPATH=. python3 benchmarks/products.py            # writes $OUT/products.json (or ./products.json)

- ``products``: TFLOP/s of one product at Mixtral-8x7B's and DeepSeek-V3's statistics shapes (rows x columns x
  width as named) in fp32, TF32, fp16 and bf16 with fp32 results (``torch.mm(..., out_dtype=torch.float32)``, as
  gptq.core makes them), and the ms to scale and round the left operand to fp16.
- ``hessian_numerics``: one Hessian X^T X of columns scaled over six orders of magnitude with outliers, from fp32,
  TF32, fp16 after a power-of-two scale, and bf16 inputs, against float64: relative error of the whole, and of its
  entries on the correlation scale (divided by the square roots of the two diagonal entries).
- ``inverse_factors``: gptq.core._invert_reversed over B matrices of width C, one after another or round-robin
  over 2 or 4 CUDA streams (seconds, and whether the results are the one stream's bits).
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from quantmoe.gptq.core import _invert_reversed

dev = torch.device("cuda")
out = {"benchmark": "products", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}


def timeit(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


# products
def rates(m: int, k: int, n: int, g: torch.Generator) -> dict:
    A = torch.randn(m, k, device=dev, generator=g)
    B = torch.randn(k, n, device=dev, generator=g)
    fl = 2 * m * k * n
    r = {}
    torch.backends.cuda.matmul.allow_tf32 = True
    r["tf32"] = fl / timeit(lambda: A @ B) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    r["fp32"] = fl / timeit(lambda: A @ B, 2) / 1e12
    A16, B16 = A.half(), B.half()
    r["fp16_out32"] = fl / timeit(lambda: torch.mm(A16, B16, out_dtype=torch.float32)) / 1e12
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    r["fp16_out16"] = fl / timeit(lambda: A16 @ B16) / 1e12
    Ab, Bb = A.bfloat16(), B.bfloat16()
    r["bf16_out32"] = fl / timeit(lambda: torch.mm(Ab, Bb, out_dtype=torch.float32)) / 1e12
    S = torch.zeros(m, n, device=dev)
    r["fp16_addmm_out32"] = fl / timeit(lambda: torch.addmm(S, A16, B16, out_dtype=torch.float32)) / 1e12
    r["fp16_addmm_inplace"] = fl / timeit(lambda: torch.addmm(S, A16, B16, out_dtype=torch.float32, out=S)) / 1e12

    def conv():
        s = torch.exp2(14 - torch.ceil(torch.log2(A.abs().amax())))
        return (A * s).half()

    r["convert_ms"] = timeit(conv) * 1e3
    r["tflops_units"] = "TFLOP/s"
    return r


res = {}
gen = torch.Generator(device=dev).manual_seed(0)
for name, shape in {"gate_up_mixtral": (8192, 4096, 28672), "down_mixtral": (8192, 14336, 4096),
                    "gram_mixtral": (14336, 8192, 14336), "gram_ds_gu": (7168, 8192, 7168),
                    "gate_up_ds": (8192, 7168, 4096)}.items():
    res[name] = rates(*shape, gen)
    torch.cuda.empty_cache()
out["products"] = res
print(json.dumps(res, indent=1), flush=True)

# a Hessian's numerics
num = {}
torch.manual_seed(1)
x = torch.randn(16384, 2048, device=dev, dtype=torch.float64)
x = x * torch.exp(torch.randn(2048, device=dev, dtype=torch.float64) * 1.5)  # columns of very different scales
x[:, :8] *= 300.0  # outlier columns
ref = x.t() @ x
xf = x.float()
torch.backends.cuda.matmul.allow_tf32 = True
t32 = (xf.t() @ xf).double()
torch.backends.cuda.matmul.allow_tf32 = False
f32 = (xf.t() @ xf).double()
s = torch.exp2(14 - torch.ceil(torch.log2(xf.abs().amax())))
x16 = (xf * s).half()
f16 = torch.mm(x16.t(), x16, out_dtype=torch.float32).double() / (s.double() ** 2)
xb = xf.bfloat16()
b16 = torch.mm(xb.t(), xb, out_dtype=torch.float32).double()
d = ref.diagonal().sqrt()
for name, H in {"fp32": f32, "tf32": t32, "fp16_scaled": f16, "bf16": b16}.items():
    rel = ((H - ref) / (d[:, None] * d[None, :])).abs()  # correlation-scale error
    num[name] = {"fro_rel": float((H - ref).norm() / ref.norm()), "corr_max": float(rel.max()),
                 "corr_mean": float(rel.mean())}
out["hessian_numerics"] = num
print(json.dumps(num, indent=1), flush=True)
del x, ref, xf, t32, f32, x16, f16, xb, b16
torch.cuda.empty_cache()

# inverse factors on one stream or several
inv = {}


def spd(B, C):
    X = torch.randn(2 * C, C, device=dev)
    H = X.t() @ X / (2 * C)
    return H.expand(B, C, C).clone()


def factors(H, nstreams):
    B, C, _ = H.shape
    H = H.flip((1, 2))
    diag = H.diagonal(dim1=1, dim2=2).clone()
    lower = torch.ones(C, C, dtype=torch.bool, device=dev).tril_(-1)
    add = torch.full((B,), 0.01, device=dev)
    if nstreams <= 1:
        return [_invert_reversed(H[b], diag[b], add[b], lower) for b in range(B)], H
    streams = [torch.cuda.Stream() for _ in range(nstreams)]
    ev = torch.cuda.Event()
    ev.record()
    infos = []
    for b in range(B):
        st = streams[b % nstreams]
        st.wait_event(ev)
        with torch.cuda.stream(st):
            infos.append(_invert_reversed(H[b], diag[b], add[b], lower))
    cur = torch.cuda.current_stream()
    for st in streams:
        cur.wait_stream(st)
    return infos, H


torch.backends.cuda.matmul.allow_tf32 = True
for B, C in [(26, 7168), (26, 2048), (8, 14336), (16, 4096)]:
    H0 = spd(B, C)
    r = {}
    ref_out = None
    for ns in (1, 2, 4):
        Hc = H0.clone()
        torch.cuda.synchronize()
        t = time.perf_counter()
        _, Hout = factors(Hc, ns)
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        Hc = H0.clone()
        torch.cuda.synchronize()
        t = time.perf_counter()
        _, Hout = factors(Hc, ns)
        torch.cuda.synchronize()
        r[f"streams_{ns}_s"] = round(time.perf_counter() - t, 4)
        r[f"streams_{ns}_first_s"] = round(first, 4)
        if ref_out is None:
            ref_out = Hout.clone()
        else:
            r[f"streams_{ns}_identical"] = bool(torch.equal(ref_out, Hout))
        del Hc, Hout
        torch.cuda.empty_cache()
    inv[f"{B}x{C}"] = r
    print(f"{B}x{C}", r, flush=True)
    del H0, ref_out
    torch.cuda.empty_cache()
out["inverse_factors"] = inv
with open(os.path.join(os.environ.get("OUT", "."), "products.json"), "w") as f:
    json.dump(out, f, indent=1)
