"""Build the calibration and held-out text corpora from the Python 3.11 documentation.

Where the text comes from: Debian's ``python3.11-doc`` package (3.11.2-6+deb12u9,
bookworm), which ships the reStructuredText sources of docs.python.org as
``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``. The documentation is under
the PSF License Version 2; ``LICENSE-PSF.txt`` is the package's own copyright file,
copied verbatim.

What it writes (the split is by document, so no held-out document is ever read
during calibration or training):

    quantmoe/data/python_docs_calib.jsonl      ~2.5 MB  {"source": ..., "text": ...} per line
    quantmoe/data/python_docs_heldout.jsonl    ~0.4 MB  same format
    calibration_data/LICENSE-PSF.txt           the package's debian/copyright

How the split is made: every cleaned document is keyed by the SHA-256 of its path
relative to ``_sources`` (e.g. ``library/json.rst.txt``). Walking the documents in
key order, the first ones go to the held-out set until it holds HELDOUT_BYTES, the
next ones to the calibration set until it holds CALIB_BYTES, and the rest are not
shipped. Key order is a fixed pseudo-random shuffle, so both sets mix tutorial,
library reference, HOWTOs and C-API pages, and the result depends only on the
package contents, never on file-system order or the machine.

Usage (either the .deb itself or a directory it was extracted into with dpkg -x):

    apt-get download python3.11-doc
    python calibration_data/build_corpus.py python3.11-doc_3.11.2-6+deb12u9_all.deb

Needs only the Python standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES_SUBDIR = Path("usr/share/doc/python3.11/html/_sources")
COPYRIGHT_FILE = Path("usr/share/doc/python3.11-doc/copyright")


@dataclass(frozen=True)
class CorpusConfig:
    """Sizes and filters of the corpus; the defaults produced the shipped files."""

    # Held-out text for perplexity: ~100k tokens at 4096-vocab BPE, enough for
    # ~200 windows of 512 tokens while staying small in the repository.
    heldout_bytes: int = 400_000
    # Calibration text: GPTQ needs ~128 x 2048 tokens at most; 2.5 MB (~0.7M tokens)
    # also trains the demo models and leaves headroom for rare experts.
    calib_bytes: int = 2_500_000
    # One document larger than this would dominate the held-out set (library/os is
    # 180 KB of reST); such pages are left out of both sets.
    max_doc_bytes: int = 100_000
    # Pages shorter than this after cleaning are tables of contents or stubs.
    min_doc_bytes: int = 1_000
    # Pages where more than this share of non-blank lines are table rows or borders
    # read as markup rather than text (e.g. library/token, the C-API ref-counts table).
    max_table_line_share: float = 0.3


# --- reST clean-up -------------------------------------------------------------------
# The aim is text a reader would recognise as the rendered page: roles become the words
# Sphinx would print, directives become their rendered captions, and pure markup
# (index entries, labels, module metadata) goes away. Code examples stay: they are part
# of the documentation and of what a model of "Python docs" should predict.

# :role:`content`, optionally with a domain (:c:func:, :py:data:).
_ROLE = re.compile(r":(?:[a-z]+:)?([a-zA-Z-]+):`([^`]{1,200})`")
# `link text <https://...>`_ and `link text`_
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")
_BARE_LINK = re.compile(r"`([^`]+)`__?")
_FOOTNOTE_REF = re.compile(r"\s?\[(?:#[\w-]*|\d+)\]_")
_LITERAL = re.compile(r"``([^`]{1,200})``")
_STRONG = re.compile(r"\*\*([^*]+)\*\*")
# A heading under/overline, a transition, or a simple-table border.
_RULE_LINE = re.compile(r"^\s*([=\-~^*#+\"'`.:_])\1{2,}\s*$")
_SIMPLE_TABLE_BORDER = re.compile(r"^\s*=+( +=+)+\s*$")
_GRID_TABLE_LINE = re.compile(r"^\s*[+|]")
_DIRECTIVE = re.compile(r"^(\s*)\.\. ([a-zA-Z:-]+)::\s?(.*)$")
_OPTION_LINE = re.compile(r"^\s+:[\w -]+:")
_COMMENT = re.compile(r"^\s*\.\.(\s|$)")

# Directives whose argument is the signature of a documented object: keep the signature.
_SIGNATURE_DIRECTIVES = {
    "function", "method", "class", "attribute", "data", "exception", "decorator",
    "classmethod", "staticmethod", "abstractmethod", "coroutinemethod",
    "coroutinefunction", "awaitablefunction", "decoratormethod", "describe", "object",
    "opcode", "cmdoption", "option", "envvar", "pdbcommand", "c:function", "c:member",
    "c:type", "c:var", "c:macro", "c:struct",
}
# Admonitions and version notes: Sphinx prints a caption; keep it.
_CAPTIONS = {
    "note": "Note:",
    "warning": "Warning:",
    "important": "Important:",
    "caution": "Caution:",
    "seealso": "See also:",
    "impl-detail": "CPython implementation detail:",
    "availability": "Availability:",
}
_VERSION_CAPTIONS = {
    "versionadded": "New in version {}.",
    "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}:",
    "deprecated-removed": "Deprecated since version {}, will be removed in version {}:",
}
# Directives whose body is kept as it is (code, doctests, topic boxes).
_BODY_DIRECTIVES = {
    "code-block", "sourcecode", "doctest", "testcode", "testoutput", "parsed-literal",
    "topic", "sidebar", "only", "rubric", "epigraph", "glossary", "list-table", "table",
    "csv-table", "productionlist",
}
# Everything else (index, module, moduleauthor, toctree, highlight, include,
# literalinclude, audit-event, testsetup, image, comments, ...) is dropped with its
# indented body.


def _render_role(match: re.Match) -> str:
    role, content = match.group(1).lower(), match.group(2)
    if role in ("pep", "rfc"):
        return f"{role.upper()} {content}"
    if role == "issue":
        return f"bpo-{content}"
    if role == "gh":
        return f"gh-{content}"
    # :ref:`text <label>` and friends print the text part.
    explicit = re.match(r"(.*?)\s*<[^<>]+>$", content, flags=re.S)
    if explicit and explicit.group(1):
        return explicit.group(1)
    content = content.lstrip("!")
    if content.startswith("~"):
        content = content[1:].rsplit(".", 1)[-1]
    # Sphinx appends "()" to function and method references.
    if role in ("func", "meth") and not content.endswith(")"):
        content += "()"
    return content


def _render_inline(line: str) -> str:
    # Literals first: a role that wraps to the next line must not close on a ``literal``.
    line = _LITERAL.sub(r"\1", line)
    line = _ROLE.sub(_render_role, line)
    line = _LINK.sub(r"\1", line)
    line = _BARE_LINK.sub(r"\1", line)
    line = _FOOTNOTE_REF.sub("", line)
    line = _STRONG.sub(r"\1", line)
    # "Example::" introduces a literal block and renders as "Example:".
    if line.rstrip().endswith("::"):
        line = line.rstrip()[:-1]
        if line.strip() == ":":
            line = ""
    return line


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def clean_rst(text: str) -> str:
    """Turn one page of reST source into plain text close to the rendered page."""
    lines = text.replace("\t", "    ").splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE.match(line)
        # ".. _label:", ".. [#note] ...", ".. |subst| ..." and plain comments; not the
        # "..." of a doctest continuation line.
        is_comment = not directive and _COMMENT.match(line) is not None
        if directive or is_comment:
            base = _indent(line)
            name, arg = (directive.group(2), directive.group(3).strip()) if directive else ("", "")
            i += 1
            # Option lines (:synopsis:, :noindex:, ...) belong to the directive head.
            while i < len(lines) and _OPTION_LINE.match(lines[i]) and _indent(lines[i]) > base:
                i += 1
            keep_body = True
            if name in _SIGNATURE_DIRECTIVES:
                out.append(" " * base + arg)
            elif name in _CAPTIONS:
                out.append(" " * base + " ".join(filter(None, [_CAPTIONS[name], _render_inline(arg)])))
            elif name in _VERSION_CAPTIONS:
                template = _VERSION_CAPTIONS[name]
                n_versions = template.count("{}")
                # The argument is the version(s), optionally followed by the first sentence.
                parts = arg.split(None, n_versions)
                if len(parts) >= n_versions:
                    caption = template.format(*parts[:n_versions])
                    rest = _render_inline(parts[n_versions]) if len(parts) > n_versions else ""
                    out.append(" " * base + " ".join(filter(None, [caption, rest])))
            elif name in _BODY_DIRECTIVES:
                if name in ("rubric", "topic", "sidebar") and arg:
                    out.append(" " * base + _render_inline(arg))
            else:
                keep_body = False
            if not keep_body:
                # The body is every following line that is blank or indented deeper.
                while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
                    i += 1
            # A kept body is left to the main loop, so directives nested in it
            # (a versionchanged inside a function entry) are rendered too.
            continue
        if _RULE_LINE.match(line):
            i += 1
            continue
        out.append(_render_inline(line))
        i += 1

    cleaned = "\n".join(l.rstrip() for l in out)
    # Roles and literals that wrap over a line end survive the line-by-line pass.
    cleaned = _ROLE.sub(_render_role, cleaned)
    cleaned = _LITERAL.sub(r"\1", cleaned)
    cleaned = re.sub(r"\n{3,}", "\n\n", cleaned)
    return cleaned.strip() + "\n"


def table_line_share(text: str) -> float:
    """Share of non-blank lines that are grid-table rows or simple-table borders."""
    lines = [l for l in text.splitlines() if l.strip()]
    if not lines:
        return 1.0
    table = sum(1 for l in lines if _GRID_TABLE_LINE.match(l) or _SIMPLE_TABLE_BORDER.match(l))
    return table / len(lines)


# --- package access ------------------------------------------------------------------


def extract_deb(deb: Path, dest: Path) -> None:
    """Unpack a .deb's data.tar.xz into dest, like `dpkg -x` (an ar archive holding tars)."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise SystemExit(f"{deb} is not a Debian package (no ar header)")
    pos = 8
    while pos < len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                body = lzma.decompress(body)
            elif not name.endswith(".tar"):
                raise SystemExit(f"{deb}: {name} is not xz-compressed; unpack it with `dpkg -x` and pass the folder")
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                tar.extractall(dest, filter="data")
            return
        pos += 60 + size + (size % 2)  # ar members are 2-byte aligned
    raise SystemExit(f"{deb} has no data.tar member")


