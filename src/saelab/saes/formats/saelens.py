"""SAELens v6 format: cfg.json + sae_weights.safetensors (what `SAE.save_model` writes and
`SAE.load_from_disk` reads).

Architectures and their encode (SAELens v6.54):
  standard                 ReLU((x - b_dec*apply) W_enc + b_enc)                      -> relu
  topk                     ReLU(topk(pre)), pre optionally * ||W_dec_i|| (rescale...) -> topk
  jumprelu                 ReLU(pre) * (pre > threshold)                               -> jumprelu
  gated                    1[x_c W_enc + b_gate > 0] ReLU(x_c W_enc e^r_mag + b_mag)   -> gated
  transcoder / skip_transcoder / jumprelu_transcoder / jumprelu_skip_transcoder
                           as above without b_dec subtraction, W_skip [d_out, d_in]    -> transcoders
BatchTopK / Matryoshka SAEs are saved for inference as jumprelu with one shared threshold.
`apply_b_dec_to_input=False` on an SAE is honoured by folding b_dec into b_enc;
`rescale_acts_by_decoder_norm` by folding the decoder norms into the encoder;
`normalize_activations: expected_average_only_in` by folding the scaling factor of the
checkpoint's activation_scaler.json (refused without one).
A saelab export also leaves its own SAEConfig in metadata.saelab, so the round trip
restores the architecture (e.g. batchtopk rather than jumprelu) exactly.
"""

from __future__ import annotations

from pathlib import Path

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
    hook_to_tl,
    log_threshold_of,
    refuse,
    sae_config,
    saved_config,
    threshold_rel_err,
    unsupported_export,
    weights,
)

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
SCALER = "activation_scaler.json"  # {"scaling_factor": s}, saved with SAELens training checkpoints
SCHEMA_VERSION = "6.0.0"  # the cfg.json layout written here (v6 field names, metadata block)
TRANSCODERS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True),
               "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}
SUPPORTED = ("standard", "topk", "jumprelu", "gated", *TRANSCODERS)


def detect(path: Path) -> bool:
    if not ((path / CFG).is_file() and (path / WEIGHTS).is_file()):
        return False
    return "d_sae" in read_json(path / CFG)


def _v6(cfg: dict) -> dict:
    """Pre-6.0 cfg.json field names -> v6 (as SAELens's handle_pre_6_0_config does)."""
    meta = dict(cfg.get("metadata") or {})
    for old, new in (("hook_point", "hook_name"), ("hook_name", "hook_name"), ("model_name", "model_name"),
                     ("hook_name_out", "hook_name_out")):
        if old in cfg and new not in meta:
            meta[new] = cfg[old]
    cfg = {**cfg, "metadata": meta}
    cfg.setdefault("architecture", "standard")
    kw = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn") == "topk" and kw.get("k") is not None:
        cfg["architecture"], cfg["k"] = "topk", kw["k"]
    return cfg


