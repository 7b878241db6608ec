"""VADER's compound sentiment score, computed from the VADER lexicon.

VADER (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis
of Social Media Text", ICWSM-14) scores a text by summing the lexicon valences of its words,
adjusted by rules (boosters and dampeners, ALL-CAPS emphasis, negation within three words,
"but", "least", a few idioms, exclamation and question marks), and squashes the sum to
[-1, 1]: compound = s / sqrt(s^2 + 15), rounded to 4 decimals.

This is a transcription of `SentimentIntensityAnalyzer.polarity_scores(text)["compound"]` in
vaderSentiment 3.3.2 (PyPI, MIT licence), rule for rule and quirk for quirk (e.g. its "but"
rule re-weights by `list.index`, so equal valences before and after "but" are weighted as the
first one). It reads `vader_lexicon.txt` from the fetched `vader` asset (the wheel's own file,
checksum in ASSET.json). One difference: vaderSentiment first replaces emoji by their
descriptions (its `emoji_utf8_lexicon.txt`, not fetched); here emoji are left as they are, so
a text with emoji can score differently. tests/test_steer.py checks this scorer against
values the real package gives, and docs/steer.md reports its agreement with the real package
on every generation of the demo.
"""

from __future__ import annotations

import math
import string
from functools import lru_cache
from pathlib import Path

B_INCR, B_DECR = 0.293, -0.293  # booster / dampener
C_INCR = 0.733  # ALL-CAPS emphasis
N_SCALAR = -0.74  # negation

NEGATE = frozenset([
    "aint", "arent", "cannot", "cant", "couldnt", "darent", "didnt", "doesnt", "ain't", "aren't", "can't",
    "couldn't", "daren't", "didn't", "doesn't", "dont", "hadnt", "hasnt", "havent", "isnt", "mightnt", "mustnt",
    "neither", "don't", "hadn't", "hasn't", "haven't", "isn't", "mightn't", "mustn't", "neednt", "needn't",
    "never", "none", "nope", "nor", "not", "nothing", "nowhere", "oughtnt", "shant", "shouldnt", "uhuh", "wasnt",
    "werent", "oughtn't", "shan't", "shouldn't", "uh-uh", "wasn't", "weren't", "without", "wont", "wouldnt",
    "won't", "wouldn't", "rarely", "seldom", "despite"])

_UP = ("absolutely amazingly awfully completely considerable considerably decidedly deeply effing enormous "
       "enormously entirely especially exceptional exceptionally extreme extremely fabulously flipping flippin "
       "frackin fracking fricking frickin frigging friggin fully fuckin fucking fuggin fugging greatly hella highly "
       "hugely incredible incredibly intensely major majorly more most particularly purely quite really remarkably "
       "so substantially thoroughly total totally tremendous tremendously uber unbelievably unusually utter utterly "
       "very").split()
_DOWN = ("almost barely hardly kinda kindof kind-of less little marginal marginally occasional occasionally partly "
         "scarce scarcely slight slightly somewhat sorta sortof sort-of").split()
BOOSTERS = {**dict.fromkeys(_UP, B_INCR), **dict.fromkeys(_DOWN, B_DECR),
            "just enough": B_DECR, "kind of": B_DECR, "sort of": B_DECR}

SPECIAL_CASES = {"the shit": 3, "the bomb": 3, "bad ass": 1.5, "badass": 1.5, "bus stop": 0.0, "yeah right": -2,
                 "kiss of death": -1.5, "to die for": 3, "beating heart": 3.5}

POSITIVE_THRESHOLD = 0.05  # VADER's README: compound >= 0.05 is positive (steering counts > 0.05)


@lru_cache(maxsize=4)
def load_lexicon(path: str | Path | None = None) -> dict[str, float]:
    """word -> mean valence, from vader_lexicon.txt (default: the fetched `vader` asset)."""
    if path is None:
        from saelab.data.fetch import require_asset
        path = require_asset("vader") / "vaderSentiment" / "vader_lexicon.txt"
    lex = {}
    for line in Path(path).read_text(encoding="utf-8").rstrip("\n").split("\n"):
        if line:
            word, measure = line.strip().split("\t")[0:2]
            lex[word] = float(measure)
    return lex


def _negated(word: str) -> bool:
    w = word.lower()
    return w in NEGATE or "n't" in w


def _strip_punc_if_word(token: str) -> str:
    stripped = token.strip(string.punctuation)
    return token if len(stripped) <= 2 else stripped  # two or fewer left: an emoticon, keep it


def _allcap_differential(words: list[str]) -> bool:
    caps = sum(w.isupper() for w in words)
    return 0 < len(words) - caps < len(words)


def _scalar_inc_dec(word: str, valence: float, cap_diff: bool) -> float:
    scalar = 0.0
    lw = word.lower()
    if lw in BOOSTERS:
        scalar = BOOSTERS[lw]
        if valence < 0:
            scalar *= -1
        if word.isupper() and cap_diff:
            scalar += C_INCR if valence > 0 else -C_INCR
    return scalar


