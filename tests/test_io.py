import pytest

from saelab.io import atomic_write, cache_dir, read_json, stable_hash, write_json


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a.json"
    write_json(p, {"x": 1})
    write_json(p, {"x": 2})
    assert read_json(p) == {"x": 2}
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(p) as f:
        f.write(b"half")
        raise RuntimeError("killed")
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.bin"]


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SAELAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "saelab"


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
