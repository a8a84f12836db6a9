"""Matching pursuit (saelab.pursuit): the selection against the plain algorithm, its
invariant, and the values' hand-written backward against autograd through the replay."""

import pytest
import torch

from saelab import pursuit
from saelab.pursuit import mp_select, mp_values, row_max


def test_mp_residual_norm_invariant():
    torch.manual_seed(1)
    W = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)
    x = torch.randn(50, 16)
    idx = mp_select(x, W, 10)
    r = x.clone()
    prev = r.pow(2).sum(1)
    for t in range(10):
        ok = idx[:, t] >= 0
        d = W[idx[:, t].clamp_min(0)]
        c = (d * r).sum(1) * ok
        r = r - c[:, None] * d
        now = r.pow(2).sum(1)
        torch.testing.assert_close(now, prev - c.pow(2), atol=1e-4, rtol=1e-4)
        assert (now <= prev + 1e-5).all()  # the residual never grows
        prev = now


def test_mp_gram_path_equals_recompute_path(monkeypatch):
    torch.manual_seed(2)
    W = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
    x = torch.randn(30, 8)
    a = mp_select(x, W, 6)
    # Recompute path: W_dec r each step (used when the Gram matrix would not fit).
    B = x.shape[0]
    r = x.clone()
    chosen = torch.full((B, 6), -1)
    used = torch.zeros(B, 40, dtype=torch.bool)
    active = torch.ones(B, dtype=torch.bool)
    for t in range(6):
        c = (r @ W.T).masked_fill(used, float("-inf"))
        cj, j = c.max(1)
        active &= cj > 0
        chosen[:, t] = torch.where(active, j, -1)
        r = r - (cj * active)[:, None] * W[j]
        used[torch.arange(B), j] = True
    assert torch.equal(a, chosen)


# ---- matching pursuit: the fast paths against the plain algorithm ------------------------


def _pursuit_reference(r, W, steps, tol=0.0):
    """docs/algorithms.md §5 step by step: c = W r recomputed from the residual each step."""
    B = r.shape[0]
    ids = torch.full((B, steps), -1, dtype=torch.int64)
    vals = torch.zeros(B, steps, dtype=r.dtype)
    for b in range(B):
        res, used, stop = r[b].clone(), set(), tol * r[b].norm()
        for t in range(steps):
            c = W @ res
            if used:
                c[list(used)] = float("-inf")
            cj, j = c.max(0)
            if cj <= 0 or (tol > 0 and res.norm() <= stop):
                break
            ids[b, t], vals[b, t] = j, cj
            used.add(int(j))
            res = res - cj * W[j]
    return ids, vals


@pytest.mark.parametrize("n", [40, 20000])  # the Gram update, and past 16384 the recompute
@pytest.mark.parametrize("tol", [0.0, 0.4])
def test_mp_select_matches_the_plain_algorithm(n, tol, monkeypatch):
    monkeypatch.setattr(pursuit, "MP_CHUNK", 7)  # several blocks, the last one partial
    g = torch.Generator().manual_seed(0)
    W = torch.randn(n, 6, generator=g, dtype=torch.float64)
    W /= W.norm(dim=1, keepdim=True)
    r = torch.randn(17, 6, generator=g, dtype=torch.float64)
    ids = mp_select(r, W, 5, tol)
    ref_ids, _ = _pursuit_reference(r, W, 5, tol)
    assert torch.equal(ids, ref_ids)
    if tol > 0:
        assert (ids < 0).any() and (ids >= 0).any()


@pytest.mark.parametrize("gram", [True, False])  # G's entries, or past GRAM_MAX the rows
def test_mp_values_match_the_sequential_replay(gram, monkeypatch):
    # Values and every gradient of the triangular solve against T residual updates.
    if not gram:
        monkeypatch.setattr(pursuit, "GRAM_MAX", 10)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(30, 8, generator=g, dtype=torch.float64)
    W = (W / W.norm(dim=1, keepdim=True)).requires_grad_()
    r = torch.randn(9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ids = mp_select(r.detach(), W.detach(), 6, 0.3)
    assert (ids < 0).any(), "some rows must stop early"
    vals, live, _ = mp_values(r, W, ids)
    res, ref = r, []
    for t in range(ids.shape[1]):
        d = W[ids[:, t].clamp_min(0)]
        a = (d * res).sum(-1) * (ids[:, t] >= 0)
        res = res - a[:, None] * d
        ref.append(a)
    ref = torch.stack(ref, 1)
    torch.testing.assert_close(vals, ref)
    _, ref_vals = _pursuit_reference(r.detach(), W.detach(), 6, 0.3)
    torch.testing.assert_close(vals.detach(), ref_vals)
    w = torch.randn(vals.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((vals * w).sum(), (r, W))
    want = torch.autograd.grad((ref * w).sum(), (r, W))
    for a, b in zip(got, want):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n", [3, 100, 4096 + 7])
def test_row_max_is_each_rows_max_and_its_column(n):
    g = torch.Generator().manual_seed(n)
    c = torch.randn(37, n, generator=g)
    c[5] = float("-inf")  # a row with nothing left to pick
    c[6, : n // 2] = float("-inf")
    want_v, want_j = c.max(1)
    got_v, got_j = row_max(c)
    assert torch.equal(got_v, want_v)
    assert torch.equal(c.gather(1, got_j[:, None]).squeeze(1), want_v)
    finite = want_v.isfinite()
    assert torch.equal(got_j[finite], want_j[finite])  # random values: no ties
    c[9, -1] = c[9, 0] = 100.0  # a tie goes to the first column
    assert int(row_max(c)[1][9]) == 0
