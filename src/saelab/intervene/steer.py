"""Steering with SAE latents against a difference-of-means direction and a random control, with a
fluency cap, coefficients chosen on one half of the prompts and reported on the other.

Directions (each a vector at the steering hook; only its direction is used):
- `sae`: an SAE latent's decoder row W_dec[i];
- `dom`: a difference of means, mean(activation | positive texts) - mean(activation | negative
  texts), each text's activation mean-pooled over the positions the SAE reads (its Positions);
- `random`: a Gaussian direction (seeded), scaled to the SAE direction's norm (the control);
- `file`: a vector from a .npy, .safetensors or .pt file.

Steering adds  alpha * s * d / ||d||  to the hook's activation, where s = sqrt(E ||x||^2), the
root-mean-square norm of the clean activation at the hook over the kept positions of the
steering prompts (the same statistic as a store's `rms_norm`): alpha = 1 adds a vector as long
as a typical residual there. It is added at every position (`all`) or only where the model
writes the continuation (`generated`: the last prompt position, whose output is the first new
token, and every new token), through `saelab.models.hooks.add`.

Generation is seeded sampling with a KV cache, written out here so that every (prompt, sample)
uses the same random numbers under every condition: sample j of prompt p draws its tokens by
inverse-CDF from uniforms u[p, j, step] fixed by (seed, p), at temperature T with nucleus
(top-p) truncation. So conditions are paired sample by sample, and alpha = 0 (a zero vector
added) reproduces unsteered generation exactly (tests/test_steer.py).

Measured per generation: concept success (the judge, reading the continuation only), and
fluency = the mean per-token negative log-likelihood of the continuation (its tokens up to and
including the first end-of-text) under the clean model given the prompt; perplexity =
exp(mean NLL). The unit is the prompt: a prompt's n generations are averaged first, then means,
perplexities (exp of the mean over prompts of the prompt's mean NLL) and bootstrap CIs are over
prompts. Protocol (AxBench, Wu et al. 2025): prompts are calibrated (from candidates, keep those
whose unsteered success, on separate calibration samples, is closest to 0.5) and split in two
halves by a seeded shuffle; on the `choose` half each direction's alpha is the one with the
highest success among those whose perplexity is at most `fluency_cap` x the unsteered
perplexity (ties: the smaller alpha; alpha = 0 is always allowed); every number reported is on
the `report` half, where the directions meet head to head at their chosen alphas, paired on the
same prompts and samples (saelab.evals.stats.compare).

This module computes results from an SAE, a model and text; it knows nothing of run
directories (saelab.experiments.steer reads and writes those).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from saelab.activations.rows import kept_rows
from saelab.data.tasks import TaskSpec
from saelab.data.tokens import Context, Positions, batches
from saelab.device import describe, peak_memory_bytes, reset_peak
from saelab.evals.metrics import token_ce
from saelab.evals.probing import pooled_features
from saelab.evals.stats import compare, mean_ci
from saelab.hookpoints import HookPoint
from saelab.intervene import InterventionSettings
from saelab.intervene.lens import logit_lens
from saelab.models.hooks import add
from saelab.models.load import LoadedModel
from saelab.runs.results import (
    ChosenAlpha,
    Comparison,
    ScanPoint,
    SteerDirection,
    SteerResult,
)
from saelab.saes.base import SparseCoder

# Neutral sentence openings for the sentiment demo; calibration keeps those whose unsteered
# continuations are judged positive about half the time.
SENTIMENT_PROMPTS = (
    "The movie I watched last night was", "My first day at the new job was", "The restaurant on the corner",
    "When I opened the box, I", "The weather this weekend", "My neighbor told me that", "The book I am reading",
    "Yesterday I went to the store and", "The meeting this morning", "Our trip to the coast",
    "The new phone I bought", "I spent the afternoon", "The hotel room was", "My brother called to say",
    "The concert last Friday", "The train ride home", "After the exam, the students", "The food at the party",
    "The old house on the hill", "This morning the city", "The game ended and the fans", "The letter from my aunt",
    "I tried the new recipe and", "The review of the album", "Walking through the park, I",
    "The teacher looked at the class and", "The doctor said that", "The customer service call",
    "My cat spent the day", "The results of the election", "The garden in spring", "The flight was delayed, and",
    "Our team meeting about the project", "The coffee at this place", "The museum exhibition",
    "The neighbors' party last night", "The drive through the mountains", "The city council announced",
    "My grandmother's kitchen", "The package arrived and", "The school play", "The first chapter of the novel",
    "The interview went", "The weekend at the lake", "My new roommate", "The news this evening",
    "The bus was late again, and", "The painting on the wall",
    "The new library downtown", "My sister's wedding", "The history class this semester", "The update to the app",
    "The soup I made yesterday", "Our neighbor's dog", "The last episode of the show", "The hike up the hill",
    "The store manager said", "The bakery near the station", "My phone call with the bank",
    "The conference in Berlin", "The car I rented", "The kids at the playground", "The view from the balcony",
    "The lecture on physics", "The football match on Sunday", "The hospital waiting room", "The birthday cake",
    "The software release", "The ferry across the bay", "The new chair in my office", "The rain last night",
    "The band's second album", "The apartment we visited", "My first week of school", "The speech at the ceremony",
    "The camping trip", "The online course I took", "The old bridge over the river", "The photos from the trip",
    "The dinner with my parents", "The shopping mall", "The job interview yesterday", "The new neighbors",
    "The chess tournament", "The ice cream shop", "The traffic this morning", "The science fair",
    "The play at the theater", "The sandwich I ordered", "The wifi in the hotel", "The documentary about whales",
    "The local election results", "The yoga class", "The second half of the game", "The tour guide told us",
    "The repair shop called and",
)

DIRECTIONS = ("sae", "dom", "random", "file")
DEFINITIONS = {
    "steering": "x + alpha * s * d / ||d|| at the hook; s = sqrt(E||x||^2) over the kept positions of the steering "
                "prompts (clean)",
    "success": "fraction of a prompt's generations the judge calls the target concept, averaged over prompts",
    "perplexity": "exp(mean over prompts of the prompt's mean over generations of the continuation's mean per-token "
                  "NLL under the clean model given the prompt); the continuation counts its tokens up to and including "
                  "the first end-of-text",
    "fluency_cap": "an alpha is allowed when its perplexity <= fluency_cap x the unsteered perplexity (same half)",
    "chosen_alpha": "highest success among allowed alphas on the choose half (ties: smaller alpha; 0 always allowed)",
    "head_to_head": "success at each direction's chosen alpha on the report half, paired by prompt (the same prompts "
                    "and sampling random numbers): a, b, a - b, paired percentile bootstrap 95% CIs over prompts; "
                    "<x>_vs_random_same_alpha: x against the random direction at x's chosen alpha (the same push)",
    "calibration": "candidate prompts ranked by |unsteered success - 0.5| on separate calibration samples; the closest "
                   "n_prompts kept",
    "latent_choice": "on the concept's train texts only: 'activation' = the latent with the largest mean activation "
                     "difference (positive - negative texts, mean-pooled over kept positions); 'cosine' = the latent "
                     "whose decoder row has the largest cosine with the difference-of-means direction",
}


class SteerSettings(InterventionSettings):
    """What a steering run computes (the stage's config adds the run directory and where it runs)."""

    directions: list[Literal["sae", "dom", "random", "file"]] = Field(
        default_factory=lambda: ["sae", "dom", "random"],
        description="directions to compare: sae (an SAE latent's decoder row), dom (difference of means), random "
                    "(control), file (vector_file)")
    latent: int | None = Field(None, description="SAE latent to steer with (default: the most concept-aligned "
                               "latent, chosen on the concept task's train split)")
    latent_select: Literal["activation", "cosine"] = Field(
        "activation", description="how the default latent is chosen on the train split: activation (largest mean "
        "activation difference, positive - negative) or cosine (decoder row closest to the DoM direction)")
    concept_task: str | TaskSpec = Field("sentiment", description="labelled texts defining the concept: a built-in "
                                         "task name or a TaskSpec; its train split gives the DoM direction, the "
                                         "latent choice and the probe judge's training data")
    positive_class: str = Field("positive", description="the concept's class (steered toward)")
    negative_class: str = Field("negative", description="the opposite class (the DoM direction's other side)")
    positive_texts: str | None = Field(None, description="a text file, one text per line, instead of the task's "
                                       "positive class")
    negative_texts: str | None = Field(None, description="a text file, one text per line, instead of the task's "
                                       "negative class")
    vector_file: str | None = Field(None, description="a steering vector [d] (.npy, .safetensors, .pt) for the "
                                    "'file' direction")
    vector_key: str | None = Field(None, description="the tensor's name inside a .safetensors/.pt file holding several")
    judge: Literal["vader", "probe"] = Field("vader", description="concept judge: vader (compound > threshold) or "
                                             "probe (trained on the concept task at probe_hook)")
    judge_threshold: float = Field(0.05, ge=0, description="VADER compound threshold (VADER's cut for positive)")
    probe_hook: str | None = Field(None, description="the probe judge's hook; must be another layer than the "
                                   "steering hook (default: resid_post of the layer halfway to the last)")
    prompts: list[str] | None = Field(None, description="candidate prompts (default: the built-in neutral openings)")
    prompts_file: str | None = Field(None, description="a text file of candidate prompts, one per line")
    candidates: int | None = Field(None, gt=0, description="use only the first N candidate prompts")
    n_prompts: int = Field(40, ge=2, description="prompts kept after calibration (split into choose / report halves)")
    calibration_generations: int = Field(6, gt=0, description="unsteered samples per candidate for calibration")
    generations: int = Field(6, gt=0, description="samples per prompt and condition")
    alphas: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.15, 0.2, 0.3, 0.45],
                                description="steering coefficients (x the residual RMS norm s); 0, the unsteered "
                                "baseline, is always run")
    steer_positions: Literal["all", "generated"] = Field("all", description="add the vector at every position or "
                                                         "only where the continuation is written")
    max_new_tokens: int = Field(24, gt=0, description="tokens generated per sample")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass")
    fluency_cap: float = Field(1.5, gt=1, description="an alpha is allowed when its perplexity <= this x the "
                               "unsteered perplexity")
    batch_size: int = Field(64, gt=0, description="sequences per generation / scoring batch")
    max_tokens: int = Field(32, ge=2, description="tokens per concept-task text (longer are cut)")


