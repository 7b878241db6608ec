"""Activation examples for every latent of a sparse coder, from one streaming pass.

The first pass runs the model over a text source (the same contexts a harvest would cut:
seeded document order, contexts that never cross a document, a token budget counted
without the model) and, for ALL latents at once, keeps

- the top-activating contexts: per latent the `n_top` contexts with the largest maximum
  activation (one entry per (latent, context), at the position of that maximum), as in
  delphi's `pool_max_activation_windows` (delphi/latents/constructors.py);
- a uniform reservoir of `reservoir` activating contexts per latent (a random-priority
  top-k: each (latent, context) entry's priority is a hash of the latent, the context index
  and the seed, so the sample does not depend on the batching and a resumed pass keeps the
  same one). Equal-count activation quantile bands are cut from it at the end: delphi's
  `split_quantiles` (delphi/latents/samplers.py) over a uniform sample of the contexts;
- a pool of `pool` random kept positions shared by every latent (non-activating examples are
  the pool windows where a latent is silent, decided in the second pass);
- counts: tokens and contexts each latent fired on, the sum and the maximum of its activations.

Per batch the coder's output is kept as its sparse entries only (row, latent, value); every
update reduces them to one entry per (latent, context) by scatter-max, drops the entries that
cannot enter a latent's full table, and sorts only the short rows of the latents whose tables
change, so the cost grows with tokens x k (active latents), never tokens x width. A dense `[rows, width]` matrix exists only inside `sparse_codes` for coders
without a top-k encoder, one chunk of rows at a time.

The state is checkpointed atomically every `checkpoint_every` batches (one safetensors file
with its metadata); a killed pass resumes by regenerating the deterministic context stream
(tokenizing, no forwards) up to the last checkpoint.

The second pass (`read_windows`) recomputes only the contexts a selection needs, each cut
after the last window it must show, and returns token windows (`window` tokens, 32 by
default as delphi's `example_ctx_len`, the activating token at index `lead`, 24, as delphi
centres it at ctx_len - ctx_len // 4) with the latent's activation at every token.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from saelab.activations.rows import kept_rows
from saelab.config import Config
from saelab.data.corpus import Document, iter_documents
from saelab.data.tokens import (
    Batch,
    Positions,
    batches,
    budgeted,
    contexts,
    excluded_ids,
    keep_mask,
    shuffled,
)
from saelab.hookpoints import HookPoint
from saelab.io import atomic_write
from saelab.models.load import LoadedModel
from saelab.saes.base import SparseCoder

STATE_FORMAT = "saelab.interp.examples/1"
NEG_INF = float("-inf")


class ExamplesConfig(Config):
    """The examples pass: which text, how much, and what to keep per latent."""

    text: str = Field("embedded", description="text source (as for harvest)")
    text_field: str = "text"
    split: Literal["train", "validation"] = Field("validation", description="split of the text source (the "
                                                  "validation split: text the coder was not trained on)")
    tokens: int = Field(200_000, gt=0, description="kept tokens of the examples pass")
    ctx_len: int | None = Field(None, ge=2, description="tokens per context; default: the coder's own, else 128")
    batch_size: int = Field(16, gt=0, description="contexts per forward pass")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model dtype")
    n_top: int = Field(40, gt=0, description="top-activating contexts kept per latent")
    reservoir: int = Field(200, gt=0, description="uniform sample of activating contexts kept per latent, cut into "
                           "activation quantile bands")
    pool: int = Field(256, ge=0, description="random positions shared by all latents, for non-activating examples")
    window: int = Field(32, ge=2, description="tokens per example window (delphi: 32)")
    lead: int = Field(24, ge=0, description="tokens shown before the activating token (delphi centres it at "
                      "window - window // 4)")
    checkpoint_every: int = Field(25, gt=0, description="batches between checkpoints of the pass")
    seed: int = 0


# --- hashing and segmented top-k ----------------------------------------------------------------------

_M1, _M2 = 0xFF51AFD7ED558CCD - (1 << 64), 0xC4CEB9FE1A85EC53 - (1 << 64)  # murmur3 fmix64, as int64


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 64-bit finaliser on int64 (wrapping arithmetic): a well-mixed hash of x."""
    x = x ^ _srl(x, 33)
    x = x * _M1
    x = x ^ _srl(x, 33)
    x = x * _M2
    return x ^ _srl(x, 33)


