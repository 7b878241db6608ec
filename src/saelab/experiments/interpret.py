"""`saelab interpret RUN --latents N`: auto-interpretation of a run directory's coder, with controls.

Pipeline (each piece in saelab/interp/, which knows nothing of run directories):
1. the examples pass over every latent (interp/examples.py), checkpointed in RUN/interp/;
2. N latents drawn (seeded) among those with enough activating contexts on both the
   explanation and the held-out side (or `latent_ids`), their decoder-nearest neighbours and
   logit lens (intervene/lens.py), and their example windows read in a second pass (interp/select.py);
3. explanations: the prompts of `explain.prompts` and a consensus merge (interp/explain.py),
   the token-list explainer and shuffled explanations (no LLM);
4. scores on held-out examples (interp/score.py) for the LLM labels of `score_labels` and,
   always, for the shuffled and token-list controls; label validation (interp/validate.py);
5. optionally the same pipeline on the randomized-model control's coder (experiments/control.py);
6. RUN/interp/interp.json (InterpretResult: one record per latent, scores averaged over
   latents with bootstrap CIs, the controls), RUN/interp/windows.json (every window shown or
   scored, with per-token activations, for pages) and one ledger row whose primary comparison
   is detection balanced accuracy of the real explanations vs shuffled ones, paired over latents.

`--compare RUN_B` interprets RUN_B the same way (same budget, same scorer) and records the
difference of their latents' mean scores (independent latents: an unpaired bootstrap).
Every LLM call goes through the on-disk cache, so a rerun costs nothing and a killed run resumes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from pydantic import Field

from saelab.config import StageConfig
from saelab.data.tokens import Positions
from saelab.device import describe, peak_memory_bytes, reset_peak
from saelab.evals.stats import compare, compare_independent, mean_ci
from saelab.experiments.control import ControlConfig, random_model_coder
from saelab.experiments.evaluate import EvalConfig, open_run
from saelab.hookpoints import HookPoint
from saelab.interp.embed import SentenceEncoder
from saelab.interp.examples import ExamplesConfig, collect_examples, read_windows
from saelab.interp.explain import ExplainConfig, Formatter, explain, shuffled, token_list_label
from saelab.interp.llm import LLM, LLMConfig, make_llm
from saelab.interp.score import (
    ScoreConfig,
    detection_job,
    discrimination_job,
    embedding_scores,
    fuzzing_job,
    run_jobs,
    saebench_gen_request,
    saebench_parse_explanation,
    saebench_parse_predictions,
    saebench_score,
    saebench_score_request,
    simulation_job,
    summarize,
)
from saelab.interp.select import (
    LatentSet,
    SamplingConfig,
    assemble,
    eligible,
    nearest_latents,
    plan,
)
from saelab.interp.validate import WEIGHTS, composite, cross_domain, decoder_direction
from saelab.intervene.lens import logit_lens
from saelab.io import read_json, sha256_file, write_json
from saelab.models.load import LoadedModel
from saelab.runs.ledger import check_ledger, record
from saelab.runs.results import Comparison, Estimate, InterpretCompareResult, InterpretResult
from saelab.runs.rundir import RunDir
from saelab.saes.base import SparseCoder, load_sae

CONTROLS = ("shuffled", "token_list")


class InterpretConfig(StageConfig):
    """Explain and score a run directory's latents, with the controls that show the scorer can fail."""

    run: str = Field(..., description="run directory holding checkpoint/")
    latents: int = Field(50, gt=0, description="latents to interpret, drawn (seeded) among those with enough "
                         "activating contexts")
    latent_ids: list[int] | None = Field(None, description="interpret exactly these latents instead")
    seed: int = 0
    model: str | None = Field(None, description="model override (default: the one the coder was trained on)")
    examples: ExamplesConfig = ExamplesConfig()
    sampling: SamplingConfig = SamplingConfig()
    explainer: LLMConfig = LLMConfig()
    scorer: LLMConfig | None = Field(None, description="the scorer LLM (default: the explainer's settings)")
    explain: ExplainConfig = ExplainConfig()
    score: ScoreConfig = ScoreConfig()
    score_labels: list[str] = Field(default_factory=lambda: ["default"],
                                    description="LLM labels scored (besides the shuffled and token-list controls, "
                                    "always scored): default, contrastive, activation_pattern, specificity, consensus")
    lens_k: int = Field(10, gt=0, description="top / bottom logit-lens tokens kept per latent")
    randomized_control: bool = Field(False, description="also interpret the randomized-model control's coder "
                                     "(trains it under RUN/control unless the eval control already did)")
    control: ControlConfig = ControlConfig()
    bootstrap: int = Field(1000, gt=0, description="bootstrap resamples for the CIs over latents")
    compare: str | None = Field(None, description="another run directory interpreted the same way and compared")
    out: str = Field("", description="results directory (default RUN/interp)")

    UNHASHED = StageConfig.UNHASHED | {"compare"}

    @property
    def scorer_cfg(self) -> LLMConfig:
        return self.scorer or self.explainer


