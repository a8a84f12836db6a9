"""Selection rules: how an SAE picks which latents fire for each token.

Each rule is one `ArchSpec` registered in `ARCHS` (and named in `saelab.config.Arch`, the
Literal that types `--sae.arch`; a test keeps the two equal). A rule receives the SAE and a
batch of *scaled* activations and returns the sparse code, plus, during training, the
candidates for the auxiliary loss. The trainer, evaluation and CLI discover rules from
`ARCHS` alone. In data-parallel training (`EncodeArgs.dist`) each process encodes its slice
of the global batch, and the batch-level rules select over the global batch
(ALGORITHMS.md §9): mutual choice's threshold and feature choice's per-latent thresholds
from all-gathered candidates, g-SAE's gradient RMS from an all-reduce.

- topk: a = TopK_k(ReLU(z)) per token (Gao et al. 2024, arXiv 2406.04093).
- gradient_topk (g-SAE, Olmo et al., arXiv 2411.10397): select by
  ReLU(z_i)·(1 + β|d_i·ĝ|), ĝ = g / RMS_batch(g), g = ∂CE/∂x; keep ReLU(z) at the
  selected latents. We follow docs/algorithms.md §2 for the score; without g (new text)
  the rule falls back to plain TopK.
- feature_choice (Ayonrinde 2024, arXiv 2411.02124): each latent keeps its top
  m = max(1, ⌊k·B/n⌋) tokens of the batch; inference uses per-latent thresholds θ_j,
  an EMA of the m-th largest value of column j (a JumpReLU).
- mutual_choice (Ayonrinde 2024; = BatchTopK, Bussmann et al., arXiv 2412.06410): the
  top k·B entries of the whole batch; inference uses one threshold θ, an EMA of the
  smallest selected value. Its auxiliary loss is aux_zipf (see trainer.py).
- matching_pursuit (Costa et al., arXiv 2506.03093): no encoder; k greedy,
  non-negative pursuit steps over the unit-norm rows of W_dec. A latent is chosen at
  most once per token (no repeats), so a code is a set and L0 = steps taken. Inference
  may stop early once ‖r‖ ≤ tol·‖x − b_dec‖ (adaptive sparsity).
- jumprelu (Rajamanoharan et al. 2024, arXiv 2407.14435): a_i = z_i·[z_i > θ_i] with
  fixed per-latent thresholds; θ = 0 is the plain ReLU SAE. Inference only: it labels SAEs
  imported from SAELens (its `jumprelu` and `standard` architectures), which saelab cannot
  train (no sparsity penalty or threshold gradient here), so the trainer refuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor

from saelab import kernels, pursuit
from saelab.distributed import SINGLE, Dist
from saelab.kernels.eager import _masked_topk, aux_mask_is_empty, ragged_rows

if TYPE_CHECKING:
    from saelab.sae import SparseCoder

THRESHOLD_EMA = 0.05
"""Weight of the newest batch in the inference-threshold EMAs."""


class SparseCode(NamedTuple):
    """A batch of sparse codes, kept sparse: row b has latents indices[b] firing at values[b]."""

    values: Tensor
    """[B, K] activations of the selected latents (a zero is padding and decodes to nothing)."""

    indices: Tensor
    """[B, K] int64 latent ids."""


class RaggedCode(NamedTuple):
    """A batch of codes whose per-token count varies, in CSR form: token b's latents are
    indices[offsets[b]:offsets[b + 1]], firing at the same slice of values.

    The batch-level rules (feature and mutual choice, thresholds) and adaptive pursuit
    produce it: a few tokens take many latents, and padding every row to the longest would
    multiply the decode and backward work by max/mean count.
    """

    values: Tensor
    """[nnz] activations (a zero decodes to nothing and passes no gradient)."""

    indices: Tensor
    """[nnz] int64 latent ids."""

    offsets: Tensor
    """[B + 1] int64 row starts into values/indices; offsets[0] = 0, offsets[B] = nnz."""


Code = SparseCode | RaggedCode
"""Either code form; the decoder and every consumer accept both (`to_padded` converts)."""


class Encoding(NamedTuple):
    code: Code
    """The code the reconstruction uses."""

    aux: SparseCode | None
    """Training only: the auxiliary-loss candidates (None when there are none)."""


def to_padded(code: Code) -> SparseCode:
    """A padded [B, max count] code (at least one column) of either form; zeros pad."""
    if isinstance(code, SparseCode):
        return code
    values, indices, offsets = code
    B = offsets.numel() - 1
    width = max(int(offsets.diff().max()) if B else 0, 1)
    rows = ragged_rows(offsets, indices.numel())
    slot = torch.arange(rows.numel(), device=rows.device) - offsets[rows]
    out_i = torch.zeros(B, width, dtype=torch.int64, device=indices.device)
    out_v = torch.zeros(B, width, dtype=values.dtype, device=values.device)
    out_i[rows, slot] = indices
    out_v[rows, slot] = values
    return SparseCode(out_v, out_i)


def from_padded(code: SparseCode) -> RaggedCode:
    """The CSR form of a padded code, dropping zero slots (padding or ReLU-clipped)."""
    keep = code.values != 0
    offsets = torch.zeros(keep.shape[0] + 1, dtype=torch.int64, device=keep.device)
    torch.cumsum(keep.sum(1), 0, out=offsets[1:])
    return RaggedCode(code.values[keep], code.indices[keep], offsets)


class EncodeArgs(NamedTuple):
    training: bool = False
    """Training mode: batch-level rules select over the batch and update their thresholds."""

    aux_mask: Tensor | None = None
    """[d_sae] bool, latents eligible for the auxiliary loss (dead or under-used)."""

    k_aux: int = 0
    """Auxiliary latents to select per token."""

    grad: Tensor | None = None
    """[B, d_in] ∂CE/∂x for gradient_topk (None: plain TopK selection)."""

    mp_tol: float = 0.0
    """matching_pursuit inference: stop once ‖r‖ ≤ mp_tol·‖x − b_dec‖ (0: always k steps)."""

    mp_max_steps: int = 0
    """matching_pursuit inference: step limit with mp_tol (0: k)."""

    dist: Dist = SINGLE
    """Data-parallel training: x is this process's slice of a global batch of
    x.shape[0]·dist.world rows, over which the batch-level rules select (ALGORITHMS.md §9)."""


ArchFn = Callable[["SparseCoder", Tensor, EncodeArgs], Encoding]


@dataclass(frozen=True)
class ArchSpec:
    encode: ArchFn
    """The rule."""

    threshold: Literal["none", "latent", "global"] = "none"
    """Shape of the inference threshold buffer the SAE keeps for this rule."""

    needs_grads: bool = False
    """Training reads ∂CE/∂x from the harvest."""

    uses_encoder: bool = True
    """False when W_enc and b_enc are unused (matching pursuit)."""

    aux: Literal["auxk", "zipf"] = "auxk"
    """Auxiliary loss: AuxK on dead latents, or aux_zipf on under-used ones."""

    trainable: bool = True
    """False for inference-only rules (jumprelu): the trainer refuses them."""


def _encoding(values: Tensor, indices: Tensor, aux_values: Tensor, aux_indices: Tensor) -> Encoding:
    aux = SparseCode(aux_values, aux_indices) if aux_indices.shape[1] else None
    return Encoding(SparseCode(values, indices), aux)


def _encoder(sae: SparseCoder, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x, W_enc, b_enc, b_dec) in the SAE's compute dtype."""
    return tuple(sae.compute(t) for t in (x, sae.W_enc, sae.b_enc, sae.b_dec))  # type: ignore[return-value]


