"""Feature absorption on first-letter classification (Chanin et al. 2024, "A is for Absorption";
SAEBench's absorption eval), simplified as stated here.

1. Words: single-token words from the tokenizer vocabulary (a leading space then 3+ ASCII
   letters), or a local word list (then the word's last token is used). The model reads
   BOS + " word"; features are taken at the word's last token. Words are split train/test by
   their crude lemma (saelab.data.tasks.lemma) so related spellings stay on one side.
2. For each first letter L (with enough train words): a logistic-regression probe on the
   residual stream (letter L vs the rest, class-balanced) gives the probe direction p_L.
3. k-sparse SAE probes: the top-k latents by class-mean difference, logistic regression,
   test F1. Starting at k = 1, k grows while F1(k+1) - F1(k) > split_f1_gain (up to max_k);
   the chosen k latents are L's main latents and k - 1 is its number of split latents.
4. On test words of letter L that the residual probe classifies correctly, each active
   latent j contributes z_j * (W_dec[j] . p_L) to the probe projection. The absorbing latent
   of a word is the active latent outside the main set with the largest positive
   contribution among those whose decoder has cosine >= cos_threshold with p_L (SAEBench
   attributes by ablation instead; this is the first-order version). Per word: absorption
   fraction = absorbing / (main + absorbing) contribution; the word is fully absorbed when
   no main latent fires and an absorbing latent does. The k-sparse probes are class-weighted
   (a letter is ~4% of words).
Reported per letter and overall (mean with a bootstrap 95% CI over words).
"""

from __future__ import annotations

import hashlib
import re
import string
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from saelab.config import Config
from saelab.data.tasks import lemma
from saelab.data.tokens import Positions
from saelab.evals.probing import fit_predict, pooled_features, top_k_by_mean_diff
from saelab.evals.stats import mean_ci
from saelab.hookpoints import HookPoint
from saelab.models.load import LoadedModel
from saelab.runs.results import AbsorptionResult
from saelab.saes.base import SparseCoder


class AbsorptionConfig(Config):
    """First-letter feature absorption (Chanin et al. 2024; SAEBench)."""

    words: int = Field(1500, gt=0, description="single-token words from the tokenizer vocabulary")
    word_list: str | None = Field(None, description="a local file of words (one per line) instead of the vocabulary")
    min_letter_words: int = Field(10, gt=0, description="letters with fewer train words are skipped")
    max_k: int = Field(5, gt=0, description="largest k-sparse probe tried when looking for split latents")
    split_f1_gain: float = Field(0.03, ge=0, description="F1 gain from k to k+1 that counts a feature split")
    cos_threshold: float = Field(0.025, ge=0, description="absorbing latent: decoder cosine with the probe")
    batch_size: int = Field(64, gt=0)
    bootstrap: int = Field(1000, gt=0)



def vocab_words(tokenizer, n: int, seed: int) -> list[str]:
    """Up to n lowercase words that are one token when preceded by a space (seeded sample)."""
    words = set()
    for i in range(len(tokenizer)):
        s = tokenizer.decode([i])
        if re.fullmatch(r" [a-z]{3,}", s):
            words.add(s[1:])
    words = sorted(words)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(words, min(n, len(words)), replace=False).tolist()) if words else []


def _is_test(word: str, fraction: float = 0.3) -> bool:
    return int.from_bytes(hashlib.sha256(lemma(word).encode()).digest()[:4], "big") % 1000 < fraction * 1000