DEFINITIONS = {
    "detection_balanced_accuracy": "(TPR + TNR) / 2 of the scorer's Yes/No answers on held-out contexts, one per "
                                   "prompt: activating (quantile sample) vs random, hard (neighbour-firing) and "
                                   "similar (nearest by sentence embedding) non-activating ones; parse failures left "
                                   "out and counted (delphi detection)",
    "detection_auroc": "AUROC of P(Yes) / (P(Yes) + P(No)) from the first answer token's top log-probabilities; "
                       "absent when the backend gives none",
    "fuzzing_balanced_accuracy": "held-out activating contexts with the truly activating tokens marked vs as many "
                                 "random other tokens marked; Yes/No: are the marked tokens the described ones "
                                 "(delphi fuzzing, fuzz_type=active)",
    "embedding_auroc": "AUROC of cos(embedding(explanation), embedding(context)) for held-out activating vs "
                       "non-activating contexts, all-MiniLM-L6-v2 (delphi embedding scorer)",
    "discrimination_accuracy": "pairs of a held-out context of the latent and one where a decoder-nearest neighbour "
                               "fires and it does not, order randomised: fraction where the scorer picks the "
                               "latent's own (chance 0.5)",
    "simulation_pearson_r": "Pearson r of predicted (0-10) vs true activations over the latent's simulated held-out "
                            "tokens concatenated (OpenAI automated-interpretability)",
    "saebench_score": "SAEBench autointerp: its generation prompt (10 top + 5 importance-sampled examples), scoring "
                      "of 2 top + 2 importance-sampled + 10 random held-out examples, fraction classified right",
    "saebench_floor": "what answering 'None' scores on the same examples: the inactive fraction (10/14)",
    "averaging": "every score is computed per latent and averaged over latents (the independent unit); CIs are "
                 "percentile bootstraps over latents; per-latent CIs bootstrap the latent's examples by class",
    "shuffled": "each latent scored with another latent's default explanation (a seeded derangement): must be near "
                "chance, showing the scorer can fail",
    "token_list": "no LLM: the latent's most frequent marked tokens over its explanation examples, as a label",
    "confidence": f"composite label confidence in [0, 1], weights {WEIGHTS}, each component mapped to [0, 1] above "
                  "chance; undefined components drop out and the weights are renormalised",
}


def _sides_ok(v) -> bool:
    return v is not None and isinstance(v, float | int) and math.isfinite(v)


# --- the pipeline on one coder --------------------------------------------------------------------------


