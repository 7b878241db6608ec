"""Gemma Scope native parameters (Lieberum et al. 2024, "Gemma Scope"): a JumpReLU SAE or
transcoder as params.npz (Gemma Scope 1: W_enc [d_in, width], W_dec [width, d_out], b_enc,
b_dec, threshold) or params.safetensors (Gemma Scope 2: w_enc, w_dec, b_enc, b_dec,
threshold, optional affine_skip_connection [d_in, d_out]).

Encode: pre = x @ W_enc + b_enc (x is not centred); z = ReLU(pre) * (pre > threshold).
An SAE (d_in == d_out, no skip) loads as a saelab JumpReLU SAE with b_dec folded into b_enc;
otherwise as a JumpReLU transcoder, which computes exactly that. Exported files are
Gemma Scope 2 style params.safetensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_bytes

from saelab.io import atomic_write, read_json, write_json
from saelab.saes.base import SparseCoder
from saelab.saes.formats.base import (
    Meta,
    build,
    fold_input_bias,
    hook_to_saelab,
    log_threshold_of,
    sae_config,
    threshold_rel_err,
    unfold_input_bias,
    unsupported_export,
    weights,
)

NPZ, SAFETENSORS, CFG = "params.npz", "params.safetensors", "config.json"


def detect(path: Path) -> bool:
    return (path / NPZ).is_file() or (path / SAFETENSORS).is_file()


def load(path: Path) -> tuple[SparseCoder, Meta]:
    if (path / SAFETENSORS).is_file():
        where, raw = str(path / SAFETENSORS), load_file(path / SAFETENSORS)
    else:
        where = str(path / NPZ)
        with np.load(path / NPZ) as data:
            raw = {k: torch.from_numpy(np.asarray(data[k], dtype=np.float32)) for k in data.files}
    sd = {k.lower(): v.float() for k, v in raw.items()}
    need = {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"}
    if not need <= set(sd):
        raise ValueError(f"{where}: Gemma Scope params need {sorted(need)}, found {sorted(sd)}")
    extra = set(sd) - need - {"affine_skip_connection"}
    if extra:
        raise ValueError(f"{where}: unexpected parameters {sorted(extra)}")
    W_enc, W_dec, b_enc, b_dec = sd["w_enc"], sd["w_dec"], sd["b_enc"], sd["b_dec"]
    (d_in, width), d_out = W_enc.shape, W_dec.shape[1]
    skip = "affine_skip_connection" in sd
    transcoder = skip or d_out != d_in
    t = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": b_dec, "log_threshold": log_threshold_of(sd["threshold"], where),
         "b_enc": b_enc if transcoder else fold_input_bias(b_enc, b_dec, W_enc)}
    if skip:
        t["W_skip"] = sd["affine_skip_connection"]
    cfg = sae_config("jumprelu", d_in, width, d_out, transcoder=transcoder, skip=skip)
    info = read_json(path / CFG) if (path / CFG).is_file() else {}
    meta = {"hook": info.get("hook") or hook_to_saelab(info.get("hook_name")), "hook_out": info.get("hook_out"),
            "model": info.get("model") or info.get("model_name"), "source_format": "gemma_scope",
            "source_hook": info.get("hook_name")}
    sae = build(cfg, t, where)
    return sae, {**meta, "threshold_rel_err": threshold_rel_err(sd["threshold"], sae)}


def save(sae: SparseCoder, meta: Meta, path: Path) -> None:
    c = sae.cfg
    w = weights(sae)
    if c.architecture == "jumprelu":
        theta = w["log_threshold"].exp()
    elif c.architecture in ("batchtopk", "matryoshka") and float(w["threshold"]) >= 0:
        theta = torch.full((c.width,), float(w["threshold"]))
    else:
        raise unsupported_export("Gemma Scope", sae, "Gemma Scope coders are JumpReLU (per-latent thresholds)")
    out = {"w_enc": w["W_enc"], "w_dec": w["W_dec"], "b_dec": w["b_dec"], "threshold": theta,
           "b_enc": w["b_enc"] if c.transcoder else unfold_input_bias(w["b_enc"], w["b_dec"], w["W_enc"])}
    if c.skip:
        out["affine_skip_connection"] = w["W_skip"]
    path.mkdir(parents=True, exist_ok=True)
    with atomic_write(path / SAFETENSORS) as f:
        f.write(st_bytes(out))
    write_json(path / CFG, {"hook": meta.get("hook"), "hook_out": meta.get("hook_out"), "model": meta.get("model"),
                            "architecture": "jump_relu", "width": c.width})
