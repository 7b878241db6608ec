"""Read and write sparse coders in the formats users already have: saelab's native format,
SAELens, sparsify, dictionary_learning and Gemma Scope.

  load(path)                   -> (sae, meta); the format is detected from the files
  save(sae, meta, path, fmt)   writes one format
  convert(src, dst, to)        load + save (every layer of a multi-layer sparsify folder)
  describe(sae, meta)          architecture, sizes, hook, decoder-norm statistics

Every adapter either reproduces the source library's encode exactly (the fidelity tests
compare against the real SAELens and sparsify) or refuses, naming the field it cannot honour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saelab.saes.base import FORMAT as NATIVE_FORMAT
from saelab.saes.base import SparseCoder, load_sae
from saelab.saes.formats import dictlearn, gemmascope, saelens, sparsify
from saelab.saes.formats.base import Format, Meta
from saelab.saes.formats.base import weights as coder_weights


def _native_detect(path: Path) -> bool:
    from saelab.io import read_json
    return (path / "cfg.json").is_file() and (path / "sae.safetensors").is_file() and \
        read_json(path / "cfg.json").get("format") == NATIVE_FORMAT


def _native_load(path: Path) -> tuple[SparseCoder, Meta]:
    sae, meta = load_sae(path)
    return sae, {"hook": meta.get("hook"), "hook_out": meta.get("hook_out"), "model": meta.get("model"),
                 "source_format": "saelab"}


def _native_save(sae: SparseCoder, meta: Meta, path: Path) -> None:
    sae.save(path, {k: meta.get(k) for k in ("hook", "hook_out", "model")})


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("saelab", f"cfg.json (format {NATIVE_FORMAT}) + sae.safetensors", _native_detect, _native_load, _native_save),
    Format("saelens", "cfg.json (with d_sae, architecture) + sae_weights.safetensors", saelens.detect, saelens.load,
           saelens.save),
    Format("sparsify", "cfg.json (with d_in, k) + sae.safetensors, or a folder of such folders (one per hookpoint)",
           sparsify.detect, sparsify.load, sparsify.save),
    Format("dictionary_learning", "ae.pt (+ config.json)", dictlearn.detect, dictlearn.load, dictlearn.save),
    Format("gemma_scope", "params.npz or params.safetensors", gemmascope.detect, gemmascope.load, gemmascope.save),
]}
ALIASES = {"sae_lens": "saelens", "sae-lens": "saelens", "native": "saelab", "dictionary-learning": "dictionary_learning",
           "gemmascope": "gemma_scope", "gemma-scope": "gemma_scope"}


def format_name(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        raise ValueError(f"unknown format {name!r}; formats: {', '.join(FORMATS)}")
    return key


def detect(path: str | Path) -> str:
    """The format of a checkpoint folder, or a ValueError listing what each format expects."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        for f in FORMATS.values():
            if f.detect(path):
                return f.name
        if sparsify.layers(path):
            return "sparsify"
    expected = "\n".join(f"  {f.name}: {f.expects}" for f in FORMATS.values())
    found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) if path.is_dir() else "(not a folder)"
    raise ValueError(f"{path} is in no known SAE format (found: {found or 'nothing'}). Expected one of:\n{expected}")


def _resolve(src: str | Path) -> Path:
    """A local folder, or (a code path for users; never used in tests) a hub download:
    'owner/repo' or 'owner/repo/sub/folder' via huggingface_hub, or 'saelens:RELEASE/SAE_ID'
    through SAELens's pretrained directory."""
    path = Path(src)
    if path.exists():
        return path
    text = str(src)
    if text.startswith("saelens:"):
        import tempfile

        from sae_lens import SAE
        release, _, sae_id = text[len("saelens:"):].partition("/")
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
        out = Path(tempfile.mkdtemp(prefix="saelab-saelens-"))
        sae.save_model(out)
        return out
    parts = text.split("/")
    if len(parts) >= 2 and not text.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            root = Path(snapshot_download(repo, allow_patterns=f"{sub}/*" if sub else None))
        except Exception as e:  # offline, no such repo, ...: say both readings of the name
            raise FileNotFoundError(f"{src}: no such local folder, and no hub download ({type(e).__name__}: {e})") from e
        return root / sub if sub else root
    raise FileNotFoundError(f"{src} is neither a local folder nor a hub id (owner/repo[/folder], saelens:RELEASE/ID)")


def load(src: str | Path, fmt: str | None = None) -> tuple[SparseCoder, Meta]:
    """Load one coder (eval mode, float32) and its meta {"hook", "hook_out", "model", "source_format"}."""
    path = _resolve(src)
    name = format_name(fmt) if fmt else detect(path)
    if name == "sparsify" and not sparsify.detect(path):
        subs = [p.name for p in sparsify.layers(path)]
        raise ValueError(f"{path} holds several sparsify coders ({', '.join(subs)}): pass one of those folders")
    sae, meta = FORMATS[name].load(path)
    return sae, {**meta, "format": name}


def save(sae: SparseCoder, meta: Meta, path: str | Path, fmt: str) -> Path:
    path = Path(path)
    FORMATS[format_name(fmt)].save(sae, meta, path)
    return path


def convert(src: str | Path, dst: str | Path, to: str, fmt: str | None = None) -> list[tuple[Path, Path]]:
    """Convert a checkpoint (or every layer of a multi-layer sparsify folder) to format `to`."""
    path, dst = _resolve(src), Path(dst)
    name = format_name(fmt) if fmt else detect(path)
    pairs = [(p, dst / p.name) for p in sparsify.layers(path)] if name == "sparsify" and not sparsify.detect(path) \
        else [(path, dst)]
    for s, d in pairs:
        sae, meta = load(s, name)
        save(sae, meta, d, to)
    return pairs


def describe(sae: SparseCoder, meta: Meta) -> dict[str, Any]:
    """What `saelab inspect` prints: architecture, sizes, hooks, decoder-norm statistics."""
    c = sae.cfg
    w = coder_weights(sae)
    norms = w["W_dec"].norm(dim=1)
    q = torch.quantile(norms, torch.tensor([0.0, 0.5, 1.0]))
    out: dict[str, Any] = {
        "format": meta.get("format"), "architecture": c.architecture, "transcoder": c.transcoder, "skip": c.skip,
        "d_in": c.d_in, "d_out": c.d_out or c.d_in, "width": c.width, "hook": meta.get("hook"),
        "hook_out": meta.get("hook_out"), "source_hook": meta.get("source_hook"), "model": meta.get("model"),
        "decoder_norm": {"min": float(q[0]), "median": float(q[1]), "mean": float(norms.mean()), "max": float(q[2])},
        "b_dec_norm": float(w["b_dec"].norm()),
    }
    if c.architecture in ("topk", "batchtopk", "matryoshka"):
        out["k"] = c.k
    if "threshold_rel_err" in meta:  # how far the file's JumpReLU thresholds moved on import
        out["threshold_rel_err"] = meta["threshold_rel_err"]
    if "threshold" in w:
        out["threshold"] = float(w["threshold"])
    if "log_threshold" in w:
        th = w["log_threshold"].exp()
        out["threshold"] = {"min": float(th.min()), "median": float(th.median()), "max": float(th.max())}
    return out
