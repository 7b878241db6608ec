"""Feature rivalry (saelab.evals.rivalry, saelab.experiments.rivalry): entropy and answer
normalisation on hand-made answers; the rivalry score finds planted anti-correlated pairs; the
Mann-Whitney test and AUROC agree with scipy and scikit-learn; the prompt-level permutation test
holds its level under shuffled labels; the stage runs end to end on the tiny model and writes its
result and a ledger row."""

import json
import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from saelab.evals import rivalry as rv

# --- answers ---------------------------------------------------------------------------------------------


def test_first_word_is_folded_lowercased_and_stripped_of_punctuation():
    assert rv.first_word("  Paris. It is") == "paris"
    assert rv.first_word("Bogotá, of course") == "bogota"
    assert rv.first_word('"Tokyo"') == "tokyo"
    assert rv.first_word("  ... Rome") == "rome"  # a word of punctuation only is skipped
    assert rv.first_word("   ") == ""


def test_normalised_entropy_on_hand_made_answer_sets():
    assert rv.answer_entropy(["Paris"] * 20) == 0.0
    assert rv.answer_entropy([rv.first_word(t) for t in ["Paris.", "paris", "PARIS is"]]) == 0.0
    assert rv.answer_entropy([f"w{i}" for i in range(20)]) == pytest.approx(1.0)  # all differ
    half = ["a"] * 10 + ["b"] * 10  # H = log 2, normalised by log 20 (the number of samples)
    assert rv.answer_entropy(half) == pytest.approx(math.log(2) / math.log(20))
    assert rv.answer_entropy(["a", "a", "b", "c"]) == pytest.approx(
        -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(4))


def test_answer_normalisation_and_correctness():
    assert rv.normalise_answer("The Bogotá, D.C.!") == "bogota d c"
    assert rv.is_correct("It is Buenos Aires.", ["Buenos Aires"])
    assert rv.is_correct("the capital is São Paulo", ["Sao Paulo"])
    assert rv.is_correct("USA", ["United States", "USA"])  # an alias
    assert not rv.is_correct("Parisian", ["Paris"])  # whole words only
    assert not rv.is_correct("London", ["Paris"])
    assert not rv.is_correct("anything", [""])


def test_conditions_use_fixed_thresholds_or_fall_back_to_percentiles():
    e = np.array([0.0] * 12 + [0.9] * 12 + [0.6] * 3)
    s = rv.split_conditions(e, min_per_condition=10)
    assert s.ambiguous.sum() == 12 and s.unambiguous.sum() == 12 and s.method.startswith("fixed")
    e = np.array([0.0] * 30 + [0.2] * 5 + [0.4] * 5 + [0.8] * 2)  # overconfident: few above 0.7
    s = rv.split_conditions(e, min_per_condition=10)
    assert s.method.startswith("percentile")
    assert not (s.ambiguous & s.unambiguous).any()
    assert s.unambiguous.sum() == 30 and s.ambiguous.sum() == 12


def test_balance_cuts_the_larger_condition_to_the_smaller():
    a, b = np.arange(20) < 5, np.arange(20) >= 8
    ba, bb = rv.balance(a, b, seed=0)
    assert ba.sum() == bb.sum() == 5 and np.array_equal(ba, a) and not (bb & ~b).any()
    assert np.array_equal(rv.balance(a, b, seed=0)[1], bb)


# --- rivalry on synthetic latents --------------------------------------------------------------------------


def _latents(n_prompts=80, width=60, planted=((0, 1), (2, 3), (4, 5)), seed=0):
    rng = np.random.default_rng(seed)
    z = np.maximum(rng.normal(0.3, 0.3, (n_prompts, width)), 0)
    for i, j in planted:  # i fires where j does not: strongly anti-correlated
        g = rng.random(n_prompts) < 0.5
        z[:, i] = np.where(g, rng.uniform(1, 2, n_prompts), 0)
        z[:, j] = np.where(g, 0, rng.uniform(1, 2, n_prompts))
    return z


def test_rivalry_finds_planted_anti_correlated_pairs():
    z = _latents()
    planted = rv.rivalry(z)
    plain = rv.rivalry(_latents(planted=()))
    assert planted.latents.size == 60  # every latent active (mean > 0.01)
    pairs, hubs = rv.hub_latents(planted, n_pairs=3, top=6)
    assert {(p["latent_i"], p["latent_j"]) for p in pairs} == {(0, 1), (2, 3), (4, 5)}
    assert all(p["r"] < -0.8 for p in pairs)
    assert {h["latent"] for h in hubs} == set(range(6))
    # the 5th percentile moves once planted pairs are more than 5% of all pairs: two blocks of 15
    # latents firing on complementary halves of the prompts make 225 of the 1,770 pairs rivals
    z = _latents(planted=())
    g = np.random.default_rng(5).random(80) < 0.5
    z[:, :15] *= g[:, None] * 3
    z[:, 15:30] *= ~g[:, None] * 3
    assert rv.rivalry(z).score < plain.score - 0.2
    np.testing.assert_allclose(rv.correlations(z[:, :5]), np.corrcoef(z[:, :5].T), atol=1e-12)


