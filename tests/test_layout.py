"""The rule between folders, checked on the imports: evals/, interp/ and intervene/ compute a result
from an SAE, a model and data and know nothing of run directories, training or pipelines; experiments/
and the CLI compose stages; a sparse coder stays model-agnostic."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "saelab"


def imports(folder: str) -> dict[str, set[str]]:
    out = {}
    for path in (SRC / folder).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        out[str(path.relative_to(SRC))] = {n for n in names if n.startswith("saelab")}
    return out


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{f} imports {m}" for f, ms in imports(folder).items() for m in sorted(ms)
            if any(m == x or m.startswith(x + ".") for x in forbidden)]


def test_evals_and_interventions_know_nothing_of_run_directories_training_or_pipelines():
    for folder in ("evals", "intervene"):
        assert offenders(folder, ("saelab.runs.rundir", "saelab.runs.ledger", "saelab.train", "saelab.experiments",
                                  "saelab.cli")) == [], folder


def test_circuits_know_nothing_of_run_directories_either():
    assert offenders("circuits", ("saelab.runs.rundir", "saelab.runs.ledger", "saelab.train", "saelab.experiments",
                                  "saelab.cli")) == []


def test_interp_knows_nothing_of_run_directories_training_or_pipelines():
    assert offenders("interp", ("saelab.runs.rundir", "saelab.runs.ledger", "saelab.train", "saelab.experiments",
                                "saelab.cli")) == []


def test_sparse_coders_are_model_agnostic():
    assert offenders("saes", ("saelab.models", "saelab.activations", "saelab.train", "saelab.evals",
                              "saelab.experiments", "saelab.runs")) == []


def test_nothing_below_the_cli_imports_it():
    for folder in ("activations", "data", "evals", "experiments", "interp", "intervene", "models", "runs", "saes",
                   "train"):
        assert offenders(folder, ("saelab.cli",)) == [], folder
