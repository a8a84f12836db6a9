"""Training: Adam on FVU + AuxK, decoder kept unit-norm, dead latents tracked, exact resume.

Recipe from Gao et al. 2024 (arXiv 2406.04093): tied init, b_dec at the geometric median,
decoder-gradient projection, AuxK on dead latents with α = 1/32 scaled by
min(#dead / k_aux, 1) as in EleutherAI's sparsify. A checkpoint holds the weights, the
Adam moments, the dead-latent counters and the step; the data stream is a pure function
of (seed, rows consumed), so a resumed run ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saelab import __version__, kernels
from saelab.archs import ARCHS, EncodeArgs
from saelab.config import TrainConfig, to_dict
from saelab.errors import UserError
from saelab.sae import CFG, SparseCoder
from saelab.store import ActivationStore

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/state.safetensors"
LOG = "train_log.jsonl"
# Fields that change how a run computes; a different value means a different run.
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for but no CUDA device is visible; use --device cpu")
    return torch.device(name)


Range = tuple[int, int]


def split_ranges(store: ActivationStore, eval_tokens: int) -> tuple[Range, Range]:
    """(train rows, held-out rows): the last eval_tokens rows, cut at a context boundary."""
    n, tpc = store.n_tokens, store.tokens_per_context
    cut = ((n - eval_tokens) // tpc) * tpc if eval_tokens else n
    if cut <= 0:
        raise UserError(
            f"eval_tokens={eval_tokens} leaves no training tokens in a harvest of {n}; "
            "lower --eval_tokens or harvest more tokens"
        )
    return (0, cut), (cut, n)


def geometric_median(x: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Weiszfeld's algorithm, started at the mean."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(1e-6)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < 1e-6 * y.norm().clamp_min(1e-6):
            return y_new
        y = y_new
    return y


def lr_at(step: int, n_steps: int, cfg: TrainConfig) -> float:
    base = cfg.resolved_lr()
    if step < cfg.lr_warmup_steps:
        return base * (step + 1) / cfg.lr_warmup_steps
    decay_start = int(n_steps * (1 - cfg.lr_decay_frac))
    if cfg.lr_decay_frac > 0 and step >= decay_start:
        return base * (n_steps - step) / max(n_steps - decay_start, 1)
    return base


@dataclass
class TrainState:
    step: int
    since_fired: torch.Tensor
    """[d_sae] tokens since each latent last fired."""


# ---------------------------------------------------------------------------------------
# The run directory


def _plan(cfg: TrainConfig, store: ActivationStore) -> dict[str, Any]:
    if cfg.sae.arch not in ARCHS:
        raise UserError(f"unknown arch '{cfg.sae.arch}'; valid: {', '.join(ARCHS)}")
    train_range, eval_range = split_ranges(store, cfg.eval_tokens)
    n_tokens = cfg.n_tokens or (train_range[1] - train_range[0])
    n_steps = max(1, n_tokens // cfg.batch_size)
    return {
        "saelab_version": __version__,
        "harvest": str(Path(cfg.harvest).resolve()),
        "hook": store.hook,
        "model": store.meta.get("model"),
        "train_range": list(train_range),
        "eval_range": list(eval_range),
        "n_steps": n_steps,
        "lr": cfg.resolved_lr(),
        "k_aux": cfg.k_aux or store.d_in // 2,
        "train": to_dict(cfg),
    }


def _signature(plan: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in plan["train"].items() if k not in _RUNTIME_ONLY}
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


def _prepare_run_dir(out: Path, plan: dict[str, Any]) -> dict[str, Any] | None:
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
    differences = _diff(_signature(plan), _signature(old)) if "train" in old else ["(foreign)"]
    if differences:
        raise UserError(
            f"{out} already holds a different run (existing vs asked: "
            f"{'; '.join(differences[:3])}); choose another --out or delete it"
        )
    return old


# ---------------------------------------------------------------------------------------
# Checkpoints: one safetensors file, scalars in its metadata, written atomically.


def _save_checkpoint(
    path: Path, sae: SparseCoder, opt: torch.optim.Optimizer, state: TrainState
) -> None:
    tensors = {f"sae.{k}": v.detach().cpu() for k, v in sae.state_dict().items()}
    names = {id(p): n for n, p in sae.named_parameters()}
    for p, s in opt.state.items():
        for key, v in s.items():
            tensors[f"opt.{names[id(p)]}.{key}"] = torch.as_tensor(v).detach().cpu().clone()
    tensors["since_fired"] = state.since_fired.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(tmp),
        metadata={"step": str(state.step)},
    )
    os.replace(tmp, path)


def _load_checkpoint(
    path: Path, sae: SparseCoder, opt: torch.optim.Optimizer, device: torch.device
) -> TrainState:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        step = int((f.metadata() or {})["step"])
    tensors = load_file(str(path), device=str(device))
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    params = dict(sae.named_parameters())
    for name, p in params.items():
        s = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"opt.{name}.")}
        if s:
            if "step" in s:
                s["step"] = s["step"].cpu()
            opt.state[p] = s
    return TrainState(step, tensors["since_fired"])


def _trim_log(path: Path, step: int) -> None:
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


# ---------------------------------------------------------------------------------------


def _train_step(
    sae: SparseCoder,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    state: TrainState,
    cfg: TrainConfig,
    k_aux: int,
) -> dict[str, float]:
    dead = state.since_fired >= cfg.dead_tokens
    n_dead = int(dead.sum())
    enc = sae.encode_scaled(x, EncodeArgs(True, dead if n_dead else None, k_aux))
    x_hat = sae.decode_scaled(enc.code)
    fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    loss, auxk = fvu, torch.zeros(())
    if enc.aux is not None:
        e = (x - x_hat).detach()
        e_hat = kernels.decode(enc.aux.values, enc.aux.indices, sae.W_dec, None)
        auxk = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        loss = loss + cfg.auxk_alpha * min(n_dead / k_aux, 1.0) * auxk
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.project_decoder_grad()
    opt.step()
    sae.normalize_decoder()
    with torch.no_grad():
        values, indices = enc.code
        fired = torch.bincount(indices[values > 0], minlength=sae.d_sae) > 0
        state.since_fired += x.shape[0]
        state.since_fired[fired] = 0
        l0 = float((values > 0).sum()) / x.shape[0]
    state.step += 1
    return {"fvu": fvu.item(), "auxk": auxk.item(), "l0": l0, "dead_frac": n_dead / sae.d_sae}


def _default_out(cfg: TrainConfig) -> Path:
    s = cfg.sae
    return Path("runs") / f"{Path(cfg.harvest).name}-{s.arch}-{s.d_sae}-k{s.k}"


def _init_sae(
    store: ActivationStore,
    cfg: TrainConfig,
    plan: dict,
    device: torch.device,
) -> SparseCoder:
    sample = store.sample(cfg.scale_sample, seed=cfg.seed, token_range=tuple(plan["train_range"]))
    sample = sample.to(device, torch.float32)
    scale = math.sqrt(store.d_in / float(sample.pow(2).sum(1).mean()))
    torch.manual_seed(cfg.seed)
    sae = SparseCoder(store.d_in, cfg.sae.d_sae, cfg.sae.k, cfg.sae.arch, scale, device)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample * scale))
    return sae


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train one SAE from cfg; resumes from the run directory's checkpoint when there is one."""
    if not cfg.harvest:
        raise UserError("no harvest given; pass --harvest cached_activations/<name>")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    store = ActivationStore(cfg.harvest, cfg.hook or None)
    plan = _plan(cfg, store)
    out = Path(cfg.out) if cfg.out else _default_out(cfg)
    old = _prepare_run_dir(out, plan)
    if old and old.get("complete"):
        log.info("%s is already trained; nothing to do", out)
        return out

    sae = _init_sae(store, cfg, plan, device)
    if old:  # the scale is part of the run: keep the one the checkpoint was trained with
        sae.input_scale = float(old["input_scale"])
    opt = torch.optim.Adam(
        sae.parameters(), lr=plan["lr"], betas=cfg.betas, fused=device.type in ("cpu", "cuda")
    )
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        state = _load_checkpoint(ckpt, sae, opt, device)
        log.info("resuming %s from step %d", out, state.step)
    else:
        state = TrainState(0, torch.zeros(sae.d_sae, dtype=torch.int64, device=device))
    out.mkdir(parents=True, exist_ok=True)
    sae.save(out, {**plan, "complete": False})
    _trim_log(out / LOG, state.step)

    wb = _wandb_init(cfg, out, plan)
    n_steps, k_aux = plan["n_steps"], plan["k_aux"]
    stream = store.batches(
        cfg.batch_size,
        token_range=tuple(plan["train_range"]),
        seed=cfg.seed,
        start_row=state.step * cfg.batch_size,
        shuffle_buffer=cfg.shuffle_buffer,
    )
    bar = tqdm(
        total=n_steps,
        initial=state.step,
        unit="step",
        disable=not progress,
        desc=f"train {out.name}",
        dynamic_ncols=True,
    )
    t0, tokens0 = time.perf_counter(), state.step * cfg.batch_size
    try:
        with open(out / LOG, "a") as logf:
            for x in stream:
                if state.step >= n_steps:
                    break
                for g in opt.param_groups:
                    g["lr"] = lr_at(state.step, n_steps, cfg)
                x = x.to(device, non_blocking=True).mul_(sae.input_scale)
                stats = _train_step(sae, opt, x, state, cfg, k_aux)
                bar.update(1)
                if state.step % cfg.log_every == 0 or state.step == n_steps:
                    tokens = state.step * cfg.batch_size
                    rate = (tokens - tokens0) / (time.perf_counter() - t0)
                    row = {
                        "step": state.step,
                        "tokens": tokens,
                        **stats,
                        "lr": opt.param_groups[0]["lr"],
                        "tokens_per_s": rate,
                    }
                    logf.write(json.dumps(row) + "\n")
                    logf.flush()
                    bar.set_postfix(
                        fvu=f"{stats['fvu']:.3f}",
                        dead=f"{stats['dead_frac']:.1%}",
                        tok_s=f"{rate:,.0f}",
                    )
                    if wb is not None:
                        wb.log(row, step=state.step)
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    _save_checkpoint(ckpt, sae, opt, state)
    finally:
        bar.close()
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        if wb is not None:
            wb.finish()
    _save_checkpoint(ckpt, sae, opt, state)
    sae.save(
        out,
        {
            **plan,
            "complete": True,
            "dead_latents": int((state.since_fired >= cfg.dead_tokens).sum()),
        },
    )
    return out


def _wandb_init(cfg: TrainConfig, out: Path, plan: dict) -> Any:
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package; pip install wandb") from None
    return wandb.init(
        project=cfg.wandb_project,
        mode=cfg.wandb_mode,
        name=out.name,
        id=out.name,
        resume="allow",
        dir=str(out),
        config=plan,
    )
