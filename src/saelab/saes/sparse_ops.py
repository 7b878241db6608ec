"""Sparse kernels for TopK-style coders (TopK, BatchTopK, Matryoshka): only the selected
latents carry gradient.

The one dense piece of work is the encoder's forward matmul (2 d m FLOPs per token). The
selection may run on a bfloat16 copy of it (2.2x faster than float32 on CPUs with
AVX512-BF16); the selected values are then recomputed exactly in float32. The backward is
sparse: the encoder weight gradient is one row per selected (token, latent) (a segment sum),
the input gradient an embedding_bag over the selected encoder rows, and the decoder is sparse
both ways via embedding_bag. A selection is a row-sorted list of (row, col) entries with
`offsets` [B] where each row's entries start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.io import DTYPES


def select_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype for top-k selection. 'auto' on CPU: bfloat16 where the CPU has AVX512-BF16 (the
    bf16 matmul runs ~2.2x float32 there, making the whole step ~1.6x faster), float32 elsewhere
    (emulated bf16 is slower than float32). 'auto' on CUDA: bfloat16 where the GPU supports it
    (tensor cores), else float32; the CPU's test is never applied to a GPU."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if native else torch.float32
    return DTYPES[name]


def fused_kernels(t: torch.Tensor) -> bool:
    """Whether to use the CPU-tuned kernels (the private per-sample-weights backward, grouped
    top-k) for tensors like t; elsewhere (CUDA) a plain path with the same results runs."""
    return t.device.type == "cpu"


def row_offsets(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Start of each row's entries [batch] for row-sorted entries rows [nnz]."""
    offsets = torch.zeros(batch, dtype=torch.long, device=rows.device)
    offsets[1:] = torch.bincount(rows, minlength=batch).cumsum(0)[:-1]
    return offsets


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]] -> [batch, d_out]; values, indices: [batch, k]."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def ragged_decode(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor,
                  batch: int) -> torch.Tensor:
    """Decode a variable number of latents per row (BatchTopK). rows, cols, values: [nnz],
    rows sorted ascending -> [batch, d_out]."""
    return F.embedding_bag(cols, W_dec, row_offsets(rows, batch), per_sample_weights=values.to(W_dec.dtype),
                           mode="sum")


