"""The one loader: a checkpoint folder read lazily, tensor by tensor, from its safetensors shards.

Works for source checkpoints and for quantmoe's exports alike: a quantized linear (GPTQ
``P.qweight`` ..., bitsandbytes ``P.weight`` + ``P.weight.absmax`` ...) is dequantized into
``P.weight`` when a layer is read, by the backend that wrote it (``quantmoe.backends``), so
every stage sees plain weights under the on-disk names.

A checkpoint is untrusted input: its files are read, never executed or followed out of the
folder. Every file read must resolve inside the folder (``inside``; a Hub cache snapshot's
links into its own ``blobs/`` count as inside), shard names are plain file names, config.json is
checked before transformers builds anything from it and its ``auto_map`` (the checkpoint's own
Python code) is never run, and every floating-point tensor read is checked for NaN/Inf.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache, cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..base.errors import QuantMoeError, note
from ..base.files import hash_json
from ..formats import reader_for
from ..formats.fp8 import Fp8Weight
from .architectures import CONFIG_ALIASES, NESTED, Nesting, check_config

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Side files an export carries over from its source (tokenizer, generation defaults, chat template, and a
# vision-language release's image and video processors, which servers read to take its images).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
              "chat_template.json", "preprocessor_config.json", "video_preprocessor_config.json",
              "processor_config.json")
# Bytes read from each end of every shard to tell checkpoints apart (Checkpoint.identity).
IDENTITY_BYTES = 1 << 16
# config.json and the index are read whole: one larger than this is no checkpoint's, and is refused unread.
JSON_LIMIT = 64 * 2**20
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")
# Bytes read_prefix copies between two unmappings of the shards: the pages of a mapped shard count towards
# resident memory while it stays open, so a layer read holds its bytes twice only this far.
READ_WINDOW = 1 << 30
# Threads read_prefix reads a layer's tensors with (at most one per core): os.preadv and torch's checks release the
# GIL, so one thread per tensor in flight keeps several reads from the page cache or the disk going at once.
READ_THREADS = 8


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


def trusted_root(folder: Path) -> Path:
    """The folder every file of the checkpoint in ``folder`` must resolve inside: the folder itself, or
    for a Hub cache snapshot (``models--org--name/snapshots/<sha>``, whose files are links into
    ``../../blobs``) the repo's cache folder."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


@cache
def _ignoring_auto_map(path: Path, model_type: str) -> None:
    note(f"{path / 'config.json'} names its own Python code (auto_map); quantmoe never runs a checkpoint's "
         f"code and reads it with transformers' built-in {model_type!r} instead")


