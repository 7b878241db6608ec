"""What every format adapter shares: the Format record, building a saelab SAE from mapped
tensors, hook-name translation, and the refusals.

An adapter maps a format's tensors onto saelab's parameter names (W_enc [d_in, width],
b_enc [width], W_dec [width, d_out], b_dec [d_out], log_threshold / threshold / r_mag /
b_mag / W_skip [d_in, d_out]) and says which saelab architecture computes the same encode.
Anything the format's config asks for that saelab cannot compute identically is refused
with a ValueError naming the file and field: loading it anyway would encode differently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.hookpoints import HookPoint
from saelab.saes.base import SparseCoder, build_sae
from saelab.saes.config import SAEConfig

Meta = dict[str, Any]  # {"hook", "hook_out", "model", "format", ...} as in native cfg.json
K_ARCHS = ("topk", "batchtopk", "matryoshka")
TRAINING_STATE = ("p", "coef")  # p-annealing schedule buffers: no format stores them, encode ignores them


@dataclass(frozen=True)
class Format:
    name: str
    expects: str  # the files that identify it, for "no known format" errors
    detect: Callable[[Path], bool]
    load: Callable[[Path], tuple[SparseCoder, Meta]]
    save: Callable[[SparseCoder, Meta, Path], None]


def sae_config(architecture: str, d_in: int, width: int, d_out: int | None = None, *,
               transcoder: bool = False, skip: bool = False, k: int | None = None,
               **extra: Any) -> SAEConfig:
    """An SAEConfig for an imported coder; k only for the architectures that use it."""
    fields: dict[str, Any] = dict(architecture=architecture, d_in=d_in, width=width, transcoder=transcoder,
                                  skip=skip, d_out=d_out if d_out not in (None, d_in) else None, **extra)
    if architecture in K_ARCHS:
        fields["k"] = int(k)
    elif width <= SAEConfig.model_fields["k"].default:
        fields["k"] = 1  # unused by this architecture; keeps the k < width check satisfied
    return SAEConfig(**fields)


SAME_ENCODE = {"relu": ("relu", "panneal"), "jumprelu": ("jumprelu", "batchtopk", "matryoshka")}


def saved_config(block: Any, from_file: SAEConfig) -> SAEConfig:
    """The saelab SAEConfig an export left next to the weights (it names the architecture a
    format cannot, e.g. batchtopk saved as JumpReLU) if it agrees with what the file itself
    says; otherwise the config read from the file."""
    if not isinstance(block, dict) or "sae" not in block:
        return from_file
    saved = SAEConfig.model_validate(block["sae"])
    shape = ("d_in", "d_out", "width", "transcoder", "skip")
    agrees = all(getattr(saved, f) == getattr(from_file, f) for f in shape) and \
        saved.architecture in SAME_ENCODE.get(from_file.architecture, (from_file.architecture,)) and \
        (from_file.architecture not in K_ARCHS or saved.k == from_file.k)
    return saved if agrees else from_file


def build(cfg: SAEConfig, tensors: dict[str, torch.Tensor], where: str) -> SparseCoder:
    """A saelab SAE (eval mode, float32) holding exactly `tensors` (saelab names)."""
    sae = build_sae(cfg)
    own = sae.state_dict()
    tensors = {**{k: own[k] for k in TRAINING_STATE if k in own}, **tensors}
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise ValueError(f"{where}: tensors do not match a saelab {cfg.architecture} coder "
                         f"(missing {missing}, unexpected {extra})")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise ValueError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(own[name].shape)}")
    sae.load_state_dict({k: v.detach().to(torch.float32) for k, v in tensors.items()})
    return sae.eval()


def weights(sae: SparseCoder) -> dict[str, torch.Tensor]:
    """The SAE's inference tensors, contiguous float32 copies on CPU (W_enc is stored as a view)."""
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in sae.state_dict().items()
            if k not in TRAINING_STATE}


def log_threshold_of(threshold: torch.Tensor, where: str) -> torch.Tensor:
    """log(theta) for saelab's JumpReLU (threshold = exp(log_threshold)): the float32 near
    log(theta) whose exp() is closest to theta. Bit-exact for theta in about [1, e]; elsewhere
    not every float32 is an exp() of a float32, and the gap is a few ulps (relative <= 3e-7
    for theta in [1e-3, 100]; see threshold_rel_err).
    A negative threshold lets negative pre-activations through in saelab but not in
    ReLU-then-mask formats, so it is refused."""
    theta = threshold.detach().to(torch.float32)
    if (theta < 0).any():
        raise ValueError(f"{where}: field 'threshold' has {int((theta < 0).sum())} negative values; "
                         "saelab's JumpReLU needs thresholds >= 0")
    lt = theta.double().log().float()
    up, down = torch.full_like(lt, float("inf")), torch.full_like(lt, float("-inf"))
    cands = [lt, torch.nextafter(lt, up), torch.nextafter(lt, down)]
    cands += [torch.nextafter(cands[1], up), torch.nextafter(cands[2], down)]
    c = torch.stack(cands)  # [5, width]
    err = (c.exp().double() - theta.double()).abs()
    return c.gather(0, err.argmin(0, keepdim=True))[0]


def threshold_rel_err(threshold: torch.Tensor, sae: SparseCoder) -> float:
    """Largest relative gap between a file's thresholds and the loaded SAE's (0.0 when exact):
    a latent can differ only where a pre-activation lies inside that gap."""
    own = sae.log_threshold.exp() if hasattr(sae, "log_threshold") else sae.threshold.expand_as(threshold)
    theta = threshold.detach().double()
    return float(((own.detach().double() - theta).abs() / theta.abs().clamp_min(1e-30)).max())


def fold_input_bias(b_enc: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
    """b_enc' with (x - b_dec) W + b_enc' == x W + b_enc: for formats that do not subtract b_dec."""
    return (b_enc.double() + b_dec.double() @ W_enc.double()).float()


def unfold_input_bias(b_enc: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
    """Inverse of fold_input_bias: the bias for a format whose encoder sees raw x."""
    return (b_enc.double() - b_dec.double() @ W_enc.double()).float()


def hook_to_saelab(name: str | None) -> str | None:
    """'blocks.10.hook_resid_post' / 'resid_post.10' -> 'resid_post.10'; None if saelab has no such hook."""
    if not name:
        return None
    try:
        return str(HookPoint.parse(name))
    except ValueError:
        return None


def hook_to_tl(name: str | None) -> str | None:
    """saelab 'resid_post.10' -> TransformerLens 'blocks.10.hook_resid_post' (SAELens hook names)."""
    if not name:
        return None
    return HookPoint.parse(name).to_transformer_lens()


def refuse(where: str, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{where}: field {field!r} = {value!r} cannot be honoured: {why}")


def unsupported_export(fmt: str, sae: SparseCoder, why: str) -> ValueError:
    c = sae.cfg
    kind = f"{c.architecture}{' transcoder' if c.transcoder else ''}{' with skip' if c.skip else ''}"
    return ValueError(f"cannot export a saelab {kind} to {fmt}: {why}")
