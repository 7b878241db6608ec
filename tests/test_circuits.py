"""Feature circuits on the tiny model: the splice is exact, attribution patching is exact for a
metric linear in the nodes, faithfulness is 1 for the full circuit and 0 for the empty one, a
planted latent beats random sets, and both kinds run end to end through the CLI."""

import json

import numpy as np
import pytest
import torch
from tiny import train_tiny_sae
from typer.testing import CliRunner

from saelab.circuits import graph as g
from saelab.circuits.sets import feature_set_circuit
from saelab.cli import app
from saelab.data.prompts import induction
from saelab.data.tasks import TaskData
from saelab.hookpoints import HookPoint
from saelab.models.hooks import forward
from saelab.saes import load_sae

H0, H1 = HookPoint(0, "resid_post"), HookPoint(1, "resid_post")


@pytest.fixture(scope="module")
def two_saes(tiny_model_dir, tiny_loaded, text_jsonl, tiny_sae_run, tmp_path_factory):
    other = train_tiny_sae(tmp_path_factory.mktemp("sae0"), tiny_model_dir, tiny_loaded, text_jsonl, "resid_post.0")
    return {H0: load_sae(other.checkpoint_dir)[0], H1: load_sae(tiny_sae_run.checkpoint_dir)[0]}, \
        [other.path, tiny_sae_run.path]


def test_splicing_saes_with_their_error_terms_leaves_the_logits_unchanged(tiny_loaded, two_saes):
    saes, _ = two_saes
    ids = induction(tiny_loaded.tokenizer, 4).clean
    clean = forward(tiny_loaded.model, ids)
    with g.spliced(tiny_loaded.model, saes):
        plain = forward(tiny_loaded.model, ids)
    with g.spliced(tiny_loaded.model, saes, leaves=True):
        passed = forward(tiny_loaded.model, ids)
    assert torch.equal(passed, clean)  # the attribution pass: exactly the model
    torch.testing.assert_close(plain, clean, rtol=1e-5, atol=1e-5)  # decode(f) + err: the model up to rounding


def test_attribution_patching_is_exact_for_a_metric_linear_in_the_nodes(tiny_loaded, two_saes):
    """Without the final norm, logits are linear in resid_post of the last block, so AP of the SAE
    spliced there equals the exact effect of patching each node."""
    model = tiny_loaded.model
    norm = model.model.norm
    model.model.norm = torch.nn.Identity()
    try:
        _check_ap_is_exact(tiny_loaded, two_saes)
    finally:
        model.model.norm = norm


def _check_ap_is_exact(tiny_loaded, two_saes):
    model = tiny_loaded.model
    saes = {HookPoint(2, "resid_post"): two_saes[0][H1]}  # any coder with the right width
    pairs = induction(tiny_loaded.tokenizer, 6, seed=1)
    lat, err, m_clean, m_patch, cs, ps = g.attribution_patching(model, saes, pairs.clean, pairs.patch, pairs.metric)
    hp = next(iter(saes))
    assert torch.allclose(lat[hp].sum(1) + err[hp], m_patch - m_clean, atol=1e-4)  # AP sums to the total effect
    changed = torch.nonzero((ps.f[hp] - cs.f[hp]).abs().sum((0, 1))).flatten()[:8]
    for i in changed.tolist():
        def edit(h, f, e, i=i):
            f = f.clone()
            f[..., i] = ps.f[hp][..., i]
            return f, e
        with torch.no_grad(), g.spliced(model, saes, edit=edit):
            exact = pairs.metric(forward(model, pairs.clean)) - m_clean
        assert torch.allclose(lat[hp][:, i], exact, atol=1e-4)


