"""Pure metric functions. Shapes: x, x_hat [tokens, d]; logits [tokens, vocab]; targets [tokens].

Definitions:
- explained variance (EV) = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, the variance
  around the per-dimension mean over the evaluated tokens (as in Gao et al. 2024 and
  SAEBench's corrected core eval), summed over all dimensions; FVU = 1 - EV.
- MSE = mean over tokens and dimensions of (x - x_hat)^2.
- CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean): 1 is a perfect splice,
  0 is no better than zero-ablating the hook point (SAELens / SAEBench definition).
- KL to clean = mean over tokens of KL(p_clean || p_sae), in nats.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class Moments:
    """Streaming sums for EV/MSE over many batches (float64 for stability)."""

    def __init__(self, d: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.sum = torch.zeros(d, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros((), dtype=torch.float64, device=device)  # sum ||x||^2
        self.sse = torch.zeros((), dtype=torch.float64, device=device)  # sum ||x - x_hat||^2

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x64 = x.double()
        self.n += x.shape[0]
        self.sum += x64.sum(0)
        self.sumsq += x64.pow(2).sum()
        self.sse += (x64 - x_hat.double()).pow(2).sum()

    def total_variance(self) -> float:
        """sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2."""
        mean = self.sum / self.n
        return float(self.sumsq - self.n * mean.pow(2).sum())

    def explained_variance(self) -> float:
        return 1.0 - float(self.sse) / self.total_variance()

    def mse(self) -> float:
        return float(self.sse) / (self.n * self.sum.shape[0])


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (variance around the mean)."""
    m = Moments(x.shape[1], x.device)
    m.update(x, x_hat)
    return m.explained_variance()


def l0(z: torch.Tensor) -> float:
    """Mean number of nonzero latents per token. z: [tokens, width]."""
    return float((z != 0).float().sum(-1).mean())


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [tokens] in nats."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p || q) [tokens] in nats, from logits."""
    lp = F.log_softmax(logits_p.float(), -1)
    lq = F.log_softmax(logits_q.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


CE_CHUNK_ELEMS = 1 << 25  # logits per chunk: 128 MiB of float32 (341 rows of a 98k vocab, 128 of a 262k one)


def ce_chunk_rows(vocab: int, chunk_elems: int = CE_CHUNK_ELEMS) -> int:
    """Rows of [rows, vocab] logits per chunk for chunked_ce_kl."""
    return max(1, chunk_elems // max(1, vocab))


def chunked_ce_kl(h: torch.Tensor, targets: torch.Tensor, unembed: Callable[[torch.Tensor], torch.Tensor],
                  h_ref: torch.Tensor | None = None, chunk_rows: int = 256
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token CE [n] of the logits unembed(h) against targets [n] and, given h_ref, the
    reference's own per-token CE [n] and KL(p_ref || p) [n], from final hidden states h, h_ref
    [n, d] rather than logits: the [n, vocab] logits are made chunk_rows rows at a time and
    dropped, so memory stays bounded whatever the vocabulary (each reference chunk serves both
    its CE and the KL). Equal to token_ce / token_kl on the whole logits (the same row-wise
    operations)."""
    ce, ce_ref, kl = [], [], []
    for s in range(0, h.shape[0], chunk_rows):
        logits = unembed(h[s:s + chunk_rows])  # [chunk, vocab]
        ce.append(token_ce(logits, targets[s:s + chunk_rows]))
        if h_ref is not None:
            ref = unembed(h_ref[s:s + chunk_rows])
            ce_ref.append(token_ce(ref, targets[s:s + chunk_rows]))
            kl.append(token_kl(ref, logits))
    def cat(parts):
        return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    return cat(ce), (None if h_ref is None else cat(ce_ref)), (None if h_ref is None else cat(kl))


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(CE_zero - CE_sae) / (CE_zero - CE_clean)."""
    return (ce_zero - ce_sae) / (ce_zero - ce_clean)


def explained_variance_legacy(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """LEGACY, for comparison with older SAELens/SAEBench numbers only: per-token
    1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2 [tokens], to be averaged over tokens. A mean
    of ratios: depends on the batch and is dominated by low-variance tokens."""
    x64, h64 = x.double(), x_hat.double()
    return 1 - (x64 - h64).pow(2).sum(-1) / (x64 - x64.mean(0)).pow(2).sum(-1).clamp_min(1e-12)


def relative_reconstruction_bias(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """E||x_hat||^2 / E[x . x_hat] (Wright & Sharkey 2024, as in SAEBench core): 1 is unbiased,
    below 1 the SAE shrinks its reconstructions."""
    return float(x_hat.double().pow(2).sum(-1).mean() / (x.double() * x_hat.double()).sum(-1).mean())


def density_histogram(freq: torch.Tensor, lo: float = -6.0, hi: float = 0.0, step: float = 0.5) -> dict:
    """Histogram of log10(firing frequency) over latents; never-fired latents counted apart."""
    alive = freq[freq > 0].double().log10().clamp(lo, hi)
    edges = torch.arange(lo, hi + step / 2, step, dtype=torch.float64)
    counts = torch.histc(alive, bins=len(edges) - 1, min=lo, max=hi) if alive.numel() else torch.zeros(len(edges) - 1)
    return {"log10_edges": [round(float(e), 2) for e in edges], "counts": [int(c) for c in counts],
            "never_fired": int((freq == 0).sum())}


@torch.no_grad()
def most_similar_decoder_pairs(W_dec: torch.Tensor, n: int, chunk: int = 1024) -> list[dict]:
    """The n latent pairs (i < j) with the highest decoder cosine similarity. W_dec: [width, d]."""
    if n == 0:
        return []
    W = F.normalize(W_dec.float(), dim=1)
    best_v, best_i, best_j = [], [], []
    for s in range(0, W.shape[0], chunk):
        sims = W[s:s + chunk] @ W.T  # [chunk, width]
        rows = torch.arange(s, s + sims.shape[0])
        sims[rows[:, None] >= torch.arange(W.shape[0])[None, :]] = -2.0  # keep i < j only
        v, idx = sims.flatten().topk(min(n, sims.numel()))
        best_v.append(v)
        best_i.append(rows[idx // W.shape[0]])
        best_j.append(idx % W.shape[0])
    v, i, j = torch.cat(best_v), torch.cat(best_i), torch.cat(best_j)
    order = v.argsort(descending=True)[:n]
    return [{"i": int(i[o]), "j": int(j[o]), "cosine": float(v[o])} for o in order]
