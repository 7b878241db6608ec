"""Auto-interpretation: activation examples, LLM explanations, scoring and label validation.

Everything here computes from a sparse coder, a model and text, and knows nothing of run
directories (saelab.experiments.interpret composes it, writes RUN/interp/ and records).
"""
