"""Pure tensor metrics (definitions in docs/algorithms.md §7).

Streaming evaluation accumulates sums in `ReconStats` so that a metric over many batches
equals the metric over their concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

DENSE_FREQ = 0.1
"""A latent firing on more than this fraction of tokens counts as dense."""


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − x̄‖²."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def normalized_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """mean_t ‖x − x̂‖² / ‖x‖²."""
    return ((x - x_hat).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-12)).mean()


def l0(values: Tensor) -> Tensor:
    """Non-zero latents per token, [B]."""
    return (values != 0).sum(-1)


def fire_counts(values: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    """How many tokens each latent fired on, [d_sae] int64."""
    return torch.bincount(indices[values != 0], minlength=d_sae)


@dataclass
class ReconStats:
    """Running sums for reconstruction and sparsity metrics over a token stream."""

    d_sae: int
    n: int = 0
    sq_err: float = 0.0
    sum_x: Tensor | None = None
    sum_sq_x: float = 0.0
    nmse_sum: float = 0.0
    counts: Tensor | None = None
    l0_hist: dict[int, int] = field(default_factory=dict)

    def update(self, x: Tensor, x_hat: Tensor, values: Tensor, indices: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sq_err += float((x - x_hat).pow(2).sum())
        sx = x.sum(0)
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.sum_sq_x += float(x.pow(2).sum())
        self.nmse_sum += float(normalized_mse(x, x_hat) * x.shape[0])
        c = fire_counts(values, indices, self.d_sae).cpu()
        self.counts = c if self.counts is None else self.counts + c
        for v, n in zip(*torch.unique(l0(values).cpu(), return_counts=True)):
            self.l0_hist[int(v)] = self.l0_hist.get(int(v), 0) + int(n)

    def result(self) -> dict:
        assert self.sum_x is not None and self.counts is not None, "no tokens seen"
        total_var = self.sum_sq_x - float(self.sum_x.pow(2).sum()) / self.n
        freq = self.counts.double() / self.n
        mean_l0 = sum(k * v for k, v in self.l0_hist.items()) / self.n
        return {
            "n_tokens": self.n,
            "fvu": self.sq_err / total_var,
            "normalized_mse": self.nmse_sum / self.n,
            "mse": self.sq_err / self.n,
            "l0": mean_l0,
            "l0_hist": {str(k): v for k, v in sorted(self.l0_hist.items())},
            "dead_frac": float((self.counts == 0).double().mean()),
            "dense_frac": float((freq > DENSE_FREQ).double().mean()),
            "below_1e-5_frac": float((freq < 1e-5).double().mean()),
            "log10_freq_hist": log10_freq_hist(freq),
        }


def log10_freq_hist(freq: Tensor, lo: float = -8.0, hi: float = 0.0, bins: int = 32) -> dict:
    """Histogram of log10 firing frequency; latents that never fired are counted apart."""
    alive = freq[freq > 0]
    counts = torch.histc(alive.log10().float().clamp(lo, hi), bins=bins, min=lo, max=hi)
    return {
        "edges": torch.linspace(lo, hi, bins + 1).tolist(),
        "counts": [int(c) for c in counts],
        "never_fired": int((freq == 0).sum()),
    }
