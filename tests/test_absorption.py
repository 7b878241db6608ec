import pytest

from saelab.data.tokens import Positions
from saelab.evals.absorption import AbsorptionConfig, absorption, vocab_words
from saelab.models.hooks import HookPoint
from saelab.saes import load_sae

WORDS = ("apple anchor arrow atlas basket bottle branch bridge candle carpet castle cotton dinner doctor "
         "dragon drawer engine empire energy evening fabric falcon finger forest garden ginger glider golden "
         "hammer harbor helmet hollow island insect ivory inland jacket jungle jigsaw journal kettle kitten "
         "kernel kidney ladder lantern lemon lizard magnet marble meadow mirror napkin needle nickel noodle "
         "orange oyster office onion pencil pepper pillow planet rabbit ribbon rocket saddle silver spider "
         "summer table tennis ticket timber violin velvet valley vessel window winter walnut wizard").split()



def test_absorption_reports_fractions_splits_and_cis(tiny_sae_run, tiny_loaded, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS))
    sae, _ = load_sae(tiny_sae_run.checkpoint_dir)
    cfg = AbsorptionConfig(word_list=str(words), min_letter_words=2, max_k=3, bootstrap=200)
    r = absorption(cfg, sae, tiny_loaded, HookPoint(1, "resid_post"), Positions(), progress=False).model_dump()
    assert r["words"] == len(set(WORDS)) and r["letters"] >= 3
    for key in ("absorption_fraction", "full_absorption_rate"):
        m = r[key]
        assert 0 <= m["ci95"][0] <= m["mean"] <= m["ci95"][1] <= 1
    for letter, v in r["per_letter"].items():
        assert 1 <= len(v["main_latents"]) <= 3 and v["split_latents"] == len(v["main_latents"]) - 1
        assert set(v["sparse_probe_f1"]) == {1, 2, 3}
        assert letter in "abcdefghijklmnopqrstuvwxyz"


def test_absorption_needs_words(tiny_sae_run, tiny_loaded):
    """The byte-level tiny tokenizer has no multi-letter tokens: a clear error, not an empty result."""
    assert vocab_words(tiny_loaded.tokenizer, 100, 0) == []
    sae, _ = load_sae(tiny_sae_run.checkpoint_dir)
    with pytest.raises(ValueError, match="tokenizer vocabulary .* gave 0"):
        absorption(AbsorptionConfig(), sae, tiny_loaded, HookPoint(1, "resid_post"), Positions(), progress=False)


@pytest.mark.embedded
def test_first_letter_is_probed_from_single_token_words_of_the_embedded_model():
    from saelab.models.load import load_model
    from saelab.saes import build_sae
    from saelab.saes.config import SAEConfig

    loaded = load_model("smollm2")
    words = vocab_words(loaded.tokenizer, 400, 0)
    assert len(words) == 400 and all(len(loaded.tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1
                                     for w in words[:50])
    sae = build_sae(SAEConfig(d_in=576, width=256, k=16)).eval()
    r = absorption(AbsorptionConfig(words=400, min_letter_words=8, bootstrap=200), sae, loaded,
                   HookPoint(10, "resid_post"), Positions(), progress=False).model_dump()
    assert r["letters"] >= 10 and r["mean_probe_f1"] > 0.3, (r["letters"], r["mean_probe_f1"])
