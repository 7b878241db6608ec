"""Harvest: model + hook points + text -> activation stores, one pass for all hook points.

Documents are shuffled with the seed (so every source is mixed into any token budget),
chunked into contexts that never cross a document, cut to the token budget (counted
without the model), batched, and run through the model up to the deepest hook only.
Positions that are padding, BOS, other special tokens or in the user's exclusion list are
dropped and counted. Each store's manifest records how many contexts are done, so
rerunning an interrupted harvest with the same config resumes after the last whole shard.

Under torchrun (WORLD_SIZE > 1) each rank harvests the documents with index % world ==
rank into its own stores; rank 0 then merges them in document order, which is the order a
single process writes, so the merged store holds the same rows as a one-process harvest.
"""

from __future__ import annotations

import heapq
import itertools
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from saelab.activations.rows import kept_rows
from saelab.activations.store import (
    EXCLUDED,
    INDEX,
    SHARD_WRITER,
    ActivationStore,
    StoreError,
    StoreWriter,
)
from saelab.config import StageConfig
from saelab.data.corpus import iter_documents
from saelab.data.tokens import PositionFields, batches, budgeted, contexts, excluded_ids, shuffled
from saelab.device import describe, resolve_device
from saelab.io import read_json
from saelab.models.hooks import HookPoint, resolve
from saelab.models.load import LoadedModel, load_model
from saelab.runs.ledger import check_ledger, derived_id, record
from saelab.runs.results import HarvestResult


class HarvestConfig(StageConfig, PositionFields):
    """Model + hook point + text -> an activation store on disk."""

    model: str = Field("smollm2", description="'smollm2' (embedded), local dir or .gguf, or hub id")
    hook: str | list[str] = Field("resid_post.10", description="hook point KIND.LAYER, or a list captured in "
                                  "one pass: one store each under out/<hook>/, all with the same rows")
    text: str = Field("embedded", description="'embedded' corpus, a .txt/.jsonl/.parquet/.csv/.npy file, "
                      "a folder of .txt, or hf:NAME[:CONFIG]")
    text_field: str = Field("text", description="column holding the text (or token-id lists) in jsonl/parquet/csv")
    split: Literal["train", "validation"] = "train"
    out: str = Field("", description="store directory (default: stores/<model>-<hook>-<split>-<hash>)")
    tokens: int = Field(200_000, gt=0, description="activation rows to collect (after exclusions)")
    ctx_len: int = Field(128, ge=2)
    batch_size: int = Field(16, gt=0, description="contexts per forward pass")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model dtype")
    store_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the stored rows; auto: the model's dtype (a bfloat16 model writes half "
        "the bytes of float32 rows, keeping a 4-hook harvest's overhead within 10% of the forward)")
    long_docs: Literal["chunk", "truncate"] = Field("chunk", description="a document longer than ctx_len: "
                                                    "chunk it into contexts, or keep its first context only")
    shard_tokens: int = Field(32_768, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _resolve_store_dtype(self) -> HarvestConfig:
        # resolved at validation, so a float32 model's store config (and its hash, its name) is
        # what it was when float32 was the default
        if self.store_dtype == "auto":
            self.store_dtype = self.dtype
        return self

    @property
    def hooks(self) -> list[str]:
        return [self.hook] if isinstance(self.hook, str) else list(self.hook)

    def store_name(self) -> str:
        model = Path(self.model).name or self.model
        return f"{model}-{'+'.join(self.hooks)}-{self.split}-{self.hash(exclude={'out'})[:8]}"


def store_dirs(cfg: HarvestConfig) -> dict[str, Path]:
    """Where each hook point's store goes: `out` for a single hook (a string), else out/<hook>/."""
    out = Path(cfg.out or Path("stores") / cfg.store_name())
    if isinstance(cfg.hook, str):
        return {str(HookPoint.parse(cfg.hook)): out}
    names = [str(HookPoint.parse(h)) for h in cfg.hook]
    if len(set(names)) != len(names):
        raise ValueError(f"hook lists a hook point twice: {cfg.hook}")
    return {n: out / n for n in names}


def harvest(cfg: HarvestConfig, loaded: LoadedModel | None = None,
            progress: bool = True) -> ActivationStore | dict[str, ActivationStore]:
    """Run (or resume, or reuse) a harvest. Returns the store, or {hook: store} for a hook list."""
    dirs = store_dirs(cfg)
    config_hash = cfg.hash(exclude={"out"})
    check_ledger(cfg, next(iter(dirs.values())) if isinstance(cfg.hook, str) else None)
    stores = _complete(dirs, cfg)
    if stores is None:
        rank, world, own_group = _distributed()
        try:
            if world == 1:
                _run(cfg, dirs, config_hash, loaded, progress)
            else:
                parts = {h: _rank_dir(d, rank, world) for h, d in dirs.items()}
                _run(cfg, parts, config_hash, loaded, progress and rank == 0, rank, world)
                torch.distributed.barrier()
                if rank == 0:
                    for d in dirs.values():
                        merge([ActivationStore(_rank_dir(d, r, world)) for r in range(world)], d, cfg.shard_tokens)
                torch.distributed.barrier()
        finally:
            if own_group:
                torch.distributed.destroy_process_group()
        stores = _complete(dirs, cfg)
        assert stores is not None, "harvest finished but its stores are not complete"
    for h, store in stores.items():  # one ledger row per store (rank 0 only)
        row_id = (cfg.ledger_id or "") if isinstance(cfg.hook, str) else derived_id(cfg.ledger_id, h)
        record(HarvestResult.read(store.path / "manifest.json"), store.path, cfg, ledger_id=row_id,
               config_hash=config_hash)
    return stores[str(HookPoint.parse(cfg.hook))] if isinstance(cfg.hook, str) else stores


def _complete(dirs: dict[str, Path], cfg: HarvestConfig) -> dict[str, ActivationStore] | None:
    """The stores if all are complete and made with this config, else None."""
    out = {}
    for h, d in dirs.items():
        try:
            store = ActivationStore(d)
        except StoreError:
            return None  # missing or incomplete: harvest (resumes) or refuse (foreign) below
        if not _same_store(cfg)(store.manifest):
            raise StoreError(f"{d} holds a store made with another config (hash "
                             f"{store.manifest.get('config_hash')} != {cfg.hash(exclude={'out'})}); choose another "
                             "output directory or delete it")
        out[h] = store
    return out


def _same_store(cfg: HarvestConfig):
    """Whether a store's manifest was written by a harvest asking for the same work as cfg."""
    return lambda manifest: cfg.same_work(manifest.get("config"), exclude={"out"})


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether we started the process group) under torchrun, else (0, 1, False)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), own