def test_inactive_and_constant_latents_are_left_out_and_subsampling_is_seeded():
    z = _latents(width=400)
    z[:, 10] = 0.0  # inactive
    r = rv.rivalry(z, max_latents=300, seed=3)
    assert r.latents.size == 300 and 10 not in r.latents
    assert np.array_equal(r.latents, rv.rivalry(z, max_latents=300, seed=3).latents)
    z[:, 11] = 0.5  # active but constant: no r, dropped from the pairs
    assert np.isfinite(rv.rivalry(z[:, :20]).pairs).all()


def test_per_prompt_scores():
    unit = np.eye(4)[[0, 0, 1, 2]] * 1.0  # latents 0 and 1 share a direction
    z = np.array([0.0, 0.5, 0.6, 0.0])
    assert rv.decoder_cosine_score(z, unit) == pytest.approx(0.0)  # latents 1, 2: orthogonal
    assert rv.decoder_cosine_score(np.array([0.5, 0.6, 0.0, 0.0]), unit) == pytest.approx(1.0)
    assert rv.decoder_cosine_score(np.array([0.5, 0, 0, 0]), unit) == 0.0  # fewer than 2 active
    r = np.array([[1, -0.9, 0, 0], [-0.9, 1, 0, 0], [0, 0, 1, np.nan], [0, 0, np.nan, 1]])
    assert rv.coactivation_score(np.array([1.0, 1.0, 0, 0]), r) == pytest.approx(-0.9)
    # top-k keeps the most active: with k = 2 latents 2 and 3 (NaN r) leave no pair -> 0
    assert rv.coactivation_score(np.array([0.1, 0.2, 0.9, 0.8]), r, top_k=2) == 0.0


# --- tests against scipy / sklearn ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mann_whitney_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = np.round(rng.normal(0.2, 1, 300), 1)  # rounded: ties
    b = np.round(rng.normal(0, 1, 250), 1)
    ours = rv.mann_whitney(a, b)
    ref = mannwhitneyu(a, b, alternative="two-sided", method="asymptotic", use_continuity=True)
    assert ours["u"] == pytest.approx(ref.statistic)
    assert ours["p"] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("seed", [0, 1])
def test_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.4
    s = np.round(y * 0.5 + rng.normal(0, 1, 200), 1)
    assert rv.auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert math.isnan(rv.auroc(np.ones(5, bool), np.arange(5.0)))
    c = rv.compare_auroc(y, s, -s, n_boot=200, seed=0)
    assert c.a == pytest.approx(roc_auc_score(y, s)) and c.diff == pytest.approx(c.a - c.b)
    assert c.diff_ci95[0] > 0  # a signal beats its own negation


def test_holm_and_benjamini_hochberg():
    p = [0.01, 0.04, 0.03, 0.2, float("nan")]
    assert rv.holm(p)[:4] == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert rv.benjamini_hochberg(p)[:4] == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    assert math.isnan(rv.holm(p)[4])


def test_permutation_test_holds_its_level_under_shuffled_labels():
    """Under the null (labels independent of the latents) the test's false-positive rate at 0.05
    is about 0.05 (p roughly uniform); a planted difference is found."""
    rng = np.random.default_rng(0)
    ps = []
    for rep in range(100):
        z = np.maximum(rng.normal(0.2, 0.5, (30, 12)), 0)
        labels = rng.permutation(np.arange(30) < 15)
        ps.append(rv.permutation_test(z, labels, n_perm=99, seed=rep, max_latents=12)["p"])
    ps = np.array(ps)
    assert 0.01 <= (ps <= 0.05).mean() <= 0.11
    assert 0.35 <= ps.mean() <= 0.65  # roughly uniform
    z = np.vstack([_latents(40, 12, planted=[(2 * k, 2 * k + 1) for k in range(6)], seed=1),
                   np.maximum(rng.normal(0.3, 0.3, (40, 12)), 0)])
    labels = np.arange(80) < 40
    assert rv.permutation_test(z, labels, n_perm=199, seed=0)["p"] < 0.01
    assert rv.permutation_test(z, labels, n_perm=199, seed=0, matched=True)["p"] < 0.01
    c = rv.bootstrap_rivalry(z, labels, n_boot=100, seed=0)
    assert c.diff < 0 and c.diff_ci95[1] < 0


def test_shared_prefill_samples_the_same_tokens_as_repeated_prompts(tiny_loaded):
    import torch

    from saelab.intervene.steer import Sampling, sample, uniforms
    from saelab.models.hooks import resolve

    tok = tiny_loaded.tokenizer
    prompts = [tok(f"Q: word {c}?", add_special_tokens=False)["input_ids"] for c in "abc"]  # equal lengths
    u = torch.cat([uniforms(0, q, 4, 5) for q in range(3)])
    s = Sampling(5, 1.0, 1.0, batch_size=8)
    hp = resolve(tiny_loaded.model, "resid_post.0")
    shared, ls = sample(tiny_loaded, hp, prompts, None, u, s, share=4)
    plain, lp = sample(tiny_loaded, hp, [p for p in prompts for _ in range(4)], None, u, s)
    assert torch.equal(shared, plain) and torch.equal(ls, lp)
    with pytest.raises(ValueError, match="share"):
        sample(tiny_loaded, hp, prompts, None, u[:5], s, share=4)


