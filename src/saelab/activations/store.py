"""On-disk activation store: safetensors shards + a manifest with checksums.

Layout of a store directory:
  manifest.json           format, model, hook, d_in, dtype, token counts, exclusions,
                          shards [{file, rows, sha256}], running statistics (sums for the mean
                          and norms), resume state, `rows_sha256` (checksum of the row index
                          tokens/doc/pos), `complete`
  documents.json          document ids, indexed by the `doc` column
  shard_00000.safetensors acts [rows, d_in], tokens [rows] int32, doc [rows] int32, pos [rows] int32

Shards are written atomically and only then listed in the manifest (itself written
atomically), so a killed harvest leaves a store whose manifest lists exactly the shards
that are whole. Every shard read is checked against its sha256. Stores harvested in one
pass at several hook points share their row order; `aligned(a, b)` checks it.
"""

from __future__ import annotations

import atexit
import bisect
import copy
import hashlib
import json
import queue
import random
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load

from saelab.io import (
    DTYPES,
    atomic_write,
    json_text,
    read_json,
    sha256_bytes,
    write_json,
    write_text,
)

INDEX = ("tokens", "doc", "pos")
EXCLUDED = ("bos", "pad", "special", "listed")

FORMAT = "saelab.activations/1"


class StoreError(RuntimeError):
    """A store that is missing, incomplete, corrupt or does not fit the request."""


