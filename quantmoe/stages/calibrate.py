"""Stage 1: text -> calibration token sets (safetensors ``input_ids`` int64 (N, L)).

Text comes from a .txt/.md/.rst file (one document), a .jsonl file (one document per
line, field ``text``), a folder of those, or a ``datasets`` name (``name[:config[:split]]``)
when the Hub is reachable. Each document is tokenized without special tokens, documents
are joined by the tokens of "\\n\\n", and N windows of L tokens are cut at seeded random
offsets.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..base.errors import QuantMoeError
from ..base.files import save_safetensors
from ..base.paths import NSAMPLES

TEXT_SUFFIXES = (".txt", ".md", ".rst")


def read_documents(source: str | Path) -> list[str]:
    """The documents of a text/JSONL file, a folder of them, or a datasets name."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + (".jsonl",))
        if not files:
            raise QuantMoeError(f"folder {path} holds no .txt/.md/.rst/.jsonl files; point --data at text")
        root = path.resolve()
        for f in files:  # a stranger's folder of text: a link out of it would read, and publish, a file of this machine
            if not f.resolve().is_relative_to(root):
                raise QuantMoeError(f"{f} links outside the data folder {path}; quantmoe reads only files inside "
                                    "it: replace the link with a copy of the file")
        return [doc for f in files for doc in read_documents(f)]
    if path.is_file():
        if path.suffix == ".safetensors":
            raise QuantMoeError(f"{path} is a token file; pass it as --calib to quantize, not as text")
        if path.suffix == ".json":
            raise QuantMoeError(f"{path} is a JSON file; write one {{\"text\": ...}} object per line to a .jsonl file")
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise QuantMoeError(f"{path} is not UTF-8 text; pass a .txt or .jsonl file") from None
        if path.suffix == ".jsonl":
            docs = []
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError, IndexError):
                    raise QuantMoeError(f"{path}:{n} is not a JSON object with a \"text\" field; "
                                        "write one {\"text\": ...} per line") from None
                if not isinstance(text, str):
                    raise QuantMoeError(f"{path}:{n}: \"text\" is a JSON {type(text).__name__}, not a string; "
                                        "write one {\"text\": \"...\"} per line")
                docs.append(text)
            return docs
        return [raw]
    if str(source).endswith((".jsonl", ".txt", ".safetensors")) or "/" in str(source).strip("/") and path.suffix:
        raise QuantMoeError(f"data file {path} does not exist; check the path")
    return _datasets_documents(str(source))