def load(path: Path) -> tuple[SparseCoder, Meta]:
    where = str(path / CFG)
    cfg = _v6(read_json(path / CFG))
    arch = cfg["architecture"]
    if arch not in SUPPORTED:
        raise refuse(where, "architecture", arch, f"saelab reads {', '.join(SUPPORTED)}")
    norm, scale = cfg.get("normalize_activations", "none"), None
    if norm == "expected_average_only_in" and (path / SCALER).is_file():
        scale = float(read_json(path / SCALER)["scaling_factor"])  # a training checkpoint: fold it below
    elif norm != "none":
        raise refuse(where, "normalize_activations", norm,
                     "saelab SAEs take raw activations; fold the normalisation into the weights first "
                     f"(SAELens: sae.fold_activation_norm_scaling_factor(factor) then save_model, or keep {SCALER} "
                     "next to an expected_average_only_in checkpoint)")
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise refuse(where, "reshape_activations", cfg["reshape_activations"], "expected 'none' or 'hook_z'")
    if cfg.get("hook_head_index") is not None or cfg["metadata"].get("hook_head_index") is not None:
        raise refuse(where, "hook_head_index", cfg.get("hook_head_index"), "single-head SAEs are not supported")
    sd = load_file(path / WEIGHTS)
    if "scaling_factor" in sd:
        if not torch.allclose(sd["scaling_factor"], torch.ones_like(sd["scaling_factor"])):
            raise refuse(where, "scaling_factor", "(not all ones)", "finetuning scaling factors are not supported")
        del sd["scaling_factor"]
    d_in, width = int(cfg["d_in"]), int(cfg["d_sae"])
    transcoder = arch in TRANSCODERS
    base_arch, skip = TRANSCODERS.get(arch, ({"standard": "relu"}.get(arch, arch), False))

    t = {"W_enc": sd.pop("W_enc"), "W_dec": sd.pop("W_dec"), "b_dec": sd.pop("b_dec")}
    if arch == "gated":
        t["b_enc"], t["r_mag"], t["b_mag"] = sd.pop("b_gate"), sd.pop("r_mag"), sd.pop("b_mag")
    else:
        t["b_enc"] = sd.pop("b_enc")
    theta = None
    if base_arch == "jumprelu":
        theta = sd.pop("threshold", None)  # [width]
        t["log_threshold"] = sd.pop("log_threshold") if theta is None else log_threshold_of(theta, where)
    if skip:
        t["W_skip"] = sd.pop("W_skip").T
    if sd:
        raise ValueError(f"{path / WEIGHTS}: unexpected tensors {sorted(sd)} for architecture {arch!r}")
    t = {k: v.float() for k, v in t.items()}

    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # pre_i * ||W_dec_i|| and decode with W_dec_i / ||W_dec_i||: fold the norms into the encoder
        n = t["W_dec"].norm(dim=1)
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * n, t["b_enc"] * n, t["W_dec"] / n[:, None]
    if not transcoder and not cfg.get("apply_b_dec_to_input", True):
        if arch == "gated":
            t["b_mag"] = fold_input_bias(t["b_mag"], t["b_dec"], t["W_enc"] * t["r_mag"].exp())
        t["b_enc"] = fold_input_bias(t["b_enc"], t["b_dec"], t["W_enc"])

    d_out = int(cfg.get("d_out", d_in)) if transcoder else None
    sae_cfg = saved_config(cfg["metadata"].get("saelab"),
                           sae_config(base_arch, d_in, width, d_out, transcoder=transcoder, skip=skip, k=cfg.get("k")))
    if sae_cfg.architecture in ("batchtopk", "matryoshka"):
        lt = t.pop("log_threshold")
        theta = lt.exp() if theta is None else theta.float()
        if not bool((theta == theta[0]).all()):
            raise refuse(where, "metadata.saelab", sae_cfg.architecture, "its per-latent thresholds differ")
        t["threshold"] = theta[0].clone()
    ref = build(sae_cfg, t, where)
    if scale is not None:  # trained on s * x (outputs s * y): as SAELens's fold_activation_norm_scaling_factor
        ref.fold_input_scale(scale, scale)
    m = cfg["metadata"]
    meta = {"hook": hook_to_saelab(m.get("hook_name")), "hook_out": hook_to_saelab(m.get("hook_name_out")),
            "model": m.get("model_name"), "source_format": "saelens", "source_hook": m.get("hook_name")}
    if theta is not None:
        meta["threshold_rel_err"] = threshold_rel_err(theta.float(), ref)
    return ref, meta


def save(sae: SparseCoder, meta: Meta, path: Path) -> None:
    c = sae.cfg
    w = weights(sae)
    arch = c.architecture
    if c.transcoder:
        base = {"relu": "transcoder", "panneal": "transcoder", "jumprelu": "jumprelu_transcoder",
                "batchtopk": "jumprelu_transcoder", "matryoshka": "jumprelu_transcoder"}.get(arch)
        if base is None:
            raise unsupported_export("SAELens", sae, "SAELens transcoders are ReLU or JumpReLU")
        name = base.replace("transcoder", "skip_transcoder") if c.skip else base
    else:
        name = {"relu": "standard", "panneal": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                "batchtopk": "jumprelu", "matryoshka": "jumprelu"}[arch]
    out = {"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    if arch == "gated":
        out.update(b_gate=w["b_enc"], r_mag=w["r_mag"], b_mag=w["b_mag"])
    else:
        out["b_enc"] = w["b_enc"]
    if arch == "jumprelu":
        out["threshold"] = w["log_threshold"].exp()
    elif arch in ("batchtopk", "matryoshka"):
        if float(w["threshold"]) < 0:
            raise unsupported_export("SAELens", sae, "its inference threshold was never estimated (train it first)")
        out["threshold"] = torch.full((c.width,), float(w["threshold"]))
    if c.skip:
        out["W_skip"] = w["W_skip"].T.contiguous()
    cfg = {"d_in": c.d_in, "d_sae": c.width, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": not c.transcoder, "normalize_activations": "none",
           "reshape_activations": "none", "architecture": name,
           "metadata": {"sae_lens_version": SCHEMA_VERSION, "sae_lens_training_version": None,
                        "model_name": meta.get("model"), "hook_name": hook_to_tl(meta.get("hook")),
                        "hook_name_out": hook_to_tl(meta.get("hook_out")),
                        "saelab": {"sae": c.model_dump(mode="json")}}}
    if name == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    if c.transcoder:
        cfg["d_out"] = c.d_out or c.d_in
    path.mkdir(parents=True, exist_ok=True)
    with atomic_write(path / WEIGHTS) as f:
        f.write(st_bytes(out))
    write_json(path / CFG, cfg)
