"""sparsify (EleutherAI) format: cfg.json (SparseCoderConfig fields + d_in) + sae.safetensors
with encoder.weight [width, d_in], encoder.bias [width], W_dec [width, d_in], b_dec [d_in],
optional W_skip [d_out, d_in]. A multi-layer checkpoint is a folder of such folders named by
hookpoint ('layers.10', 'layers.10.mlp').

sparsify encodes TopK(ReLU(((x - b_dec) if not transcode else x) @ encoder.weight.T + encoder.bias)),
so the correct map is W_enc = encoder.weight.T, W_dec as is, b_dec subtracted for SAEs
(SAELens's sparsify loader gets the last two wrong). `activation: groupmax` is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import load_file
from safetensors.torch import save as st_bytes

from saelab.io import atomic_write, read_json, write_json
from saelab.saes.base import FORMAT as NATIVE_FORMAT
from saelab.saes.base import SparseCoder
from saelab.saes.formats.base import (
    Meta,
    build,
    hook_to_saelab,
    refuse,
    sae_config,
    saved_config,
    unsupported_export,
    weights,
)

CFG, WEIGHTS = "cfg.json", "sae.safetensors"
SIDECAR = "saelab.json"  # saelab's own config and hooks, next to the files sparsify reads


def detect(path: Path) -> bool:
    if not ((path / CFG).is_file() and (path / WEIGHTS).is_file()):
        return False
    cfg = read_json(path / CFG)
    return cfg.get("format") != NATIVE_FORMAT and "d_in" in cfg and "d_sae" not in cfg and ("k" in cfg or "num_latents" in cfg)


def layers(path: Path) -> list[Path]:
    """The SAE folders of a multi-layer sparsify checkpoint (natural order)."""
    subs = [p for p in path.iterdir() if p.is_dir() and detect(p)] if path.is_dir() else []
    return sorted(subs, key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)])


def hookpoint_to_saelab(name: str, transcoder: bool) -> str | None:
    """'layers.10' -> resid_post.10; 'layers.10.mlp' -> mlp_out.10 (an SAE on the MLP output;
    a transcoder's 'layers.10.mlp' is the MLP's input, which saelab has no hook for)."""
    if m := re.fullmatch(r"layers\.(\d+)", name):
        return f"resid_post.{m.group(1)}"
    if not transcoder and (m := re.fullmatch(r"layers\.(\d+)\.(mlp|self_attn)", name)):
        return f"{'mlp_out' if m.group(2) == 'mlp' else 'attn_out'}.{m.group(1)}"
    return hook_to_saelab(name)


def load(path: Path) -> tuple[SparseCoder, Meta]:
    where = str(path / CFG)
    cfg = read_json(path / CFG)
    if cfg.get("activation", "topk") != "topk":
        raise refuse(where, "activation", cfg["activation"], "saelab implements sparsify's 'topk' activation only")
    sd = load_file(path / WEIGHTS)
    d_in = int(cfg["d_in"])
    width = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    transcoder, skip = bool(cfg.get("transcode", False)), bool(cfg.get("skip_connection", False))
    if skip and not transcoder:
        raise refuse(where, "skip_connection", True, "saelab puts skip connections on transcoders only (transcode: true)")
    if "W_dec" not in sd:
        raise ValueError(f"{path / WEIGHTS}: no W_dec (an encoder-only checkpoint cannot decode)")
    t = {"W_enc": sd.pop("encoder.weight").T, "b_enc": sd.pop("encoder.bias"), "W_dec": sd.pop("W_dec"),
         "b_dec": sd.pop("b_dec")}
    if skip:
        t["W_skip"] = sd.pop("W_skip").T
    if sd:
        raise ValueError(f"{path / WEIGHTS}: unexpected tensors {sorted(sd)}")
    side = read_json(path / SIDECAR) if (path / SIDECAR).is_file() else {}
    sae_cfg = saved_config(side, sae_config("topk", d_in, width, transcoder=transcoder, skip=skip, k=cfg["k"]))
    meta = {"hook": side.get("hook") or hookpoint_to_saelab(path.name, transcoder),
            "hook_out": side.get("hook_out"), "model": side.get("model"),
            "source_format": "sparsify", "source_hook": path.name}
    return build(sae_cfg, t, where), meta


def save(sae: SparseCoder, meta: Meta, path: Path) -> None:
    c = sae.cfg
    if c.architecture != "topk":
        raise unsupported_export("sparsify", sae, "sparsify coders are TopK (per-token k) only")
    if c.transcoder and (c.d_out or c.d_in) != c.d_in:
        raise unsupported_export("sparsify", sae, f"sparsify transcoders map d_in -> d_in (here {c.d_in} -> {c.d_out})")
    w = weights(sae)
    out = {"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
           "b_dec": w["b_dec"]}
    if c.skip:
        out["W_skip"] = w["W_skip"].T.contiguous()
    cfg = {"activation": "topk", "expansion_factor": max(1, c.width // c.d_in), "normalize_decoder": True,
           "num_latents": c.width, "k": c.k, "multi_topk": False, "skip_connection": c.skip,
           "transcode": c.transcoder, "d_in": c.d_in}
    path.mkdir(parents=True, exist_ok=True)
    with atomic_write(path / WEIGHTS) as f:
        f.write(st_bytes(out))
    write_json(path / SIDECAR, {"sae": c.model_dump(mode="json"), "hook": meta.get("hook"),
                                "hook_out": meta.get("hook_out"), "model": meta.get("model")})
    write_json(path / CFG, cfg)
