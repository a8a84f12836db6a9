"""The eager kernels against a dense autograd computation of the same maths."""

import pytest
import torch
import torch.nn.functional as F

from saelab.kernels import eager


def dense_reference(x, W_enc, b_enc, b_dec, k, aux_mask, k_aux):
    z = F.relu((x - b_dec) @ W_enc.T + b_enc)
    _, idx = torch.topk(z, k, dim=1)
    vals = z.gather(1, idx)
    if aux_mask is None:
        return vals, idx, None, None
    z_aux = z.masked_fill(~aux_mask, -1.0)
    _, aidx = torch.topk(z_aux, min(k_aux, int(aux_mask.sum())), dim=1)
    return vals, idx, z.gather(1, aidx), aidx


def _params(B, d, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(B, d), mk(n, d), mk(n) * 0.1, mk(d) * 0.1


@pytest.mark.parametrize("B,d,n,k", [(7, 5, 16, 1), (33, 12, 40, 4), (64, 24, 96, 8)])
@pytest.mark.parametrize("with_aux", [False, True])
def test_topk_encode_matches_dense_autograd(B, d, n, k, with_aux):
    x, W, be, bd = _params(B, d, n)
    aux_mask = (torch.arange(n) % 3 == 0) if with_aux else None
    k_aux = 5 if with_aux else 0

    leaves = [t.clone().requires_grad_() for t in (x, W, be, bd)]
    v, i, av, ai = eager.topk_encode(*leaves, k, aux_mask, k_aux)
    ref_leaves = [t.clone().requires_grad_() for t in (x, W, be, bd)]
    rv, ri, rav, rai = dense_reference(*ref_leaves, k, aux_mask, k_aux)

    # Same codes (compared densely: which zero-valued latents fill a row is unspecified).
    n_lat = W.shape[0]
    dense = lambda vals, ids: torch.zeros(B, n_lat, dtype=vals.dtype).scatter_add(1, ids, vals)  # noqa: E731
    torch.testing.assert_close(dense(v, i), dense(rv, ri))
    gz = torch.randn(B, n_lat, dtype=torch.float64)
    loss = (dense(v, i) * gz).sum()
    rloss = (dense(rv, ri) * gz).sum()
    if with_aux:
        assert set(ai[av > 0].tolist()) <= set(torch.nonzero(aux_mask).flatten().tolist())
        torch.testing.assert_close(dense(av, ai), dense(rav, rai))
        gz2 = torch.randn(B, n_lat, dtype=torch.float64)
        loss = loss + (dense(av, ai) * gz2).sum()
        rloss = rloss + (dense(rav, rai) * gz2).sum()
    else:
        assert ai.shape == (B, 0)
    loss.backward()
    rloss.backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_decode_matches_dense_and_gradients():
    g = torch.Generator().manual_seed(1)
    n, d, B, k = 30, 7, 11, 4
    W = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    vals = torch.rand(B, k, generator=g, dtype=torch.float64, requires_grad=True)
    out = eager.decode(vals, idx, W, b)
    dense = torch.zeros(B, n, dtype=torch.float64).scatter(1, idx, vals)
    ref = dense @ W + b
    torch.testing.assert_close(out, ref)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad((out * gout).sum(), (W, b, vals))
    rgrads = torch.autograd.grad((ref * gout).sum(), (W, b, vals))
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r)


def test_relu_clipped_values_get_no_gradient():
    # One latent, strongly negative pre-activation: selected (k = n - 1 forces it) but zero.
    x = torch.tensor([[1.0, 0.0]])
    W = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    b_enc = torch.tensor([0.0, -5.0], requires_grad=True)
    b_dec = torch.zeros(2, requires_grad=True)
    v, i, _, _ = eager.topk_encode(x, W, b_enc, b_dec, 1, None, 0)
    assert i.tolist() == [[0]] and v.tolist() == [[1.0]]
    v.sum().backward()
    assert W.grad[1].abs().sum() == 0 and b_enc.grad[1] == 0
    assert W.grad[0].tolist() == [1.0, 0.0]