def interpret_coder(cfg: InterpretConfig, sae: SparseCoder, loaded: LoadedModel, hp: HookPoint, positions: Positions,
                    ctx_len: int, out: Path, fingerprint: str, progress: bool = True,
                    llms: dict[str, LLM] | None = None, encoder: SentenceEncoder | None = None) -> dict[str, Any]:
    """Examples -> latents -> windows -> explanations -> scores for one coder; returns the pieces
    the result is built from (records, per-latent metrics, LLM stats, timings)."""
    t = {"start": time.perf_counter()}
    out.mkdir(parents=True, exist_ok=True)
    state = collect_examples(cfg.examples, sae, loaded, hp, positions, ctx_len, out / "examples.safetensors",
                             fingerprint, progress)
    t["examples"] = time.perf_counter()
    elig = eligible(state, cfg.sampling, cfg.seed)
    if cfg.latent_ids:
        bad = [j for j in cfg.latent_ids if j not in set(elig.tolist())]
        if bad:
            raise ValueError(f"latents {bad[:10]} do not have enough activating contexts in the examples pass "
                             f"({cfg.examples.tokens:,} tokens) to fill every band; raise examples.tokens or pick others")
        latents = sorted(cfg.latent_ids)
    else:
        if len(elig) == 0:
            raise ValueError(f"no latent fired in enough contexts of the examples pass ({state.tokens:,} tokens) to "
                             "fill every quantile band; raise examples.tokens")
        rng = np.random.default_rng(cfg.seed)
        latents = sorted(int(x) for x in rng.choice(elig.numpy(), size=min(cfg.latents, len(elig)), replace=False))
    W_dec = sae.W_dec.detach().cpu().float()
    alive_mask = state.fire_contexts >= cfg.sampling.contrast_examples + 2
    cos_ids, cos_vals = nearest_latents(W_dec * alive_mask[:, None], torch.tensor(latents), cfg.sampling.neighbours)
    neighbours = {j: cos_ids[i].tolist() for i, j in enumerate(latents)}
    neighbour_cos = {j: [round(v, 4) for v in cos_vals[i].tolist()] for i, j in enumerate(latents)}
    ll = logit_lens(loaded.model, W_dec[latents], cfg.lens_k)
    tok = loaded.tokenizer
    lens = {j: {"top": [tok.decode([x]) for x in ll.top_ids[i].tolist()],
                "top_scores": [round(v, 3) for v in ll.top_scores[i].tolist()],
                "bottom": [tok.decode([x]) for x in ll.bottom_ids[i].tolist()],
                "bottom_scores": [round(v, 3) for v in ll.bottom_scores[i].tolist()]} for i, j in enumerate(latents)}
    p = plan(state, latents, neighbours, cfg.sampling, cfg.seed)
    windows = read_windows(cfg.examples, sae, loaded, hp, positions, ctx_len, p.requests, progress)
    fmt = Formatter(tok, cfg.explain.threshold)
    encoder = encoder or SentenceEncoder()  # similar negatives, the embedding scorer, label agreement, decoder test
    sets = assemble(p, windows, neighbours, neighbour_cos, cfg.sampling, cfg.seed,
                    embed=lambda ws: encoder.encode([fmt.text(w) for w in ws]))
    t["windows"] = time.perf_counter()

    llms = llms or {}
    dev = str(loaded.device)
    explainer = llms.get("explainer")
    if explainer is None:
        explainer = make_llm(cfg.explainer, dev, _cache(cfg.explainer, out))
    scorer = llms.get("scorer")
    if scorer is None:
        scorer = explainer if cfg.scorer is None else make_llm(cfg.scorer_cfg, dev, _cache(cfg.scorer_cfg, out))
    exps = explain(sets, fmt, explainer, cfg.explain)
    labels: dict[str, dict[int, str]] = {}
    for name in {n for j in exps for n in exps[j]}:
        labels[name] = {j: exps[j][name].label for j in latents if name in exps[j]}
    default = labels.get("default") or next(iter(labels.values()))
    labels["token_list"] = {j: token_list_label(sets[j], fmt, cfg.explain.token_list) for j in latents}
    shuf = shuffled(default, cfg.seed)
    labels["shuffled"] = {j: lab for j, (lab, _) in shuf.items()}
    t["explain"] = time.perf_counter()

    scored = [n for n in cfg.score_labels if n in labels] + list(CONTROLS)
    sc = cfg.score
    jobs = []
    for name in scored:
        for j in latents:
            s, lab = sets[j], labels[name][j]
            if "detection" in sc.scorers:
                jobs.append(detection_job(s, lab, name, fmt, sc))
            if "fuzzing" in sc.scorers:
                jobs.append(fuzzing_job(s, lab, name, fmt, sc, cfg.seed))
            if "discrimination" in sc.scorers and s.hard:
                jobs.append(discrimination_job(s, lab, name, fmt, sc, cfg.seed))
            if "simulation" in sc.scorers and name in (cfg.score_labels[:1] + ["shuffled"]):
                jobs.append(simulation_job(s, lab, name, fmt, sc))
    responses = run_jobs(jobs, scorer)
    per: dict[str, dict[int, dict[str, Any]]] = {n: {j: {} for j in latents} for n in scored}
    for job, resp in zip(jobs, responses, strict=True):
        per[job.name][job.latent][job.scorer] = summarize(job, resp, sc, cfg.seed, scorer.gives_logprobs)
    if "embedding" in sc.scorers:
        for name in scored:
            for j, e in embedding_scores(sets, labels[name], encoder, fmt, sc.bootstrap, cfg.seed).items():
                per[name][j]["embedding"] = e
    t["score"] = time.perf_counter()

    saebench: dict[int, dict[str, Any]] = {}
    if "saebench" in sc.scorers:
        gen = explainer.complete([saebench_gen_request(sets[j], fmt) for j in latents])
        sb_labels = {j: saebench_parse_explanation(r.text) for j, r in zip(latents, gen, strict=True)}
        reqs = [saebench_score_request(sets[j], sb_labels[j], fmt, cfg.seed) for j in latents]
        got = scorer.complete([r for r, _ in reqs])
        for j, (_, active), r in zip(latents, reqs, got, strict=True):
            pred = saebench_parse_predictions(r.text)
            saebench[j] = {"explanation": sb_labels[j], "answer": r.text, "parsed": pred is not None,
                           "score": saebench_score(pred, active) if pred is not None else float("nan"),
                           "floor": saebench_score([], active), "n": len(active)}
    t["saebench"] = time.perf_counter()

    # validation
    dd = decoder_direction(default, {j: lens[j]["top"] for j in latents}, encoder)
    records = []
    for j in latents:
        s = sets[j]
        real = per.get(cfg.score_labels[0], {}).get(j, {}) if cfg.score_labels and cfg.score_labels[0] in per else {}
        xd = cross_domain(real.get("detection", {}).get("answers", []))
        parts = {"detection": real.get("detection", {}).get("balanced_accuracy"),
                 "fuzzing": real.get("fuzzing", {}).get("balanced_accuracy"),
                 "embedding": real.get("embedding", {}).get("auroc"),
                 "discrimination": real.get("discrimination", {}).get("accuracy"),
                 "decoder_direction": dd.get(j), "cross_domain": xd["consistency"]}
        conf, used = composite(parts)
        agree = _agreement([e.label for n, e in exps[j].items() if n != "consensus"], encoder)
        records.append({
            "latent": j,
            "density": float(state.density()[j]), "mean_activation": float(state.mean_activation()[j]),
            "max_activation": float(state.act_max[j]), "fire_contexts": int(state.fire_contexts[j]),
            "explanations": {n: {"label": e.label, "parsed": e.parsed, "raw": e.raw} for n, e in exps[j].items()},
            "label_agreement": agree,
            "token_list": labels["token_list"][j], "shuffled_from": shuf[j][1],
            "scores": {n: _strip(per[n][j]) for n in scored},
            "saebench": saebench.get(j),
            "validation": {"decoder_direction": dd.get(j), "cross_domain": xd, "discrimination":
                           parts["discrimination"], "confidence": conf, "confidence_weights": used},
            "neighbours": s.neighbours, "neighbour_cosines": s.neighbour_cos,
            "logit_lens": lens[j],
            "domains": _domains(s),
            "examples": {"explain": len(s.explain), "test": len(s.test), "negatives": len(s.negatives),
                         "hard_negatives": len(s.hard), "similar_negatives": len(s.similar)},
        })
    t["end"] = time.perf_counter()
    return {"state": state, "latents": latents, "eligible": int(len(elig)), "records": records, "per": per,
            "labels": labels, "sets": sets, "saebench": saebench, "fmt": fmt, "exps": exps,
            "llm": _llm_stats(explainer, scorer, cfg), "encoder": encoder, "llms": {"explainer": explainer,
                                                                                   "scorer": scorer},
            "wall": {k: round(t[k] - t[prev], 2) for prev, k in zip(list(t)[:-1], list(t)[1:], strict=True)} |
            {"total": round(t["end"] - t["start"], 2)}}


