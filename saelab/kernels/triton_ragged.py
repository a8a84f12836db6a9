"""Triton kernels for ragged (CSR) codes: the decoder and the sparse encoder backward.

Same functions, signatures and semantics as the ragged part of `kernels/eager.py`, which is
the specification. A CSR code is values/indices [nnz] with row starts offsets [B + 1]; each
kernel loops over a row's own entries, so the work is nnz, never B × the longest row.

- gather_rows:  out[b] = Σ_{p in row b} w[p] · T[idx[p]]          decoder forward, grad x
- row_dots:     out[p] = T[idx[p]] · rows[row of p]                decoder grad values
- scatter_rows: out[i] = Σ_{p: idx[p] = i} w[p] · rows[row of p]   grad W_enc, grad W_dec

scatter_rows sorts the entries by latent and lets one program own each (latent, d-block), as
`triton_sparse.scatter_rows` does for padded codes: no atomics, deterministic; the same pass
writes Σ w per latent (grad b_enc). Every masked load names its `other`, and every offset
that multiplies two sizes is int64 (nnz·D and d_sae·D can pass 2³¹).
"""

# NOTE: pyright cannot type Triton's DSL (constexpr parameters given ints, None-indexing of
# tl.tensor); these checks are off in the Triton modules only.
# pyright: reportArgumentType=false, reportAssignmentType=false
# pyright: reportCallIssue=false, reportGeneralTypeIssues=false

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from saelab.kernels import eager
from saelab.kernels.eager import RaggedSelector, ragged_cat, ragged_rows
from saelab.kernels.triton_select import next_pow2


def _block_d(D: int) -> int:
    return min(128, next_pow2(D))


