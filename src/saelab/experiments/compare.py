"""`saelab compare RUN_A RUN_B`: two sparse coders on the same hook, side by side, with the
structural numbers a researcher uses to choose an SAE family: L0, explained variance on the
same validation contexts (both sides, the difference and a paired bootstrap 95% CI over
contexts), the decoder-norm distribution, the latent-density distribution (from each run's
core eval), and how many of A's decoder directions have a match in B above a cosine
threshold (and the other way round). Writes compare.html (a report section) and
compare.json, and records a ledger row whose comparison is EV(A) - EV(B)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from saelab.config import StageConfig
from saelab.evals.core import CoreConfig, ev_units
from saelab.evals.stats import compare as paired
from saelab.experiments.evaluate import EvalConfig, open_run
from saelab.io import read_json, write_text
from saelab.models.load import LoadedModel
from saelab.report import plots
from saelab.report.html import Doc, page
from saelab.runs.ledger import check_ledger, record
from saelab.runs.results import Comparison, Result


class CompareConfig(StageConfig, CoreConfig):
    """Two run directories (SAEs on the same hook of the same model) and where the comparison goes."""

    run_a: str = Field(..., description="run directory of SAE A")
    run_b: str = Field(..., description="run directory of SAE B")
    model: str | None = Field(None, description="model override (default: the one the SAEs were trained on)")
    tokens: int = Field(16_384, gt=0, description="validation tokens for the paired explained variance")
    match_cosine: float = Field(0.7, gt=0, le=1, description="a decoder direction of A matches B if some direction of "
                                "B has at least this cosine with it")
    out: str = Field("", description="output folder (default: <run_a>/compare-<name of run_b>)")


class CompareResult(Result):
    STAGE: ClassVar[str] = "compare"
    KIND: ClassVar[str] = "pair"
    FILE: ClassVar[str] = "compare.json"
    PRIMARY: ClassVar[str | None] = "explained_variance"

    run_a: str
    run_b: str
    model: str
    hook: str
    seed: int = 0
    a: dict[str, Any]  # per side: architecture, width, k, l0, dead fraction, decoder norms, density histogram
    b: dict[str, Any]
    explained_variance: Comparison
    matches: dict[str, float]  # fraction of A's directions matched in B, and of B's in A, at match_cosine
    match_cosine: float
    config: dict[str, Any] = {}

    def comparisons(self) -> dict[str, Comparison]:
        return {"explained_variance": self.explained_variance}

    def headline(self) -> dict[str, float]:
        return {"ev_a": self.explained_variance.a, "ev_b": self.explained_variance.b, "l0_a": self.a["l0"],
                "l0_b": self.b["l0"], "a_matched_in_b": self.matches["a_in_b"],
                "b_matched_in_a": self.matches["b_in_a"]}

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook, "seed": self.seed, "tokens": self.explained_variance.n_units,
                "data_source": "validation contexts"}


@torch.no_grad()
def match_fraction(W_a: torch.Tensor, W_b: torch.Tensor, threshold: float, chunk: int = 2048) -> tuple[float, np.ndarray]:
    """Fraction of A's decoder rows [m_a, d] whose best cosine with a row of B [m_b, d] is >= threshold,
    and every A row's best cosine."""
    A = torch.nn.functional.normalize(W_a.float(), dim=1)
    B = torch.nn.functional.normalize(W_b.float(), dim=1)
    best = torch.cat([(A[s:s + chunk] @ B.T).max(1).values for s in range(0, A.shape[0], chunk)])
    return float((best >= threshold).double().mean()), best.numpy()


def _side(o, eval_file: Path, l0: float) -> dict[str, Any]:
    norms = o.sae.W_dec.detach().float().norm(dim=1).cpu().numpy()
    core = read_json(eval_file) if eval_file.is_file() else None
    return {"run": str(o.run.path), "architecture": o.sae.cfg.architecture, "width": o.sae.cfg.width,
            "k": o.sae.cfg.k, "l0": l0, "decoder_norm_quantiles": [float(np.quantile(norms, q))
                                                                  for q in (0, 0.05, 0.5, 0.95, 1)],
            "decoder_norms": norms.round(5).tolist(),
            "feature_density_histogram": core.get("feature_density_histogram") if core else None,
            "dead_fraction": core.get("dead_fraction") if core else None}