def _datasets_documents(name: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise QuantMoeError(f"{name!r} is neither a file nor a folder, and the datasets package is missing; "
                            "pass a local .txt/.jsonl file or pip install 'quantmoe[datasets]'") from None
    parts = name.split(":")
    try:
        # A dataset's own loading script is code from the Hub: never run (datasets 4+ runs none at all).
        ds = datasets.load_dataset(parts[0], parts[1] if len(parts) > 1 else None,
                                   split=parts[2] if len(parts) > 2 else "train", trust_remote_code=False)
    except Exception as exc:
        raise QuantMoeError(f"could not load dataset {name!r} ({type(exc).__name__}); "
                            "without Hub access pass a local .txt/.jsonl file") from None
    try:
        texts = list(ds["text"])
    except (KeyError, ValueError, TypeError):
        raise QuantMoeError(f"dataset {name!r} has no \"text\" column; pass one that has, or a local .jsonl "
                            "file") from None
    if not all(isinstance(t, str) for t in texts):
        raise QuantMoeError(f"dataset {name!r} has a \"text\" column that is not all strings; pass a local .jsonl "
                            "file of {\"text\": \"...\"} lines")
    return texts


def check_count(option: str, value, least: int = 1) -> None:
    """Raise unless ``value`` (given as ``option``) is an integer of at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise QuantMoeError(f"{option} {value} is invalid; use an integer of at least {least}")


def check_seed(seed) -> None:
    """Raise unless ``seed`` is an integer torch's generators take."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64:
        raise QuantMoeError(f"--seed {seed} is out of range; use an integer such as 0")


def token_stream(tokenizer, documents: list[str]) -> Tensor:
    """Documents joined with "\\n\\n" and tokenized once, without special tokens: int64 (T,)."""
    text = "\n\n".join(documents)
    if not text.strip():
        raise QuantMoeError("the text is empty; pass a file with text in it")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def document_stream(tokenizer, documents: list[str]) -> Tensor:
    """Each document tokenized on its own, joined by the tokens of "\\n\\n": int64 (T,).

    For calibration, where a corpus may be large: memory stays proportional to the
    tokens, not to one giant string's encoding. (Evaluation tokenizes once; see token_stream.)
    """
    docs = [d for d in documents if d.strip()]
    if not docs:
        raise QuantMoeError("the text is empty; pass a file with text in it")
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for start in range(0, len(docs), 256):
        for doc_ids in tokenizer(docs[start:start + 256], add_special_tokens=False, verbose=False)["input_ids"]:
            if ids:
                ids.extend(sep)
            ids.extend(doc_ids)
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(stream: Tensor, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """N windows of L tokens at seeded random offsets: int64 (N, L)."""
    need = nsamples * seqlen
    if stream.numel() < need:
        raise QuantMoeError(f"the calibration text has {stream.numel()} tokens, fewer than --nsamples {nsamples} x "
                            f"--seqlen {seqlen} = {need}; give more text or lower --nsamples/--seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary, to catch token files made with another tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def build_calibration(tokenizer, data: str | Path, nsamples: int, seqlen: int, seed: int) -> tuple[Tensor, dict]:
    check_count("--nsamples", nsamples)
    check_count("--seqlen", seqlen)
    check_seed(seed)
    docs = read_documents(data)
    if not any(doc.strip() for doc in docs):
        raise QuantMoeError(f"the calibration data {data} is empty; pass a file with text in it")
    ids = sample_windows(document_stream(tokenizer, docs), nsamples, seqlen, seed)
    meta = {"source": str(data), "seed": str(seed), "nsamples": str(nsamples), "seqlen": str(seqlen),
            "tokenizer": getattr(tokenizer, "name_or_path", ""), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": str(len(tokenizer))}
    return ids, meta


def write_calibration(path: Path, ids: Tensor, meta: dict, overwrite: bool = True) -> Path:
    """Save a token file (``check_calibration_out`` first)."""
    path = Path(path)
    check_calibration_out(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, {"input_ids": ids.contiguous()}, metadata=meta)
    return path


def check_calibration_out(path: Path, overwrite: bool) -> None:
    """Without ``overwrite`` an existing ``path`` is an error; with it, only a token file (one
    ``read_calibration`` reads) is ever replaced, never another file that happens to be named so."""
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise QuantMoeError(f"{path} already exists; pass --overwrite to replace it, or choose another --out")
        if path.is_symlink() or not path.is_file():
            raise QuantMoeError(f"--out {path} is not a file; choose another --out")
        try:
            read_calibration(path)
        except QuantMoeError:
            raise QuantMoeError(f"--out {path} is not a calibration token file, so --overwrite leaves it alone "
                                "(it replaces only files quantmoe calibrate wrote); choose another --out") from None


def read_calibration(path: Path, tokenizer=None) -> tuple[Tensor, dict]:
    """A token file from ``quantmoe calibrate``; rows are used exactly as they are."""

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "input_ids" not in f.keys():
                raise QuantMoeError(f"{path} has no input_ids tensor; make it with quantmoe calibrate")
            ids = f.get_tensor("input_ids")
    except (SafetensorError, OSError) as exc:
        raise QuantMoeError(f"{path} is not a readable safetensors token file ({exc}); make it with quantmoe calibrate") from None
    if ids.ndim != 2 or ids.numel() == 0 or ids.dtype not in (torch.int64, torch.int32):
        raise QuantMoeError(f"{path}: input_ids must be a non-empty integer (N, L) tensor; make it with quantmoe calibrate")
    if tokenizer is not None:
        fp = meta.get("tokenizer_fingerprint")
        if fp and fp != tokenizer_fingerprint(tokenizer):
            raise QuantMoeError(f"{path} was tokenized with another vocabulary than this model's; "
                                "re-run quantmoe calibrate with --tokenizer pointing at this model")
        least, greatest = int(ids.min()), int(ids.max())
        if least < 0 or greatest >= len(tokenizer):
            raise QuantMoeError(f"{path} holds token ids from {least} to {greatest}, outside this model's vocabulary "
                                f"of {len(tokenizer)} (0 to {len(tokenizer) - 1}); re-run quantmoe calibrate with "
                                "--tokenizer pointing at this model")
    return ids.long(), meta


def calibration_tokens(tokenizer, calib: str | Path, nsamples: int | None, seqlen: int | None, seed: int,
                       default_seqlen: int = 2048) -> tuple[Tensor, dict]:
    """Token rows for quantize: text sampled into ``nsamples`` windows of ``seqlen`` tokens, or a
    token file's rows (the first ``nsamples`` x ``seqlen`` of them when those are given)."""
    for option, value in (("--nsamples", nsamples), ("--seqlen", seqlen)):
        if value is not None:
            check_count(option, value)
    if str(calib).endswith(".safetensors"):
        if not Path(calib).is_file():
            raise QuantMoeError(f"calibration file {calib} does not exist; make it with quantmoe calibrate")
        ids, meta = read_calibration(Path(calib), tokenizer)
        rows, cols = ids.shape
        if (nsamples or 0) > rows or (seqlen or 0) > cols:
            raise QuantMoeError(f"{calib} holds {rows} x {cols} tokens, fewer than --nsamples {nsamples or rows} x "
                                f"--seqlen {seqlen or cols}; lower them or make a larger file with quantmoe calibrate")
        return ids[:nsamples, :seqlen].contiguous(), meta
    return build_calibration(tokenizer, calib, nsamples or NSAMPLES, seqlen or default_seqlen, seed)
