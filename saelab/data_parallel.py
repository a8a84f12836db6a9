"""Data-parallel training's collectives (ALGORITHMS.md §9): N processes each train on B/N rows
of every global batch of B and end every step with identical weights, as one process on B
would (up to float summation order).

- Losses: each process's loss is its rows' squared error over the *global* denominator
  Σ‖x − x̄‖² (x̄ the global batch mean), so the gradients summed over processes are the
  global loss's; the logged figures and the firing counts are global too.
- Gradients: one flat all-reduce of every parameter's gradient per step, before the decoder
  projection and Adam.
- Setup: rank 0 writes every file; `on_main` runs a step on it alone and raises its
  UserError on every process, so none is left waiting in a collective.

The batch-level selection rules take their share in `saelab.archs` (`EncodeArgs.dist`); the
data plan in `saelab.stream.PartOfBatches`. With `distributed.SINGLE` nothing here is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from saelab.distributed import Dist
from saelab.errors import UserError
from saelab.stream import split_error

T = TypeVar("T")


def check_split(batch_size: int, dist: Dist) -> None:
    """Refuse a global batch that does not split evenly (raised alike on every process)."""
    if batch_size % dist.world:
        raise split_error(batch_size, dist.world)


def on_main(dist: Dist, device: torch.device, fn: Callable[[], T]) -> T | None:
    """fn() on rank 0 while the others wait (their result: None); a UserError there is
    raised on every process with rank 0's message."""
    if not dist.active:
        return fn()
    out, err = None, b""
    if dist.main:
        try:
            out = fn()
        except UserError as e:
            err = str(e).encode()
    size = dist.broadcast_(torch.tensor([len(err)], device=device))
    if int(size):
        text = torch.zeros(int(size), dtype=torch.uint8, device=device)
        if dist.main:
            text.copy_(torch.frombuffer(bytearray(err), dtype=torch.uint8))
        raise UserError(bytes(dist.broadcast_(text).cpu().tolist()).decode())
    return out


def broadcast_tensors_(dist: Dist, tensors: list[Tensor]) -> None:
    """Rank 0's values of same-dtype `tensors`, in place on every process, in one broadcast."""
    if not dist.active:
        return
    flat = dist.broadcast_(torch.cat([t.detach().reshape(-1) for t in tensors]))
    with torch.no_grad():
        for t, v in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(v.view_as(t))


def all_reduce_grads(params: list[Tensor], dist: Dist) -> None:
    """Sum every parameter's gradient over the processes: one flat all-reduce, not one per
    tensor (a parameter without a gradient counts as zeros, so every process sends the same
    layout)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = dist.all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def _centered(s: Tensor, ss: Tensor, n: int | Tensor) -> Tensor:
    """Σ‖v − v̄‖² from Σv and Σ‖v‖² over n rows."""
    return ss - s.pow(2).sum() / n


def global_losses(
    x: Tensor,
    x_hat: Tensor,
    fit: tuple[Tensor, Tensor] | None,
    counts: Tensor,
    shift: Tensor,
    dist: Dist,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor]:
    """(fvu, aux, fvu_global, aux_global, counts_global) for this process's rows x of a
    global batch. fvu and aux are this process's differentiable shares: its squared errors
    over the global denominators, which sum over processes to the global FVUs (fvu_global,
    aux_global, detached, the same on every process). fit = (e, ê): the residual x − x̂
    (detached) and its auxiliary reconstruction; counts: [d_sae] firings in these rows.

    One all-reduce, in float64, of Σ(x − c), Σ‖x − c‖², the errors, the residual's sums and
    the counts. The shift c (b_dec, identical on every process) keeps Σ‖x − c‖² − B‖x̄ − c‖²
    well conditioned where activations share a large mean.
    """
    n, d = x.shape[0] * dist.world, x.shape[1]
    xc = x - shift
    err = (x_hat - x).pow(2).sum()
    pieces = [xc.sum(0), xc.pow(2).sum()[None], err.detach()[None]]
    aux_err = None
    if fit is not None:
        e, e_hat = fit
        aux_err = (e_hat - e).pow(2).sum()
        # Its rows too: the auxiliary loss may run on a subset of each process's (aux_every).
        rows = e.new_full((1,), e.shape[0])
        pieces += [e.sum(0), e.pow(2).sum()[None], aux_err.detach()[None], rows]
    sums = dist.all_reduce_(torch.cat([p.double() for p in [*pieces, counts]]))
    den = _centered(sums[:d], sums[d], n)
    fvu, fvu_global = err / den.to(err.dtype), (sums[d + 1] / den).float()
    aux = aux_global = None
    if aux_err is not None:
        at = d + 2
        aux_den = _centered(sums[at : at + d], sums[at + d], sums[at + d + 2])
        aux = aux_err / aux_den.to(aux_err.dtype)
        aux_global = (sums[at + d + 1] / aux_den).float()
    return fvu, aux, fvu_global, aux_global, sums[-counts.numel() :].round().long()
