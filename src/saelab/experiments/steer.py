"""`saelab steer RUN [--quick]`: steer the model with the run's SAE latent, a difference-of-means
direction and a random control (saelab.intervene.steer), write RUN/steer/<name>.json (the
result), <name>.png (the plot) and <name>.generations.jsonl (every generation with its
scores), and record the result in the ledger. With no other arguments it is the sentiment demo:
toward positive sentiment, judged by VADER, the DoM direction and the latent chosen on the
VADER-word task's train split. A result made with a config asking for the same work is reused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from saelab.config import StageConfig
from saelab.data.tasks import builtin_spec, load_task
from saelab.experiments.evaluate import open_run, reusable
from saelab.hookpoints import HookPoint
from saelab.intervene.judge import ProbeJudge, VaderJudge
from saelab.intervene.steer import (
    SENTIMENT_PROMPTS,
    Direction,
    SteerOutput,
    SteerSettings,
    concept_activations,
    dom_direction,
    file_direction,
    plot_scan,
    random_direction,
    rank_latents,
    sae_direction,
    steer,
)
from saelab.io import atomic_write
from saelab.models.hooks import n_layers, resolve
from saelab.models.load import LoadedModel
from saelab.runs.ledger import check_ledger, record
from saelab.runs.results import SteerResult

# `--quick`: a few prompts and coefficients (minutes on 2 CPU cores)
QUICK: dict[str, Any] = {"name": "sentiment-quick", "candidates": 16, "n_prompts": 8, "calibration_generations": 4,
                         "generations": 4, "alphas": [0.1, 0.2, 0.4], "max_new_tokens": 24}


class SteerConfig(StageConfig, SteerSettings):
    """Steer with an SAE latent vs a difference-of-means direction vs a random direction."""

    run: str = Field(..., description="run directory holding checkpoint/")
    name: str = Field("sentiment", description="result name: files RUN/steer/<name>.json, .png, .generations.jsonl")
    model: str | None = Field(None, description="model override (default: the one the SAE was trained on)")

    def result_file(self) -> Path:
        return Path(self.run) / "steer" / f"{self.name}.json"


def stored(cfg) -> SteerResult | None:
    """The result file if it was made with a config asking for the same work."""
    return reusable(SteerResult, cfg.result_file(), cfg, {"run"})


def _lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist")
    return [x.strip() for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]


def concept_texts(cfg: SteerSettings) -> tuple[list[str], list[str], str]:
    """The concept's positive and negative texts (train split only) and where they came from."""
    if cfg.positive_texts or cfg.negative_texts:
        if not (cfg.positive_texts and cfg.negative_texts):
            raise ValueError("give both positive_texts and negative_texts (or neither, to use concept_task)")
        return _lines(cfg.positive_texts), _lines(cfg.negative_texts), f"{cfg.positive_texts} vs {cfg.negative_texts}"
    data = load_task(_spec(cfg))
    for c in (cfg.positive_class, cfg.negative_class):
        if c not in data.classes:
            raise ValueError(f"concept task {data.name!r} has classes {data.classes}, not {c!r}")
    pick = lambda c: [t for t, y, test in zip(data.texts, data.labels, data.test, strict=True)  # noqa: E731
                      if not test and data.classes[y] == c]
    return pick(cfg.positive_class), pick(cfg.negative_class), f"task {data.name} ({data.source}), train split"


def _spec(cfg: SteerSettings):
    return builtin_spec(cfg.concept_task, seed=cfg.seed) if isinstance(cfg.concept_task, str) else cfg.concept_task


def candidate_prompts(cfg: SteerSettings) -> list[str]:
    prompts = cfg.prompts or (_lines(cfg.prompts_file) if cfg.prompts_file else list(SENTIMENT_PROMPTS))
    return prompts[: cfg.candidates] if cfg.candidates else prompts


