"""The results report, its validator and the SAE comparison, on the tiny model; the page is
loaded in a real headless Chromium (skipped with the reason where it is not installed)."""

import shutil

import pytest
from browser import console_errors, start_browser
from typer.testing import CliRunner

from saelab.cli import app
from saelab.experiments.compare import CompareConfig, compare_runs, match_fraction
from saelab.experiments.control import ControlConfig
from saelab.experiments.evaluate import EvalConfig, run_suite
from saelab.report.build import build_report, write_report
from saelab.report.check import check
from saelab.runs.ledger import Ledger

runner = CliRunner()
XSS = '<script>window.__pwned=1</script>"><img src=x onerror="window.__pwned=2">'


@pytest.fixture(scope="module")
def project(tiny_sae_run, tiny_model_dir, tiny_loaded, text_jsonl, tmp_path_factory):
    """A ledger with a trained run, its core eval, probing and control, and an XSS string in a note."""
    root = tmp_path_factory.mktemp("report")
    run = root / "runs" / "r"
    shutil.copytree(tiny_sae_run.path, run)
    (run / "ledger.jsonl").unlink()
    ledger = root / "runs" / "ledger.sqlite"
    cfg = EvalConfig(run=str(run), suite=["core", "probing", "control"], text=str(text_jsonl),
                     model=str(tiny_model_dir), tokens=600, ce_tokens=200, ledger=str(ledger), notes=XSS,
                     probing={"tasks": ["code_vs_prose"], "ks": [1, 5], "max_per_class": 40, "bootstrap": 100},
                     control=ControlConfig(harvest_tokens=2000, train_tokens=4096, tokens=400, ce_tokens=100,
                                           probing_tasks=[], batch_size=256))
    run_suite(cfg, loaded=tiny_loaded, progress=False)
    Ledger(ledger).predict("later-1", "explained_variance", ">= 0.5", source="a hunch")
    return root, run, ledger


def test_the_report_holds_the_table_plots_and_passes_its_own_check(project, tmp_path):
    root, run, ledger = project
    r = build_report(Ledger(ledger))
    html_path, md_path = write_report(r, tmp_path / "report.html")
    assert check(html_path) == []
    text = html_path.read_text()
    assert text.count("<svg") >= 3 and "feature density" in text and "sparse probing, top-1" in text
    assert "eval/control" in text and "conclusive" in text or "inconclusive" in text
    assert "<script>window.__pwned" not in text and "&lt;script&gt;" in text  # escaped, not markup
    md = md_path.read_text()
    assert "| id | date | commit |" in md and all((tmp_path / "report_files" / f).is_file() for f in r.figures)
    assert "<script" not in text and "<link" not in text  # nothing to load: styles and plots are inline


def test_the_report_in_a_real_browser(project, tmp_path):
    root, run, ledger = project
    html_path, _ = write_report(build_report(Ledger(ledger)), tmp_path / "report.html")
    d = start_browser()
    try:
        d.get(html_path.as_uri())
        assert d.title == "saelab results" and console_errors(d) == []
        assert d.execute_script("return window.__pwned === undefined")  # the note's script never ran
        assert XSS.split("<img")[0] in d.find_element("tag name", "body").text  # shown as text
        assert len(d.find_elements("css selector", "figure svg")) >= 3
        rows = d.find_elements("css selector", "#experiments ~ .wrap table tbody tr")
        assert len(rows) >= 5  # core, probing, control and the control's harvest, train, eval
        d.find_element("link text", rows[0].find_element("css selector", "td a").text).click()
        assert d.execute_script("return location.hash").startswith("#row-")
    finally:
        d.quit()


def test_the_checker_finds_what_a_broken_page_has(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><div id="a"><p id="a">x</p>'
                   '<a href="#nowhere">n</a><a href="missing.html">m</a><img src="gone.png">'
                   '<img src="data:image/png;base64,@@@"><script src="https://cdn.example.com/d3.js"></script>'
                   '<span></div></body></html>')
    problems = "\n".join(check(bad))
    for what in ("no <title>", "no <meta viewport>", "no <meta description>", "duplicate id 'a'", "#nowhere",
                 "missing.html", "gone.png", "not valid base64", "from the network", "<span> is not closed"):
        assert what in problems, what
    r = runner.invoke(app, ["report", "--check", str(bad)])
    assert r.exit_code == 1 and "#nowhere" in r.output
    assert runner.invoke(app, ["report", "--check", str(tmp_path / "nope.html")]).exit_code == 1


def test_report_cli_builds_from_the_default_ledger(project, tmp_path, monkeypatch):
    root, _, ledger = project
    monkeypatch.chdir(root)
    monkeypatch.delenv("SAELAB_LEDGER")
    r = runner.invoke(app, ["report", "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 0 and (tmp_path / "r.md").is_file(), r.output
    assert runner.invoke(app, ["report", "--check", str(tmp_path / "r.html")]).exit_code == 0


def test_compare_two_saes_and_an_sae_with_itself(project, tiny_model_dir, tiny_loaded, text_jsonl, tmp_path):
    root, run, ledger = project
    same = tmp_path / "same"
    shutil.copytree(run, same)
    other = run / "control" / "sae"  # the randomized model's SAE: same hook, another model: refused
    cfg = CompareConfig(run_a=str(run), run_b=str(same), text=str(text_jsonl), model=str(tiny_model_dir), tokens=500,
                        ledger=str(ledger), out=str(tmp_path / "cmp"))
    r, out = compare_runs(cfg, loaded=tiny_loaded)
    assert r.explained_variance.diff == 0 and r.explained_variance.diff_ci95 == [0.0, 0.0]
    assert r.matches["a_in_b"] == r.matches["b_in_a"] == 1.0 and check(out / "compare.html") == []
    assert Ledger(ledger).rows(stage="compare")[0]["verdict"] == "inconclusive"
    with pytest.raises(ValueError, match="same hook of the same model"):
        compare_runs(cfg.model_copy(update={"run_b": str(other), "model": None}), loaded=tiny_loaded)


def test_match_fraction_counts_directions_found_in_the_other_dictionary():
    import torch

    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 16, generator=g)
    B = torch.cat([A[:20] * 3, torch.randn(30, 16, generator=g)])  # 20 of A's directions, rescaled
    frac, best = match_fraction(A, B, 0.99)
    assert frac == pytest.approx(20 / 50) and (best[:20] > 0.999).all()
