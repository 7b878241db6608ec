"""Sparse coders, one architecture per file, behind the SparseCoder interface."""

from saelab.saes.base import SparseCoder, build_sae, load_sae
from saelab.saes.topk import TopKSAE

__all__ = ["SparseCoder", "TopKSAE", "build_sae", "load_sae"]
