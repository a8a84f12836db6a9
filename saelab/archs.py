"""Selection rules: how an SAE picks which latents fire for each token.

Each rule is one function registered in `ARCHS` (and named in the `Arch` Literal; a test
keeps the two equal). A rule receives the SAE and a batch of *scaled* activations and
returns the sparse code, plus, during training, the AuxK candidates among dead latents.
The trainer, evaluation and CLI discover rules from `ARCHS` alone.

- topk: a = TopK_k(ReLU(z)) per token (Gao et al. 2024, arXiv 2406.04093).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, NamedTuple

from torch import Tensor

from saelab import kernels

if TYPE_CHECKING:
    from saelab.sae import SparseCoder


class SparseCode(NamedTuple):
    """A batch of sparse codes, kept sparse: row b has latents indices[b] firing at values[b]."""

    values: Tensor
    """[B, K] activations of the selected latents (a zero is padding and decodes to nothing)."""

    indices: Tensor
    """[B, K] int64 latent ids."""


class Encoding(NamedTuple):
    code: SparseCode
    """The code the reconstruction uses."""

    aux: SparseCode | None
    """Training only: the top-k_aux dead latents for the AuxK loss (None when no latent is dead)."""


class EncodeArgs(NamedTuple):
    training: bool = False
    """Training mode (batch-level rules select over the batch; inference uses thresholds)."""

    dead_mask: Tensor | None = None
    """[d_sae] bool, latents currently dead (for AuxK)."""

    k_aux: int = 0
    """Dead latents to select for AuxK."""


ArchFn = Callable[["SparseCoder", Tensor, EncodeArgs], Encoding]


def topk(sae: SparseCoder, x: Tensor, args: EncodeArgs) -> Encoding:
    values, indices, aux_values, aux_indices = kernels.topk_encode(
        x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k, args.dead_mask, args.k_aux
    )
    aux = SparseCode(aux_values, aux_indices) if aux_indices.shape[1] else None
    return Encoding(SparseCode(values, indices), aux)


Arch = Literal["topk"]

ARCHS: dict[str, ArchFn] = {
    "topk": topk,
}