@triton.jit
def _gather_rows_kernel(
    off_ptr, idx_ptr, w_ptr, T_ptr, out_ptr, D,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    start = tl.load(off_ptr + b)
    end = tl.load(off_ptr + b + 1)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p0 in range(start, end, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_ok = ps < end
        ids = tl.load(idx_ptr + ps, mask=p_ok, other=0).to(tl.int64)
        w = tl.load(w_ptr + ps, mask=p_ok, other=0.0).to(tl.float32)
        t = tl.load(
            T_ptr + ids[:, None] * D + ds[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc += tl.sum(w[:, None] * t.to(tl.float32), axis=0)
    tl.store(out_ptr + b * D + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def gather_rows(offsets: Tensor, indices: Tensor, weights: Tensor, table: Tensor) -> Tensor:
    """out[b] = Σ_{p in row b} weights[p] · table[indices[p]], [B, D] in table's dtype."""
    B, D = offsets.numel() - 1, table.shape[1]
    out = torch.empty(B, D, dtype=table.dtype, device=table.device)
    if B == 0:
        return out
    BLOCK_D = _block_d(D)
    _gather_rows_kernel[(B, triton.cdiv(D, BLOCK_D))](
        offsets.contiguous(), indices.contiguous(), weights.contiguous(), table.contiguous(),
        out, D, BLOCK_P=16, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out


@triton.jit
def _row_dots_kernel(
    bag_ptr, idx_ptr, T_ptr, rows_ptr, out_ptr, nnz, D,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    ps = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = ps < nnz
    ids = tl.load(idx_ptr + ps, mask=p_ok, other=0).to(tl.int64)
    bags = tl.load(bag_ptr + ps, mask=p_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_P], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        m = p_ok[:, None] & (ds < D)[None, :]
        r = tl.load(rows_ptr + bags[:, None] * D + ds[None, :], mask=m, other=0.0)
        t = tl.load(T_ptr + ids[:, None] * D + ds[None, :], mask=m, other=0.0)
        acc += tl.sum(t.to(tl.float32) * r.to(tl.float32), axis=1)
    tl.store(out_ptr + ps, acc, mask=p_ok)


def row_dots(offsets: Tensor, indices: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """out[p] = table[indices[p]] · rows[row of p], [nnz] fp32."""
    nnz, D = indices.numel(), table.shape[1]
    out = torch.empty(nnz, dtype=torch.float32, device=table.device)
    if nnz == 0:
        return out
    bag = ragged_rows(offsets, nnz)
    BLOCK_P = 32
    _row_dots_kernel[(triton.cdiv(nnz, BLOCK_P),)](
        bag, indices.contiguous(), table.contiguous(), rows.contiguous(), out, nnz, D,
        BLOCK_P=BLOCK_P, BLOCK_D=_block_d(D),
    )  # fmt: skip
    return out


@triton.jit
def _scatter_rows_kernel(
    order_ptr, lat_off_ptr, bag_ptr, w_ptr, rows_ptr, out_ptr, sum_ptr, D,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, SUMS: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    start = tl.load(lat_off_ptr + i)
    end = tl.load(lat_off_ptr + i + 1)
    acc = tl.zeros([BLOCK_D], tl.float32)
    w_sum = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(start, end, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_ok = ps < end
        pos = tl.load(order_ptr + ps, mask=p_ok, other=0)  # this latent's entries
        w = tl.load(w_ptr + pos, mask=p_ok, other=0.0).to(tl.float32)
        b = tl.load(bag_ptr + pos, mask=p_ok, other=0).to(tl.int64)
        r = tl.load(
            rows_ptr + b[:, None] * D + ds[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc += tl.sum(w[:, None] * r.to(tl.float32), axis=0)
        w_sum += w
    tl.store(out_ptr + i * D + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
    if SUMS:
        if tl.program_id(1) == 0:
            tl.store(sum_ptr + i, tl.sum(w_sum, axis=0))


def scatter_rows(
    offsets: Tensor, indices: Tensor, weights: Tensor, rows: Tensor, n_out: int, sums: bool = False
) -> tuple[Tensor, Tensor | None]:
    """(Sᵀ·rows [n_out, D] in rows' dtype, Σ weights per latent [n_out] fp32 if sums), S the
    CSR [B, n_out] matrix with row starts offsets and entries (indices, weights)."""
    D = rows.shape[1]
    order = torch.argsort(indices)
    lat_off = torch.zeros(n_out + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(indices, minlength=n_out), 0, out=lat_off[1:])
    out = torch.empty(n_out, D, dtype=rows.dtype, device=rows.device)
    total = torch.empty(n_out if sums else 1, dtype=torch.float32, device=rows.device)
    BLOCK_D = _block_d(D)
    _scatter_rows_kernel[(n_out, triton.cdiv(D, BLOCK_D))](
        order, lat_off, ragged_rows(offsets, indices.numel()), weights.contiguous(),
        rows.contiguous(), out, total, D, BLOCK_P=16, BLOCK_D=BLOCK_D, SUMS=sums,
    )  # fmt: skip
    return out, total if sums else None


class _RaggedEncode(torch.autograd.Function):
    """eager.RaggedEncode with the Triton sparse backward (the forward needs the dense z
    for a batch-level selector, so it is the same GEMM)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, select, aux_mask, k_aux):  # type: ignore[override]
        return eager.RaggedEncode.forward(ctx, x, W_enc, b_enc, b_dec, select, aux_mask, k_aux)

    @staticmethod
    def backward(ctx, grad_values, _gi, _go, grad_aux, _gai):  # type: ignore[override]
        x_c, W_enc, values, indices, offsets, aux_values, aux_indices = ctx.saved_tensors
        g = grad_values * (values > 0)
        idx, off = indices, offsets
        if aux_indices.numel() and grad_aux is not None:
            g, idx, off = ragged_cat(off, g, idx, grad_aux * (aux_values > 0), aux_indices)
        grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            n = W_enc.shape[0]
            grad_W_enc, sums = scatter_rows(off, idx, g, x_c, n, ctx.needs_input_grad[2])
            grad_b_enc = None if sums is None else sums.to(g.dtype)
        grad_x_c = gather_rows(off, idx, g, W_enc)
        grad_x = grad_x_c if ctx.needs_input_grad[0] else None
        grad_b_dec = -grad_x_c.sum(0) if ctx.needs_input_grad[3] else None
        if not ctx.needs_input_grad[1]:
            grad_W_enc = None
        return grad_x, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None


def ragged_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    select: RaggedSelector,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _RaggedEncode.apply(x, W_enc, b_enc, b_dec, select, aux_mask, k_aux)  # type: ignore[return-value]


class _RaggedDecode(torch.autograd.Function):
    """eager.RaggedDecode: a per-row gather of decoder rows; backward by row dots and
    scatter_rows."""

    @staticmethod
    def forward(ctx, values, indices, offsets, W_dec):  # type: ignore[override]
        ctx.save_for_backward(values, indices, offsets, W_dec)
        return gather_rows(offsets, indices, values, W_dec)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        values, indices, offsets, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = row_dots(offsets, indices, W_dec, grad).to(values.dtype)
        if ctx.needs_input_grad[3]:
            n = W_dec.shape[0]
            grad_W = scatter_rows(offsets, indices, values, grad, n)[0].to(W_dec.dtype)
        return grad_values, None, None, grad_W


def ragged_decode(
    values: Tensor, indices: Tensor, offsets: Tensor, W_dec: Tensor, b_dec: Tensor | None
) -> Tensor:
    """eager.ragged_decode: x̂ = Σ_i a_i d_i (+ b_dec) of a CSR code."""
    out = _RaggedDecode.apply(values, indices, offsets, W_dec)
    return out if b_dec is None else out + b_dec