class Vader:
    """compound(text) -> VADER compound score in [-1, 1] (vaderSentiment 3.3.2's rules)."""

    def __init__(self, lexicon: dict[str, float] | None = None):
        self.lex = lexicon if lexicon is not None else load_lexicon()

    def compound(self, text: str) -> float:
        words = [_strip_punc_if_word(t) for t in text.strip().split()]
        cap_diff = _allcap_differential(words)
        sentiments: list[float] = []
        for i, item in enumerate(words):
            if item.lower() in BOOSTERS or (i < len(words) - 1 and item.lower() == "kind"
                                            and words[i + 1].lower() == "of"):
                sentiments.append(0)
                continue
            sentiments.append(self._valence(words, i, cap_diff))
        sentiments = _but_check(words, sentiments)
        if not sentiments:
            return 0.0
        s = float(sum(sentiments))
        punct = _punctuation_emphasis(text.strip())
        if s > 0:
            s += punct
        elif s < 0:
            s -= punct
        return round(max(-1.0, min(1.0, s / math.sqrt(s * s + 15))), 4)

    def _valence(self, words: list[str], i: int, cap_diff: bool) -> float:
        lex = self.lex
        item = words[i]
        low = item.lower()
        if low not in lex:
            return 0
        valence = lex[low]
        if low == "no" and i != len(words) - 1 and words[i + 1].lower() in lex:
            valence = 0.0  # "no" negates the next lexicon word instead
        if (i > 0 and words[i - 1].lower() == "no") or (i > 1 and words[i - 2].lower() == "no") or \
                (i > 2 and words[i - 3].lower() == "no" and words[i - 1].lower() in ("or", "nor")):
            valence = lex[low] * N_SCALAR
        if item.isupper() and cap_diff:
            valence += C_INCR if valence > 0 else -C_INCR
        for start_i in range(3):
            if i > start_i and words[i - (start_i + 1)].lower() not in lex:
                s = _scalar_inc_dec(words[i - (start_i + 1)], valence, cap_diff)
                if start_i == 1 and s != 0:
                    s *= 0.95
                if start_i == 2 and s != 0:
                    s *= 0.9
                valence = _negation_check(valence + s, words, start_i, i)
                if start_i == 2:
                    valence = _special_idioms_check(valence, words, i)
        return _least_check(valence, words, i, lex)


def _negation_check(valence: float, words: list[str], start_i: int, i: int) -> float:
    w = [x.lower() for x in words]
    if start_i == 0:
        if _negated(w[i - 1]):
            valence *= N_SCALAR
    elif start_i == 1:
        if w[i - 2] == "never" and w[i - 1] in ("so", "this"):
            valence *= 1.25
        elif w[i - 2] == "without" and w[i - 1] == "doubt":
            pass
        elif _negated(w[i - 2]):
            valence *= N_SCALAR
    else:
        if (w[i - 3] == "never" and w[i - 2] in ("so", "this")) or w[i - 1] in ("so", "this"):
            valence *= 1.25
        elif w[i - 3] == "without" and (w[i - 2] == "doubt" or w[i - 1] == "doubt"):
            pass
        elif _negated(w[i - 3]):
            valence *= N_SCALAR
    return valence


def _special_idioms_check(valence: float, words: list[str], i: int) -> float:
    w = [x.lower() for x in words]  # called for i >= 3 only
    seqs = [f"{w[i - 1]} {w[i]}", f"{w[i - 2]} {w[i - 1]} {w[i]}", f"{w[i - 2]} {w[i - 1]}",
            f"{w[i - 3]} {w[i - 2]} {w[i - 1]}", f"{w[i - 3]} {w[i - 2]}"]
    for seq in seqs:
        if seq in SPECIAL_CASES:
            valence = SPECIAL_CASES[seq]
            break
    if len(w) - 1 > i and f"{w[i]} {w[i + 1]}" in SPECIAL_CASES:
        valence = SPECIAL_CASES[f"{w[i]} {w[i + 1]}"]
    if len(w) - 1 > i + 1 and f"{w[i]} {w[i + 1]} {w[i + 2]}" in SPECIAL_CASES:
        valence = SPECIAL_CASES[f"{w[i]} {w[i + 1]} {w[i + 2]}"]
    for n_gram in (seqs[3], seqs[4], seqs[2]):  # booster/dampener bigrams such as "kind of"
        if n_gram in BOOSTERS:
            valence += BOOSTERS[n_gram]
    return valence


def _least_check(valence: float, words: list[str], i: int, lex: dict[str, float]) -> float:
    prev = words[i - 1].lower() if i > 0 else ""
    if i > 1 and prev not in lex and prev == "least":
        if words[i - 2].lower() not in ("at", "very"):
            valence *= N_SCALAR
    elif i > 0 and prev not in lex and prev == "least":
        valence *= N_SCALAR
    return valence


def _but_check(words: list[str], sentiments: list[float]) -> list[float]:
    low = [w.lower() for w in words]
    if "but" in low:
        bi = low.index("but")
        for sentiment in sentiments:  # the original's loop, including its list.index lookup
            si = sentiments.index(sentiment)
            if si < bi:
                sentiments.pop(si)
                sentiments.insert(si, sentiment * 0.5)
            elif si > bi:
                sentiments.pop(si)
                sentiments.insert(si, sentiment * 1.5)
    return sentiments


def _punctuation_emphasis(text: str) -> float:
    ep = min(text.count("!"), 4) * 0.292
    qm = text.count("?")
    qm_amp = 0.0
    if qm > 1:
        qm_amp = qm * 0.18 if qm <= 3 else 0.96
    return ep + qm_amp
