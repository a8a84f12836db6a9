"""Reference kernels in plain torch: the specification every other backend must match.

The TopK encoder never lets autograd see the dense [B, d_sae] pre-activations: its
backward touches only the selected latents (a sparse-times-dense product for grad W_enc,
an embedding-bag for grad x), which is what makes a CPU training step cost one GEMM
instead of three. The decoder is an embedding-bag (Gao et al. 2024, arXiv 2406.04093, §D).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def scatter_rows(indices: Tensor, weights: Tensor, rows: Tensor, n_out: int) -> Tensor:
    """out[i] = Σ_{(b, j): indices[b, j] = i} weights[b, j] · rows[b], i.e. Sᵀ·rows.

    indices, weights: [B, K]; rows: [B, D]. Returns [n_out, D].
    """
    B, K = indices.shape
    if rows.device.type == "cpu" and rows.dtype == torch.bfloat16:
        # Accumulated in fp32 (more exact), rounded once.
        return scatter_rows(indices, weights, rows.float(), n_out).to(rows.dtype)
    if rows.device.type == "cpu":
        # Sᵀ as an uncoalesced COO matrix, as in _scatter_csr. Not the CSR S (K entries a
        # row) and `S.t() @ rows`, which converts Sᵀ to CSR first, sorting all B·K entries:
        # a TopK step at d_in 512, d_sae 4096, B 4096, k 32 on 2 threads took 1.6 s with
        # it, 1.1 s with this.
        bag = torch.arange(B, device=indices.device)[:, None].expand(B, K).reshape(-1)
        St = torch.sparse_coo_tensor(
            torch.stack([indices.reshape(-1), bag]),
            weights.reshape(-1).to(rows.dtype),
            (n_out, B),
            check_invariants=False,
        )
        return torch.sparse.mm(St, rows)
    w = weights.to(rows.dtype)
    # One slot at a time: [B, D] of scratch, never a [B·K, D] copy of the rows (tens of
    # GB at d_in 2304 with AuxK).
    out = torch.zeros(n_out, rows.shape[1], dtype=rows.dtype, device=rows.device)
    for j in range(K):
        out.index_add_(0, indices[:, j], w[:, j, None] * rows)
    return out


def row_dots(indices: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """out[b, j] = table[indices[b, j]] · rows[b], [B, K], without a [B, K, D] gather."""
    B, K = indices.shape
    op = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
    if op is not None:
        offsets = torch.arange(0, B * K, K, device=indices.device)
        bag = torch.arange(B, device=indices.device).repeat_interleave(K)
        return op(rows, table, indices.reshape(-1), offsets, bag, 0, -1).view(B, K)
    return torch.einsum("bkd,bd->bk", table[indices], rows)


def host_reads_are_free(t: Tensor) -> bool:
    """Whether reading t's values on the host costs nothing: true on the CPU, where there
    is no queue of kernels to drain; on an accelerator a read stalls it (a host sync)."""
    return t.device.type == "cpu"


def aux_mask_is_empty(mask: Tensor | None, k_aux: int, like: Tensor) -> bool:
    """No auxiliary candidates can exist. Decided from shapes alone off the CPU (an
    accelerator would stall to read the mask; its kernels then work on a zero-padded code)."""
    if mask is None or k_aux <= 0:
        return True
    return host_reads_are_free(like) and not bool(mask.any())


def _masked_topk(z: Tensor, k: int, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k of ReLU(z) over the latents where mask is True (columns), in global latent ids.

    On the CPU the masked columns are gathered first ([B, min(k, #mask)], the cheap way when
    few latents are dead). Elsewhere the shape may not depend on the mask, so the others are
    set to −inf and the code is [B, min(k, n)], zero-padded when fewer than k are masked.
    """
    if not host_reads_are_free(z):
        kk = min(k, z.shape[1])
        vals, cols = torch.topk(z.masked_fill(~mask, float("-inf")), kk, dim=1, sorted=False)
        return vals.relu(), cols
    cols = mask.nonzero().squeeze(1)
    kk = min(k, cols.numel())
    vals, local = torch.topk(z.index_select(1, cols), kk, dim=1, sorted=False)
    return vals.relu(), cols[local]


Selector = Callable[[Tensor], tuple[Tensor, Tensor]]
"""Maps pre-activations z [B, n] to (values [B, K], indices [B, K]); a zero value is padding."""


def topk_selector(k: int) -> Selector:
    def select(z: Tensor) -> tuple[Tensor, Tensor]:
        values, indices = row_topk(z, k)
        return values.relu_(), indices

    return select


