"""Tiny randomly initialised models with a byte-level tokenizer, built in tests (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(model_type: str = "llama", **kw):
    from transformers import AutoConfig

    base = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    base.update(kw)
    return AutoConfig.for_model(model_type, **base)


def save_tiny(path: Path, model_type: str = "llama", seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def train_tiny_sae(root: Path, model_dir: Path, loaded, text: Path, hook: str = "resid_post.1"):
    """A small TopK SAE trained on the tiny model (harvest 8k tokens, train 60k): a RunDir."""
    from saelab.activations.harvest import HarvestConfig, harvest
    from saelab.saes.config import SAEConfig
    from saelab.train.trainer import TrainConfig, train

    store = harvest(HarvestConfig(model=str(model_dir), hook=hook, text=str(text), tokens=8000, ctx_len=64,
                                  batch_size=8, out=str(root / "s")), loaded=loaded, progress=False)
    return train(TrainConfig(store=str(store.path), runs_dir=str(root / "runs"), name="r",
                             sae=SAEConfig(width=128, k=8), tokens=60_000, batch_size=256, lr=3e-3), progress=False)


def drop_fields(path, fields):
    """Rewrite a stored YAML/JSON config without some fields: what an older saelab wrote before
    those fields (with their defaults) existed."""
    import json

    import yaml

    text = path.read_text()
    data = yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
    node = data if path.suffix == ".yaml" else data["config"]
    for f in fields:
        *parents, leaf = f.split(".")
        n = node
        for p in parents:
            n = n[p]
        del n[leaf]
    path.write_text(yaml.safe_dump(data) if path.suffix == ".yaml" else json.dumps(data))
