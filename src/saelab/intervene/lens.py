"""Logit lens of decoder directions: the tokens each latent's direction promotes and suppresses
through the model's final norm and unembedding (the direct path only).

For a direction d (a decoder row W_dec[i], or any vector at a residual-stream hook), the score
of vocabulary token t is

    lens(d)[t] = W_U[t] . (N(d) - N(0))

where N is the model's own final norm module (the one applied before the unembedding) and W_U
the unembedding matrix (the output embeddings, [vocab, d]). For RMSNorm, N(d) - N(0) =
g * d / rms(d) with g the norm's gain (Llama: its weight; Gemma: 1 + weight); for LayerNorm,
g * (d - mean(d)) / std(d), the bias cancelling. So the scores are (g * d) . W_U[t] up to a
positive factor per direction (the same for every token): the ranking of tokens is that of the
direction scaled by the final norm's gain and read by the unembedding, and the values are in
logits for a residual of unit RMS along d. Left out: the norm's dependence on the rest of the
residual (this is the direct effect of d alone), the unembedding bias and Gemma's final logit
soft-capping (each the same for every direction, and soft-capping is monotone), and every
block after the hook (nostalgebraist's logit lens, applied to dictionary directions as in
Bricken et al. 2023 and Neuronpedia).

This module computes from a model and directions; it knows nothing of run directories.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saelab.models.hooks import final_norm


@dataclass
class Lens:
    """Top-k promoted and suppressed tokens per direction: ids and scores [n_directions, k]."""

    top_ids: torch.Tensor
    top_scores: torch.Tensor
    bottom_ids: torch.Tensor  # the most negative scores first
    bottom_scores: torch.Tensor

    def tokens(self, tokenizer, i: int) -> dict[str, list[tuple[str, float]]]:
        """Direction i's promoted / suppressed tokens as [token text, score] pairs."""
        def pairs(ids, scores):
            return [[tokenizer.decode([int(t)]), round(float(s), 4)] for t, s in zip(ids[i], scores[i], strict=True)]
        return {"promoted": pairs(self.top_ids, self.top_scores),
                "suppressed": pairs(self.bottom_ids, self.bottom_scores)}


@torch.no_grad()
def lens_scores(model: nn.Module, directions: torch.Tensor) -> torch.Tensor:
    """lens(d)[t] for every direction and token: [n, vocab] float32 (see the module docstring)."""
    norm = final_norm(model)
    W_U = model.get_output_embeddings().weight  # [vocab, d]
    d = directions.to(W_U.device, W_U.dtype)
    h = norm(d) - norm(torch.zeros_like(d[:1]))
    return (h @ W_U.t()).float()


@torch.no_grad()
def logit_lens(model: nn.Module, directions: torch.Tensor, k: int = 10, chunk: int = 256) -> Lens:
    """Top-k promoted and suppressed tokens of each direction [n, d] (e.g. sae.W_dec for every
    latent), `chunk` directions at a time so that only [chunk, vocab] scores are ever held."""
    if directions.ndim != 2:
        raise ValueError(f"directions must be [n, d], got shape {tuple(directions.shape)}")
    outs: list[tuple[torch.Tensor, ...]] = []
    for s in range(0, directions.shape[0], chunk):
        scores = lens_scores(model, directions[s:s + chunk])
        top = scores.topk(k, dim=-1)
        bottom = (-scores).topk(k, dim=-1)
        outs.append((top.indices.cpu(), top.values.cpu(), bottom.indices.cpu(), (-bottom.values).cpu()))
    return Lens(*(torch.cat(parts) for parts in zip(*outs, strict=True)))