def _cache(llm_cfg: LLMConfig, out: Path) -> str | None:
    if llm_cfg.cache.lower() == "none":
        return None
    return llm_cfg.cache or str(out / "llm_cache.sqlite")


def _strip(scores: dict[str, Any]) -> dict[str, Any]:
    """A latent's scores without the long per-example answers (kept in windows.json)."""
    return {k: {m: v for m, v in d.items() if m != "answers"} for k, d in scores.items()}


def _agreement(labels: list[str], encoder: SentenceEncoder) -> float:
    """Mean pairwise cosine of the prompts' labels (1: they all say the same)."""
    if len(labels) < 2:
        return float("nan")
    e = encoder.encode(labels)
    sim = (e @ e.t()).numpy()
    iu = np.triu_indices(len(labels), 1)
    return float(sim[iu].mean())


def _domains(s: LatentSet) -> dict[str, int]:
    out: dict[str, int] = {}
    for w in s.explain + s.test:
        out[w.source or "?"] = out.get(w.source or "?", 0) + 1
    return out


def _llm_stats(explainer: LLM, scorer: LLM, cfg: InterpretConfig) -> dict[str, Any]:
    def one(llm: LLM, c: LLMConfig) -> dict[str, Any]:
        d = {"backend": c.backend, "model": c.model, "identity": llm.identity,
             "gives_logprobs": llm.gives_logprobs}
        if hasattr(llm, "stats"):
            d |= dict(llm.stats) | {"cache": str(llm.path), "hit_rate": llm.hit_rate()}
        return d
    out = {"explainer": one(explainer, cfg.explainer)}
    out["scorer"] = out["explainer"] if scorer is explainer else one(scorer, cfg.scorer_cfg)
    if scorer.gives_logprobs is False:
        fall = [f"{s}_auroc" for s in ("detection", "fuzzing") if s in cfg.score.scorers]
        fall += ["discrimination P(correct)"] if "discrimination" in cfg.score.scorers else []
        out["fallback"] = (f"the scorer backend gave no log-probabilities: {', '.join(fall) or 'nothing'} not computed; "
                           "detection and fuzzing report balanced accuracy, discrimination accuracy")
        out["fallback_scores"] = fall
    return out


