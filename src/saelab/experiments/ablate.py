"""`saelab ablate RUN --latents ...` (or `--top N`): zero- or mean-ablate latents of the run's SAE
with the SAE spliced in and its error kept (saelab.intervene.ablate), write RUN/ablate/<name>.json
and record the result in the ledger. A result made with a config asking for the same work is reused.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from saelab.config import StageConfig
from saelab.experiments.evaluate import open_run, reusable
from saelab.intervene.ablate import AblateSettings, ablate
from saelab.models.load import LoadedModel
from saelab.runs.ledger import check_ledger, record
from saelab.runs.results import AblateResult


class AblateConfig(StageConfig, AblateSettings):
    """Ablate SAE latents (each alone, and the set at once): Delta CE with CIs and the tokens they move."""

    run: str = Field(..., description="run directory holding checkpoint/")
    name: str | None = Field(None, description="result name: RUN/ablate/<name>.json (default: <mode>-<config hash>)")
    model: str | None = Field(None, description="model override (default: the one the SAE was trained on)")

    def result_file(self) -> Path:
        name = self.name or f"{self.mode}-{self.hash(exclude={'run'})[:8]}"
        return Path(self.run) / "ablate" / f"{name}.json"


def stored(cfg) -> AblateResult | None:
    """The result file if it was made with a config asking for the same work."""
    return reusable(AblateResult, cfg.result_file(), cfg, {"run"})


def run_ablate(cfg: AblateConfig, loaded: LoadedModel | None = None, progress: bool = True) -> AblateResult:
    """Run (or reuse) the ablation of cfg.latents (or the top cfg.top) on cfg.run's SAE; record it."""
    if not cfg.latents and not cfg.top:
        raise ValueError("name the latents to ablate (--latents 12,40) or ask for the top N (--top 100)")
    check_ledger(cfg)
    if (old := stored(cfg)) is not None:
        record(old, cfg.run, cfg, result_file=cfg.result_file())
        return old
    o = open_run(cfg, loaded)
    if o.sae.transcoder:
        raise ValueError("ablate splices an SAE at its own hook; a transcoder (input and output hooks differ) is not "
                         "supported yet")
    result = ablate(cfg, o.sae, o.loaded, o.hp, o.positions, o.model_name, progress)
    file = cfg.result_file()
    result = result.model_copy(update={"name": file.stem, "run": str(o.run.path), "config": cfg.model_dump(mode="json")})
    result.write(file)
    record(result, o.run.path, cfg, result_file=file)
    return result
