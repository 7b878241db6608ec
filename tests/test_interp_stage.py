"""`saelab interpret` end to end on synthetic latents whose true explanation is known.

A ReLU coder on the tiny model's resid_pre.0 (the token embeddings) whose latent j fires
exactly on one character token; an oracle LLM that applies an explanation literally (a text
has the feature iff it contains one of the explanation's quoted tokens) stands in for the
explainer and the scorer. Then the true explanations score high, shuffled ones score at
chance, the token-list explainer beats the shuffled one, a rerun is served entirely from the
call cache, and the run is recorded in the ledger with its primary comparison.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch

from saelab.data.tokens import Positions
from saelab.experiments.interpret import InterpretConfig, interpret
from saelab.interp.examples import ExamplesConfig
from saelab.interp.llm import LLM, Request, Response, TokenLogprob
from saelab.interp.llm.cache import CachedLLM
from saelab.interp.select import SamplingConfig
from saelab.runs.ledger import Ledger
from saelab.runs.results import InterpretResult
from saelab.saes.base import build_sae
from saelab.saes.config import SAEConfig

CHARS = ["e", "t", "a", "o", "n", "i", "s", "r"]


def _quoted(line: str) -> set[str]:
    return set(re.findall(r'"([^"]+)"', line))


class Oracle(LLM):
    """Answers every prompt saelab sends by applying the explanation literally."""

    identity = "oracle"
    gives_logprobs = True

    def __init__(self):
        self.calls = 0

    def complete(self, requests, on_result=None):
        out = []
        for i, r in enumerate(requests):
            self.calls += 1
            text = self.answer(r)
            p = 0.9 if text in ("Yes", "1") else 0.1
            lp = [TokenLogprob(text, math.log(p if text in ("Yes", "1") else 1 - p),
                               {"Yes": math.log(p), "No": math.log(1 - p), "1": math.log(p), "2": math.log(1 - p)})]
            resp = Response(text, lp, 10, 1)
            out.append(resp)
            if on_result:
                on_result(i, resp)
        return out

    def answer(self, r: Request) -> str:
        system, user = r.messages[0][1], r.messages[-1][1]
        feature = next((ln for ln in user.splitlines() if ln.startswith("Feature:")), "")
        want = _quoted(feature)
        if system.startswith("You check") and "two text examples" in system:
            t1, t2 = (re.search(rf"Text {k}: (.*)", user).group(1) for k in (1, 2))
            return "1" if sum(t1.count(w) for w in want) >= sum(t2.count(w) for w in want) else "2"
        if system.startswith("You check") and "marked like" in system:
            spans = re.findall(r"<<(.*?)>>", user)
            return "Yes" if spans and all(s in want for s in spans) else "No"
        if system.startswith("You check"):
            example = user.split("Example:", 1)[1]
            return "Yes" if any(w in example for w in want) else "No"
        if system.startswith("You predict"):
            toks = re.findall(r"(\d+):(\S+)", user.split("Tokens:", 1)[1])
            hits = [f"{i}:10" for i, t in toks if t in want]
            return ", ".join(hits) or "None"
        if system.startswith("You are merging"):
            first = user.splitlines()[1].split(". ", 1)[1]
            return f"[EXPLANATION]: {first}"
        if "numbered example documents" in system:
            label = _quoted(user.split("\n")[0])
            docs = re.findall(r"^(\d+)\. (.*)$", user, re.M)
            return ", ".join(n for n, d in docs if any(w in d for w in label)) or "None"
        spans = Counter(re.findall(r"<<(.*?)>>", user))
        top = spans.most_common(1)[0][0] if spans else "?"
        if system.startswith("We are studying"):
            return f'This neuron activates on the token "{top}".'
        return f'Looking at the examples.\n[EXPLANATION]: the token "{top}"'


@pytest.fixture(scope="module")
def char_run(tiny_model_dir, tiny_loaded, tmp_path_factory):
    """A run directory whose coder's latent j fires exactly on the token CHARS[j]."""
    run = tmp_path_factory.mktemp("charrun")
    tok = tiny_loaded.tokenizer
    emb = tiny_loaded.model.get_input_embeddings().weight.detach()
    sae = build_sae(SAEConfig(architecture="relu", d_in=emb.shape[1], width=len(CHARS), k=1))
    with torch.no_grad():
        sae.b_dec.zero_()
        for j, c in enumerate(CHARS):
            e = emb[tok.convert_tokens_to_ids(c)]
            sae.W_enc[:, j] = e / e.norm()
            sae.b_enc[j] = -0.9 * e.norm()
            sae.W_dec[j] = e / e.norm()
    sae.save(run / "checkpoint", {"hook": "resid_pre.0", "model": str(tiny_model_dir), "ctx_len": 64,
                                  "positions": Positions().to_dict()})
    return run


def _cfg(run, text, **kw):
    return InterpretConfig(run=str(run), latents=len(CHARS), ledger=str(run / "ledger.sqlite"),
                           examples=ExamplesConfig(text=str(text), split="train", tokens=5000, batch_size=8,
                                                   n_top=20, reservoir=60, pool=64, window=16, lead=12),
                           sampling=SamplingConfig(negatives=8, hard_negatives=3, neighbours=2,
                                                   saebench_random=6),
                           score={"scorers": ["detection", "fuzzing", "embedding", "discrimination",
                                              "simulation", "saebench"], "bootstrap": 200},
                           score_labels=["default", "consensus"], **kw)


