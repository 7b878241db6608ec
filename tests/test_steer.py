"""Steering on tiny random models: alpha = 0 reproduces unsteered generation exactly, the KV-cache
sampler equals transformers' own greedy decoding, a random direction's effect on the judge is near
zero while a real direction's is not (so the judge can fail), the fluency cap excludes a huge
alpha, VADER scores as the real vaderSentiment does, and the stage writes, records and reuses its
result (also through the CLI). The demo on the embedded model is marked `embedded`."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saelab.cli import app
from saelab.data.fetch import asset_ready
from saelab.data.tokens import Positions
from saelab.experiments.steer import SteerConfig, run_steer
from saelab.hookpoints import HookPoint
from saelab.intervene.steer import (
    Direction,
    Sampling,
    SteerSettings,
    choose_alpha,
    file_direction,
    prompt_ids,
    random_direction,
    sample,
    steer,
    uniforms,
)
from saelab.intervene.vader import Vader
from saelab.models.hooks import final_norm
from saelab.models.load import load_model
from saelab.runs.ledger import Ledger
from saelab.runs.results import Estimate, ScanPoint

HP = HookPoint(1, "resid_post")
PROMPTS = [f"prompt number {i}: " for i in range(12)]


def test_alpha_zero_reproduces_unsteered_generation_exactly(tiny_loaded):
    ids = prompt_ids(tiny_loaded, ["def f(x):", "import os, sys", "x"], Positions())  # different lengths
    rows = [p for p in ids for _ in range(4)]
    u = torch.cat([uniforms(0, i, 4, 10) for i in range(3)])
    sampling = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, batch_size=6)
    clean = sample(tiny_loaded, HP, rows, None, u, sampling)  # no hook at all
    d = tiny_loaded.model.config.hidden_size
    v = random_direction(d, 0).unit
    for mode in ("all", "generated"):
        zero = sample(tiny_loaded, HP, rows, 0.0 * v.expand(12, d), u, sampling, mode)  # the hook adds 0 * v
        assert torch.equal(zero[0], clean[0]) and torch.equal(zero[1], clean[1]), mode
        steered = sample(tiny_loaded, HP, rows, 3.0 * v.expand(12, d), u, sampling, mode)
        assert not torch.equal(steered[0], clean[0]), mode  # and a real vector does change it
    # the same random numbers, the same samples, whatever the batch layout (left padding included)
    one = sample(tiny_loaded, HP, rows[4:8], None, u[4:8], sampling)
    assert torch.equal(one[0], clean[0][4:8])


def test_the_kv_cache_sampler_decodes_greedily_as_transformers_does(tiny_loaded):
    ids = prompt_ids(tiny_loaded, ["hello world"], Positions())
    greedy = Sampling(max_new_tokens=12, temperature=0.0, top_p=1.0)
    tokens, lengths = sample(tiny_loaded, HP, ids, None, torch.zeros(1, 12), greedy)
    ref = tiny_loaded.model.generate(torch.tensor(ids), max_new_tokens=12, do_sample=False,
                                     pad_token_id=tiny_loaded.tokenizer.pad_token_id)[0, len(ids[0]):]
    n = int(lengths[0])
    assert tokens[0, :n].tolist() == ref[:n].tolist()


@pytest.fixture(scope="module")
def peaky(tiny_model_dir):
    """The tiny model with a sharpened unembedding (x 28): its next-token distributions are peaked,
    as a trained model's are, so steering can move them and break fluency."""
    loaded = load_model(str(tiny_model_dir))
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.mul_(28)
    return loaded


def mostly_e(texts):
    """A judge: the share of characters that are 'e'; success = at least a quarter."""
    score = np.array([t.count("e") / max(len(t), 1) for t in texts])
    return score, (score >= 0.25).astype(float)


def e_direction(loaded) -> Direction:
    """The direction at the hook that the final norm and unembedding read as token 'e'."""
    t = loaded.tokenizer.convert_tokens_to_ids("e")
    v = loaded.model.get_output_embeddings().weight.detach()[t] / final_norm(loaded.model).weight.detach()
    return Direction("file", v.float(), "token 'e' read through the unembedding")


@pytest.fixture(scope="module")
def e_steering(peaky, tmp_path_factory):
    """The 'e' direction (loaded from a .npy file) vs a random one, judged by `mostly_e`."""
    path = tmp_path_factory.mktemp("vec") / "e.npy"
    np.save(path, e_direction(peaky).vector.numpy())
    directions = {"file": file_direction(path), "random": random_direction(32, 1, float(e_direction(peaky).vector.norm()))}
    cfg = SteerSettings(directions=["file", "random"], n_prompts=12, calibration_generations=2, generations=4,
                        alphas=[0.1, 0.2, 0.4, 100.0], max_new_tokens=12, bootstrap=500)
    return steer(cfg, None, peaky, HP, Positions(), directions, mostly_e, {"judge": "mostly e"}, PROMPTS,
                 progress=False).result


