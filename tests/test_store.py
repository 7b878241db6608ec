import pytest
import torch

from saelab.activations.store import ActivationStore, StoreError, StoreWriter


def _writer(path, shard_tokens, d=4, dtype="float32"):
    return StoreWriter(path, {"model": "m", "hook": "resid_post.0", "d_in": d, "dtype": dtype,
                              "config_hash": "h"}, shard_tokens)


def _write(path, rows=100, d=4, shard_tokens=32, complete=True):
    w = _writer(path, shard_tokens, d)
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


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dtypes_stats_and_random_access(tmp_path, dtype):
    w = _writer(tmp_path / "s", 16, d=3, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g) * 4 + 1
    for c in range(0, 50, 10):
        w.add(x[c:c + 10], torch.arange(c, c + 10), torch.full((10,), c // 10), torch.arange(10), {}, contexts=1)
    store = w.finish(["a", "b", "c", "d", "e"])
    xs = x.to(getattr(torch, dtype)).float()  # what the store holds
    assert store.load_shard(0)["acts"].dtype == getattr(torch, dtype)
    assert torch.allclose(store.mean, xs.mean(0), atol=1e-5)
    assert abs(store.mean_norm - float(xs.norm(dim=1).mean())) < 1e-4
    assert abs(store.rms_norm - float(xs.norm(dim=1).pow(2).mean().sqrt())) < 1e-4
    idx = torch.tensor([49, 0, 17, 16, 15, 33, 17])
    r = store.rows(idx)
    assert torch.equal(r["acts"], xs[idx]) and r["tokens"].tolist() == idx.tolist()
    assert r["doc"].tolist() == (idx // 10).tolist() and r["pos"].tolist() == (idx % 10).tolist()
    with pytest.raises(IndexError, match="50 rows"):
        store.rows([50])


def test_prefetch_gives_the_same_sequence_and_raises_a_corrupt_shard(tmp_path):
    store, _ = _write(tmp_path / "s", rows=400, shard_tokens=32)
    plain = list(store.iter_batches(24, seed=3, epoch=2, buffer_shards=3, prefetch=0))
    ahead = list(store.iter_batches(24, seed=3, epoch=2, buffer_shards=3, prefetch=4))
    assert len(plain) == 400 // 24 and all(torch.equal(a, b) for a, b in zip(plain, ahead, strict=True))
    it = store.iter_batches(24, seed=3, prefetch=2)
    next(it)
    it.close()  # a consumer that stops early does not hang the reader thread
    shard = tmp_path / "s" / store.shards[5]["file"]
    blob = bytearray(shard.read_bytes())
    blob[100] ^= 1
    shard.write_bytes(bytes(blob))
    with pytest.raises(StoreError, match="shard_00005.safetensors is corrupt"):
        list(store.iter_batches(24, seed=3, prefetch=2))


def test_aligned(tmp_path):
    from saelab.activations.store import aligned

    a, _ = _write(tmp_path / "a")
    b, _ = _write(tmp_path / "b")
    c, _ = _write(tmp_path / "c", rows=90)
    assert a.manifest["rows_sha256"] and aligned(a, b) and not aligned(a, c)
    with pytest.raises(StoreError, match="100 rows != 90 rows"):
        aligned(a, c, strict=True)


def test_shard_bytes_are_a_safetensors_file_the_real_library_reads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load

    from saelab.activations.store import ShardBytes
    from saelab.io import sha256_file

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        chunks = {"acts": [torch.randn(n, 5, generator=g).to(dtype) for n in (3, 0, 7, 1)],
                  "tokens": [torch.arange(n, dtype=torch.int32) + 10 * n for n in (3, 0, 7, 1)]}
        sb = ShardBytes(chunks)
        path = tmp_path / f"{dtype}.safetensors"
        with open(path, "wb") as f:
            sb.write(f)
        assert sb.sha256 == sha256_file(path)
        got = load(path.read_bytes())
        assert set(got) == {"acts", "tokens"}
        for k, v in chunks.items():
            assert got[k].dtype == v[0].dtype and torch.equal(got[k], torch.cat(v))
        with safe_open(str(path), "pt") as f:
            assert torch.equal(f.get_tensor("tokens"), torch.cat(chunks["tokens"]))


def test_a_failed_shard_write_is_raised_and_the_shard_never_listed(tmp_path):
    (tmp_path / "s" / "shard_00001.safetensors").mkdir(parents=True)  # the rename onto it fails
    w = _writer(tmp_path / "s", 32)
    x = torch.randn(100, 4)
    with pytest.raises(StoreError, match="writing an activation store failed"):
        for c in range(0, 100, 10):
            w.add(x[c:c + 10], torch.arange(10), torch.zeros(10), torch.arange(10), {}, contexts=1)
        w.finish(["d"])
    on_disk = ActivationStore(tmp_path / "s", allow_incomplete=True)
    assert [s["file"] for s in on_disk.shards] == ["shard_00000.safetensors"] and on_disk.n_tokens == 40
    assert torch.equal(on_disk.load_shard(0)["acts"], x[:40])
    # the writer is usable again for the next store
    store, _ = _write(tmp_path / "t")
    assert store.n_tokens == 100


def test_rows_given_as_a_view_of_a_reused_buffer_are_stored_as_they_were(tmp_path):
    w = _writer(tmp_path / "s", 8)
    buf, want = torch.zeros(10, 4), []
    for c in range(4):  # the caller refills one buffer and hands over slices of it
        buf.fill_(float(c))
        w.add(buf[:5], torch.arange(5), torch.zeros(5), torch.arange(5), {}, contexts=1)
        want.append(torch.full((5, 4), float(c)))
    store = w.finish(["d"])
    assert torch.equal(store.all_acts(), torch.cat(want))


def test_flushes_queued_behind_a_failed_write_are_dropped(tmp_path, monkeypatch):
    import time

    from saelab.activations.store import SHARD_WRITER, ShardBytes

    real_write, real_get, calls = ShardBytes.write, SHARD_WRITER._q.get, []

    def slow_then_fail(self, f):
        calls.append(1)
        if len(calls) == 2:  # the second shard: flushes queue up behind it, then it fails
            time.sleep(0.2)
            raise OSError("disk full")
        real_write(self, f)

    def slow_get(*a, **k):  # the writer takes its time to reach what was queued behind the failure
        if SHARD_WRITER._error is not None:
            time.sleep(0.5)
        return real_get(*a, **k)

    monkeypatch.setattr(ShardBytes, "write", slow_then_fail)
    monkeypatch.setattr(SHARD_WRITER._q, "get", slow_get)
    w = _writer(tmp_path / "s", 10)
    x = torch.randn(100, 4)

    def add(c):
        w.add(x[c:c + 10], torch.arange(10), torch.zeros(10), torch.arange(10), {}, contexts=1)

    for c in (0, 10, 20):  # shards 0, 1 (fails), 2 (queued behind it)
        add(c)
    time.sleep(0.4)  # the failure has happened; shard 2 still waits in the queue
    with pytest.raises(StoreError, match="disk full"):
        add(30)  # the next flush reports it, and nothing queued behind it may land
    on_disk = ActivationStore(tmp_path / "s", allow_incomplete=True)
    assert [s["file"] for s in on_disk.shards] == ["shard_00000.safetensors"]
    assert not (tmp_path / "s" / "shard_00002.safetensors").exists()
    on_disk.verify()
