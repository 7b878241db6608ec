"""Feature circuits: sets of latents that carry a concept (sets.py) and causal attribution graphs
over SAEs spliced into the model with their error terms (graph.py)."""