# --- directions ---------------------------------------------------------------------------------------


@dataclass
class Direction:
    name: str  # sae, dom, random, file
    vector: torch.Tensor  # [d] float32 on the CPU, as given (only its direction is used)
    kind: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> torch.Tensor:
        n = self.vector.norm()
        if not n > 0:
            raise ValueError(f"direction {self.name!r} is the zero vector")
        return self.vector / n


def sae_direction(sae: SparseCoder, latent: int) -> Direction:
    """Latent `latent`'s decoder row (in the SAE's output space: its hook, or a transcoder's hook_out)."""
    if not 0 <= latent < sae.cfg.width:
        raise ValueError(f"latent {latent} is out of range: the SAE has {sae.cfg.width} latents")
    v = sae.W_dec.detach()[latent].float().cpu()
    return Direction("sae", v, "SAE latent decoder row", {"latent": int(latent), "decoder_norm": float(v.norm())})


@dataclass
class ConceptActivations:
    """Per-text activations at the hook [n, d] and SAE latents [n, width], mean-pooled over the kept positions."""

    x_pos: torch.Tensor
    x_neg: torch.Tensor
    z_pos: torch.Tensor | None
    z_neg: torch.Tensor | None
    source: str


def concept_activations(loaded: LoadedModel, hp: HookPoint, sae: SparseCoder | None, positive: list[str],
                        negative: list[str], positions: Positions, max_tokens: int = 32, batch_size: int = 32,
                        source: str = "") -> ConceptActivations:
    if not positive or not negative:
        raise ValueError(f"a difference of means needs texts on both sides ({len(positive)} positive, "
                         f"{len(negative)} negative)")
    xp, zp = pooled_features(positive, loaded, hp, sae, max_tokens, batch_size, positions)
    xn, zn = pooled_features(negative, loaded, hp, sae, max_tokens, batch_size, positions)
    return ConceptActivations(xp, xn, zp, zn, source)