class SparseEncode(torch.autograd.Function):
    """z = (x − b_dec) W_encᵀ + b_enc; (values, indices) = select(z), plus optional AuxK.

    Returns (values, indices, aux_values, aux_indices). The aux pair is the top-k_aux of
    ReLU(z) over latents where aux_mask is True ([B, 0] when no mask is given). Gradients
    reach x, W_enc, b_enc and b_dec through both value tensors, touching only selected
    latents; selected values that are zero (ReLU-clipped or padding) pass no gradient.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, select, aux_mask, k_aux):  # type: ignore[override]
        x_c = x - b_dec
        z = torch.addmm(b_enc, x_c, W_enc.T)
        values, indices = select(z)
        if not aux_mask_is_empty(aux_mask, k_aux, z):
            aux_values, aux_indices = _masked_topk(z, k_aux, aux_mask)
        else:
            aux_values = z.new_zeros(z.shape[0], 0)
            aux_indices = indices.new_zeros(z.shape[0], 0)
        ctx.save_for_backward(x_c, W_enc, values, indices, aux_values, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _gi, grad_aux, _gai):  # type: ignore[override]
        x_c, W_enc, values, indices, aux_values, aux_indices = ctx.saved_tensors
        g = grad_values * (values > 0)
        if aux_indices.numel() and grad_aux is not None:
            g = torch.cat([g, grad_aux * (aux_values > 0)], dim=1)
            idx = torch.cat([indices, aux_indices], dim=1)
        else:
            idx = indices
        n = W_enc.shape[0]
        grad_W_enc = scatter_rows(idx, g, x_c, n) if ctx.needs_input_grad[1] else None
        grad_b_enc = (
            torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(
                0, idx.reshape(-1), g.reshape(-1)
            )
            if ctx.needs_input_grad[2]
            else None
        )
        grad_x_c = F.embedding_bag(idx, W_enc, per_sample_weights=g.to(W_enc.dtype), mode="sum")
        grad_x = grad_x_c if ctx.needs_input_grad[0] else None
        grad_b_dec = -grad_x_c.sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None


def sparse_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    select: Selector,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return SparseEncode.apply(x, W_enc, b_enc, b_dec, select, aux_mask, k_aux)  # type: ignore[return-value]


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """a = TopK_k(ReLU(z)) per token (the rule a fused kernel implements in one pass)."""
    return sparse_encode(x, W_enc, b_enc, b_dec, topk_selector(k), aux_mask, k_aux)


class Decode(torch.autograd.Function):
    """x̂ = Σ_j values[b, j] · W_dec[indices[b, j]]: a gather of decoder rows.

    Backward: grad W_dec by a sparse Sᵀ·grad product and grad values by per-row dots, both
    without sorting the indices (the stock embedding-bag backward sorts them).
    """

    @staticmethod
    def forward(ctx, values, indices, W_dec):  # type: ignore[override]
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(
            indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum"
        )

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        values, indices, W_dec = ctx.saved_tensors
        grad_values = (
            row_dots(indices, W_dec, grad).to(values.dtype) if ctx.needs_input_grad[0] else None
        )
        grad_W = (
            scatter_rows(indices, values, grad, W_dec.shape[0]) if ctx.needs_input_grad[2] else None
        )
        return grad_values, None, grad_W


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """x̂ = Σ_i a_i d_i (+ b_dec), never a dense [B, d_sae] code."""
    out = Decode.apply(values, indices, W_dec)
    return out if b_dec is None else out + b_dec


# ---------------------------------------------------------------------------------------
# Batch-level selection: building blocks of the feature- and mutual-choice rules


ROW_TOPK_GROUP = 8
"""row_topk on the CPU: entries per strided group."""


def row_topk(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's k largest entries of z [B, n] (unsorted, not ReLU'd): values, cols [B, k].

    On the CPU, for rows much longer than k, in two steps (exact). A row's n columns form
    m = n/w strided groups {q, q + m, …, q + (w−1)m}, w = ROW_TOPK_GROUP, whose maxima one
    vectorised pass over z gives. The k groups with the largest maxima hold a top k of the
    row: an entry of the top k has at most k − 1 larger entries, so at most k − 1 groups
    have a larger maximum than its own. The top k of those k·w entries is then the row's.
    At [4096, 4096], k 32, on 2 threads: 35 ms against torch.topk's 50 (a TopK step's
    selection). Of entries tied at the k-th value, any may win, as with torch.topk.
    """
    B, n = z.shape
    w = ROW_TOPK_GROUP
    if not host_reads_are_free(z) or n % w or 4 * k * w > n or z.stride(1) != 1:
        return torch.topk(z, k, dim=1, sorted=False)
    m = n // w
    groups = torch.topk(z.view(B, w, m).amax(1), k, dim=1, sorted=False).indices  # [B, k]
    cols = (groups[:, :, None] + torch.arange(0, n, m, device=z.device)).view(B, k * w)
    values, pick = torch.topk(z.gather(1, cols), k, dim=1, sorted=False)
    return values, cols.gather(1, pick)


