"""The Python API: ``quantize``, ``calibrate``, ``evaluate`` and ``load_quantized`` (re-exported by the package root)."""

from __future__ import annotations

from pathlib import Path

import torch

from .backends.bnb import load_with_kernels
from .base.errors import QuantMoeError
from .base.paths import CALIB_DATA, DEFAULT_MODEL, NSAMPLES, default_seqlen
from .model.checkpoint import Checkpoint
from .model.stream import LayerStream, pick_device
from .stages.calibrate import (
    build_calibration,
    check_calibration_out,
    write_calibration,
)
from .stages.evaluate import evaluate
from .stages.quantize import quantize


def calibrate(data: str | Path | None = None, tokenizer: str | Path | None = None, nsamples: int = NSAMPLES,
              seqlen: int | None = None, seed: int = 0, out: str | Path = "calib.safetensors",
              overwrite: bool = False) -> Path:
    """Write a calibration token file: safetensors ``input_ids`` int64 (nsamples, seqlen). An existing
    ``out`` is an error, unless ``overwrite`` and it is itself a token file (nothing else is replaced)."""
    out = Path(out)
    check_calibration_out(out, overwrite)  # before the work; write_calibration checks again
    ckpt = Checkpoint(tokenizer if tokenizer is not None else DEFAULT_MODEL)
    ids, meta = build_calibration(ckpt.tokenizer(), data if data is not None else CALIB_DATA, nsamples,
                                  seqlen or default_seqlen(ckpt.config), seed)
    meta["tokenizer"] = str(ckpt.path)
    return write_calibration(out, ids, meta, overwrite)


def load_quantized(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   kernels: str = "dequantized"):
    """A transformers model computing exactly what the quantized checkpoint at ``path`` stands for.

    ``kernels="dequantized"`` (default): every quantized linear, of any backend (GPTQ, rtn,
    bitsandbytes, experts included), is dequantized into ordinary weights of ``dtype``
    (memory is that of an unquantized model); the same computation as quantmoe's eval, for
    generate and eval checks. For int4 GPTQ serving, load the folder with vLLM or GPTQModel.

    ``kernels="bitsandbytes"``, for bnb-* checkpoints: weights stay quantized in memory and
    run through bitsandbytes' own modules, experts included (see ``quantmoe.backends.bnb.load_with_kernels``);
    ``dtype`` is then the checkpoint's compute dtype.
    """
    if kernels == "bitsandbytes":

        return load_with_kernels(path, device)
    if kernels != "dequantized":
        raise QuantMoeError(f"kernels={kernels!r} is unknown; use 'dequantized' or 'bitsandbytes'")
    stream = LayerStream(Checkpoint(path), pick_device(device), dtype)
    for i in range(stream.num_layers):
        stream.load_layer(i, stream.layer_state(i))
    stream.load_head()
    model = stream.model
    model.eval()
    return model


__all__ = ["quantize", "calibrate", "evaluate", "load_quantized"]