def unit_hash(a: torch.Tensor, b: torch.Tensor | int, seed: int) -> torch.Tensor:
    """A float64 in [0, 1) determined by (a, b, seed) alone: priorities that do not depend on batching."""
    h = mix64(mix64(a.long() * 0x9E3779B1 + seed) ^ (torch.as_tensor(b).long() + 0x632BE5AB))
    return _srl(h, 11).double() / float(1 << 53)


def sparse_codes(sae: SparseCoder, x: torch.Tensor, chunk: int = 1024
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The coder's nonzero activations of x [rows, d] as (rows, latents, values) [nnz].

    A TopK coder gives them from its top-k directly; others encode `chunk` rows at a time
    and keep the nonzeros, so no [rows, width] matrix outlives one chunk."""
    if hasattr(sae, "topk"):
        vals, idx = sae.topk(x)  # [rows, k]
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(idx)
        nz = vals > 0
        return rows[nz], idx[nz], vals[nz].float()
    out_r, out_c, out_v = [], [], []
    for s in range(0, x.shape[0], chunk):
        z = sae.encode(x[s:s + chunk])
        r, c = z.nonzero(as_tuple=True)
        out_r.append(r + s)
        out_c.append(c)
        out_v.append(z[r, c].float())
    return torch.cat(out_r), torch.cat(out_c), torch.cat(out_v)


# --- the state of the pass ----------------------------------------------------------------------------


@dataclass
class ExampleState:
    """Everything the first pass keeps, for every latent (tensors on the CPU)."""

    width: int
    n_top: int
    reservoir: int
    pool: int
    seed: int
    top_val: torch.Tensor  # [width, n_top] float32, descending; -inf = empty
    top_ctx: torch.Tensor  # [width, n_top] int64 context index; -1 = empty
    top_pos: torch.Tensor  # [width, n_top] int64 position in the context
    res_pri: torch.Tensor  # [width, reservoir] float64 priority, descending; -inf = empty
    res_val: torch.Tensor  # [width, reservoir] float32
    res_ctx: torch.Tensor  # [width, reservoir] int64
    res_pos: torch.Tensor  # [width, reservoir] int64
    fire_tokens: torch.Tensor  # [width] int64: tokens the latent fired on
    fire_contexts: torch.Tensor  # [width] int64: contexts it fired in
    act_sum: torch.Tensor  # [width] float64: sum of its activations
    act_max: torch.Tensor  # [width] float32: its largest activation (0 if it never fired)
    pool_pri: torch.Tensor  # [pool] float64
    pool_ctx: torch.Tensor  # [pool] int64
    pool_pos: torch.Tensor  # [pool] int64
    ctx_doc: list[int] = field(default_factory=list)  # document index of each context seen
    batches_done: int = 0
    tokens: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    complete: bool = False

    TENSORS = ("top_val", "top_ctx", "top_pos", "res_pri", "res_val", "res_ctx", "res_pos", "fire_tokens",
               "fire_contexts", "act_sum", "act_max", "pool_pri", "pool_ctx", "pool_pos")

    @classmethod
    def empty(cls, width: int, n_top: int, reservoir: int, pool: int, seed: int) -> ExampleState:
        def full(shape, v, dtype):
            return torch.full(shape, v, dtype=dtype)
        return cls(width, n_top, reservoir, pool, seed,
                   full((width, n_top), NEG_INF, torch.float32), full((width, n_top), -1, torch.long),
                   full((width, n_top), -1, torch.long),
                   full((width, reservoir), NEG_INF, torch.float64), full((width, reservoir), 0.0, torch.float32),
                   full((width, reservoir), -1, torch.long), full((width, reservoir), -1, torch.long),
                   torch.zeros(width, dtype=torch.long), torch.zeros(width, dtype=torch.long),
                   torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float32),
                   full((pool,), NEG_INF, torch.float64), full((pool,), -1, torch.long), full((pool,), -1, torch.long))

    @property
    def contexts(self) -> int:
        return len(self.ctx_doc)

    def update(self, ctx0: int, n_ctx: int, kctx: torch.Tensor, kpos: torch.Tensor, rows: torch.Tensor,
               cols: torch.Tensor, vals: torch.Tensor) -> None:
        """Fold one batch in. kctx/kpos [kept]: batch row and position of each kept token; rows, cols,
        vals [nnz]: the coder's nonzero entries (row = index into the kept tokens); ctx0: the global
        index of the batch's first context, n_ctx: contexts in the batch."""
        cols = cols.long()
        c, p = kctx[rows].long(), kpos[rows].long()
        self.fire_tokens.index_add_(0, cols, torch.ones_like(cols))
        self.act_sum.index_add_(0, cols, vals.double())
        self.act_max.scatter_reduce_(0, cols, vals.float(), "amax")
        first = first_max(cols * n_ctx + c, vals, self.width * n_ctx)  # one entry per (latent, context)
        lat, val, ctx, pos = cols[first], vals[first].float(), c[first] + ctx0, p[first]
        self.fire_contexts.index_add_(0, lat, torch.ones_like(lat))
        # an entry can only enter a full table by beating its last (smallest) score, and an equal score
        # ranks after the entries already there: the rest are dropped before the merge, which then
        # sorts only the few latents whose tables change (once tables fill, most entries fail)
        new = val > self.top_val[lat, -1]
        _merge_rows([self.top_val, self.top_ctx, self.top_pos], lat[new], [val[new], ctx[new], pos[new]])
        pri = unit_hash(lat, ctx, self.seed)
        new = pri > self.res_pri[lat, -1]
        _merge_rows([self.res_pri, self.res_val, self.res_ctx, self.res_pos], lat[new],
                    [pri[new], val[new], ctx[new], pos[new]])
        if self.pool:
            gctx, gpos = kctx.long() + ctx0, kpos.long()
            pp = unit_hash(gctx, gpos, self.seed + 0x5BD1E995)
            allp = torch.cat([self.pool_pri, pp])
            keep = torch.argsort(allp, descending=True, stable=True)[: self.pool]
            self.pool_ctx = torch.cat([self.pool_ctx, gctx])[keep]
            self.pool_pos = torch.cat([self.pool_pos, gpos])[keep]
            self.pool_pri = allp[keep]

    # --- reading it back -----------------------------------------------------------------------------
    def top(self, latent: int) -> list[tuple[float, int, int]]:
        """(value, context, position) of the latent's top contexts, descending."""
        ok = self.top_ctx[latent] >= 0
        return list(zip(self.top_val[latent][ok].tolist(), self.top_ctx[latent][ok].tolist(),
                        self.top_pos[latent][ok].tolist(), strict=True))

    def sample(self, latent: int) -> list[tuple[float, int, int]]:
        """The latent's reservoir (a uniform sample of its activating contexts) by value, descending."""
        ok = self.res_ctx[latent] >= 0
        v, c, p = self.res_val[latent][ok], self.res_ctx[latent][ok], self.res_pos[latent][ok]
        order = torch.argsort(v, descending=True, stable=True)
        return list(zip(v[order].tolist(), c[order].tolist(), p[order].tolist(), strict=True))

    def random_positions(self) -> list[tuple[int, int]]:
        ok = self.pool_ctx >= 0
        return list(zip(self.pool_ctx[ok].tolist(), self.pool_pos[ok].tolist(), strict=True))

    def density(self) -> torch.Tensor:
        """[width] fraction of the pass's tokens each latent fired on."""
        return self.fire_tokens.double() / max(self.tokens, 1)

    def mean_activation(self) -> torch.Tensor:
        """[width] mean activation when firing (0 for a latent that never fired)."""
        return self.act_sum / self.fire_tokens.clamp_min(1).double()

    # --- saving --------------------------------------------------------------------------------------
    def save(self, path: str | Path, fingerprint: str) -> None:
        meta = {"format": STATE_FORMAT, "fingerprint": fingerprint, "width": str(self.width),
                "n_top": str(self.n_top), "reservoir": str(self.reservoir), "pool": str(self.pool),
                "seed": str(self.seed), "batches_done": str(self.batches_done), "tokens": str(self.tokens),
                "complete": str(int(self.complete)),
                "excluded": ",".join(f"{k}={v}" for k, v in sorted(self.excluded.items()))}
        tensors = {k: getattr(self, k).contiguous() for k in self.TENSORS}
        tensors["ctx_doc"] = torch.tensor(self.ctx_doc, dtype=torch.long)
        with atomic_write(path) as f:
            f.write(save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> ExampleState | None:
        """The state saved at path, or None if there is none or it was made for other work."""
        path = Path(path)
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT or (fingerprint is not None and meta.get("fingerprint") != fingerprint):
            return None
        t = load_file(str(path))
        excluded = dict(kv.split("=") for kv in meta["excluded"].split(",") if kv)
        return cls(int(meta["width"]), int(meta["n_top"]), int(meta["reservoir"]), int(meta["pool"]),
                   int(meta["seed"]), *(t[k] for k in cls.TENSORS), ctx_doc=t["ctx_doc"].tolist(),
                   batches_done=int(meta["batches_done"]), tokens=int(meta["tokens"]),
                   excluded={k: int(v) for k, v in excluded.items()}, complete=meta["complete"] == "1")


def first_max(key: torch.Tensor, vals: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Per distinct key in [0, n_keys), the index of its entry with the largest value (the earliest
    of equal ones), in key order: two scatter-reductions, no sort."""
    vmax = torch.full((n_keys,), NEG_INF, dtype=vals.dtype).scatter_reduce_(0, key, vals, "amax")
    at_max = vals == vmax[key]
    idx = torch.arange(key.numel(), device=key.device)
    first = torch.full((n_keys,), key.numel(), dtype=torch.long).scatter_reduce_(0, key[at_max], idx[at_max], "amin")
    return first[first < key.numel()]


def _merge_rows(tables: list[torch.Tensor], lat: torch.Tensor, new: list[torch.Tensor]) -> None:
    """Merge entries (latent lat, score new[0], payload new[1:]) into per-latent tables [width, m]
    kept sorted by score (tables[0]), descending; only the latents in `lat` are touched. Each
    touched row gets its new entries appended after its m slots (in order of appearance) and the
    short rows are sorted at once (stable: on equal scores the entries already there stay first)."""
    if lat.numel() == 0:
        return
    m = tables[0].shape[1]
    U, inv, counts = torch.unique(lat, return_inverse=True, return_counts=True)
    grouped = torch.argsort(inv, stable=True)
    slot = torch.empty_like(inv)
    slot[grouped] = torch.arange(inv.numel()) - (torch.cumsum(counts, 0) - counts)[inv[grouped]]
    width = m + int(counts.max())
    blocks = []
    for t, values in zip(tables, new, strict=True):
        fill = NEG_INF if t is tables[0] else (-1 if not t.dtype.is_floating_point else 0.0)
        b = torch.full((U.numel(), width), fill, dtype=t.dtype)
        b[:, :m] = t[U]
        b[inv, m + slot] = values.to(t.dtype)
        blocks.append(b)
    order = torch.sort(blocks[0], dim=1, descending=True, stable=True).indices[:, :m]
    for t, b in zip(tables, blocks, strict=True):
        t[U] = b.gather(1, order)


# --- the context stream ----------------------------------------------------------------------------


def documents(cfg: ExamplesConfig) -> list[Document]:
    docs = shuffled(iter_documents(cfg.text, cfg.split, cfg.text_field), cfg.seed)
    if not docs:
        raise ValueError(f"text source {cfg.text!r} has no documents in split {cfg.split!r}")
    return docs


def context_batches(cfg: ExamplesConfig, docs: list[Document], loaded: LoadedModel, positions: Positions,
                    ctx_len: int) -> Iterator[Batch]:
    """The pass's batches: the same contexts a harvest with these settings cuts (deterministic)."""
    tok = loaded.tokenizer
    stream = budgeted(contexts(docs, tok, ctx_len, positions.prepend_bos),
                      excluded_ids(tok, positions.exclude_special, positions.exclude_tokens), cfg.tokens)
    return batches(stream, cfg.batch_size, tok.pad_token_id)


@torch.no_grad()
def collect_examples(cfg: ExamplesConfig, sae: SparseCoder, loaded: LoadedModel, hp: HookPoint,
                     positions: Positions, ctx_len: int, state_path: str | Path | None = None,
                     fingerprint: str = "", progress: bool = True, stop_after: int | None = None,
                     timings: dict[str, float] | None = None) -> ExampleState:
    """Run (or resume, or reuse) the examples pass over every latent of `sae`.

    state_path: where the checkpoint lives (None: no checkpoints); fingerprint: what the work
    is (a state saved for another fingerprint is not resumed). stop_after: stop after that
    many batches, leaving the checkpoint (for tests of resumption). timings, if given, gets
    the seconds spent in the model forward and in the coder + bookkeeping."""
    docs = documents(cfg)
    state = ExampleState.load(state_path, fingerprint) if state_path else None
    if state is not None and state.complete:
        return state
    saved_doc = list(state.ctx_doc) if state is not None else []
    if state is None:
        state = ExampleState.empty(sae.cfg.width, cfg.n_top, cfg.reservoir, cfg.pool, cfg.seed)
    done_before = state.batches_done
    ctx_doc: list[int] = []
    device = loaded.device
    sae = sae.to(device).eval()
    bar = tqdm(total=cfg.tokens, unit="tok", unit_scale=True, desc="interp examples", disable=not progress,
               initial=state.tokens)
    t_fwd = t_code = 0.0
    bi = -1
    for bi, batch in enumerate(context_batches(cfg, docs, loaded, positions, ctx_len)):
        ctx0 = len(ctx_doc)
        ctx_doc.extend(batch.doc.tolist())
        if bi < done_before:
            continue  # resuming: this batch is already in the state
        t0 = time.perf_counter()
        kept = kept_rows(loaded.model, [hp], batch, loaded.tokenizer, positions)
        x = kept.rows(hp).float()
        t1 = time.perf_counter()
        rows, cols, vals = sparse_codes(sae, x)
        state.update(ctx0, batch.input_ids.shape[0], kept.ctx.cpu(), kept.pos.cpu(), rows.cpu(), cols.cpu(),
                     vals.cpu())
        t_fwd, t_code = t_fwd + t1 - t0, t_code + time.perf_counter() - t1
        for k, v in kept.counts.items():
            state.excluded[k] = state.excluded.get(k, 0) + v
        state.tokens += x.shape[0]
        state.batches_done = bi + 1
        state.ctx_doc = ctx_doc
        bar.update(x.shape[0])
        if state_path and state.batches_done % cfg.checkpoint_every == 0:
            state.save(state_path, fingerprint)
        if stop_after is not None and state.batches_done - done_before >= stop_after:
            bar.close()
            if state_path:
                state.save(state_path, fingerprint)
            return state
    bar.close()
    if saved_doc and ctx_doc[:len(saved_doc)] != saved_doc:
        raise RuntimeError("the regenerated context stream differs from the checkpointed one "
                           "(the text source changed?); delete the examples state and rerun")
    state.ctx_doc = ctx_doc
    state.batches_done = bi + 1
    state.complete = True
    if state.tokens == 0:
        raise ValueError("the examples pass produced no tokens")
    if state_path:
        state.save(state_path, fingerprint)
    if timings is not None:
        timings["forward"] = timings.get("forward", 0.0) + t_fwd
        timings["coder"] = timings.get("coder", 0.0) + t_code
    return state


# --- the second pass: token windows with per-token activations ---------------------------------------


@dataclass
class Window:
    """A token window of one context with one latent's activation at each token."""

    latent: int
    ctx: int  # context index in the pass
    center: int  # position (in the context) of the activating or sampled token
    start: int  # position of ids[0] in the context
    ids: list[int]
    acts: list[float]  # the latent's activation per token (0 where it is silent or the coder does not read)
    doc: int
    source: str  # the document's corpus domain (shakespeare / wikipedia / python for the embedded corpus)

    @property
    def max_act(self) -> float:
        return max(self.acts) if self.acts else 0.0

    @property
    def offset(self) -> int:
        """Index of the centre token within the window."""
        return self.center - self.start


def window_bounds(center: int, lo: int, hi: int, window: int, lead: int) -> tuple[int, int]:
    """[start, end) of a window of `window` tokens inside [lo, hi) with `lead` tokens before
    `center` where the context allows (shifted to stay inside it)."""
    start = max(lo, min(center - lead, hi - window))
    return start, min(hi, start + window)


@torch.no_grad()
def read_windows(cfg: ExamplesConfig, sae: SparseCoder, loaded: LoadedModel, hp: HookPoint, positions: Positions,
                 ctx_len: int, requests: list[tuple[int, int, int]], progress: bool = True) -> list[Window]:
    """Windows for requests (latent, context index, centre position), in request order.

    Only the requested contexts are run, each batch cut after the last window it needs
    (the model is causal, so the activations there are those of the full context)."""
    docs = documents(cfg)
    by_ctx: dict[int, list[int]] = {}
    for i, (_, c, _) in enumerate(requests):
        by_ctx.setdefault(c, []).append(i)
    latents = sorted({r[0] for r in requests})
    col = torch.full((sae.cfg.width,), -1, dtype=torch.long)
    col[torch.tensor(latents, dtype=torch.long)] = torch.arange(len(latents))
    out: list[Window | None] = [None] * len(requests)
    device = loaded.device
    sae = sae.to(device).eval()
    bar = tqdm(total=len(by_ctx), unit="ctx", desc="interp windows", disable=not progress)
    pending: list[tuple[int, Batch, int]] = []  # (context index, one-row batch, row)

    def flush():
        if not pending:
            return
        rows = [b for _, b, _ in pending]
        batch = _stack(rows, loaded.tokenizer.pad_token_id)
        keep, _ = keep_mask(batch, loaded.tokenizer, positions)
        bounds = {}
        for r, (c, _, _) in enumerate(pending):
            kept_pos = keep[r].nonzero().squeeze(1)
            lo, hi = (int(kept_pos[0]), int(kept_pos[-1]) + 1) if kept_pos.numel() else (0, 0)
            for i in by_ctx[c]:
                bounds[i] = window_bounds(requests[i][2], lo, hi, cfg.window, cfg.lead)
        T = max([e for _, e in bounds.values()] + [2])
        cut = Batch(batch.input_ids[:, :T], batch.attention_mask[:, :T], batch.doc, batch.start, batch.limit)
        kept = kept_rows(loaded.model, [hp], cut, loaded.tokenizer, positions)
        r_, c_, v_ = sparse_codes(sae, kept.rows(hp).float())
        r_, c_, v_ = r_.cpu(), c_.cpu(), v_.cpu()
        j = col[c_]
        sel = j >= 0
        acts = torch.zeros(len(pending), T, len(latents))
        acts[kept.ctx.cpu()[r_[sel]], kept.pos.cpu()[r_[sel]], j[sel]] = v_[sel]
        for r, (c, b, _) in enumerate(pending):
            ids = b.input_ids[0].tolist()
            for i in by_ctx[c]:
                lat, _, center = requests[i]
                s, e = bounds[i]
                d = int(b.doc[0])
                out[i] = Window(lat, c, center, s, ids[s:e], acts[r, s:e, int(col[lat])].tolist(), d,
                                docs[d].source)
        bar.update(len(pending))
        pending.clear()

    ctx, last = 0, max(by_ctx, default=-1)
    for batch in context_batches(cfg, docs, loaded, positions, ctx_len):
        for r in range(batch.input_ids.shape[0]):
            if ctx in by_ctx:
                pending.append((ctx, _row(batch, r), r))
                if len(pending) == cfg.batch_size:
                    flush()
            ctx += 1
        if ctx > last:
            break
    flush()
    bar.close()
    missing = [requests[i] for i, w in enumerate(out) if w is None]
    if missing:
        raise ValueError(f"{len(missing)} requested contexts are not in the examples pass's stream "
                         f"(first: {missing[0]}); was the pass made with other settings?")
    return out  # type: ignore[return-value]


def _row(batch: Batch, r: int) -> Batch:
    n = int(batch.attention_mask[r].sum())
    return Batch(batch.input_ids[r:r + 1, :n], batch.attention_mask[r:r + 1, :n], batch.doc[r:r + 1],
                 batch.start[r:r + 1], batch.limit[r:r + 1])


def _stack(rows: list[Batch], pad_id: int) -> Batch:
    T = max(b.input_ids.shape[1] for b in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, b in enumerate(rows):
        ids[i, :b.input_ids.shape[1]] = b.input_ids[0]
        mask[i, :b.input_ids.shape[1]] = b.attention_mask[0]
    return Batch(ids, mask, torch.cat([b.doc for b in rows]), torch.cat([b.start for b in rows]),
                 torch.cat([b.limit for b in rows]))


# --- sampling: quantile bands, held-out split -----------------------------------------------------------


@functools.lru_cache(maxsize=1 << 20)
def is_heldout(ctx: int, seed: int, fraction: float = 0.5) -> bool:
    """Whether a context goes to the held-out (scoring) side: a hash of its index and the seed,
    so explanation and scoring examples never share a context. Memoised: selection asks it for
    every (latent, context) entry of every latent's reservoir, and one tensor hash per call
    took minutes over a 4,608-latent SAE."""
    return float(unit_hash(torch.tensor([ctx]), 0, seed + 0x2545F491)[0]) < fraction


def quantile_bands(n: int, n_bands: int) -> list[range]:
    """Equal-count bands over n items sorted by activation, descending (band 0 = the strongest);
    as delphi's split_quantiles, the last n % n_bands items are left out."""
    size = n // n_bands
    return [range(i * size, (i + 1) * size) for i in range(n_bands)] if size else []


def band_sample(items: list, n_bands: int, per_band: int, rng) -> list[tuple[int, object]]:
    """(band, item) pairs: per_band items drawn at random from each equal-count band of items
    (sorted descending). A band with fewer items gives all of them."""
    out = []
    for b, band in enumerate(quantile_bands(len(items), n_bands)):
        pick = sorted(rng.sample(list(band), min(per_band, len(band))))
        out += [(b, items[i]) for i in pick]
    return out


def alive(state: ExampleState, min_contexts: int) -> torch.Tensor:
    """Latents that fired in at least min_contexts contexts of the pass."""
    return (state.fire_contexts >= min_contexts).nonzero().squeeze(1)

