"""Per-example features for the probing regimes, computed once per task and cached on disk.

One forward pass over a task's texts gives, for each pooling (the last kept token, as Kantamneni
et al. 2025 probe; the mean over the kept tokens, as SAEBench), the residual activation x [n, d]
and the SAE's latents z [n, width]. Latents are stored sparse (CSR): a TopK SAE's last-token
latents have k nonzeros of `width`. The cache file is keyed by a hash of the SAE's weights, the
model's content hash, the hook, the positions, the task's texts and the pooling, so every regime,
probe and analysis of the grid reads the same numbers and a changed SAE or task never reuses
stale ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.numpy import load_file, save
from tqdm.auto import tqdm

from saelab.activations.rows import kept_rows
from saelab.data.tokens import Context, Positions, batches
from saelab.hookpoints import HookPoint
from saelab.io import atomic_write, stable_hash
from saelab.models.load import LoadedModel
from saelab.saes.base import SparseCoder

POOLS = ("last", "mean")
FORMAT = "saelab.probe_features.v1"


@dataclass
class Features:
    """A task's pooled features: residual x [n, d] (dense float32), latents z [n, width] (CSR)."""

    x: np.ndarray
    z: sp.csr_matrix
    pool: str


def sae_hash(sae: SparseCoder) -> str:
    """Content hash of an SAE's weights and config (what a cache key says about the coder)."""
    h = hashlib.sha256(json.dumps(sae.cfg.model_dump(mode="json"), sort_keys=True).encode())
    for k, v in sorted(sae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def feature_key(sae: SparseCoder, loaded: LoadedModel, hp: HookPoint, positions: Positions, texts: list[str],
                max_tokens: int, pool: str) -> str:
    return stable_hash({"format": FORMAT, "sae": sae_hash(sae), "model": loaded.content_hash, "hook": str(hp),
                        "positions": positions.to_dict(), "max_tokens": max_tokens, "pool": pool,
                        "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest()})


def kept_batches(texts: list[str], loaded: LoadedModel, hp: HookPoint, positions: Positions, max_tokens: int,
                 batch_size: int, progress: bool = False, desc: str = "features", by_length: bool = False
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(activations [B, T, d] float32, kept positions [B, T] bool, example indices [B]) per batch:
    each example is read as BOS + text (cut to max_tokens) and keeps the positions the coder was
    trained on (saelab.activations.rows.kept_rows). Examples come in order, or with by_length
    sorted by token count (stable), so a batch pads little. Refuses an example with no kept token."""
    tok = loaded.tokenizer
    bos = [tok.bos_token_id] if positions.prepend_bos and tok.bos_token_id is not None else []
    ctxs = []
    for i, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False)["input_ids"][: max_tokens - len(bos)]
        if not ids:
            raise ValueError(f"example {i} ({t[:40]!r}) has no tokens")
        ctxs.append(Context(bos + ids, i, 0))
    if by_length:
        ctxs.sort(key=lambda c: len(c.ids))
    for batch in tqdm(batches(ctxs, batch_size, tok.pad_token_id), total=-(-len(ctxs) // batch_size),
                      desc=desc, disable=not progress, leave=False):
        kept = kept_rows(loaded.model, [hp], batch, tok, positions)
        if not kept.keep.any(1).all():
            i = int(batch.doc[~kept.keep.any(1).cpu()][0])
            raise ValueError(f"example {i} ({texts[i][:40]!r}) has no token the coder reads (all excluded)")
        yield kept.full[hp].float(), kept.keep, batch.doc


@torch.no_grad()
def compute_features(texts: list[str], loaded: LoadedModel, hp: HookPoint, sae: SparseCoder, positions: Positions,
                     max_tokens: int = 32, batch_size: int = 32, progress: bool = False,
                     desc: str = "features") -> dict[str, Features]:
    """Both poolings from one pass (kept_batches): latents encoded per kept token, then x and z
    taken at the last kept token and averaged over all kept tokens."""
    xs: dict[str, list] = {p: [] for p in POOLS}
    zs: dict[str, list] = {p: [] for p in POOLS}
    order = []
    for acts, keep, idx in kept_batches(texts, loaded, hp, positions, max_tokens, batch_size, progress, desc,
                                        by_length=True):
        order.append(idx)
        row, col = keep.nonzero(as_tuple=True)
        z = sae.encode(acts[keep])  # [tokens, width], in (row, position) order
        n = keep.sum(1)  # kept tokens per example
        last = torch.cumsum(n, 0) - 1  # index (into the kept tokens) of each example's last one
        xs["last"].append(acts[row[last], col[last]].cpu())
        zs["last"].append(sp.csr_matrix(z[last].cpu().numpy()))
        w = (1.0 / n.float())[row][:, None]
        xs["mean"].append(torch.zeros_like(acts[:, 0]).index_add_(0, row, acts[keep] * w).cpu())
        zs["mean"].append(sp.csr_matrix(z.new_zeros(keep.shape[0], z.shape[1]).index_add_(0, row, z * w).cpu().numpy()))
    inv = torch.argsort(torch.cat(order)).numpy()  # back to the texts' order
    return {p: Features(torch.cat(xs[p]).numpy().astype(np.float32)[inv],
                        sp.vstack(zs[p]).tocsr().astype(np.float32)[inv], p) for p in POOLS}


def save_features(path: Path, f: Features) -> None:
    z = f.z.tocsr()
    tensors = {"x": np.ascontiguousarray(f.x), "z_data": z.data, "z_indices": z.indices.astype(np.int64),
               "z_indptr": z.indptr.astype(np.int64), "z_shape": np.array(z.shape, dtype=np.int64)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        fh.write(save(tensors, metadata={"format": FORMAT, "pool": f.pool}))


def load_features(path: Path, pool: str) -> Features:
    t = load_file(path)
    z = sp.csr_matrix((t["z_data"], t["z_indices"], t["z_indptr"]), shape=tuple(int(v) for v in t["z_shape"]))
    return Features(t["x"], z, pool)


def task_features(texts: list[str], loaded: LoadedModel, hp: HookPoint, sae: SparseCoder, positions: Positions,
                  cache: Path | None, max_tokens: int = 32, batch_size: int = 32, progress: bool = False,
                  desc: str = "features") -> tuple[dict[str, Features], bool]:
    """Both poolings of a task's features, from `cache` (a directory) when there, else computed
    and written there. Returns (features by pool, whether they came from the cache)."""
    keys = {p: feature_key(sae, loaded, hp, positions, texts, max_tokens, p) for p in POOLS}
    paths = {p: cache / f"{keys[p]}.safetensors" for p in POOLS} if cache is not None else {}
    if paths and all(paths[p].is_file() for p in POOLS):
        return {p: load_features(paths[p], p) for p in POOLS}, True
    feats = compute_features(texts, loaded, hp, sae, positions, max_tokens, batch_size, progress, desc)
    for p, path in paths.items():
        save_features(path, feats[p])
    return feats, False

