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
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from saelab.config import FlyTrainConfig
from saelab.data.corpus import iter_documents
from saelab.data.tokens import batches, contexts, keep_mask, shuffled
from saelab.models.hooks import capture, resolve
from saelab.models.load import LoadedModel, load_model
from saelab.runs.rundir import RunDir
from saelab.train.trainer import Trainer


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
            acts = capture(model, list(hps.values()), batch.input_ids, batch.attention_mask)
            keep, _ = keep_mask(batch, tok, True)
            for h, hp in hps.items():
                pending[h].append(acts[hp][keep].float())
            n += int(keep.sum())
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
    loaded = loaded or load_model(cfg.model, dtype=cfg.dtype)
    model = loaded.model
    hooks = sorted({h for s in cfg.saes for h in (s.hook, s.hook_out) if h}, key=lambda h: resolve(model, h))
    d_model = model.config.hidden_size
    runs = [RunDir.prepare(f"{cfg.runs_dir}/{s.name}", cfg) for s in cfg.saes]
    if all(r.complete for r in runs):
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
        trainers.append(Trainer(sae_cfg, cfg, run, total_steps, (x, y), lr=spec.lr))
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
    for spec, t in zip(cfg.saes, trainers, strict=True):
        meta = {"hook": spec.hook, "hook_out": spec.hook_out, "model": cfg.model, "model_source": loaded.source,
                "store": None, "source": "on the fly"}
        t.finish(meta, {"hook": spec.hook, "model": cfg.model})
    return runs