# --- summarising over latents ---------------------------------------------------------------------------


METRICS = {"detection": ("balanced_accuracy", "auroc"), "fuzzing": ("balanced_accuracy", "auroc"),
           "embedding": ("auroc",), "discrimination": ("accuracy",), "simulation": ("pearson_r",)}


def values(core: dict[str, Any], name: str, scorer: str, metric: str) -> dict[int, float]:
    out = {}
    for j in core["latents"]:
        v = core["per"].get(name, {}).get(j, {}).get(scorer, {}).get(metric)
        if _sides_ok(v):
            out[j] = float(v)
    return out


def estimates(core: dict[str, Any], n_boot: int, seed: int) -> dict[str, dict[str, Estimate]]:
    out: dict[str, dict[str, Estimate]] = {}
    for name in core["per"]:
        out[name] = {}
        for scorer, metrics in METRICS.items():
            for m in metrics:
                v = values(core, name, scorer, m)
                if v:
                    out[name][f"{scorer}_{m}"] = mean_ci(np.array(list(v.values())), n_boot, seed)
    sb = core["saebench"]
    if sb:
        first = next(iter(out)) if out else "default"
        for k in ("score", "floor"):
            v = np.array([d[k] for d in sb.values() if _sides_ok(d[k])])
            if v.size:
                out.setdefault(first, {})[f"saebench_{k}"] = mean_ci(v, n_boot, seed)
    return out


