"""Matching pursuit's two halves (ALGORITHMS.md §5; Costa et al., arXiv 2506.03093): the greedy
selection of atoms, which takes no gradient, and the differentiable values of the atoms chosen.

Both lean on the Gram matrix G = W_dec W_decᵀ while it fits (`GRAM_MAX` latents): the
selection updates the correlations c ← c − a_j G[j] instead of recomputing W_dec r, and the
values read the chosen atoms' Gram entries from it. At the benchmark shape (B 4096, d_in 512,
n 4096, 32 steps) a pursuit step is memory traffic over [B, n] float32 matrices, 64 MB each:
the row argmax reads c, and the update reads c and the chosen Gram rows and writes c. That is
about 8 GB per training step, and it, not arithmetic, is what limits the pursuit.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.kernels.eager import row_dots, scatter_rows

GRAM_MAX = 16384
"""Most latents for which the pursuit keeps G = W_dec W_decᵀ (n² floats: 1 GiB in fp32 at
16,384); past it each selection step recomputes W_dec r and the values use the chosen rows."""

MP_CHUNK = 4096
"""Tokens per block of the selection loop, which bounds its scratch to [MP_CHUNK, n] (a
smaller block makes each of its row-wise ops slower per entry on CPU)."""


def gram(W_dec: Tensor) -> Tensor | None:
    """G = W_dec W_decᵀ without gradient, or None past GRAM_MAX latents."""
    if W_dec.shape[0] > GRAM_MAX:
        return None
    with torch.no_grad():
        W = W_dec.detach()
        return W @ W.T


# ---------------------------------------------------------------------------------------
# Selection


@torch.no_grad()
def mp_select(
    r: Tensor, W_dec: Tensor, steps: int, tol: float = 0.0, G: Tensor | None = None
) -> Tensor:
    """Greedy non-negative pursuit without repeats; [B, steps] ids, −1 where a row stopped.

    With unit-norm atoms the correlations update as c ← c − c_j G[:, j] (`G`, the Gram
    matrix, computed here when not given and shared by every block and step), which is
    cheaper than recomputing W_dec r while G fits in memory; past that size each step
    recomputes c from the residual. Blocks of MP_CHUNK tokens run all their steps back to
    back and stop as soon as every token in them has stopped.
    """
    if G is None:
        G = gram(W_dec)
    B = r.shape[0]
    chosen = torch.full((B, steps), -1, dtype=torch.int64, device=r.device)
    with warnings.catch_warnings():  # the CPU update's CSR product; CSR is "beta"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        for lo in range(0, B, MP_CHUNK):
            _mp_block(r[lo : lo + MP_CHUNK], W_dec, G, tol, chosen[lo : lo + MP_CHUNK])
    return chosen


def row_max(c: Tensor) -> tuple[Tensor, Tensor]:
    """c.max(1): each row's largest value and its column.

    On CPU, numpy's row argmax reads a [4096, 4096] float32 matrix 3–4× faster than torch's
    max-with-index (torch 2.13), which was the pursuit step's largest cost; the values are
    then gathered. A tie goes to the first column (torch does not say which it takes).
    """
    if c.device.type != "cpu" or c.dtype not in (torch.float32, torch.float64):
        return c.max(1)
    j = torch.from_numpy(c.numpy().argmax(1)).to(torch.int64)
    return c.gather(1, j[:, None]).squeeze(1), j


def _mp_block(r: Tensor, W_dec: Tensor, G: Tensor | None, tol: float, chosen: Tensor) -> None:
    """mp_select on one block of tokens, writing its ids into `chosen` [b, steps]."""
    c = r @ W_dec.T
    r2 = r.pow(2).sum(-1)
    stop2 = (tol**2) * r2
    active = torch.ones(r.shape[0], dtype=torch.bool, device=r.device)
    sparse_update = c.device.type == "cpu" and c.dtype in (torch.float32, torch.float64)
    crow = torch.arange(r.shape[0] + 1, device=r.device)
    rows = c.new_empty(0 if sparse_update else c.shape)
    for t in range(chosen.shape[1]):
        cj, j = row_max(c)
        active &= cj > 0
        if tol > 0:
            active &= r2 > stop2
            # An early stop for speed (finished rows only ever pick −1), read only where it
            # pays: without tol rows finish rarely, and the read is a host sync on a GPU.
            if not bool(active.any()):
                break
        a = torch.where(active, cj, torch.zeros_like(cj))
        chosen[:, t] = torch.where(active, j, torch.full_like(j, -1))
        if t == chosen.shape[1] - 1:
            break  # the last pick needs no update after it
        r2 = r2 - a.pow(2)
        if G is not None and sparse_update:
            # c ← c − S G with S = Σ_b a_b e_b e_{j_b}ᵀ: one sparse-dense product over the
            # batch reads each Gram row once into c (2× faster on CPU than gathering the
            # rows into a [b, n] copy and then subtracting it).
            S = torch.sparse_csr_tensor(crow, j, a, c.shape, check_invariants=False)
            c.addmm_(S, G, alpha=-1)
        elif G is not None:
            c.addcmul_(torch.index_select(G, 0, j, out=rows), a[:, None], value=-1)
        else:
            r = torch.addcmul(r, a[:, None], W_dec.index_select(0, j), value=-1)
            torch.mm(r, W_dec.T, out=c)
            # A recomputed c has forgotten which atoms were taken (a stopped row's −1 marks
            # column 0, harmless: it only ever picks −1 again).
            c.scatter_(1, chosen[:, : t + 1].clamp_min(0), float("-inf"))
        c.scatter_(1, j[:, None], float("-inf"))  # no repeats


# ---------------------------------------------------------------------------------------
# Values


def mp_values(
    r: Tensor, W_dec: Tensor, indices: Tensor, G: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The pursuit's values for its chosen atoms, differentiably: (values, live, ids), all
    [B, T]; live marks the steps taken (−1 in indices: not taken, value 0), ids = indices
    clamped to valid latents. `G`: the Gram matrix of W_dec's current values, if at hand.

    Step t takes a_t = d_t·r_{t−1} with r_{t−1} = r − Σ_{s<t} a_s d_s, that is
    a_t = d_t·r − Σ_{s<t} (d_t·d_s) a_s: a unit lower-triangular system in the chosen atoms'
    own Gram matrix [B, T, T]. One triangular solve replaces T sequential residual updates.
    """
    live = indices >= 0
    ids = indices.clamp_min(0)
    if G is None:
        G = gram(W_dec)
    return _Values.apply(r, W_dec, ids, live, G), live, ids


