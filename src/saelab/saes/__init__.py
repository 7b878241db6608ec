"""Sparse coders, one architecture per file, behind the SparseCoder interface.

Importing this package registers every architecture in ARCHITECTURES.
"""

from saelab.saes.base import ARCHITECTURES, SparseCoder, build_sae, load_sae
from saelab.saes.batchtopk import BatchTopKSAE
from saelab.saes.gated import GatedSAE
from saelab.saes.jumprelu import JumpReluSAE
from saelab.saes.matryoshka import MatryoshkaSAE
from saelab.saes.panneal import PAnnealSAE
from saelab.saes.relu import ReluSAE
from saelab.saes.topk import TopKSAE

__all__ = ["ARCHITECTURES", "BatchTopKSAE", "GatedSAE", "JumpReluSAE", "MatryoshkaSAE", "PAnnealSAE",
           "ReluSAE", "SparseCoder", "TopKSAE", "build_sae", "load_sae"]