def paired(core: dict[str, Any], a: str, b: str, scorer: str, metric: str, n_boot: int, seed: int,
           sides: str) -> Comparison | None:
    va, vb = values(core, a, scorer, metric), values(core, b, scorer, metric)
    common = sorted(set(va) & set(vb))
    if len(common) < 2:
        return None
    x, y = np.array([va[j] for j in common]), np.array([vb[j] for j in common])
    ones = np.ones_like(x)
    return compare((x, ones), (y, ones), n_boot, seed, unit="latent", sides=sides)


def comparisons(core: dict[str, Any], real: str, n_boot: int, seed: int) -> dict[str, Comparison]:
    out = {}
    pairs = [(real, "shuffled", "real_vs_shuffled"), ("token_list", "shuffled", "token_list_vs_shuffled"),
             (real, "token_list", "real_vs_token_list")]
    for scorer, metrics in METRICS.items():
        for m in metrics:
            for a, b, tag in pairs:
                c = paired(core, a, b, scorer, m, n_boot, seed,
                           f"a = {a} explanations, b = {b} explanations; the same latents and held-out examples")
                if c is not None:
                    out[f"{scorer}{'' if m in ('balanced_accuracy', 'accuracy') else '_' + m}_{tag}"] = c
    return out


def parse_failures(core: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"explanations": {}, "scorers": {}}
    for e in core["exps"].values():
        for name, x in e.items():
            d = out["explanations"].setdefault(name, {"failed": 0, "of": 0})
            d["of"] += 1
            d["failed"] += int(not x.parsed)
    for name, by_lat in core["per"].items():
        for scores in by_lat.values():
            for scorer, d in scores.items():
                if "parse_failures" in d:
                    agg = out["scorers"].setdefault(f"{name}/{scorer}", {"failed": 0, "of": 0})
                    agg["failed"] += d["parse_failures"]
                    agg["of"] += d["n"]
    if core["saebench"]:
        out["scorers"]["saebench"] = {"failed": sum(not d["parsed"] for d in core["saebench"].values()),
                                      "of": len(core["saebench"])}
    return out


def windows_file(core: dict[str, Any], tokenizer) -> dict[str, Any]:
    """Every window of every interpreted latent with token strings and activations (for pages)."""
    fmt = core["fmt"]

    def w(x):
        return {"ctx": x.ctx, "start": x.start, "center": x.center, "source": x.source, "ids": x.ids,
                "tokens": fmt.strs(x.ids), "acts": [round(a, 5) for a in x.acts]}
    out = {}
    for j, s in core["sets"].items():
        answers = {n: {sc: d.get("answers") for sc, d in core["per"][n][j].items() if "answers" in d}
                   for n in core["per"]}
        out[str(j)] = {"explain": [w(x) | {"band": b} for x, b in zip(s.explain, s.explain_band, strict=True)],
                       "test": [w(x) | {"band": b} for x, b in zip(s.test, s.test_band, strict=True)],
                       "negatives": [w(x) for x in s.negatives],
                       "hard_negatives": [w(x) | {"neighbour": b} for x, b in zip(s.hard, s.hard_from, strict=True)],
                       "similar_negatives": [w(x) for x in s.similar],
                       "top": [w(x) for x in s.top], "answers": answers}
    return out


# --- the stage ---------------------------------------------------------------------------------------------


def examples_fingerprint(examples: ExamplesConfig, run: RunDir, model_name: str, ctx_len: int) -> str:
    """What an examples pass is (settings, coder weights, model, context length): a checkpointed
    state is resumed or reused, by interpret and the dashboard alike, only for the same one."""
    ck = run.checkpoint_dir / "sae.safetensors"
    return f"{examples.hash()}:{sha256_file(ck)[:16] if ck.is_file() else '?'}:{model_name}:{ctx_len}"


def interpret(cfg: InterpretConfig, loaded: LoadedModel | None = None, progress: bool = True,
              llms: dict[str, LLM] | None = None) -> InterpretResult:
    """Interpret cfg.run's coder (reusing RUN/interp/interp.json when made with the same config) and record it."""
    check_ledger(cfg, cfg.run)
    result = _interpret_run(cfg, loaded, progress, llms)
    if cfg.compare:
        compare_runs(cfg, result, loaded, progress, llms)
    return result


