"""Harvest: model + hook point + text -> activation store.

Documents are shuffled with the seed (so every source is mixed into any token budget),
chunked into contexts, batched, and run through the model up to the hook's layer only.
Positions that are padding, BOS or other special tokens are dropped and counted. The
store's manifest records how many contexts are done, so rerunning an interrupted harvest
with the same config resumes after the last whole shard.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from tqdm.auto import tqdm

from saelab.activations.store import ActivationStore, StoreWriter
from saelab.config import HarvestConfig
from saelab.data.corpus import iter_documents
from saelab.data.tokens import batches, contexts, keep_mask, shuffled
from saelab.models.hooks import capture, resolve
from saelab.models.load import LoadedModel, load_model


def harvest(cfg: HarvestConfig, loaded: LoadedModel | None = None, progress: bool = True) -> ActivationStore:
    """Run (or resume, or reuse) a harvest; returns the complete store."""
    out = Path(cfg.out or Path("stores") / cfg.store_name())
    config_hash = cfg.hash(exclude={"out"})
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            store = ActivationStore(out)
            if store.manifest.get("config_hash") == config_hash:
                return store  # already harvested with this exact config
        except Exception:
            pass  # incomplete or foreign: StoreWriter resumes or refuses below

    loaded = loaded or load_model(cfg.model, dtype=cfg.dtype)
    model, tok = loaded.model, loaded.tokenizer
    hp = resolve(model, cfg.hook)
    docs = shuffled(iter_documents(cfg.text, cfg.split, cfg.text_field), cfg.seed)
    if not docs:
        raise ValueError(f"text source {cfg.text!r} has no documents in split {cfg.split!r}")
    bos_offset = int(cfg.prepend_bos and tok.bos_token_id is not None)
    d_in = model.config.hidden_size
    writer = StoreWriter(out, {
        "model": cfg.model, "model_source": loaded.source, "hook": str(hp), "d_in": d_in,
        "dtype": cfg.store_dtype, "model_dtype": cfg.dtype, "config_hash": config_hash,
        "config": cfg.model_dump(mode="json"), "text": cfg.text, "split": cfg.split,
        "ctx_len": cfg.ctx_len, "prepend_bos": bool(bos_offset),
    }, cfg.shard_tokens)

    skip = writer.contexts_done
    ctx_iter = itertools.islice(contexts(docs, tok, cfg.ctx_len, cfg.prepend_bos), skip, None)
    bar = tqdm(total=cfg.tokens, initial=writer.n_tokens, unit="tok", unit_scale=True,
               desc=f"harvest {hp}", disable=not progress)
    t0 = time.perf_counter()
    for batch in batches(ctx_iter, cfg.batch_size, tok.pad_token_id):
        if writer.n_tokens >= cfg.tokens:
            break
        acts = capture(model, [hp], batch.input_ids, batch.attention_mask)[hp]  # [B, T, d]
        keep, excluded = keep_mask(batch, tok, cfg.exclude_special)
        rows = keep.nonzero()  # [n, 2] (context, position)
        need = cfg.tokens - writer.n_tokens
        if rows.shape[0] > need:  # cut the last batch to the budget exactly
            rows = rows[:need]
        b, t = rows[:, 0], rows[:, 1]
        writer.add(acts[b, t], batch.input_ids[b, t], batch.doc[b], batch.start[b] + t - bos_offset,
                   excluded, contexts=batch.input_ids.shape[0])
        bar.update(rows.shape[0])
    bar.close()
    return writer.finish([d.id for d in docs], {
        "wall_seconds": time.perf_counter() - t0 + 0.0,
        "exhausted": writer.n_tokens < cfg.tokens,
    })
