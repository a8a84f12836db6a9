"""Kernel backend, chosen once at import.

`eager` (plain torch, the reference and the CPU path) is always available. Fused Triton
kernels plug in here when CUDA and Triton are present; `SAELAB_DISABLE_TRITON=1` forces
eager, and `use_backend()` overrides the choice in tests.
"""

from __future__ import annotations

import logging
import os

from saelab.kernels import eager

log = logging.getLogger(__name__)

_BACKENDS = {"eager": eager}


def _pick() -> str:
    if os.environ.get("SAELAB_DISABLE_TRITON") == "1":
        return "eager"
    # NOTE: no Triton kernels are registered yet, so every device uses eager; the
    # fused encoder/decoder register themselves in _BACKENDS when they land.
    return "eager"


BACKEND = _pick()
log.debug("saelab kernels: %s backend", BACKEND)


def use_backend(name: str) -> None:
    """Force a backend (tests and benchmarks)."""
    global BACKEND
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; available: {sorted(_BACKENDS)}")
    BACKEND = name


def topk_encode(*args, **kwargs):
    return _BACKENDS[BACKEND].topk_encode(*args, **kwargs)


def sparse_encode(*args, **kwargs):
    return _BACKENDS[BACKEND].sparse_encode(*args, **kwargs)


def decode(*args, **kwargs):
    return _BACKENDS[BACKEND].decode(*args, **kwargs)
