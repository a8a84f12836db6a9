"""Metrics on hand-worked cases, and streaming sums equal to whole-batch values."""

import pytest
import torch

from saelab import metrics as M


def test_fvu_hand_worked():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): total variance 2
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])  # squared error 1
    assert float(M.fvu(x, x_hat)) == pytest.approx(0.5)
    assert float(M.fvu(x, x)) == 0.0
    assert float(M.fvu(x, x.mean(0).expand_as(x))) == pytest.approx(1.0)


def test_normalized_mse_hand_worked():
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    x_hat = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(M.normalized_mse(x, x_hat)) == pytest.approx((1 / 4 + 0) / 2)


def test_l0_and_fire_counts():
    values = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.0]])
    indices = torch.tensor([[0, 1, 2], [2, 3, 1]])
    assert M.l0(values).tolist() == [2, 2]
    assert M.fire_counts(values, indices, 5).tolist() == [1, 0, 2, 1, 0]


def test_recon_stats_streaming_equals_whole():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 6, generator=g) + 3
    x_hat = x + 0.3 * torch.randn(100, 6, generator=g)
    values = torch.rand(100, 4, generator=g).masked_fill(torch.rand(100, 4, generator=g) < 0.3, 0)
    indices = torch.randint(0, 20, (100, 4), generator=g)
    s = M.ReconStats(20)
    for lo in range(0, 100, 17):
        s.update(x[lo : lo + 17], x_hat[lo : lo + 17], values[lo : lo + 17], indices[lo : lo + 17])
    r = s.result()
    assert r["n_tokens"] == 100
    assert r["fvu"] == pytest.approx(float(M.fvu(x.double(), x_hat.double())), rel=1e-9)
    assert r["normalized_mse"] == pytest.approx(float(M.normalized_mse(x, x_hat)), rel=1e-5)
    assert r["l0"] == pytest.approx(float(M.l0(values).float().mean()))
    counts = M.fire_counts(values, indices, 20)
    assert r["dead_frac"] == pytest.approx(float((counts == 0).float().mean()))
    assert sum(r["l0_hist"].values()) == 100
    h = r["log10_freq_hist"]
    assert sum(h["counts"]) + h["never_fired"] == 20


def test_dense_fraction():
    s = M.ReconStats(4)
    # latent 0 fires on every token, latent 1 on 1 of 20 (5% < 10%), 2 and 3 never.
    values = torch.zeros(20, 2)
    values[:, 0] = 1
    values[0, 1] = 1
    indices = torch.tensor([[0, 1]] * 20)
    s.update(torch.randn(20, 3), torch.randn(20, 3), values, indices)
    r = s.result()
    assert r["dense_frac"] == 0.25 and r["dead_frac"] == 0.5