def _interpret_run(cfg: InterpretConfig, loaded: LoadedModel | None, progress: bool,
                   llms: dict[str, LLM] | None) -> InterpretResult:
    o = open_run(SimpleNamespace(run=cfg.run, model=cfg.model, dtype=cfg.examples.dtype, device=cfg.device), loaded)
    out = Path(cfg.out or o.run.path / "interp")
    path = out / "interp.json"
    if path.is_file():
        data = read_json(path)
        if cfg.same_work(data.get("config")):
            try:
                stored = InterpretResult.model_validate(data)
                record(stored, o.run.path, cfg, result_file=path)
                return stored
            except ValueError:
                pass
    reset_peak(o.loaded.device)
    ctx_len = cfg.examples.ctx_len or o.meta.get("ctx_len") or 128
    fp = examples_fingerprint(cfg.examples, o.run, o.model_name, ctx_len)
    core = interpret_coder(cfg, o.sae, o.loaded, o.hp, o.positions, ctx_len, out, fp, progress, llms)
    real = cfg.score_labels[0] if cfg.score_labels else "default"
    scores = estimates(core, cfg.bootstrap, cfg.seed)
    paired_cmp = comparisons(core, real, cfg.bootstrap, cfg.seed)
    controls: dict[str, Any] = {n: {"scores": scores.get(n, {})} for n in CONTROLS}
    controls["shuffled"]["what"] = DEFINITIONS["shuffled"]
    controls["token_list"]["what"] = DEFINITIONS["token_list"]
    wall = dict(core["wall"])
    if cfg.randomized_control:
        t0 = time.perf_counter()
        controls["randomized_model"] = _randomized(cfg, o, core, ctx_len, out, progress, real)
        wall["randomized_control"] = round(time.perf_counter() - t0, 2)
    else:
        controls["randomized_model"] = {"run": False, "why": "not asked for (--set randomized_control=true)"}
    conf = np.array([r["validation"]["confidence"] for r in core["records"]
                     if _sides_ok(r["validation"]["confidence"])])
    dd = np.array([r["validation"]["decoder_direction"] for r in core["records"]
                   if _sides_ok(r["validation"]["decoder_direction"])])
    xd = np.array([r["validation"]["cross_domain"]["consistency"] for r in core["records"]
                   if _sides_ok(r["validation"]["cross_domain"]["consistency"])])
    validation = {k: mean_ci(v, cfg.bootstrap, cfg.seed) for k, v in
                  (("confidence", conf), ("decoder_direction", dd), ("cross_domain_consistency", xd)) if v.size}
    st = core["state"]
    wall["total"] = round(sum(v for k, v in wall.items() if k != "total"), 2)
    result = InterpretResult(
        run=str(o.run.path), model=o.model_name, hook=str(o.hp), seed=cfg.seed, width=o.sae.cfg.width,
        n_latents=len(core["latents"]), eligible_latents=core["eligible"],
        examples={"tokens": st.tokens, "contexts": st.contexts, "latents_firing": int((st.fire_contexts > 0).sum()),
                  "text": cfg.examples.text, "split": cfg.examples.split, "ctx_len": ctx_len,
                  "excluded": st.excluded},
        latents=core["records"], scores=scores, paired=paired_cmp, controls=controls, validation=validation,
        llm=core["llm"], parse_failures=parse_failures(core), definitions=DEFINITIONS, wall_seconds=wall,
        device=describe(o.loaded.device), peak_memory_bytes=peak_memory_bytes(o.loaded.device),
        config=cfg.model_dump(mode="json"))
    write_json(out / "windows.json", windows_file(core, o.loaded.tokenizer))
    result.write(path)
    record(result, o.run.path, cfg, result_file=path)
    return result


