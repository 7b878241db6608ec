"""Decoder directions read through the unembedding (logit lens), and nearest latents by decoder cosine.

`logit_lens(W_dec, model, k)`: the tokens each decoder direction promotes and suppresses most,
scores = W_dec @ diag(g) @ W_U^T with g the final norm's scale where the model has one (the
logit lens of a residual direction, as Neuronpedia's top/bottom logits; the norm's division
by the residual's RMS is a positive per-token factor and does not change the ranking).

NOTE: a logit lens of decoder directions is also being built in saelab/intervene/lens.py on
another branch; the two should be unified when both land.
"""

from __future__ import annotations

import torch
from torch import nn


def final_norm_scale(model: nn.Module) -> torch.Tensor | None:
    """The final norm's elementwise scale [d] (Llama `model.norm.weight`, GPT-2 `ln_f.weight`), if any."""
    base = getattr(model, "base_model", model)
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        mod = getattr(base, name, None)
        if mod is not None and getattr(mod, "weight", None) is not None:
            return mod.weight.detach()
    return None


@torch.no_grad()
def logit_lens(W_dec: torch.Tensor, model: nn.Module, k: int = 10, chunk: int = 256
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top ids, top scores, bottom ids, bottom scores), each [latents, k], of W_dec [latents, d]
    through the model's unembedding (chunked: never [all latents, vocab] at once)."""
    W_U = model.get_output_embeddings().weight.detach()  # [vocab, d]
    g = final_norm_scale(model)
    out = ([], [], [], [])
    for s in range(0, W_dec.shape[0], chunk):
        d = W_dec[s:s + chunk].to(W_U.device, torch.float32)
        if g is not None:
            d = d * g.float()
        scores = d @ W_U.float().t()  # [chunk, vocab]
        tv, ti = scores.topk(k, dim=-1)
        bv, bi = scores.topk(k, dim=-1, largest=False)
        for lst, t in zip(out, (ti, tv, bi, bv), strict=True):
            lst.append(t.cpu())
    return tuple(torch.cat(x) for x in out)  # type: ignore[return-value]


@torch.no_grad()
def nearest_latents(W_dec: torch.Tensor, latents: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, cosines) [len(latents), n] of each latent's n nearest other latents by decoder cosine."""
    unit = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = unit[latents] @ unit.t()  # [latents, width]
    cos[torch.arange(len(latents)), latents] = -2.0  # not itself
    v, i = cos.topk(n, dim=-1)
    return i, v
