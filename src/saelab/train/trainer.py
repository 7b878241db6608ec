"""One training loop for every architecture: (x, y) batches -> SAE checkpoint in a run dir.

`Trainer` owns one sparse coder: optimizer (Adam or signum), lr warmup and linear decay,
sparsity-coefficient warmup, unit-norm decoder (for architectures that want it: gradient
parallel to each row removed, rows renormalised after each step), b_dec init at the
geometric median (or mean) of a sample, dead-latent tracking feeding AuxK, input
normalisation (E||x||^2 = d) folded into the weights at save, a resumable state written
atomically every `checkpoint_every` steps, and a NaN guard. `train` feeds it from a
store (or two, for a transcoder); `train_on_the_fly` (saelab.train.fly) feeds several
from one pass of the model.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from saelab.config import StageConfig
from saelab.data.tokens import Positions
from saelab.device import (
    check_fits,
    describe,
    peak_memory_bytes,
    reset_peak,
    resolve_device,
    select_dtype,
)
from saelab.io import atomic_write
from saelab.runs.ledger import check_ledger, record
from saelab.runs.results import TrainResult
from saelab.runs.rundir import RunDir
from saelab.saes import build_sae
from saelab.saes.base import LossContext, geometric_median
from saelab.saes.config import SAEConfig
from saelab.train.data import StorePair
from saelab.train.dist import Dist, from_env


class OptimFields(StageConfig):
    """Optimisation settings shared by store-fed and on-the-fly training."""

    batch_size: int = Field(4096, gt=0, description="global batch (split across ranks under torchrun)")
    lr: float | None = Field(None, gt=0, description="lr (default 2e-4 / sqrt(width / 2**14))")
    optimizer: Literal["adam", "signum"] = Field("adam", description="Adam(0.9, 0.999) or signum (sign of momentum 0.9)")
    warmup_steps: int = Field(20, ge=0)
    decay_start: float = Field(0.8, ge=0, le=1, description="fraction of training after which lr decays linearly to 0")
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = "geometric_median"
    normalize: bool = Field(True, description="scale inputs (and targets) so E||x||^2 = d during training; folded into the weights at save")
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(200, gt=0, description="steps between resumable checkpoints")
    wandb: bool = Field(False, description="also log to Weights & Biases (respects WANDB_MODE=offline)")
    wandb_project: str = "saelab"
    seed: int = 0
    smoke: bool = Field(False, description="a smoke run: labelled so, claims nothing")


class TrainConfig(OptimFields):
    """Train one sparse coder from an activation store (two row-aligned stores for a transcoder)."""

    # where the run lives and how often it saves or logs elsewhere change no weight: a run directory
    # moved, renamed or resumed with another checkpoint interval is the same run
    UNHASHED: ClassVar[frozenset[str]] = OptimFields.UNHASHED | {"name", "runs_dir", "checkpoint_every", "wandb",
                                                                 "wandb_project"}

    store: str = Field(..., description="activation store directory (from `saelab harvest`)")
    store_out: str | None = Field(None, description="target store for a transcoder, row-aligned with `store`")
    name: str = Field("sae", description="run name: the run directory is <runs_dir>/<name>")
    runs_dir: str = "runs"
    sae: SAEConfig = SAEConfig()
    tokens: int | None = Field(None, gt=0, description="training tokens (default: one pass over the store)")
    val_store: str | None = Field(None, description="store of held-out activations for validation FVU")
    val_every: int = Field(100, gt=0, description="steps between validation metrics")
    val_tokens: int = Field(16_384, gt=0)



class NonFiniteLossError(FloatingPointError):
    pass


def default_lr(width: int) -> float:
    """lr scaled with width as in Gao et al. 2024 / sparsify: 2e-4 / sqrt(width / 2^14)."""
    return 2e-4 / math.sqrt(width / 2**14)


def lr_factor(step: int, total: int, warmup: int, decay_start: float) -> float:
    """Linear warmup over `warmup` steps, flat, then linear decay to 0 from decay_start*total."""
    w = min(1.0, (step + 1) / warmup) if warmup else 1.0
    d0 = int(decay_start * total)
    d = 1.0 if step < d0 or total <= d0 else max(0.0, (total - step) / (total - d0))
    return w * d


def norm_scale(x: torch.Tensor) -> float:
    """s with E||s x||^2 = d (Anthropic's April 2024 normalisation), from a sample x: [n, d]."""
    return math.sqrt(x.shape[1] / x.pow(2).sum(1).mean().item())


class Signum(torch.optim.Optimizer):
    """Sign of the momentum (Bernstein et al. 2018): p -= lr * sign(beta m + (1 - beta) g)."""

    def __init__(self, params, lr: float, momentum: float = 0.9):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                m.mul_(group["momentum"]).add_(p.grad, alpha=1 - group["momentum"])
                p.add_(m.sign(), alpha=-group["lr"])


def contiguous_alias(p: nn.Parameter) -> nn.Parameter:
    """p itself, or for a transposed 2-d parameter (W_enc) a contiguous Parameter sharing its
    storage: the fused CPU Adam kernel copies non-contiguous tensors in and out every step
    (8.9 ms vs 2.4 ms for W_enc [576, 9216]). The trainer hands the alias p.grad.t()."""
    if p.dim() != 2 or p.is_contiguous() or not p.t().is_contiguous():
        return p
    return nn.Parameter(p.data.t())


class Trainer:
    """One sparse coder being trained. Call `step(x, y)` with this rank's rows of each batch."""

    def __init__(self, sae_cfg: SAEConfig, cfg: OptimFields, run: RunDir, total_steps: int,
                 sample: tuple[torch.Tensor, torch.Tensor], lr: float | None = None, dist: Dist | None = None,
                 device: torch.device | None = None):
        self.cfg, self.run, self.total_steps = cfg, run, total_steps
        self.dist = dist or Dist()
        self.device = device or torch.device("cpu")
        self.sae = build_sae(sae_cfg, seed=cfg.seed).to(self.device)  # built on CPU: the same init everywhere
        self.lr = lr or cfg.lr or default_lr(sae_cfg.width)
        params = [contiguous_alias(p) for p in self.sae.parameters()]
        self._aliases = [(a, p) for a, p in zip(params, self.sae.parameters(), strict=True) if a is not p]
        self.opt = (torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), fused=True) if cfg.optimizer == "adam"
                    else Signum(params, lr=self.lr))
        self.since_fired = torch.zeros(sae_cfg.width, dtype=torch.long, device=self.device)  # tokens since each fired
        self.step_no, self.wall_before = 0, 0.0
        x, y = (t.to(self.device) for t in sample)
        self.s_in = norm_scale(x) if cfg.normalize else 1.0
        self.s_out = (self.s_in if y is x else norm_scale(y)) if cfg.normalize else 1.0
        if run.state_file.is_file():
            self._load_state()
        else:
            self._init_b_dec(y * self.s_out)
        self.t0 = time.perf_counter()
        self._wandb = _wandb_run(cfg, run) if cfg.wandb and self.dist.main else None

    def _init_b_dec(self, y: torch.Tensor) -> None:
        if self.cfg.b_dec_init == "zeros":
            return
        with torch.no_grad():
            self.sae.b_dec.copy_(geometric_median(y) if self.cfg.b_dec_init == "geometric_median" else y.mean(0))

    @property
    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    def step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, Any] | None:
        """One optimizer step on this rank's rows x [rows, d_in] (targets y [rows, d_out], None
        for an SAE); returns the metrics row when one is logged."""
        cfg, sae, dev = self.cfg, self.sae, self.device
        x = x.to(dev, non_blocking=True) * self.s_in
        y = x if y is None else y.to(dev, non_blocking=True) * self.s_out
        n_local = torch.tensor([float(x.shape[0])], device=dev)
        stats = self.dist.sum(torch.cat([n_local, y.sum(0), y.pow(2).sum().reshape(1)]).double())
        n, mean = stats[0], stats[1:-1] / stats[0]
        total_var = (stats[-1] - n * mean.pow(2).sum()).float()  # sum ||y - mean||^2, global
        for g in self.opt.param_groups:
            g["lr"] = self.lr * lr_factor(self.step_no, self.total_steps, cfg.warmup_steps, cfg.decay_start)
        dead = self.since_fired >= sae.cfg.dead_tokens
        progress = self.step_no / self.total_steps
        warm = sae.cfg.sparsity_warmup
        ctx = LossContext(total_var, int(n), dead, min(1.0, progress / warm) if warm else 1.0, progress)
        out = sae(x, y, ctx)
        finite = self.dist.sum(torch.isfinite(out.loss).float().reshape(1))
        if finite.item() < self.dist.world:
            self.save_state()
            raise NonFiniteLossError(f"loss is {out.loss.item()} at step {self.step_no}; the state before "
                                     f"this step is saved in {self.run.state_file}")
        self.sae.zero_grad(set_to_none=True)
        out.loss.backward()
        self.dist.sum_grads(sae.parameters())
        if sae.unit_norm_decoder:
            sae.remove_parallel_decoder_grad()
        for alias, p in self._aliases:
            alias.grad = None if p.grad is None else p.grad.t()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # the aliases' gradients would outlive the step
        if sae.unit_norm_decoder:
            sae.set_decoder_unit_norm()
        fired = torch.zeros(sae.cfg.width, dtype=torch.int32, device=dev)
        fired[out.active.flatten().unique()] = 1
        fired = self.dist.max(fired).bool()  # a latent is alive if it fired on any rank
        self.since_fired += int(n)
        self.since_fired[fired] = 0
        self.step_no += 1
        row = None
        if self.step_no % cfg.log_every == 0 or self.step_no == self.total_steps:
            names = sorted(out.terms)  # losses are local sums over global normalisers: summing is global
            parts = self.dist.sum(torch.stack([out.fvu, out.loss.detach(), torch.tensor(out.l0 * x.shape[0], device=dev),
                                               *(out.terms[k] for k in names)]).double()).tolist()
            row = {"step": self.step_no, "tokens": self.step_no * int(n), "loss": parts[1], "fvu": parts[0],
                   "l0": parts[2] / n.item(), **{f"loss_{k}": v for k, v in zip(names, parts[3:], strict=True)},
                   "dead_fraction": float(dead.float().mean()), "lr": self.opt.param_groups[0]["lr"]}
            if self.dist.main:
                self.run.append_metrics(row)
                if self._wandb is not None:
                    self._wandb.log(row, step=self.step_no)
        if self.step_no % cfg.checkpoint_every == 0 and self.step_no < self.total_steps:
            self.save_state()
        return row

    def save_state(self) -> None:
        """The resumable state, saved from CPU copies: a run resumes on any device."""
        if not self.dist.main:
            return
        with atomic_write(self.run.state_file) as f:
            torch.save(_to_cpu({"sae": self.sae.state_dict(), "opt": self.opt.state_dict(),
                                "since_fired": self.since_fired, "step": self.step_no, "wall_seconds": self.wall,
                                "s_in": self.s_in, "s_out": self.s_out}), f)

    def _load_state(self) -> None:
        state = torch.load(self.run.state_file, weights_only=True, map_location=self.device)
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        for alias, p in self._aliases:
            for key, v in self.opt.state.get(alias, {}).items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape != alias.shape:
                    # fused Adam would read a same-size buffer of another shape silently wrong
                    if v.shape != p.shape:
                        raise ValueError(f"{self.run.state_file}: optimizer state {key!r} has shape "
                                         f"{tuple(v.shape)}, its parameter {tuple(alias.shape)}")
                    self.opt.state[alias][key] = v.t().contiguous()  # saved before W_enc's alias existed
        self.since_fired = state["since_fired"].to(self.device)
        self.step_no, self.wall_before = int(state["step"]), float(state["wall_seconds"])
        self.s_in, self.s_out = float(state["s_in"]), float(state["s_out"])

    def finish(self, meta: dict[str, Any], source: str = "store") -> TrainResult | None:
        """Fold the normalisation into the weights, save the checkpoint (from CPU copies), summary
        and manifest; returns the summary (rank 0; None on the other ranks).

        meta: hook, hook_out, model, model_source, model_hash, store(s), positions (what the coder
        reads, so every eval reads the same), kept in checkpoint/cfg.json."""
        if not self.dist.main:
            return None
        sae, cfg = self.sae, self.sae.cfg
        sae.fold_input_scale(self.s_in, self.s_out)
        sae.save(self.run.checkpoint_dir, {**meta, "normalization": {
            "training_scale_in": self.s_in, "training_scale_out": self.s_out,
            "folded": True, "note": "weights take and return raw activations"}})
        last = [r for r in self.run.metrics() if "fvu" in r][-1]
        tokens = self.step_no * self.cfg.batch_size
        self.run.write_manifest(self.cfg.seed, self.wall, world_size=self.dist.world, **meta)
        result = TrainResult(
            name=self.run.path.name, smoke=self.cfg.smoke, source=source, architecture=cfg.architecture,
            transcoder=cfg.transcoder, skip=cfg.skip, d_in=cfg.d_in, d_out=cfg.d_out or cfg.d_in, width=cfg.width,
            k=cfg.k, steps=self.step_no, tokens=tokens, lr=self.lr, optimizer=self.cfg.optimizer,
            train_fvu_last=last["fvu"], train_l0_last=last["l0"],
            train_loss_terms_last={k.removeprefix("loss_"): v for k, v in last.items() if k.startswith("loss_")},
            dead_fraction=float((self.since_fired >= cfg.dead_tokens).float().mean()),
            dead_definition=f"no activation in the last {cfg.dead_tokens} training tokens",
            wall_seconds=round(self.wall, 2), tokens_per_second=round(tokens / max(self.wall, 1e-9), 1),
            topk_select_dtype=str(select_dtype(cfg.topk_select_dtype, self.device)).removeprefix("torch."),
            world_size=self.dist.world, hook=meta["hook"], hook_out=meta.get("hook_out"), model=meta["model"],
            text=meta.get("text"),
            seed=self.cfg.seed, device=describe(self.device), peak_memory_bytes=peak_memory_bytes(self.device))
        result.write(self.run.summary_file)
        self.run.state_file.unlink(missing_ok=True)
        if self._wandb is not None:
            self._wandb.finish()
        return result