def dom_direction(c: ConceptActivations) -> Direction:
    """mean(positive) - mean(negative) of the pooled activations."""
    v = (c.x_pos.double().mean(0) - c.x_neg.double().mean(0)).float()
    return Direction("dom", v, "difference of means", {"positive_texts": int(c.x_pos.shape[0]),
                                                       "negative_texts": int(c.x_neg.shape[0]), "source": c.source,
                                                       "pooling": "mean over the kept positions of each text"})


def rank_latents(sae: SparseCoder, c: ConceptActivations, dom: Direction, k: int = 5) -> dict[str, list[dict]]:
    """The top-k latents by each criterion (activation difference, decoder cosine with the DoM), with both numbers."""
    if c.z_pos is None or c.z_neg is None:
        raise ValueError("ranking latents needs the SAE's latents on the concept texts")
    act = (c.z_pos.double().mean(0) - c.z_neg.double().mean(0)).float()
    W = sae.W_dec.detach().float().cpu()
    cos = (W @ dom.unit) / W.norm(dim=1).clamp_min(1e-12)
    out = {}
    for name, score in (("activation", act), ("cosine", cos)):
        top = torch.argsort(score, descending=True, stable=True)[:k]
        out[name] = [{"latent": int(i), "activation_diff": float(act[i]), "cosine_with_dom": float(cos[i]),
                      "fires_positive": float((c.z_pos[:, i] > 0).float().mean()),
                      "fires_negative": float((c.z_neg[:, i] > 0).float().mean())} for i in top]
    return out


def random_direction(d: int, seed: int, norm: float = 1.0) -> Direction:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    v = (v * (norm / v.norm())).float()
    return Direction("random", v, "random (Gaussian, seeded)", {"seed": int(seed), "norm": float(norm)})


