"""Many small ReLU MLP probes trained at once: every (problem, config) pair of one probe selection.

A probe selection fits the same MLP configurations on every cross-validation split of a training
draw (up to 36 leave-pair-out splits x 4 configs at n = 12). Fitting them one by one with sklearn's
L-BFGS costs 25-150 ms each, mostly per-call overhead on these sizes; here the problems are
stacked on a batch dimension and every configuration's first layer is one slice of a shared
[d, sum of widths] matrix, so one step of the whole selection is a handful of batched matmuls.

Each (problem, config) is its own objective: the loss is a sum of independent terms and Adam is
elementwise, so a model's parameters follow exactly the trajectory they would alone. The model
and its objective are sklearn's MLPClassifier's: ReLU hidden layers, a logistic output, mean
log-loss over the fit rows plus 0.5 * alpha * ||weights||^2 / n (biases unpenalised), Glorot-
uniform initialisation; the optimiser differs (full-batch Adam for a fixed number of steps instead
of L-BFGS), in float32.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

STEPS = 100  # full-batch Adam steps
LR = 1e-2


def _standardise(xf: np.ndarray, xe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit rows' mean and std (ddof 0, a zero std counts as 1), as sklearn's StandardScaler."""
    mu, sd = xf.mean(0), xf.std(0)
    sd[sd == 0] = 1.0
    return (xf - mu) / sd, (xe - mu) / sd


def fit_mlps(problems: list[tuple[np.ndarray, np.ndarray, np.ndarray]], configs: list[dict[str, Any]],
             seed: int = 0, steps: int = STEPS, lr: float = LR) -> list[np.ndarray]:
    """problems: [(x_fit [n_s, d], y_fit [n_s] in {0, 1}, x_eval [m_s, d])]; configs: dicts with
    `hidden_layer_sizes` (one or two widths) and `alpha`. Returns, per problem, the positive-class
    probabilities [len(configs), m_s] of each config's MLP (inputs standardised per problem)."""
    S, d = len(problems), problems[0][0].shape[1]
    xs = [_standardise(np.asarray(xf, np.float64), np.asarray(xe, np.float64)) for xf, _, xe in problems]
    n = np.array([len(yf) for _, yf, _ in problems])
    n_max, m_max = int(n.max()), max(len(e) for _, e in xs)
    xf = torch.zeros(S, n_max, d)
    xe = torch.zeros(S, m_max, d)
    y = torch.zeros(S, n_max)
    w = torch.zeros(S, n_max)  # 1 / n_s on a problem's real rows, 0 on padding
    for s, ((f, e), (_, yf, _)) in enumerate(zip(xs, problems, strict=True)):
        xf[s, : len(f)] = torch.from_numpy(f).float()
        xe[s, : len(e)] = torch.from_numpy(e).float()
        y[s, : len(yf)] = torch.from_numpy(np.asarray(yf)).float()
        w[s, : len(yf)] = 1.0 / len(yf)
    inv_n = torch.from_numpy(1.0 / n).float()  # [S]

    g = torch.Generator().manual_seed(seed)

    def glorot(fan_in: int, fan_out: int, *shape: int) -> torch.Tensor:
        """One draw shared by every problem (as sklearn's fixed random_state gives each fit the same
        start), so a problem's model does not depend on what else is in the batch."""
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # sklearn's Glorot-uniform bound for a ReLU network
        return ((torch.rand(1, *shape, generator=g) * 2 - 1) * bound).expand(S, *shape).clone()

    widths = [tuple(c["hidden_layer_sizes"]) for c in configs]
    if any(len(h) not in (1, 2) for h in widths):
        raise ValueError(f"MLP probes have one or two hidden layers, got {widths}")
    offsets = np.cumsum([0] + [h[0] for h in widths])
    spans = list(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))  # each config's first-layer units
    W1 = torch.nn.Parameter(torch.cat([glorot(d, h[0], d, h[0]) for h in widths], 2))  # [S, d, sum of widths]
    b1 = torch.nn.Parameter(torch.cat([glorot(d, h[0], h[0]) for h in widths], 1))
    mids = [tuple(torch.nn.Parameter(t) for t in (glorot(h[0], h[1], h[0], h[1]), glorot(h[0], h[1], h[1])))
            if len(h) == 2 else None for h in widths]
    outs = [tuple(torch.nn.Parameter(t) for t in (glorot(h[-1], 1, h[-1]), glorot(h[-1], 1))) for h in widths]
    params = [W1, b1] + [p for m in mids if m for p in m] + [p for o in outs for p in o]
    alpha = torch.tensor([float(c["alpha"]) for c in configs])

    def logits(x: torch.Tensor) -> torch.Tensor:  # x [S, rows, d] -> [S, C, rows]
        hid = torch.relu(torch.baddbmm(b1.unsqueeze(1), x, W1))
        out = []
        for (a, b), mid, (wo, bo) in zip(spans, mids, outs, strict=True):
            hc = hid[:, :, a:b]
            if mid is not None:
                hc = torch.relu(torch.baddbmm(mid[1].unsqueeze(1), hc, mid[0]))
            out.append(torch.bmm(hc, wo.unsqueeze(2)).squeeze(2) + bo.unsqueeze(1))
        return torch.stack(out, 1)

    # the L2 term's gradient, alpha_c / n_s * W, is added by hand (one fused op per weight) rather
    # than through autograd: on small draws the weights outnumber the rows' work many times over
    coef = alpha.unsqueeze(0) * inv_n.unsqueeze(1)  # [S, C]
    col = torch.from_numpy(np.repeat(np.arange(len(configs)), [h[0] for h in widths]))
    decay = [(W1, coef[:, col].unsqueeze(1))]  # [S, 1, h1]
    for c, (mid, (wo, _)) in enumerate(zip(mids, outs, strict=True)):
        decay.append((wo, coef[:, c : c + 1]))
        if mid is not None:
            decay.append((mid[0], coef[:, c].view(S, 1, 1)))

    opt = torch.optim.Adam(params, lr=lr, fused=True)
    yb, wb = y.unsqueeze(1), w.unsqueeze(1)  # [S, 1, n]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        z = logits(xf)
        ce = torch.nn.functional.binary_cross_entropy_with_logits(z, yb.expand_as(z), weight=wb.expand_as(z),
                                                                  reduction="sum")
        ce.backward()
        with torch.no_grad():
            for p, c in decay:
                p.grad.addcmul_(p, c)
        opt.step()
    with torch.no_grad():
        p = torch.sigmoid(logits(xe)).numpy()
    return [p[s, :, : len(e)].astype(np.float64) for s, (_, e) in enumerate(xs)]
