"""Concept judges for steering: something independent of the steering direction that says whether
a generated text shows the concept.

- `VaderJudge`: VADER's compound score of the text (saelab.intervene.vader, vaderSentiment
  3.3.2's rules) above a threshold (0.05: VADER's own cut for "positive") counts as positive
  (or below -threshold as negative).
- `ProbeJudge`: a logistic-regression probe trained on a labelled task's train split at a hook
  of *another* layer than the one steered, reading the text through the clean model (mean-pooled
  over the kept positions); success = the probe's probability of the target class > 0.5. Its
  held-out accuracy on the task's test split is reported with it.

Both read only the generated text, never the steered activations. A judge is called on a list
of texts and returns (scores, success) arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from saelab.data.tasks import TaskData
from saelab.data.tokens import Positions
from saelab.evals.probing import pooled_features
from saelab.hookpoints import HookPoint
from saelab.intervene.vader import POSITIVE_THRESHOLD, Vader
from saelab.models.load import LoadedModel


class VaderJudge:
    """Success = VADER compound > threshold (target 'positive') or < -threshold ('negative')."""

    def __init__(self, target: str = "positive", threshold: float = POSITIVE_THRESHOLD, vader: Vader | None = None):
        if target not in ("positive", "negative"):
            raise ValueError(f"a VADER judge's target is 'positive' or 'negative', not {target!r}")
        self.target, self.threshold = target, threshold
        self.vader = vader or Vader()

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        scores = np.array([self.vader.compound(t) for t in texts], dtype=np.float64)
        ok = scores > self.threshold if self.target == "positive" else scores < -self.threshold
        return scores, ok.astype(np.float64)

    def describe(self) -> dict[str, Any]:
        sign = ">" if self.target == "positive" else "<"
        return {"judge": "vader", "target": self.target, "score": "VADER compound in [-1, 1]",
                "rule": f"compound {sign} {'' if self.target == 'positive' else '-'}{self.threshold}",
                "source": "vaderSentiment 3.3.2 rules (saelab.intervene.vader) on its vader_lexicon.txt",
                "reads": "the generated continuation only (not the prompt)"}


class ProbeJudge:
    """A linear probe for `target` vs the other classes of a task, at a hook of another layer."""

    def __init__(self, loaded: LoadedModel, hp: HookPoint, data: TaskData, target: str, positions: Positions,
                 max_tokens: int = 32, batch_size: int = 32, seed: int = 0):
        if target not in data.classes:
            raise ValueError(f"probe judge: task {data.name!r} has classes {data.classes}, not {target!r}")
        self.loaded, self.hp, self.positions = loaded, hp, positions
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.target, self.task = target, data.name
        y = (np.asarray(data.labels) == data.classes.index(target)).astype(int)
        x = self._features(data.texts)
        train, test = ~data.test, data.test
        self.scaler = StandardScaler().fit(x[train])
        self.clf = LogisticRegression(max_iter=2000, random_state=seed, class_weight="balanced")
        self.clf.fit(self.scaler.transform(x[train]), y[train])
        pred = self.clf.predict(self.scaler.transform(x[test]))
        per_class = [float((pred[y[test] == c] == c).mean()) for c in (0, 1)]
        self.test_accuracy = float((pred == y[test]).mean())
        self.test_balanced_accuracy = float(np.mean(per_class))
        self.counts = {"train": int(train.sum()), "test": int(test.sum()), "train_target": int(y[train].sum())}

    def _features(self, texts: list[str]) -> np.ndarray:
        texts = [t if t.strip() else " " for t in texts]  # an empty continuation still has a token to read
        x, _ = pooled_features(texts, self.loaded, self.hp, None, self.max_tokens, self.batch_size, self.positions)
        return x.numpy()

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        p = self.clf.predict_proba(self.scaler.transform(self._features(texts)))[:, 1]
        return p, (p > 0.5).astype(np.float64)

    def describe(self) -> dict[str, Any]:
        return {"judge": "probe", "target": self.target, "task": self.task, "hook": str(self.hp),
                "score": f"probe probability of {self.target!r}", "rule": "probability > 0.5",
                "probe": "standardised L2 logistic regression (balanced class weights) on the hook's activation "
                         "mean-pooled over the kept positions, trained on the task's train split",
                "test_accuracy": self.test_accuracy, "test_balanced_accuracy": self.test_balanced_accuracy,
                "counts": self.counts, "reads": "the generated continuation only, through the clean model"}
