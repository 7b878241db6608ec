"""On-disk activation store: safetensors shards + a manifest with checksums.

Layout of a store directory:
  manifest.json           format, model, hook, d_in, dtype, token counts, exclusions,
                          shards [{file, rows, sha256}], resume state, `complete`
  documents.json          document ids, indexed by the `doc` column
  shard_00000.safetensors acts [rows, d_in], tokens [rows] int32, doc [rows] int32, pos [rows] int32

Shards are written atomically and only then listed in the manifest (itself written
atomically), so a killed harvest leaves a store whose manifest lists exactly the shards
that are whole. Every shard read is checked against its sha256.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from saelab.io import atomic_write, read_json, sha256_bytes, write_json

FORMAT = "saelab.activations/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StoreError(RuntimeError):
    """A store that is missing, incomplete, corrupt or does not fit the request."""


class StoreWriter:
    """Append rows to a store, flushing full shards; resumable from the manifest."""

    def __init__(self, path: str | Path, meta: dict[str, Any], shard_tokens: int):
        self.path = Path(path)
        self.shard_tokens = shard_tokens
        manifest = self.path / "manifest.json"
        if manifest.is_file():
            m = read_json(manifest)
            if m.get("config_hash") != meta.get("config_hash"):
                raise StoreError(f"{self.path} holds a store made with another config "
                                 f"(hash {m.get('config_hash')} != {meta.get('config_hash')}); "
                                 "choose another output directory or delete it")
            self.manifest = m
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": FORMAT, **meta, "n_tokens": 0, "shards": [],
                             "excluded": {"bos": 0, "pad": 0, "special": 0},
                             "resume": {"contexts_done": 0}, "complete": False}
        self._buf: dict[str, list[torch.Tensor]] = {"acts": [], "tokens": [], "doc": [], "pos": []}
        self._buf_rows = 0
        self._pending_excluded = {"bos": 0, "pad": 0, "special": 0}
        self._pending_contexts = 0
        self._dtype = DTYPES[self.manifest["dtype"]]

    @property
    def n_tokens(self) -> int:
        return self.manifest["n_tokens"] + self._buf_rows

    @property
    def contexts_done(self) -> int:
        return self.manifest["resume"]["contexts_done"]

    def add(self, acts: torch.Tensor, tokens: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor,
            excluded: dict[str, int], contexts: int) -> None:
        """acts: [rows, d_in]; tokens, doc, pos: [rows]. `contexts` = contexts these came from."""
        self._buf["acts"].append(acts.to(self._dtype).contiguous())
        self._buf["tokens"].append(tokens.to(torch.int32))
        self._buf["doc"].append(doc.to(torch.int32))
        self._buf["pos"].append(pos.to(torch.int32))
        self._buf_rows += acts.shape[0]
        for k, v in excluded.items():
            self._pending_excluded[k] += v
        self._pending_contexts += contexts
        if self._buf_rows >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if self._buf_rows == 0 and self._pending_contexts == 0:
            return
        if self._buf_rows:
            tensors = {k: torch.cat(v) for k, v in self._buf.items()}
            i = len(self.manifest["shards"])
            name = f"shard_{i:05d}.safetensors"
            blob = st_save(tensors)
            with atomic_write(self.path / name) as f:
                f.write(blob)
            self.manifest["shards"].append({"file": name, "rows": self._buf_rows,
                                            "sha256": sha256_bytes(blob)})
            self.manifest["n_tokens"] += self._buf_rows
        for k, v in self._pending_excluded.items():
            self.manifest["excluded"][k] += v
        self.manifest["resume"]["contexts_done"] += self._pending_contexts
        write_json(self.path / "manifest.json", self.manifest)
        self._buf = {k: [] for k in self._buf}
        self._buf_rows = 0
        self._pending_excluded = {k: 0 for k in self._pending_excluded}
        self._pending_contexts = 0

    def finish(self, documents: list[str], extra: dict[str, Any] | None = None) -> ActivationStore:
        self.flush()
        write_json(self.path / "documents.json", documents)
        self.manifest.update(extra or {})
        self.manifest["complete"] = True
        write_json(self.path / "manifest.json", self.manifest)
        return ActivationStore(self.path)


class ActivationStore:
    """Read side: metadata, checked shard loads, shuffled batches."""

    def __init__(self, path: str | Path, allow_incomplete: bool = False):
        self.path = Path(path)
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
                     buffer_shards: int = 8) -> Iterator[torch.Tensor]:
        """Shuffled float32 batches [batch_size, d_in] for one epoch (last partial dropped).

        Shards are visited in a seeded order; rows are shuffled within a buffer of
        `buffer_shards` shards, so memory stays bounded for stores larger than RAM.
        Deterministic given (seed, epoch).
        """
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(range(len(self.shards)))
        rng.shuffle(order)
        gen = torch.Generator().manual_seed(rng.randrange(2**62))
        leftover = torch.empty(0, self.d_in)
        for g in range(0, len(order), buffer_shards):
            group = [self.load_shard(i)["acts"].float() for i in order[g:g + buffer_shards]]
            pool = torch.cat([leftover, *group])
            pool = pool[torch.randperm(pool.shape[0], generator=gen)]
            n_full = pool.shape[0] // batch_size
            for b in range(n_full):
                yield pool[b * batch_size:(b + 1) * batch_size]
            leftover = pool[n_full * batch_size:]