def _rank_dir(d: Path, rank: int, world: int) -> Path:
    return d.parent / f".{d.name}.rank{rank}-of-{world}"


def _run(cfg: HarvestConfig, dirs: dict[str, Path], config_hash: str, loaded: LoadedModel | None,
         progress: bool, rank: int = 0, world: int = 1) -> None:
    device = resolve_device(cfg.device)
    loaded = loaded or load_model(cfg.model, dtype=cfg.dtype, device=device)
    model, tok = loaded.model, loaded.tokenizer
    hps = {h: resolve(model, h) for h in dirs}
    docs = shuffled(iter_documents(cfg.text, cfg.split, cfg.text_field), cfg.seed)
    if not docs:
        raise ValueError(f"text source {cfg.text!r} has no documents in split {cfg.split!r}")
    excluded = excluded_ids(tok, cfg.exclude_special, cfg.exclude_tokens)
    positions = cfg.positions
    bos_offset = int(cfg.prepend_bos and tok.bos_token_id is not None)
    meta = {"model": cfg.model, "model_source": loaded.source, "model_hash": loaded.content_hash,
            "device": describe(loaded.device), "hooks": list(dirs), "d_in": model.config.hidden_size,
            "dtype": cfg.store_dtype, "model_dtype": cfg.dtype, "config_hash": config_hash,
            "config": cfg.model_dump(mode="json"), "text": cfg.text, "split": cfg.split,
            "ctx_len": cfg.ctx_len, "prepend_bos": bool(bos_offset), "long_docs": cfg.long_docs,
            "rank": rank, "world_size": world}
    writers = {h: StoreWriter(d, {**meta, "hook": h}, cfg.shard_tokens, same=_same_store(cfg)) for h, d in dirs.items()}
    skip = _sync_resume(list(writers.values()))

    ctxs = budgeted(contexts(docs, tok, cfg.ctx_len, cfg.prepend_bos, cfg.long_docs), excluded, cfg.tokens)
    if world > 1:
        ctxs = (c for c in ctxs if c.doc % world == rank)
    first = next(iter(writers.values()))
    bar = tqdm(total=cfg.tokens if world == 1 else None, initial=first.n_tokens, unit="tok", unit_scale=True,
               desc=f"harvest {'+'.join(dirs)}" + (f" rank {rank}/{world}" if world > 1 else ""),
               disable=not progress, smoothing=0.1)
    t0 = time.perf_counter()
    hooks = list(hps.values())
    try:
        for batch in batches(itertools.islice(ctxs, skip, None), cfg.batch_size, tok.pad_token_id):
            kept = kept_rows(model, hooks, batch, tok, positions)
            b, t = kept.ctx.cpu(), kept.pos.cpu()  # rows: (context, position)
            tokens, doc, pos = batch.input_ids[b, t], batch.doc[b], batch.start[b] + t - bos_offset
            for h, w in writers.items():
                w.add(kept.rows(hps[h]).cpu(), tokens, doc, pos, kept.counts, contexts=batch.input_ids.shape[0])
            bar.update(len(b))
    except BaseException:
        SHARD_WRITER.drain(raise_error=False)  # the flushes submitted before it land: a rerun resumes after them
        raise
    bar.close()
    wall = time.perf_counter() - t0
    for w in writers.values():
        w.finish([d.id for d in docs], {"wall_seconds": wall, "exhausted": w.n_tokens < cfg.tokens})