def file_direction(path: str | Path, key: str | None = None) -> Direction:
    """A vector [d] from .npy, .safetensors or .pt/.pth (one tensor, or `key` among several)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"steering vector file {path} does not exist")
    if path.suffix == ".npy":
        t = torch.from_numpy(np.load(path))
    elif path.suffix in (".safetensors", ".pt", ".pth"):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            if key is None and len(obj) != 1:
                raise ValueError(f"{path} holds {len(obj)} tensors ({', '.join(sorted(obj))}); name one with vector_key")
            t = obj[key] if key is not None else next(iter(obj.values()))
        else:
            t = obj
    else:
        raise ValueError(f"steering vector file {path}: use .npy, .safetensors or .pt")
    t = torch.as_tensor(t).float().squeeze()
    if t.ndim != 1:
        raise ValueError(f"steering vector in {path} must be one vector [d], got shape {tuple(t.shape)}")
    return Direction("file", t, "vector from a file", {"path": str(path), "key": key})


# --- prompts, scale, generation, scoring -----------------------------------------------------------------


def prompt_ids(loaded: LoadedModel, prompts: list[str], positions: Positions) -> list[list[int]]:
    """Token ids of each prompt, BOS first when the SAE was trained so."""
    tok = loaded.tokenizer
    bos = [tok.bos_token_id] if positions.prepend_bos and tok.bos_token_id is not None else []
    out = []
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {p!r} has no tokens")
        out.append(bos + ids)
    return out


@torch.no_grad()
def residual_rms(loaded: LoadedModel, hp: HookPoint, ids: list[list[int]], positions: Positions,
                 batch_size: int = 32) -> float:
    """sqrt(E ||x||^2) of the clean activation at the hook over the prompts' kept positions."""
    total, n = 0.0, 0
    ctxs = [Context(p, i, 0) for i, p in enumerate(ids)]
    for batch in batches(ctxs, batch_size, loaded.tokenizer.pad_token_id):
        x = kept_rows(loaded.model, [hp], batch, loaded.tokenizer, positions).rows(hp).double()
        total += float(x.pow(2).sum())
        n += x.shape[0]
    if n == 0:
        raise ValueError("the prompts have no position the SAE reads")
    return math.sqrt(total / n)


@dataclass
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 0.9
    batch_size: int = 64