class StoreWriter:
    """Append rows to a store, flushing full shards; resumable from the manifest."""

    def __init__(self, path: str | Path, meta: dict[str, Any], shard_tokens: int,
                 same: Callable[[dict[str, Any]], bool] | None = None):
        """same(manifest): whether an existing manifest is this harvest's (default: equal config_hash)."""
        self.path = Path(path)
        self.shard_tokens = shard_tokens
        SHARD_WRITER.wait()  # an interrupted writer's last flushes land before we read
        manifest = self.path / "manifest.json"
        same = same or (lambda m: m.get("config_hash") == meta.get("config_hash"))
        if manifest.is_file():
            m = read_json(manifest)
            if not same(m):
                raise StoreError(f"{self.path} holds a store made with another config "
                                 f"(hash {m.get('config_hash')} != {meta.get('config_hash')}); "
                                 "choose another output directory or delete it")
            self.manifest = m
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            d = int(meta["d_in"])
            self.manifest = {"format": FORMAT, **meta, "n_tokens": 0, "shards": [],
                             "excluded": dict.fromkeys(EXCLUDED, 0),
                             "stats": {"sum": [0.0] * d, "sum_norm": 0.0, "sum_sq_norm": 0.0},
                             "resume": {"contexts_done": 0}, "complete": False}
        self._dtype = DTYPES[self.manifest["dtype"]]
        self._reset_buffer()  # the rows of the next shard, as the chunks they came in, and their sums

    @property
    def n_tokens(self) -> int:
        return self.manifest["n_tokens"] + self._buf_rows

    @property
    def contexts_done(self) -> int:
        return self.manifest["resume"]["contexts_done"]

    def add(self, acts: torch.Tensor, tokens: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor,
            excluded: dict[str, int], contexts: int) -> None:
        """acts: [rows, d_in]; tokens, doc, pos: [rows]. `contexts` = contexts these came from.
        The rows are kept (not copied, unless they view another tensor) until written: do not
        change them in place afterwards."""
        acts = _owned(acts, self._dtype)
        self._buf["acts"].append(acts)
        self._buf["tokens"].append(_owned(tokens, torch.int32))
        self._buf["doc"].append(_owned(doc, torch.int32))
        self._buf["pos"].append(_owned(pos, torch.int32))
        self._buf_rows += acts.shape[0]
        _add_stats(self._sums, acts)
        for k, v in excluded.items():
            self._pending_excluded[k] += v
        self._pending_contexts += contexts
        if self._buf_rows >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Close the buffered rows into a shard: its bytes and checksum here, its write (temp file,
        fsync, rename) and then the manifest's by the background writer (`SHARD_WRITER`), in order."""
        if self._buf_rows == 0 and self._pending_contexts == 0:
            return
        self.manifest["prev"] = copy.deepcopy({k: v for k, v in self.manifest.items() if k != "prev"})
        shard = None  # (its path, its bytes)
        if self._buf_rows:
            stats = self.manifest["stats"]
            stats["sum"] = (torch.tensor(stats["sum"], dtype=torch.float64) + self._sums["sum"]).tolist()
            stats["sum_norm"] += float(self._sums["sum_norm"])
            stats["sum_sq_norm"] += float(self._sums["sum_sq_norm"])
            name = f"shard_{len(self.manifest['shards']):05d}.safetensors"
            shard = (self.path / name, ShardBytes(self._buf))
            self.manifest["shards"].append({"file": name, "rows": self._buf_rows, "sha256": shard[1].sha256})
            self.manifest["n_tokens"] += self._buf_rows
        for k, v in self._pending_excluded.items():
            self.manifest["excluded"][k] = self.manifest["excluded"].get(k, 0) + v
        self.manifest["resume"]["contexts_done"] += self._pending_contexts
        SHARD_WRITER.submit(self.path, shard, json_text(self.manifest))
        self._reset_buffer()

    def _reset_buffer(self) -> None:
        self._buf = {k: [] for k in ("acts", *INDEX)}
        self._sums = {"sum": torch.zeros(int(self.manifest["d_in"]), dtype=torch.float64), "sum_norm": 0.0,
                      "sum_sq_norm": 0.0}
        self._buf_rows = 0
        self._pending_excluded = dict.fromkeys(EXCLUDED, 0)
        self._pending_contexts = 0

    def rollback(self, contexts_done: int) -> None:
        """Undo the last flush if it went past `contexts_done` (to line up stores written in
        one pass when a kill fell between their flushes)."""
        if self.contexts_done == contexts_done:
            return
        prev = self.manifest.get("prev")
        if self._buf_rows or not prev or prev["resume"]["contexts_done"] != contexts_done:
            raise StoreError(f"{self.path}: cannot line up with the other stores of this harvest "
                             f"({self.contexts_done} contexts done, the others {contexts_done}); delete "
                             "the output directory and harvest again")
        self.manifest = prev
        SHARD_WRITER.drain()
        write_json(self.path / "manifest.json", self.manifest)

    def finish(self, documents: list[str], extra: dict[str, Any] | None = None) -> ActivationStore:
        self.flush()
        SHARD_WRITER.drain()
        write_json(self.path / "documents.json", documents)
        self.manifest.update(extra or {})
        self.manifest["rows_sha256"] = rows_sha256(self.path, self.manifest["shards"])
        self.manifest["complete"] = True
        write_json(self.path / "manifest.json", self.manifest)
        return ActivationStore(self.path)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32"}


class ShardBytes:
    """A shard's safetensors file (8-byte little-endian header length, the JSON header padded
    with spaces to 8 bytes, then each tensor's raw bytes) made from its tensors as the chunks
    they were added in: no concatenated copy and no serialized copy of the rows is made, and
    the sha256 is computed over the same bytes `write` writes. tensors: name -> chunks."""

    def __init__(self, tensors: dict[str, list[torch.Tensor]]):
        header, self.views, start = {}, [], 0
        # largest elements first (as safetensors' own save does): every tensor starts aligned
        for name, chunks in sorted(tensors.items(), key=lambda kv: -kv[1][0].element_size()):
            views = [c.reshape(-1).view(torch.uint8).numpy() for c in chunks]
            size = sum(v.nbytes for v in views)
            header[name] = {"dtype": SAFETENSORS_DTYPES[chunks[0].dtype],
                            "shape": [sum(c.shape[0] for c in chunks), *chunks[0].shape[1:]],
                            "data_offsets": [start, start + size]}
            self.views += views
            start += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)
        self.head = struct.pack("<Q", len(text)) + text
        self.nbytes = start
        h = hashlib.sha256(self.head)
        for v in self.views:
            h.update(v)
        self.sha256 = h.hexdigest()

    def write(self, f) -> None:
        f.write(self.head)
        for v in self.views:
            f.write(v)


