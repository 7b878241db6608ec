"""Sparse kernels for TopK-style coders (TopK, BatchTopK, Matryoshka): only the selected
latents carry gradient.

The one dense piece of work is the encoder's forward matmul (2 d m FLOPs per token). The
selection may run on a bfloat16 copy of it (2.2x faster than float32 on CPUs with
AVX512-BF16), fused with the top-k in cache-sized row blocks (`topk_blocks`); the selected
values are then recomputed exactly in float32. The backward is
sparse: the encoder weight gradient is one row per selected (token, latent) (a segment sum),
the input gradient an embedding_bag over the selected encoder rows, and the decoder is sparse
both ways via embedding_bag. A selection is a row-sorted list of (row, col) entries with
`offsets` [B] where each row's entries start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def augmented(x: torch.Tensor, W_enc_t: torch.Tensor, b_enc: torch.Tensor,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_aug [B, d_in + 1], W_aug [m, d_in + 1]) in `dtype`, with x_aug @ W_aug.t() = x W_enc + b_enc:
    the bias rides in the matmul as a column of ones (addmm would first broadcast it into the
    whole [B, m] output, a full extra pass over the largest tensor of the step)."""
    (B, d), m = x.shape, W_enc_t.shape[0]
    x_aug, W_aug = x.new_empty(B, d + 1, dtype=dtype), W_enc_t.new_empty(m, d + 1, dtype=dtype)
    x_aug[:, :d], W_aug[:, :d] = x, W_enc_t  # cast while copying (no float32 concatenation written first)
    x_aug[:, d], W_aug[:, d] = 1, b_enc
    return x_aug, W_aug


