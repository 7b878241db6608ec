"""Interventions on a model through an SAE: steering (steer.py), latent ablation (ablate.py) and
the logit lens of decoder directions (lens.py), with the judges steering is scored by
(judge.py, vader.py). Like evals/, this computes results from an SAE, a model and data and knows
nothing of run directories; saelab.experiments.steer / .ablate compose and record them."""

from typing import Literal

from pydantic import Field

from saelab.config import Config


class InterventionSettings(Config):
    """Settings every intervention takes: the model's dtype, bootstrap resamples, the seed."""

    bootstrap: int = Field(1000, gt=0, description="bootstrap resamples for CIs")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model dtype")
    seed: int = 0
