"""The Triton backend: fused TopK encoder, sparse backward and sparse decoder.

Same functions, signatures and semantics as `kernels/eager.py`, which is the specification.
The dense [B, d_sae] matrix exists only where a batch-level rule's selector needs it
(`sparse_encode`); `topk_encode` never stores it.

Three gather/scatter kernels cover every sparse product, each accumulating in fp32:

- gather_rows:  out[b] = Σ_j w[b, j] · T[idx[b, j]]            decoder forward, encoder grad x
- row_dots:     out[b, j] = T[idx[b, j]] · rows[b]               decoder grad values
- scatter_rows: out[i] = Σ_{(b, j): idx[b, j] = i} w[b, j] · rows[b]   grad W_enc, grad W_dec

scatter_rows sorts the B·K pairs by latent (torch.sort, a radix sort on GPU) and lets one
program own each (latent, d-block), so it needs no atomics and is deterministic; the same
pass writes Σ w per latent, which is grad b_enc. The stock alternatives are slower here:
index_add_ needs a [B·K, d_in] copy of the rows, and the embedding-bag backward sorts too
but then atomically adds.
"""

# NOTE: pyright cannot type Triton's DSL (constexpr parameters given ints, static_range,
# None-indexing of tl.tensor); these checks are off in the two Triton modules only.
# pyright: reportArgumentType=false, reportAssignmentType=false
# pyright: reportCallIssue=false, reportGeneralTypeIssues=false

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from saelab.kernels import eager
from saelab.kernels.eager import Selector
from saelab.kernels.triton_select import (
    MAX_FUSED_K,
    fused_topk,
    next_pow2,
    row_offsets,
    slice_topk,
)


def _block_d(D: int) -> int:
    return min(128, next_pow2(D))


