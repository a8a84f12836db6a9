"""SyntheticData: the mean offset shifts every token by one fixed vector and nothing else."""

from __future__ import annotations

import torch

from saelab.synthetic import SyntheticData


def test_mean_offset_shifts_every_token_by_one_vector():
    plain, shifted = SyntheticData(d_in=32, n_features=64), SyntheticData(32, 64, mean_offset=8.0)
    torch.testing.assert_close(shifted.dictionary, plain.dictionary, rtol=0, atol=0)
    a = plain.sample(50, torch.Generator().manual_seed(1))
    b = shifted.sample(50, torch.Generator().manual_seed(1))
    shift = b - a
    torch.testing.assert_close(shift, shift[:1].expand_as(shift), rtol=0, atol=1e-5)
    torch.testing.assert_close(shift[0].norm(), torch.tensor(8.0))
    assert (b.mean(0) - a.mean(0)).norm() > 7  # the tokens' mean moves, not only their spread
