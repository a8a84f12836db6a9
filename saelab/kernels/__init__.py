"""Kernel backend, chosen once at import.

`eager` (plain torch, the reference and the CPU path) is always available. The fused
Triton kernels (`triton_select`, `triton_sparse`) are used when CUDA and Triton are both
present; `SAELAB_DISABLE_TRITON=1` forces eager, and `use_backend()` overrides the choice
in tests and benchmarks. Each call still checks its tensors: CPU tensors always take the
eager path (so CPU training never needs Triton) unless the Triton module was loaded under
TRITON_INTERPRET=1, which is how the parity tests run it on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

from saelab.kernels import eager
from saelab.kernels.eager import RaggedSelector, Selector

log = logging.getLogger(__name__)

BACKENDS = ("eager", "triton")
_triton: ModuleType | None = None
_triton_on_cpu = False
"""The Triton kernels were defined under TRITON_INTERPRET=1 and so accept CPU tensors."""


def _load_triton() -> ModuleType:
    """Import the Triton backend (the only place saelab imports triton)."""
    global _triton, _triton_on_cpu
    if _triton is None:
        from saelab.kernels import triton_select, triton_sparse

        _triton, _triton_on_cpu = triton_sparse, triton_select.INTERPRET
    return _triton


def _pick() -> tuple[str, str]:
    if os.environ.get("SAELAB_DISABLE_TRITON") == "1":
        return "eager", "SAELAB_DISABLE_TRITON=1"
    if not torch.cuda.is_available():
        return "eager", "no CUDA device"
    try:
        _load_triton()
    except ImportError as e:
        return "eager", f"triton not importable: {e}"
    return "triton", "CUDA and Triton available"


BACKEND, _why = _pick()
log.info("saelab kernels: %s backend (%s)", BACKEND, _why)


def use_backend(name: str) -> None:
    """Force a backend (tests and benchmarks); 'triton' raises ImportError without Triton."""
    global BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; available: {list(BACKENDS)}")
    if name == "triton":
        _load_triton()
    BACKEND = name


def _impl(t: Tensor) -> ModuleType:
    if BACKEND == "triton" and _triton is not None and (t.is_cuda or _triton_on_cpu):
        return _triton
    return eager


def _ragged_impl(t: Tensor) -> ModuleType:
    if _impl(t) is eager:
        return eager
    from saelab.kernels import triton_ragged

    return triton_ragged


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TopK encoder: (values, indices, aux_values, aux_indices); see eager.topk_encode."""
    return _impl(x).topk_encode(x, W_enc, b_enc, b_dec, k, aux_mask, k_aux)


def sparse_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    select: Selector,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Encoder with any selector of the dense z; see eager.sparse_encode."""
    return _impl(x).sparse_encode(x, W_enc, b_enc, b_dec, select, aux_mask, k_aux)


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None) -> Tensor:
    """x̂ = Σ_i a_i d_i (+ b_dec); see eager.decode."""
    return _impl(values).decode(values, indices, W_dec, b_dec)


def row_topk(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's top-k of z [B, n] (unsorted, not ReLU'd): values, cols [B, k]."""
    return _impl(z).row_topk(z, k)


def column_topk(z: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Each column's top-m of z [B, n] (unsorted): values, rows [m, n]."""
    return _impl(z).column_topk(z, m)


def global_topk(z: Tensor, K: int) -> tuple[Tensor, Tensor, Tensor]:
    """The K largest entries of z as (values, rows, cols); see eager.global_topk."""
    return _impl(z).global_topk(z, K)


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """fp32 matmuls inside the block on TF32 tensor cores when precision is 'tf32', in IEEE
    fp32 otherwise (whatever the process had set); its setting is restored on exit.

    torch's CUDA matmuls and the fused Triton encoder (`triton_select._precision`) both
    read this flag; CPU matmuls ignore it.
    """
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def ragged_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    select: RaggedSelector,
    aux_mask: Tensor | None = None,
    k_aux: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Encoder with a selector returning a CSR code: (values, indices, offsets, aux_values,
    aux_indices); see eager.ragged_encode."""
    return _ragged_impl(x).ragged_encode(x, W_enc, b_enc, b_dec, select, aux_mask, k_aux)


def ragged_decode(
    values: Tensor, indices: Tensor, offsets: Tensor, W_dec: Tensor, b_dec: Tensor | None
) -> Tensor:
    """x̂ = Σ_i a_i d_i (+ b_dec) of a CSR code; see eager.ragged_decode."""
    return _ragged_impl(W_dec).ragged_decode(values, indices, offsets, W_dec, b_dec)