def build_judge(cfg: SteerSettings, loaded: LoadedModel, hp: HookPoint, positions):
    if cfg.judge == "vader":
        judge = VaderJudge(target=cfg.positive_class, threshold=cfg.judge_threshold)
        return judge, judge.describe()
    n = n_layers(loaded.model)
    probe_hp = resolve(loaded.model, cfg.probe_hook or f"resid_post.{(hp.layer + n) // 2}")
    if probe_hp.layer == hp.layer:
        raise ValueError(f"the probe judge must read another layer than the steering hook {hp} (got {probe_hp})")
    data = load_task(_spec(cfg))
    judge = ProbeJudge(loaded, probe_hp, data, cfg.positive_class, positions, cfg.max_tokens, seed=cfg.seed)
    return judge, judge.describe()


def run_steer(cfg: SteerConfig, loaded: LoadedModel | None = None, progress: bool = True) -> SteerResult:
    """Run (or reuse) the steering comparison on cfg.run's SAE; record it in the ledger."""
    check_ledger(cfg)
    if (old := stored(cfg)) is not None:
        record(old, cfg.run, cfg, result_file=cfg.result_file())
        return old
    candidates = candidate_prompts(cfg)
    if cfg.n_prompts > len(candidates):
        raise ValueError(f"n_prompts {cfg.n_prompts} exceeds the {len(candidates)} candidate prompts")
    o = open_run(cfg, loaded)
    hp = resolve(o.loaded.model, o.meta["hook_out"]) if o.meta.get("hook_out") else o.hp
    wanted = set(cfg.directions)
    positive, negative, source = concept_texts(cfg)
    need_latent = "sae" in wanted and cfg.latent is None
    c = concept_activations(o.loaded, hp, o.sae if need_latent else None, positive, negative, o.positions,
                            cfg.max_tokens, source=source)
    dom = dom_direction(c)
    choice: dict[str, Any] = {"method": cfg.latent_select if need_latent else "given", "texts": source}
    if need_latent:
        choice["top"] = rank_latents(o.sae, c, dom)
        latent = choice["top"][cfg.latent_select][0]["latent"]
    else:
        latent = cfg.latent
    directions: dict[str, Direction] = {"dom": dom}
    if latent is not None and "sae" in wanted:
        directions["sae"] = sae_direction(o.sae, latent)
        choice["latent"] = latent
    if "random" in wanted:
        ref = directions.get("sae", dom)
        directions["random"] = random_direction(dom.vector.shape[0], cfg.seed + 1, float(ref.vector.norm()))
    if "file" in wanted:
        if not cfg.vector_file:
            raise ValueError("the 'file' direction needs vector_file")
        directions["file"] = file_direction(cfg.vector_file, cfg.vector_key)
    if "dom" not in wanted:
        directions.pop("dom")
    for d in directions.values():
        if d.vector.shape[0] != o.loaded.model.config.hidden_size:
            raise ValueError(f"direction {d.name!r} has {d.vector.shape[0]} dimensions; the hook {hp} has "
                             f"{o.loaded.model.config.hidden_size}")
    judge, judge_info = build_judge(cfg, o.loaded, hp, o.positions)
    out: SteerOutput = steer(cfg, o.sae, o.loaded, hp, o.positions, directions, judge, judge_info,
                             candidates, choice, progress)
    file = cfg.result_file()
    gens = file.with_suffix(".generations.jsonl")
    with atomic_write(gens) as f:
        for r in out.records:
            f.write((json.dumps(r) + "\n").encode())
    result = out.result.model_copy(update={"name": cfg.name, "run": str(o.run.path), "model": o.model_name,
                                           "generations_file": str(gens), "config": cfg.model_dump(mode="json")})
    try:
        result = result.model_copy(update={"plot": str(plot_scan(result, file.with_suffix(".png")))})
    except ImportError as e:
        result = result.model_copy(update={"plot_note": f"no plot: matplotlib is not installed ({e})"})
    result.write(file)
    record(result, o.run.path, cfg, result_file=file)
    return result