def _randomized(cfg: InterpretConfig, o, core: dict[str, Any], ctx_len: int, out: Path, progress: bool,
                real: str) -> dict[str, Any]:
    """The same pipeline on the randomized-model control's coder; its latents' scores vs the real ones
    (independent latents: unpaired bootstrap)."""
    ecfg = EvalConfig(run=str(o.run.path), control=cfg.control, ledger=cfg.ledger, device=cfg.device,
                      text=cfg.examples.text, ctx_len=ctx_len)
    rand, rand_run, took = random_model_coder(ecfg, o.sae, o.meta, o.loaded, o.hp, o.positions, progress)
    rand_sae, _ = load_sae(rand_run.checkpoint_dir)
    rand_sae = rand_sae.to(rand.device).eval()
    rcfg = cfg.model_copy(update={"latent_ids": None})
    fp = f"random:{examples_fingerprint(cfg.examples, RunDir(rand_run.path), rand.name, ctx_len)}"
    rcore = interpret_coder(rcfg, rand_sae, rand, o.hp, o.positions, ctx_len, out / "randomized", fp, progress,
                            core["llms"], core["encoder"])
    sides = "a = the real model's coder's latents, b = the randomized model's coder's latents"
    gaps = {}
    for scorer, metrics in METRICS.items():
        for m in metrics:
            a, b = values(core, real, scorer, m), values(rcore, real, scorer, m)
            if a and b:
                gaps[f"{scorer}_{m}"] = compare_independent(np.array(list(a.values())), np.array(list(b.values())),
                                                            cfg.bootstrap, cfg.seed, unit="latent", sides=sides)
    primary = gaps.get("detection_balanced_accuracy")
    return {"run": True, "random_run": str(rand_run.path), "n_latents": len(rcore["latents"]),
            "eligible_latents": rcore["eligible"], "seconds": took | rcore["wall"],
            "scores": estimates(rcore, cfg.bootstrap, cfg.seed).get(real, {}),
            "gaps": {k: g.model_dump() for k, g in gaps.items()},
            **({"comparison": primary.model_dump()} if primary is not None else {}),
            "latents": [{k: r[k] for k in ("latent", "explanations", "scores", "token_list")} for r in rcore["records"]]}


def compare_runs(cfg: InterpretConfig, a: InterpretResult, loaded: LoadedModel | None, progress: bool,
                 llms: dict[str, LLM] | None) -> InterpretCompareResult:
    """Interpret cfg.compare the same way and record both sides, the differences and their CIs."""
    t0 = time.perf_counter()
    b_cfg = cfg.model_copy(update={"run": cfg.compare, "compare": None, "ledger_id": None, "out": ""})
    b = _interpret_run(b_cfg, loaded, progress, llms)
    real = cfg.score_labels[0] if cfg.score_labels else "default"
    sides = f"a = {a.run}, b = {b.run}: each side's latents, the same budget and scorer"
    gaps = {}
    for scorer, metrics in METRICS.items():
        for m in metrics:
            va = [r["scores"].get(real, {}).get(scorer, {}).get(m) for r in a.latents]
            vb = [r["scores"].get(real, {}).get(scorer, {}).get(m) for r in b.latents]
            va, vb = [v for v in va if _sides_ok(v)], [v for v in vb if _sides_ok(v)]
            if va and vb:
                gaps[f"{scorer}_{m}"] = compare_independent(np.array(va), np.array(vb), cfg.bootstrap, cfg.seed,
                                                            unit="latent", sides=sides)
    run_a = RunDir(a.run)
    res = InterpretCompareResult(run_a=a.run, run_b=b.run, model=a.model, hook=a.hook, seed=cfg.seed,
                                 n_latents={"a": a.n_latents, "b": b.n_latents}, sides=sides, gaps=gaps,
                                 wall_seconds=round(time.perf_counter() - t0, 2), config=cfg.model_dump(mode="json"))
    name = Path(b.run).name
    path = Path(cfg.out or run_a.path / "interp") / f"compare-{name}.json"
    res.write(path)
    record(res, run_a.path, cfg, result_file=path, ledger_id=f"{cfg.ledger_id}-compare" if cfg.ledger_id else "")
    return res