def test_true_explanations_score_high_and_shuffled_ones_at_chance(char_run, tiny_loaded, text_jsonl, tmp_path):
    oracle = Oracle()
    llm = CachedLLM(oracle, tmp_path / "calls.sqlite")
    cfg = _cfg(char_run, text_jsonl)
    r = interpret(cfg, loaded=tiny_loaded, progress=False, llms={"explainer": llm, "scorer": llm})
    assert r.n_latents == len(CHARS)
    recs = {x["latent"]: x for x in r.latents}
    for j, c in enumerate(CHARS):  # the oracle explainer recovers every latent's token
        assert recs[j]["explanations"]["default"]["label"] == f'the token "{c}"'
        assert recs[j]["explanations"]["default"]["parsed"]
        assert recs[j]["token_list"].startswith(f'the token "{c}"') or f'"{c}"' in recs[j]["token_list"]
        assert set(recs[j]["scores"]["default"]) >= {"detection", "fuzzing", "embedding"}
    s = r.scores
    assert s["default"]["detection_balanced_accuracy"].mean > 0.95
    assert s["default"]["detection_auroc"].mean > 0.95
    assert s["default"]["fuzzing_balanced_accuracy"].mean > 0.95
    assert s["default"]["discrimination_accuracy"].mean > 0.9
    assert s["default"]["simulation_pearson_r"].mean > 0.9
    assert s["default"]["saebench_score"].mean > 0.95 > s["default"]["saebench_floor"].mean
    shuffled = s["shuffled"]["detection_balanced_accuracy"]
    assert abs(shuffled.mean - 0.5) < 0.15  # another latent's token: the scorer fails, as it must
    assert s["token_list"]["detection_balanced_accuracy"].mean > shuffled.mean + 0.3
    primary = r.paired["detection_real_vs_shuffled"]
    assert primary.conclusive and primary.diff > 0.3 and primary.unit == "latent" and primary.n_units == len(CHARS)
    assert r.paired["detection_token_list_vs_shuffled"].conclusive
    assert r.parse_failures["explanations"]["default"] == {"failed": 0, "of": len(CHARS)}
    assert r.controls["randomized_model"]["run"] is False
    assert 0 <= r.validation["confidence"].mean <= 1
    # per-latent CIs and the per-domain consistency are there
    det = recs[0]["scores"]["default"]["detection"]
    assert len(det["balanced_accuracy_ci95"]) == 2 and det["parse_failures"] == 0
    # the result file, the windows for pages, and the ledger row with its primary comparison
    out = char_run / "interp"
    assert InterpretResult.read(out / "interp.json").n_latents == len(CHARS)
    win = __import__("json").loads((out / "windows.json").read_text())
    w0 = win["0"]["explain"][0]
    assert len(w0["tokens"]) == len(w0["acts"]) == len(w0["ids"]) and max(w0["acts"]) > 0
    row = Ledger(cfg.ledger).rows(stage="interpret")[-1]
    assert row["cmp_name"] == "detection_real_vs_shuffled" and row["verdict"] == "conclusive"

    # a rerun: the stored result is reused (no LLM call); recomputed, every call is a cache hit
    n = oracle.calls
    interpret(cfg, loaded=tiny_loaded, progress=False, llms={"explainer": llm, "scorer": llm})
    assert oracle.calls == n
    (out / "interp.json").unlink()
    again = CachedLLM(oracle, tmp_path / "calls.sqlite")
    r2 = interpret(cfg, loaded=tiny_loaded, progress=False, llms={"explainer": again, "scorer": again})
    assert oracle.calls == n and again.hit_rate() == 1.0 and again.stats["misses"] == 0
    assert r2.scores["default"]["detection_balanced_accuracy"].mean == s["default"]["detection_balanced_accuracy"].mean


def test_held_out_examples_are_never_shown_to_the_explainer(char_run, tiny_loaded, text_jsonl):
    import json

    win = json.loads((char_run / "interp" / "windows.json").read_text())
    for w in win.values():
        shown = {x["ctx"] for x in w["explain"]}
        scored = {x["ctx"] for k in ("test", "negatives", "hard_negatives", "similar_negatives") for x in w[k]}
        assert shown and scored and not shown & scored
        # similar negatives: silent, and never the random negatives again
        assert w["similar_negatives"] and all(max(x["acts"]) == 0 for x in w["similar_negatives"])
        assert not {(x["ctx"], x["center"]) for x in w["similar_negatives"]} & \
            {(x["ctx"], x["center"]) for x in w["negatives"]}


def test_similar_negatives_are_the_nearest_by_embedding_query_by_query():
    """delphi's FAISS rule: the first query's nearest candidates first, then the next query's."""
    from saelab.interp.examples import Window
    from saelab.interp.select import similar_windows

    def win(i):
        return Window(0, i, 0, 0, [i], [0.0], 0, "x")

    vec = {0: [1, 0, 0], 1: [0, 1, 0], 10: [0.9, 0.1, 0], 11: [0.1, 0.9, 0], 12: [0.8, 0.2, 0], 13: [0, 0, 1]}

    def embed(ws):
        return torch.nn.functional.normalize(torch.tensor([vec[w.ctx] for w in ws], dtype=torch.float), dim=-1)

    q, c = [win(0), win(1)], [win(i) for i in (13, 11, 12, 10)]
    assert [w.ctx for w in similar_windows(q, c, 2, embed)] == [10, 12]
    assert [w.ctx for w in similar_windows(q, c, 3, embed)] == [10, 12, 11]
    assert similar_windows(q, c, 0, embed) == [] and similar_windows([], c, 2, embed) == []
