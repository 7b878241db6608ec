"""Train several sparse coders on the fly from the model: one forward pass feeds them all.

Each model batch is captured at every hook point any coder needs (stopping after the
deepest), BOS/padding/special positions dropped, and rows pooled in a seeded shuffle
buffer of `buffer_tokens`; each training batch is a dict hook -> [batch, d] of the same
tokens, so a transcoder gets aligned (input, output) rows. The stream is deterministic,
so an interrupted run resumes exactly by replaying it (forward passes only) to the step
of the last checkpoint.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from saelab.activations.rows import kept_rows
from saelab.config import Config
from saelab.data.corpus import iter_documents
from saelab.data.tokens import PositionFields, batches, contexts, shuffled
from saelab.device import resolve_device
from saelab.models.hooks import resolve
from saelab.models.load import LoadedModel, load_model
from saelab.runs.ledger import check_ledger, derived_id, record
from saelab.runs.results import TrainResult
from saelab.runs.rundir import RunDir
from saelab.saes.config import SAEConfig
from saelab.train.trainer import OptimFields, Trainer


class FlySAE(Config):
    """One of several sparse coders trained on the fly from one pass of the model."""

    name: str
    hook: str = Field(..., description="input hook point")
    hook_out: str | None = Field(None, description="output hook point (a transcoder) or None")
    sae: SAEConfig = SAEConfig()
    lr: float | None = None


class FlyTrainConfig(OptimFields, PositionFields):
    """Train several sparse coders on the fly from the model (no store), one forward pass feeding all."""

    model: str = "smollm2"
    text: str = "embedded"
    text_field: str = "text"
    ctx_len: int = Field(128, ge=2)
    model_batch_size: int = Field(16, gt=0, description="contexts per forward pass")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    buffer_tokens: int = Field(65_536, gt=0, description="activations shuffled together before batching")
    tokens: int = Field(1_000_000, gt=0, description="training tokens for every SAE")
    runs_dir: str = "runs"
    saes: list[FlySAE] = Field(..., min_length=1)



def activation_stream(loaded: LoadedModel, hooks: list[str], cfg: FlyTrainConfig) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches {hook: [batch_size, d]} over epochs of the training text."""
    model, tok = loaded.model, loaded.tokenizer
    hps = {h: resolve(model, h) for h in hooks}
    docs = list(iter_documents(cfg.text, "train", cfg.text_field))
    if not docs:
        raise ValueError(f"text source {cfg.text!r} has no training documents")
    gen = torch.Generator().manual_seed(cfg.seed)
    pending: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    n = 0
    for epoch in itertools.count():
        ctxs = contexts(shuffled(docs, cfg.seed + epoch), tok, cfg.ctx_len, cfg.prepend_bos)
        for batch in batches(ctxs, cfg.model_batch_size, tok.pad_token_id):
            kept = kept_rows(model, list(hps.values()), batch, tok, cfg.positions)
            for h, hp in hps.items():
                pending[h].append(kept.rows(hp).float())
            n += kept.ctx.numel()
            if n < cfg.buffer_tokens:
                continue
            pool = {h: torch.cat(v) for h, v in pending.items()}
            perm = torch.randperm(n, generator=gen)
            full = n // cfg.batch_size
            for i in range(full):
                rows = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                yield {h: p[rows] for h, p in pool.items()}
            rest = perm[full * cfg.batch_size:]
            pending = {h: [p[rest]] for h, p in pool.items()}
            n = rest.numel()


def train_on_the_fly(cfg: FlyTrainConfig, loaded: LoadedModel | None = None, progress: bool = True) -> list[RunDir]:
    """Train every coder in cfg.saes to cfg.tokens; one run directory each (<runs_dir>/<name>)."""
    names = [s.name for s in cfg.saes]
    if len(set(names)) != len(names):
        raise ValueError(f"SAE names must be unique, got {names}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("train-fly runs in one process (every rank would train every SAE): start it without "
                         "torchrun, or harvest a store and use `saelab train` under torchrun")
    device = resolve_device(cfg.device)
    check_ledger(cfg)
    loaded = loaded or load_model(cfg.model, dtype=cfg.dtype, device=device)
    model = loaded.model
    hooks = sorted({h for s in cfg.saes for h in (s.hook, s.hook_out) if h}, key=lambda h: resolve(model, h))
    d_model = model.config.hidden_size
    runs = [RunDir.prepare(f"{cfg.runs_dir}/{s.name}", cfg) for s in cfg.saes]
    if all(r.complete for r in runs):
        for spec, run in zip(cfg.saes, runs, strict=True):
            record(TrainResult.read(run.summary_file), run.path, cfg, ledger_id=derived_id(cfg.ledger_id, spec.name))
        return runs
    if any(r.complete for r in runs):
        raise ValueError("some of these SAEs finished and some did not; rerun the unfinished ones alone")
    total_steps = max(1, cfg.tokens // cfg.batch_size)
    stream = activation_stream(loaded, hooks, cfg)
    first = next(stream)  # the sample for input normalisation and b_dec init
    trainers = []
    for spec, run in zip(cfg.saes, runs, strict=True):
        transcoder = spec.hook_out is not None and spec.hook_out != spec.hook
        if spec.sae.transcoder != transcoder:
            raise ValueError(f"SAE {spec.name!r}: hook_out {spec.hook_out!r} needs sae.transcoder={transcoder}")
        sae_cfg = spec.sae.model_copy(update={"d_in": d_model, "d_out": d_model if transcoder else None})
        x = first[spec.hook]
        y = first[spec.hook_out] if transcoder else x
        trainers.append(Trainer(sae_cfg, cfg, run, total_steps, (x, y), lr=spec.lr, device=device))
    start = trainers[0].step_no
    if any(t.step_no != start for t in trainers):
        raise ValueError("these SAEs were checkpointed at different steps; rerun them separately")
    stream = itertools.chain([first], stream)
    for _ in range(start):  # replay the deterministic stream to the checkpoint (forward passes only)
        next(stream)
    for run, t in zip(runs, trainers, strict=True):
        run.truncate_metrics(t.step_no)
    bar = tqdm(total=total_steps, initial=start, unit="step", desc=f"train on the fly ({len(trainers)} SAEs)",
               disable=not progress, dynamic_ncols=True)
    for _ in range(start, total_steps):
        acts = next(stream)
        for spec, t in zip(cfg.saes, trainers, strict=True):
            t.step(acts[spec.hook], acts[spec.hook_out] if t.sae.cfg.transcoder else None)
        bar.update(1)
    bar.close()
    for spec, t, run in zip(cfg.saes, trainers, runs, strict=True):
        meta = {"hook": spec.hook, "hook_out": spec.hook_out, "model": cfg.model, "model_source": loaded.source,
                "model_hash": loaded.content_hash, "store": None, "source": "on the fly",
                "positions": cfg.positions.to_dict(), "ctx_len": cfg.ctx_len, "text": cfg.text}
        record(t.finish(meta, source="on the fly"), run.path, cfg, ledger_id=derived_id(cfg.ledger_id, spec.name))  # a row per SAE
    return runs

