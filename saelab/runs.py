"""The run directory: what makes two runs the same, checkpoints, and the training log.

runs/<name>/
  cfg.json           SAE shape and arch, input scale, hook, harvest, row ranges, the full
                     training config, "complete"
  sae.safetensors    weights (and inference thresholds) only
  train_log.jsonl    one JSON object per logged step
  checkpoints/state.safetensors
                     weights, Adam moments, dead-latent counters, firing-frequency EMA;
                     the step in its metadata. One file, replaced atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from saelab.config import TrainConfig, to_dict
from saelab.errors import UserError
from saelab.sae import CFG, SparseCoder

CHECKPOINT = "checkpoints/state.safetensors"
LOG = "train_log.jsonl"
# Fields that do not change what a run computes; any other difference makes another run.
_RUNTIME_ONLY = {
    "out",
    "device",
    "threads",
    "wandb",
    "wandb_project",
    "wandb_mode",
    "checkpoint_every",
    "log_every",
}


def _with_defaults(given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A config dict with fields added since it was written filled in at their defaults,
    so that runs from an older saelab still count as the same run."""
    out = dict(given)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def signature(plan: dict[str, Any]) -> dict[str, Any]:
    train = _with_defaults(plan["train"], to_dict(TrainConfig()))
    train = {k: v for k, v in train.items() if k not in _RUNTIME_ONLY}
    return {"harvest": plan["harvest"], "hook": plan["hook"], **train}


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, prefix + key + ".")
        elif va != vb:
            out.append(f"{prefix}{key} {vb!r} vs {va!r}")
    return out


def prepare_run_dir(out: Path, plan: dict[str, Any]) -> dict[str, Any] | None:
    """The existing cfg.json when `out` holds this same run; an error when it holds another."""
    if not out.exists():
        return None
    cfg_path = out / CFG
    if not cfg_path.is_file():
        if any(out.iterdir()):
            raise UserError(f"{out} exists and is not a saelab run; choose another --out")
        return None
    try:
        old = json.loads(cfg_path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{cfg_path} is damaged; delete {out} or choose another --out") from None
    differences = _diff(signature(plan), signature(old)) if "train" in old else ["(foreign)"]
    if differences:
        raise UserError(
            f"{out} already holds a different run (existing vs asked: "
            f"{'; '.join(differences[:3])}); choose another --out or delete it"
        )
    return old


# ---------------------------------------------------------------------------------------
# Checkpoints: one safetensors file, scalars in its metadata, written atomically.


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"step": str(step)}
    )
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, sae: SparseCoder, opt: torch.optim.Optimizer, device: torch.device
) -> tuple[int, dict[str, torch.Tensor]]:
    """Restore weights and optimizer state in place; return (step, counters)."""
    try:
        with safe_open(str(path), "pt") as f:
            step = int((f.metadata() or {})["step"])
        tensors = load_file(str(path), device=str(device))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets the same advice
        raise UserError(
            f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to restart the run"
        ) from None
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    for name, p in sae.named_parameters():
        s = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"opt.{name}.")}
        if s:
            if "step" in s:
                s["step"] = s["step"].cpu()
            opt.state[p] = s
    return step, {k[6:]: v for k, v in tensors.items() if k.startswith("state.")}


def trim_log(path: Path, step: int) -> None:
    """Keep only log lines up to the checkpoint, so a resume never duplicates them."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for ln in lines:
        try:
            if json.loads(ln)["step"] <= step:
                kept.append(ln)
        except (json.JSONDecodeError, KeyError):
            break  # a line cut by a kill: drop it and everything after
    path.write_text("".join(ln + "\n" for ln in kept))