def test_a_random_direction_barely_moves_the_judge_while_a_real_one_does(e_steering):
    r = e_steering
    base = r.point("baseline", 0).success.mean
    for a in r.alphas[1:]:  # the same norm and coefficient: the random direction stays at baseline ...
        assert r.point("random", a).success.mean <= base + 0.1, a
    assert min(r.point("file", a).success.mean for a in (0.4, 100.0)) >= 0.75  # ... the real one does not,
    real, rand = r.head_to_head["file_vs_baseline"], r.head_to_head["random_vs_file"]
    assert real.conclusive and real.diff > 0 and rand.conclusive and rand.diff < 0  # so the judge can fail it
    assert abs(r.head_to_head["random_vs_baseline"].diff) <= 0.1
    same = r.head_to_head["file_vs_random_same_alpha"]  # the same push in a random direction does not do it
    assert same.conclusive and same.diff > 0


def test_the_fluency_cap_excludes_a_huge_alpha(e_steering):
    r = e_steering
    huge = r.point("file", 100.0, "choose")
    assert huge.success.mean == max(p.success.mean for p in r.scan if p.half == "choose")  # it steers hardest ...
    assert not huge.within_cap and 100.0 in r.chosen["file"].excluded_by_cap  # ... and breaks fluency
    assert r.chosen["file"].alpha < 100.0 and r.chosen["file"].perplexity <= r.chosen["file"].max_perplexity


def _pt(alpha, success, ppl, within):
    e = Estimate(mean=success, ci95=[success, success], n_units=4)
    return ScanPoint(direction="x", alpha=alpha, half="choose", success=e,
                     nll=Estimate(mean=float(np.log(ppl)), ci95=[0, 0], n_units=4), perplexity=ppl,
                     perplexity_ci95=[ppl, ppl], within_cap=within, mean_score=0.0)


def test_choose_alpha_takes_the_best_within_the_cap_and_falls_back_to_zero():
    pts = [_pt(0, 0.3, 10, True), _pt(1, 0.5, 12, True), _pt(2, 0.5, 14, True), _pt(8, 0.9, 40, False)]
    c = choose_alpha(pts, 1.5)
    assert c.alpha == 1 and c.excluded_by_cap == [8]  # ties go to the smaller alpha
    c = choose_alpha([_pt(0, 0.3, 10, True), _pt(8, 0.9, 40, False)], 1.5)
    assert c.alpha == 0 and "no alpha within the cap" in c.reason


@pytest.mark.skipif(not asset_ready("vader"), reason="the VADER lexicon is not fetched (`saelab data fetch`)")
def test_vader_scores_as_vadersentiment_does():
    # compound scores from the real vaderSentiment 3.3.2 (SentimentIntensityAnalyzer.polarity_scores)
    real = {"VADER is smart, handsome, and funny.": 0.8316,
            "VADER is VERY SMART, uber handsome, and FRIGGIN FUNNY!!!": 0.9469,
            "VADER is not smart, handsome, nor funny.": -0.7424,
            "At least it isn't a horrible book.": 0.431,
            "The book was only kind of good.": 0.3832,
            "The plot was good, but the characters are uncompelling and the dialog is not great.": -0.7042,
            "Today only kinda sux! But I'll get by, lol": 0.5249,
            "Make sure you :) or :D today!": 0.8633,
            "Not bad at all": 0.431,
            "Sentiment analysis has never been this good!": 0.5672,
            "With VADER, sentiment analysis is the shit!": 0.6476,
            "Roger Dodger is one of the least compelling variations on this theme.": -0.1695,
            "The meeting is at noon.": 0.0,
            "good good but bad bad": -0.8225}
    v = Vader()
    assert {s: v.compound(s) for s in real} == real


def test_vectors_load_from_npy_safetensors_and_pt(tmp_path):
    from safetensors.torch import save_file

    v = torch.arange(6, dtype=torch.float32)
    np.save(tmp_path / "v.npy", v.numpy())
    save_file({"a": v, "b": 2 * v}, tmp_path / "v.safetensors")
    torch.save(v, tmp_path / "v.pt")
    assert torch.equal(file_direction(tmp_path / "v.npy").vector, v)
    assert torch.equal(file_direction(tmp_path / "v.safetensors", "b").vector, 2 * v)
    assert torch.equal(file_direction(tmp_path / "v.pt").vector, v)
    with pytest.raises(ValueError, match="vector_key"):
        file_direction(tmp_path / "v.safetensors")