class Checkpoint:
    """A model folder: config, tokenizer and lazily opened safetensors shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_model(path)
        self.root = trusted_root(self.path)
        if not (self.path / "config.json").is_file():
            raise QuantMoeError(f"{self.path} has no config.json; pass a transformers checkpoint folder")
        self._handles: dict[str, object] = {}
        self._layouts: dict[str, tuple[int, dict]] = {}  # see _layout

    def reader(self) -> Checkpoint:
        """Another reader of this folder, for a thread that reads it beside this one (the export beside the
        layers): the files this one has parsed and checked, shared; shards it opens and closes on its own."""
        other = copy.copy(self)
        other._handles, other._layouts = {}, dict(self._layouts)
        return other

    def inside(self, name: str) -> Path:
        """The path of file ``name`` of this folder, after checking that it is a plain file name (no
        folder part, not absolute) and that the file, links followed, is a regular file inside the folder."""
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
                or "\0" in name:
            raise QuantMoeError(f"{self.path}: {str(name)[:80]!r} is not a plain file name in the model folder "
                                "(shards and side files must be files of the folder itself); restore the index "
                                "or re-download the checkpoint")
        path = self.path / name
        real = path.resolve()
        if not real.is_relative_to(self.root.resolve()):
            raise QuantMoeError(f"{path} links outside the model folder; quantmoe reads only files inside it: "
                                "replace the link with a copy of the file")
        if real.exists() and not stat.S_ISREG(real.stat().st_mode):
            raise QuantMoeError(f"{path} is not a regular file; replace it with the checkpoint's file")
        return path

    @cached_property
    def config(self):
        """The transformers config, built only from a config.json whose sizes pass ``check_config``; a
        checkpoint's own code (``auto_map``) is never run, whatever transformers would ask."""
        raw = self.raw_config  # a clearer message than AutoConfig's for a file that is not JSON at all
        model_type = raw.get("model_type")
        alias = CONFIG_ALIASES.get(model_type) if isinstance(model_type, str) else None
        if "auto_map" in raw and alias is None:
            if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
                raise QuantMoeError(f"{self.path / 'config.json'}: model_type {model_type!r} exists only as the "
                                    "checkpoint's own Python code (auto_map), which quantmoe never runs; quantmoe "
                                    "quantizes the architectures transformers knows (see docs/architectures.md)")
            _ignoring_auto_map(self.path, model_type)
        check_config(raw, str(self.path / "config.json"))
        nesting = self.nesting
        if nesting is not None:
            text = raw.get(nesting.text_config)
            if not isinstance(text, dict):
                raise QuantMoeError(f"{self.path / 'config.json'}: a {model_type} model's config nests its language "
                                    f"model's under {nesting.text_config!r}, which it lacks or is not an object; restore "
                                    "config.json or re-download the checkpoint")
            check_config(text, f"{self.path / 'config.json'} ({nesting.text_config})")
        if raw.get("quantization_config") is not None and not isinstance(raw["quantization_config"], dict):
            raise QuantMoeError(f"{self.path / 'config.json'}: quantization_config is a JSON "
                                f"{type(raw['quantization_config']).__name__}, not an object; restore config.json "
                                "or re-download the checkpoint")
        try:
            if alias is not None:  # Kimi K2: DeepSeek-V3 under its own name (architectures.CONFIG_ALIASES); its
                # auto_map names code quantmoe never runs
                return AutoConfig.for_model(alias, **{k: v for k, v in raw.items() if k not in ("model_type", "auto_map")})
            config = AutoConfig.from_pretrained(self.path, trust_remote_code=False)
            return config if nesting is None else getattr(config, nesting.text_config)
        except Exception as exc:
            detail = " ".join(str(exc).split())[:200]
            raise QuantMoeError(f"cannot read {self.path / 'config.json'} ({type(exc).__name__}: {detail}); "
                                "is it a transformers checkpoint?") from None

    @cached_property
    def nesting(self) -> Nesting | None:
        """How the release nests its language model (a vision-language model's; architectures.NESTED), or None.
        A nested checkpoint reads as its language model alone: ``config`` is the text model's, and the text model's
        tensors go by the names a text-only checkpoint gives them (``weight_map``; ``stored_name`` gives the
        release's)."""
        model_type = self.raw_config.get("model_type")
        return NESTED.get(model_type) if isinstance(model_type, str) else None

    @property
    def model_label(self) -> str:
        """The model_type to show: the config's, and for a nested release the release's with its language model's."""
        text = self.config.model_type
        return text if self.nesting is None else f"{self.raw_config['model_type']} (language model {text})"

    @property
    def towers(self) -> tuple[str, ...]:
        """Prefixes of a nested release's other towers (its vision encoder), which quantmoe copies unquantized."""
        return () if self.nesting is None else self.nesting.towers

    def stored_name(self, name: str) -> str:
        """The release's name of a tensor or module quantmoe names ``name`` (they differ only when ``nesting``)."""
        return name if self.nesting is None else self.nesting.stored_name(name)

    def stored_layer_prefix(self, index: int) -> str:
        """``layer_prefix`` under the release's names: what recipe rules and messages name a layer's modules by."""
        return self.stored_name(self.layer_prefix(index))

    @cached_property
    def raw_config(self) -> dict:
        config = self._read_json("config.json")
        if not isinstance(config, dict):
            raise QuantMoeError(f"{self.path / 'config.json'} holds a JSON {type(config).__name__}, not an object; "
                                "restore it or re-download the checkpoint")
        return config

    def _read_json(self, name: str):
        path = self.inside(name)
        try:
            if path.stat().st_size > JSON_LIMIT:
                raise QuantMoeError(f"{path} is larger than {JSON_LIMIT >> 20} MiB, which no checkpoint's {name} "
                                    "is; restore it or re-download the checkpoint")
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:  # UnicodeDecodeError included
            raise QuantMoeError(f"{path} is not valid JSON ({exc}); restore it or re-download the checkpoint") from None
        except OSError as exc:
            raise QuantMoeError(f"cannot read {path} ({exc.strerror}); check its permissions") from None

    @cached_property
    def identity(self) -> str:
        """sha256 of the config and, per shard, its name, size and the sha256 of its first and last IDENTITY_BYTES:
        what names this checkpoint in an export's manifest (``inputs.model``) and a run's fingerprint, cheaply
        (hashing hundreds of GB would take longer than a layer). The sampled bytes (each shard's header and first
        and last tensors) tell apart checkpoints of one config and size whose weights differ (a base model and
        its fine-tune)."""
        shards = {}
        for shard in self.shards:
            path = self.inside(shard)
            size = path.stat().st_size
            with open(path, "rb") as f:
                sample = f.read(IDENTITY_BYTES)
                if size > 2 * IDENTITY_BYTES:
                    f.seek(size - IDENTITY_BYTES)
                sample += f.read(IDENTITY_BYTES)
            shards[shard] = [size, hashlib.sha256(sample).hexdigest()]
        return hash_json({"config": self.raw_config, "shards": shards})

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
        """Tensor name -> shard file name (a plain file name of this folder)."""
        index = self.path / INDEX_NAME
        if index.is_file() or index.is_symlink():
            data = self._read_json(INDEX_NAME)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in weight_map.items()):
                raise QuantMoeError(f"{index} is unreadable (it needs \"weight_map\": {{tensor name: shard file "
                                    "name}); restore the file or re-download the checkpoint")
            for shard in set(weight_map.values()):
                self.inside(shard)
            return self._text_names(weight_map)
        single = self.path / SINGLE_NAME
        if single.is_file() or single.is_symlink():
            return self._text_names({name: SINGLE_NAME for name in self._open(SINGLE_NAME).keys()})
        raise QuantMoeError(f"{self.path} has no safetensors weights (model.safetensors or {INDEX_NAME}); "
                            "convert .bin checkpoints with save_pretrained(safe_serialization=True)")

    def _text_names(self, weight_map: dict[str, str]) -> dict[str, str]:
        """``weight_map`` under quantmoe's names: a nested release's language model's tensors renamed as a
        text-only checkpoint names them (Nesting.text_name), after checking that every tensor under ``model.`` is
        the language model's or a tower's, so that the names map back one to one."""
        nesting = self.nesting
        if nesting is None:
            return dict(weight_map)
        stray = next((n for n in weight_map if n.startswith("model.") and not n.startswith((nesting.stored,
                                                                                             *nesting.towers))), None)
        if stray is not None:
            raise QuantMoeError(f"{self.path}: tensor {stray[:120]} lies outside the language model "
                                f"({nesting.stored}*) and the other towers ({', '.join(nesting.towers)}*) of this "
                                f"{self.raw_config.get('model_type')} release; the checkpoint is damaged or of "
                                "another model: re-download it")
        return {nesting.text_name(n): shard for n, shard in weight_map.items()}

    @cached_property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def _shard_of(self, name: str) -> str:
        """The shard file holding tensor ``name``."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise QuantMoeError(f"tensor {name} is not in {self.path}; the checkpoint does not match its config")
        return shard

    def _damaged(self, shard: str, detail) -> QuantMoeError:
        return QuantMoeError(f"shard {self.path / shard} is truncated or corrupt ({detail}); re-download it")

    def _open(self, shard: str):
        handle = self._handles.get(shard)  # once: close() may empty the dict meanwhile (read_prefix's threads)
        if handle is None:
            file = self.inside(shard)
            if not file.is_file():
                raise QuantMoeError(f"shard {file} listed in the index is missing; re-download the checkpoint")
            try:
                handle = self._handles[shard] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise self._damaged(shard, exc) from None
        return handle

    def tensor(self, name: str, rows: range | None = None) -> Tensor:
        """Tensor ``name``; ``rows``: only those of its first dimension are read."""
        shard = self._shard_of(name)
        try:
            f = self._open(shard)
            stored = self.stored_name(name)
            t = f.get_tensor(stored) if rows is None else f.get_slice(stored)[rows.start:rows.stop]
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise QuantMoeError(f"cannot read {name} from shard {self.path / shard} ({exc}); re-download it") from None
        check_finite(name, t, self.path)
        return t

    def _layout(self, shard: str) -> tuple[int, dict]:
        """(offset of the data, header) of a shard whose header safe_open has checked (offsets within the
        file, sizes matching shapes and dtypes)."""
        if shard not in self._layouts:
            self._open(shard)
            try:
                with open(self.inside(shard), "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    self._layouts[shard] = (8 + n, json.loads(f.read(n)))
            except (OSError, ValueError) as exc:
                raise self._damaged(shard, exc) from None
        return self._layouts[shard]

    def read_copy(self, name: str, dtype: torch.dtype | None = None, pin: bool = False) -> Tensor:
        """Tensor ``name`` copied into this process's memory (page-locked with ``pin``) by reading its bytes
        from the shard file straight into it (one copy, and no pages of a mapping to fault in), checked for
        NaN/Inf, floating tensors then converted to ``dtype`` (None: as stored)."""
        shard = self._shard_of(name)
        start, info, stored = self._header_entry(name)
        if stored is None:  # a dtype torch reads only through safetensors: the mapped tensor, copied
            t = self.tensor(name)
            t = t.to(dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)
            return t.pin_memory() if pin else t
        t = torch.empty(info["shape"], dtype=stored, pin_memory=pin)
        begin, end = info["data_offsets"]
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        if end - begin != len(data):
            raise self._damaged(shard, f"tensor {name} takes {end - begin} bytes for {len(data)}")
        fd = os.open(self.inside(shard), os.O_RDONLY)
        try:
            done = 0
            while done < len(data):
                n = os.preadv(fd, [data[done:]], start + begin + done)
                if n <= 0:
                    raise self._damaged(shard, f"it ends inside tensor {name}")
                done += n
        finally:
            os.close(fd)
        check_finite(name, t, self.path)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype).pin_memory() if pin else t.to(dtype)
        return t

    def _header_entry(self, name: str) -> tuple[int, dict | None, torch.dtype | None]:
        """(offset of its shard's data, tensor ``name``'s header entry, its dtype if one of STORED_DTYPES), from
        the shard's layout (read once)."""
        start, header = self._layout(self._shard_of(name))
        info = header.get(self.stored_name(name)) if isinstance(header, dict) else None
        return start, info, (STORED_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None)

    def _direct(self, names: tuple[str, ...]) -> bool:
        """Whether read_copy reads every tensor of ``names`` from its shard file without opening a mapping
        (its shard's layout read, here, and its dtype one of STORED_DTYPES): a pool thread may read them."""
        try:
            return all(self._header_entry(name)[2] is not None for name in names)
        except QuantMoeError:  # read here, in its turn, where it raises again
            return False

    def _header(self, name: str):
        """Tensor ``name``'s entry in its shard's header (its shape and dtype), nothing of it read."""
        shard = self._shard_of(name)
        f = self._open(shard)
        try:
            return f.get_slice(self.stored_name(name))
        except SafetensorError:
            raise QuantMoeError(f"tensor {name} is listed for shard {self.path / shard}, which does not hold it; the "
                                "index does not match the shards: restore it or re-download the checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header(name).get_shape())

    def check_layers(self) -> int:
        """config.num_hidden_layers, checked against the decoder layers the weights hold (layers
        0..n-1, each with at least one tensor), before anything is built for that many layers."""
        n = self.config.num_hidden_layers
        present = {int(m.group(1)) for name in self.weight_map if (m := LAYER_NAME.match(name))}
        # Multi-token-prediction layers follow the decoder layers (DeepSeek-V3's 61, GLM-4.5's 92): as many as
        # the config declares (num_nextn_predict_layers), carried through by the export (extra_layers).
        mtp = getattr(self.config, "num_nextn_predict_layers", 0)
        mtp = mtp if isinstance(mtp, int) and 0 <= mtp <= 16 else 0
        present -= set(range(n, n + mtp))
        if present != set(range(n)):
            held = f"{len(present)} decoder layers (indices {min(present)} to {max(present)})" if present else \
                "no decoder layers"
            raise QuantMoeError(f"{self.path / 'config.json'} says num_hidden_layers = {n}, but the weights hold "
                                f"{held}; the config does not match the shards: restore it or re-download the checkpoint")
        return n

    def nbytes(self, name: str) -> int:
        """Bytes the tensor takes in its shard."""
        meta = self._header(name)
        bits = DTYPE_BITS.get(meta.get_dtype())
        if bits is None:
            raise QuantMoeError(f"tensor {name} of {self.path} is stored as {meta.get_dtype()}, a dtype quantmoe "
                                "does not read; convert the checkpoint to BF16, FP16, FP32 or FP8")
        return -(-bits * math.prod(meta.get_shape()) // 8)

    def dtype(self, name: str) -> str:
        """The safetensors dtype of a tensor ("F16", "BF16", "F32", "I32", ...), read from the header."""
        return self._header(name).get_dtype()

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def layer_shapes(self, index: int) -> dict[str, tuple[int, ...]]:
        """Layer ``index``'s tensors' shapes by layer-relative name, from the headers (nothing read)."""
        prefix = self.layer_prefix(index)
        return {name[len(prefix):]: self.shape(name) for name in self.names(prefix)}

    def read_prefix(self, prefix: str, dtype: torch.dtype | None = torch.float32, defer: bool = False,
                    pin: bool = False, only: Callable[[str], bool] | None = None,
                    rows: Mapping[str, range] | None = None) -> dict[str, Tensor]:
        """All tensors under ``prefix`` with the prefix stripped; quantized linears (of whichever backend
        wrote the checkpoint) dequantized to ``.weight``. ``only``: which of them to read, by their name
        under the prefix (a quantized linear's by its ``.weight``); the others are not read at all.
        ``rows``: tensors (by name under the prefix) of which only those rows (first dimension) are read.

        Floating tensors come in ``dtype`` (None: as stored). With ``dtype`` None, the linears of
        an FP8 release stay as stored too: ``.weight`` is a ``formats.fp8.Fp8Weight`` (codes and
        scale), which ``LayerStream.load_layer`` dequantizes on the device. With ``defer``, the quantized
        linears of an export (GPTQ, compressed-tensors) likewise come as stored (``formats.base.StoredWeight``,
        the reader's checks done) for the caller to dequantize on its device. Every tensor is copied
        into this process's memory (``read_copy``: read from the shard file straight into it, so no pages of
        a mapping are held); what is dequantized here is read through the mapped shards, which are closed
        every READ_WINDOW bytes and at the end (a mapped shard's pages count towards the process's resident
        memory while it stays open). ``pin``: the copies are made in page-locked memory (which a GPU copies
        from asynchronously and faster). The copies read_copy makes are made on READ_THREADS threads; the
        result's order and the error a damaged tensor raises are those of one read after another.
        """
        out: dict[str, Tensor] = {}
        as_stored: dict[str, Fp8Weight] = {}
        stored = set()
        source = getattr(self.format, "source", False)
        keep = (dtype is None and source) or (defer and not source and hasattr(self.format, "stored"))
        mapped = 0  # bytes read since the shards were last closed
        # Each read, in order: (the dict it goes into, its key, the bytes it maps, how it is read, the tensors
        # read_copy reads for it or None). Only what read_copy reads from the shard files goes to the threads
        # (_read_in_turn): what is read through the mapped shards (dequantized here, some rows) is read here, in
        # its turn, since close() unmaps the shards under it.
        reads: list[tuple[dict, str, int, Callable[[], object], tuple[str, ...] | None]] = []

        def read(nbytes: int) -> None:
            nonlocal mapped
            mapped += nbytes
            if mapped >= READ_WINDOW:
                self.close()
                mapped = 0

        def copied(t: Tensor, nbytes: int) -> Tensor:
            t = t.to(dtype if t.is_floating_point() and dtype is not None else t.dtype, copy=True)
            read(nbytes)
            return t

        def kept(linear) -> Callable[[], object]:
            return lambda: self.format.stored(self, linear, pin=pin)  # a copy, read straight into page-locked memory

        for module, linear in sorted(self.quantized_linears.items()):
            if module.startswith(prefix):
                name = module[len(prefix):] + ".weight"
                if only is not None and not only(name):
                    stored.update(linear.tensors)
                    continue
                nbytes = sum(self.nbytes(t) for t in linear.tensors)
                if keep:
                    reads.append((as_stored, name, nbytes, kept(linear), linear.tensors))
                else:
                    reads.append((out, name, 0, lambda linear=linear, nbytes=nbytes: copied(
                        self.format.dequantize(self, linear), nbytes), None))
                stored.update(linear.tensors)
        for name in self.names(prefix):
            short = name[len(prefix):]
            if name not in stored and (only is None or only(short)):
                some = (rows or {}).get(short)
                if some is None:
                    reads.append((out, short, 0, lambda name=name: self.read_copy(name, dtype, pin), (name,)))
                else:  # some rows of a tensor (GraniteMoE's fused experts): read through the mapped shard
                    def part(name=name, some=some):
                        t = self.tensor(name, some)
                        t = copied(t, t.numel() * t.element_size())
                        return t.pin_memory() if pin else t
                    reads.append((out, short, 0, part, None))
        self._read_in_turn(reads, read)
        out.update(as_stored)
        self.close()
        return out

    def _read_in_turn(self, reads, read: Callable[[int], None]) -> None:
        """Each of ``reads`` (see read_prefix) put into its dict in their order. Those whose tensors read_copy
        reads from the files (``_direct``) are read on READ_THREADS threads, the others here in their turn. A
        failed read raises here as it would one read after another: the first failure in order."""
        threads = min(READ_THREADS, os.cpu_count() or 1)
        pool = ThreadPoolExecutor(threads, thread_name_prefix="quantmoe-read") if threads > 1 else None
        started: list[tuple[dict, str, Future]] = []
        try:
            for into, key, nbytes, run, names in reads:
                if pool is not None and names is not None and self._direct(names):
                    started.append((into, key, pool.submit(run)))
                else:
                    done: Future = Future()
                    started.append((into, key, done))
                    try:
                        done.set_result(run())
                    except Exception as exc:  # raised below, unless a read before it failed too
                        done.set_exception(exc)
                        break
                read(nbytes)
            for into, key, done in started:
                into[key] = done.result()
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def extra_layers(self) -> list[int]:
        """Indices of the layers stored beyond ``num_hidden_layers``: the multi-token-prediction
        layers of DeepSeek-V3 (61) and GLM-4.5 (92), which transformers does not load."""
        n = int(self.config.num_hidden_layers)
        found = {int(name.split(".")[2]) for name in self.names("model.layers.") if name.split(".")[2].isdigit()}
        return sorted(i for i in found if i >= n)

    def shard_keys(self, shard: str) -> list[str]:
        """The tensor names a shard file actually holds (the index may claim others)."""
        keys = self._open(shard).keys()
        return list(keys) if self.nesting is None else [self.nesting.text_name(k) for k in keys]

    def open_shards(self) -> None:
        """Open every shard now, so a missing, truncated or corrupt one fails before any work starts."""
        for shard in self.shards:
            self._open(shard)

    def close(self) -> None:
        """Unmap the open shards (tensors already read stay valid); they reopen on the next read."""
        self._handles.clear()

    def tokenizer(self):
        """The checkpoint's tokenizer, read by transformers without running any of the checkpoint's code,
        once every file of the folder transformers might open is checked to resolve inside it."""
        self.config  # transformers reads config.json too: a damaged one is reported as such, not as a tokenizer's
        for entry in self.path.iterdir():
            if not entry.is_dir() or entry.is_symlink():
                self.inside(entry.name)
        try:
            return AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        except Exception as exc:
            for name in SIDE_FILES:  # a damaged JSON file of the tokenizer is named
                if name.endswith(".json") and (self.path / name).is_file():
                    self._read_json(name)
            raise QuantMoeError(f"cannot load the tokenizer of {self.path} ({type(exc).__name__}); "
                                "the folder needs tokenizer.json/tokenizer_config.json") from None

    def tokenizer_files(self) -> list[Path]:
        """The side files an export copies (``SIDE_FILES`` present in the folder), each checked to be a
        regular file inside the folder: a link out of it (to a token, a key) is an error, never copied."""
        return [self.inside(n) for n in SIDE_FILES if (self.path / n).is_file() or (self.path / n).is_symlink()]


class NonFinite(QuantMoeError):
    """A tensor holds NaN or Inf (``tensor``: its name)."""

    def __init__(self, message: str, tensor: str):
        super().__init__(message)
        self.tensor = tensor


# Bits per element of each safetensors dtype (what a tensor takes in its shard).
DTYPE_BITS = {"F64": 64, "I64": 64, "U64": 64, "C64": 64, "F32": 32, "I32": 32, "U32": 32, "F16": 16, "BF16": 16,
              "I16": 16, "U16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I8": 8, "U8": 8, "BOOL": 8,
              "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}
# safetensors' dtype names, for the tensors read_copy reads itself.
STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MINMAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The least non-finite FP8 code with the sign bit clear: it and the codes above it are NaN (e4m3fn) or Inf
# and NaN (e5m2), with either sign. The greatest code read as int8 (sign bit clear) and as uint8 (sign bit set)
# says whether a tensor holds one: two reductions, no temporary.
FP8_NONFINITE = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def check_finite(name: str, t: Tensor, folder: Path) -> None:
    """Raise naming ``name`` when the floating-point tensor ``t`` holds NaN or Inf. One reduction per
    tensor: its least and greatest values, both finite exactly when every value is (a NaN makes both NaN),
    read in the tensor's own dtype; for FP8, its greatest codes (FP8_NONFINITE); another dtype
    is summed in float32, a NaN or Inf making the sum non-finite, and only then confirmed element-wise
    (a sum of huge finite values can overflow)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    if t.dtype in MINMAX_DTYPES:
        if bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
            return
    elif t.dtype in FP8_NONFINITE:
        least = FP8_NONFINITE[t.dtype]
        if int(t.view(torch.int8).amax()) < least and int(t.view(torch.uint8).amax()) < 0x80 + least:
            return
    elif bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t.float()).all()):
        return
    raise NonFinite(f"tensor {name} of {folder} holds NaN or Inf; the checkpoint is damaged: "
                    "re-download it or repair that tensor", name)