def encoder_pre(x: torch.Tensor, W_enc_t: torch.Tensor, b_enc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pre-activations x W_enc + b_enc [B, m] computed in `dtype`; W_enc_t: [m, d_in]. The bias
    rides in the matmul as a column of ones: addmm would first broadcast it into the whole
    [B, m] output, a full extra pass over the largest tensor of the step."""
    x_aug = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1).to(dtype)  # [B, d_in + 1]
    W_aug = torch.cat([W_enc_t, b_enc[:, None]], 1).to(dtype)  # [m, d_in + 1]
    return x_aug @ W_aug.t()


def selected_values(x: torch.Tensor, W_enc_t: torch.Tensor, b_enc: torch.Tensor, rows: torch.Tensor,
                    cols: torch.Tensor, offsets: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Exact float32 pre-activations [nnz] at the selected entries: <x_row, W_enc[:, col]> + b_enc[col].

    These are the gradients of an embedding_bag with respect to its per-sample weights, so
    torch's fused kernel for that computes them without materialising the [nnz, d] gather
    (11 ms per 4096-row batch with k 32 vs 68 ms for a chunked gather + bmm; d 576). Off the CPU
    (and with fused=False) a chunked gather computes the same dot products."""
    if fused and fused_kernels(x):
        dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(x, W_enc_t, cols, offsets, rows, 0, -1)
    else:
        step = max(1, (1 << 24) // max(1, x.shape[1]))  # entries per chunk: bounds the [chunk, d] gathers
        dots = torch.cat([(x[rows[s:s + step]] * W_enc_t[cols[s:s + step]]).sum(-1)
                          for s in range(0, cols.numel(), step)]) if cols.numel() else x.new_zeros(0)
    return dots + b_enc[cols]


def latent_segment_sum(cols: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, x: torch.Tensor,
                       m: int) -> torch.Tensor:
    """sum over entries e with cols[e] == i of weights[e] * x[rows[e]], for every latent i -> [m, d]:
    the encoder weight gradient of a sparse code. Sorting by latent turns it into one
    embedding_bag (4x faster than a COO sparse matmul here, 18x faster than index_add)."""
    order = cols.argsort()
    return F.embedding_bag(rows[order], x, row_offsets(cols[order], m), per_sample_weights=weights[order],
                           mode="sum")


def encoder_grads(ctx, x: torch.Tensor, W_enc_t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  offsets: torch.Tensor, g: torch.Tensor):
    """(g_x [B, d_in], g_W_enc [d_in, m], g_b_enc [m]) from the gradient g [nnz] of the selected values."""
    m = W_enc_t.shape[0]
    g_b = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
    g_W = latent_segment_sum(cols, rows, g, x, m).t() if ctx.needs_input_grad[1] else None
    g_x = (F.embedding_bag(cols, W_enc_t, offsets, per_sample_weights=g, mode="sum")
           if ctx.needs_input_grad[0] else None)
    return g_x, g_W, g_b


def topk_indices(pre: torch.Tensor, k: int, group: int = 4) -> torch.Tensor:
    """Indices [B, k] of the k largest entries of each row of pre [B, m] (in no order): the same
    values as pre.topk(k), in ~2/3 of the time for wide rows (28 vs 42 ms at [4096, 9216]).

    torch's CPU topk costs ~1 ns per element on wide rows but several on narrow ones, so this
    shrinks the rows first: each level keeps the max over `group` strided slices (entry j of a
    level covers j, j + s, j + 2s, ... of the level below; a fast vectorised pass). Any top-k
    entry lies in one of the k best groups of every level (a group holding an entry above the
    k-th best group max must itself be above it), so descending from the top level through only
    those groups, group * k candidates per row, finds the top k exactly (up to ties)."""
    B = pre.shape[0]
    if not fused_kernels(pre):  # a GPU's topk is fast as it is
        return pre.topk(k, dim=-1, sorted=False).indices
    levels = [pre]
    while levels[-1].shape[1] % group == 0 and levels[-1].shape[1] // group >= 4 * k:
        top = levels[-1]
        levels.append(top.view(B, group, -1).amax(1))  # [B, m / group^level]
    idx = levels[-1].topk(k, dim=-1, sorted=False).indices
    for level in reversed(levels[:-1]):
        stride = level.shape[1] // group
        cand = (idx[:, None, :] + torch.arange(group, device=pre.device)[None, :, None] * stride).view(B, group * k)
        idx = cand.gather(1, level.gather(1, cand).topk(k, dim=-1, sorted=False).indices)
    return idx


class TopKEncode(torch.autograd.Function):
    """(x_c [B, d_in], W_enc [d_in, m], b_enc [m]) -> ReLU'd top-k values [B, k], indices [B, k]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, dtype: torch.dtype):
        W_enc_t = W_enc.t().contiguous()  # [m, d_in]: latent rows (free when W_enc is stored row-major)
        pre = encoder_pre(x, W_enc_t, b_enc, dtype)
        idx = topk_indices(pre, k)
        B = x.shape[0]
        rows = torch.arange(B, device=x.device).repeat_interleave(k)
        offsets = torch.arange(0, B * k, k, device=x.device)
        vals = (pre.gather(1, idx) if dtype == x.dtype
                else selected_values(x, W_enc_t, b_enc, rows, idx.reshape(-1), offsets).view(B, k)).relu()
        ctx.save_for_backward(x, W_enc_t, idx, vals, rows, offsets)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, g_vals: torch.Tensor, _g_idx):
        x, W_enc_t, idx, vals, rows, offsets = ctx.saved_tensors
        g = (g_vals * (vals > 0)).reshape(-1)  # ReLU'd-away slots get no gradient
        return *encoder_grads(ctx, x, W_enc_t, rows, idx.reshape(-1), offsets, g), None, None


def topk_encode(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return TopKEncode.apply(x_c, W_enc, b_enc, k, dtype)


class BatchTopKEncode(torch.autograd.Function):
    """(x_c [B, d_in], W_enc [d_in, m], b_enc [m]) -> the k*B largest ReLU'd pre-activations of
    the whole batch that are > 0, as row-sorted rows [nnz], cols [nnz], values [nnz]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, dtype: torch.dtype):
        W_enc_t = W_enc.t().contiguous()
        B, m = x.shape[0], W_enc_t.shape[0]
        pre = encoder_pre(x, W_enc_t, b_enc, dtype)
        n = min(k * B, pre.numel())
        # in bf16, select 1/8 more candidates and keep the exact top n of their float32 values:
        # rounding reorders entries near the boundary, and the kept minimum (what the inference
        # threshold learns from) would be biased low (-0.5% measured)
        n_cand = n if dtype == x.dtype else min(n + n // 8, pre.numel())
        flat = topk_indices(pre.view(1, -1), n_cand)[0].sort().values  # 40 vs 420 ms for topk
        rows, cols = flat // m, flat % m
        if dtype == x.dtype:
            vals = pre.view(-1)[flat]
        else:
            vals = selected_values(x, W_enc_t, b_enc, rows, cols, row_offsets(rows, B))
            if n_cand > n:
                top = vals.topk(n, sorted=False).indices.sort().values  # sorted: rows stay sorted
                rows, cols, vals = rows[top], cols[top], vals[top]
        keep = vals > 0
        if not keep.all():
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
        offsets = row_offsets(rows, B)
        ctx.save_for_backward(x, W_enc_t, rows, cols, offsets)
        ctx.mark_non_differentiable(rows, cols)
        return rows, cols, vals

    @staticmethod
    def backward(ctx, _g_rows, _g_cols, g_vals: torch.Tensor):
        x, W_enc_t, rows, cols, offsets = ctx.saved_tensors
        return *encoder_grads(ctx, x, W_enc_t, rows, cols, offsets, g_vals), None, None


def batch_topk_encode(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return BatchTopKEncode.apply(x_c, W_enc, b_enc, k, dtype)


# --- sparse training paths for threshold coders (ReLU, JumpReLU, Gated, p-annealing) ----------
#
# Their activations are not k-sparse by construction, but once trained they are sparse (L0 << width).
# The encoder's dense forward matmul stays; everything after it runs on the entries that carry a
# value or a gradient (`entries`, chosen per architecture), listed row-sorted: the values are read
# from the dense pre-activations, the decoder is an embedding_bag over those entries both ways, and
# the encoder backward is the same segment sum / embedding_bag as TopK's (`PreAt`).

SPARSE_MAX_DENSITY = 0.05  # entries / (batch * width) up to which the sparse path runs; see docs/benchmarks.md


def entries(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-sorted (rows [nnz], cols [nnz], offsets [B]) of the True entries of mask [B, m]."""
    flat = mask.view(-1).nonzero().squeeze(1)
    m = mask.shape[1]
    rows, cols = flat // m, flat % m
    return rows, cols, row_offsets(rows, mask.shape[0])


class PreAt(torch.autograd.Function):
    """(x [B, d_in], W_enc [d_in, m], b [m] or None, pre [B, m] detached = x W_enc (+ b), rows, cols,
    offsets) -> pre at the entries [nnz], differentiable in x, W_enc and b as if pre had been
    computed with autograd and indexed; the backward touches only the entries."""

    @staticmethod
    def forward(ctx, x, W_enc, b, pre, rows, cols, offsets):
        ctx.save_for_backward(x, W_enc.t().contiguous(), rows, cols, offsets)
        ctx.has_bias = b is not None
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, g):
        x, W_enc_t, rows, cols, offsets = ctx.saved_tensors
        g_x, g_W, g_b = encoder_grads(ctx, x, W_enc_t, rows, cols, offsets, g.contiguous())
        return g_x, g_W, g_b if ctx.has_bias else None, None, None, None, None


def pre_at(x: torch.Tensor, W_enc: torch.Tensor, b: torch.Tensor | None, pre: torch.Tensor, rows: torch.Tensor,
           cols: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return PreAt.apply(x, W_enc, b, pre, rows, cols, offsets)


def dense_pre(x: torch.Tensor, W_enc: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x W_enc (+ b) [B, m] without autograd, float32 (the one dense matmul of a sparse step)."""
    with torch.no_grad():
        if b is None:
            return x @ W_enc
        return encoder_pre(x, W_enc.t(), b, x.dtype)
