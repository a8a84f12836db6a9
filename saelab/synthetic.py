"""Synthetic activations from a known dictionary, for tests and training benchmarks.

x = Σ_i c_i f_i + noise, with n_features unit-norm true directions f_i. Each token draws a
Poisson(k_true) number of features, each picked with Zipf-distributed probability, with
exponential magnitudes. Because the dictionary is known, one can
check both reconstruction (FVU) and recovery of the true directions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from saelab import __version__
from saelab.runs import SYNTHETIC
from saelab.shards import FORMAT, STORE_DTYPES, TOKENS, save_npy, write_shard


@dataclass
class SyntheticData:
    d_in: int = 512
    """Activation dimension."""

    n_features: int = 8192
    """True dictionary size."""

    k_true: float = 32.0
    """Mean number of true features active per token."""

    zipf_exponent: float = 0.5
    """Probability of drawing the r-th feature ∝ r^-exponent."""

    noise: float = 0.05
    """Std of isotropic Gaussian noise, relative to the per-coordinate signal scale."""

    seed: int = 0
    """Seed for the dictionary and the stream."""

    mean_offset: float = 0.0
    """Norm of one fixed random vector added to every token: real residual streams sit
    far from the origin, which a centred synthetic stream never tests."""

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        d = torch.randn(self.n_features, self.d_in, generator=g)
        self.dictionary = d / d.norm(dim=1, keepdim=True)
        o = torch.randn(self.d_in, generator=g)  # drawn after the dictionary: it is unchanged
        self.offset = o / o.norm() * self.mean_offset
        p = torch.arange(1, self.n_features + 1, dtype=torch.float64) ** -self.zipf_exponent
        self.probs = (p / p.sum()).float()

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """[n, d_in] activations: Poisson(k_true) features per token, drawn by frequency."""
        k_max = int(3 * self.k_true) + 1
        counts = torch.poisson(torch.full((n, 1), float(self.k_true)), generator=generator)
        idx = torch.multinomial(self.probs, n * k_max, replacement=True, generator=generator)
        mags = torch.empty(n, k_max).exponential_(1.0, generator=generator)
        mags = mags * (torch.arange(k_max) < counts)
        x = F.embedding_bag(
            idx.view(n, k_max), self.dictionary, per_sample_weights=mags, mode="sum"
        )
        sigma = self.noise * (self.k_true / self.d_in) ** 0.5
        return x + sigma * torch.randn(n, self.d_in, generator=generator) + self.offset

    def stream(self, n_tokens: int, chunk: int = 16384, offset_seed: int = 1):
        """Yield [≤chunk, d_in] blocks, n_tokens in all, deterministic in (seed, offset_seed)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + offset_seed)
        done = 0
        while done < n_tokens:
            m = min(chunk, n_tokens - done)
            yield self.sample(m, g)
            done += m


def write_harvest(
    path: str | Path,
    data: SyntheticData,
    n_tokens: int,
    *,
    tokens_per_context: int = 127,
    shard_contexts: int = 256,
    dtype: str = "float32",
    grads: bool = False,
) -> Path:
    """Write synthetic activations as a harvest directory that `ActivationStore` reads.

    tokens.npy holds placeholder token ids (BOS then zeros): there is no text behind them.
    With grads, each token also gets a stand-in gradient (Gaussian, seeded), enough to
    exercise gradient_topk's code paths.
    """

    path = Path(path)
    n_contexts = -(-n_tokens // tokens_per_context)
    tokens = np.zeros((n_contexts, tokens_per_context + 1), dtype=np.int32)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "saelab_version": __version__,
        "model": SYNTHETIC,
        "hooks": ["synthetic"],
        "d_in": data.d_in,
        "dtype": dtype,
        "n_ctx": tokens_per_context + 1,
        "tokens_per_context": tokens_per_context,
        "n_contexts": n_contexts,
        "n_tokens_planned": n_contexts * tokens_per_context,
        "n_tokens": 0,
        "shard_contexts": shard_contexts,
        "corpus": {"synthetic": asdict(data)},
        "seed": data.seed,
        "grads": grads,
        "complete": False,
        "tokens_sha256": save_npy(path / TOKENS, tokens),
        "shards": [],
    }
    rows = shard_contexts * tokens_per_context
    for i, block in enumerate(data.stream(n_contexts * tokens_per_context, chunk=rows)):
        c0 = i * shard_contexts
        c1 = c0 + block.shape[0] // tokens_per_context
        bufs = {"acts/synthetic": block.to(STORE_DTYPES[dtype])}
        if grads:
            g = torch.Generator().manual_seed(data.seed * 7919 + i)
            bufs["grads/synthetic"] = torch.randn(block.shape, generator=g).to(STORE_DTYPES[dtype])
        write_shard(path, meta, i, c0, c1, bufs)
    return path
