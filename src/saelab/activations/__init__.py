"""Activation stores: harvest from a model, read back for training."""
