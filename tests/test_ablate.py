"""Latent ablation on the tiny model and its SAE: a latent that never fires changes nothing, the
splice with the error kept is exact, the batched engine (cached activations, only the blocks after
the hook, only the contexts where a latent fired) equals separate full passes, and the stage
writes, records and reuses its result (also through the CLI)."""

import copy

import pytest
import torch
from typer.testing import CliRunner

from saelab.cli import app
from saelab.data.tokens import Positions
from saelab.experiments.ablate import AblateConfig, run_ablate
from saelab.hookpoints import HookPoint
from saelab.intervene.ablate import AblateSettings, _delta, ablate, cache, full_pass_ce
from saelab.models.hooks import forward_from, run_with_patch
from saelab.runs.ledger import Ledger
from saelab.saes.base import load_sae

HP = HookPoint(1, "resid_post")


@pytest.fixture(scope="module")
def sae_and_text(tiny_sae_run, text_jsonl):
    """The tiny SAE with latent 0 made dead (it can never fire), and settings over the test text."""
    sae, _ = load_sae(tiny_sae_run.checkpoint_dir)
    sae = copy.deepcopy(sae)
    with torch.no_grad():
        sae.W_enc[:, 0] = 0
        sae.b_enc[0] = -1e4
    return sae, AblateSettings(text=str(text_jsonl), tokens=600, ctx_len=64, batch_size=4, rows=3, bootstrap=300)


def test_ablating_a_latent_that_never_fires_changes_nothing(sae_and_text, tiny_loaded):
    sae, cfg = sae_and_text
    for mode in ("zero", "mean"):
        r = ablate(cfg.model_copy(update={"latents": [0, 5], "mode": mode}), sae, tiny_loaded, HP, Positions(), "tiny",
                   progress=False)
        dead = r.latents[0]
        assert dead.fire_fraction == 0 and dead.contexts_changed == 0
        assert dead.delta_ce.diff == 0 and dead.delta_ce.diff_ci95 == [0.0, 0.0] and dead.delta_ce.a == dead.delta_ce.b
    c = cache(cfg, sae, tiny_loaded, HP, Positions(), [0, 5])
    clean, n = full_pass_ce(sae, tiny_loaded, HP, c, None, "zero")
    assert full_pass_ce(sae, tiny_loaded, HP, c, [0], "zero") == (clean, n)  # bit-identical full passes too


def test_the_splice_with_the_error_kept_is_exact(sae_and_text, tiny_loaded):
    sae, cfg = sae_and_text
    c = cache(cfg, sae, tiny_loaded, HP, Positions(), list(range(sae.cfg.width)))
    ctx = torch.arange(4)
    ids, mask = c.ids[ctx], c.mask[ctx]
    clean = run_with_patch(tiny_loaded.model, HP, None, ids, mask)
    # ablating nothing: the activation moves by exactly 0, so the logits are the clean model's, bit for bit
    nothing = _delta(sae, c, ctx, [[]] * 4, "zero")
    assert torch.equal(forward_from(tiny_loaded.model, HP, c.acts[ctx] + nothing, ids, mask), clean)
    # the splice written as x_hat + (x - x_hat) is the clean model up to float rounding
    keep = c.keep[ctx]

    def splice(x):
        y = x.clone()
        x_hat = sae.reconstruct(x[keep])
        y[keep] = x_hat + (x[keep] - x_hat)
        return y
    assert torch.allclose(run_with_patch(tiny_loaded.model, HP, splice, ids, mask), clean, atol=1e-5)
    # every latent ablated, the error kept: the activation is b_dec + the SAE's error, as the definition says
    allz = _delta(sae, c, ctx, [list(range(sae.cfg.width))] * 4, "zero")
    x = c.acts[ctx][keep]
    assert torch.allclose((c.acts[ctx] + allz)[keep], sae.b_dec + (x - sae.reconstruct(x)), atol=1e-5)
    assert torch.equal((c.acts[ctx] + allz)[~keep], c.acts[ctx][~keep])  # nothing moves off the kept positions


@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("hook", ["resid_post.1", "mlp_out.1"])  # the suffix forward / a full pass with the patch
def test_the_batched_engine_equals_separate_full_passes(sae_and_text, tiny_loaded, mode, hook):
    sae, cfg = sae_and_text
    hp = HookPoint.parse(hook)
    cfg = cfg.model_copy(update={"top": 4, "mode": mode})
    r = ablate(cfg, sae, tiny_loaded, hp, Positions(), "tiny", progress=False)
    c = cache(cfg, sae, tiny_loaded, hp, Positions(), None, 4)
    assert c.latents == [x.latent for x in r.latents]
    clean, n = full_pass_ce(sae, tiny_loaded, hp, c, None, mode)
    assert r.tokens == n and abs(r.ce_clean - clean / n) < 1e-5
    for k, x in enumerate(r.latents):
        abl, _ = full_pass_ce(sae, tiny_loaded, hp, c, [k], mode)
        assert abs(x.delta_ce.diff - (abl - clean) / n) < 1e-5, (k, x.latent)
        assert x.delta_ce.diff_ci95[0] <= x.delta_ce.diff <= x.delta_ce.diff_ci95[1]
        assert len(x.moves["promoted"]) == cfg.top_tokens and x.contexts_changed > 0
    joint, _ = full_pass_ce(sae, tiny_loaded, hp, c, list(range(4)), mode)
    assert abs(r.joint.diff - (joint - clean) / n) < 1e-5
    assert r.engine["suffix_forward"] == (hp.kind == "resid_post")
    assert (r.latents[0].lens != {}) == (hp.kind == "resid_post")


def test_the_stage_writes_records_and_reuses_its_result(own_sae_run, text_jsonl, tiny_loaded, tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    cfg = AblateConfig(run=str(own_sae_run.path), latents=[3, 7], text=str(text_jsonl), tokens=300, ctx_len=64,
                       ledger=str(ledger), bootstrap=200)
    r = run_ablate(cfg, loaded=tiny_loaded, progress=False)
    file = cfg.result_file()
    assert file.parent == own_sae_run.path / "ablate" and file.is_file()
    rows = Ledger(ledger).rows()
    assert [(x["stage"], x["kind"], x["cmp_name"]) for x in rows] == [("ablate", "ablation", "joint")]
    mtime = file.stat().st_mtime_ns
    assert run_ablate(cfg, loaded=tiny_loaded, progress=False) == r and file.stat().st_mtime_ns == mtime
    assert len(Ledger(ledger).rows()) == 1


def test_ablate_through_the_cli(own_sae_run, text_jsonl, tmp_path):
    args = ["ablate", str(own_sae_run.path), "--latents", "1,2", "--mode", "mean", "--tokens", "200", "--set",
            f"text={text_jsonl}", "--set", "ctx_len=64", "--set", "bootstrap=100", "--ledger", str(tmp_path / "l.sqlite")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "mean-ablation at resid_post.1" in r.output and "joint" in r.output and "ledger: ablate-0001" in r.output
    r = CliRunner().invoke(app, ["ablate", str(own_sae_run.path), "--ledger", "none"])
    assert r.exit_code == 2 and "--top" in r.output
    r = CliRunner().invoke(app, ["ablate", str(own_sae_run.path), "--latents", "999", "--set", f"text={text_jsonl}",
                                 "--tokens", "100", "--ledger", "none"])
    assert r.exit_code == 2 and "out of range" in r.output