TINY = {"candidates": 4, "n_prompts": 2, "calibration_generations": 2, "generations": 2, "alphas": [1.0],
        "max_new_tokens": 6, "max_tokens": 8, "bootstrap": 200,
        "concept_task": {"name": "sentiment", "source": "builtin:sentiment", "group_field": "group",
                         "max_per_class": 40, "min_test": 5}}


@pytest.mark.skipif(not asset_ready("vader"), reason="the VADER lexicon is not fetched (`saelab data fetch`)")
def test_the_stage_writes_records_and_reuses_its_result(own_sae_run, tiny_loaded, tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    cfg = SteerConfig(run=str(own_sae_run.path), name="t", ledger=str(ledger), **TINY)
    r = run_steer(cfg, loaded=tiny_loaded, progress=False)
    file = own_sae_run.path / "steer" / "t.json"
    assert file.is_file() and set(r.directions) == {"sae", "dom", "random"}
    assert r.latent_choice["latent"] == r.latent_choice["top"]["activation"][0]["latent"]  # chosen on train texts
    assert set(r.head_to_head) >= {"sae_vs_dom", "sae_vs_random", "dom_vs_random", "random_vs_baseline"}
    gens = [json.loads(x) for x in (own_sae_run.path / "steer" / "t.generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 * 2 + 2 * (1 + 3) * 2  # calibration + scan generations
    rows = Ledger(ledger).rows()
    assert [(x["stage"], x["kind"], x["cmp_name"]) for x in rows] == [("steer", "steering", "sae_vs_dom")]
    mtime = file.stat().st_mtime_ns
    again = run_steer(cfg, loaded=tiny_loaded, progress=False)  # reused: nothing recomputed, no new row
    assert again == r and file.stat().st_mtime_ns == mtime and len(Ledger(ledger).rows()) == 1
    if r.plot is not None:
        assert (own_sae_run.path / "steer" / "t.png").stat().st_size > 0
    else:
        assert "matplotlib" in r.plot_note


@pytest.mark.skipif(not asset_ready("vader"), reason="the VADER lexicon is not fetched (`saelab data fetch`)")
def test_steer_through_the_cli(own_sae_run, tmp_path):
    sets = [x for k, v in TINY.items() if k != "concept_task" for x in ("--set", f"{k}={json.dumps(v)}")]
    sets += ["--set", "concept_task.name=sentiment", "--set", "concept_task.source=builtin:sentiment",
             "--set", "concept_task.group_field=group", "--set", "concept_task.max_per_class=40",
             "--set", "concept_task.min_test=5"]
    r = CliRunner().invoke(app, ["steer", str(own_sae_run.path), "--quick", "--ledger", str(tmp_path / "l.sqlite"),
                                 *sets])
    assert r.exit_code == 0, r.output
    assert "head to head" in r.output and "ledger: steer-0001" in r.output
    assert (own_sae_run.path / "steer" / "sentiment-quick.json").is_file()  # the preset's name, --set's budget
    bad = CliRunner().invoke(app, ["steer", str(own_sae_run.path), "--set", "n_prompts=500", "--ledger", "none"])
    assert bad.exit_code == 2 and "candidate prompts" in bad.output


def test_the_probe_judge_reads_another_layer_and_can_tell_the_concept(tiny_loaded, tmp_path):
    from saelab.data.tasks import TaskSpec, load_task
    from saelab.experiments.steer import build_judge
    from saelab.intervene.judge import ProbeJudge

    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(c * int(rng.integers(1, 4)) for _ in range(int(rng.integers(3, 8)))), "label": c}
            for c in "ab" for _ in range(60)]
    path = tmp_path / "ab.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = TaskSpec(name="ab", source=str(path), min_train=10, min_test=5)
    judge = ProbeJudge(tiny_loaded, HookPoint(2, "resid_post"), load_task(spec), "a", Positions())
    assert judge.test_accuracy >= 0.9 and judge.describe()["hook"] == "resid_post.2"
    scores, ok = judge(["a aa a aaa a", "bb b bbb b b", ""])
    assert ok[:2].tolist() == [1.0, 0.0] and 0 <= scores[2] <= 1
    cfg = SteerSettings(judge="probe", concept_task=spec, positive_class="a", negative_class="b", probe_hook="resid_post.1")
    with pytest.raises(ValueError, match="another layer"):
        build_judge(cfg, tiny_loaded, HP, Positions())
    _, info = build_judge(cfg.model_copy(update={"probe_hook": None}), tiny_loaded, HP, Positions())
    assert info["hook"] == "resid_post.2"  # the default: halfway from the steering layer to the last
