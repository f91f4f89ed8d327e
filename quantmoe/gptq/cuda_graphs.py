"""GPTQ's sequential block loop (gptq.quantize_block) replayed as a CUDA graph.

Each column of a block costs about a dozen tiny kernels; launched one by one from Python
they leave the GPU idle most of the time (about 200 us a column, measured on an H100 for
Mixtral's down_proj). Captured once per block shape and replayed, the same kernels run
back to back, so the results are bit for bit those of quantize_block (tests/test_gpu.py
checks it). One graph is kept per (B, R, n, maxq) and device; a pipeline run meets four
shapes for Mixtral (q/k/v, o, gate/up, down), so four captures serve every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import quantize_block


class GraphedBlocks:
    """A drop-in ``block_fn`` for gptq.gptq_quantize on CUDA tensors."""

    def __init__(self):
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, Tensor], Tensor]] = {}

    def __call__(self, W1: Tensor, Hinv1: Tensor, S1: Tensor, Z1: Tensor, maxq: int, levels1: Tensor) -> Tensor:
        if W1.device.type != "cuda":
            return quantize_block(W1, Hinv1, S1, Z1, maxq, levels1)
        key = (tuple(W1.shape), maxq, W1.device)
        if key not in self.graphs:
            self.graphs[key] = self._capture(W1, Hinv1, S1, Z1, maxq, levels1)
        graph, static, Err1 = self.graphs[key]
        for name, t in (("W1", W1), ("Hinv1", Hinv1), ("S1", S1), ("Z1", Z1)):
            static[name].copy_(t)
        graph.replay()
        levels1.copy_(static["levels1"])
        # Column updates inside the block are not needed after it: W1 is not copied back.
        return Err1  # valid until the next call with this shape; the caller uses it at once

    @staticmethod
    def _capture(W1, Hinv1, S1, Z1, maxq, levels1):
        static = {"W1": W1.clone(memory_format=torch.contiguous_format), "Hinv1": Hinv1.clone(), "S1": S1.clone(),
                  "Z1": Z1.clone(), "levels1": levels1.clone()}
        side = torch.cuda.Stream(W1.device)
        side.wait_stream(torch.cuda.current_stream(W1.device))
        with torch.cuda.stream(side):  # warm up outside the capture, as CUDA graphs require
            quantize_block(static["W1"].clone(), static["Hinv1"], static["S1"], static["Z1"], maxq,
                           static["levels1"].clone())
        torch.cuda.current_stream(W1.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            Err1 = quantize_block(static["W1"], static["Hinv1"], static["S1"], static["Z1"], maxq, static["levels1"])
        return graph, static, Err1