def test_full_circuit_faithfulness_is_one_and_the_empty_one_zero(tiny_loaded, two_saes):
    saes, _ = two_saes
    pairs = induction(tiny_loaded.tokenizer, 8, seed=2)
    state, m = g.node_values(tiny_loaded.model, saes, pairs.clean, pairs.metric)
    means = g.mean_state(state)
    every = {h: torch.ones(s.cfg.width, dtype=torch.bool) for h, s in saes.items()}
    none = {h: ~v for h, v in every.items()}
    m_full = g.ablated_metric(tiny_loaded.model, saes, pairs.clean, every, dict.fromkeys(saes, True), means, pairs.metric)
    m_empty = g.ablated_metric(tiny_loaded.model, saes, pairs.clean, none, dict.fromkeys(saes, False), means,
                               pairs.metric)
    torch.testing.assert_close(m_full, m, rtol=1e-4, atol=1e-4)
    for m_c, want in ((m_full, 1.0), (m_empty, 0.0)):
        num, den = g.faithfulness_units(m_c, m_empty, m_full)
        assert num.sum() / den.sum() == pytest.approx(want)


def _planted(n=240, width=64, layers=2, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    zs = [rng.exponential(1.0, (n, width)) * (rng.random((n, width)) < 0.3) for _ in range(layers)]
    zs[1][:, 7] = y * 3.0 + rng.normal(0, 0.1, n)  # latent 7 of the second layer carries the label
    data = TaskData("planted", "synthetic", [f"t{i}" for i in range(n)], y, ["a", "b"],
                    np.arange(n) % 10 < 3, [str(i) for i in range(n)])
    return zs, data


def test_a_planted_latent_beats_random_sets_and_shuffled_labels_do_not():
    zs, data = _planted()
    r = feature_set_circuit(zs, ["l0", "l1"], data, ks=[1, 3], n_random=10, n_boot=200)
    c = r["grid"]["k1"]["circuit_vs_random"]
    assert c.a > 0.95 and c.b < 0.7 and c.diff_ci95[0] > 0.2  # the circuit finds it; random sets do not
    assert r["buildup"]["points"][0]["accuracy"].mean < 0.7 < r["buildup"]["points"][1]["accuracy"].mean
    data.labels = np.random.default_rng(1).permutation(data.labels)  # the control must be able to fail
    s = feature_set_circuit(zs, ["l0", "l1"], data, ks=[1], n_random=10, n_boot=200)["grid"]["k1"]["circuit_vs_random"]
    assert s.a < 0.7 and s.diff_ci95[0] <= 0.05


def test_both_kinds_end_to_end_through_the_cli(two_saes, tiny_model_dir, text_jsonl, tmp_path):
    _, runs = two_saes
    ledger = tmp_path / "l.sqlite"
    base = ["circuit", *map(str, runs), "--ledger", str(ledger), "--set", f"model={tiny_model_dir}",
            "--set", "n_random=3", "--set", "bootstrap=100"]
    r = runner.invoke(app, [*base, "--kind", "graph", "--task", "induction", "--set", "prompts=12",
                            "--set", "ig_steps=3", "--set", "node_threshold=0.0", "--set", "max_nodes_per_hook=4",
                            "--set", "check_nodes=5", "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    gr = json.loads((tmp_path / "g" / "graph-induction.json").read_text())["graph"]
    assert gr["splice_exact"] and gr["n_nodes"] > 0 and set(gr["faithfulness"]) >= {"a", "b", "diff_ci95"}
    assert (tmp_path / "g" / "graph-induction.html").is_file() and len(gr["linear_check"]["nodes"]) == 5
    r = runner.invoke(app, [*base, "--kind", "set", "--task", "code_vs_prose", "--set", "ks=[1,2]",
                            "--set", "max_per_class=40", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    from saelab.runs.ledger import Ledger

    kinds = [(x["stage"], x["kind"], x["cmp_name"]) for x in Ledger(ledger).rows()]
    assert kinds == [("circuit", "graph", "circuit_vs_random"), ("circuit", "set", "circuit_vs_random")]
    from saelab.report.check import check

    assert check(tmp_path / "g" / "graph-induction.html") == [] and check(tmp_path / "s" / "set-code_vs_prose.html") == []


runner = CliRunner()
