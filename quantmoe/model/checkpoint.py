"""The one loader: a checkpoint folder read lazily, tensor by tensor, from its safetensors shards.

Works for source checkpoints and for quantmoe's exports alike: a quantized linear (GPTQ
``P.qweight`` ..., bitsandbytes ``P.weight`` + ``P.weight.absmax`` ...) is dequantized into
``P.weight`` when a layer is read, by the backend that wrote it (``quantmoe.backends``), so
every stage sees plain weights under the on-disk names.
"""

from __future__ import annotations

import json
import math
import os
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer

from ..base.errors import QuantMoeError
from ..formats import reader_for
from ..formats.fp8 import Fp8Weight
from .architectures import CONFIG_ALIASES

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def resolve_model(model: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a Hub id fetched into the local cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise QuantMoeError(f"model path {path} is a file; pass the checkpoint folder that holds config.json")
    looks_like_hub_id = str(model).count("/") == 1 and not str(model).startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise QuantMoeError(f"model path {path} does not exist; pass a checkpoint folder or a Hub id such as org/name")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"])
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise QuantMoeError(
            f"could not fetch {model} from the Hugging Face Hub ({type(exc).__name__}); "
            "download it first and pass the local folder"
        ) from None
    return Path(local)


class Checkpoint:
    """A model folder: config, tokenizer and lazily opened safetensors shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_model(path)
        if not (self.path / "config.json").is_file():
            raise QuantMoeError(f"{self.path} has no config.json; pass a transformers checkpoint folder")
        self._handles: dict[str, object] = {}

    @cached_property
    def config(self):

        raw = self.raw_config  # a clearer message than AutoConfig's for a file that is not JSON at all
        alias = CONFIG_ALIASES.get(raw.get("model_type"))
        try:
            if alias is not None:  # Kimi K2: DeepSeek-V3 under its own name (architectures.CONFIG_ALIASES)
                return AutoConfig.for_model(alias, **{k: v for k, v in raw.items() if k not in ("model_type", "auto_map")})
            return AutoConfig.from_pretrained(self.path)
        except Exception as exc:
            raise QuantMoeError(f"cannot read {self.path / 'config.json'} ({exc}); is it a transformers checkpoint?") from None

    @cached_property
    def raw_config(self) -> dict:
        path = self.path / "config.json"
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise QuantMoeError(f"{path} is not valid JSON ({exc}); restore it or re-download the checkpoint") from None
        except OSError as exc:
            raise QuantMoeError(f"cannot read {path} ({exc.strerror}); check its permissions") from None

    @cached_property
    def quantization(self) -> dict | None:
        """The checkpoint's quantization_config, if it is a quantized export."""
        return self.raw_config.get("quantization_config")

    @cached_property
    def format(self):
        """The reader of this checkpoint's quantized format (``formats.Reader``; None for an unquantized one)."""
        return reader_for(self.quantization)

    @cached_property
    def quantized_linears(self) -> dict:
        """Module path -> formats.QuantizedLinear, for every quantized linear in the checkpoint."""
        return self.format.quantized_linears(self) if self.format is not None else {}

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name."""
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError) as exc:
                raise QuantMoeError(f"{index} is unreadable ({exc}); restore the file or re-download the checkpoint") from None
        single = self.path / SINGLE_NAME
        if single.is_file():
            return {name: SINGLE_NAME for name in self._open(SINGLE_NAME).keys()}
        raise QuantMoeError(f"{self.path} has no safetensors weights (model.safetensors or {INDEX_NAME}); "
                            "convert .bin checkpoints with save_pretrained(safe_serialization=True)")

    @cached_property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def _open(self, shard: str):
        if shard not in self._handles:
            file = self.path / shard
            if not file.is_file():
                raise QuantMoeError(f"shard {file} listed in the index is missing; re-download the checkpoint")
            try:
                self._handles[shard] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise QuantMoeError(f"shard {file} is truncated or corrupt ({exc}); re-download it") from None
        return self._handles[shard]

    def tensor(self, name: str) -> Tensor:
        shard = self.weight_map.get(name)
        if shard is None:
            raise QuantMoeError(f"tensor {name} is not in {self.path}; the checkpoint does not match its config")
        try:
            return self._open(shard).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise QuantMoeError(f"cannot read {name} from shard {self.path / shard} ({exc}); re-download it") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())

    def nbytes(self, name: str) -> int:
        """Bytes the tensor takes in its shard."""
        meta = self._open(self.weight_map[name]).get_slice(name)
        itemsize = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                    "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}[meta.get_dtype()]
        return itemsize * math.prod(meta.get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype of a tensor ("F16", "BF16", "F32", "I32", ...), read from the header."""
        return self._open(self.weight_map[name]).get_slice(name).get_dtype()

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def read_prefix(self, prefix: str, dtype: torch.dtype | None = torch.float32) -> dict[str, Tensor]:
        """All tensors under ``prefix`` with the prefix stripped; quantized linears (of whichever backend
        wrote the checkpoint) dequantized to ``.weight``.

        Floating tensors come in ``dtype`` (None: as stored). With ``dtype`` None, the linears of
        an FP8 release stay as stored too: ``.weight`` is a ``formats.fp8.Fp8Weight`` (codes and
        scale), which ``LayerStream.load_layer`` dequantizes on the device. Every tensor is copied
        into this process's memory and the shards are closed afterwards: pages of a mapped shard
        count towards the process's resident memory for as long as it stays open, which
        would make memory grow with every layer read.
        """
        tensors: dict[str, Tensor] = {}
        as_stored: dict[str, Fp8Weight] = {}
        stored = set()
        keep = dtype is None and getattr(self.format, "source", False)
        for module, linear in sorted(self.quantized_linears.items()):
            if module.startswith(prefix):
                name = module[len(prefix):] + ".weight"
                if keep:
                    as_stored[name] = self.format.stored(self, linear)
                else:
                    tensors[name] = self.format.dequantize(self, linear)
                stored.update(linear.tensors)
        tensors.update({name[len(prefix):]: self.tensor(name) for name in self.names(prefix) if name not in stored})
        out = {n: t.to(dtype, copy=True) if t.is_floating_point() and dtype is not None else t.clone()
               for n, t in tensors.items()}
        out.update(as_stored)
        self.close()
        return out

    def extra_layers(self) -> list[int]:
        """Indices of the layers stored beyond ``num_hidden_layers``: the multi-token-prediction
        layers of DeepSeek-V3 (61) and GLM-4.5 (92), which transformers does not load."""
        n = int(self.config.num_hidden_layers)
        found = {int(name.split(".")[2]) for name in self.names("model.layers.") if name.split(".")[2].isdigit()}
        return sorted(i for i in found if i >= n)

    def shard_keys(self, shard: str) -> list[str]:
        """The tensor names a shard file actually holds (the index may claim others)."""
        return list(self._open(shard).keys())

    def open_shards(self) -> None:
        """Open every shard now, so a missing, truncated or corrupt one fails before any work starts."""
        for shard in self.shards:
            self._open(shard)

    def close(self) -> None:
        """Unmap the open shards (tensors already read stay valid); they reopen on the next read."""
        self._handles.clear()

    def tokenizer(self):

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except Exception as exc:
            raise QuantMoeError(f"cannot load the tokenizer of {self.path} ({type(exc).__name__}); "
                                "the folder needs tokenizer.json/tokenizer_config.json") from None

    def tokenizer_files(self) -> list[Path]:
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
        return [self.path / n for n in names if (self.path / n).is_file()]