def load_documents(package_root: Path, cfg: CorpusConfig) -> dict[str, str]:
    """Cleaned text of every usable page, keyed by its path under _sources."""
    sources = package_root / SOURCES_SUBDIR
    if not sources.is_dir():
        raise SystemExit(f"{sources} not found; pass the python3.11-doc .deb or the folder `dpkg -x` made of it")
    docs: dict[str, str] = {}
    for path in sorted(sources.rglob("*.rst.txt")):
        raw = path.read_text(encoding="utf-8")
        if table_line_share(raw) > cfg.max_table_line_share:
            continue
        text = clean_rst(raw)
        size = len(text.encode("utf-8"))
        if cfg.min_doc_bytes <= size <= cfg.max_doc_bytes:
            docs[path.relative_to(sources).as_posix()] = text
    return docs


def split_documents(docs: dict[str, str], cfg: CorpusConfig) -> tuple[list[str], list[str]]:
    """(held-out, calibration) document names; see the module docstring for the rule."""
    heldout: list[str] = []
    calib: list[str] = []
    heldout_size = calib_size = 0
    for name in sorted(docs, key=lambda n: hashlib.sha256(n.encode("utf-8")).hexdigest()):
        size = len(docs[name].encode("utf-8"))
        if heldout_size < cfg.heldout_bytes:
            heldout.append(name)
            heldout_size += size
        elif calib_size < cfg.calib_bytes:
            calib.append(name)
            calib_size += size
    return heldout, calib