def column_topk(z: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Each column's m largest entries of z [B, n] (unsorted): values, rows [m, n]."""
    return torch.topk(z, m, dim=0, sorted=False)


def global_topk(
    z: Tensor, K: int, rows_by: Callable[[Tensor, int], tuple[Tensor, Tensor]] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The K largest entries of z [B, n] as (values, rows, cols), exactly, in row-major
    order (rows non-decreasing, each row's columns increasing): a CSR code's order, which
    mutual choice then needs no sort for. Of entries tied at the K-th value, any may win.

    Where host reads are free (the CPU) it thresholds (`_threshold_topk`); elsewhere, or
    given a backend's row top-k `rows_by`, it merges per-row candidates (`_candidate_topk`)
    and sorts them into rows.
    """
    if rows_by is None and host_reads_are_free(z):
        return _threshold_topk(z, K)
    return _row_major(z, *_candidate_topk(z, K, rows_by or row_topk))


def _row_major(z: Tensor, top: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    order = torch.argsort(rows * z.shape[1] + cols)
    return top[order], rows[order], cols[order]


THRESHOLD_SAMPLE = 1 << 18
"""Entries of z that `_threshold_topk` samples to place its threshold (a top-r of this many
costs ~1 ms, and puts the threshold within a few percent of the K-th value)."""


def _threshold_topk(z: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor]:
    """global_topk by a threshold, on the CPU: a strided sample of z puts a bound θ a little
    below the K-th largest value, one pass keeps the entries ≥ θ (row-major, by nonzero),
    and the K-th largest of those few is the exact cut. At d_sae 4096, B 4096, k 32 on one
    thread: ~60 ms against ~220 ms for the per-row candidates (whose row top-4k dominates)
    and the sort that put them in rows. Ties at the K-th value go to the earliest entries.

    Exact whatever the sample: when fewer than K entries pass θ (an unlucky sample, or NaN),
    the candidate merge runs instead.
    """
    B, n = z.shape
    N = B * n
    if K >= N:
        flat = torch.arange(N, device=z.device)
        return z.reshape(-1), torch.div(flat, n, rounding_mode="floor"), flat % n
    stride = max(1, N // THRESHOLD_SAMPLE) | 1  # odd: with n a power of 2, it meets every column
    sample = z.reshape(-1)[::stride]  # a view of a contiguous z, a copy otherwise
    expect = K * sample.numel() / N
    # Sampled entries above the K-th value: ~Binomial, mean `expect`; 4σ of slack.
    r = min(sample.numel(), math.ceil(expect + 4 * math.sqrt(expect) + 16))
    bound = torch.topk(sample, r, sorted=False).values.min()
    rows, cols = torch.nonzero(z >= bound, as_tuple=True)
    M = rows.numel()
    if M < K:
        return _row_major(z, *_candidate_topk(z, K, row_topk))
    values = z[rows, cols]
    if M > K:
        theta = torch.kthvalue(values, M - K + 1).values
        keep = values > theta
        tied = values == theta
        # Exactly K: the earliest of the entries tied at θ fill what the larger ones leave.
        keep |= tied & (torch.cumsum(tied, 0) <= K - keep.sum())
        values, rows, cols = values[keep], rows[keep], cols[keep]
    return values, rows, cols


def _candidate_topk(
    z: Tensor, K: int, rows_by: Callable[[Tensor, int], tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor, Tensor]:
    """global_topk by per-row candidates (any order), for devices where the threshold's
    value-dependent shapes would stall: each row's top-c candidates (c = 4·K/B) go into one
    global top-K, which is far cheaper than a top-K over all B·n entries: its threshold, the
    K-th largest candidate, is found among 4K values instead of B·n. It is exact unless some
    row had all c of its candidates selected (it might hold more winners). Such rows then
    enter whole beside the other rows' candidates (whose unselected ones already bound the
    rest of their row) in a second top-K; only past B/8 such rows does the full top-K over
    B·n run instead.
    """
    B, n = z.shape
    c = min(n, 4 * max(1, K // B))
    if c < n:
        cand, cols = rows_by(z, c)
        top, flat = torch.topk(cand.reshape(-1), K, sorted=False)
        rows = torch.div(flat, c, rounding_mode="floor")
        full = torch.bincount(rows, minlength=B) >= c
        n_full = int(full.sum())
        if n_full == 0:
            return top, rows, cols.reshape(-1)[flat]
        if n_full <= B // 8:
            return _global_topk_refine(z, K, cand, cols, full)
    top, flat = torch.topk(z.reshape(-1), K, sorted=False)
    return top, torch.div(flat, n, rounding_mode="floor"), flat % n


def _global_topk_refine(
    z: Tensor, K: int, cand: Tensor, cols: Tensor, full: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """global_topk's second pass: the top K of the `full` rows' entries and the others'
    candidates (cand, cols [B, c])."""
    n, c = z.shape[1], cand.shape[1]
    part, whole = (~full).nonzero().squeeze(1), full.nonzero().squeeze(1)
    values = torch.cat([cand[part].reshape(-1), z[whole].reshape(-1)])
    rows = torch.cat([part.repeat_interleave(c), whole.repeat_interleave(n)])
    all_cols = torch.arange(n, device=z.device).repeat(whole.numel())
    col = torch.cat([cols[part].reshape(-1), all_cols])
    top, sel = torch.topk(values, K, sorted=False)
    return top, rows[sel], col[sel]


# ---------------------------------------------------------------------------------------
# Ragged (CSR) codes: a per-token count that varies (feature and mutual choice, thresholds,
# adaptive pursuit). values/indices are [nnz], offsets [B + 1]; no row is padded, so the
# decode and backward work is the number of selected entries, not B × the longest row.

RaggedSelector = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
"""Maps pre-activations z [B, n] to a CSR code (values [nnz], indices [nnz], offsets [B+1])."""


def ragged_rows(offsets: Tensor, nnz: int) -> Tensor:
    """[nnz] the row of each entry of a CSR matrix with row starts `offsets` [B + 1]."""
    rows = torch.arange(offsets.numel() - 1, device=offsets.device)
    return torch.repeat_interleave(rows, offsets.diff(), output_size=nnz)


def _scatter_csr(
    offsets: Tensor, indices: Tensor, weights: Tensor, rows: Tensor, n_out: int
) -> Tensor:
    """Sᵀ·rows [n_out, D] for the CSR S [B, n_out] (row starts offsets, entries indices and
    weights [nnz]): scatter_rows for a ragged code."""
    w = weights.to(rows.dtype)
    bag = ragged_rows(offsets, indices.numel())
    if rows.device.type == "cpu":
        # Sᵀ as an uncoalesced COO matrix (latent, token): its product needs no sort, where
        # a CSR S.t() @ rows first converts Sᵀ to CSR, sorting all nnz entries (3× slower
        # at d_sae 4096, nnz 131k); it also covers bf16, which MKL's CSR product does not.
        St = torch.sparse_coo_tensor(
            torch.stack([indices, bag]), w, (n_out, rows.shape[0]), check_invariants=False
        )
        return torch.sparse.mm(St, rows)
    return _index_add_rows(indices, w, rows, bag, n_out)


def _index_add_rows(indices: Tensor, w: Tensor, rows: Tensor, bag: Tensor, n_out: int) -> Tensor:
    """out[indices[p]] += w[p] · rows[bag[p]], B entries at a time: [B, D] of scratch at
    most, never an [nnz, D] copy of the rows."""
    out = torch.zeros(n_out, rows.shape[1], dtype=rows.dtype, device=rows.device)
    step = max(rows.shape[0], 1)
    for p in range(0, indices.numel(), step):
        sl = slice(p, p + step)
        out.index_add_(0, indices[sl], w[sl, None] * rows.index_select(0, bag[sl]))
    return out


def _row_dots_csr(offsets: Tensor, indices: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """out[p] = table[indices[p]] · rows[row of p], [nnz]: row_dots for a ragged code."""
    bag = ragged_rows(offsets, indices.numel())
    op = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
    if op is not None:
        return op(rows, table, indices, offsets[:-1], bag, 0, -1)
    return (table[indices] * rows[bag]).sum(-1)


def _bag_sum(offsets: Tensor, indices: Tensor, weights: Tensor, table: Tensor) -> Tensor:
    """out[b] = Σ_{p in row b} weights[p] · table[indices[p]], [B, D]; empty rows are 0."""
    return F.embedding_bag(
        indices,
        table,
        offsets,
        mode="sum",
        per_sample_weights=weights.to(table.dtype),
        include_last_offset=True,
    )


def ragged_cat(
    offsets: Tensor, values: Tensor, indices: Tensor, pad_values: Tensor, pad_indices: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Row-wise concatenation of a CSR code and a padded [B, K] one, as one CSR code."""
    B, K = pad_indices.shape
    nnz = indices.numel()
    steps = torch.arange(B + 1, device=offsets.device) * K
    out_off = offsets + steps
    pos = torch.arange(nnz, device=offsets.device) + steps[ragged_rows(offsets, nnz)]
    pad_pos = (offsets[1:] + steps[:-1])[:, None] + torch.arange(K, device=offsets.device)
    out_v = values.new_empty(nnz + B * K)
    out_i = indices.new_empty(nnz + B * K)
    out_v[pos], out_v[pad_pos.reshape(-1)] = values, pad_values.reshape(-1).to(values.dtype)
    out_i[pos], out_i[pad_pos.reshape(-1)] = indices, pad_indices.reshape(-1)
    return out_v, out_i, out_off


class RaggedEncode(torch.autograd.Function):
    """SparseEncode for a selector that returns a CSR code.

    Returns (values, indices, offsets, aux_values, aux_indices): the code [nnz] with its row
    starts [B + 1], and the padded AuxK candidates [B, k_aux] (k_aux per token: fixed). The
    backward is SparseEncode's on the concatenated code, so it touches only the nnz + B·k_aux
    selected entries.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, select, aux_mask, k_aux):  # type: ignore[override]
        x_c = x - b_dec
        z = torch.addmm(b_enc, x_c, W_enc.T)
        values, indices, offsets = select(z)
        if aux_mask is not None and k_aux > 0 and bool(aux_mask.any()):
            aux_values, aux_indices = _masked_topk(z, k_aux, aux_mask)
        else:
            aux_values = z.new_zeros(z.shape[0], 0)
            aux_indices = indices.new_zeros(z.shape[0], 0)
        ctx.save_for_backward(x_c, W_enc, values, indices, offsets, aux_values, aux_indices)
        ctx.mark_non_differentiable(indices, offsets, aux_indices)
        return values, indices, offsets, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _gi, _go, grad_aux, _gai):  # type: ignore[override]
        x_c, W_enc, values, indices, offsets, aux_values, aux_indices = ctx.saved_tensors
        g = grad_values * (values > 0)
        idx, off = indices, offsets
        if aux_indices.numel() and grad_aux is not None:
            g, idx, off = ragged_cat(off, g, idx, grad_aux * (aux_values > 0), aux_indices)
        n = W_enc.shape[0]
        grad_W_enc = _scatter_csr(off, idx, g, x_c, n) if ctx.needs_input_grad[1] else None
        grad_b_enc = (
            torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, idx, g)
            if ctx.needs_input_grad[2]
            else None
        )
        grad_x_c = _bag_sum(off, idx, g, W_enc)
        grad_x = grad_x_c if ctx.needs_input_grad[0] else None
        grad_b_dec = -grad_x_c.sum(0) if ctx.needs_input_grad[3] else None
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
    return RaggedEncode.apply(x, W_enc, b_enc, b_dec, select, aux_mask, k_aux)  # type: ignore[return-value]


class RaggedDecode(torch.autograd.Function):
    """x̂[b] = Σ_{p in row b} values[p] · W_dec[indices[p]]; Decode for a CSR code."""

    @staticmethod
    def forward(ctx, values, indices, offsets, W_dec):  # type: ignore[override]
        ctx.save_for_backward(values, indices, offsets, W_dec)
        return _bag_sum(offsets, indices, values, W_dec)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        values, indices, offsets, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = _row_dots_csr(offsets, indices, W_dec, grad).to(values.dtype)
        if ctx.needs_input_grad[3]:
            grad_W = _scatter_csr(offsets, indices, values, grad, W_dec.shape[0])
        return grad_values, None, None, grad_W


def ragged_decode(
    values: Tensor, indices: Tensor, offsets: Tensor, W_dec: Tensor, b_dec: Tensor | None
) -> Tensor:
    """x̂ = Σ_i a_i d_i (+ b_dec) of a CSR code."""
    out = RaggedDecode.apply(values, indices, offsets, W_dec)
    return out if b_dec is None else out + b_dec