class _ShardWriter:
    """One background thread that writes every store's shards (temp file, fsync, rename) and then
    the manifest listing them, in the order they were submitted, while the harvest's forward
    passes go on: the waits on the disk leave the critical path. One FIFO for all stores keeps a
    multi-hook harvest's stores at most one flush apart on disk if the process is killed (what
    `StoreWriter.rollback` lines up). Memory stays bounded: a submit waits while `max_bytes` of
    shards are pending (one is always let through). After a failed write every flush behind it
    is dropped (its shard never listed) and the failure is raised by the next submit or drain,
    once the queue is empty."""

    def __init__(self, max_bytes: int = 1 << 30):
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._max_bytes, self._pending = max_bytes, 0
        self._room = threading.Condition()

    def submit(self, store: Path, shard: tuple[Path, ShardBytes] | None, manifest: str) -> None:
        if self._error is not None:
            self.drain()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, daemon=True, name="saelab store writer")
            self._thread.start()
        nbytes = shard[1].nbytes if shard is not None else 0
        with self._room:
            self._room.wait_for(lambda: self._pending == 0 or self._pending + nbytes <= self._max_bytes)
            self._pending += nbytes
        self._q.put((store, shard, manifest, nbytes))

    def wait(self) -> None:
        """Wait until every submitted write is done (a reader in the writing process sees them)."""
        if self._thread is not None:
            self._q.join()

    def drain(self, raise_error: bool = True) -> None:
        """Wait; then raise the first failure (or, with raise_error=False, forget it: an
        interrupted harvest whose own error is on its way up)."""
        self.wait()
        e, self._error = self._error, None
        if e is not None and raise_error:
            raise StoreError(f"writing an activation store failed: {e}") from e

    def _at_exit(self) -> None:
        self.wait()
        if self._error is not None:
            print(f"saelab: a store shard could not be written: {self._error}", file=sys.stderr)

    def _work(self) -> None:
        while True:
            store, shard, manifest, nbytes = self._q.get()
            try:
                if self._error is None:
                    if shard is not None:
                        with atomic_write(shard[0]) as f:
                            shard[1].write(f)
                    write_text(store / "manifest.json", manifest)
            except BaseException as e:  # raised in the harvest by its next submit or drain
                self._error = e
            finally:
                del store, shard, manifest  # an idle thread holds no rows
                with self._room:
                    self._pending -= nbytes
                    self._room.notify_all()
                self._q.task_done()


SHARD_WRITER = _ShardWriter()
atexit.register(SHARD_WRITER._at_exit)


