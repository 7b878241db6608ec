"""Label validation: does a latent's label hold up beyond the scorer that produced its score?

- decoder direction: does the label agree with what the latent's decoder direction promotes
  through the unembedding (its logit-lens top tokens)? The label's sentence embedding is
  compared with an embedding of the latent's own top tokens and with those of every other
  interpreted latent; the score is the fraction of other latents whose tokens are less similar
  to the label than its own (chance 0.5; 1 = its own tokens match best).
- discriminative: does the label tell this latent's held-out contexts from its decoder-nearest
  neighbour's? The discrimination scorer's accuracy (chance 0.5).
- cross-domain consistency: does the label hold in every corpus domain the latent fires in?
  The detection scorer's recall on the held-out activating contexts of each domain with at
  least `min_per_domain` of them; consistency = 1 - (max - min) over those domains (1: the
  same everywhere); undefined when the latent's held-out examples cover fewer than two domains.
- composite confidence in [0, 1]: a weighted mean of the components, each first mapped to
  [0, 1] as clip((x - chance) / (1 - chance)) (chance 0.5 for balanced accuracy, AUROC,
  accuracy and the decoder percentile; consistency is already in [0, 1]). Weights (WEIGHTS):
  detection 0.3, fuzzing 0.15, embedding 0.1, discrimination 0.2, decoder direction 0.1,
  cross-domain 0.15. A component that is undefined for a latent drops out and the remaining
  weights are renormalised; the record lists which were used.
"""

from __future__ import annotations

import math

import numpy as np

WEIGHTS = {"detection": 0.3, "fuzzing": 0.15, "embedding": 0.1, "discrimination": 0.2, "decoder_direction": 0.1,
           "cross_domain": 0.15}
CHANCE = {"detection": 0.5, "fuzzing": 0.5, "embedding": 0.5, "discrimination": 0.5, "decoder_direction": 0.5,
          "cross_domain": 0.0}


def decoder_direction(labels: dict[int, str], lens_tokens: dict[int, list[str]], encoder) -> dict[int, float]:
    """Per latent: the fraction of the other latents whose logit-lens tokens are less similar to its label
    than its own are."""
    keys = sorted(labels)
    if len(keys) < 2:
        return {k: float("nan") for k in keys}
    lab = encoder.encode([labels[k] for k in keys])
    toks = encoder.encode([", ".join(t.strip() for t in lens_tokens[k]) for k in keys])
    sim = (lab @ toks.t()).numpy()  # [label of i, tokens of j]
    out = {}
    for i, k in enumerate(keys):
        others = np.delete(sim[i], i)
        out[k] = float((others < sim[i, i]).mean())
    return out


def cross_domain(answers: list, min_per_domain: int = 2) -> dict:
    """From the detection answers [(y, pred, prob, kind, source)], recall per domain and consistency."""
    by: dict[str, list[int]] = {}
    for y, pred, _, _kind, source in answers:
        if y == 1 and pred is not None:
            by.setdefault(source or "?", []).append(int(pred == 1))
    recall = {d: float(np.mean(v)) for d, v in by.items() if len(v) >= min_per_domain}
    out = {"recall": recall, "examples": {d: len(v) for d, v in by.items()}}
    out["consistency"] = 1 - (max(recall.values()) - min(recall.values())) if len(recall) >= 2 else float("nan")
    return out


def composite(parts: dict[str, float]) -> tuple[float, dict[str, float]]:
    """(confidence in [0, 1], the weights used) from the components present and finite."""
    used = {k: WEIGHTS[k] for k, v in parts.items() if k in WEIGHTS and v is not None and math.isfinite(v)}
    if not used:
        return float("nan"), {}
    total = sum(used.values())
    score = 0.0
    for k, w in used.items():
        c = CHANCE[k]
        score += w / total * min(1.0, max(0.0, (parts[k] - c) / (1 - c)))
    return score, {k: round(w / total, 4) for k, w in used.items()}
