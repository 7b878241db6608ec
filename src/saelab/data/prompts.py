"""Contrastive prompt pairs for causal circuits, built offline: a clean prompt, a patched prompt
of the same token length that differs in the one thing the metric is about, and the right and
wrong next tokens for the clean prompt (the metric is logit(right) - logit(wrong) at the last
position; on the patched prompt the two swap roles).

- agreement: subject-verb number agreement ("The dog near the tables" -> " is" vs " are"), nouns
  made plural with PyPI `inflect`; the patched prompt flips the subject's number. Half of the
  pairs start singular, half plural. Only nouns whose singular and plural are one token each
  (with the leading space) are used, so every prompt of a template has the same length.
- induction: a random sequence of common single-token words followed by its repeat up to the
  last word (the model should continue with that last word); the patched prompt changes that
  last word in the first occurrence, so induction predicts the other word.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

NOUNS = ("dog cat horse bird child doctor teacher farmer king queen student author artist driver lawyer nurse "
         "pilot singer player writer friend neighbor boy girl man woman officer soldier judge baker "
         "chef guard guest owner worker manager painter dancer actor engineer scientist farmer camel lion "
         "tiger wolf bear fox mouse goose house tree car book key door table chair window road river "
         "mountain city village ship train plane bottle cup box bag tool machine computer phone").split()
PLACES = ("table", "house", "tree", "road", "river", "window", "door", "car", "ship", "box")
TEMPLATES = ("The {noun}", "The {noun} near the {place}", "The {noun} behind the {place}")


@dataclass
class PromptPairs:
    name: str
    clean: torch.Tensor  # [n, T] token ids
    patch: torch.Tensor  # [n, T]
    right: torch.Tensor  # [n] the clean prompt's right next token
    wrong: torch.Tensor  # [n] ... and the wrong one (the patched prompt's right one)
    texts: list[tuple[str, str]]
    note: str

    def __len__(self) -> int:
        return self.clean.shape[0]

    def metric(self, logits: torch.Tensor, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """logit(right) - logit(wrong) at the last position, per prompt [B]."""
        last = logits[:, -1].float()
        r, w = self.right[idx].to(last.device), self.wrong[idx].to(last.device)
        return last.gather(1, r[:, None])[:, 0] - last.gather(1, w[:, None])[:, 0]


def _one_token(tok: PreTrainedTokenizerBase, word: str) -> int | None:
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _ids(tok: PreTrainedTokenizerBase, text: str, bos: bool) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ([tok.bos_token_id] if bos and tok.bos_token_id is not None else []) + ids


def agreement(tok: PreTrainedTokenizerBase, n: int, seed: int = 0, prepend_bos: bool = True,
              template: str = TEMPLATES[1]) -> PromptPairs:
    import inflect

    engine = inflect.engine()
    verbs = (_one_token(tok, "is"), _one_token(tok, "are"))
    if None in verbs:
        raise ValueError("agreement: ' is' / ' are' are not single tokens of this tokenizer")
    nouns = [(s, p) for s in NOUNS if (p := engine.plural_noun(s)) and p != s
             and _one_token(tok, s) is not None and _one_token(tok, p) is not None]
    places = [(s, engine.plural_noun(s)) for s in PLACES if _one_token(tok, s) is not None]
    if len(nouns) < 4:
        raise ValueError(f"agreement: only {len(nouns)} nouns whose singular and plural are single tokens")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        (s, p), (ps, pp) = rng.choice(nouns), rng.choice(places or [("", "")])
        place = rng.choice((ps, pp))  # the distractor noun's number is random: attractors both ways
        sing, plur = template.format(noun=s, place=place), template.format(noun=p, place=place)
        clean, patch, right, wrong = (sing, plur, verbs[0], verbs[1]) if i % 2 == 0 else (plur, sing, verbs[1], verbs[0])
        rows.append((clean, patch, right, wrong))
    return _pairs("agreement", rows, tok, prepend_bos, f"template {template!r}, {len(nouns)} nouns (inflect)")


def induction(tok: PreTrainedTokenizerBase, n: int, length: int = 6, seed: int = 0, prepend_bos: bool = True
              ) -> PromptPairs:
    words = [w for w in NOUNS if _one_token(tok, w) is not None]
    if len(words) < length + 1:  # a tokenizer without whole-word tokens (e.g. byte-level): single letters
        words = [c for c in "abcdefghijklmnopqrstuvwxyz" if len(tok(" " + c, add_special_tokens=False)["input_ids"]) == 1
                 or len(tok(c, add_special_tokens=False)["input_ids"]) == 1]
    if len(words) < length + 1:
        raise ValueError("induction: too few single-token words")
    rng = random.Random(seed)
    bos = [tok.bos_token_id] if prepend_bos and tok.bos_token_id is not None else []
    clean, patch, right, wrong, texts = [], [], [], [], []
    for _ in range(n):
        seq = rng.sample(words, length + 1)
        first, other = seq[:length], seq[length]
        alt = [*first[:-1], other]
        ids = {w: _one_token(tok, w) or tok(w, add_special_tokens=False)["input_ids"][0] for w in seq}  # one token each
        clean.append(bos + [ids[w] for w in first + first[:-1]])
        patch.append(bos + [ids[w] for w in alt + first[:-1]])
        right.append(ids[first[-1]])
        wrong.append(ids[other])
        texts.append((" ".join(first + first[:-1]), " ".join(alt + first[:-1])))
    return PromptPairs("induction", torch.tensor(clean), torch.tensor(patch), torch.tensor(right), torch.tensor(wrong),
                       texts, f"{length} random single-token words, then all but the last again")


def _pairs(name: str, rows, tok, bos: bool, note: str) -> PromptPairs:
    clean = [_ids(tok, c, bos) for c, _, _, _ in rows]
    patch = [_ids(tok, p, bos) for _, p, _, _ in rows]
    lengths = {len(x) for x in clean + patch}
    if len(lengths) != 1:
        raise ValueError(f"{name}: prompts tokenise to different lengths {sorted(lengths)}; every pair must align")
    return PromptPairs(name, torch.tensor(clean), torch.tensor(patch), torch.tensor([r for *_, r, _ in rows]),
                       torch.tensor([w for *_, w in rows]), [(c, p) for c, p, _, _ in rows], note)


TASKS = {"agreement": agreement, "induction": induction}
