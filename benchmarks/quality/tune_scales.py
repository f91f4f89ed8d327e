"""An idea tried and not kept (docs/quality.md): after quantmoe's GPTQ, tune every group scale (the
levels stay, so the format does not change), every RMSNorm weight and every bias end to end, to
minimise KL(original || quantized) on the calibration rows; report the held-out KL before and after.

    python benchmarks/quality/tune_scales.py ORIGINAL QUANTIZED CALIB_TOKENS [--epochs 3] [--lr 1e-3]

CALIB_TOKENS: a token file from ``quantmoe calibrate`` (the harness's ``calib.safetensors``). Holds
both whole models in memory: for the demo models only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ideas import SEQLEN  # noqa: E402

from quantmoe.base.paths import EVAL_DATA  # noqa: E402
from quantmoe.model.checkpoint import Checkpoint  # noqa: E402
from quantmoe.model.stream import LayerStream  # noqa: E402
from quantmoe.stages.calibrate import read_calibration  # noqa: E402
from quantmoe.stages.evaluate import eval_windows  # noqa: E402


def whole_model(path: Path) -> nn.Module:
    stream = LayerStream(Checkpoint(path), torch.device("cpu"))
    for i in range(stream.num_layers):
        stream.load_layer(i, stream.layer_state(i))
    stream.load_head()
    model = stream.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class GroupScale(nn.Module):
    """W -> W * f, one factor per row and group of ``width`` input columns (a group's scale times f)."""

    def __init__(self, shape: torch.Size, width: int):
        super().__init__()
        self.width = width
        self.f = nn.Parameter(torch.ones(*shape[:-1], shape[-1] // width))

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W * self.f.repeat_interleave(self.width, -1)


def trainable(model: nn.Module, quantized: set[str], group_size: int) -> list[nn.Parameter]:
    """Group factors on every quantized weight (fused experts included), and the norms and biases."""
    params = []
    for name, module in list(model.named_modules()):
        for pname, p in list(module.named_parameters(recurse=False)):
            is_quantized = (pname == "weight" and name in quantized) or (".experts" in name and p.dim() == 3)
            if is_quantized:
                width = group_size if group_size > 0 and p.shape[-1] % group_size == 0 else p.shape[-1]
                scale = GroupScale(p.shape, width)
                parametrize.register_parametrization(module, pname, scale)
                params.append(scale.f)
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith(".bias"):
            p.requires_grad_(True)
            params.append(p)
    return params


def mean_kl(original: nn.Module, model: nn.Module, ids: torch.Tensor, step=None, batch_size: int = 8) -> float:
    """Mean KL(original || model) per predicted token over ``ids``; ``step`` (the optimiser) trains on it."""
    total = 0.0
    for start in range(0, ids.shape[0], batch_size):
        x = ids[start:start + batch_size]
        with torch.no_grad():
            lp0 = torch.log_softmax(original(input_ids=x).logits[:, :-1].float(), -1)
        with torch.set_grad_enabled(step is not None):
            lp1 = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
            kl = (lp0.exp() * (lp0 - lp1)).sum(-1).mean()
        if step is not None:
            kl.backward()
            step.step()
            step.zero_grad()
        total += float(kl.detach()) * x.shape[0]
    return total / ids.shape[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("original", type=Path)
    ap.add_argument("quantized", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    ckpt = Checkpoint(args.quantized)
    original, model = whole_model(args.original), whole_model(args.quantized)
    params = trainable(model, set(ckpt.quantized_linears), ckpt.quantization["group_size"])
    ids, _ = read_calibration(args.calib, ckpt.tokenizer())
    windows, _ = eval_windows(ckpt.tokenizer(), EVAL_DATA, SEQLEN)
    print(f"held-out KL before: {1000 * mean_kl(original, model, windows):.2f}e-3", flush=True)
    opt = torch.optim.Adam(params, lr=args.lr)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        train = mean_kl(original, model, ids[torch.randperm(ids.shape[0])], opt)
        print(f"epoch {epoch}: calibration KL {1000 * train:.2f}e-3 ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"held-out KL after: {1000 * mean_kl(original, model, windows):.2f}e-3")


if __name__ == "__main__":
    main()