def compare_runs(cfg: CompareConfig, loaded: LoadedModel | None = None) -> tuple[CompareResult, Path]:
    check_ledger(cfg)
    ecfg = EvalConfig(run=cfg.run_a, **cfg.model_dump(include=set(CoreConfig.model_fields) | {"device", "model"}))
    a = open_run(ecfg, loaded)
    b = open_run(ecfg.model_copy(update={"run": cfg.run_b}), a.loaded)
    if a.meta["hook"] != b.meta["hook"] or a.model_name != b.model_name:
        raise ValueError(f"{cfg.run_a} is {a.meta['hook']} of {a.model_name} and {cfg.run_b} is {b.meta['hook']} "
                         f"of {b.model_name}: compare two coders of the same hook of the same model")
    if a.positions != b.positions:
        raise ValueError(f"{cfg.run_a} and {cfg.run_b} were trained on different positions ({a.positions} vs "
                         f"{b.positions}): their explained variance would not be measured on the same tokens")
    ccfg = ecfg.model_copy(update={"ctx_len": cfg.ctx_len or a.meta.get("ctx_len") or 128})
    ma, sse_a, tv_a = ev_units(a.sae, a.loaded, a.hp, ccfg, a.positions, cfg.tokens)
    mb, sse_b, tv_b = ev_units(b.sae, a.loaded, a.hp, ccfg, a.positions, cfg.tokens)
    ev = paired((sse_a, tv_a), (sse_b, tv_b), 1000, cfg.seed, one_minus=True, unit="validation context",
                sides=f"a = {Path(cfg.run_a).name}, b = {Path(cfg.run_b).name}")
    a_in_b, best_a = match_fraction(a.sae.W_dec.detach(), b.sae.W_dec.detach(), cfg.match_cosine)
    b_in_a, best_b = match_fraction(b.sae.W_dec.detach(), a.sae.W_dec.detach(), cfg.match_cosine)
    out = Path(cfg.out or Path(cfg.run_a) / f"compare-{Path(cfg.run_b).name}")
    result = CompareResult(
        run_a=str(a.run.path), run_b=str(b.run.path), model=a.model_name, hook=str(a.hp), seed=cfg.seed,
        a=_side(a, a.run.path / "eval.json", ma["l0"]), b=_side(b, b.run.path / "eval.json", mb["l0"]),
        explained_variance=ev, matches={"a_in_b": a_in_b, "b_in_a": b_in_a,
                                        "a_best_cosine_median": float(np.median(best_a)),
                                        "b_best_cosine_median": float(np.median(best_b))},
        match_cosine=cfg.match_cosine, config=cfg.model_dump(mode="json"))
    result.write(out / CompareResult.FILE)
    html = compare_page(result, best_a, best_b)
    write_text(out / "compare.html", html)
    record(result, out, cfg)
    return result, out


def compare_page(r: CompareResult, best_a: np.ndarray, best_b: np.ndarray) -> str:
    doc = Doc()
    na, nb = Path(r.run_a).name, Path(r.run_b).name
    doc.heading(1, f"{na} vs {nb}")
    doc.text(f"{r.hook} of {r.model}; explained variance paired over {r.explained_variance.n_units} validation "
             "contexts (percentile bootstrap, 1,000 resamples).", "muted")
    c = r.explained_variance
    rows = [["architecture", r.a["architecture"], r.b["architecture"], ""],
            ["width", r.a["width"], r.b["width"], ""],
            ["L0 (same tokens)", f"{r.a['l0']:.2f}", f"{r.b['l0']:.2f}", f"{r.a['l0'] - r.b['l0']:+.2f}"],
            ["explained variance", f"{c.a:.4f} [{c.a_ci95[0]:.4f}, {c.a_ci95[1]:.4f}]",
             f"{c.b:.4f} [{c.b_ci95[0]:.4f}, {c.b_ci95[1]:.4f}]",
             f"{c.diff:+.4f} [{c.diff_ci95[0]:+.4f}, {c.diff_ci95[1]:+.4f}]"],
            ["dead fraction (core eval)", r.a["dead_fraction"], r.b["dead_fraction"], ""],
            [f"directions matched in the other (cos >= {r.match_cosine})", f"{r.matches['a_in_b']:.3f}",
             f"{r.matches['b_in_a']:.3f}", ""],
            ["decoder norm 5% / 50% / 95%", " / ".join(f"{x:.3f}" for x in r.a["decoder_norm_quantiles"][1:4]),
             " / ".join(f"{x:.3f}" for x in r.b["decoder_norm_quantiles"][1:4]), ""]]
    doc.table(["", f"A: {na}", f"B: {nb}", "A - B [95% CI]"], rows)
    figs = [("best decoder cosine in the other SAE", plots.histogram_pair(best_a, best_b, na, nb, "best cosine", "ba")),
            ("decoder norms", plots.histogram_pair(np.array(r.a["decoder_norms"]), np.array(r.b["decoder_norms"]), na, nb,
                                         "decoder row norm", "dn"))]
    for side, name, key in ((r.a, na, "da"), (r.b, nb, "db")):
        hist = side["feature_density_histogram"]
        if hist is None:
            doc.text(f"{name} has no core eval, so no density histogram: `saelab eval {side['run']}`.", "missing")
        else:
            fig = plots.density_histogram(hist)
            figs.append((f"feature density {name}", plots.to_svg(fig, key)))
    doc.figures(figs)
    return page(f"compare {na} vs {nb}", doc.html(), f"saelab comparison of two SAEs on {r.hook}")
