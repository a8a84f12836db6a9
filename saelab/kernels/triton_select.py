"""Triton selection kernels: the fused TopK encoder and per-slice top-k of a dense matrix.

Both keep a running top-k per slice (a token row, or a latent column) in registers while
they stream tiles of candidates, so the full [B, d_sae] matrix is read once and, for the
encoder, never written (Gao et al. 2024, arXiv 2406.04093, §D).

A candidate is one int64 key: the fp32 value's bits, remapped so that signed-integer order
equals float order, in the high word, and 2³¹ − 1 − index in the low word. One compare orders by
value, ties going to the lower index, and a top-k of keys carries the indices along for free.

Merging a tile into the running top-k: the tile's top-k, sorted ascending, is maxed
elementwise with the running list, sorted descending. Of the 2k values the elementwise max
keeps exactly the k largest and forms a bitonic sequence, which one bitonic merge (log k
compare-and-swap rounds) sorts again.

Imported only through `saelab.kernels` once Triton is known to be importable; set
TRITON_INTERPRET=1 before importing this module to run it on CPU tensors.
"""

# NOTE: pyright cannot type Triton's DSL (constexpr parameters given ints, static_range,
# None-indexing of tl.tensor); these checks are off in the two Triton modules only.
# pyright: reportArgumentType=false, reportAssignmentType=false
# pyright: reportCallIssue=false, reportGeneralTypeIssues=false

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

MIN_KEY = tl.constexpr(-(2**63))
"""Key of an out-of-range candidate: below every real value."""

MAX_FUSED_K = 512
"""Largest (power-of-two padded) k a running top-k keeps in registers; beyond it callers
use a GEMM + torch.topk."""


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Kernels run in Triton's CPU interpreter (read when the kernels are defined, as Triton does)."""


def next_pow2(k: int) -> int:
    return 1 << max(0, (k - 1).bit_length())


def _log2(n: int) -> int:
    return n.bit_length() - 1


@triton.jit
def row_offsets(rows, stride):
    """rows · stride as int64 pointer offsets: a product of two int32 sizes (a token row of
    a [B, d_in] batch with B·d_in ≥ 2³¹, a latent row of a large W_enc) overflows int32."""
    return rows.to(tl.int64) * stride


