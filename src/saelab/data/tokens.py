"""Documents -> fixed-length token contexts -> padded batches, with exclusion masks."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from saelab.data.corpus import Document


@dataclass(frozen=True)
class Context:
    ids: list[int]
    doc: int  # index into the document list
    start: int  # position of ids[0] (or of the token after BOS) in the document's tokens


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    doc: torch.Tensor  # [batch]
    start: torch.Tensor  # [batch]


def shuffled(docs: Iterable[Document], seed: int) -> list[Document]:
    """Documents in a seeded random order, so every source is mixed into every budget."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return docs


def contexts(docs: list[Document], tokenizer: PreTrainedTokenizerBase, ctx_len: int,
             prepend_bos: bool) -> Iterator[Context]:
    """Chunk each document into contexts of at most ctx_len tokens (BOS first if asked)."""
    bos = tokenizer.bos_token_id if prepend_bos else None
    body = ctx_len - (bos is not None)
    for i, doc in enumerate(docs):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), body):
            chunk = ids[s:s + body]
            if len(chunk) < 2:
                continue
            yield Context(([bos] if bos is not None else []) + chunk, i, s)


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
    return Batch(ids, mask, torch.tensor([c.doc for c in buf]), torch.tensor([c.start for c in buf]))


def keep_mask(batch: Batch, tokenizer: PreTrainedTokenizerBase, exclude_special: bool
              ) -> tuple[torch.Tensor, dict[str, int]]:
    """Positions to keep [batch, seq] and counts of what was excluded (bos, pad, special)."""
    pad = batch.attention_mask == 0
    keep = ~pad
    counts = {"pad": int(pad.sum()), "bos": 0, "special": 0}
    if exclude_special:
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        is_special = torch.isin(batch.input_ids, special) & keep
        bos = is_special & (batch.input_ids == tokenizer.bos_token_id) if tokenizer.bos_token_id is not None \
            else torch.zeros_like(is_special)
        counts["bos"] = int(bos.sum())
        counts["special"] = int((is_special & ~bos).sum())
        keep &= ~is_special
    return keep, counts