def _encode_with(sae: SparseCoder, x: Tensor, args: EncodeArgs, select) -> Encoding:
    return _encoding(*kernels.sparse_encode(*_encoder(sae, x), select, args.aux_mask, args.k_aux))


def _encode_ragged(sae: SparseCoder, x: Tensor, args: EncodeArgs, select) -> Encoding:
    values, indices, offsets, aux_values, aux_indices = kernels.ragged_encode(
        *_encoder(sae, x), select, args.aux_mask, args.k_aux
    )
    aux = SparseCode(aux_values, aux_indices) if aux_indices.shape[1] else None
    return Encoding(RaggedCode(values, indices, offsets), aux)


def aux_candidates(sae: SparseCoder, x: Tensor, mask: Tensor, k_aux: int) -> SparseCode | None:
    """The auxiliary loss's code on its own rows x: the top-k_aux of ReLU(z) among the
    latents of `mask`, differentiable as an encoding is (None when none can exist). For an
    auxiliary loss on a subset of the batch, which a selection over every row would waste."""
    if aux_mask_is_empty(mask, k_aux, x) or not sae.spec.uses_encoder:
        return None
    select = lambda z: _masked_topk(z, k_aux, mask)  # noqa: E731
    values, indices, _, _ = kernels.sparse_encode(*_encoder(sae, x), select)
    return SparseCode(values, indices)


