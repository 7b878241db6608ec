"""Interventions on a model through an SAE: steering (steer.py), latent ablation (ablate.py) and
the logit lens of decoder directions (lens.py), with the judges steering is scored by
(judge.py, vader.py). Like evals/, this computes results from an SAE, a model and data and knows
nothing of run directories; saelab.experiments.steer / .ablate compose and record them."""
