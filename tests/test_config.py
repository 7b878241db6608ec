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
