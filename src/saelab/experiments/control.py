"""Randomized-model control (Heap et al. 2025, "Sparse autoencoders can interpret randomly
initialized transformers"): the same pipeline, harvest -> train -> core eval, on a copy of the
model whose weights are re-initialised (seeded), with the real run's harvest and training
settings at the control's (smaller) token budgets. The report gives real-minus-random, each
paired on the same units with a bootstrap 95% CI: explained variance over the same
validation contexts, and sparse-probing accuracy over the same test examples.

Works for a run trained from a store and for one trained on the fly (`train-fly`): the
settings come from the SAE's checkpoint (hook, positions, context length) and whichever
training config the run directory holds.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import Field

from saelab.activations.harvest import HarvestConfig, harvest
from saelab.config import Config, read_yaml
from saelab.data.tasks import TaskSpec, load_task
from saelab.data.tokens import Positions
from saelab.evals.core import core_eval, ev_units
from saelab.evals.probing import pooled_features, probe_correct, resolve_tasks
from saelab.evals.stats import compare
from saelab.hookpoints import HookPoint
from saelab.io import read_json
from saelab.models.load import LoadedModel
from saelab.runs.ledger import record
from saelab.runs.results import ControlResult, CoreResult
from saelab.runs.rundir import RunDir
from saelab.saes.base import SparseCoder, load_sae
from saelab.train.trainer import OptimFields, TrainConfig, train

if TYPE_CHECKING:
    from saelab.experiments.evaluate import EvalConfig


class ControlConfig(Config):
    """Randomized-model control: harvest -> train -> eval on a copy with re-initialised weights."""

    harvest_tokens: int = Field(60_000, gt=0)
    train_tokens: int = Field(240_000, gt=0)
    tokens: int = Field(8192, gt=0, description="validation tokens for reconstruction metrics (both models)")
    ce_tokens: int = Field(2048, gt=0, description="validation tokens for the random SAE's CE / KL")
    probing_tasks: list[str | TaskSpec] = Field(default_factory=lambda: ["sentiment", "code_vs_prose"],
                                                description="tasks for the real-vs-random sparse-probing gap")
    probing_k: int = Field(5, gt=0, description="k of the sparse probe compared")
    batch_size: int | None = Field(None, gt=0, description="training batch of the random model's SAE (default: the "
                                   "real run's own, or 4096 for a checkpoint without a training config)")
    seed: int = 0
    out: str = Field("", description="where the control's store and run go (default <run>/control)")


@torch.no_grad()
def randomized_copy(loaded: LoadedModel, seed: int) -> LoadedModel:
    """A deep copy of the model with every weight re-initialised: matrices ~ N(0, initializer_range),
    norm scales 1, biases 0 (the architecture's own init recipe); same tokenizer and device."""
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


def training_settings(run: RunDir, sae: SparseCoder) -> dict[str, Any]:
    """The optimisation settings the run was trained with, from whichever config it holds (a
    TrainConfig, or a FlyTrainConfig listing several SAEs), as TrainConfig fields."""
    data = read_yaml(run.config_file) if run.config_file.is_file() else {}
    optim = {k: data[k] for k in OptimFields.model_fields if k in data}
    for spec in data.get("saes") or []:  # a train-fly run: this SAE's own lr
        if spec.get("name") == run.path.name and spec.get("lr") is not None:
            optim["lr"] = spec["lr"]
    if "sae" in data and "saes" not in data:
        optim["sae"] = data["sae"]
    else:
        optim["sae"] = sae.cfg.model_dump(exclude={"d_in", "d_out"})
    return optim


def random_model_coder(cfg: EvalConfig, sae: SparseCoder, meta: dict[str, Any], loaded: LoadedModel, hp: HookPoint,
                       positions: Positions, progress: bool = True) -> tuple[LoadedModel, RunDir, dict[str, float]]:
    """The control's randomized model and the SAE trained on it (harvest -> train with the real run's
    settings at the control's budgets), reused when <out>/store and <out>/sae already hold them.
    Returns (randomized model, its SAE's run directory, wall seconds of harvest and train)."""
    c = cfg.control
    run = RunDir(cfg.run)
    out = Path(c.out or run.path / "control")
    settings = training_settings(run, sae)
    if c.batch_size is not None:
        settings["batch_size"] = c.batch_size
    batch = settings.get("batch_size", OptimFields.model_fields["batch_size"].default)
    if c.harvest_tokens < batch:
        raise ValueError(f"control.harvest_tokens ({c.harvest_tokens}) is smaller than one training batch ({batch}) "
                         f"of the random model's SAE{'' if run.config_file.is_file() else ' (the default: ' + str(run.path) + ' has no config.yaml)'}; "
                         "raise control.harvest_tokens or set control.batch_size")
    t0 = time.perf_counter()
    rand = randomized_copy(loaded, c.seed)
    store_manifest = Path(meta.get("store") or "") / "manifest.json"
    hdata = read_json(store_manifest)["config"] if meta.get("store") and store_manifest.is_file() else {
        "text": meta.get("text", cfg.text), "ctx_len": meta.get("ctx_len") or cfg.ctx_len, **positions.to_dict()}
    sub = {"ledger": cfg.ledger, "device": cfg.device, "ledger_id": None, "notes": ""}
    hcfg = HarvestConfig(**{**hdata, **sub, "model": rand.name, "hook": str(hp), "tokens": c.harvest_tokens,
                            "out": str(out / "store"), "split": "train"})
    store = harvest(hcfg, loaded=rand, progress=progress)
    t1 = time.perf_counter()
    tdata = {**settings, **sub, "store": str(store.path), "runs_dir": str(out), "name": "sae",
             "tokens": c.train_tokens, "smoke": False, "val_store": None}
    rand_run = train(TrainConfig(**tdata), progress=progress)
    return rand, rand_run, {"harvest": round(t1 - t0, 2), "train": round(time.perf_counter() - t1, 2)}


def randomized_control(cfg: EvalConfig, sae: SparseCoder, meta: dict[str, Any], loaded: LoadedModel,
                       hp: HookPoint, positions: Positions, progress: bool = True) -> ControlResult:
    c = cfg.control
    t0 = time.perf_counter()
    rand, rand_run, built = random_model_coder(cfg, sae, meta, loaded, hp, positions, progress)
    t2 = time.perf_counter()
    rand_sae, _ = load_sae(rand_run.checkpoint_dir)
    rand_cfg = cfg.model_copy(update={"tokens": c.tokens, "ce_tokens": c.ce_tokens})
    rand_core = core_eval(rand_cfg, rand_sae, rand, hp, positions, rand.name, progress)
    rand_core.run = str(rand_run.path)
    rand_core.write(rand_run.path / CoreResult.FILE)
    record(rand_core, rand_run.path, cfg, ledger_id="", notes="the randomized-model control's SAE")
    t3 = time.perf_counter()
    _, sse_r, tv_r = ev_units(sae, loaded, hp, cfg, positions, c.tokens)
    _, sse_x, tv_x = ev_units(rand_sae.to(rand.device), rand, hp, cfg, positions, c.tokens)
    sides = "a = real model's SAE, b = randomized model's SAE"
    gaps = {"explained_variance": compare((sse_r, tv_r), (sse_x, tv_x), cfg.probing.bootstrap, c.seed,
                                          one_minus=True, unit="validation context", sides=sides)}
    specs, skipped = resolve_tasks(c.probing_tasks, cfg.probing.max_per_class)
    for spec in specs:
        data = load_task(spec)
        accs = []
        for model, coder in ((loaded, sae), (rand, rand_sae)):
            _, z = pooled_features(data.texts, model, hp, coder, cfg.probing.max_tokens, cfg.probing.batch_size,
                                   positions)
            accs.append(probe_correct(z.numpy(), data, c.probing_k, cfg.seed))
        ones = np.ones_like(accs[0])
        gaps[f"probing_{spec.name}_k{c.probing_k}"] = compare((accs[0], ones), (accs[1], ones),
                                                              cfg.probing.bootstrap, c.seed, unit="test example",
                                                              sides=sides)
    t4 = time.perf_counter()
    return ControlResult(
        comparison_sides=f"{sides}; diff = real - random", gaps=gaps, probing_skipped=skipped,
        random_run=str(rand_run.path),
        random_core={k: float(getattr(rand_core, k)) for k in ("explained_variance", "l0", "dead_fraction",
                                                               "ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered",
                                                               "kl_to_clean", "eval_tokens")},
        budget={"harvest_tokens": c.harvest_tokens, "train_tokens": c.train_tokens, "eval_tokens": c.tokens,
                "ce_tokens": c.ce_tokens},
        wall_seconds={**built, "eval_random": round(t3 - t2, 2),
                      "compare": round(t4 - t3, 2), "total": round(t4 - t0, 2)})
