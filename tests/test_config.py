import pytest

from saelab.activations.harvest import HarvestConfig
from saelab.saes.config import SAEConfig
from saelab.train.trainer import TrainConfig


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig(store="s", sae=SAEConfig(width=64, k=4), tokens=1000)
    cfg.save(tmp_path / "c.yaml")
    assert TrainConfig.load(tmp_path / "c.yaml") == cfg


def test_overrides_parse_yaml_values(tmp_path):
    (tmp_path / "c.yaml").write_text("store: s\n")
    cfg = TrainConfig.load(tmp_path / "c.yaml", ["sae.k=7", "lr=0.001", "smoke=true"])
    assert cfg.sae.k == 7 and cfg.lr == 0.001 and cfg.smoke is True


def test_errors_name_the_file_and_field(tmp_path):
    (tmp_path / "c.yaml").write_text("store: s\nsae:\n  k: -1\nbogus: 3\n")
    with pytest.raises(ValueError) as e:
        TrainConfig.load(tmp_path / "c.yaml")
    msg = str(e.value)
    assert "c.yaml" in msg and "sae.k" in msg and "bogus" in msg


def test_k_must_be_below_width():
    with pytest.raises(ValueError, match="k .* must be smaller than width"):
        SAEConfig(width=8, k=8)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        HarvestConfig.load(tmp_path / "nope.yaml")


def test_config_hash_changes_with_fields():
    assert HarvestConfig().hash() == HarvestConfig().hash()
    assert HarvestConfig(tokens=5).hash() != HarvestConfig().hash()


def test_quickstart_interpretation_settings_are_checked():
    """The quickstart's light interpretation keeps what its ledger row and dashboard read (the
    default explanations, detection); a typo or a missing one is refused by name, not run silently."""
    from saelab.experiments.quickstart import QuickstartConfig

    q = QuickstartConfig(explain_prompts=["default", "contrastive"], scorers=["detection", "fuzzing"])
    assert q.hash(q.PAGES) == QuickstartConfig().hash(q.PAGES)  # the run directory: what is shown, not trained
    for bad, match in ((dict(explain_prompts=["contrastive"]), "must include 'default'"),
                       (dict(explain_prompts=[]), "must include 'default'"),
                       (dict(scorers=["embedding"]), "must include 'detection'"),
                       (dict(scorers=["detecton"]), "Input should be 'detection'")):
        with pytest.raises(ValueError, match=match):
            QuickstartConfig(**bad)


def test_quickstart_keeps_each_stages_time_from_the_run_that_did_it():
    from saelab.experiments.quickstart import stage_seconds

    first = stage_seconds({"harvest": 131.0, "train": 59.0, "interpret": 508.0}, None)
    assert first == {"harvest": 131.0, "train": 59.0, "interpret": 508.0, "total": 698.0}
    again = stage_seconds({"harvest": 0.4, "train": 0.2, "interpret": 187.5}, first)  # interpretation redone
    assert again == {"harvest": 131.0, "train": 59.0, "interpret": 187.5, "total": 377.5}