def _owned(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as a contiguous CPU tensor of dtype that is not a view into a caller's buffer: the writer
    keeps the rows until their shard is on disk, after `add` has returned, so a slice of a buffer
    the caller refills is copied (a fresh tensor, as a harvest batch's gathered rows are, is not)."""
    out = t.to("cpu", dtype)
    return out.clone() if out._base is not None or not out.is_contiguous() else out


def _add_stats(sums: dict[str, Any], acts: torch.Tensor) -> None:
    """Accumulate the sums for the mean and the norms of acts [rows, d_in] (float64 accumulators;
    the per-row squared norms are float32 sums of float32 squares, ~1e-7 relative)."""
    a = acts.float()
    sums["sum"] += a.sum(0, dtype=torch.float64)
    sq = a.pow(2).sum(1)  # [rows]
    sums["sum_norm"] += float(sq.sqrt().sum(dtype=torch.float64))
    sums["sum_sq_norm"] += float(sq.sum(dtype=torch.float64))


def rows_sha256(path: Path, shards: list[dict[str, Any]]) -> str:
    """sha256 of the row index (tokens, doc, pos of every row, in order), shard-boundary free."""
    h = [hashlib.sha256() for _ in INDEX]
    for entry in shards:
        with safe_open(str(path / entry["file"]), "pt") as f:
            for hk, key in zip(h, INDEX, strict=True):
                hk.update(f.get_tensor(key).numpy().tobytes())
    return sha256_bytes("".join(hk.hexdigest() for hk in h).encode())


def aligned(a: ActivationStore, b: ActivationStore, strict: bool = False) -> bool:
    """Whether two stores hold the same rows (tokens, doc, pos) in the same order.

    Stores from one multi-hook harvest are (e.g. mlp_in.3 and mlp_out.3, paired row by row
    for a transcoder). With strict, a mismatch raises StoreError saying what differs.
    """
    why = None
    if a.n_tokens != b.n_tokens:
        why = f"{a.n_tokens} rows != {b.n_tokens} rows"
    elif not a.manifest.get("rows_sha256") or a.manifest.get("rows_sha256") != b.manifest.get("rows_sha256"):
        why = "their row indexes (tokens, doc, pos) differ"
    elif [s["rows"] for s in a.shards] != [s["rows"] for s in b.shards]:
        why = "their shard sizes differ (the same seed would shuffle them differently)"
    if why and strict:
        raise StoreError(f"stores {a.path} ({a.hook}) and {b.path} ({b.hook}) are not row-aligned: {why}; "
                         "harvest both hook points in one pass (hook: [A, B]) to pair them")
    return why is None


class ActivationStore:
    """Read side: metadata, checked shard loads, random access by row, shuffled batches."""

    def __init__(self, path: str | Path, allow_incomplete: bool = False):
        self.path = Path(path)
        SHARD_WRITER.wait()
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise StoreError(f"{self.path} is not an activation store: {mpath} is missing "
                             "(create one with `saelab harvest`)")
        try:
            self.manifest = read_json(mpath)
        except ValueError as e:
            raise StoreError(f"{mpath} is not valid JSON: {e}") from None
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{mpath}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        if not self.manifest.get("complete") and not allow_incomplete:
            raise StoreError(f"{self.path} is an incomplete store (its harvest was interrupted); "
                             "rerun the same `saelab harvest` command to resume it")

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def hook(self) -> str:
        return self.manifest["hook"]

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def mean(self) -> torch.Tensor:
        """Mean activation [d_in] (float32), from the running sums."""
        return (torch.tensor(self.manifest["stats"]["sum"], dtype=torch.float64) / max(self.n_tokens, 1)).float()

    @property
    def mean_norm(self) -> float:
        return self.manifest["stats"]["sum_norm"] / max(self.n_tokens, 1)

    @property
    def rms_norm(self) -> float:
        """sqrt(E||x||^2), e.g. to scale activations to norm sqrt(d_in)."""
        return (self.manifest["stats"]["sum_sq_norm"] / max(self.n_tokens, 1)) ** 0.5

    def rows(self, idx: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """Random access: acts [n, d_in] (float32), tokens, doc, pos [n] of the given row numbers."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < self.n_tokens):
            raise IndexError(f"row index out of range: the store has {self.n_tokens} rows")
        starts = self._starts()
        shard_of = torch.tensor([bisect.bisect_right(starts, int(i)) - 1 for i in idx], dtype=torch.long)
        out = {"acts": torch.empty(len(idx), self.d_in), **{k: torch.empty(len(idx), dtype=torch.int32) for k in INDEX}}
        for s in shard_of.unique().tolist():
            sel = (shard_of == s).nonzero().squeeze(1)
            tensors = self.load_shard(s)
            local = idx[sel] - starts[s]
            for k in out:
                out[k][sel] = tensors[k][local].to(out[k].dtype)
        return out

    def _starts(self) -> list[int]:
        starts, n = [], 0
        for s in self.shards:
            starts.append(n)
            n += s["rows"]
        return starts

    def load_shard(self, i: int) -> dict[str, torch.Tensor]:
        """One shard's tensors, verified against the manifest checksum and row count."""
        entry = self.shards[i]
        file = self.path / entry["file"]
        try:
            blob = file.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"store shard {file} is missing (listed in {self.path / 'manifest.json'})") from None
        if sha256_bytes(blob) != entry["sha256"]:
            raise StoreError(f"store shard {file} is corrupt: its sha256 does not match the manifest")
        tensors = st_load(blob)
        if tensors["acts"].shape != (entry["rows"], self.d_in):
            raise StoreError(f"store shard {file}: acts shape {tuple(tensors['acts'].shape)}, "
                             f"manifest says ({entry['rows']}, {self.d_in})")
        return tensors

    def verify(self) -> None:
        for i in range(len(self.shards)):
            self.load_shard(i)

    def all_acts(self, max_rows: int | None = None) -> torch.Tensor:
        """The first max_rows activations as float32 [rows, d_in] (for small stores and samples)."""
        out, n = [], 0
        for i in range(len(self.shards)):
            a = self.load_shard(i)["acts"]
            out.append(a[: None if max_rows is None else max_rows - n].float())
            n += out[-1].shape[0]
            if max_rows is not None and n >= max_rows:
                break
        return torch.cat(out)

    def iter_batches(self, batch_size: int, seed: int, epoch: int = 0,
                     buffer_shards: int = 8, prefetch: int = 2) -> Iterator[torch.Tensor]:
        """Shuffled float32 batches [batch_size, d_in] for one epoch (see `shuffled_batches`)."""
        return shuffled_batches(lambda i: self.load_shard(i)["acts"].float(), len(self.shards), self.d_in,
                                batch_size, seed, epoch, buffer_shards, prefetch)


def shuffled_batches(load: Callable[[int], torch.Tensor], n_shards: int, width: int, batch_size: int, seed: int,
                     epoch: int = 0, buffer_shards: int = 8, prefetch: int = 2) -> Iterator[torch.Tensor]:
    """Shuffled batches [batch_size, width] over shards `load(i)` for one epoch (last partial dropped).

    Shards are visited in a seeded order; rows are shuffled within a buffer of
    `buffer_shards` shards, so memory stays bounded for stores larger than RAM. A
    background thread reads and verifies up to `prefetch` shards ahead (0: no thread),
    so the consumer does not wait on disk. The sequence depends on (seed, epoch) only.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n_shards))
    rng.shuffle(order)
    gen = torch.Generator().manual_seed(rng.randrange(2**62))
    shards = _read_ahead(load, order, prefetch)
    leftover = torch.empty(0, width)
    for g in range(0, len(order), buffer_shards):
        group = [next(shards) for _ in order[g:g + buffer_shards]]
        pool = torch.cat([leftover, *group])
        pool = pool[torch.randperm(pool.shape[0], generator=gen)]
        n_full = pool.shape[0] // batch_size
        for b in range(n_full):
            yield pool[b * batch_size:(b + 1) * batch_size]
        leftover = pool[n_full * batch_size:]


def _read_ahead(load: Callable[[int], torch.Tensor], order: list[int], prefetch: int) -> Iterator[torch.Tensor]:
    """load(i) for i in `order`, run by a background thread up to `prefetch` items ahead
    (0: inline). An error in the thread is raised in the consumer."""
    if prefetch <= 0:
        yield from (load(i) for i in order)
        return
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False  # the consumer went away

    def work():
        try:
            for i in order:
                if not put(load(i)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    t = threading.Thread(target=work, daemon=True, name="saelab store prefetch")
    _READERS.add((stop, t))
    t.start()
    try:
        for _ in order:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        _READERS.discard((stop, t))


# Reader threads still running at exit (a consumer that stopped mid-epoch without closing
# its iterator, e.g. a training loop's last epoch). A daemon thread killed inside a torch
# op aborts the process ("terminate called without an active exception"), so at exit each
# is told to stop and joined: it finishes the shard it is reading and returns.
_READERS: set[tuple[threading.Event, threading.Thread]] = set()


@atexit.register
def _stop_readers() -> None:
    for stop, t in list(_READERS):
        stop.set()
        t.join(timeout=30)
