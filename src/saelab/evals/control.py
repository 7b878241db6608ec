"""Randomized-model control (Heap et al. 2025, "Sparse autoencoders can interpret randomly
initialized transformers"): the same pipeline, harvest -> train -> core eval, on a copy of the
model whose weights are re-initialised (seeded), with the real run's harvest and training
configs at the control's (smaller) token budgets. The report gives real-minus-random, each
paired on the same units with a bootstrap 95% CI: explained variance over the same
validation contexts, and sparse-probing accuracy over the same test examples.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.activations.harvest import harvest
from saelab.config import EvalConfig, HarvestConfig, TrainConfig
from saelab.data.tasks import load_task
from saelab.evals.core import _validation_batches, evaluate, reconstruction_metrics
from saelab.evals.probing import pooled_features, probe_correct, resolve_tasks
from saelab.evals.stats import compare
from saelab.io import read_json
from saelab.models.hooks import HookPoint
from saelab.models.load import LoadedModel
from saelab.runs.rundir import RunDir
from saelab.saes.base import SparseCoder, load_sae
from saelab.train.trainer import train


@torch.no_grad()
def randomized_copy(loaded: LoadedModel, seed: int) -> LoadedModel:
    """A deep copy of the model with every weight re-initialised: matrices ~ N(0, initializer_range),
    norm scales 1, biases 0 (the architecture's own init recipe); same tokenizer."""
    model = copy.deepcopy(loaded.model)
    g = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()
    return LoadedModel(model, loaded.tokenizer, f"randomized:{loaded.name}:seed{seed}",
                       f"{loaded.source}, weights re-initialised with seed {seed}")


def _ev_units(sae, loaded, hp, cfg: EvalConfig, prepend_bos: bool, tokens: int):
    units: dict[str, list] = {"sse": [], "sumsq": [], "sum": [], "n": []}
    m = reconstruction_metrics(sae, loaded, hp, _validation_batches(cfg, loaded, prepend_bos), tokens, False,
                               units=units)
    mu = torch.stack(units["sum"]).sum(0) / sum(units["n"])  # [d] mean over all eval tokens
    n = np.array(units["n"], dtype=np.float64)
    s = torch.stack(units["sum"])  # [contexts, d]
    tv = np.array(units["sumsq"]) - 2 * (s @ mu).numpy() + n * float(mu @ mu)  # sum ||x - mu||^2 per context
    return m, np.array(units["sse"]), tv


def randomized_control(cfg: EvalConfig, sae: SparseCoder, meta: dict[str, Any], loaded: LoadedModel,
                       hp: HookPoint, prepend_bos: bool, progress: bool = True) -> dict[str, Any]:
    c = cfg.control
    run = RunDir(cfg.run)
    out = Path(c.out or run.path / "control")
    t0 = time.perf_counter()
    rand = randomized_copy(loaded, c.seed)
    store_manifest = Path(meta.get("store") or "") / "manifest.json"
    hdata = read_json(store_manifest)["config"] if store_manifest.is_file() else {}
    hcfg = HarvestConfig(**{**hdata, "model": rand.name, "hook": str(hp), "tokens": c.harvest_tokens,
                            "out": str(out / "store")})
    store = harvest(hcfg, loaded=rand, progress=progress)
    t1 = time.perf_counter()
    tdata = TrainConfig.load(run.config_file).model_dump() if run.config_file.is_file() else {}
    tdata.update(store=str(store.path), runs_dir=str(out), name="sae", tokens=c.train_tokens, smoke=False)
    tdata.setdefault("sae", sae.cfg.model_dump())
    rand_run = train(TrainConfig(**tdata), progress=progress)
    t2 = time.perf_counter()
    rand_cfg = cfg.model_copy(update={"run": str(rand_run.path), "model": rand.name, "tokens": c.tokens,
                                      "ce_tokens": c.ce_tokens, "suite": ["core"]})
    rand_core = evaluate(rand_cfg, loaded=rand, progress=progress)
    rand_sae, _ = load_sae(rand_run.checkpoint_dir)
    rand_sae.eval()
    t3 = time.perf_counter()
    _, sse_r, tv_r = _ev_units(sae, loaded, hp, cfg, prepend_bos, c.tokens)
    _, sse_x, tv_x = _ev_units(rand_sae, rand, hp, cfg, prepend_bos, c.tokens)
    gaps = {"explained_variance": compare((sse_r, tv_r), (sse_x, tv_x), cfg.probing.bootstrap, c.seed,
                                          one_minus=True, unit="validation context")}
    specs, skipped = resolve_tasks(c.probing_tasks, cfg.probing.max_per_class)
    for spec in specs:
        data = load_task(spec)
        accs = []
        for model, coder in ((loaded, sae), (rand, rand_sae)):
            _, z = pooled_features(data.texts, model, hp, coder, cfg.probing.max_tokens, cfg.probing.batch_size,
                                   prepend_bos)
            accs.append(probe_correct(z.numpy(), data, c.probing_k, cfg.seed))
        ones = np.ones_like(accs[0])
        gaps[f"probing_{spec.name}_k{c.probing_k}"] = compare((accs[0], ones), (accs[1], ones),
                                                              cfg.probing.bootstrap, c.seed, unit="test example")
    t4 = time.perf_counter()
    return {
        "comparison_sides": "a = real model's SAE, b = randomized model's SAE; diff = real - random",
        "gaps": gaps, "probing_skipped": skipped, "random_run": str(rand_run.path),
        "random_core": {k: rand_core[k] for k in ("explained_variance", "l0", "dead_fraction", "ce_clean", "ce_sae",
                                                  "ce_zero", "ce_loss_recovered", "kl_to_clean", "eval_tokens")},
        "budget": {"harvest_tokens": c.harvest_tokens, "train_tokens": c.train_tokens, "eval_tokens": c.tokens,
                   "ce_tokens": c.ce_tokens},
        "wall_seconds": {"harvest": round(t1 - t0, 2), "train": round(t2 - t1, 2), "eval_random": round(t3 - t2, 2),
                         "compare": round(t4 - t3, 2), "total": round(t4 - t0, 2)},
    }
