"""Documents -> fixed-length token contexts -> padded batches, with exclusion masks."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch
from pydantic import Field
from transformers import PreTrainedTokenizerBase

from saelab.config import Config
from saelab.data.corpus import Document

LONG_DOCS = ("chunk", "truncate")
NO_LIMIT = 2**62


@dataclass(frozen=True)
class Positions:
    """Which positions of a context a coder reads: BOS first or not, and which tokens are dropped
    (padding always; BOS and other special tokens when exclude_special; the user's list). A
    harvest or on-the-fly training records it, and every later consumer of the coder (core eval,
    probing, control, interpretation) reads the same positions it was trained on."""

    prepend_bos: bool = True
    exclude_special: bool = True
    exclude_tokens: tuple[str | int, ...] = ()

    @classmethod
    def from_config(cls, cfg: dict | None) -> Positions:
        """From a harvest / train-fly config dict (or an SAE's recorded `positions`); defaults otherwise."""
        cfg = cfg or {}
        return cls(bool(cfg.get("prepend_bos", True)), bool(cfg.get("exclude_special", True)),
                   tuple(cfg.get("exclude_tokens") or ()))

    def to_dict(self) -> dict:
        return {"prepend_bos": self.prepend_bos, "exclude_special": self.exclude_special,
                "exclude_tokens": list(self.exclude_tokens)}


class PositionFields(Config):
    """The config fields that decide which positions a coder reads (harvest, train-fly)."""

    prepend_bos: bool = Field(True, description="start every context with the BOS token (then excluded)")
    exclude_special: bool = Field(True, description="drop BOS, padding and other special tokens")
    exclude_tokens: list[str | int] = Field([], description="more tokens to drop (as the tokenizer spells them, "
                                            "or ids); counted as 'listed' in a store's manifest")

    @property
    def positions(self) -> Positions:
        return Positions(self.prepend_bos, self.exclude_special, tuple(self.exclude_tokens))


@dataclass(frozen=True)
class Context:
    ids: list[int]
    doc: int  # index into the document list
    start: int  # position of ids[0] (or of the token after BOS) in the document's tokens
    limit: int = NO_LIMIT  # keep at most this many rows of it (the token budget ends inside it)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    doc: torch.Tensor  # [batch]
    start: torch.Tensor  # [batch]
    limit: torch.Tensor  # [batch]


def shuffled(docs: Iterable[Document], seed: int) -> list[Document]:
    """Documents in a seeded random order, so every source is mixed into every budget."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return docs


def contexts(docs: list[Document], tokenizer: PreTrainedTokenizerBase, ctx_len: int,
             prepend_bos: bool, long_docs: str = "chunk") -> Iterator[Context]:
    """Contexts of at most ctx_len tokens (BOS first if asked), never crossing a document.

    long_docs: "chunk" splits a long document into consecutive contexts; "truncate" keeps
    only its first context. Pre-tokenized documents (doc.ids) are used as they are.
    """
    if long_docs not in LONG_DOCS:
        raise ValueError(f"long_docs must be one of {LONG_DOCS}, got {long_docs!r}")
    bos = tokenizer.bos_token_id if prepend_bos else None
    body = ctx_len - (bos is not None)
    for i, doc in enumerate(docs):
        ids = list(doc.ids) if doc.ids is not None else tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), body):
            chunk = ids[s:s + body]
            if len(chunk) < 2:
                continue
            yield Context(([bos] if bos is not None else []) + chunk, i, s)
            if long_docs == "truncate":
                break


def excluded_ids(tokenizer: PreTrainedTokenizerBase, exclude_special: bool,
                 listed: Iterable[str | int] = ()) -> dict[str, set[int]]:
    """Token ids whose positions are dropped, by reason: bos, special (other special
    tokens), listed (the user's list: token strings or ids). Padding is dropped by mask."""
    bos = tokenizer.bos_token_id
    special = set(tokenizer.all_special_ids) if exclude_special else set()
    ids = set()
    for t in listed:
        if isinstance(t, int):
            ids.add(t)
            continue
        tid = tokenizer.convert_tokens_to_ids(t)
        if tid is None or (tid == tokenizer.unk_token_id and t != tokenizer.unk_token):
            raise ValueError(f"exclude_tokens: {t!r} is not a token of this tokenizer "
                             "(give token strings as the tokenizer spells them, or ids)")
        ids.add(int(tid))
    return {"bos": {bos} if bos is not None and bos in special else set(),
            "special": special - {bos}, "listed": ids - special}


def budgeted(ctxs: Iterable[Context], excluded: dict[str, set[int]], tokens: int) -> Iterator[Context]:
    """Contexts up to a budget of `tokens` kept rows; the last one carries its row limit.

    Counting needs no model (kept = not an excluded id), so every process of a sharded
    harvest cuts the same global stream at the same place."""
    drop = set().union(*excluded.values())
    left = tokens
    for c in ctxs:
        kept = sum(t not in drop for t in c.ids)
        if kept >= left:
            yield replace(c, limit=left)
            return
        left -= kept
        yield c


def batches(ctxs: Iterable[Context], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Right-padded batches of contexts."""
    buf: list[Context] = []
    for c in ctxs:
        buf.append(c)
        if len(buf) == batch_size:
            yield _collate(buf, pad_id)
            buf = []
    if buf:
        yield _collate(buf, pad_id)


def _collate(buf: list[Context], pad_id: int) -> Batch:
    T = max(len(c.ids) for c in buf)
    ids = torch.full((len(buf), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(buf), T), dtype=torch.long)
    for r, c in enumerate(buf):
        ids[r, :len(c.ids)] = torch.tensor(c.ids)
        mask[r, :len(c.ids)] = 1
    return Batch(ids, mask, torch.tensor([c.doc for c in buf]), torch.tensor([c.start for c in buf]),
                 torch.tensor([c.limit for c in buf]))


def keep_mask(batch: Batch, tokenizer: PreTrainedTokenizerBase, positions: Positions
              ) -> tuple[torch.Tensor, dict[str, int]]:
    """Positions to keep [batch, seq] and counts of what was dropped: pad, bos, special, listed.

    A context's row limit (end of the token budget) cuts its kept positions too; the cut
    ones are not counted as excluded."""
    pad = batch.attention_mask == 0
    keep = ~pad
    counts = {"pad": int(pad.sum())}
    for reason, ids in excluded_ids(tokenizer, positions.exclude_special, positions.exclude_tokens).items():
        hit = torch.isin(batch.input_ids, torch.tensor(sorted(ids), dtype=torch.long)) & keep
        counts[reason] = int(hit.sum())
        keep &= ~hit
    keep &= keep.cumsum(1) <= batch.limit[:, None]
    return keep, counts