# --- questions ------------------------------------------------------------------------------------------


def test_user_question_file(tmp_path):
    from saelab.data.questions import read_questions

    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "What is 2+2?", "answers": ["4", "four"], "popularity": 3}\n'
                 '{"question": "Capital of France?", "answers": "Paris"}\n')
    qs = read_questions(f)
    assert [q.answers for q in qs] == [["4", "four"], ["Paris"]] and qs[1].popularity is None
    f.write_text('{"question": "no answers"}\n')
    with pytest.raises(ValueError, match="answers"):
        read_questions(f)


@pytest.mark.embedded
def test_geonames_questions_have_answers_and_popularity():
    from saelab.data.fetch import asset_ready
    from saelab.data.questions import geonames_questions

    if not asset_ready("geonames"):
        pytest.skip("the geonames asset is not fetched (saelab data fetch)")
    qs = geonames_questions(5, seed=1)
    assert [q.kind for q in qs] == ["capital"] * 5 + ["country"] * 5 + ["currency"] * 5 + ["continent"] * 5
    assert all(q.answers and q.popularity and q.popularity > 0 for q in qs)
    fr = [q for q in geonames_questions(500, ["capital"]) if q.subject == "France"]
    assert fr and "Paris" in fr[0].answers
    assert geonames_questions(5, seed=1)[0].question == qs[0].question  # seeded


# --- the stage, end to end on the tiny model --------------------------------------------------------------


@pytest.fixture(scope="module")
def two_untrained_saes(tiny_model_dir, text_jsonl, tmp_path_factory):
    """Freshly initialised TopK SAEs at resid_post.0 and .2 of the tiny model, as run directories
    (the stage only reads checkpoints; training one would cost the test most of its time)."""
    from saelab.data.tokens import Positions
    from saelab.saes.base import build_sae
    from saelab.saes.config import SAEConfig

    root = tmp_path_factory.mktemp("riv-saes")
    runs = []
    for layer in (0, 2):
        sae = build_sae(SAEConfig(width=64, k=8, d_in=32), seed=layer)
        meta = {"hook": f"resid_post.{layer}", "model": str(tiny_model_dir), "positions": Positions().to_dict(),
                "ctx_len": 64, "text": str(text_jsonl)}
        sae.save(root / f"l{layer}" / "checkpoint", meta)
        runs.append(root / f"l{layer}")
    return runs


def test_rivalry_stage_end_to_end_on_the_tiny_model(two_untrained_saes, tmp_path):
    from saelab.cli import app
    from saelab.runs.ledger import Ledger

    qfile = tmp_path / "q.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    with open(qfile, "w") as f:
        for i in range(24):
            f.write(json.dumps({"question": f"Which word comes after {words[i % 8]} {i}?",
                                "answers": [words[(i + 1) % 8], "e"], "popularity": i + 1}) + "\n")
    ledger = tmp_path / "ledger.sqlite"
    out = tmp_path / "riv"
    args = ["rivalry", str(two_untrained_saes[1]), "--sae", str(two_untrained_saes[0]), "--questions", str(qfile), "--n-samples", "6",
            "--out", str(out), "--ledger", str(ledger),
            "--set", "max_new_tokens=3", "--set", "temperature=0.6", "--set", "n_perm=50", "--set", "bootstrap=60",
            "--set", "control_harvest_tokens=4096", "--set", "control_train_tokens=8192",
            "--set", "control_batch_size=256",
            "--set", "steer_questions=4", "--set", "steer_samples=3", "--set", "min_per_condition=4"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    r = json.loads((out / "rivalry.json").read_text())
    assert r["questions"]["n"] == 24 and [x["hook"] for x in r["layers"]] == ["resid_post.0", "resid_post.2"]
    lay = r["layers"][0]
    assert {"rivalry", "rivalry_matched", "perm", "perm_matched", "mann_whitney", "auroc_decoder", "hubs",
            "adjusted"} <= set(lay)
    assert 0 < lay["perm"]["p"] <= 1
    assert r["control"]["rivalry"]["n_units"] > 0 and r["steering"]["table"][0]["condition"] == "baseline"
    for k in ("rivalry_depth", "hubs", "auroc"):
        assert (out / f"{k}.svg").read_text().startswith("<svg")
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 24 and len(json.loads(lines[0])["samples"]) == 6
    rows = Ledger(ledger).rows(stage="rivalry")
    assert len(rows) == 1 and rows[0]["cmp_name"] == "rivalry_vs_softmax_auroc" and rows[0]["verdict"]
    # a rerun reuses the cached samples (same answers, nothing resampled)
    before = (out / "samples.jsonl").read_text()
    assert CliRunner().invoke(app, args + ["--set", "control=false", "--set", "steer=false"]).exit_code == 0
    assert (out / "samples.jsonl").read_text() == before