def _sync_resume(writers: list[StoreWriter]) -> int:
    """Contexts already done. A kill between the stores' flushes can leave one store a
    shard ahead of another: roll those back so all resume from the same context."""
    done = min(w.contexts_done for w in writers)
    for w in writers:
        w.rollback(done)
    return done


def merge(parts: list[ActivationStore], out: Path, shard_tokens: int) -> ActivationStore:
    """Merge rank stores (each sorted by document) into one store in document order.

    Streams one shard per part at a time; writes to a temp folder renamed onto `out`."""
    m0 = parts[0].manifest
    if len({p.manifest["config_hash"] for p in parts}) != 1:
        raise StoreError(f"cannot merge stores made with different configs: {[str(p.path) for p in parts]}")
    if out.exists():  # a merge renames onto `out` only when whole: this is something else
        raise StoreError(f"cannot merge the rank stores into {out}: it exists and is not this harvest's "
                         "store; move it away or choose another output directory")
    tmp = out.parent / f".{out.name}.merging"
    shutil.rmtree(tmp, ignore_errors=True)  # an earlier merge that was killed
    keep = {k: v for k, v in m0.items() if k not in ("n_tokens", "shards", "excluded", "stats", "resume",
                                                     "complete", "rows_sha256", "rank", "wall_seconds")}
    writer = StoreWriter(tmp, {**keep, "rank": None, "merged_from": len(parts)}, shard_tokens)
    for run in heapq.merge(*(_doc_runs(p) for p in parts), key=lambda r: int(r["doc"][0])):
        writer.add(run["acts"], run["tokens"], run["doc"], run["pos"], {}, contexts=0)
    writer.flush()
    writer.manifest["excluded"] = {k: sum(p.manifest["excluded"].get(k, 0) for p in parts) for k in EXCLUDED}
    writer.manifest["resume"]["contexts_done"] = sum(p.manifest["resume"]["contexts_done"] for p in parts)
    writer.finish(read_json(parts[0].path / "documents.json"), {
        "wall_seconds": max(p.manifest.get("wall_seconds", 0.0) for p in parts),
        "exhausted": writer.n_tokens < m0["config"]["tokens"],
    })
    tmp.rename(out)
    for p in parts:
        shutil.rmtree(p.path)
    return ActivationStore(out)


def _doc_runs(store: ActivationStore) -> Iterator[dict[str, Any]]:
    """The store's rows as consecutive runs of one document each (a run may end at a shard edge)."""
    for i in range(len(store.shards)):
        s = store.load_shard(i)
        _, counts = torch.unique_consecutive(s["doc"], return_counts=True)
        start = 0
        for n in counts.tolist():
            yield {k: s[k][start:start + n] for k in ("acts", *INDEX)}
            start += n
