"""Sparse probing (Gurnee et al. 2023; SAEBench's sparse_probing eval) on labelled tasks.

For each task the model reads every example (BOS first, as the SAE was trained; cut to
max_tokens), the hook's activations and the SAE's latents are mean-pooled over the example's
kept tokens (BOS, padding and special tokens excluded). Multi-class tasks become one binary
task per class (class vs the rest, negatives subsampled to balance, seeded). On the train
split the top-k features by |mean(positive) - mean(negative)| are chosen and a logistic
regression is fitted on them; accuracy is measured on the test split (pooled over the
one-vs-rest problems). The same is done on the top-k residual-stream channels, and with all
latents / the full residual. Each SAE-vs-residual comparison is paired on the same test
examples and carries a bootstrap 95% CI (saelab.evals.stats).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from pydantic import Field
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from saelab.config import Config
from saelab.data.tasks import (
    BUILTINS,
    TaskData,
    TaskSpec,
    builtin_available,
    builtin_spec,
    load_task,
    task_summary,
)
from saelab.data.tokens import Positions
from saelab.evals.probe_features import kept_batches
from saelab.evals.stats import compare
from saelab.hookpoints import HookPoint
from saelab.models.load import LoadedModel
from saelab.runs.results import Comparison, ProbingResult, ProbingTask
from saelab.saes.base import SparseCoder


class ProbingConfig(Config):
    """Sparse probing (SAEBench): top-k latents by class-mean difference, then logistic regression."""

    tasks: list[str | TaskSpec] = Field(
        default_factory=lambda: ["sentiment", "pos", "code_vs_prose", "stage_direction", "play_genre",
                                 "text_source", "language_id"],
        description="built-in task names or TaskSpec mappings (a built-in whose source is not fetched is skipped)")
    ks: list[int] = Field(default_factory=lambda: [1, 2, 5, 10, 20])
    max_tokens: int = Field(32, ge=2, description="tokens per example (longer texts are cut)")
    batch_size: int = Field(32, gt=0)
    max_per_class: int | None = Field(200, description="override every task's max_per_class (None: each task's own)")
    bootstrap: int = Field(1000, gt=0, description="bootstrap resamples for CIs")



@torch.no_grad()
def pooled_features(texts: list[str], loaded: LoadedModel, hp: HookPoint, sae: SparseCoder | None,
                    max_tokens: int, batch_size: int, positions: Positions, pool: str = "mean",
                    progress: bool = False, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example activations x [n, d] and SAE latents z [n, width] (None without an SAE), on the
    CPU, mean-pooled over the kept tokens (the coder's `positions`; pool="mean") or taken at the last
    kept token (pool="last")."""
    xs, zs = [], []
    for acts, keep, _ in kept_batches(texts, loaded, hp, positions, max_tokens, batch_size, progress, desc):
        if pool == "last":  # the last kept position of each row
            pos = torch.arange(keep.shape[1], device=keep.device).expand_as(keep).masked_fill(~keep, -1).max(1).values
            keep = torch.zeros_like(keep)
            keep[torch.arange(keep.shape[0], device=keep.device), pos] = True
        w = keep.float() / keep.sum(1, keepdim=True).clamp_min(1)  # [B, T] pooling weights
        xs.append(torch.einsum("bt,btd->bd", w, acts).cpu())
        if sae is not None:
            flat = acts[keep]  # [tokens, d]
            z = sae.encode(flat)  # [tokens, width]
            row = keep.nonzero()[:, 0]
            pooled = z.new_zeros(keep.shape[0], z.shape[1]).index_add_(0, row, z * w[keep][:, None])
            zs.append(pooled.cpu())
    return torch.cat(xs), (torch.cat(zs) if sae is not None else None)


