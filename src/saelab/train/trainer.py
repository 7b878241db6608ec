"""One training loop for every architecture: store -> SAE checkpoint in a run directory.

Adam with linear warmup and a linear decay to zero over the last part of training; the
decoder is kept at unit norm (gradient parallel to each row removed, rows renormalised
after each step); b_dec starts at the geometric median (or mean) of a sample; latents
silent for `dead_tokens` tokens feed the AuxK loss. A resumable state (weights, optimizer,
dead counters, step) is written atomically every `checkpoint_every` steps; rerunning the
same command resumes from it, replaying the same data order.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from saelab.activations.store import ActivationStore
from saelab.config import TrainConfig
from saelab.io import atomic_write
from saelab.runs.rundir import RunDir
from saelab.saes.base import SparseCoder, build_sae, geometric_median


class NonFiniteLossError(FloatingPointError):
    pass


def default_lr(width: int) -> float:
    """Adam lr scaled with width as in Gao et al. 2024 / sparsify: 2e-4 / sqrt(width / 2^14)."""
    return 2e-4 / math.sqrt(width / 2**14)


def lr_factor(step: int, total: int, warmup: int, decay_start: float) -> float:
    """Linear warmup over `warmup` steps, flat, then linear decay to 0 from decay_start*total."""
    w = min(1.0, (step + 1) / warmup) if warmup else 1.0
    d0 = int(decay_start * total)
    d = 1.0 if step < d0 or total <= d0 else max(0.0, (total - step) / (total - d0))
    return w * d


def batch_stream(store: ActivationStore, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches: epoch after epoch, each in its own seeded order."""
    for epoch in itertools.count():
        n = 0
        for b in store.iter_batches(batch_size, seed=seed, epoch=epoch):
            n += 1
            yield b
        if n == 0:
            raise ValueError(f"store {store.path} has {store.n_tokens} tokens, fewer than one "
                             f"batch of {batch_size}; lower batch_size or harvest more")


def train(cfg: TrainConfig, progress: bool = True) -> RunDir:
    """Train (or resume, or reuse a finished run with the same config); returns the run dir."""
    store = ActivationStore(cfg.store)
    if cfg.sae.d_in is not None and cfg.sae.d_in != store.d_in:
        raise ValueError(f"SAE d_in {cfg.sae.d_in} does not match the store {store.path}: "
                         f"its activations have d_in {store.d_in} ({store.hook} of {store.model})")
    sae_cfg = cfg.sae.model_copy(update={"d_in": store.d_in})
    if sae_cfg.aux_k is not None and sae_cfg.aux_k > sae_cfg.width:
        raise ValueError(f"aux_k ({sae_cfg.aux_k}) exceeds width ({sae_cfg.width})")
    run = RunDir.prepare(f"{cfg.runs_dir}/{cfg.name}", cfg)
    if run.complete:
        return run

    total_tokens = cfg.tokens or store.n_tokens
    total_steps = max(1, total_tokens // cfg.batch_size)
    lr = cfg.lr or default_lr(sae_cfg.width)

    sae = build_sae(sae_cfg, seed=cfg.seed)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(sae_cfg.width, dtype=torch.long)  # tokens since each latent fired
    step, wall_before = 0, 0.0

    if run.state_file.is_file():
        state = torch.load(run.state_file, weights_only=True)
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        since_fired = state["since_fired"]
        step, wall_before = int(state["step"]), float(state["wall_seconds"])
        run.truncate_metrics(step)
    else:
        run.truncate_metrics(0)
        _init_b_dec(sae, store, cfg.b_dec_init)

    stream = batch_stream(store, cfg.batch_size, cfg.seed)
    for _ in range(step):  # replay the data order up to the resumed step
        next(stream)

    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, unit="step", desc=f"train {cfg.name}",
               disable=not progress, dynamic_ncols=True)
    while step < total_steps:
        x = next(stream)  # [batch, d_in]
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, total_steps, cfg.warmup_steps, cfg.decay_start)
        dead = since_fired >= sae_cfg.dead_tokens
        out = sae(x, dead_mask=dead)
        if not torch.isfinite(out.loss):
            _save_state(run, sae, opt, since_fired, step, wall_before + time.perf_counter() - t0)
            raise NonFiniteLossError(f"loss is {out.loss.item()} at step {step}; the state before "
                                     f"this step is saved in {run.state_file}")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        sae.set_decoder_unit_norm()

        since_fired += x.shape[0]
        since_fired[out.active.flatten().unique()] = 0
        step += 1
        if step % cfg.log_every == 0 or step == total_steps:
            row = {"step": step, "tokens": step * cfg.batch_size, "loss": out.loss.item(),
                   "fvu": out.fvu.item(), "aux_loss": out.aux_loss.item(), "l0": out.l0,
                   "dead_fraction": float(dead.float().mean()), "lr": opt.param_groups[0]["lr"]}
            run.append_metrics(row)
            bar.set_postfix(fvu=f"{row['fvu']:.3f}", dead=f"{row['dead_fraction']:.3f}")
        if step % cfg.checkpoint_every == 0 and step < total_steps:
            _save_state(run, sae, opt, since_fired, step, wall_before + time.perf_counter() - t0)
        bar.update(1)
    bar.close()

    wall = wall_before + time.perf_counter() - t0
    sae.save(run.checkpoint_dir, {"hook": store.hook, "model": store.model,
                                  "model_source": store.manifest.get("model_source"),
                                  "store": str(store.path)})
    last = run.metrics()[-1]
    dead_final = float((since_fired >= sae_cfg.dead_tokens).float().mean())
    run.write_manifest(cfg.seed, wall, store=str(store.path), store_manifest_hash=store.manifest.get("config_hash"))
    run.write_summary({
        "stage": "train", "name": cfg.name, "smoke": cfg.smoke,
        "verdict": "smoke" if cfg.smoke else "novel",
        "architecture": sae_cfg.architecture, "d_in": sae_cfg.d_in, "width": sae_cfg.width,
        "k": sae_cfg.k, "hook": store.hook, "model": store.model,
        "steps": step, "tokens": step * cfg.batch_size, "lr": lr,
        "train_fvu_last": last["fvu"], "dead_fraction": dead_final,
        "dead_definition": f"no activation in the last {sae_cfg.dead_tokens} training tokens",
        "wall_seconds": round(wall, 2), "tokens_per_second": round(step * cfg.batch_size / max(wall, 1e-9), 1),
    })
    run.state_file.unlink(missing_ok=True)
    return run


def _init_b_dec(sae: SparseCoder, store: ActivationStore, how: str, sample: int = 8192) -> None:
    if how == "zeros":
        return
    x = store.all_acts(max_rows=sample)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(x) if how == "geometric_median" else x.mean(0))


def _save_state(run: RunDir, sae: SparseCoder, opt: torch.optim.Optimizer, since_fired: torch.Tensor,
                step: int, wall: float) -> None:
    with atomic_write(run.state_file) as f:
        torch.save({"sae": sae.state_dict(), "opt": opt.state_dict(), "since_fired": since_fired,
                    "step": step, "wall_seconds": wall}, f)
