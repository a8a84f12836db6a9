"""The numerical pieces of the dark-matter analyses (Engels et al., arXiv 2410.14670):
streamed least squares and R², and inference-time gradient pursuit over an SAE's decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saelab.sae import SparseCoder

# ---------------------------------------------------------------------------------------
# Streamed least squares and R²


def affine(x: Tensor) -> Tensor:
    """[x, 1] in float64."""
    x = x.double()
    return torch.cat([x, x.new_ones(x.shape[0], 1)], 1)


@dataclass
class LinearFit:
    """Least squares y ≈ [x, 1]·W from streamed batches; XᵀX and Xᵀy accumulate in float64,
    so no more than one batch of rows is ever in memory."""

    xtx: Tensor | None = None
    xty: Tensor | None = None
    n: int = 0

    def update(self, x: Tensor, y: Tensor) -> None:
        xa, y = affine(x), y.double()
        xtx, xty = xa.T @ xa, xa.T @ y
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.xty = xty if self.xty is None else self.xty + xty
        self.n += x.shape[0]

    def solve(self, ridge: float = 1e-6) -> Tensor:
        """W [d_in + 1, outputs]; the ridge is relative to the mean diagonal, bias unshrunk."""
        assert self.xtx is not None and self.xty is not None, "no rows seen"
        a = self.xtx.cpu().clone()
        a.diagonal()[:-1] += ridge * float(a.diagonal()[:-1].mean())
        # gelsd (SVD) copes with a rank-deficient XᵀX when ridge = 0.
        w = torch.linalg.lstsq(a, self.xty.cpu(), driver="gelsd").solution
        return w.to(self.xty.device)


def predict(w: Tensor, x: Tensor) -> Tensor:
    return affine(x) @ w


@dataclass
class R2:
    """Streamed R² = 1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖², summed over outputs (ȳ over the rows seen)."""

    sse: float = 0.0
    sum_sq: float = 0.0
    sum_y: Tensor | None = None
    n: int = 0

    def update(self, y: Tensor, y_hat: Tensor) -> None:
        y = y.double()
        self.sse += float((y - y_hat.double()).pow(2).sum())
        self.sum_sq += float(y.pow(2).sum())
        s = y.sum(0)
        self.sum_y = s if self.sum_y is None else self.sum_y + s
        self.n += y.shape[0]

    @property
    def value(self) -> float:
        assert self.sum_y is not None, "no rows seen"
        sst = self.sum_sq - float(self.sum_y.pow(2).sum()) / self.n
        return 1.0 - self.sse / sst if sst > 0 else float("nan")


def r2_regression(y: np.ndarray, *xs: np.ndarray) -> float:
    """In-sample R² of y on [xs…, 1] (few regressors, many rows: the bias is ~p/n)."""
    a = np.column_stack([*xs, np.ones_like(y)]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(a, y.astype(np.float64), rcond=None)
    resid = y - a @ coef
    sst = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float((resid**2).sum()) / sst if sst > 0 else float("nan")


# ---------------------------------------------------------------------------------------
# Inference-time gradient pursuit


def _refine(y: Tensor, atoms: Tensor, a: Tensor, mask: Tensor, steps: int) -> Tensor:
    """Projected gradient steps on ½‖y − Σ a_k atom_k‖² over the masked slots, a ≥ 0.

    The step is the exact line search of gradient pursuit (Blumensath & Davies 2008); a step
    that the projection onto a ≥ 0 makes worse is not taken, so the error never grows.
    """
    mask = mask.to(a.dtype)
    a = a * mask
    for _ in range(steps):
        r = y - torch.einsum("bk,bkd->bd", a, atoms)
        p = torch.einsum("bkd,bd->bk", atoms, r) * mask
        dp = torch.einsum("bk,bkd->bd", p, atoms)
        alpha = p.pow(2).sum(1) / dp.pow(2).sum(1).clamp_min(1e-30)
        a_new = (a + alpha[:, None] * p).clamp_min(0) * mask
        r_new = y - torch.einsum("bk,bkd->bd", a_new, atoms)
        better = r_new.pow(2).sum(1) < r.pow(2).sum(1)
        a = torch.where(better[:, None], a_new, a)
    return a


def _greedy_support(y: Tensor, W_dec: Tensor, l0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient pursuit choosing its own latents: l0[b] greedy picks per token, each followed
    by one refinement step of all chosen coefficients."""
    B, K = y.shape[0], int(l0.max()) if l0.numel() else 0
    idx = torch.zeros(B, K, dtype=torch.int64, device=y.device)
    mask = torch.zeros(B, K, dtype=torch.bool, device=y.device)
    a = y.new_zeros(B, K)
    for t in range(K):
        r = y - torch.einsum("bk,bkd->bd", a, W_dec[idx])
        c = r @ W_dec.T
        c.scatter_(1, idx[:, :t], float("-inf"))  # no repeats
        cj, j = c.max(1)
        take = (t < l0) & (cj > 0)
        idx[:, t] = torch.where(take, j, torch.zeros_like(j))
        mask[:, t] = take
        a = _refine(y, W_dec[idx], a, mask, 1)
    return idx, a, mask


@torch.no_grad()
def gradient_pursuit(sae: SparseCoder, x: Tensor, steps: int = 10, greedy: bool = False) -> Tensor:
    """Reconstruction [N, d_in] (model units) by pursuit over W_dec at the SAE's own per-token
    L0: on the latents the SAE chose, or (greedy) on latents picked by the pursuit itself."""
    x = x.reshape(-1, sae.d_in)
    code = sae.encode(x)
    y = x.to(sae.W_dec.dtype) * sae.input_scale - sae.b_dec
    active = code.values != 0
    if greedy:
        idx, a, mask = _greedy_support(y, sae.W_dec, active.sum(1))
    else:
        idx, a, mask = code.indices, code.values, active
    atoms = sae.W_dec[idx]
    a = _refine(y, atoms, a, mask, steps)
    x_hat = torch.einsum("bk,bkd->bd", a, atoms) + sae.b_dec
    return (x_hat / sae.input_scale).to(x.dtype)
