"""What a quantization method brings to the pipeline (``stages/quantize.py``), and the records
handed between the pipeline's steps.

The pipeline is the same for every backend: check the inputs, calibrate (methods that need it),
open the work folder, quantize the decoder layers one at a time into layer files, export the
shards, finalize. A ``Method`` says only what differs: how its layers are quantized (``Run``),
the export's ``quantization_config`` and its model card. gptq/rtn's is ``stages.gptq_method``;
bitsandbytes' is in ``quantmoe.backends.bnb``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import Tensor

from ..base.measure import PeakRSS
from ..base.options import RunOptions
from ..model.architectures import Architecture
from ..model.checkpoint import Checkpoint
from ..model.distributed import Ranks
from .export import FinishedLayers


@dataclass(frozen=True)
class Source:
    """The checked inputs of a run (``quantize.check_inputs``)."""

    ckpt: Checkpoint
    arch: Architecture
    out: Path                   # --out, resolved
    shard_bytes: int            # --max-shard-size in bytes
    notes: tuple[str, ...]      # what the checks found worth telling (narrow layers ...), for the log and summary


@dataclass(frozen=True)
class Calibration:
    ids: Tensor                 # (nsamples, seqlen) int64 token ids
    meta: dict                  # where they come from (calibrate.calibration_tokens)


@dataclass
class LayerOutput:
    """One quantized decoder layer, as a ``Run`` hands it to the pipeline, which writes it to the work folder."""

    index: int
    tensors: dict[str, Tensor]  # the format's tensors of the layer's quantized linears, by full on-disk name, on the host
    entry: dict                 # its log entry: index, seconds, timings, modules (one entry per quantized linear) ...
    packed: Any = None          # a CUDA event to wait for before ``tensors`` are read (LayerResult.packed), or None
    peak_gpu_mb: float | None = None  # peak GPU memory allocated since the previous layer; None on CPU


class Run(Protocol):
    """One run of a method: its device and what it was started with, and its layers."""

    device: torch.device
    batch_size: int | None      # sequences per forward pass, for the eval too (None: the eval's default)

    @property
    def fingerprint(self) -> dict:
        """What the layers' bytes depend on besides the config and calibration (device type, batch size ...)."""
        ...

    @property
    def record(self) -> dict:
        """What the log and manifest record of this run besides the config (device, processes ...)."""
        ...

    def layers(self, work: Path, done: int, rss: PeakRSS, export: FinishedLayers | None = None
               ) -> Iterator[LayerOutput]:
        """Quantize layers ``done``, ``done + 1``, ... in order; layers below ``done`` are finished in ``work``
        (``resume.layer_file``). ``rss.take()`` is the peak RSS (MB) since the last take, for each log entry.
        ``export``: the export beside the layers, which a run that budgets host memory holds back while a
        layer leaves it no room (``export.hold``); None: there is none (not the writing process)."""
        ...


class Method(Protocol):
    """How one backend quantizes, as the pipeline sees it."""

    name: str                   # the backend's name: gptq, rtn, bnb-nf4 ...
    config: Any                 # its frozen settings (QuantConfig, BnbConfig), with to_dict()
    needs_calibration: bool     # False: no calibration tokens; layers are quantized from their weights alone
    layout: str                 # tensor names of the export (base.options.LAYOUTS)
    config_files: tuple[str, ...]  # files beside config.json holding a copy of its quantization_config
    in_place: bool              # the export writes a linear's tensors where its source weight stands (export.layer_tensors)

    def default_out(self, model: Path) -> Path:
        """--out when none is given, e.g. quantmoe-out/<model>-gptq-int4-g128."""
        ...

    def check(self, ckpt: Checkpoint, arch: Architecture, ranks: Ranks) -> list[str]:
        """Raise a QuantMoeError for what this method cannot do with the checkpoint; return notes."""
        ...

    def start(self, source: Source, calibration: Calibration | None, options: RunOptions, ranks: Ranks) -> Run:
        ...

    def quantization_config(self, ckpt: Checkpoint, arch: Architecture, extra_layers: dict[int, list[str]]) -> dict:
        """config.json's ``quantization_config`` of the export; ``extra_layers``: layer index -> its modules, for
        the layers beyond num_hidden_layers exported unquantized (``mtp="keep"``; export.extra_layer_modules)."""
        ...

    def export_layer(self, ckpt: Checkpoint, arch: Architecture, index: int,
                     tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], frozenset[str]]:
        """Layer ``index``'s file as the export writes it (export.LayerExport): its tensors (repacked for the
        export's format) and the layer-relative linears it leaves in 16 bits."""
        ...

    def versions(self) -> dict[str, str]:
        """Versions of the libraries it quantizes with, beyond quantmoe, torch and transformers."""
        ...

    def model_card(self, report: dict | None, info: dict) -> str:
        """README.md of the export (``finalize.finalize`` says what ``info`` holds)."""
        ...


def unquantized_prefixes(ckpt: Checkpoint, arch: Architecture) -> tuple[str, ...]:
    """Prefixes of the tensors outside the decoder layers an export copies unquantized and declares so: the row's
    (Qwen3-Next's MTP block) and a nested release's other towers (its vision encoder)."""
    return arch.unquantized_prefixes + ckpt.towers