def mask_to_ragged(
    z: Tensor, rows: Tensor, cols: Tensor, relu: bool = True, row_sorted: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Entries (rows[i], cols[i]) of ReLU(z) (of z itself without `relu`) as a CSR code
    (values, indices, offsets), each row's entries in their given order. `row_sorted`:
    rows is already non-decreasing (torch.nonzero's order), so no sort is needed."""
    B = z.shape[0]
    if not row_sorted:
        order = torch.argsort(rows, stable=True)
        rows, cols = rows[order], cols[order]
    offsets = torch.zeros(B + 1, dtype=torch.int64, device=z.device)
    torch.cumsum(torch.bincount(rows, minlength=B), 0, out=offsets[1:])
    picked = z[rows, cols]
    return picked.relu() if relu else picked, cols, offsets


def mask_to_code(z: Tensor, rows: Tensor, cols: Tensor, relu: bool = True) -> tuple[Tensor, Tensor]:
    """Entries (rows[i], cols[i]) of ReLU(z) (of z itself without `relu`) as a padded
    per-token code [B, max count]."""
    return tuple(to_padded(RaggedCode(*mask_to_ragged(z, rows, cols, relu))))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# The rules


def topk(sae: SparseCoder, x: Tensor, args: EncodeArgs) -> Encoding:
    # Its own kernel entry point: the rule a fused top-k encoder implements in one pass.
    return _encoding(*kernels.topk_encode(*_encoder(sae, x), sae.k, args.aux_mask, args.k_aux))


GRADIENT_TOPK_TILE = 8192
"""Latents scored at a time by gradient_topk: its [B, tile] temporaries stay bounded."""


def gradient_topk(sae: SparseCoder, x: Tensor, args: EncodeArgs) -> Encoding:
    if args.grad is None:
        return topk(sae, x, args)
    with torch.no_grad():
        g = args.grad.to(x.dtype)
        g_hat = sae.compute(g / _global_rms(g, args.dist).clamp_min(1e-12))
        W_dec = sae.compute(sae.W_dec.detach())

    def select(z: Tensor) -> tuple[Tensor, Tensor]:
        # Score ReLU(z_i)·(1 + β|d_i·ĝ|) one tile of latents at a time, keeping a running
        # top-k: the only [B, d_sae] matrix is the encoder's z.
        k, n = sae.k, z.shape[1]
        best_s = best_i = None
        with torch.no_grad():
            for j0 in range(0, n, GRADIENT_TOPK_TILE):
                j1 = min(n, j0 + GRADIENT_TOPK_TILE)
                boost = (g_hat @ W_dec[j0:j1].T).abs_().mul_(sae.beta).add_(1)
                score = boost.mul_(z[:, j0:j1].relu())
                s, i = kernels.row_topk(score, min(k, j1 - j0))
                if best_s is None or best_i is None:
                    best_s, best_i = s, i + j0
                    continue
                best_s, pick = torch.topk(torch.cat([best_s, s], 1), k, dim=1, sorted=False)
                best_i = torch.cat([best_i, i + j0], 1).gather(1, pick)
        assert best_i is not None
        return z.gather(1, best_i).relu(), best_i

    return _encode_with(sae, x, args, select)


def _global_rms(g: Tensor, dist: Dist) -> Tensor:
    """RMS of g over the global batch (one all-reduce of Σg² under data parallelism)."""
    if not dist.active:
        return g.pow(2).mean().sqrt()
    return (dist.all_reduce_(g.float().pow(2).sum()) / (g.numel() * dist.world)).sqrt()


def _thresholded(z: Tensor, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    rows, cols = torch.nonzero(z > theta, as_tuple=True)
    return mask_to_ragged(z, rows, cols, row_sorted=True)


def _ema_(buf: Tensor, new: Tensor) -> None:
    """buf ← new while it is unset (NaN), else its EMA; decided on the device (no sync)."""
    new = new.to(buf.dtype)  # a bf16 z's threshold, in the buffer's float32
    buf.copy_(torch.where(torch.isnan(buf).all(), new, buf.lerp(new, THRESHOLD_EMA)))


def feature_choice(sae: SparseCoder, x: Tensor, args: EncodeArgs) -> Encoding:
    if not args.training:
        return _encode_ragged(sae, x, args, lambda z: _thresholded(z, sae.threshold.clamp_min(0)))
    B, dist = x.shape[0], args.dist
    m = feature_choice_m(sae.k, B * dist.world, sae.d_sae)

    def select(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if dist.active:
            return _feature_choice_global(sae, z, m, dist)
        top, rows = kernels.column_topk(z, m)  # [m, n]: each latent's m tokens
        with torch.no_grad():
            _ema_(sae.threshold, top.min(0).values.relu())
        cols = torch.arange(z.shape[1], device=z.device).expand(m, -1)
        return mask_to_ragged(z, rows.reshape(-1), cols.reshape(-1))

    return _encode_ragged(sae, x, args, select)


def _feature_choice_global(
    sae: SparseCoder, z: Tensor, m: int, dist: Dist
) -> tuple[Tensor, Tensor, Tensor]:
    """Each latent's top-m tokens of the global batch, of which this rank keeps its own: a
    rank holds at most min(m, B_local) of them, so its column top-min(m, B_local) are its
    candidates, and the m-th largest of everyone's is each latent's threshold."""
    with torch.no_grad():
        top, rows = kernels.column_topk(z, min(m, z.shape[0]))
        theta = torch.topk(dist.all_gather(top), m, dim=0, sorted=False).values.min(0).values
        _ema_(sae.threshold, theta.relu())
        keep = top >= theta
    cols = torch.arange(z.shape[1], device=z.device).expand_as(rows)
    return mask_to_ragged(z, rows[keep], cols[keep])


def feature_choice_m(k: int, batch: int, d_sae: int) -> int:
    return max(1, (k * batch) // d_sae)


def mutual_choice(sae: SparseCoder, x: Tensor, args: EncodeArgs) -> Encoding:
    if not args.training:
        return _encode_ragged(sae, x, args, lambda z: _thresholded(z, sae.threshold.clamp_min(0)))

    dist = args.dist

    def select(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if dist.active:
            return _mutual_choice_global(sae, z, dist)
        top, rows, cols = kernels.global_topk(z, sae.k * z.shape[0])  # in row-major order
        with torch.no_grad():
            _ema_(sae.threshold, top.min().relu().reshape(1))
        return _row_major_code(top, rows, cols, z.shape[0])

    return _encode_ragged(sae, x, args, select)


def _mutual_choice_global(sae: SparseCoder, z: Tensor, dist: Dist) -> tuple[Tensor, Tensor, Tensor]:
    """The top k·B_global entries of the global batch, of which this rank keeps its own: at
    most min(k·B_global, its entries) of them are here, so its top that many are its
    candidates, and the (k·B_global)-th largest of everyone's is the threshold."""
    K = sae.k * z.shape[0] * dist.world
    with torch.no_grad():
        top, rows, cols = kernels.global_topk(z, min(K, z.numel()))
        theta = torch.topk(dist.all_gather(top), K, sorted=False).values.min()
        _ema_(sae.threshold, theta.relu().reshape(1))
        keep = top >= theta
    return _row_major_code(top[keep], rows[keep], cols[keep], z.shape[0])


def _row_major_code(
    top: Tensor, rows: Tensor, cols: Tensor, B: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The CSR code of the ReLU'd entries top at (rows, cols), given in row-major order as
    global_topk returns them: no sort, no second gather from z, and row starts by a binary
    search of the sorted rows."""
    offsets = torch.searchsorted(rows, torch.arange(B + 1, device=rows.device))
    return top.relu(), cols, offsets


def jumprelu(sae: SparseCoder, x: Tensor, args: EncodeArgs) -> Encoding:
    # No ReLU and no clamp: SAELens's JumpReLU passes z wherever z > θ, so a negative θ
    # (which SAELens allows) lets negative values through there too.
    def select(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rows, cols = torch.nonzero(z > sae.threshold, as_tuple=True)
        return mask_to_ragged(z, rows, cols, relu=False, row_sorted=True)

    return _encode_ragged(sae, x, args, select)


def matching_pursuit(sae: SparseCoder, x: Tensor, args: EncodeArgs) -> Encoding:
    steps = args.mp_max_steps or sae.k
    tol = args.mp_tol if not args.training else 0.0
    G = pursuit.gram(sae.W_dec)  # shared by the selection and the values
    indices = pursuit.mp_select(x.detach() - sae.b_dec.detach(), sae.W_dec.detach(), steps, tol, G)
    vals, live, ids = pursuit.mp_values(x - sae.b_dec, sae.W_dec, indices, G)
    if tol > 0:  # adaptive: the per-token step count varies, so the code is ragged
        offsets = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
        torch.cumsum(live.sum(1), 0, out=offsets[1:])
        return Encoding(RaggedCode(vals[live], ids[live], offsets), None)
    return Encoding(SparseCode(vals, ids), None)


ARCHS: dict[str, ArchSpec] = {
    "topk": ArchSpec(topk),
    "gradient_topk": ArchSpec(gradient_topk, needs_grads=True),
    "feature_choice": ArchSpec(feature_choice, threshold="latent"),
    "mutual_choice": ArchSpec(mutual_choice, threshold="global", aux="zipf"),
    "matching_pursuit": ArchSpec(matching_pursuit, uses_encoder=False),
    "jumprelu": ArchSpec(jumprelu, threshold="latent", trainable=False),
}

TRAINABLE = tuple(name for name, spec in ARCHS.items() if spec.trainable)
"""The rules `saelab train` accepts."""
