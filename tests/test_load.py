import pytest

from saelab.models.load import load_model


def test_load_local_directory(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    assert lm.model.config.model_type == "llama"
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.pad_token_id is not None


def test_unknown_model_names_the_attempt_and_the_local_path_option():
    # the hub code path runs, offline (conftest sets HF_HUB_OFFLINE): it must fail fast and clearly
    with pytest.raises(ValueError) as e:
        load_model("no-such-org/no-such-model-xyz")
    msg = str(e.value)
    assert "no-such-org/no-such-model-xyz" in msg and "local path" in msg


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_bad_dtype(tiny_model_dir):
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tiny_model_dir), dtype="float8")


@pytest.mark.embedded
def test_embedded_model_loads_from_cache():
    lm = load_model("smollm2")
    cfg = lm.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert lm.tokenizer.bos_token == "<|im_start|>"