def test_bf16_backward_on_cpu_matches_fp32():
    """bf16 has no CSR product on the CPU; the slot-by-slot scatter must give the same
    gradients as fp32 (within bf16 rounding)."""
    x, W, be, bd = (t.float() for t in _params(32, 24, 96, seed=3))
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, W, be, bd)]
        v, i, _, _ = eager.topk_encode(*leaves, 8)
        W_dec = leaves[1].detach().clone().requires_grad_()
        out = eager.decode(v, i, W_dec, None)
        (out.float() ** 2).sum().backward()
        grads[dtype] = [t.grad.float() for t in (*leaves, W_dec)]
    for g32, g16 in zip(grads[torch.float32], grads[torch.bfloat16]):
        scale = g32.abs().max()
        assert (g32 - g16).abs().max() <= 5e-2 * scale


# ---- batch-level selection: the threshold top-K against the plain definition ----------


def _check_global_topk(z, K):
    """global_topk's answer is a top-K of z by the plain definition (the same multiset of
    values as a top-K over all B·n entries), K distinct entries, in row-major order."""
    top, rows, cols = eager.global_topk(z, K)
    assert top.dtype == z.dtype and torch.equal(z[rows, cols], top)
    flat = rows * z.shape[1] + cols
    assert flat.numel() == K and bool((flat.diff() > 0).all())  # distinct, row-major
    assert torch.equal(top.sort().values, z.flatten().topk(K).values.sort().values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "skewed", "ties", "few_columns"])
def test_threshold_global_topk_matches_the_definition(case, dtype):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(96, 160, generator=g)
    if case == "skewed":  # a few tokens hold most of the winners
        z[::17] += 6
    if case == "ties":  # integer values: hundreds of entries tie at the K-th value
        z = torch.randint(0, 6, (96, 160), generator=g).float()
    if case == "few_columns":  # one latent's column holds every winner
        z[:, 7] += 20
    for K in (1, 96, 96 * 4, 96 * 160 - 5, 96 * 160):
        _check_global_topk(z.to(dtype), K)


def test_threshold_global_topk_falls_back_when_the_sample_misleads(monkeypatch):
    # A sample of 64 entries (stride 201) that sees only the largest values puts the bound
    # above the K-th value: fewer than K entries pass it, and the candidate merge answers.
    monkeypatch.setattr(eager, "THRESHOLD_SAMPLE", 64)
    z = torch.randn(64, 200, generator=torch.Generator().manual_seed(4))
    z.view(-1)[::201] += 100
    calls = []
    real = eager._candidate_topk
    monkeypatch.setattr(eager, "_candidate_topk", lambda *a: calls.append(1) or real(*a))
    _check_global_topk(z, 256)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "one_group", "ties", "negative"])
def test_grouped_row_topk_matches_torch_topk(case, dtype):
    # n = 256, k 8: 32 strided groups of 8 (the grouped path); each row's values must be
    # torch.topk's, at distinct columns that hold them.
    g = torch.Generator().manual_seed(5)
    z = torch.randn(40, 256, generator=g)
    if case == "one_group":  # the whole top k sits in groups {q, q + 32, ...}: 8 per group
        z[:, 3::32] += 10
        z[:, 5::32] += 10
    if case == "ties":  # integer values: many entries tie at the k-th value
        z = torch.randint(0, 4, (40, 256), generator=g).float()
    if case == "negative":
        z = -z.abs() - 1
    z = z.to(dtype)
    values, cols = eager.row_topk(z, 8)
    assert cols.shape == (40, 8) and values.dtype == dtype
    assert torch.equal(z.gather(1, cols), values)
    assert bool((cols.sort(1).values.diff(dim=1) > 0).all())  # distinct columns
    want = torch.topk(z, 8, dim=1).values
    assert torch.equal(values.sort(1, descending=True).values, want)