def encoder_pre(x: torch.Tensor, W_enc_t: torch.Tensor, b_enc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pre-activations x W_enc + b_enc [B, m] computed in `dtype`; W_enc_t: [m, d_in]."""
    x_aug, W_aug = augmented(x, W_enc_t, b_enc, dtype)
    return x_aug @ W_aug.t()


def selected_values(x: torch.Tensor, W_enc_t: torch.Tensor, b_enc: torch.Tensor, rows: torch.Tensor,
                    cols: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Exact float32 pre-activations [nnz] at the selected entries: <x_row, W_enc[:, col]> + b_enc[col]
    (`entry_dots`: torch's fused per-sample-weights kernel on the CPU, 11 ms per 4096-row batch with
    k 32 vs 68 ms for a chunked gather + bmm at d 576; a chunked gather elsewhere)."""
    return entry_dots(x, W_enc_t, rows, cols, offsets) + b_enc[cols]


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


ROW_BLOCK_BYTES = 1 << 24  # bf16 pre-activations per block of the fused encoder + top-k: rows = the power of two
# that fits 16 MiB (512 rows at width 9216, 1024 at 4608), still in cache when the top-k reads them. Measured
# ([4096, 576] x [576, m], 2 cores of an AVX512-BF16 EPYC, interleaved medians of 25): m 9216 176 -> 159 ms (and
# 175 -> 153 in another run), m 4608 106 -> 92-95 ms; float32 selection gained nothing (361 vs 349-408 ms), so it
# runs whole and unchanged


def block_rows(m: int, dtype: torch.dtype) -> int:
    """Rows per block of [rows, m] pre-activations in dtype: the power of two that fits ROW_BLOCK_BYTES."""
    return 1 << max(0, (ROW_BLOCK_BYTES // (m * dtype.itemsize)).bit_length() - 1)


def topk_blocks(x: torch.Tensor, W_enc_t: torch.Tensor, b_enc: torch.Tensor, k: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(indices [B, k], their pre-activations [B, k] when dtype is x's, else None) of each row's k
    largest pre-activations x W_enc + b_enc, computed in dtype. When the selection runs on the CPU
    in a narrower dtype than x (bf16), the encoder matmul and the top-k run fused in row blocks,
    so the [B, m] pre-activations are never written whole (the same indices as over the whole
    batch: rows are independent); otherwise in one piece."""
    B, m = x.shape[0], W_enc_t.shape[0]
    if dtype == x.dtype or not fused_kernels(x):
        pre = encoder_pre(x, W_enc_t, b_enc, dtype)
        idx = topk_indices(pre, k)
        return idx, (pre.gather(1, idx) if dtype == x.dtype else None)
    x_aug, W_aug = augmented(x, W_enc_t, b_enc, dtype)
    rows = block_rows(m, dtype)
    idx = torch.empty(B, k, dtype=torch.long, device=x.device)
    block = torch.empty(min(rows, B), m, dtype=dtype, device=x.device)  # one [rows, m] buffer for every block
    for s in range(0, B, rows):
        pre = torch.mm(x_aug[s:s + rows], W_aug.t(), out=block[:min(rows, B - s)])
        idx[s:s + rows] = topk_indices(pre, k)
    return idx, None


def topk_encode(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                dtype: torch.dtype = torch.float32,
                shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Entries]:
    """(x_c [B, d_in], W_enc [d_in, m], b_enc [m]) -> ReLU'd top-k values [B, k] (differentiable in
    all three, and in `shift` when x_c = x - shift was computed without autograd: see `PreAt`; the
    backward touches only the selected entries), indices [B, k], and the entries (row-sorted, k per
    row), whose latent-sorted order the encoder's and `entry_decode`'s weight gradients share."""
    B = x_c.shape[0]
    with torch.no_grad():  # the selection: indices, then their exact pre-activations
        W_enc_t = W_enc.t().contiguous()  # [m, d_in]: latent rows (free when W_enc is stored row-major)
        idx, pre = topk_blocks(x_c, W_enc_t, b_enc, k, dtype)
        ent = Entries(torch.arange(B, device=x_c.device).repeat_interleave(k), idx.reshape(-1), B, W_enc_t.shape[0])
        pre = (pre.reshape(-1) if pre is not None
               else selected_values(x_c, W_enc_t, b_enc, ent.rows, ent.cols, ent.offsets))
    return pre_at(x_c, W_enc, b_enc, pre, ent, shift).relu().view(B, k), idx, ent


def batch_topk_encode(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                      dtype: torch.dtype = torch.float32,
                      shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_c [B, d_in], W_enc [d_in, m], b_enc [m]) -> the k*B largest ReLU'd pre-activations of the
    whole batch that are > 0, as row-sorted rows [nnz], cols [nnz] and values [nnz], the values
    differentiable in x_c, W_enc, b_enc (and `shift`, as in `topk_encode`) through `pre_at`."""
    B, m = x_c.shape[0], W_enc.shape[1]
    with torch.no_grad():
        W_enc_t = W_enc.t().contiguous()
        pre = encoder_pre(x_c, W_enc_t, b_enc, dtype)
        n = min(k * B, pre.numel())
        # in bf16, select 1/8 more candidates and keep the exact top n of their float32 values:
        # rounding reorders entries near the boundary, and the kept minimum (what the inference
        # threshold learns from) would be biased low (-0.5% measured)
        n_cand = n if dtype == x_c.dtype else min(n + n // 8, pre.numel())
        flat = topk_indices(pre.view(1, -1), n_cand)[0].sort().values  # 40 vs 420 ms for topk
        rows, cols = flat // m, flat % m
        if dtype == x_c.dtype:
            vals = pre.view(-1)[flat]
        else:
            vals = selected_values(x_c, W_enc_t, b_enc, rows, cols, row_offsets(rows, B))
            if n_cand > n:
                top = vals.topk(n, sorted=False).indices.sort().values  # sorted: rows stay sorted
                rows, cols, vals = rows[top], cols[top], vals[top]
        keep = vals > 0
        if not keep.all():
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
    return rows, cols, pre_at(x_c, W_enc, b_enc, vals, Entries(rows, cols, B, m), shift)


# --- sparse training paths on selected entries: TopK, and the threshold coders (ReLU, JumpReLU, Gated,
# p-annealing) ---
#
# TopK's entries are its k per row. The threshold coders' activations are not k-sparse by construction,
# but once trained they are sparse (L0 << width).
# The encoder's dense forward matmul stays; everything after it runs on the entries that carry a
# value or a gradient (`Entries`, chosen per architecture), listed row-sorted: the values are read
# from the dense pre-activations (`pre_at`, whose backward is TopK's sparse encoder backward), the
# decoder is sparse both ways (`entry_decode`), and per-latent vectors are read per entry (`take`).
# The encoder and decoder weight gradients are both segment sums over the entries sorted by latent;
# that order is computed once per step.

SPARSE_MAX_DENSITY = 0.05  # entries / (batch * width) up to which the sparse path runs. Measured (d 576, width
# 9216, batch 4096, forward + backward, bf16 preselection; 2 shared cores, load ~5): density 0.6% sparse
# 1.3-2.2 s vs dense 4.0-6.2 s, 2% 1.9-2.8 vs 3.4-6.6 s, 5% 2.9-5.5 vs 2.6-7.0 s (break-even for relu and gated,
# faster for jumprelu and panneal), 10% slower for all four (docs/benchmarks.md, "Threshold coders")


class Entries:
    """Row-sorted entries (rows [nnz], cols [nnz], offsets [B], flat = rows * m + cols) of a [B, m]
    mask, with their latent-sorted order computed on first use."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, batch: int, width: int):
        self.batch, self.width, self.rows, self.cols = batch, width, rows, cols
        self.offsets = row_offsets(rows, batch)
        self._by_latent: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, mask: torch.Tensor) -> Entries:
        flat = mask.view(-1).nonzero().squeeze(1)
        return cls(flat // mask.shape[1], flat % mask.shape[1], *mask.shape)

    def subset(self, keep: torch.Tensor) -> Entries:
        return Entries(self.rows[keep], self.cols[keep], self.batch, self.width)

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order [nnz], rows in that order [nnz], latent offsets [m]) for segment sums over latents."""
        if self._by_latent is None:
            order = self.cols.argsort()
            self._by_latent = order, self.rows[order], row_offsets(self.cols[order], self.width)
        return self._by_latent

    def latent_sum(self, weights: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """sum over entries e of latent i of weights[e] * a[rows[e]], every latent -> [m, a.shape[1]]."""
        order, rows, offsets = self.by_latent()
        return F.embedding_bag(rows, a, offsets, per_sample_weights=weights[order].to(a.dtype), mode="sum")

    def dots(self, a: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """<a[rows[e]], W[cols[e]]> for every entry -> [nnz]; a [B, d], W [m, d]."""
        return entry_dots(a, W, self.rows, self.cols, self.offsets)


def entry_dots(a: torch.Tensor, W: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               offsets: torch.Tensor) -> torch.Tensor:
    """<a[rows[e]], W[cols[e]]> [nnz] (rows sorted; offsets their row starts): torch's fused kernel
    for an embedding_bag's per-sample-weight gradient on the CPU, a chunked gather elsewhere."""
    if fused_kernels(a):
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(a, W, cols, offsets, rows, 0, -1)
    step = max(1, (1 << 24) // max(1, a.shape[1]))  # entries per chunk: bounds the [chunk, d] gathers
    return (torch.cat([(a[rows[s:s + step]] * W[cols[s:s + step]]).sum(-1) for s in range(0, cols.numel(), step)])
            if cols.numel() else a.new_zeros(0))


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a[i], b[i]> for every row [n]; a, b [n, d]. On the CPU torch's fused kernel for
    `entry_dots` (one pass, no [n, d] product written: 2.5-3.2 vs 4.1-9.5 ms for linalg.vecdot at
    [9216, 576], which multiplies and then sums), elsewhere vecdot."""
    if not fused_kernels(a):
        return torch.linalg.vecdot(a, b)
    ar = torch.arange(a.shape[0], device=a.device)
    return entry_dots(a, b, ar, ar, ar)


class PreAt(torch.autograd.Function):
    """(x [B, d_in], W_enc [d_in, m], b [m] or None, vals [nnz] = (x W_enc (+ b)) at the entries,
    computed without autograd, entries, shift [d_in] or None) -> vals, differentiable in x, W_enc, b
    and shift as if the dense pre-activations (x - shift) W_enc (+ b) had been computed with
    autograd and indexed (x is then the already-shifted input); the backward touches only the
    entries. The shift's gradient, -sum_rows g_x, is -W_enc g_cols (g_cols [m]: g summed per
    latent): a matvec instead of the [B, d_in] input gradient, which is then not computed at all
    unless x itself needs it."""

    @staticmethod
    def forward(ctx, x, W_enc, b, vals, ent: Entries, shift=None):
        ctx.save_for_backward(x, W_enc)
        ctx.ent, ctx.has_bias, ctx.has_shift = ent, b is not None, shift is not None
        return vals.detach().clone()

    @staticmethod
    def backward(ctx, g):
        x, W_enc = ctx.saved_tensors
        ent: Entries = ctx.ent
        g = g.contiguous()
        g_x = (F.embedding_bag(ent.cols, W_enc.t().contiguous(), ent.offsets, per_sample_weights=g, mode="sum")
               if ctx.needs_input_grad[0] else None)
        g_W = ent.latent_sum(g, x).t() if ctx.needs_input_grad[1] else None
        want_b, want_shift = ctx.has_bias and ctx.needs_input_grad[2], ctx.has_shift and ctx.needs_input_grad[5]
        g_cols = (torch.zeros(ent.width, dtype=g.dtype, device=g.device).index_add_(0, ent.cols, g)
                  if want_b or want_shift else None)
        g_shift = -(W_enc @ g_cols) if want_shift else None
        return g_x, g_W, g_cols if want_b else None, None, None, g_shift


def pre_at(x: torch.Tensor, W_enc: torch.Tensor, b: torch.Tensor | None, vals: torch.Tensor,
           ent: Entries, shift: torch.Tensor | None = None) -> torch.Tensor:
    return PreAt.apply(x, W_enc, b, vals, ent, shift)


class EntryDecode(torch.autograd.Function):
    """(z [nnz], W_dec [m, d_out], entries) -> sum over a row's entries of z_e W_dec[col_e] [B, d_out].
    Backward: dL/dz_e = <dL/dy[row_e], W_dec[col_e]> (also for entries with z_e = 0) and the W_dec
    gradient as a latent segment sum (the same sorted order as the encoder's)."""

    @staticmethod
    def forward(ctx, z, W_dec, ent: Entries):
        ctx.save_for_backward(z, W_dec)
        ctx.ent = ent
        return F.embedding_bag(ent.cols, W_dec, ent.offsets, per_sample_weights=z.to(W_dec.dtype), mode="sum")

    @staticmethod
    def backward(ctx, g_y):
        z, W_dec = ctx.saved_tensors
        ent: Entries = ctx.ent
        g_y = g_y.contiguous()
        g_z = ent.dots(g_y, W_dec) if ctx.needs_input_grad[0] else None
        g_W = ent.latent_sum(z, g_y) if ctx.needs_input_grad[1] else None
        return g_z, g_W, None


def entry_decode(z: torch.Tensor, W_dec: torch.Tensor, ent: Entries) -> torch.Tensor:
    return EntryDecode.apply(z, W_dec, ent)


class Take(torch.autograd.Function):
    """w [m] -> w[cols] [nnz], with the backward as a 1-D index_add (autograd's indexing backward
    sorts the indices first: ~15x slower at 200k entries)."""

    @staticmethod
    def forward(ctx, w, cols):
        ctx.save_for_backward(cols)
        ctx.m = w.shape[0]
        return w[cols]

    @staticmethod
    def backward(ctx, g):
        (cols,) = ctx.saved_tensors
        return torch.zeros(ctx.m, dtype=g.dtype, device=g.device).index_add_(0, cols, g), None


def take(w: torch.Tensor, ent: Entries) -> torch.Tensor:
    return Take.apply(w, ent.cols)


def bf16_margin(x_norm: torch.Tensor, W_norm: torch.Tensor, d: int, b: torch.Tensor | None,
                t: torch.Tensor) -> torch.Tensor:
    """A bound [m] on |bf16 pre - exact pre| near the level t, for the pre-activations of encoder_pre in
    bfloat16 (inputs rounded to bf16, u = 2^-8; products accumulated in float32; output rounded to
    bf16), over rows whose norms are at most x_norm (W_norm [m]: the encoder rows' norms, d: d_in):
    per latent i and row b, |error| <= (2u + u^2 + d 2^-24) sum_j |x_bj W_ji| + u |b_i|, and the
    output rounding adds u (|t| + that) near t; sum_j |x_bj W_ji| <= ||x_b|| ||W_i|| <= x_norm ||W_i||.
    Doubled for safety."""
    u = 2.0**-8
    a = (2 * u + u * u + d * 2.0**-24) * x_norm * W_norm
    if b is not None:
        a = a + u * b.abs()
    return 2 * (a * (1 + u) + u * t.abs())


def round_down(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """v in `dtype`, rounded toward -inf: for pre [B, m] in dtype, pre > round_down(level) holds
    wherever pre > level does (a superset), and compares without promoting the [B, m] pre to
    float32 (a 150 MB copy at [4096, 9216])."""
    r = v.to(dtype)
    return torch.where(r.float() > v, torch.nextafter(r, torch.full_like(r, -torch.inf)), r)


def threshold_entries(x: torch.Tensor, W_enc: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor,
                      dtype: torch.dtype, max_density: float) -> tuple[Entries, torch.Tensor] | float:
    """The entries where v = x W_enc (+ b) > t (t [m]), with v there [nnz] in float32: (entries,
    values); or the density when more than max_density of the [B, m] entries pass (nothing more
    is computed). In bfloat16 the dense matmul only preselects candidates, v > t - bf16_margin
    (a superset of the exact set), whose values are then recomputed exactly in float32 and
    filtered; the density is then the candidates'.

    The bf16 pass runs in row blocks of rows sorted by norm, each against its own block's margin:
    the bound grows with ||x_b||, so a block of small rows is not held to the largest row's
    (candidates at 0.7% density, [4096, 9216]: 735k instead of 1.59M; exact 277k). The blocks'
    levels are rounded down to bf16 (`round_down`), so pre and level compare in bf16."""
    B, (d, m) = x.shape[0], W_enc.shape
    with torch.no_grad():
        W_t = W_enc.t().contiguous()
        if dtype == x.dtype:
            pre = x @ W_enc if b is None else encoder_pre(x, W_t, b, dtype)
            mask = pre > t
        else:
            x_op, W_op = (x.to(dtype), W_t.to(dtype)) if b is None else augmented(x, W_t, b, dtype)
            x_norm, W_norm = x.norm(dim=1), W_t.norm(dim=1)
            order = x_norm.argsort()
            rows = block_rows(m, dtype)
            mask = torch.empty(B, m, dtype=torch.bool, device=x.device)
            block = torch.empty(min(rows, B), m, dtype=dtype, device=x.device)
            for s in range(0, B, rows):
                r = order[s:s + rows]
                pre = torch.mm(x_op[r], W_op.t(), out=block[:r.numel()])
                mask[r] = pre > round_down(t - bf16_margin(x_norm[r].max(), W_norm, d, b, t), dtype)
        n = int(mask.count_nonzero())
        if n > max_density * B * m:
            return n / (B * m)
        ent = Entries.of(mask)
        del mask
        if dtype == x.dtype:
            return ent, pre.view(-1)[ent.rows * m + ent.cols]
        vals = ent.dots(x, W_t)
        if b is not None:
            vals += b[ent.cols]
        keep = vals > t[ent.cols]
        return ent.subset(keep), vals[keep]