def write_jsonl(path: Path, docs: dict[str, str], names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for name in names:
            f.write(json.dumps({"source": name, "text": docs[name]}, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path, help="python3.11-doc .deb, or the folder it was extracted into")
    parser.add_argument("--out-root", type=Path, default=REPO_ROOT, help="repository root to write into")
    args = parser.parse_args()
    cfg = CorpusConfig()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.package
        if root.is_file():
            extract_deb(root, Path(tmp))
            root = Path(tmp)
        docs = load_documents(root, cfg)
        heldout, calib = split_documents(docs, cfg)
        calib_path = args.out_root / "quantmoe" / "data" / "python_docs_calib.jsonl"
        heldout_path = args.out_root / "quantmoe" / "data" / "python_docs_heldout.jsonl"
        write_jsonl(calib_path, docs, calib)
        write_jsonl(heldout_path, docs, heldout)
        for licence in ("calibration_data", "quantmoe/data"):  # beside the sources, and inside the package that ships the text
            shutil.copyfile(root / COPYRIGHT_FILE, args.out_root / licence / "LICENSE-PSF.txt")

    assert not set(heldout) & set(calib)
    for label, path, names in (("calibration", calib_path, calib), ("held-out", heldout_path, heldout)):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{label}: {len(names)} documents, {path.stat().st_size:,} bytes, sha256 {digest}  {path}")
    print(f"usable documents: {len(docs)}; not shipped: {len(docs) - len(heldout) - len(calib)}")


if __name__ == "__main__":
    main()