@triton.jit
def _to_keys(z, idx):
    """Sortable int64 keys of fp32 values z with their int indices idx (same shape)."""
    bits = z.to(tl.int32, bitcast=True)
    bits = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats order reversed
    return (bits.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _from_keys(keys):
    """Inverse of _to_keys: (fp32 values, int64 indices)."""
    bits = (keys >> 32).to(tl.int32)
    bits = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - (keys & 0x7FFFFFFF)


@triton.jit
def _cas(x, flip, i: tl.constexpr, n_dims: tl.constexpr):
    """Compare-and-swap of partners 2^(n_dims − i − 1) apart along the last dim of x.

    Partners are read with sums over a size-2 axis (the Triton 3.0 formulation): unlike the
    xor-reduce of newer tl.sort, it runs at numpy speed under TRITON_INTERPRET.
    """
    n_outer: tl.constexpr = x.numel >> n_dims
    shape: tl.constexpr = [n_outer * 2**i, 2, 2 ** (n_dims - i - 1)]
    y = tl.reshape(x, shape)
    is_right = tl.arange(0, 2)[None, :, None]
    left = tl.reshape(tl.broadcast_to(tl.sum(y * (1 - is_right), 1)[:, None, :], shape), x.shape)
    right = tl.reshape(tl.broadcast_to(tl.sum(y * is_right, 1)[:, None, :], shape), x.shape)
    return x ^ tl.where((left > right) != flip, left ^ right, tl.zeros_like(x))


@triton.jit
def _bitonic_merge(x, stage: tl.constexpr, order: tl.constexpr, n_dims: tl.constexpr):
    """Sort the bitonic runs of length 2^stage of x; order 0 ascending, 1 descending,
    2 alternating (run r ascending when r is even), which pairs runs for the next stage."""
    n_outer: tl.constexpr = x.numel >> n_dims
    if order == 2:
        shape: tl.constexpr = [n_outer * 2 ** (n_dims - 1 - stage), 2, 2**stage]
        flip = tl.reshape(tl.broadcast_to(tl.arange(0, 2)[None, :, None], shape), x.shape)
    else:
        flip = order
    for i in tl.static_range(stage):
        x = _cas(x, flip, i + (n_dims - stage), n_dims)
    return x


@triton.jit
def _tile_topk(x, LOG_K: tl.constexpr, LOG_T: tl.constexpr):
    """The 2^LOG_K largest keys of each row of x [S, 2^LOG_T], sorted ascending.

    Sort runs of 2^LOG_K (alternating direction), then halve repeatedly: the elementwise max
    of an ascending and a descending run is a bitonic run holding the top of both
    (Shanbhag et al., "Efficient Top-K Query Processing on Massively Parallel Hardware").
    """
    S: tl.constexpr = x.shape[0]
    KP: tl.constexpr = 2**LOG_K
    for i in tl.static_range(1, LOG_K + 1):
        x = _bitonic_merge(x, i, 2 if i < LOG_T else 0, LOG_T)
    for j in tl.static_range(LOG_K + 1, LOG_T + 1):
        n: tl.constexpr = LOG_T + LOG_K - j  # log2 of the row length after this halving
        x = tl.max(tl.reshape(x, [S * 2 ** (n - LOG_K), 2, KP]), axis=1)
        x = _bitonic_merge(tl.reshape(x, [S, 2**n]), LOG_K, 2 if j < LOG_T else 0, n)
    return x


@triton.jit
def _merge(best, keys, LOG_K: tl.constexpr, LOG_T: tl.constexpr):
    """Running top-2^LOG_K (sorted, descending) of best [S, 2^LOG_K] ∪ keys [S, 2^LOG_T]."""
    if LOG_K == 0:
        return tl.maximum(best, tl.max(keys, axis=1, keep_dims=True))
    # best descending, top ascending: their elementwise max is bitonic and holds the top k.
    top = _tile_topk(keys, LOG_K, LOG_T)
    return _bitonic_merge(tl.maximum(best, top), LOG_K, 1, LOG_K)


@triton.jit
def _topk_encode_kernel(
    xc_ptr, W_ptr, b_ptr, cols_ptr, count_ptr, val_ptr, idx_ptr,
    B, N, D, K,
    LOG_K: tl.constexpr, LOG_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    # GATHER: the candidates are the latents cols[0:count], both read from device memory
    # (count is a device scalar, so the caller never waits to learn it).
    KP: tl.constexpr = 2**LOG_K
    BLOCK_N: tl.constexpr = 2**LOG_N
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    x_rows = row_offsets(rows, D)
    if GATHER:
        n_cand = tl.load(count_ptr)
    else:
        n_cand = N
    best = tl.full([BLOCK_B, KP], MIN_KEY, tl.int64)
    for n0 in range(0, n_cand, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        col_ok = pos < n_cand
        if GATHER:
            cols = tl.load(cols_ptr + pos, mask=col_ok, other=0)
        else:
            cols = pos
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            x = tl.load(
                xc_ptr + x_rows[:, None] + ds[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            w = tl.load(  # W_encᵀ tile [BLOCK_D, BLOCK_N]: a transposed view, no copy
                W_ptr + row_offsets(cols, D)[None, :] + ds[:, None],
                mask=col_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            if UPCAST:
                # NOTE: Triton 3.9's interpreter mis-multiplies bf16 tl.dot operands; fp32
                # operands give the same exact products. Drop once the interpreter is fixed.
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        z = acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        keys = tl.where(col_ok[None, :], _to_keys(z, pos[None, :]), MIN_KEY)
        best = _merge(best, keys, LOG_K, LOG_N)
    z, idx = _from_keys(best)
    ks = tl.arange(0, KP)
    # Slots no candidate filled (fewer than K of them) are padding: value 0, and each its
    # own latent (slot j → candidate j) so a later scatter meets no pile-up on one latent.
    filled = best != MIN_KEY
    z = tl.where(filled, tl.maximum(z, 0.0), 0.0)
    idx = tl.where(filled, idx, ks[None, :].to(tl.int64))
    ok = row_ok[:, None] & (ks < K)[None, :]
    if GATHER:
        idx = tl.load(cols_ptr + idx, mask=ok, other=0)
    out = row_offsets(rows, K)[:, None] + ks[None, :]
    tl.store(val_ptr + out, z.to(val_ptr.dtype.element_ty), mask=ok)
    tl.store(idx_ptr + out, idx, mask=ok)


def _precision(dtype: torch.dtype) -> str:
    # Match torch's matmul: fp32 stays IEEE unless the user allowed TF32.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def fused_topk(
    x_c: Tensor,
    W: Tensor,
    b: Tensor,
    k: int,
    cols: Tensor | None = None,
    count: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(ReLU'd values, int64 indices) [B, k] of the top-k of z = x_c Wᵀ + b, per row.

    Selection is on z itself (not ReLU(z)), as in eager: a row with fewer than k positive
    pre-activations pads with its largest non-positive ones, at value zero. With `cols`
    (int64 latent ids) and `count` (a one-element int64 tensor, read on the device only),
    the candidates are the latents cols[:count]; slots beyond count are value-0 padding.
    """
    B, D = x_c.shape
    N = W.shape[0]
    # Without candidates listed, the kernel never reads its cols/count pointers.
    listed = (cols.contiguous(), count) if cols is not None and count is not None else None
    KP = next_pow2(k)
    if KP > MAX_FUSED_K:
        raise ValueError(f"fused top-k keeps k ≤ {MAX_FUSED_K} in registers, got k={k}")
    values = torch.empty(B, k, dtype=x_c.dtype, device=x_c.device)
    indices = torch.empty(B, k, dtype=torch.int64, device=x_c.device)
    # Register budget: running keys [BLOCK_B, KP] plus a z tile [BLOCK_B, BLOCK_N].
    BLOCK_B = 64 if KP <= 32 else (32 if KP <= 128 else 16)
    BLOCK_N = max(128, KP)
    BLOCK_D = 64 if x_c.element_size() == 2 else 32
    _topk_encode_kernel[(triton.cdiv(B, BLOCK_B),)](
        x_c.contiguous(), W.contiguous(), b.contiguous(),
        *(listed or (indices, indices)),
        values, indices,
        B, N, D, k,
        LOG_K=_log2(KP), LOG_N=_log2(BLOCK_N), BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D,
        PRECISION=_precision(x_c.dtype), UPCAST=INTERPRET, GATHER=listed is not None, num_warps=8,
    )  # fmt: skip
    return values, indices


@triton.jit
def _slice_topk_kernel(
    z_ptr, val_ptr, idx_ptr,
    S, E, stride_s, stride_e, out_s, out_k, K,
    LOG_K: tl.constexpr, LOG_E: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    KP: tl.constexpr = 2**LOG_K
    BLOCK_E: tl.constexpr = 2**LOG_E
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < S
    best = tl.full([BLOCK_S, KP], MIN_KEY, tl.int64)
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        ok = s_ok[:, None] & (es < E)[None, :]
        ptr = z_ptr + s[:, None].to(tl.int64) * stride_s + es[None, :].to(tl.int64) * stride_e
        z = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        best = _merge(best, tl.where(ok, _to_keys(z, es[None, :]), MIN_KEY), LOG_K, LOG_E)
    z, idx = _from_keys(best)
    ks = tl.arange(0, KP)
    out = s[:, None].to(tl.int64) * out_s + ks[None, :].to(tl.int64) * out_k
    ok = s_ok[:, None] & (ks < K)[None, :]
    tl.store(val_ptr + out, z.to(val_ptr.dtype.element_ty), mask=ok)
    tl.store(idx_ptr + out, idx, mask=ok)


def slice_topk(z: Tensor, k: int, dim: int) -> tuple[Tensor, Tensor]:
    """torch.topk(z, k, dim) of a 2-D z (values unchanged, not ReLU'd), in one read of z.

    dim=1: each row's top-k, [B, k]; dim=0: each column's top-k, [k, n].
    """
    z = z.contiguous()
    B, n = z.shape
    KP = next_pow2(k)
    if KP > MAX_FUSED_K:
        return torch.topk(z, k, dim=dim, sorted=False)
    shape = (B, k) if dim == 1 else (k, n)
    values = torch.empty(shape, dtype=z.dtype, device=z.device)
    indices = torch.empty(shape, dtype=torch.int64, device=z.device)
    S, E = (B, n) if dim == 1 else (n, B)
    stride_s, stride_e = (n, 1) if dim == 1 else (1, n)
    out_s, out_k = (k, 1) if dim == 1 else (1, n)
    BLOCK_S = 32 if KP <= 32 else 16
    BLOCK_E = max(64, KP)
    _slice_topk_kernel[(triton.cdiv(S, BLOCK_S),)](
        z, values, indices, S, E, stride_s, stride_e, out_s, out_k, k,
        LOG_K=_log2(KP), LOG_E=_log2(BLOCK_E), BLOCK_S=BLOCK_S,
    )  # fmt: skip
    return values, indices