class _Values(torch.autograd.Function):
    """mp_values' solve with a hand-written backward that never builds the [B, T, d_in]
    stack of chosen atoms (autograd through it cost more than the pursuit itself).

    Forward: c0[b, t] = d_{j_t}·r_b as per-row dots, M[b, t, s] = G[j_t, j_s] gathered from
    the Gram matrix, and v = L⁻¹ c0 with L = I + strict lower triangle of M (live rows).
    Backward, for the incoming gradient g of v: u = L⁻ᵀ g, so ∂c0 = u and
    ∂M = −u vᵀ on the strict lower triangle. Then
      ∂r_b = Σ_t ∂c0_t d_{j_t}                        (an embedding bag)
      ∂W  += Σ_{b,t} ∂c0_{b,t} e_{j_t} r_bᵀ          (the decoder's sparse scatter)
      ∂W  += (Q + Qᵀ) W, Q = Σ_{b,t,s} ∂M_{b,t,s} e_{j_t} e_{j_s}ᵀ   (a dense [n, n] GEMM)
    Without G (past GRAM_MAX) M and the last term go through the chosen rows instead.
    """

    @staticmethod
    def forward(ctx, r, W, ids, live, G):  # type: ignore[override]
        n = W.shape[0]
        c0 = row_dots(ids, W, r) * live
        pairs = None
        if G is not None:
            # Flat positions of (j_t, j_s) in G: a flat index_select is ~6× faster on CPU
            # than indexing G with two broadcast index tensors.
            pairs = ids[:, :, None] * n + ids[:, None, :]
            M = G.view(-1).index_select(0, pairs.view(-1)).view(pairs.shape)
        else:
            D = F.embedding(ids, W)
            M = torch.bmm(D, D.transpose(1, 2))
        L = M.tril_(-1).mul_(live[:, :, None])
        vals = torch.linalg.solve_triangular(L, c0[..., None], upper=False, unitriangular=True)
        vals = vals.squeeze(-1)
        ctx.save_for_backward(r, W, ids, live, L, vals, pairs)
        return vals

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        r, W, ids, live, L, vals, pairs = ctx.saved_tensors
        u = torch.linalg.solve_triangular(
            L.transpose(1, 2), g[..., None], upper=True, unitriangular=True
        ).squeeze(-1)
        dc0 = u * live
        dM = (u[:, :, None] * vals[:, None, :]).neg_().tril_(-1).mul_(live[:, :, None])
        grad_r = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_r = F.embedding_bag(ids, W, per_sample_weights=dc0, mode="sum")
        if ctx.needs_input_grad[1]:
            n = W.shape[0]
            grad_W = scatter_rows(ids, dc0, r, n)
            if pairs is not None:
                # Q + Qᵀ scattered directly, both orientations of every pair below the
                # diagonal (a transposed add of two [n, n] matrices costs more than the
                # scatter and the GEMM together).
                T = dM.shape[1]
                t, s = torch.tril_indices(T, T, -1, device=dM.device)
                w = dM[:, t, s].reshape(-1)
                Q = W.new_zeros(n * n)
                Q.scatter_add_(0, pairs[:, t, s].reshape(-1), w)
                Q.scatter_add_(0, pairs[:, s, t].reshape(-1), w)
                grad_W.addmm_(Q.view(n, n), W)
            else:
                D = F.embedding(ids, W)
                dD = torch.bmm(dM + dM.transpose(1, 2), D)
                grad_W.index_add_(0, ids.reshape(-1), dD.reshape(-1, W.shape[1]))
        return grad_r, grad_W, None, None, None
