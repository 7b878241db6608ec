"""Explanations of latents: LLM prompts over highlighted examples, a consensus merge, and two
baselines with no LLM (the token-list explainer, shuffled explanations).

Example format (delphi, explainers/explainer.py `_highlight`, `_join_activations`, and
latents/samplers.py `normalize_activations`): tokens whose activation exceeds `threshold`
(0.3) x the example's own maximum are wrapped in << >>, and with `show_activations` each
example is followed by its marked tokens with the activation as ceil(10 a / max), max = the
latent's largest activation over the examples shown (at most 10 tokens listed per example).

Prompts (the wording is saelab's; the structure follows the sources named):
- default: delphi's default explainer (explainers/default/prompts.py, SYSTEM): examples ->
  one concise label on a final "[EXPLANATION]:" line;
- contrastive: the latent's examples beside those of its decoder-nearest neighbours (their
  own highlights): what distinguishes this latent (delphi's contrastive explainer shows
  counterexamples; here they are the latents a label could collide with);
- activation_pattern: where in the context it fires (the marked token itself, the token after
  something, every token of a span, ...);
- specificity: the most specific label that still covers every example.
A consensus prompt merges the labels of the prompts; the disagreement among them is recorded
by the caller (mean pairwise embedding similarity of the labels).

Parse failures are counted, never dropped silently: a response without an "[EXPLANATION]:"
line is a failure, and its first non-empty line (at most 25 words) is used as the label,
flagged `parsed=False` (delphi scores the string "Explanation could not be parsed." instead).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from saelab.config import Config
from saelab.interp.examples import Window
from saelab.interp.llm import LLM, Request
from saelab.interp.select import LatentSet

PROMPTS = ("default", "contrastive", "activation_pattern", "specificity")
PromptName = Literal["default", "contrastive", "activation_pattern", "specificity"]


class ExplainConfig(Config):
    prompts: list[PromptName] = Field(default_factory=lambda: list(PROMPTS),
                                      description="explanation prompts: default (delphi-style), contrastive, "
                                      "activation_pattern, specificity")
    consensus: bool = Field(True, description="merge the prompts' labels into one with a consensus prompt")
    threshold: float = Field(0.3, gt=0, lt=1, description="mark tokens above this fraction of the example's "
                             "maximum (delphi: 0.3)")
    show_activations: bool = Field(True, description="list the marked tokens' activations as ceil(10 a / max)")
    max_tokens: int = Field(60, gt=0, description="tokens an explanation may take")
    prefill: str = Field("[EXPLANATION]:", description="the start of the explainer's answer, written for it (local "
                         "backend; the openai backend does not send it): the model continues with the label. '' "
                         "lets it write freely (SmolLM2-135M then never writes the tag: 16 of 16 unparsed)")
    token_list: int = Field(3, gt=0, description="tokens named by the token-list explainer")


@dataclass
class Explanation:
    label: str
    parsed: bool
    raw: str = ""
    source: str = ""  # which prompt, explainer or latent it came from


# --- formatting ------------------------------------------------------------------------------------------


class Formatter:
    def __init__(self, tokenizer, threshold: float = 0.3):
        self.tok, self.threshold = tokenizer, threshold
        self._cache: dict[int, str] = {}

    def strs(self, ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            if i not in self._cache:
                self._cache[i] = self.tok.decode([i])
            out.append(self._cache[i])
        return out

    def text(self, w: Window) -> str:
        return clean(self.tok.decode(w.ids))

    def marked(self, w: Window) -> list[bool]:
        cut = self.threshold * w.max_act
        return [a > cut and a > 0 for a in w.acts]

    def highlight(self, w: Window, marks: list[bool] | None = None) -> str:
        strs, marks = self.strs(w.ids), marks if marks is not None else self.marked(w)
        out, i = [], 0
        while i < len(strs):
            if marks[i]:
                j = i
                while j < len(strs) and marks[j]:
                    j += 1
                out.append("<<" + "".join(strs[i:j]) + ">>")
                i = j
            else:
                out.append(strs[i])
                i += 1
        return clean("".join(out))

    def activations(self, w: Window, latent_max: float, cap: int = 10) -> str:
        strs, marks = self.strs(w.ids), self.marked(w)
        items = [f'("{clean(s)}", {normalized(a, latent_max)})' for s, a, m in zip(strs, w.acts, marks, strict=True)
                 if m][:cap]
        return "Activations: " + ", ".join(items)

    def examples(self, windows: list[Window], latent_max: float, show_activations: bool) -> str:
        lines = []
        for i, w in enumerate(windows, 1):
            lines.append(f"Example {i}: {self.highlight(w)}")
            if show_activations:
                lines.append(self.activations(w, latent_max))
        return "\n".join(lines)


def normalized(a: float, latent_max: float) -> int:
    """delphi's shown activation: ceil(10 a / max), in 0..10."""
    return int(min(10, max(0, math.ceil(10 * a / max(latent_max, 1e-6)))))


def clean(s: str) -> str:
    return s.replace("\n", "\\n").replace("\r", "")


# --- prompts --------------------------------------------------------------------------------------------

_INTRO = ("You are studying one feature of a neural network that reads text. You are shown text examples in "
          "which the feature fires; the tokens where it fires most are marked like <<this>>")
_RULES = ("Keep the description short: a few words, one phrase, no list of alternatives, and do not mention the "
          "markers. End your answer with one line of the form\n[EXPLANATION]: <your description>")
