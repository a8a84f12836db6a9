"""Training checkpoints: one safetensors file per run (`saelab.runs.CHECKPOINT`) with the
weights, the Adam state and the trainer's per-latent counters, the step in its metadata,
written atomically. Restored on the devices the optimizer reads them from, so a resumed run
on a GPU (fused Adam) continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saelab.errors import UserError
from saelab.runs import atomic_write
from saelab.sae import SparseCoder


def save_checkpoint(
    path: Path,
    sae: SparseCoder,
    opt: torch.optim.Optimizer,
    step: int,
    counters: dict[str, torch.Tensor],
) -> None:
    """Weights, optimizer state and the trainer's per-latent counters at `step`."""
    tensors = {f"sae.{k}": v.detach().cpu() for k, v in sae.state_dict().items()}
    names = {id(p): n for n, p in sae.named_parameters()}
    for p, s in opt.state.items():
        for key, v in s.items():
            tensors[f"opt.{names[id(p)]}.{key}"] = torch.as_tensor(v).detach().cpu().clone()
    tensors.update({f"state.{k}": v.detach().cpu() for k, v in counters.items()})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"step": str(step)}))


def load_checkpoint(
    path: Path,
    sae: SparseCoder,
    opt: torch.optim.Optimizer,
    device: torch.device,
    rows: tuple[int, int] | None = None,
    sharded: Collection[str] = (),
) -> tuple[int, dict[str, torch.Tensor]]:
    """Restore weights and optimizer state in place; return (step, counters).

    rows = (lo, hi): read only latents [lo, hi) of the parameters named in `sharded` (and of
    their Adam state and the per-latent counters), as one latent-parallel rank holds them;
    the rest of those tensors never enters memory.
    """
    try:
        with safe_open(str(path), "pt", device=str(device)) as f:
            step = int((f.metadata() or {})["step"])
            tensors = {k: _read(f, k, rows, sharded) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets the same advice
        raise UserError(
            f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to restart the run"
        ) from None
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    for name, p in sae.named_parameters():
        s = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"opt.{name}.")}
        if s:
            opt.state[p] = {k: v.to(_state_device(opt, p, k)) for k, v in s.items()}
    return step, {k[6:]: v for k, v in tensors.items() if k.startswith("state.")}


def _read(f, key: str, rows: tuple[int, int] | None, sharded: Collection[str]) -> torch.Tensor:
    """Tensor `key` of an open checkpoint, only rows [lo, hi) if it is split by latent."""
    kind, name = key.split(".")[:2]
    per_latent = kind == "state" or (kind in ("sae", "opt") and name in sharded)
    if rows is None or not per_latent or not f.get_slice(key).get_shape():
        return f.get_tensor(key)
    return f.get_slice(key)[rows[0] : rows[1]]


def _state_device(opt: torch.optim.Optimizer, p: torch.Tensor, key: str) -> torch.device:
    """Where `opt` keeps state `key` of parameter p: with p, except Adam's `step` counter,
    which stays on the CPU unless the update runs fused or capturable on p's device (the
    fused CUDA kernel reads it there)."""
    if key != "step":
        return p.device
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    on_device = group.get("fused") or group.get("capturable")
    return p.device if on_device else torch.device("cpu")
