"""The `saelab` command: a package of typer command groups over the library's stage functions.

Each stage command takes an optional --config YAML file, a few flags, and any number of
--set KEY=VALUE overrides (dotted keys, YAML values), in that order of precedence; its help
text is the config fields' descriptions. `saelab config STAGE` prints a stage's defaults.
"""

from __future__ import annotations

import sys
import typing

import typer

from saelab.activations.harvest import HarvestConfig
from saelab.cli import circuits, data, formats, interventions, ledger, pages, probe, rivalry, stages
from saelab.config import Config
from saelab.experiments.ablate import AblateConfig
from saelab.experiments.evaluate import EvalConfig
from saelab.experiments.interpret import InterpretConfig
from saelab.experiments.probe import ProbeConfig
from saelab.experiments.quickstart import QuickstartConfig
from saelab.experiments.rivalry import RivalryConfig
from saelab.experiments.steer import SteerConfig
from saelab.train.fly import FlyTrainConfig
from saelab.train.trainer import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate and interpret sparse autoencoders on language-model activations.")
app.add_typer(data.app, name="data")
app.add_typer(ledger.app, name="ledger")
app.registered_commands += (formats.app.registered_commands + pages.app.registered_commands
                             + circuits.app.registered_commands + rivalry.app.registered_commands)
stages.register(app)
probe.register(app)
interventions.register(app)

STAGES: dict[str, type[Config]] = {"harvest": HarvestConfig, "train": TrainConfig, "train-fly": FlyTrainConfig,
                                   "eval": EvalConfig, "interpret": InterpretConfig, "probe": ProbeConfig,
                                   "quickstart": QuickstartConfig, "steer": SteerConfig, "ablate": AblateConfig,
                                   "rivalry": RivalryConfig}


@app.command("config")
def config_cmd(stage: str = typer.Argument(..., help=f"one of: {', '.join(STAGES)}")) -> None:
    """Print a stage's default config as YAML (edit it, then pass it with --config)."""
    if stage not in STAGES:
        typer.echo(f"error: unknown stage {stage!r}; stages: {', '.join(STAGES)}", err=True)
        raise typer.Exit(2)
    cls = STAGES[stage]
    required = {n: ["<required>"] if typing.get_origin(f.annotation) is list else "<required>"
                for n, f in cls.model_fields.items() if f.is_required()}
    typer.echo(cls.model_construct(**required).to_yaml().rstrip())


def main() -> None:  # pragma: no cover
    app(prog_name="saelab")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