def absorption(cfg: AbsorptionConfig, sae: SparseCoder, loaded: LoadedModel, hp: HookPoint, positions: Positions,
               progress: bool = True, seed: int = 0) -> AbsorptionResult:
    t0 = time.perf_counter()
    if cfg.word_list:
        path = Path(cfg.word_list).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"absorption word list {path} does not exist")
        words = sorted({w.strip().lower() for w in path.read_text().split() if re.fullmatch(r"[A-Za-z]{2,}", w.strip())})
        source = str(path)
    else:
        words = vocab_words(loaded.tokenizer, cfg.words, seed)
        source = "tokenizer vocabulary (single-token words)"
    if len(words) < 2 * cfg.min_letter_words:
        raise ValueError(f"absorption needs words: {source} gave {len(words)}, fewer than "
                         f"{2 * cfg.min_letter_words} (2 x min_letter_words); pass a word_list")
    x, z = pooled_features([" " + w for w in words], loaded, hp, sae, 8, cfg.batch_size, positions,
                           pool="last", progress=progress, desc="absorption")
    x, z = x.numpy().astype(np.float64), z.numpy()
    letters = np.array([string.ascii_lowercase.index(w[0]) for w in words])
    test = np.array([_is_test(w) for w in words])
    W = sae.W_dec.detach().float().cpu()
    W_unit = torch.nn.functional.normalize(W, dim=1)
    per_letter, fractions, full = {}, [], []
    for li, letter in enumerate(string.ascii_lowercase):
        y = (letters == li).astype(int)
        if y[~test].sum() < cfg.min_letter_words or y[test].sum() == 0:
            continue
        probe = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed).fit(x[~test], y[~test])
        p = torch.tensor(probe.coef_[0], dtype=torch.float32)
        p_unit = p / p.norm()
        probe_f1 = float(f1_score(y[test], probe.predict(x[test])))
        f1s, k = [], 1
        for kk in range(1, cfg.max_k + 1):
            cols = top_k_by_mean_diff(z[~test], y[~test], kk)
            pred = fit_predict(z[~test][:, cols], y[~test], z[test][:, cols], seed, balanced=True)
            f1s.append(float(f1_score(y[test], pred)))
        while k < cfg.max_k and f1s[k] - f1s[k - 1] > cfg.split_f1_gain:
            k += 1
        main = top_k_by_mean_diff(z[~test], y[~test], k)
        cos = W_unit @ p_unit  # [width] decoder cosine with the probe
        absorbing_ok = cos >= cfg.cos_threshold
        absorbing_ok[torch.as_tensor(main)] = False
        proj = W @ p_unit  # [width] each latent's decoder projected on the probe
        rows = np.flatnonzero(test & (y == 1) & (probe.predict(x) == 1))
        fr, fu = [], []
        for r in rows:
            zr = torch.as_tensor(z[r])
            contrib = zr * proj  # [width]
            main_c = float(contrib[torch.as_tensor(main)].clamp_min(0).sum())
            # the absorbing latent: the largest probe contribution among active non-main latents
            # whose decoder is aligned with the probe
            cand = torch.where((zr > 0) & absorbing_ok, contrib, torch.zeros_like(contrib))
            abs_c = float(cand.max().clamp_min(0))
            fr.append(abs_c / (main_c + abs_c) if main_c + abs_c > 0 else 0.0)
            fu.append(float(bool((zr[torch.as_tensor(main)] == 0).all() and abs_c > 0)))
        fractions += fr
        full += fu
        per_letter[letter] = {
            "train_words": int(y[~test].sum()), "test_words": int(y[test].sum()), "probe_correct": len(rows),
            "probe_f1": probe_f1, "sparse_probe_f1": dict(zip(range(1, cfg.max_k + 1), f1s, strict=True)),
            "main_latents": [int(m) for m in main], "split_latents": k - 1,
            "absorption_fraction": float(np.mean(fr)) if fr else None,
            "full_absorption_rate": float(np.mean(fu)) if fu else None,
        }
    if not per_letter:
        raise ValueError(f"absorption: no letter has {cfg.min_letter_words} train words and a test word "
                         f"({len(words)} words from {source})")
    return AbsorptionResult(
        words=len(words), word_source=source, letters=len(per_letter),
        absorption_fraction=mean_ci(np.array(fractions), cfg.bootstrap, seed),
        full_absorption_rate=mean_ci(np.array(full), cfg.bootstrap, seed),
        split_latents_total=int(sum(v["split_latents"] for v in per_letter.values())),
        letters_with_split=int(sum(v["split_latents"] > 0 for v in per_letter.values())),
        mean_probe_f1=float(np.mean([v["probe_f1"] for v in per_letter.values()])),
        mean_sparse_probe_f1_k1=float(np.mean([v["sparse_probe_f1"][1] for v in per_letter.values()])),
        per_letter=per_letter, wall_seconds=round(time.perf_counter() - t0, 2), seed=seed,
        method=__doc__.split("\n\n")[0].replace("\n", " "))