@triton.jit
def _gather_rows_kernel(
    idx_ptr, w_ptr, T_ptr, out_ptr, K, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ids = tl.load(idx_ptr + b * K + ks, mask=k_ok, other=0)
        w = tl.load(w_ptr + b * K + ks, mask=k_ok, other=0.0).to(tl.float32)
        # Zero weights (padding of a short code) skip their row's read.
        t_ok = (k_ok & (w != 0))[:, None] & d_ok[None, :]
        t = tl.load(T_ptr + row_offsets(ids, D)[:, None] + ds[None, :], mask=t_ok, other=0.0)
        acc += tl.sum(w[:, None] * t.to(tl.float32), axis=0)
    tl.store(out_ptr + b * D + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def gather_rows(indices: Tensor, weights: Tensor, table: Tensor) -> Tensor:
    """out[b] = Σ_j weights[b, j] · table[indices[b, j]], [B, D] in table's dtype."""
    B, K = indices.shape
    D = table.shape[1]
    out = torch.empty(B, D, dtype=table.dtype, device=table.device)
    BLOCK_D = _block_d(D)
    _gather_rows_kernel[(B, triton.cdiv(D, BLOCK_D))](
        indices.contiguous(), weights.contiguous(), table.contiguous(), out, K, D,
        BLOCK_K=min(32, next_pow2(K)), BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out


@triton.jit
def _row_dots_kernel(
    idx_ptr, T_ptr, rows_ptr, out_ptr, K, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    ids = tl.load(idx_ptr + b * K + ks, mask=k_ok, other=0)
    acc = tl.zeros([BLOCK_K], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        r = tl.load(rows_ptr + b * D + ds, mask=d_ok, other=0.0).to(tl.float32)
        t = tl.load(
            T_ptr + row_offsets(ids, D)[:, None] + ds[None, :],
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc += tl.sum(t.to(tl.float32) * r[None, :], axis=1)
    tl.store(out_ptr + b * K + ks, acc, mask=k_ok)


def row_dots(indices: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """out[b, j] = table[indices[b, j]] · rows[b], [B, K] fp32."""
    B, K = indices.shape
    D = table.shape[1]
    out = torch.empty(B, K, dtype=torch.float32, device=table.device)
    BLOCK_K = min(32, next_pow2(K))
    _row_dots_kernel[(B, triton.cdiv(K, BLOCK_K))](
        indices.contiguous(), table.contiguous(), rows.contiguous(), out, K, D,
        BLOCK_K=BLOCK_K, BLOCK_D=_block_d(D),
    )  # fmt: skip
    return out


@triton.jit
def _scatter_rows_kernel(
    order_ptr, off_ptr, w_ptr, rows_ptr, out_ptr, sum_ptr, K, D,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, SUMS: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    start = tl.load(off_ptr + i)
    end = tl.load(off_ptr + i + 1)
    acc = tl.zeros([BLOCK_D], tl.float32)
    w_sum = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(start, end, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_ok = ps < end
        pos = tl.load(order_ptr + ps, mask=p_ok, other=0)  # flat (b, j) of this latent's pairs
        w = tl.load(w_ptr + pos, mask=p_ok, other=0.0).to(tl.float32)
        r = tl.load(
            rows_ptr + row_offsets(pos // K, D)[:, None] + ds[None, :],
            mask=(p_ok & (w != 0))[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc += tl.sum(w[:, None] * r.to(tl.float32), axis=0)
        w_sum += w
    tl.store(out_ptr + i * D + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
    if SUMS:
        if tl.program_id(1) == 0:
            tl.store(sum_ptr + i, tl.sum(w_sum, axis=0))


def scatter_rows(
    indices: Tensor, weights: Tensor, rows: Tensor, n_out: int, sums: bool = False
) -> tuple[Tensor, Tensor | None]:
    """(Sᵀ·rows [n_out, D] in rows' dtype, Σ weights per latent [n_out] fp32 if sums).

    S is the sparse [B, n_out] matrix with S[b, indices[b, j]] = weights[b, j].
    """
    B, K = indices.shape
    D = rows.shape[1]
    # Stable: a fixed summation order, so a resumed run repeats the uninterrupted one.
    # searchsorted, not bincount, which reads the largest index on the host (a sync).
    latents, order = torch.sort(indices.reshape(-1), stable=True)
    offsets = torch.searchsorted(latents, torch.arange(n_out + 1, device=rows.device))
    out = torch.empty(n_out, D, dtype=rows.dtype, device=rows.device)
    total = torch.empty(n_out if sums else 1, dtype=torch.float32, device=rows.device)
    BLOCK_D = _block_d(D)
    _scatter_rows_kernel[(n_out, triton.cdiv(D, BLOCK_D))](
        order, offsets, weights.contiguous(), rows.contiguous(), out, total, K, D,
        BLOCK_P=16, BLOCK_D=BLOCK_D, SUMS=sums,
    )  # fmt: skip
    return out, total if sums else None


# ---------------------------------------------------------------------------------------
# Encoder


class _SparseEncode(torch.autograd.Function):
    """eager.SparseEncode with a pluggable forward and the Triton sparse backward.

    `pick(x_c)` returns (values, indices, aux_values, aux_indices); the backward is the
    eager maths: grad W_enc = Sᵀ(x − b_dec), grad b_enc = Σ_b S, grad x = S W_enc,
    grad b_dec = −Σ_b grad x, with S the selected entries' gradients (zero where ReLU
    clipped the value).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, pick):  # type: ignore[override]
        x_c = x - b_dec
        values, indices, aux_values, aux_indices = pick(x_c)
        ctx.save_for_backward(x_c, W_enc, values, indices, aux_values, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux, _gai):  # type: ignore[override]
        x_c, W_enc, values, indices, aux_values, aux_indices = ctx.saved_tensors
        g = grad_values * (values > 0)
        idx = indices
        if aux_indices.numel() and grad_aux is not None:
            g = torch.cat([g, grad_aux * (aux_values > 0)], dim=1)
            idx = torch.cat([indices, aux_indices], dim=1)
        grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_W_enc, sums = scatter_rows(idx, g, x_c, W_enc.shape[0], ctx.needs_input_grad[2])
            grad_b_enc = None if sums is None else sums.to(g.dtype)
        grad_x_c = gather_rows(idx, g, W_enc)
        grad_x = grad_x_c if ctx.needs_input_grad[0] else None
        grad_b_dec = -grad_x_c.sum(0) if ctx.needs_input_grad[3] else None
        if not ctx.needs_input_grad[1]:
            grad_W_enc = None
        return grad_x, grad_W_enc, grad_b_enc, grad_b_dec, None


def _no_aux(x_c: Tensor) -> tuple[Tensor, Tensor]:
    B = x_c.shape[0]
    return x_c.new_zeros(B, 0), torch.zeros(B, 0, dtype=torch.int64, device=x_c.device)


def _aux_topk(
    x_c: Tensor, W_enc: Tensor, b_enc: Tensor, mask: Tensor | None, k_aux: int
) -> tuple[Tensor, Tensor]:
    """eager._masked_topk without the dense z and without a host sync: [B, min(k_aux, n)],
    zero-padded when fewer latents are masked. A second fused pass runs over the masked
    latents only, listed first by a stable sort of the mask, their number read on the device.
    Past MAX_FUSED_K (k_aux ≥ 513) a GEMM over all latents, the others at −inf, feeds
    torch.topk (the masked count is unknown to the host, so the GEMM cannot be cut to it)."""
    if mask is None or k_aux <= 0:
        return _no_aux(x_c)
    kk = min(k_aux, W_enc.shape[0])
    if next_pow2(kk) > MAX_FUSED_K:
        return eager._masked_topk(torch.addmm(b_enc, x_c, W_enc.T), kk, mask)
    order = torch.argsort((~mask).to(torch.uint8), stable=True)
    count = mask.sum(dtype=torch.int64).reshape(1)
    return fused_topk(x_c, W_enc, b_enc, kk, order, count)


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """eager.topk_encode with the fused encoder: only [B, k] (and [B, k_aux]) is written."""

    def pick(x_c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        values, indices = fused_topk(x_c, W_enc, b_enc, k)
        return values, indices, *_aux_topk(x_c, W_enc, b_enc, aux_mask, k_aux)

    return _SparseEncode.apply(x, W_enc, b_enc, b_dec, pick)  # type: ignore[return-value]


def sparse_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    select: Selector,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """eager.sparse_encode: a batch-level selector needs the dense z, so the forward is a
    cuBLAS GEMM; the backward is the sparse Triton one."""

    def pick(x_c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        z = torch.addmm(b_enc, x_c, W_enc.T)
        values, indices = select(z)
        if eager.aux_mask_is_empty(aux_mask, k_aux, z):
            return values, indices, *_no_aux(x_c)
        return values, indices, *eager._masked_topk(z, k_aux, aux_mask)

    return _SparseEncode.apply(x, W_enc, b_enc, b_dec, pick)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Decoder and batch-level selection


class _Decode(torch.autograd.Function):
    """x̂ = Σ_j values[b, j] · W_dec[indices[b, j]]; backward by row dots and scatter_rows."""

    @staticmethod
    def forward(ctx, values, indices, W_dec):  # type: ignore[override]
        ctx.save_for_backward(values, indices, W_dec)
        return gather_rows(indices, values, W_dec)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = row_dots(indices, W_dec, grad).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = scatter_rows(indices, values, grad, W_dec.shape[0])[0].to(W_dec.dtype)
        return grad_values, None, grad_W


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """eager.decode: x̂ = Σ_i a_i d_i (+ b_dec) as a gather of decoder rows."""
    out = _Decode.apply(values, indices, W_dec)
    return out if b_dec is None else out + b_dec


def row_topk(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return slice_topk(z, k, dim=1)


def column_topk(z: Tensor, m: int) -> tuple[Tensor, Tensor]:
    return slice_topk(z, m, dim=0)


def global_topk(z: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor]:
    """eager.global_topk with the per-row candidates taken by the one-pass row top-k."""
    return eager.global_topk(z, K, row_topk)
