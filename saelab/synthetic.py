"""Synthetic activations from a known dictionary, for tests and training benchmarks.

x = Σ_i c_i f_i + noise, with n_features unit-norm true directions f_i, each firing
independently with a Zipf-distributed probability (scaled so that on average `k_true`
fire per token) and an exponential magnitude. Because the dictionary is known, one can
check both reconstruction (FVU) and recovery of the true directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SyntheticData:
    d_in: int = 512
    """Activation dimension."""

    n_features: int = 8192
    """True dictionary size."""

    k_true: float = 32.0
    """Mean number of true features active per token."""

    zipf_exponent: float = 0.5
    """Firing probability of the r-th feature ∝ r^-exponent."""

    noise: float = 0.05
    """Std of isotropic Gaussian noise, relative to the per-coordinate signal scale."""

    seed: int = 0
    """Seed for the dictionary and the stream."""

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        d = torch.randn(self.n_features, self.d_in, generator=g)
        self.dictionary = d / d.norm(dim=1, keepdim=True)
        p = torch.arange(1, self.n_features + 1, dtype=torch.float64) ** -self.zipf_exponent
        self.probs = (p * self.k_true / p.sum()).clamp(max=1.0).float()

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """[n, d_in] activations."""
        fires = torch.rand(n, self.n_features, generator=generator) < self.probs
        mags = torch.empty(n, self.n_features).exponential_(1.0, generator=generator)
        codes = (fires * mags).to_sparse_csr()
        x = codes @ self.dictionary
        sigma = self.noise * (self.k_true / self.d_in) ** 0.5
        return x + sigma * torch.randn(n, self.d_in, generator=generator)

    def stream(self, n_tokens: int, chunk: int = 16384, offset_seed: int = 1):
        """Yield [≤chunk, d_in] blocks, n_tokens in all, deterministic in (seed, offset_seed)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + offset_seed)
        done = 0
        while done < n_tokens:
            m = min(chunk, n_tokens - done)
            yield self.sample(m, g)
            done += m
