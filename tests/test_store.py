import pytest
import torch

from saelab.activations.store import ActivationStore, StoreError, StoreWriter


def _write(path, rows=100, d=4, shard_tokens=32, complete=True):
    w = StoreWriter(path, {"model": "m", "hook": "resid_post.0", "d_in": d, "dtype": "float32",
                           "config_hash": "h"}, shard_tokens)
    x = torch.arange(rows * d, dtype=torch.float32).reshape(rows, d)
    for chunk in range(0, rows, 10):
        n = min(10, rows - chunk)
        w.add(x[chunk:chunk + n], torch.arange(n), torch.zeros(n), torch.arange(n),
              {"bos": 1, "pad": 0, "special": 0}, contexts=1)
    if complete:
        return w.finish(["doc0"]), x
    return None, x  # killed: the last 20 buffered rows were never flushed


def test_round_trip_and_manifest(tmp_path):
    store, x = _write(tmp_path / "s")
    assert store.n_tokens == 100 and store.d_in == 4 and [s['rows'] for s in store.shards] == [40, 40, 20]
    assert torch.equal(store.all_acts(), x)
    assert store.manifest["excluded"]["bos"] == 10
    assert store.manifest["resume"]["contexts_done"] == 10


def test_shuffled_epoch_covers_every_row_once(tmp_path):
    store, x = _write(tmp_path / "s")
    rows = torch.cat(list(store.iter_batches(20, seed=1, epoch=0, buffer_shards=2)))
    assert rows.shape == (100, 4)
    assert sorted(rows[:, 0].tolist()) == x[:, 0].tolist()  # 5 batches of 20
    again = torch.cat(list(store.iter_batches(20, seed=1, epoch=0, buffer_shards=2)))
    other = torch.cat(list(store.iter_batches(20, seed=1, epoch=1, buffer_shards=2)))
    assert torch.equal(rows, again) and not torch.equal(rows, other)


def test_flipped_byte_is_detected_and_names_the_shard(tmp_path):
    store, _ = _write(tmp_path / "s")
    shard = tmp_path / "s" / store.shards[1]["file"]
    blob = bytearray(shard.read_bytes())
    blob[-3] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(StoreError, match=r"shard_00001.safetensors is corrupt"):
        store.verify()


def test_missing_shard_names_the_file(tmp_path):
    store, _ = _write(tmp_path / "s")
    (tmp_path / "s" / "shard_00001.safetensors").unlink()
    with pytest.raises(StoreError, match=r"shard_00001.safetensors is missing"):
        list(store.iter_batches(10, seed=0, buffer_shards=1))


def test_incomplete_store_is_refused(tmp_path):
    _write(tmp_path / "s", complete=False)
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(tmp_path / "s")
    assert ActivationStore(tmp_path / "s", allow_incomplete=True).n_tokens == 80  # the 2 whole shards


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="manifest.json is missing"):
        ActivationStore(tmp_path)


def test_writer_refuses_a_store_with_another_config(tmp_path):
    _write(tmp_path / "s")
    with pytest.raises(StoreError, match="another config"):
        StoreWriter(tmp_path / "s", {"model": "m", "hook": "h", "d_in": 4, "dtype": "float32",
                                     "config_hash": "other"}, 32)
