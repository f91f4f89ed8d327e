"""The Cholesky factorisation of a Hessian on CUDA: cuSOLVER's one call (``torch.linalg.cholesky_ex``, what
``gptq.damped_inverse_cholesky`` uses) against a left-looking factorisation by panels (fp32 IEEE products and
cuSOLVER on the diagonal blocks), at the experts' Hessian widths; and the whole inverse factor of a group of
matrices as the solve makes it. Each factor's error against float64. Writes JSON.

    PYTHONPATH=. python benchmarks/cholesky.py RESULT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from quantmoe.gptq import core

# DeepSeek-V3's down; Mixtral's and Qwen3-235B's gate/up; DeepSeek-V3's gate/up; Mixtral's down
WIDTHS = (2048, 4096, 7168, 14336)
PANELS = (256, 512, 1024)
GROUPS = ((26, 7168), (8, 14336), (26, 2048))  # (matrices, width) of one group's inverse factors


def by_panels(A: torch.Tensor, panel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor of A by panels of ``panel`` columns, left-looking; its info (nonzero: failed)."""
    n = A.shape[-1]
    L = A.tril()
    info = torch.zeros((), dtype=torch.int32, device=A.device)
    for j in range(0, n, panel):
        k = min(j + panel, n)
        if j:
            L[j:, j:k].addmm_(L[j:, :j], L[j:k, :j].mT, alpha=-1)
        block, failed = torch.linalg.cholesky_ex(L[j:k, j:k])
        info += failed != 0
        L[j:k, j:k] = block
        if k < n:
            L[k:, j:k] = torch.linalg.solve_triangular(block.mT, L[k:, j:k], upper=True, left=False)
    return L, info


def relative_error(L: torch.Tensor, reference: torch.Tensor) -> float:
    return float((L.double() - reference).norm() / reference.norm())


def milliseconds(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / reps


def hessian(n: int, generator: torch.Generator) -> torch.Tensor:
    """A damped Hessian of 4n random rows, an eighth of its inputs 30x larger (uneven scales, as activations)."""
    X = torch.randn(4 * n, n, device="cuda", generator=generator)
    X[:, : n // 8] *= 30
    H = X.T @ X / X.shape[0]
    H.diagonal().add_(0.01 * H.diagonal().mean())
    return H


def main(result: Path) -> dict:
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    generator = torch.Generator(device="cuda").manual_seed(0)
    for n in WIDTHS:
        H = hessian(n, generator)
        reference = torch.linalg.cholesky_ex(H.double())[0]
        row = {"n": n, "cusolver_ms": milliseconds(lambda: torch.linalg.cholesky_ex(H)),
               "cusolver_err": relative_error(torch.linalg.cholesky_ex(H)[0], reference)}
        for p in PANELS:
            if p < n:
                row[f"blocked{p}_ms"] = milliseconds(lambda: by_panels(H, p))
                L, info = by_panels(H, p)
                row[f"blocked{p}_err"], row[f"blocked{p}_info"] = relative_error(L, reference), int(info)
        out["rows"].append(row)
        print(row, flush=True)
    for B, n in GROUPS:  # the solve's inverse factors (TF32 products in the triangular inverse), with H's copy
        Hs = torch.stack([hessian(n, generator) for _ in range(min(B, 4))]).repeat(-(-B // 4), 1, 1)[:B].contiguous()
        ms = milliseconds(lambda: core.damped_inverse_cholesky(Hs.clone(), 0.01, tf32=True), reps=2)
        out["rows"].append({"inverse_factor_group": [B, n], "ms": ms, "clone_ms": milliseconds(Hs.clone, reps=2)})
        print(out["rows"][-1], flush=True)
    result.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or not torch.cuda.is_available():
        sys.exit(__doc__ + "\n(needs CUDA)")
    main(Path(sys.argv[1]))