def uniforms(seed: int, prompt_index: int, n: int, steps: int) -> torch.Tensor:
    """[n, steps] the random numbers sample j of a prompt draws its tokens with (the same under every condition)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(prompt_index))
    return torch.rand(n, steps, generator=g, dtype=torch.float64)


def pick(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Inverse-CDF sampling of one token per row from logits [B, V] with uniforms u [B] in [0, 1),
    after temperature and nucleus (top-p) truncation; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    if top_p >= 1:
        p, order = (logits - lse).exp().double(), None
    else:  # the nucleus lies within the top-k tokens wherever they hold top_p of the mass (a full sort is slow)
        for k in (512, 4096, logits.shape[-1]):
            top, order = logits.topk(min(k, logits.shape[-1]), dim=-1, sorted=True)
            p = (top - lse).exp().double()
            if bool((p.sum(-1) >= top_p).all()):
                break
        p = p * ((p.cumsum(-1) - p) < top_p)  # the smallest prefix holding top_p of the mass (>= 1 token)
    cdf = p.cumsum(-1)
    r = (u.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, r, right=True).clamp_max(cdf.shape[-1] - 1)
    return idx.squeeze(-1) if order is None else order.gather(-1, idx).squeeze(-1)


def _cache_kwarg(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] and attention mask [B, T] of prompts padded on the left (each ends at position T - 1)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, T - len(p):] = torch.tensor(p)
        mask[r, T - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample(loaded: LoadedModel, hp: HookPoint, prompts: list[list[int]], vectors: torch.Tensor | None,
           u: torch.Tensor, sampling: Sampling, steer_positions: str = "all",
           share: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuations: tokens [R, max_new_tokens] (pad after the end) and lengths [R] (tokens up to and
    including the first end-of-text). Row r continues prompts[r] (left-padded in its batch), adds
    vectors[r] ([R, d]; None: no hook at all) at the hook and draws with uniforms u[r] ([R, steps]);
    rows run `sampling.batch_size` at a time, with a KV cache. share > 1 (unsteered only): row r
    continues prompts[r // share], each prompt prefilled once and its cache repeated for its
    `share` rows (the same tokens as repeating the prompt, without the repeated prefill)."""
    model, tok = loaded.model, loaded.tokenizer
    device = loaded.device
    R, steps = u.shape[0], sampling.max_new_tokens
    if share > 1 and (vectors is not None or R != share * len(prompts)):
        raise ValueError(f"share={share} needs no steering vectors and {share} rows per prompt (got {R} rows for "
                         f"{len(prompts)} prompts)")
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    cache_kw = _cache_kwarg(model)
    out_tokens = torch.full((R, steps), pad, dtype=torch.long)
    lengths = torch.full((R,), steps, dtype=torch.long)
    chunk = max(1, sampling.batch_size // share) * share
    for s in range(0, R, chunk):
        rows = slice(s, min(R, s + chunk))
        ids, mask = _left_padded(prompts[s // share:rows.stop // share] if share > 1 else prompts[rows], pad, device)
        B, T = rows.stop - rows.start, ids.shape[1]
        vec = None if vectors is None else vectors[rows].to(device)[:, None, :]  # [B, 1, d]
        prefill_mask = None
        if steer_positions == "generated":
            prefill_mask = torch.zeros(B, T, dtype=torch.bool, device=device)
            prefill_mask[:, -1] = True  # its output is the first new token
        pos = (mask.cumsum(-1) - 1).clamp_min(0)

        def step(input_ids, attn, position_ids, steer_mask, cache=None, vec=vec):
            kw = {cache_kw: cache} if cache is not None else {}
            args = dict(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=True,
                        **keep_kw, **kw)
            if vec is None:
                return model(**args)
            with add(model, hp, vec, steer_mask):
                return model(**args)

        out = step(ids, mask, pos, prefill_mask)
        cache = out.get("cache") if "cache" in out else out.get("past_key_values")
        logits = out.logits[:, -1]
        if share > 1:  # each prompt's prefill serves its `share` rows
            cache.batch_repeat_interleave(share)
            logits, mask, pos = (x.repeat_interleave(share, dim=0) for x in (logits, mask, pos))
        done = torch.zeros(B, dtype=torch.bool, device=device)
        ub, last = u[rows], pos[:, -1:]
        for t in range(steps):
            nxt = pick(logits.float(), ub[:, t], sampling.temperature, sampling.top_p)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out_tokens[rows, t] = nxt.cpu()
            if eos is not None:
                ended = (nxt == eos) & ~done
                lengths[rows][ended.cpu()] = t + 1  # a view: writes into lengths
                done |= ended
            if t == steps - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
            out = step(nxt[:, None], mask, last + t + 1, None, cache)
            logits = out.logits[:, -1]
    return out_tokens, lengths


@torch.no_grad()
def continuation_nll(loaded: LoadedModel, prompts: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor,
                     batch_size: int = 64) -> torch.Tensor:
    """Mean per-token NLL [R] (nats) of each continuation (its first `lengths[r]` tokens) under the clean
    model given prompts[r] (plain forwards, no hooks; rows right-padded)."""
    model, device = loaded.model, loaded.device
    pad = loaded.tokenizer.pad_token_id or 0
    R = tokens.shape[0]
    out = torch.empty(R, dtype=torch.float64)
    for s in range(0, R, batch_size):
        idx = range(s, min(R, s + batch_size))
        seqs = [prompts[r] + tokens[r, : int(lengths[r])].tolist() for r in idx]
        W = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), W), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, q in enumerate(seqs):
            ids[i, :len(q)], mask[i, :len(q)] = torch.tensor(q), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for i, r in enumerate(idx):
            T, L = len(prompts[r]), int(lengths[r])
            ce = token_ce(logits[i, T - 1:T - 1 + L], ids[i, T:T + L].to(device))
            out[r] = float(ce.double().mean())
    return out


def decode(loaded: LoadedModel, tokens: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    return [loaded.tokenizer.decode(tokens[r, : int(lengths[r])].tolist(), skip_special_tokens=True)
            for r in range(tokens.shape[0])]


Judge = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


@dataclass
class Condition:
    direction: str  # "baseline" for alpha 0
    alpha: float


@dataclass
class Measured:
    """Per prompt (rows) and condition (columns): mean success, mean judge score, mean NLL over the
    prompt's generations; and every generation (for the generations file)."""

    success: np.ndarray
    score: np.ndarray
    nll: np.ndarray
    records: list[dict[str, Any]]


def measure(loaded: LoadedModel, hp: HookPoint, ids: list[list[int]], prompt_index: list[int],
            conditions: list[Condition], vectors: dict[str, torch.Tensor], n: int, sampling: Sampling,
            steer_positions: str, seed: int, judge: Judge, progress: bool = False, desc: str = "steer") -> Measured:
    """Generate n samples per prompt under every condition (vectors: direction -> alpha-1 vector [d],
    i.e. s * unit direction), score them with the judge and the clean model's NLL. Rows are ordered
    (prompt, condition, sample) and batched across prompts."""
    P, C = len(ids), len(conditions)
    d = loaded.model.config.hidden_size
    per_prompt = torch.stack([torch.zeros(d) if c.direction == "baseline" else c.alpha * vectors[c.direction]
                              for c in conditions]).repeat_interleave(n, dim=0)  # [C * n, d]
    texts: list[str] = []
    scores, oks, nlls, lens = [], [], [], []
    group = max(1, round(4 * sampling.batch_size / (C * n)))  # prompts per round (~4 batches of rows)
    bar = tqdm(total=P, desc=desc, disable=not progress, leave=False)
    for g in range(0, P, group):
        ps = list(range(g, min(P, g + group)))
        rows_prompts = [ids[p] for p in ps for _ in range(C * n)]
        vec = per_prompt.repeat(len(ps), 1)
        u = torch.cat([uniforms(seed, prompt_index[p], n, sampling.max_new_tokens).repeat(C, 1) for p in ps])
        tokens, lengths = sample(loaded, hp, rows_prompts, vec, u, sampling, steer_positions)
        t = decode(loaded, tokens, lengths)
        sc, ok = judge(t)
        texts += t
        scores.append(sc)
        oks.append(ok)
        nlls.append(continuation_nll(loaded, rows_prompts, tokens, lengths, sampling.batch_size).numpy())
        lens.append(lengths.numpy())
        bar.update(len(ps))
    bar.close()
    shape = (P, C, n)
    sc, ok, nl, ln = (np.concatenate(x).reshape(shape) for x in (scores, oks, nlls, lens))
    records = [{"prompt": prompt_index[p], "direction": conditions[c].direction, "alpha": conditions[c].alpha,
                "sample": j, "text": texts[(p * C + c) * n + j], "score": float(sc[p, c, j]),
                "success": bool(ok[p, c, j]), "nll": float(nl[p, c, j]), "tokens": int(ln[p, c, j])}
               for p in range(P) for c in range(C) for j in range(n)]
    return Measured(ok.mean(-1), sc.mean(-1), nl.mean(-1), records)


# --- statistics, choice, head-to-head ---------------------------------------------------------------------


def scan_point(direction: str, alpha: float, half: str, m: Measured, rows: np.ndarray, c: int, base_ppl: float,
               cap: float, n_boot: int, seed: int) -> ScanPoint:
    nll = mean_ci(m.nll[rows, c], n_boot, seed)
    ppl = math.exp(nll.mean)
    return ScanPoint(direction=direction, alpha=alpha, half=half, success=mean_ci(m.success[rows, c], n_boot, seed),
                     nll=nll, perplexity=ppl, perplexity_ci95=[math.exp(x) for x in nll.ci95],
                     within_cap=bool(ppl <= cap * base_ppl), mean_score=float(m.score[rows, c].mean()))


def choose_alpha(points: list[ScanPoint], cap: float) -> ChosenAlpha:
    """The highest-success alpha whose perplexity is within the cap (ties: smaller alpha); points
    are one direction's choose-half points, alpha 0 (the baseline) among them."""
    allowed = [p for p in points if p.within_cap or p.alpha == 0]
    best = max(allowed, key=lambda p: (p.success.mean, -abs(p.alpha)))
    excluded = sorted(p.alpha for p in points if p not in allowed)
    base = next(p for p in points if p.alpha == 0)
    reason = (f"highest success within the cap (perplexity <= {cap:g} x {base.perplexity:.2f})"
              + (f"; over the cap: {', '.join(f'{a:g}' for a in excluded)}" if excluded else ""))
    if best.alpha == 0:
        reason = "no alpha within the cap beat the unsteered baseline on the choose half" + (
            f" (over the cap: {', '.join(f'{a:g}' for a in excluded)})" if excluded else "")
    return ChosenAlpha(alpha=best.alpha, success=best.success.mean, perplexity=best.perplexity,
                       max_perplexity=cap * base.perplexity, excluded_by_cap=excluded, reason=reason)


def head_to_head(m: Measured, report: np.ndarray, column: dict[str, int], n_boot: int, seed: int,
                 same_alpha: dict[str, tuple[int, int, float]] | None = None) -> dict[str, Comparison]:
    """Success at each direction's chosen alpha (column: direction -> condition column, 'baseline'
    included), paired by prompt on the report half: every pair of directions, and each vs baseline.
    same_alpha: direction -> (its column, the random direction's column, alpha) at its chosen alpha,
    for `<direction>_vs_random_same_alpha` (a random push of the same size)."""
    names = [d for d in ("sae", "dom", "random", "file") if d in column] + ["baseline"]
    ones = np.ones(len(report))

    def cmp(ca: int, cb: int, sides: str) -> Comparison:
        return compare((m.success[report, ca], ones), (m.success[report, cb], ones), n_boot, seed, unit="prompt",
                       sides=sides)

    out = {f"{a}_vs_{b}": cmp(column[a], column[b], f"a = {a}, b = {b}: success at each one's chosen alpha, "
                                                      "report half")
           for i, a in enumerate(names) for b in names[i + 1:]}
    for name, (ca, cr, alpha) in (same_alpha or {}).items():
        out[f"{name}_vs_random_same_alpha"] = cmp(ca, cr, f"a = {name}, b = random, both at {name}'s chosen alpha "
                                                          f"{alpha:g}, report half")
    return out


def split_prompts(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of n prompts into (choose, report) halves (report gets the extra one)."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


@dataclass
class SteerOutput:
    result: SteerResult
    records: list[dict[str, Any]]  # every generation (calibration ones with direction 'calibration')


def steer(cfg: SteerSettings, sae: SparseCoder | None, loaded: LoadedModel, hp: HookPoint, positions: Positions,
          directions: dict[str, Direction], judge: Judge, judge_info: dict[str, Any], candidates: list[str],
          latent_choice: dict[str, Any] | None = None, progress: bool = True) -> SteerOutput:
    """Calibrate prompts, scan every direction over cfg.alphas, choose each one's alpha on the choose
    half and compare them on the report half (see the module docstring)."""
    device = loaded.device
    reset_peak(device)
    t0 = time.perf_counter()
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)
    order = [d for d in DIRECTIONS if d in directions]
    if not order:
        raise ValueError("no direction to steer with")
    if cfg.n_prompts > len(candidates):
        raise ValueError(f"n_prompts {cfg.n_prompts} exceeds the {len(candidates)} candidate prompts")
    # 1. calibration: unsteered samples (their own seeds) for every candidate
    cand_ids = prompt_ids(loaded, candidates, positions)
    calib_seed = cfg.seed + 7919  # calibration samples never reappear in the scan
    cal = measure(loaded, hp, cand_ids, list(range(len(candidates))), [Condition("baseline", 0.0)], {},
                  cfg.calibration_generations, sampling, cfg.steer_positions, calib_seed, judge, progress,
                  desc="calibrate prompts")
    base_rate = cal.success[:, 0]
    kept = sorted(sorted(range(len(candidates)), key=lambda i: (abs(base_rate[i] - 0.5), i))[: cfg.n_prompts])
    for r in cal.records:
        r["direction"] = "calibration"
    t1 = time.perf_counter()
    # 2. scale and conditions
    ids = [cand_ids[i] for i in kept]
    s = residual_rms(loaded, hp, ids, positions)
    vectors = {name: s * directions[name].unit for name in order}
    alphas = sorted({float(a) for a in cfg.alphas if a != 0})
    conditions = [Condition("baseline", 0.0)] + [Condition(name, a) for name in order for a in alphas]
    m = measure(loaded, hp, ids, kept, conditions, vectors, cfg.generations, sampling, cfg.steer_positions,
                cfg.seed, judge, progress, desc="steer scan")
    t2 = time.perf_counter()
    # 3. halves, scan table, choice, head-to-head
    choose, report = split_prompts(len(kept), cfg.seed)
    col = {(c.direction, c.alpha): i for i, c in enumerate(conditions)}
    scan: list[ScanPoint] = []
    chosen: dict[str, ChosenAlpha] = {}
    for half, rows in (("choose", choose), ("report", report)):
        base = scan_point("baseline", 0.0, half, m, rows, 0, math.inf, 1.0, cfg.bootstrap, cfg.seed)
        base_ppl = base.perplexity
        scan.append(base)
        for name in order:
            pts = [scan_point(name, a, half, m, rows, col[(name, a)], base_ppl, cfg.fluency_cap, cfg.bootstrap,
                              cfg.seed) for a in alphas]
            scan += pts
            if half == "choose":
                chosen[name] = choose_alpha([base.model_copy(update={"direction": name}), *pts], cfg.fluency_cap)
    column = {name: col[(name, chosen[name].alpha)] if chosen[name].alpha != 0 else 0 for name in order}
    column["baseline"] = 0
    same = {name: (column[name], col[("random", chosen[name].alpha)], chosen[name].alpha) for name in order
            if name != "random" and "random" in order and chosen[name].alpha != 0}
    h2h = head_to_head(m, report, column, cfg.bootstrap, cfg.seed, same)
    t3 = time.perf_counter()
    # 4. what each direction is: norm, cosine with the DoM, logit lens
    dom_unit = directions["dom"].unit if "dom" in directions else None
    lens = logit_lens(loaded.model, torch.stack([vectors[n] for n in order]).to(device), k=10) \
        if hp.kind in ("resid_pre", "resid_post") else None
    described = {}
    for i, name in enumerate(order):
        d = directions[name]
        described[name] = SteerDirection(
            name=name, kind=d.kind, norm=float(d.vector.norm()), info=d.info,
            cosine_with_dom=float(d.unit @ dom_unit) if dom_unit is not None else None,
            lens=lens.tokens(loaded.tokenizer, i) if lens is not None else {})
    examples = {}
    report_set = {kept[i] for i in report}
    for name in ["baseline", *order]:
        a = 0.0 if name == "baseline" else chosen[name].alpha
        ex = [r for r in m.records if r["direction"] == ("baseline" if a == 0 else name) and r["alpha"] == a
              and r["prompt"] in report_set and r["sample"] == 0][:4]
        examples[name] = [f"{candidates[r['prompt']]} ||| {r['text']}" for r in ex]
    result = SteerResult(
        model=str(getattr(loaded, "name", "")), hook=str(hp), concept=_concept_name(cfg), judge=judge_info,
        positions=positions.to_dict(), steer_positions=cfg.steer_positions,
        scale={"s": s, "definition": DEFINITIONS["steering"], "prompts": len(kept)},
        alphas=[0.0, *alphas], generations=cfg.generations,
        sampling={"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                  "method": "inverse-CDF from per-(prompt, sample) uniforms, KV cache"},
        prompts={"candidates": [{"text": c, "baseline_success": float(base_rate[i]), "kept": i in kept}
                                for i, c in enumerate(candidates)],
                 "calibration_generations": cfg.calibration_generations,
                 "kept": kept, "choose": [kept[i] for i in choose], "report": [kept[i] for i in report],
                 "kept_baseline_success_calibration": float(base_rate[kept].mean())},
        directions=described, latent_choice=latent_choice or {}, scan=scan, chosen=chosen, head_to_head=h2h,
        fluency_cap=cfg.fluency_cap, examples=examples, definitions=DEFINITIONS, seed=cfg.seed,
        wall_seconds={"calibration": round(t1 - t0, 1), "scan": round(t2 - t1, 1), "statistics": round(t3 - t2, 1),
                      "total": round(time.perf_counter() - t0, 1)},
        device=describe(device), peak_memory_bytes=peak_memory_bytes(device))
    return SteerOutput(result, cal.records + m.records)


def _concept_name(cfg: SteerSettings) -> str:
    task = cfg.concept_task if isinstance(cfg.concept_task, str) else cfg.concept_task.name
    return f"{task}: {cfg.positive_class} (vs {cfg.negative_class})"


# --- the plot ----------------------------------------------------------------------------------------------

COLORS = {"sae": "tab:blue", "dom": "tab:orange", "random": "tab:gray", "file": "tab:green"}


def plot_scan(result: SteerResult, path: str | Path, half: str = "report") -> Path:
    """Success and perplexity vs alpha for each direction (95% CIs over prompts; stars: chosen alphas),
    and success vs perplexity (the dose-response as a Pareto curve), on one half. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in result.scan if p.half == half]
    base = next(p for p in pts if p.direction == "baseline")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in result.directions:
        curve = [base] + sorted((p for p in pts if p.direction == name), key=lambda p: p.alpha)
        a = np.array([p.alpha for p in curve])
        succ = np.array([p.success.mean for p in curve])
        s_err = np.array([[p.success.mean - p.success.ci95[0], p.success.ci95[1] - p.success.mean] for p in curve]).T
        ppl = np.array([p.perplexity for p in curve])
        p_err = np.array([[p.perplexity - p.perplexity_ci95[0], p.perplexity_ci95[1] - p.perplexity] for p in curve]).T
        kw = {"color": COLORS.get(name), "marker": "o", "capsize": 3, "label": name}
        axes[0].errorbar(a, succ, yerr=s_err, **kw)
        axes[1].errorbar(a, ppl, yerr=p_err, **kw)
        axes[2].plot(ppl, succ, marker="o", color=COLORS.get(name), label=name)
        c = result.chosen[name].alpha
        i = int(np.flatnonzero(a == c)[0])
        for ax, y in ((axes[0], succ[i]), (axes[1], ppl[i])):
            ax.plot([c], [y], marker="*", markersize=16, color=COLORS.get(name), markeredgecolor="black")
        axes[2].plot([ppl[i]], [succ[i]], marker="*", markersize=16, color=COLORS.get(name), markeredgecolor="black")
    axes[1].axhline(result.fluency_cap * base.perplexity, color="red", linestyle="--",
                    label=f"cap {result.fluency_cap:g} x baseline ({half} half)")
    axes[0].set(xlabel="alpha (x residual RMS norm)", ylabel="success (judge)", title=f"concept success, {half} half")
    axes[1].set(xlabel="alpha (x residual RMS norm)", ylabel="perplexity (clean model)", yscale="log",
                title="fluency")
    axes[2].set(xlabel="perplexity (clean model)", ylabel="success (judge)", xscale="log",
                title="dose-response (stars: chosen alpha)")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    for axis in (axes[1].yaxis, axes[2].xaxis):  # plain numbers at 1, 2, 5 x 10^k on the log axes
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"steering {result.concept} at {result.hook} of {result.model}: {result.generations} samples x "
                 f"{len(result.prompts[half])} prompts")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
