"""Training: Adam on FVU + an auxiliary loss, decoder kept unit-norm, exact resume, sweeps.

Recipe from Gao et al. 2024 (arXiv 2406.04093): tied init, b_dec at the geometric median,
decoder-gradient projection, AuxK on dead latents with α = 1/32 scaled by
min(#dead / k_aux, 1) as in EleutherAI's sparsify. mutual_choice uses aux_zipf instead
(Ayonrinde 2024, arXiv 2411.02124; see `zipf_deficit`).

A sweep trains several SAEs on one read of the activations: every batch goes to each SAE
in turn. The data stream is a pure function of (seed, rows consumed) and a checkpoint
holds everything else, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saelab import __version__, kernels
from saelab.archs import ARCHS, TRAINABLE, ArchSpec, EncodeArgs, Encoding, feature_choice_m
from saelab.config import SAEConfig, TrainConfig
from saelab.errors import UserError
from saelab.fields import to_dict
from saelab.models import resolve_device
from saelab.runs import CHECKPOINT, LOG, atomic_write, prepare_run_dir, trim_log, writer_lock
from saelab.sae import SparseCoder
from saelab.store import ActivationStore

log = logging.getLogger(__name__)


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
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"step": str(step)}))


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


def lr_at(step: int, n_steps: int, base: float, cfg: TrainConfig) -> float:
    """The learning rate at `step`: linear warmup to `base` (the member's own rate, which
    depends on its width), flat, then a linear decay to 0 over the last lr_decay_frac."""
    if step < cfg.lr_warmup_steps:
        return base * (step + 1) / cfg.lr_warmup_steps
    decay_start = int(n_steps * (1 - cfg.lr_decay_frac))
    if cfg.lr_decay_frac > 0 and step >= decay_start:
        return base * (n_steps - step) / max(n_steps - decay_start, 1)
    return base


def zipf_deficit(freq: torch.Tensor, exponent: float) -> torch.Tensor:
    """aux_zipf weights: (t − f)/t for latents firing below their Zipf target t, else 0.

    Latents are ranked by their firing-frequency EMA f; the target at rank r is
    t_r ∝ r^-exponent, normalised so that Σt = Σf. The paper's exact formula could not be
    recovered from its text; this is the principled version of docs/algorithms.md §4.
    """
    n = freq.numel()
    rank = torch.empty(n, dtype=freq.dtype, device=freq.device)
    rank[torch.argsort(freq, descending=True, stable=True)] = torch.arange(
        1, n + 1, dtype=freq.dtype, device=freq.device
    )
    target = rank.pow(-exponent)
    target = target * freq.sum() / target.sum()
    return ((target - freq) / target.clamp_min(1e-12)).clamp(0, 1) * (freq < target)


@dataclass
class Member:
    """One SAE of a sweep (a single run is a sweep of one), with everything it trains with."""

    out: Path
    plan: dict[str, Any]
    sae: SparseCoder
    opt: torch.optim.Optimizer
    step: int = 0
    since_fired: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    """[d_sae] tokens since each latent last fired."""
    freq: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    """[d_sae] EMA of each latent's firing frequency per token."""
    logf: Any = None
    wandb: Any = None

    @property
    def spec(self) -> ArchSpec:
        return self.sae.spec

    def counters(self) -> dict[str, torch.Tensor]:
        return {"since_fired": self.since_fired, "freq": self.freq}


# ---------------------------------------------------------------------------------------
# Planning: every check happens here, before anything is written.


def _check_arch(s: SAEConfig, cfg: TrainConfig, store: ActivationStore) -> ArchSpec:
    if s.arch not in ARCHS:
        raise UserError(f"unknown arch '{s.arch}'; valid: {', '.join(ARCHS)}")
    spec = ARCHS[s.arch]
    if not spec.trainable:
        raise UserError(
            f"arch {s.arch} is inference-only (it labels SAEs imported from SAELens); train "
            f"one of {', '.join(TRAINABLE)}"
        )
    if spec.needs_grads and not store.has_grads:
        raise UserError(
            f"{s.arch} needs gradients but harvest {store.path} has none; "
            "harvest them with `saelab harvest --grads`"
        )
    if s.arch == "feature_choice" and (s.k * cfg.batch_size) // s.d_sae < 1:
        raise UserError(
            f"feature_choice gives each latent m = ⌊k·batch_size/d_sae⌋ = "
            f"⌊{s.k}·{cfg.batch_size}/{s.d_sae}⌋ = 0 tokens per batch; "
            "raise --sae.k or --batch_size, or lower --sae.d_sae"
        )
    return spec


