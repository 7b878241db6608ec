"""Scoring explanations on held-out examples (never the ones an explainer saw).

Definitions (docs/interp.md cites each):
- detection (delphi scorers/classifier/detection.py; Paulo et al. 2024, "Automatically
  interpreting millions of features in large language models"): the scorer LLM is shown the
  explanation and ONE held-out context at a time (delphi's scorer default n_examples_shown=1)
  and answers Yes/No: does the feature fire here? Activating contexts: the held-out quantile
  sample; non-activating: random contexts and hard negatives (a decoder-nearest latent fires,
  this one does not).
- fuzzing (delphi scorers/classifier/fuzz.py, `fuzz_type="active"`): held-out activating
  contexts shown with marked tokens, either the truly activating ones (above 0.3 x the
  example's maximum) or as many tokens drawn at random among the others; Yes/No: are the
  marked tokens the ones the explanation describes?
- embedding (delphi scorers/embedding/embedding.py): cosine similarity between the
  explanation's and each context's sentence embedding (all-MiniLM-L6-v2); AUROC of
  activating vs non-activating contexts.
- simulation (OpenAI automated-interpretability, explanations/scoring.py,
  `aggregate_scored_sequence_simulations`: Pearson r over the concatenated sequences; the
  logprob-free all-at-once simulator's failure rule, zeros for an unparsable answer): the
  scorer predicts 0-10 per token of each held-out context; r between predicted and true
  activations over all of the latent's held-out tokens.
- discrimination (collision-aware): pairs of one held-out context of this latent and one where a
  decoder-nearest neighbour fires and it is silent, order randomised; which text does the
  explanation describe? Chance 0.5. Detection cannot see two latents sharing one label; this can.
- saebench (SAEBench evals/autointerp/main.py): its own generation and scoring prompts, 2 top +
  2 importance-sampled + 10 random held-out examples; score = fraction classified right; its
  floor (answering "None") = 10/14.

Balanced accuracy = (TPR + TNR) / 2 always; AUROC from P(Yes) / (P(Yes) + P(No)) over the
first answer token's top log-probabilities where the backend gives them (delphi's
`_parse_logprobs`), else it falls back to balanced accuracy alone and says so. An answer that
is neither Yes nor No is a parse failure: counted, and left out of that latent's score (delphi
drops it silently). Scores are per latent; per-latent 95% CIs come from a stratified bootstrap
over the latent's examples.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
from pydantic import Field

from saelab.config import Config
from saelab.evals.stats import auroc
from saelab.interp.examples import Window
from saelab.interp.explain import Formatter
from saelab.interp.llm import LLM, Request, Response
from saelab.interp.select import LatentSet

ScorerName = Literal["detection", "fuzzing", "embedding", "simulation", "discrimination", "saebench"]
SCORERS = get_args(ScorerName)


class ScoreConfig(Config):
    scorers: list[ScorerName] = Field(default_factory=lambda: ["detection", "fuzzing", "embedding", "discrimination",
                                                        "saebench"],
                               description="detection, fuzzing, embedding, simulation, discrimination, saebench")
    top_logprobs: int = Field(10, ge=0, description="alternatives asked for with each answer token (for AUROC); "
                              "0: balanced accuracy only")
    bootstrap: int = Field(1000, gt=0, description="bootstrap resamples for per-latent CIs")
    simulation_examples: int = Field(6, ge=2, description="held-out contexts simulated per latent (activating and "
                                     "non-activating, half each)")


# --- metrics -------------------------------------------------------------------------------------------------


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> np.ndarray | float:
    """(TPR + TNR) / 2 along the last axis (rows of a 2-D input are separate resamples)."""
    y, pred = np.asarray(y), np.asarray(pred)
    pos, neg = y == 1, y == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = ((pred == 1) & pos).sum(-1) / pos.sum(-1)
        tnr = ((pred == 0) & neg).sum(-1) / neg.sum(-1)
    out = 0.5 * (tpr + tnr)
    return float(out) if np.ndim(out) == 0 else out


def stratified_ci(y: np.ndarray, values: np.ndarray, stat, n_boot: int, seed: int) -> list[float]:
    """95% percentile CI of stat(y, values), resampling each class's examples separately (all
    resamples at once: stat works along the last axis)."""
    y, values = np.asarray(y), np.asarray(values)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(pos, (n_boot, len(pos))), rng.choice(neg, (n_boot, len(neg)))], axis=1)
    b = np.asarray(stat(y[idx], values[idx]), dtype=np.float64)
    b = b[np.isfinite(b)]
    if b.size == 0:
        return [float("nan"), float("nan")]
    return [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))]


def yes_no(r: Response, yes: tuple[str, ...] = ("yes",), no: tuple[str, ...] = ("no",)
           ) -> tuple[int | None, float | None]:
    """(prediction, P(yes) / (P(yes) + P(no)) from the first token's alternatives, or None)."""
    word = re.sub(r"[^a-z0-9]", "", r.text.strip().lower().split()[0]) if r.text.strip() else ""
    pred = 1 if word in yes else 0 if word in no else None
    prob = None
    if r.logprobs:
        top = r.logprobs[0].top or {r.logprobs[0].token: r.logprobs[0].logprob}
        py = sum(math.exp(v) for t, v in top.items() if re.sub(r"[^a-z0-9]", "", t.lower()) in yes)
        pn = sum(math.exp(v) for t, v in top.items() if re.sub(r"[^a-z0-9]", "", t.lower()) in no)
        if py + pn > 0:
            prob = py / (py + pn)
    return pred, prob


@dataclass
class Binary:
    """Labels and answers of one yes/no scorer for one (latent, explanation)."""

    y: list[int] = field(default_factory=list)
    pred: list[int | None] = field(default_factory=list)
    prob: list[float | None] = field(default_factory=list)
    group: list[str] = field(default_factory=list)  # e.g. the example's domain or kind

    def summary(self, n_boot: int, seed: int, logprobs_given: bool | None) -> dict:
        y = np.array(self.y)
        ok = np.array([p is not None for p in self.pred], dtype=bool)
        out = {"n": len(self.y), "parse_failures": int((~ok).sum())}
        if ok.any():
            yy, pp = y[ok], np.array([p for p in self.pred if p is not None])
            out["balanced_accuracy"] = balanced_accuracy(yy, pp)
            out["balanced_accuracy_ci95"] = stratified_ci(yy, pp, balanced_accuracy, n_boot, seed)
            out["tpr"] = float((pp[yy == 1] == 1).mean()) if (yy == 1).any() else float("nan")
            out["tnr"] = float((pp[yy == 0] == 0).mean()) if (yy == 0).any() else float("nan")
        else:
            out |= {"balanced_accuracy": float("nan"), "balanced_accuracy_ci95": [float("nan")] * 2}
        have = np.array([p is not None for p in self.prob], dtype=bool)
        if have.all() and len(self.prob):
            pr = np.array(self.prob, dtype=np.float64)
            out["auroc"] = auroc(y, pr)
            out["auroc_ci95"] = stratified_ci(y, pr, auroc, n_boot, seed)
        else:
            out["auroc"] = float("nan")
            out["auroc_fallback"] = ("the backend gave no log-probabilities: balanced accuracy only"
                                     if logprobs_given is False or not have.any() else
                                     f"{int((~have).sum())} answers had neither yes nor no among the top "
                                     "alternatives: balanced accuracy only")
        return out


# --- prompts ------------------------------------------------------------------------------------------------

DETECT_SYSTEM = ("You check descriptions of text features. You get the description of a feature and one text "
                 "example. Answer Yes if the feature is present in the example, No if it is not. Answer with one "
                 "word: Yes or No.")
DETECT_SHOTS = (("Feature: the word \"guys\" in \"you guys\"\nExample: I hope you guys love her, and be nice", "Yes"),
                ("Feature: names of months\nExample: the quick brown fox jumps over the lazy dog", "No"))
FUZZ_SYSTEM = ("You check descriptions of text features. You get the description of a feature and one text example "
               "in which some tokens are marked like <<this>>. Answer Yes if the marked tokens are the ones the "
               "description is about, No if they are not. Answer with one word: Yes or No.")
FUZZ_SHOTS = (("Feature: names of months\nExample: we met in <<March>> and again in <<June>>", "Yes"),
              ("Feature: names of months\nExample: we <<met>> in March and again <<in>> June", "No"))
DISCRIM_SYSTEM = ("You check descriptions of text features. You get the description of a feature and two text "
                  "examples. Exactly one of them has the feature. Answer with one character: 1 or 2.")
DISCRIM_SHOTS = (("Feature: names of months\nText 1: the cat sat on the mat\nText 2: we met in March", "2"),)
SIM_SYSTEM = ("You predict where a feature of a neural network fires. You get the feature's description and a "
              "text split into numbered tokens. Answer with the numbers of the tokens where the feature fires and "
              "how strongly (1-10), as number:strength pairs separated by commas, e.g. 3:8, 4:2. Answer None if it "
              "fires nowhere.")


def _shots(shots) -> tuple[tuple[str, str], ...]:
    msgs: tuple[tuple[str, str], ...] = ()
    for u, a in shots:
        msgs += (("user", u), ("assistant", a))
    return msgs


def _chat(system: str, shots, user: str, max_tokens: int, top_logprobs: int) -> Request:
    return Request((("system", system), *_shots(shots), ("user", user)), max_tokens=max_tokens,
                   top_logprobs=top_logprobs)


# --- the scorers ------------------------------------------------------------------------------------------


@dataclass
class Job:
    """Requests for one (latent, explanation, scorer) and what each one is."""

    latent: int
    name: str  # the explanation's name (default, shuffled, token_list, ...)
    scorer: str
    requests: list[Request]
    meta: list = field(default_factory=list)


def detection_job(s: LatentSet, label: str, name: str, fmt: Formatter, cfg: ScoreConfig) -> Job:
    items = [(w, 1, "activating") for w in s.test] + [(w, 0, "random") for w in s.negatives] + \
        [(w, 0, "hard") for w in s.hard] + [(w, 0, "similar") for w in s.similar]
    reqs = [_chat(DETECT_SYSTEM, DETECT_SHOTS, f"Feature: {label}\nExample: {fmt.text(w)}", 1, cfg.top_logprobs)
            for w, _, _ in items]
    return Job(s.latent, name, "detection", reqs, [(y, kind, w.source) for w, y, kind in items])


def fuzz_marks(w: Window, fmt: Formatter, rng: random.Random) -> list[bool]:
    """As many marked tokens as the true ones, drawn among the tokens below the threshold."""
    true = fmt.marked(w)
    others = [i for i, m in enumerate(true) if not m]
    pick = set(rng.sample(others, min(max(sum(true), 1), len(others))))
    return [i in pick for i in range(len(true))]


def fuzzing_job(s: LatentSet, label: str, name: str, fmt: Formatter, cfg: ScoreConfig, seed: int) -> Job:
    rng = random.Random(seed * 7919 + s.latent)
    reqs, meta = [], []
    for w in s.test:
        for y, marks in ((1, fmt.marked(w)), (0, fuzz_marks(w, fmt, rng))):
            reqs.append(_chat(FUZZ_SYSTEM, FUZZ_SHOTS, f"Feature: {label}\nExample: {fmt.highlight(w, marks)}", 1,
                              cfg.top_logprobs))
            meta.append((y, "correct" if y else "random marks", w.source))
    return Job(s.latent, name, "fuzzing", reqs, meta)


def discrimination_job(s: LatentSet, label: str, name: str, fmt: Formatter, cfg: ScoreConfig, seed: int) -> Job:
    rng = random.Random(seed * 104729 + s.latent)
    reqs, meta = [], []
    for a, h in zip(s.test, s.hard, strict=False):
        first = rng.random() < 0.5  # the latent's own context shown first?
        t1, t2 = (a, h) if first else (h, a)
        reqs.append(_chat(DISCRIM_SYSTEM, DISCRIM_SHOTS,
                          f"Feature: {label}\nText 1: {fmt.text(t1)}\nText 2: {fmt.text(t2)}", 1, cfg.top_logprobs))
        meta.append(1 if first else 2)
    return Job(s.latent, name, "discrimination", reqs, meta)


def simulation_job(s: LatentSet, label: str, name: str, fmt: Formatter, cfg: ScoreConfig) -> Job:
    half = cfg.simulation_examples // 2
    wins = s.test[:half] + (s.negatives + s.hard)[:half]
    reqs = []
    for w in wins:
        toks = " ".join(f"{i}:{clean_tok(t)}" for i, t in enumerate(fmt.strs(w.ids)))
        reqs.append(Request.chat(SIM_SYSTEM, f"Feature: {label}\nTokens: {toks}", max_tokens=40))
    return Job(s.latent, name, "simulation", reqs, wins)


def clean_tok(t: str) -> str:
    return t.replace("\n", "\\n").replace(" ", "·") or "∅"


_PAIR = re.compile(r"(\d+)\s*[:=]\s*(\d+)")


def parse_simulation(text: str, n: int) -> list[float] | None:
    """Predicted 0-10 per token from 'i:v' pairs; 'None' = all zero; None when unparsable."""
    t = text.strip()
    if re.match(r"^\W*none\b", t, re.I):
        return [0.0] * n
    pairs = _PAIR.findall(t)
    if not pairs:
        return None
    out = [0.0] * n
    for i, v in pairs:
        if int(i) < n:
            out[int(i)] = float(min(10, int(v)))
    return out


# --- SAEBench's autointerp ---------------------------------------------------------------------------------

SB_GEN_SYSTEM = ("We are studying neurons in a neural network. Each neuron activates on some particular word, words, "
                 "substring or concept in a short document. The activating words in each document are marked with "
                 "<< ... >>. You get documents on which the neuron activates, from the most to the least strongly "
                 "activating. Summarise in one short sentence (at most 20 words) what the neuron activates on. Your "
                 "response should be in the form \"This neuron activates on...\".")
SB_SCORE_SYSTEM = ("We are studying neurons in a neural network. Each neuron activates on some particular word, "
                   "words, substring or concept in a short document. You get a short explanation of what a neuron "
                   "activates on, then {n} numbered example documents in random order. Return a comma-separated list "
                   "of the numbers of the examples where the neuron activates at least once, for example \"2, 5\". If "
                   "it activates on none, answer \"None\". Answer with nothing else.")


def sb_marked(w: Window, top_max: float) -> list[bool]:
    """SAEBench marks tokens above act_threshold_frac (0.01) x the latent's top activation."""
    return [a > 0.01 * top_max for a in w.acts]


def saebench_gen_request(s: LatentSet, fmt: Formatter) -> Request:
    top_max = max([w.max_act for w in s.sb_gen] + [1e-9])
    order = sorted(s.sb_gen, key=lambda w: -w.max_act)
    body = "The activating documents:\n\n" + "\n".join(
        f"{i}. {fmt.highlight(w, sb_marked(w, top_max))}" for i, w in enumerate(order, 1))
    return Request.chat(SB_GEN_SYSTEM, body, max_tokens=30)


def saebench_parse_explanation(text: str) -> str:
    return text.split("activates on")[-1].rstrip(".").strip()


def saebench_score_request(s: LatentSet, label: str, fmt: Formatter, seed: int) -> tuple[Request, list[bool]]:
    rng = random.Random(seed * 31 + s.latent)
    order = list(range(len(s.sb_score)))
    rng.shuffle(order)
    body = (f"Here is the explanation: this neuron fires on {label}.\n\nHere are the examples:\n\n" +
            "\n".join(f"{k}. {fmt.text(s.sb_score[i])}" for k, i in enumerate(order, 1)))
    sys = SB_SCORE_SYSTEM.format(n=len(order))
    return Request.chat(sys, body, max_tokens=2 * len(order) + 5), [s.sb_active[i] for i in order]


def saebench_parse_predictions(text: str) -> list[int] | None:
    """SAEBench's parse_predictions: numbers separated by commas / 'and'; 'None' = none; else None."""
    parts = [p.strip() for p in text.strip().rstrip(".").replace("and", ",").replace("None", "").split(",")]
    parts = [p for p in parts if p]
    if not parts:
        return []
    if not all(p.isdigit() for p in parts):
        return None
    return [int(p) for p in parts]


def saebench_score(pred: list[int], active: list[bool]) -> float:
    return sum((i in pred) == a for i, a in enumerate(active, 1)) / len(active)


# --- running jobs and summarising ---------------------------------------------------------------------------


def run_jobs(jobs: list[Job], llm: LLM) -> list[list[Response]]:
    """All jobs' requests in one batched call (shared prefixes sit together in the local backend)."""
    flat = [r for j in jobs for r in j.requests]
    resp = llm.complete(flat)
    out, k = [], 0
    for j in jobs:
        out.append(resp[k:k + len(j.requests)])
        k += len(j.requests)
    return out


def summarize(job: Job, resp: list[Response], cfg: ScoreConfig, seed: int, logprobs_given: bool | None) -> dict:
    if job.scorer in ("detection", "fuzzing"):
        b = Binary()
        for (y, kind, source), r in zip(job.meta, resp, strict=True):
            pred, prob = yes_no(r)
            b.y.append(y)
            b.pred.append(pred)
            b.prob.append(prob)
            b.group.append(f"{kind}:{source}")
        out = b.summary(cfg.bootstrap, seed + job.latent, logprobs_given)
        out["answers"] = [(m[0], p, None if q is None else round(q, 4), m[1], m[2])
                          for m, p, q in zip(job.meta, b.pred, b.prob, strict=True)]
        return out
    if job.scorer == "discrimination":
        right, probs, fails = [], [], 0
        for truth, r in zip(job.meta, resp, strict=True):
            pred, prob = yes_no(r, yes=("1",), no=("2",))
            if pred is None:
                fails += 1
                continue
            right.append(float((pred == 1) == (truth == 1)))
            if prob is not None:
                probs.append(prob if truth == 1 else 1 - prob)
        return {"n": len(job.meta), "parse_failures": fails,
                "accuracy": float(np.mean(right)) if right else float("nan"),
                "p_correct": float(np.mean(probs)) if probs and len(probs) == len(right) else float("nan")}
    if job.scorer == "simulation":
        true, pred, fails = [], [], 0
        for w, r in zip(job.meta, resp, strict=True):
            p = parse_simulation(r.text, len(w.ids))
            if p is None:
                fails += 1
                p = [0.0] * len(w.ids)
            true += list(w.acts)  # Pearson r is scale-free: raw activations
            pred += p
        t, q = np.array(true), np.array(pred)
        r_ = float(np.corrcoef(t, q)[0, 1]) if t.std() > 0 and q.std() > 0 else float("nan")
        return {"n": len(job.meta), "parse_failures": fails, "pearson_r": r_,
                "constant_prediction": bool(q.std() == 0)}
    raise ValueError(f"unknown scorer {job.scorer!r}")


def embedding_scores(sets: dict[int, LatentSet], labels: dict[int, str], encoder, fmt: Formatter, n_boot: int,
                     seed: int) -> dict[int, dict]:
    """AUROC of cos(explanation, context) for held-out activating vs non-activating contexts, per latent."""
    out = {}
    for j, s in sets.items():
        wins = s.test + s.negatives + s.hard + s.similar
        y = np.array([1] * len(s.test) + [0] * (len(s.negatives) + len(s.hard) + len(s.similar)))
        e = encoder.encode([labels[j]] + [fmt.text(w) for w in wins])
        sim = (e[1:] @ e[0]).numpy().astype(np.float64)
        out[j] = {"n": len(wins), "auroc": auroc(y, sim), "auroc_ci95": stratified_ci(y, sim, auroc, n_boot,
                                                                                        seed + j)}
    return out