SYSTEM = {
    "default": f"{_INTRO}, and each example is followed by the marked tokens with how strongly the feature fires on "
               f"them (0-10). Describe what the feature responds to: a token, a kind of word, a topic or a "
               f"pattern common to the examples. {_RULES}",
    "contrastive": f"{_INTRO}. You are also shown examples of similar features (their own tokens marked), which are "
                   f"easily confused with it. Describe what makes THIS feature different from the similar ones: what "
                   f"its examples share that theirs do not. {_RULES}",
    "activation_pattern": f"{_INTRO}. Describe WHERE it fires: on the marked word itself, on the token after a "
                          f"particular word, at the start or end of something, on every token of a span, in code or "
                          f"in prose. {_RULES}",
    "specificity": f"{_INTRO}. Give the MOST SPECIFIC description that is still true of every example: as narrow as "
                   f"the examples allow, not a vague topic. {_RULES}",
}
CONSENSUS_SYSTEM = ("You are merging several descriptions of the same feature of a neural network, written by "
                    "different people. Write the one short description that best captures what they agree on. "
                    "End your answer with one line of the form\n[EXPLANATION]: <the description>")


def explain_requests(s: LatentSet, fmt: Formatter, cfg: ExplainConfig, prompt: str) -> Request:
    body = "Examples of the feature:\n" + fmt.examples(s.explain, s.max_act, cfg.show_activations and
                                                        prompt == "default")
    if prompt == "contrastive":
        for k, ws in enumerate(s.contrast.values(), 1):
            bmax = max([w.max_act for w in ws] + [1e-9])
            body += f"\n\nExamples of similar feature {k} (not this one):\n" + fmt.examples(ws, bmax, False)
    return Request.chat(SYSTEM[prompt], body, max_tokens=cfg.max_tokens, prefill=cfg.prefill)


def consensus_request(labels: list[str], cfg: ExplainConfig) -> Request:
    body = "Descriptions:\n" + "\n".join(f"{i}. {x}" for i, x in enumerate(labels, 1))
    return Request.chat(CONSENSUS_SYSTEM, body, max_tokens=cfg.max_tokens, prefill=cfg.prefill)


_TAG = re.compile(r"\[?EXPLANATION\]?\s*:\s*(.+)", re.I)


def parse_explanation(text: str) -> tuple[str, bool]:
    """(label, parsed): the text after the last "[EXPLANATION]:", or the first non-empty line (flagged)."""
    hits = _TAG.findall(text)
    if hits and _tidy(hits[-1]):
        return _tidy(hits[-1]), True
    first = next((ln for ln in text.splitlines() if ln.strip(" *#\"'")), "")
    return (_tidy(" ".join(first.split()[:25])) or "(no explanation)"), False


def _tidy(s: str) -> str:
    s = s.strip().strip("*").strip()
    if len(s) > 1 and s[0] == s[-1] and s[0] in "\"'":  # a label wrapped in quotes as a whole
        s = s[1:-1].strip()
    return s


def explain(sets: dict[int, LatentSet], fmt: Formatter, llm: LLM, cfg: ExplainConfig
            ) -> dict[int, dict[str, Explanation]]:
    """Every prompt of cfg for every latent (one batched call), then the consensus merge."""
    jobs = [(j, p) for j in sets for p in cfg.prompts if p != "contrastive" or sets[j].contrast]
    resp = llm.complete([explain_requests(sets[j], fmt, cfg, p) for j, p in jobs])
    out: dict[int, dict[str, Explanation]] = {j: {} for j in sets}
    for (j, p), r in zip(jobs, resp, strict=True):
        label, ok = parse_explanation(r.text)
        out[j][p] = Explanation(label, ok, r.text, p)
    if cfg.consensus and len(cfg.prompts) > 1:
        todo = [j for j in sets if len(out[j]) > 1]
        resp = llm.complete([consensus_request([e.label for e in out[j].values()], cfg) for j in todo])
        for j, r in zip(todo, resp, strict=True):
            label, ok = parse_explanation(r.text)
            out[j]["consensus"] = Explanation(label, ok, r.text, "consensus")
    return out


# --- baselines without an LLM -----------------------------------------------------------------------------


def token_list_label(s: LatentSet, fmt: Formatter, n: int = 3) -> str:
    """The token-list explainer: the latent's most frequent marked tokens over its explanation
    examples (the same examples an LLM explainer sees), as a label."""
    counts: Counter[str] = Counter()
    for w in s.explain:
        for tok, m in zip(fmt.strs(w.ids), fmt.marked(w), strict=True):
            if m and tok.strip():
                counts[tok.strip()] += 1
    top = [t for t, _ in counts.most_common(n)]
    if not top:
        return "(no tokens)"
    quoted = [f'"{clean(t)}"' for t in top]
    return "the token " + quoted[0] if len(quoted) == 1 else "the tokens " + ", ".join(quoted[:-1]) + " and " + quoted[-1]


def shuffled(labels: dict[int, str], seed: int) -> dict[int, tuple[str, int]]:
    """Each latent gets another latent's label (a seeded derangement): (label, donor latent)."""
    keys = sorted(labels)
    if len(keys) < 2:
        return {k: (labels[k], k) for k in keys}
    rng = random.Random(seed)
    perm = keys[:]
    while any(a == b for a, b in zip(keys, perm, strict=True)):
        rng.shuffle(perm)
    return {a: (labels[b], b) for a, b in zip(keys, perm, strict=True)}