def _to_cpu(obj: Any) -> Any:
    """A state dict (nested) with every tensor on the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _wandb_run(cfg: OptimFields, run: RunDir):
    try:
        import wandb
    except ImportError:
        raise ValueError("wandb=True but the wandb package is not installed (pip install wandb)") from None
    return wandb.init(project=cfg.wandb_project, name=run.path.name, dir=str(run.path),
                      config=cfg.model_dump(mode="json"))


def train(cfg: TrainConfig, progress: bool = True, resume: bool = True) -> RunDir:
    """Train from a store (or two); reuses a finished run with the same config and, when
    `resume`, continues an interrupted one from its last checkpoint (else refuses to touch it).
    Under torchrun every rank calls this; rank 0 writes the run directory."""
    data = StorePair(cfg.store, cfg.store_out)
    sae_cfg = cfg.sae
    if sae_cfg.d_in is not None and sae_cfg.d_in != data.d_in:
        raise ValueError(f"SAE d_in {sae_cfg.d_in} does not match the store {data.x.path}: "
                         f"its activations have d_in {data.d_in} ({data.x.hook} of {data.x.model})")
    if data.y is None and sae_cfg.transcoder:
        raise ValueError("sae.transcoder=True needs store_out: the target activations (e.g. an mlp_out store)")
    if data.y is not None and not sae_cfg.transcoder:
        raise ValueError("store_out is given, so this is a transcoder: set sae.transcoder=true")
    sae_cfg = sae_cfg.model_copy(update={"d_in": data.d_in, "d_out": data.d_out if data.y is not None else None})
    if sae_cfg.aux_k is not None and sae_cfg.aux_k > sae_cfg.width:
        raise ValueError(f"aux_k ({sae_cfg.aux_k}) exceeds width ({sae_cfg.width})")
    device = resolve_device(cfg.device)
    dist = from_env(device)
    if cfg.batch_size % dist.world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {dist.world} ranks")
    check_ledger(cfg)
    run = RunDir.prepare(f"{cfg.runs_dir}/{cfg.name}", cfg) if dist.main else RunDir(f"{cfg.runs_dir}/{cfg.name}")
    dist.barrier()
    if run.complete:
        if dist.main:
            record(TrainResult.read(run.summary_file), run.path, cfg)
        return run
    if run.state_file.is_file() and not resume:
        step = torch.load(run.state_file, weights_only=True)["step"]
        raise ValueError(f"run directory {run.path} holds an interrupted run (checkpoint at step {step}); "
                         "pass --resume to continue it, or choose another --name")
    total_steps = max(1, (cfg.tokens or data.n_tokens) // cfg.batch_size)
    check_fits(device, train_bytes(sae_cfg, cfg.batch_size // dist.world), f"training {sae_cfg.architecture} "
               f"width {sae_cfg.width} at batch {cfg.batch_size}", "lower batch_size or width")
    reset_peak(device)
    trainer = Trainer(sae_cfg, cfg, run, total_steps, data.sample(8192), dist=dist, device=device)
    if dist.main:
        run.truncate_metrics(trainer.step_no)
    stream = data.batches(cfg.batch_size, cfg.seed, pin=device.type == "cuda")
    for _ in range(trainer.step_no):  # replay the data order up to the resumed step
        next(stream)
    val = StorePair(cfg.val_store).sample(cfg.val_tokens)[0] if cfg.val_store else None
    bar = tqdm(total=total_steps, initial=trainer.step_no, unit="step", desc=f"train {cfg.name}",
               disable=not progress or not dist.main, dynamic_ncols=True)
    while trainer.step_no < total_steps:
        x, y = next(stream)
        row = trainer.step(dist.shard(x), None if y is x else dist.shard(y))
        if row:
            bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.3f}")
        if val is not None and dist.main and trainer.step_no % cfg.val_every == 0:
            run.append_metrics({"step": trainer.step_no, **validation_metrics(trainer, val)})
        bar.update(1)
    bar.close()
    m = data.x.manifest
    meta = {"hook": data.x.hook, "hook_out": data.y.hook if data.y is not None else None, "model": data.x.model,
            "model_source": m.get("model_source"), "model_hash": m.get("model_hash"), "store": str(data.x.path),
            "store_out": str(data.y.path) if data.y is not None else None,
            "positions": Positions.from_config(m.get("config")).to_dict(), "ctx_len": m.get("ctx_len"),
            "text": m.get("text")}
    result = trainer.finish(meta)
    if result is not None:
        record(result, run.path, cfg)
    dist.barrier()
    return run


def train_bytes(sae_cfg: SAEConfig, batch: int) -> int:
    """A rough upper estimate of training memory on a device: weights with gradients and Adam's two
    moments, and a few [batch, width] float32 activations (dense architectures keep several)."""
    d_in, d_out, m = sae_cfg.d_in or 0, sae_cfg.d_out or sae_cfg.d_in or 0, sae_cfg.width
    weights = 4 * (m * (d_in + d_out) + (d_in * d_out if sae_cfg.skip else 0))
    acts = 4 * batch * m * (2 if sae_cfg.architecture in ("topk", "batchtopk", "matryoshka") else 5)
    return 4 * weights + acts + 4 * 8 * batch * (d_in + d_out)


@torch.no_grad()
def validation_metrics(trainer: Trainer, x: torch.Tensor) -> dict[str, float]:
    """FVU and L0 of the current SAE on held-out activations (raw scale in, per-token encode)."""
    sae = trainer.sae
    xs = x.to(trainer.device) * trainer.s_in
    z = sae.encode(xs)
    err = xs - sae.decode(z, xs)
    return {"val_fvu": float(err.pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()),
            "val_l0": float((z != 0).float().sum(1).mean())}
