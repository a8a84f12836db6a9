"""Ragged (CSR) codes: conversions, and parity of the ragged encoder/decoder with the padded
path (same values, reconstructions and gradients) on the eager backend."""

import pytest
import torch

from saelab.archs import (
    EncodeArgs,
    RaggedCode,
    SparseCode,
    from_padded,
    mask_to_code,
    mask_to_ragged,
    to_padded,
)
from saelab.kernels import eager
from saelab.sae import SparseCoder


def csr(rows_of_pairs):
    """A RaggedCode from [[(latent, value), ...] per token]."""
    offsets = [0]
    idx, val = [], []
    for row in rows_of_pairs:
        idx += [i for i, _ in row]
        val += [v for _, v in row]
        offsets.append(len(idx))
    return RaggedCode(
        torch.tensor(val, dtype=torch.float32),
        torch.tensor(idx, dtype=torch.int64),
        torch.tensor(offsets, dtype=torch.int64),
    )


def test_to_padded_and_back_hand_worked():
    code = csr([[(3, 1.0), (0, 2.0)], [], [(1, 5.0)]])
    pad = to_padded(code)
    assert pad.indices.tolist() == [[3, 0], [0, 0], [1, 0]]
    assert pad.values.tolist() == [[1.0, 2.0], [0.0, 0.0], [5.0, 0.0]]
    back = from_padded(pad)
    for a, b in zip(back, code):
        assert torch.equal(a, b)
    assert to_padded(pad) is pad  # a padded code passes through
    empty = to_padded(csr([[], []]))
    assert empty.values.shape == (2, 1) and not empty.values.any()


def test_mask_to_ragged_orders_rows_like_mask_to_code():
    z = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, 6.0]])
    rows, cols = torch.tensor([1, 0, 1, 1, 0]), torch.tensor([2, 1, 0, 1, 2])
    v, i, off = mask_to_ragged(z, rows, cols)
    assert off.tolist() == [0, 2, 5]
    assert i.tolist() == [1, 2, 2, 0, 1] and v.tolist() == [0.0, 3.0, 6.0, 4.0, 5.0]
    padded = mask_to_code(z, rows, cols)
    for a, b in zip(to_padded(RaggedCode(v, i, off)), padded):
        assert torch.equal(a, b)


def test_ragged_cat_hand_worked():
    code = csr([[(3, 1.0)], [], [(1, 5.0), (2, 6.0)]])
    pad_v = torch.tensor([[7.0], [8.0], [9.0]])
    pad_i = torch.tensor([[4], [5], [6]])
    v, i, off = eager.ragged_cat(code.offsets, code.values, code.indices, pad_v, pad_i)
    assert off.tolist() == [0, 2, 3, 6]
    assert i.tolist() == [3, 4, 5, 1, 2, 6]
    assert v.tolist() == [1.0, 7.0, 8.0, 5.0, 6.0, 9.0]


def _leaves(B=24, d=10, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g) * 2
    W_enc = torch.randn(n, d, generator=g) / d**0.5
    b_enc = torch.randn(n, generator=g) * 0.1
    b_dec = torch.randn(d, generator=g) * 0.1
    W_dec = torch.randn(n, d, generator=g) / d**0.5
    return [t.requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]


def _mutual(z):
    """Mutual choice's selection: the top 3·B entries of the batch (a varying count per row)."""
    _, flat = torch.topk(z.reshape(-1), 3 * z.shape[0])
    return mask_to_ragged(z, flat // z.shape[1], flat % z.shape[1])


def _run(ragged: bool, aux: bool, leaves):
    x, W_enc, b_enc, b_dec, W_dec = leaves
    mask = torch.arange(W_enc.shape[0]) % 3 == 0 if aux else None
    if ragged:
        v, i, off, av, ai = eager.ragged_encode(x, W_enc, b_enc, b_dec, _mutual, mask, 5)
        x_hat = eager.ragged_decode(v, i, off, W_dec, b_dec)
        code = to_padded(RaggedCode(v.detach(), i, off))
    else:

        def select(z):
            return tuple(to_padded(RaggedCode(*_mutual(z))))

        v, i, av, ai = eager.sparse_encode(x, W_enc, b_enc, b_dec, select, mask, 5)
        x_hat = eager.decode(v, i, W_dec, b_dec)
        code = SparseCode(v.detach(), i)
    loss = (x_hat - x.detach() * 0.5).pow(2).sum()
    if aux:
        loss = loss + eager.decode(av, ai, W_dec, None).pow(2).sum() * 0.3
    grads = torch.autograd.grad(loss, leaves)
    return code, x_hat.detach(), grads


@pytest.mark.parametrize("aux", [False, True])
def test_ragged_path_matches_padded_path(aux):
    leaves = _leaves()
    code_r, x_r, grads_r = _run(True, aux, leaves)
    code_p, x_p, grads_p = _run(False, aux, leaves)
    counts = (code_p.values != 0).sum(1)
    assert counts.min() < counts.max(), "the case must have a varying count per token"
    assert torch.equal(code_r.indices, code_p.indices)
    assert torch.equal(code_r.values, code_p.values)
    torch.testing.assert_close(x_r, x_p, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "W_enc", "b_enc", "b_dec", "W_dec"), grads_r, grads_p):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_ragged_scatter_paths_match_dense_product():
    # The CPU COO product (fp64 and bf16) and the chunked index_add used off CPU, against
    # the dense Sᵀ·rows; row 0 names latent 3 twice, which must add up.
    g = torch.Generator().manual_seed(0)
    code = csr([[(3, 1.0), (0, 2.0), (3, -1.5)], [], [(1, 5.0)], [(0, 0.5), (2, 1.5)]])
    rows = torch.randn(4, 6, generator=g, dtype=torch.float64)
    bag = eager.ragged_rows(code.offsets, 6)
    dense = torch.zeros(4, 5, dtype=torch.float64).index_put_(
        (bag, code.indices), code.values.double(), accumulate=True
    )
    ref = dense.T @ rows
    got = eager._scatter_csr(code.offsets, code.indices, code.values, rows, 5)
    torch.testing.assert_close(got, ref)
    got = eager._scatter_csr(code.offsets, code.indices, code.values, rows.bfloat16(), 5)
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)
    got = eager._index_add_rows(code.indices, code.values.double(), rows, bag, 5)
    torch.testing.assert_close(got, ref)


def test_empty_rows_and_empty_code_decode_to_the_bias():
    s = SparseCoder(6, 16, 2, "mutual_choice")
    with torch.no_grad():
        s.b_dec.normal_()
        s.threshold.fill_(1e9)  # nothing passes: every row is empty, nnz = 0
    x = torch.randn(5, 6)
    enc = s.encode_scaled(x, EncodeArgs())
    assert isinstance(enc.code, RaggedCode) and enc.code.values.numel() == 0
    x_hat = s.decode_scaled(enc.code)
    torch.testing.assert_close(x_hat, s.b_dec.detach().expand(5, 6))
    x_hat.sum().backward()
    assert s.W_dec.grad is not None and not s.W_dec.grad.any()


@pytest.mark.parametrize("arch", ["feature_choice", "mutual_choice"])
def test_training_codes_are_ragged_and_unpadded(arch):
    s = SparseCoder(12, 32, 4, arch)
    x = torch.randn(40, 12)
    code = s.encode_scaled(x, EncodeArgs(training=True)).code
    assert isinstance(code, RaggedCode)
    counts = code.offsets.diff()
    assert int(counts.sum()) == code.values.numel() == 4 * 40  # k·B entries, no padding
    assert counts.min() < counts.max()