def top_k_by_mean_diff(feats: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k features with the largest |mean over y=1 - mean over y=0| (SAEBench)."""
    diff = np.abs(feats[y == 1].mean(0) - feats[y == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def fit_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0,
                balanced: bool = False) -> np.ndarray:
    """Standardise, fit L2 logistic regression on train (balanced: class-weighted), predict test labels."""
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=1000, random_state=seed, class_weight="balanced" if balanced else None)
    clf.fit(scaler.transform(train_x), train_y)
    return clf.predict(scaler.transform(test_x))


def one_vs_rest(labels: np.ndarray, test: np.ndarray, n_classes: int, seed: int):
    """Balanced binary problems (chance = 50%), one per class (one problem for two classes):
    yields (class index, train indices, train y, test indices, test y)."""
    rng = np.random.default_rng(seed)
    classes = [1] if n_classes == 2 else range(n_classes)
    for c in classes:
        out = []
        for split in (~test, test):
            pos = np.flatnonzero(split & (labels == c))
            neg = np.flatnonzero(split & (labels != c))
            n = min(len(pos), len(neg))  # as many negatives as positives, and vice versa
            pos, neg = rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)
            idx = np.concatenate([pos, neg])
            out += [idx, (labels[idx] == c).astype(int)]
        yield c, *out


def probe_correct(feats: np.ndarray, data: TaskData, k: int | None, seed: int = 0) -> np.ndarray:
    """Per test example correctness [units] of a top-k (k=None: all features) probe, pooled over
    the one-vs-rest problems in a fixed order, so two feature sets share the same units."""
    out = []
    for _, tr, ytr, te, yte in one_vs_rest(data.labels, data.test, len(data.classes), seed):
        cols = top_k_by_mean_diff(feats[tr], ytr, k) if k is not None else slice(None)
        out.append(fit_predict(feats[tr][:, cols], ytr, feats[te][:, cols], seed) == yte)
    return np.concatenate(out).astype(np.float64)


def sparse_probe_task(x: np.ndarray, z: np.ndarray, data: TaskData, ks: list[int], n_boot: int,
                      seed: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Accuracies of SAE top-k / all latents and residual top-k / full residual on one task, and
    each method's per-test-example correctness. x: [n, d] residual; z: [n, width] latents."""
    c = {f"sae_k{k}": probe_correct(z, data, k, seed) for k in ks}
    c["sae_all"] = probe_correct(z, data, None, seed)
    c |= {f"resid_k{k}": probe_correct(x, data, k, seed) for k in ks}
    c["resid_full"] = probe_correct(x, data, None, seed)
    comparisons = probe_comparisons(c, ks, n_boot, seed)
    return ({"accuracy": {m: float(v.mean()) for m, v in c.items()}, "comparisons": comparisons,
             "test_examples": int(c["sae_all"].shape[0]), "comparison_sides": SIDES}, c)


SIDES = "a = SAE latents, b = residual stream"


def probe_comparisons(c: dict[str, np.ndarray], ks: list[int], n_boot: int, seed: int) -> dict[str, Comparison]:
    """SAE top-k vs residual top-k, all latents vs the full residual, SAE top-k vs the full residual:
    paired on the same test examples (c: method -> per-example correctness)."""
    ones = np.ones_like(c["sae_all"])

    def cmp(a: str, b: str) -> Comparison:
        return compare((c[a], ones), (c[b], ones), n_boot, seed, unit="test example", sides=SIDES)

    comparisons = {f"k{k}": cmp(f"sae_k{k}", f"resid_k{k}") for k in ks}
    comparisons["all"] = cmp("sae_all", "resid_full")
    comparisons |= {f"k{k}_vs_resid_full": cmp(f"sae_k{k}", "resid_full") for k in ks}
    return comparisons


def resolve_tasks(tasks: list[str | TaskSpec], max_per_class: int | None = None
                  ) -> tuple[list[TaskSpec], dict[str, str]]:
    """Task names/specs -> specs; built-ins whose source is not fetched are skipped (reason given)."""
    specs, skipped = [], {}
    for t in tasks:
        if isinstance(t, str):
            if t not in BUILTINS:
                raise ValueError(f"unknown probing task {t!r}: built-in tasks are {', '.join(BUILTINS)}; "
                                 "or give a mapping with name/source/text_field/label_field")
            if not builtin_available(t):
                skipped[t] = (f"source not fetched ({', '.join(BUILTINS[t].assets)}); run `saelab data fetch`")
                continue
            t = builtin_spec(t)
        if max_per_class is not None:
            t = t.model_copy(update={"max_per_class": max_per_class})
        specs.append(t)
    return specs, skipped


def sparse_probing(cfg: ProbingConfig, sae: SparseCoder, loaded: LoadedModel, hp: HookPoint, positions: Positions,
                   progress: bool = True, seed: int = 0) -> ProbingResult:
    """Sparse probing over every task in cfg.tasks: per task accuracies and comparisons, and the
    same comparisons pooled over every task's test examples (the ledger's headline)."""
    specs, skipped = resolve_tasks(cfg.tasks, cfg.max_per_class)
    results, pooled = {}, {}
    for spec in specs:
        t0 = time.perf_counter()
        data = load_task(spec)
        x, z = pooled_features(data.texts, loaded, hp, sae, cfg.max_tokens, cfg.batch_size, positions,
                               progress=progress, desc=f"probe {spec.name}")
        r, correct = sparse_probe_task(x.numpy(), z.numpy(), data, cfg.ks, cfg.bootstrap, seed)
        results[spec.name] = ProbingTask(**task_summary(data), source=data.source, **r,
                                         wall_seconds=round(time.perf_counter() - t0, 2))
        for m, v in correct.items():
            pooled.setdefault(m, []).append(v)
    if not results:
        raise ValueError(f"no probing task could run: {skipped or 'the task list is empty'}")
    pooled_cmp = probe_comparisons({m: np.concatenate(v) for m, v in pooled.items()}, cfg.ks, cfg.bootstrap, seed)
    return ProbingResult(
        tasks=results, skipped=skipped, ks=cfg.ks,
        pooled={k: v for k, v in pooled_cmp.items() if "_vs_" not in k}, seed=seed,
        method="SAEBench sparse probing: top-k by |class-mean difference| on train, logistic regression, test "
               "accuracy pooled over balanced one-vs-rest problems; features mean-pooled over the kept tokens; "
               "'pooled' puts every task's test examples together (bootstrap over examples)")
