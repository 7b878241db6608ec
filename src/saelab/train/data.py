"""Training data: (x, y) batches from a store, two row-aligned stores, or the model itself."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from saelab.activations.store import ActivationStore, aligned, shuffled_batches


class StorePair:
    """Input and target activations: one store (an SAE, y = x) or two row-aligned stores."""

    def __init__(self, store: str, store_out: str | None = None):
        self.x = ActivationStore(store)
        self.y = ActivationStore(store_out) if store_out else None
        if self.y is not None:
            aligned(self.x, self.y, strict=True)

    @property
    def d_in(self) -> int:
        return self.x.d_in

    @property
    def d_out(self) -> int:
        return (self.y or self.x).d_in

    @property
    def n_tokens(self) -> int:
        return self.x.n_tokens

    def sample(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x.all_acts(max_rows=rows)
        return x, (self.y.all_acts(max_rows=rows) if self.y is not None else x)

    def batches(self, batch_size: int, seed: int, pin: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled (x [B, d_in], y [B, d_out]) batches, epoch after epoch, each epoch's
        order fixed by (seed, epoch). A pair is shuffled as one [rows, d_in + d_out] array.
        pin: batches in pinned host memory, so the copy to a GPU can be non-blocking."""
        for x, y in self._batches(batch_size, seed):
            if pin:
                same = y is x  # an SAE: the target is the input (the trainer relies on `y is x`)
                x = x.pin_memory()
                y = x if same else y.pin_memory()
            yield x, y

    def _batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for epoch in itertools.count():
            n = 0
            if self.y is None:
                for b in self.x.iter_batches(batch_size, seed=seed, epoch=epoch):
                    n += 1
                    yield b, b
            else:
                for b in _paired(self.x, self.y, batch_size, seed, epoch):
                    n += 1
                    yield b[:, :self.d_in], b[:, self.d_in:]
            if n == 0:
                raise ValueError(f"store {self.x.path} has {self.n_tokens} tokens, fewer than one "
                                 f"batch of {batch_size}; lower batch_size or harvest more")


def _paired(a: ActivationStore, b: ActivationStore, batch_size: int, seed: int, epoch: int):
    """Shuffled batches of the column-wise concatenation of two aligned stores: one row order for both."""
    def load(i: int) -> torch.Tensor:
        return torch.cat([a.load_shard(i)["acts"].float(), b.load_shard(i)["acts"].float()], 1)
    return shuffled_batches(load, len(a.shards), a.d_in + b.d_in, batch_size, seed, epoch)