def _member_name(s: SAEConfig) -> str:
    return f"{s.arch}-{s.d_sae}-k{s.k}" + ("" if s.aux == "default" else f"-{s.aux}")


def _plans(cfg: TrainConfig, store: ActivationStore) -> list[tuple[Path, dict[str, Any]]]:
    """(run directory, cfg.json contents) for each SAE to train."""
    train_range, eval_range = split_ranges(store, cfg.eval_tokens)
    n_tokens = cfg.n_tokens or (train_range[1] - train_range[0])
    saes = cfg.sweep or [cfg.sae]
    base = (
        Path(cfg.out)
        if cfg.out
        else Path("runs")
        / (f"{Path(cfg.harvest).name}-" + ("sweep" if cfg.sweep else _member_name(cfg.sae)))
    )
    names = [_member_name(s) for s in saes]
    plans = []
    for i, s in enumerate(saes):
        spec = _check_arch(s, cfg, store)
        name = names[i] if names.count(names[i]) == 1 else f"{names[i]}-{i}"
        member_cfg = dataclasses.replace(cfg, sae=s, sweep=[])
        plans.append(
            (
                base / name if cfg.sweep else base,
                {
                    "saelab_version": __version__,
                    "harvest": str(Path(cfg.harvest).resolve()),
                    "harvest_identity": {
                        "n_tokens": store.n_tokens,
                        "tokens_sha256": store.meta["tokens_sha256"],
                    },
                    "hook": store.hook,
                    "model": store.meta.get("model"),
                    # What exports describe the training data with, should the harvest go.
                    "n_ctx": store.n_ctx,
                    "corpus": store.meta.get("corpus"),
                    "train_range": list(train_range),
                    "eval_range": list(eval_range),
                    "n_steps": max(1, n_tokens // cfg.batch_size),
                    "lr": member_cfg.resolved_lr(),
                    "k_aux": cfg.k_aux or store.d_in // 2,
                    "aux_loss": spec.aux if s.aux == "default" else s.aux,
                    "feature_choice_m": feature_choice_m(s.k, cfg.batch_size, s.d_sae),
                    "train": to_dict(member_cfg),
                },
            )
        )
    return plans


# ---------------------------------------------------------------------------------------
# One step


def _aux_loss(
    m: Member,
    enc: Encoding,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    weights: torch.Tensor | None,
    n_aux: int,
    cfg: TrainConfig,
) -> torch.Tensor:
    """AuxK-style: reconstruct the residual from the auxiliary latents' code."""
    assert enc.aux is not None
    e = (x - x_hat).detach()
    values = enc.aux.values if weights is None else enc.aux.values * weights[enc.aux.indices]
    e_hat = kernels.decode(values, enc.aux.indices, m.sae.W_dec, None)
    loss = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return loss * cfg.auxk_alpha * min(n_aux / m.plan["k_aux"], 1.0)


def _train_step(
    m: Member, x: torch.Tensor, grad: torch.Tensor | None, cfg: TrainConfig
) -> dict[str, float]:
    sae = m.sae
    dead = m.since_fired >= cfg.dead_tokens
    n_dead = int(dead.sum())
    weights = None
    if m.plan["aux_loss"] == "zipf":
        weights = zipf_deficit(m.freq, cfg.zipf_exponent)
        aux_mask = weights > 0
    else:
        aux_mask = dead
    n_aux = int(aux_mask.sum())
    args = EncodeArgs(True, aux_mask if n_aux else None, m.plan["k_aux"], grad)
    enc = sae.encode_scaled(x, args)
    x_hat = sae.decode_scaled(enc.code)
    fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    aux = _aux_loss(m, enc, x, x_hat, weights, n_aux, cfg) if enc.aux is not None else None
    m.opt.zero_grad(set_to_none=True)
    (fvu if aux is None else fvu + aux).backward()
    sae.project_decoder_grad()
    m.opt.step()
    sae.normalize_decoder()
    with torch.no_grad():
        values, indices = enc.code.values, enc.code.indices  # [B, K] or ragged [nnz]
        counts = torch.bincount(indices[values > 0], minlength=sae.d_sae)
        m.since_fired += x.shape[0]
        m.since_fired[counts > 0] = 0
        rate = counts.to(m.freq.dtype) / x.shape[0]
        m.freq.copy_(rate if m.step == 0 else m.freq.lerp(rate, 1 - cfg.freq_decay))
        l0 = float((values > 0).sum()) / x.shape[0]
    # Read once, after the step was queued: a non-finite loss stops training here, before
    # anything of this step is saved (checkpoints also refuse non-finite weights).
    fvu_value, aux_value = fvu.item(), 0.0 if aux is None else aux.item()
    if not math.isfinite(fvu_value + aux_value):
        raise _diverged(m, f"the loss is {fvu_value + aux_value}")
    m.step += 1
    return {
        "fvu": fvu_value,
        "aux": aux_value,
        "l0": l0,
        "dead_frac": n_dead / sae.d_sae,
    }


# ---------------------------------------------------------------------------------------
# Setting up and running


def _init_scale_and_median(
    store: ActivationStore, cfg: TrainConfig, train_range: list[int], device: torch.device
) -> tuple[float, torch.Tensor]:
    sample = store.sample(
        cfg.scale_sample, seed=cfg.seed, token_range=(train_range[0], train_range[1])
    )
    sample = sample.to(device, torch.float32)
    scale = math.sqrt(store.d_in / float(sample.pow(2).sum(1).mean()))
    return scale, geometric_median(sample * scale)


def _make_member(
    out: Path,
    plan: dict,
    old: dict | None,
    scale: float,
    median: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
) -> Member:
    s = SAEConfig(**plan["train"]["sae"])
    torch.manual_seed(cfg.seed)
    if old:  # the scale is part of the run: keep the one it was trained with
        scale = float(old["input_scale"])
    sae = SparseCoder(median.shape[0], s.d_sae, s.k, s.arch, scale, device, beta=s.beta)
    with torch.no_grad():
        sae.b_dec.copy_(median)
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(
        params, lr=plan["lr"], betas=cfg.betas, fused=device.type in ("cpu", "cuda")
    )
    m = Member(out, plan, sae, opt)
    m.since_fired = torch.zeros(s.d_sae, dtype=torch.int64, device=device)
    m.freq = torch.zeros(s.d_sae, dtype=torch.float32, device=device)
    if (out / CHECKPOINT).exists():
        m.step, counters = load_checkpoint(out / CHECKPOINT, sae, opt, device)
        m.since_fired.copy_(counters["since_fired"])
        m.freq.copy_(counters["freq"])
        log.info("resuming %s from step %d", out, m.step)
    return m


def _diverged(m: Member, what: str) -> UserError:
    return UserError(
        f"{m.out}: training diverged at step {m.step} ({what}; lr={m.plan['lr']:.3g}), likely "
        "from a learning rate too high or non-finite activations in the harvest; the last "
        f"checkpoint is kept. Lower --lr and train into another --out (or delete {m.out})"
    )


def _check_finite(m: Member) -> None:
    """Refuse to write non-finite weights (a step can overflow them with a finite loss)."""
    for name, p in m.sae.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise _diverged(m, f"{name} is no longer finite")


def _log_step(m: Member, stats: dict[str, float], cfg: TrainConfig, rate: float) -> None:
    row = {
        "step": m.step,
        "tokens": m.step * cfg.batch_size,
        **stats,
        "lr": m.opt.param_groups[0]["lr"],
        "tokens_per_s": rate,
    }
    m.logf.write(json.dumps(row) + "\n")
    m.logf.flush()
    if m.wandb is not None:
        m.wandb.log(row, step=m.step)


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train the SAE (or the sweep of SAEs) of cfg; resume from checkpoints where they exist.

    Returns the run directory (for a sweep, the directory holding one run per SAE).
    """
    if not cfg.harvest:
        raise UserError("no harvest given; pass --harvest cached_activations/<name>")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    store = ActivationStore(cfg.harvest, cfg.hook or None)
    plans = _plans(cfg, store)
    with contextlib.ExitStack() as locks:
        for out, _ in plans:
            locks.enter_context(writer_lock(out))
        return _train(cfg, store, plans, device, progress)


def _train(
    cfg: TrainConfig,
    store: ActivationStore,
    plans: list[tuple[Path, dict[str, Any]]],
    device: torch.device,
    progress: bool,
) -> Path:
    olds = [prepare_run_dir(out, plan) for out, plan in plans]
    todo = [(o, p, old) for (o, p), old in zip(plans, olds) if not (old and old.get("complete"))]
    root = plans[0][0].parent if cfg.sweep else plans[0][0]
    if not todo:
        log.info("%s is already trained; nothing to do", root)
        return root

    plan0 = todo[0][1]
    scale, median = _init_scale_and_median(store, cfg, plan0["train_range"], device)
    members = [_make_member(o, p, old, scale, median, cfg, device) for o, p, old in todo]
    for m in members:
        m.out.mkdir(parents=True, exist_ok=True)
        m.sae.save(m.out, {**m.plan, "complete": False})
        trim_log(m.out / LOG, m.step)
        m.logf = open(m.out / LOG, "a")  # noqa: SIM115 - closed in _finish
        m.wandb = _wandb_init(cfg, m.out, m.plan)
    try:
        _run(members, store, cfg, device, progress)
    finally:
        for m in members:
            m.logf.close()
            if m.wandb is not None:
                m.wandb.finish()
    for m in members:
        _check_finite(m)
        save_checkpoint(m.out / CHECKPOINT, m.sae, m.opt, m.step, m.counters())
        dead = int((m.since_fired >= cfg.dead_tokens).sum())
        m.sae.save(m.out, {**m.plan, "complete": True, "dead_latents": dead})
    return root


def _run(
    members: list[Member],
    store: ActivationStore,
    cfg: TrainConfig,
    device: torch.device,
    progress: bool,
) -> None:
    n_steps = members[0].plan["n_steps"]
    start = min(m.step for m in members)
    grads = any(m.spec.needs_grads for m in members)
    stream = store.batches(
        cfg.batch_size,
        token_range=tuple(members[0].plan["train_range"]),
        seed=cfg.seed,
        start_row=start * cfg.batch_size,
        shuffle_buffer=cfg.shuffle_buffer,
        grads=grads,
    )
    name = members[0].out.name if len(members) == 1 else f"sweep of {len(members)}"
    bar = tqdm(
        total=n_steps,
        initial=start,
        unit="step",
        disable=not progress,
        desc=f"train {name}",
        dynamic_ncols=True,
    )
    t0, step = time.perf_counter(), start
    try:
        for batch in stream:
            if step >= n_steps:
                break
            x, g = batch if isinstance(batch, tuple) else (batch, None)
            x = x.to(device, non_blocking=True)
            g = g.to(device, non_blocking=True) if g is not None else None
            rate = (step + 1 - start) * cfg.batch_size / (time.perf_counter() - t0)
            for m in members:
                if m.step != step:  # resumed ahead of the others: it has done this batch
                    continue
                for group in m.opt.param_groups:
                    group["lr"] = lr_at(m.step, n_steps, m.plan["lr"], cfg)
                xs = x * m.sae.input_scale
                stats = _train_step(m, xs, g if m.spec.needs_grads else None, cfg)
                if m.step % cfg.log_every == 0 or m.step == n_steps:
                    _log_step(m, stats, cfg, rate)
                    if len(members) == 1:
                        bar.set_postfix(
                            fvu=f"{stats['fvu']:.3f}",
                            dead=f"{stats['dead_frac']:.1%}",
                            tok_s=f"{rate:,.0f}",
                        )
                if cfg.checkpoint_every and m.step % cfg.checkpoint_every == 0:
                    _check_finite(m)
                    save_checkpoint(m.out / CHECKPOINT, m.sae, m.opt, m.step, m.counters())
            step += 1
            bar.update(1)
    finally:
        bar.close()
        stream.close()


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
