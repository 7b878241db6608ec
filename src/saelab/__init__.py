"""saelab: train, evaluate and interpret sparse autoencoders on language-model activations."""

__version__ = "0.1.0"
