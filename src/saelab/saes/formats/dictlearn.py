"""dictionary_learning (saprmarks/dictionary_learning, read at commit 60ec6bf) format:
ae.pt (a torch state dict) + config.json ({"trainer": {"dict_class", "trainer_class",
"activation_dim", "dict_size", "k", "layer", "lm_name", "submodule_name", ...}}).

dict_class (trainer classes)                        encode                       -> saelab
  AutoEncoder (StandardTrainer[AprilUpdate], PAnnealTrainer)
       encoder.weight [F, D], encoder.bias, decoder.weight [D, F], bias [D]
                                                    ReLU(enc(x - bias))          -> relu
  AutoEncoderNew: encoder/decoder with biases       ReLU(enc(x))                 -> relu (b_dec folded)
  GatedAutoEncoder (GatedSAETrainer, GatedAnnealTrainer)
       encoder.weight, gate_bias, mag_bias, r_mag, decoder.weight, decoder_bias  -> gated
  JumpReluAutoEncoder (JumpReluTrainer): W_enc, b_enc, W_dec, b_dec, threshold;
       ReLU(pre * (pre > threshold)), x not centred  -> jumprelu (b_dec folded into b_enc)
  AutoEncoderTopK (TopKTrainer): encoder, decoder, b_dec, k; top-k of ReLU(enc(x - b_dec)) -> topk
  BatchTopKSAE (BatchTopKTrainer): same tensors + threshold; ReLU'd pre > threshold  -> batchtopk
  MatryoshkaBatchTopKSAE: W_enc, b_enc, W_dec, b_dec, k, threshold, group_sizes   -> matryoshka
The final ae.pt of a run takes raw activations (the trainer rescales the biases by
norm_factor at the end); a mid-run backup ({"ae": ..., "step": ...}) of a normalised run
does not, and is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saelab.io import atomic_write, read_json, write_json
from saelab.saes.base import SparseCoder
from saelab.saes.formats.base import (
    Meta,
    build,
    fold_input_bias,
    hook_to_saelab,
    log_threshold_of,
    refuse,
    sae_config,
    saved_config,
    threshold_rel_err,
    unfold_input_bias,
    unsupported_export,
    weights,
)

AE, CFG = "ae.pt", "config.json"
TRAINERS = {"relu": ("AutoEncoder", "StandardTrainer"), "panneal": ("AutoEncoder", "PAnnealTrainer"),
            "gated": ("GatedAutoEncoder", "GatedSAETrainer"), "jumprelu": ("JumpReluAutoEncoder", "JumpReluTrainer"),
            "topk": ("AutoEncoderTopK", "TopKTrainer"), "batchtopk": ("BatchTopKSAE", "BatchTopKTrainer"),
            "matryoshka": ("MatryoshkaBatchTopKSAE", "MatryoshkaBatchTopKTrainer")}


def detect(path: Path) -> bool:
    return (path / AE).is_file()


def _dict_class(sd: dict, declared: str | None) -> str:
    keys = set(sd)
    if "group_sizes" in keys:
        return "MatryoshkaBatchTopKSAE"
    if "gate_bias" in keys:
        return "GatedAutoEncoder"
    if "W_enc" in keys and "threshold" in keys:
        return "JumpReluAutoEncoder"
    if "k" in keys:
        return "BatchTopKSAE" if declared == "BatchTopKSAE" else "AutoEncoderTopK"
    if "decoder.bias" in keys:
        return "AutoEncoderNew"
    if "bias" in keys:
        return "AutoEncoder"
    raise ValueError(f"unrecognised dictionary_learning state dict (keys {sorted(keys)})")


def load(path: Path) -> tuple[SparseCoder, Meta]:
    where = str(path / AE)
    raw = torch.load(path / AE, map_location="cpu", weights_only=True)
    config = read_json(path / CFG) if (path / CFG).is_file() else {}
    tr = config.get("trainer", {})
    if "ae" in raw and "step" in raw:  # a backup written during training
        if raw.get("norm_factor") not in (None, 1, 1.0):
            raise refuse(where, "norm_factor", raw["norm_factor"],
                         "this is a mid-run backup whose biases are still in normalised units; use the final ae.pt")
        raw = raw["ae"]
    sd = {k: v.float() for k, v in raw.items() if k not in ("k", "group_sizes")}
    cls = _dict_class(raw, tr.get("dict_class"))
    if tr.get("dict_class") and tr["dict_class"] != cls:
        raise refuse(str(path / CFG), "trainer.dict_class", tr["dict_class"], f"the tensors in ae.pt are a {cls}")
    if cls == "AutoEncoder":
        t = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["encoder.bias"], "W_dec": sd["decoder.weight"].T,
             "b_dec": sd["bias"]}
        arch = "panneal" if tr.get("trainer_class") == "PAnnealTrainer" else "relu"
    elif cls == "AutoEncoderNew":
        W_enc, b_dec = sd["encoder.weight"].T, sd["decoder.bias"]
        t = {"W_enc": W_enc, "b_enc": fold_input_bias(sd["encoder.bias"], b_dec, W_enc),
             "W_dec": sd["decoder.weight"].T, "b_dec": b_dec}
        arch = "relu"
    elif cls == "GatedAutoEncoder":
        t = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["gate_bias"], "r_mag": sd["r_mag"], "b_mag": sd["mag_bias"],
             "W_dec": sd["decoder.weight"].T, "b_dec": sd["decoder_bias"]}
        arch = "gated"
    elif cls == "JumpReluAutoEncoder":  # apply_b_dec_to_input is False unless loaded through SAELens
        t = {"W_enc": sd["W_enc"], "b_enc": fold_input_bias(sd["b_enc"], sd["b_dec"], sd["W_enc"]),
             "W_dec": sd["W_dec"], "b_dec": sd["b_dec"], "log_threshold": log_threshold_of(sd["threshold"], where)}
        arch = "jumprelu"
    elif cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        t = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["encoder.bias"], "W_dec": sd["decoder.weight"].T,
             "b_dec": sd["b_dec"]}
        arch = "topk" if cls == "AutoEncoderTopK" else "batchtopk"
        if arch == "batchtopk":
            t["threshold"] = sd["threshold"]
    else:  # MatryoshkaBatchTopKSAE
        t = {k: sd[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        arch = "matryoshka"
    d_in, width = t["W_enc"].shape
    extra = {}
    if arch == "matryoshka":
        sizes = raw["group_sizes"].tolist()
        extra["group_fractions"] = [s / width for s in sizes]
    from_file = sae_config(arch, d_in, width, k=int(raw["k"]) if "k" in raw else None, **extra)
    sae_cfg = saved_config(config.get("saelab"), from_file)
    hook = config.get("saelab", {}).get("hook")
    if hook is None and tr.get("layer") is not None:
        hook = hook_to_saelab(f"resid_post.{tr['layer']}") if "mlp" not in str(tr.get("submodule_name", "")) else None
    meta = {"hook": hook, "hook_out": None, "model": tr.get("lm_name"), "source_format": "dictionary_learning",
            "source_hook": tr.get("submodule_name")}
    sae = build(sae_cfg, t, where)
    if "threshold" in sd and sae_cfg.architecture == "jumprelu":
        meta["threshold_rel_err"] = threshold_rel_err(sd["threshold"], sae)
    return sae, meta


def save(sae: SparseCoder, meta: Meta, path: Path) -> None:
    c = sae.cfg
    if c.transcoder:
        raise unsupported_export("dictionary_learning", sae, "its dictionaries are autoencoders (no transcoders)")
    w = weights(sae)
    arch = c.architecture
    if arch in ("relu", "panneal"):
        sd = {"bias": w["b_dec"], "encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"],
              "decoder.weight": w["W_dec"].T.contiguous()}
    elif arch == "gated":
        sd = {"decoder_bias": w["b_dec"], "encoder.weight": w["W_enc"].T.contiguous(), "r_mag": w["r_mag"],
              "gate_bias": w["b_enc"], "mag_bias": w["b_mag"], "decoder.weight": w["W_dec"].T.contiguous()}
    elif arch == "jumprelu":
        sd = {"W_enc": w["W_enc"], "b_enc": unfold_input_bias(w["b_enc"], w["b_dec"], w["W_enc"]),
              "W_dec": w["W_dec"], "b_dec": w["b_dec"], "threshold": w["log_threshold"].exp()}
    elif arch in ("topk", "batchtopk"):
        sd = {"k": torch.tensor(c.k, dtype=torch.int), "threshold": w.get("threshold", torch.tensor(-1.0)),
              "decoder.weight": w["W_dec"].T.contiguous(), "encoder.weight": w["W_enc"].T.contiguous(),
              "encoder.bias": w["b_enc"], "b_dec": w["b_dec"]}
    else:  # matryoshka
        ends = sae.ends
        sd = {"k": torch.tensor(c.k, dtype=torch.int), "threshold": w["threshold"],
              "group_sizes": torch.tensor([b - a for a, b in zip([0, *ends], ends, strict=False)]),
              **{k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}}
    dict_class, trainer_class = TRAINERS[arch]
    hp = meta.get("hook")
    config = {"trainer": {"dict_class": dict_class, "trainer_class": trainer_class, "activation_dim": c.d_in,
                          "dict_size": c.width, **({"k": c.k} if arch in ("topk", "batchtopk", "matryoshka") else {}),
                          "layer": int(hp.split(".")[1]) if hp else None, "lm_name": meta.get("model"),
                          "submodule_name": hp},
              "saelab": {"sae": c.model_dump(mode="json"), "hook": hp}}
    path.mkdir(parents=True, exist_ok=True)
    with atomic_write(path / AE) as f:
        torch.save(sd, f)
    write_json(path / CFG, config)
