"""Encode fidelity against the real libraries: the check that makes a wrong adapter (b_dec
not subtracted, W_dec transposed, thresholds lost) impossible to ship unnoticed.

Both sides encode the same activations; they agree when every row has the same set of
active (non-zero) latents (Jaccard 1.0) and the latent values and outputs differ by at most
`tol` relative to the row's largest absolute value (a per-row max-norm relative error, so
tiny activations are not judged on their own scale).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from saelab.saes.base import SparseCoder
from saelab.saes.formats import FORMATS, format_name
from saelab.saes.formats.base import Meta

LIBRARIES = {"saelens": "sae_lens", "sparsify": "sparsify"}
TOL = 1e-5


def row_jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Jaccard index of the non-zero sets of a, b [batch, width]; 1 where both are empty."""
    a, b = a != 0, b != 0
    inter, union = (a & b).sum(1), (a | b).sum(1)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter, dtype=torch.float))


def row_rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row max |a - b| / max |b| (0 where b's row is all zero and a equals it)."""
    scale = b.abs().amax(1).clamp_min(1e-12)
    return (a - b).abs().amax(1) / scale


def compare_codes(z: torch.Tensor, z_ref: torch.Tensor, y: torch.Tensor, y_ref: torch.Tensor,
                  tol: float = TOL) -> dict[str, Any]:
    """z, z_ref: dense latents [batch, width]; y, y_ref: outputs [batch, d_out]."""
    z, z_ref, y, y_ref = (t.detach().float() for t in (z, z_ref, y, y_ref))
    jac = row_jaccard(z, z_ref)
    err_z, err_y = row_rel_err(z, z_ref), row_rel_err(y, y_ref)
    out = {"rows": z.shape[0], "jaccard_min": float(jac.min()), "jaccard_mean": float(jac.mean()),
           "rows_differing": int((jac < 1).sum()), "acts_rel_err_max": float(err_z.max()),
           "out_rel_err_max": float(err_y.max()), "l0_mean": float((z_ref != 0).sum(1).float().mean()), "tol": tol}
    out["passed"] = out["jaccard_min"] == 1.0 and out["acts_rel_err_max"] <= tol and out["out_rel_err_max"] <= tol
    return out


@torch.no_grad()
def reference_encode(library: str, path: str | Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense latents [batch, width] and outputs [batch, d_out] from the real library's own
    loader and encoder for the checkpoint folder `path` (in that library's format)."""
    lib = format_name(library)
    if lib == "saelens":
        from sae_lens import SAE
        ref = SAE.load_from_disk(str(path), device="cpu").eval()
        z = ref.encode(x)
        return z, ref(x)
    if lib == "sparsify":
        from sparsify import SparseCoder as SparsifyCoder
        ref = SparsifyCoder.load_from_disk(path, device="cpu").eval()
        top_acts, top_idx, _ = ref.encode(x)
        z = torch.zeros(x.shape[0], ref.num_latents, dtype=top_acts.dtype).scatter_(-1, top_idx, top_acts)
        return z, ref(x).sae_out
    raise ValueError(f"no reference library for {library!r}; verify against one of: {', '.join(LIBRARIES)}")


@torch.no_grad()
def verify_against(sae: SparseCoder, meta: Meta, library: str, x: torch.Tensor, tol: float = TOL) -> dict[str, Any]:
    """Export `sae` to the library's format, load it with the real library, encode x [batch, d_in]
    with both and compare (see compare_codes)."""
    lib = format_name(library)
    if lib not in LIBRARIES:
        raise ValueError(f"no reference library for {library!r}; verify against one of: {', '.join(LIBRARIES)}")
    with tempfile.TemporaryDirectory(prefix="saelab-verify-") as tmp:
        FORMATS[lib].save(sae, meta, Path(tmp))
        z_ref, y_ref = reference_encode(lib, tmp, x)
    x = x.float()
    return {"library": LIBRARIES[lib], **compare_codes(sae.encode(x), z_ref.float(), sae.reconstruct(x), y_ref.float(), tol)}
