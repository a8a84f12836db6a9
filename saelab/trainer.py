"""Training: Adam on FVU + an auxiliary loss, decoder kept unit-norm, exact resume, sweeps.

Recipe from Gao et al. 2024 (arXiv 2406.04093): tied init, b_dec at the geometric median,
decoder-gradient projection, AuxK on dead latents with α = 1/32 scaled by
min(#dead / k_aux, 1) as in EleutherAI's sparsify. mutual_choice uses aux_zipf instead
(Ayonrinde 2024, arXiv 2411.02124; see `zipf_deficit`).

A sweep trains several SAEs on one read of the activations: every batch goes to each SAE
in turn. The data (a `saelab.sources.ActivationSource`: a harvest, or the model run live on
the corpus) is a pure function of (seed, rows consumed) and a checkpoint holds everything
else, so a resumed run ends with the same weights as an uninterrupted one.

A live run first harvests its held-out set (eval_tokens, from the corpus contexts before the
training ones) with `saelab.harvest`, and records it as its harvest, so evaluation, the index,
dark matter and the app read it as they read any run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab import __version__, kernels, latent_parallel
from saelab.archs import (
    ARCHS,
    TRAINABLE,
    ArchSpec,
    Code,
    EncodeArgs,
    SparseCode,
    aux_candidates,
    feature_choice_m,
)
from saelab.checkpoint import load_checkpoint, save_checkpoint
from saelab.config import DEFAULT_HOOK, HarvestConfig, SAEConfig, TrainConfig
from saelab.data_parallel import (
    all_reduce_grads,
    broadcast_tensors_,
    check_split,
    global_losses,
    on_main,
)
from saelab.distributed import SINGLE, Dist, init, local_device
from saelab.errors import UserError
from saelab.fields import to_dict
from saelab.models import resolve_device
from saelab.runs import CHECKPOINT, LOG, prepare_run_dir, trim_log, writer_lock
from saelab.sae import SparseCoder
from saelab.sources import ActivationSource, LiveSource, StoreSource
from saelab.store import ActivationStore

log = logging.getLogger(__name__)


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
    latents: Dist = field(default_factory=lambda: SINGLE)
    """The processes this SAE's latents are split over (`saelab.latent_parallel`); SINGLE:
    this process holds them all."""
    diverged_at: torch.Tensor = field(default_factory=lambda: torch.full((), -1))
    """The first step whose loss was non-finite (−1: none), kept on the device and read only
    when a log line or a checkpoint is written."""

    @property
    def spec(self) -> ArchSpec:
        return self.sae.spec

    def counters(self) -> dict[str, torch.Tensor]:
        return {"since_fired": self.since_fired, "freq": self.freq}

    @torch.no_grad()
    def advance(self, counts: torch.Tensor, tokens: int, loss: torch.Tensor, cfg: TrainConfig):
        """End a step: the firing counters from counts [d_sae] (rows each latent fired on, of
        `tokens` rows), the step of a first non-finite loss (on the device), the step count."""
        self.since_fired += tokens
        self.since_fired.masked_fill_(counts > 0, 0)
        rate = counts.to(self.freq.dtype) / tokens
        self.freq.copy_(rate if self.step == 0 else self.freq.lerp(rate, 1 - cfg.freq_decay))
        first = ~torch.isfinite(loss) & (self.diverged_at < 0)
        self.diverged_at.copy_(torch.where(first, self.step, self.diverged_at))
        self.step += 1


# ---------------------------------------------------------------------------------------
# Planning: every check happens here, before anything is written.


def _check_arch(s: SAEConfig, cfg: TrainConfig, source: ActivationSource) -> ArchSpec:
    if s.arch not in ARCHS:
        raise UserError(f"unknown arch '{s.arch}'; valid: {', '.join(ARCHS)}")
    spec = ARCHS[s.arch]
    if not spec.trainable:
        raise UserError(
            f"arch {s.arch} is inference-only (it labels SAEs imported from SAELens); train "
            f"one of {', '.join(TRAINABLE)}"
        )
    if spec.needs_grads and not source.has_grads:
        raise UserError(
            f"{s.arch} needs gradients but {source!r} has none; "
            "harvest them with `saelab harvest --grads`, or train live (--model)"
        )
    if s.arch == "feature_choice" and (s.k * cfg.batch_size) // s.d_sae < 1:
        raise UserError(
            f"feature_choice gives each latent m = ⌊k·batch_size/d_sae⌋ = "
            f"⌊{s.k}·{cfg.batch_size}/{s.d_sae}⌋ = 0 tokens per batch; "
            "raise --sae.k or --batch_size, or lower --sae.d_sae"
        )
    return spec


def _aux_of(s: SAEConfig) -> str:
    """The auxiliary loss s trains with: its own, or its rule's default."""
    spec = ARCHS.get(s.arch)
    return spec.aux if s.aux == "default" and spec is not None else s.aux


def _aux_every_of(s: SAEConfig, cfg: TrainConfig) -> int:
    """s's auxiliary loss runs on every n-th token of a batch (cfg.aux_every; 0 is the
    loss's default: ZIPF_AUX_EVERY for aux_zipf, every token for AuxK)."""
    return cfg.aux_every or (ZIPF_AUX_EVERY if _aux_of(s) == "zipf" else 1)


ZIPF_AUX_EVERY = 8
"""aux_zipf's default token stride: about half the latents are below their Zipf target at
every step, so over every token its decode of k_aux candidates would cost k_aux/k times the
code's own (8× at k 32, d_in 512); every 8th token keeps its cost near the code's, and kept
the FVU and firing frequencies in the measurements of docs/algorithms.md §4."""


def _member_name(s: SAEConfig) -> str:
    return f"{s.arch}-{s.d_sae}-k{s.k}" + ("" if s.aux == "default" else f"-{s.aux}")


def _data_keys(
    source: ActivationSource, held: ActivationStore | None, eval_range: Range | None
) -> dict[str, Any]:
    """cfg.json's account of the data. `held` is the harvest holding the held-out rows
    eval_range: the training harvest itself, a live run's own, or None (activations in hand)."""
    if held is None or eval_range is None:
        return {"harvest": "", "hook": source.hook, **source.identity()}
    return {
        "harvest": str(held.path.resolve()),
        "harvest_identity": {
            "n_tokens": held.n_tokens,
            "tokens_sha256": held.meta["tokens_sha256"],
        },
        "hook": source.hook,
        "model": held.meta.get("model"),
        # What exports describe the training data with, should the harvest go.
        "n_ctx": held.n_ctx,
        "corpus": held.meta.get("corpus"),
        **source.identity(),  # train_range, or the live source
        "eval_range": list(eval_range),
    }


def _plans(
    cfg: TrainConfig, source: ActivationSource, data: dict[str, Any]
) -> list[tuple[Path, dict[str, Any]]]:
    """(run directory, cfg.json contents) for each SAE to train on `source`, described by
    `data` (`_data_keys`)."""
    n_tokens = cfg.n_tokens or source.n_tokens
    saes = cfg.sweep or [cfg.sae]
    what = Path(cfg.harvest or cfg.model).name
    what = what if cfg.harvest else "-".join(filter(None, (what, source.hook)))
    base = (
        Path(cfg.out)
        if cfg.out
        else Path("runs") / (f"{what}-" + ("sweep" if cfg.sweep else _member_name(cfg.sae)))
    )
    names = [_member_name(s) for s in saes]
    plans = []
    for i, s in enumerate(saes):
        _check_arch(s, cfg, source)
        name = names[i] if names.count(names[i]) == 1 else f"{names[i]}-{i}"
        member_cfg = dataclasses.replace(cfg, sae=s, sweep=[])
        plans.append(
            (
                base / name if cfg.sweep else base,
                {
                    "saelab_version": __version__,
                    **data,
                    "n_steps": max(1, n_tokens // cfg.batch_size),
                    "lr": member_cfg.resolved_lr(),
                    "k_aux": cfg.k_aux or source.d_in // 2,
                    "aux_loss": _aux_of(s),
                    "aux_every": _aux_every_of(s, cfg),
                    "feature_choice_m": feature_choice_m(s.k, cfg.batch_size, s.d_sae),
                    "train": to_dict(member_cfg),
                },
            )
        )
    return plans


# ---------------------------------------------------------------------------------------
# One step


def aux_rows(B: int, plan: dict[str, Any], dist: Dist = SINGLE) -> slice:
    """The rows of this process's B that the auxiliary loss runs on: the global batch's
    every aux_every-th row, so that data-parallel processes (rank r holding rows r·B, …)
    together take the rows one process would."""
    every = plan.get("aux_every", 1)
    return slice((-dist.rank * B) % every, None, every)


def _aux_fit(
    m: Member, aux: SparseCode, x: torch.Tensor, x_hat: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """AuxK-style: (e, ê), the residual e = x − x̂ (detached) and its reconstruction from
    the auxiliary latents' code `aux` on the same rows (weighted by aux_zipf's deficits)."""
    e = (x - x_hat).detach()
    values = aux.values if weights is None else aux.values * weights[aux.indices]
    c = m.sae.compute
    e_hat = kernels.decode(c(values), aux.indices, c(m.sae.W_dec), None).to(e.dtype)
    return e, e_hat


def _aux_scale(m: Member, n_aux: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """α·min(n_aux/k_aux, 1), with n_aux, the number of eligible latents, on the device: it
    is 0 when none are (the code is then all padding, which only a GPU computes)."""
    return cfg.auxk_alpha * (n_aux / m.plan["k_aux"]).clamp(max=1.0)


def _fired_counts(code: Code, d_sae: int) -> torch.Tensor:
    """[d_sae] int64: how many rows each latent fired on."""
    # index_add_ rather than bincount, which reads its input's max on the host.
    counts = torch.zeros(d_sae, dtype=torch.int64, device=code.indices.device)
    counts.index_add_(0, code.indices.reshape(-1), (code.values > 0).reshape(-1).to(torch.int64))
    return counts


def _train_step(
    m: Member, x: torch.Tensor, grad: torch.Tensor | None, cfg: TrainConfig, dist: Dist = SINGLE
) -> dict[str, torch.Tensor]:
    """One optimizer step. It never waits for the device: its stats come back as device
    tensors, read by `_log_step` on log steps only, and a non-finite loss is recorded in
    m.diverged_at for `_log_step` and `_check_finite` to act on.

    Under data parallelism x is this process's slice of the global batch; the losses,
    gradients, counters and stats are the global batch's (`saelab.data_parallel`); with
    its latents split, x is the whole batch and `saelab.latent_parallel` takes the step."""
    if m.latents.active:
        return latent_parallel.train_step(m, x, cfg, m.latents, grad)
    sae = m.sae
    dead = m.since_fired >= cfg.dead_tokens
    weights = None
    if m.plan["aux_loss"] == "zipf":
        weights = zipf_deficit(m.freq, cfg.zipf_exponent)
        aux_mask = weights > 0
    else:
        aux_mask = dead
    n_aux = aux_mask.sum()
    rows = aux_rows(x.shape[0], m.plan, dist)
    fused = rows.step == 1  # the encode selects the candidates from its own z
    args = EncodeArgs(True, aux_mask if fused else None, m.plan["k_aux"], grad, dist=dist)
    with kernels.matmul_precision(cfg.precision):
        enc = sae.encode_scaled(x, args)
        x_hat = sae.decode_scaled(enc.code)
        aux_code = enc.aux if fused else aux_candidates(sae, x[rows], aux_mask, args.k_aux)
        fit = None
        if aux_code is not None:
            fit = _aux_fit(m, aux_code, x[rows], x_hat[rows], weights)
        counts = _fired_counts(enc.code, sae.d_sae)
        fvu, aux, fvu_all, aux_all, counts = _losses(m, x, x_hat, fit, counts, dist)
        scale = _aux_scale(m, n_aux, cfg)
        m.opt.zero_grad(set_to_none=True)
        (fvu if aux is None else fvu + aux * scale).backward()
    if dist.active:
        all_reduce_grads([p for g in m.opt.param_groups for p in g["params"]], dist)
    sae.project_decoder_grad()
    m.opt.step()
    sae.normalize_decoder()
    B = x.shape[0] * dist.world
    with torch.no_grad():
        aux_value = torch.zeros_like(fvu_all) if aux_all is None else aux_all * scale
    m.advance(counts, B, fvu_all + aux_value, cfg)
    return {
        "fvu": fvu_all,
        "aux": aux_value,
        # float64, as the host's int / int division these figures were once logged with
        "l0": counts.sum(dtype=torch.float64) / B,
        "dead_frac": dead.sum(dtype=torch.float64) / sae.d_sae,
    }


def _losses(
    m: Member,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    fit: tuple[torch.Tensor, torch.Tensor] | None,
    counts: torch.Tensor,
    dist: Dist,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(fvu, aux, fvu to log, aux to log, firing counts): the FVU and the auxiliary fit's
    FVU (unscaled), whose backward gives this process's gradient; what is logged and counted
    is the global batch's (`saelab.data_parallel.global_losses`)."""
    if dist.active:
        return global_losses(x, x_hat, fit, counts, m.sae.b_dec.detach(), dist)
    fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    if fit is None:
        return fvu, None, fvu.detach(), None, counts
    e, e_hat = fit
    aux = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return fvu, aux, fvu.detach(), aux.detach(), counts


# ---------------------------------------------------------------------------------------
# Setting up and running


def _init_scale_and_median(
    source: ActivationSource, cfg: TrainConfig, device: torch.device, dist: Dist
) -> tuple[float, torch.Tensor]:
    """The input scale and b_dec's start, from a sample; rank 0's, on every process (they
    compute the same, but the broadcast makes them bitwise equal whatever the kernels do)."""
    sample = source.sample(cfg.scale_sample, seed=cfg.seed).to(device, torch.float32)
    scale = math.sqrt(source.d_in / float(sample.pow(2).sum(1).mean()))
    median = geometric_median(sample * scale)
    if not dist.active:
        return scale, median
    both = torch.cat([torch.tensor([scale], dtype=torch.float64, device=device), median.double()])
    broadcast_tensors_(dist, [both])
    return float(both[0]), both[1:].float()


def _make_member(
    out: Path,
    plan: dict,
    old: dict | None,
    scale: float,
    median: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    dist: Dist = SINGLE,
) -> Member:
    s = SAEConfig(**plan["train"]["sae"])
    split = cfg.parallel == "latent" and dist.active
    # A latent-split SAE starts whole on the host (seeded alike on every process) and each
    # process keeps its rows on its device.
    home = torch.device("cpu") if split else device
    torch.manual_seed(cfg.seed)
    if old:  # the scale is part of the run: keep the one it was trained with
        scale = float(old["input_scale"])
    sae = SparseCoder(median.shape[0], s.d_sae, s.k, s.arch, scale, home, beta=s.beta)
    sae.compute_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    with torch.no_grad():
        sae.b_dec.copy_(median)
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(
        params, lr=plan["lr"], betas=cfg.betas, fused=home.type in ("cpu", "cuda")
    )
    m = Member(out, plan, sae, opt)
    m.since_fired = torch.zeros(s.d_sae, dtype=torch.int64, device=home)
    m.freq = torch.zeros(s.d_sae, dtype=torch.float32, device=home)
    m.diverged_at = torch.full((), -1, dtype=torch.int64, device=home)
    resume = (out / CHECKPOINT).exists()
    if split:
        m = latent_parallel.shard_member(m, dist, device)
        m.latents = dist
        if resume:  # each process reads its own latents' rows
            latent_parallel.load_checkpoint(out / CHECKPOINT, m, dist)
    elif resume:
        m.step, counters = load_checkpoint(out / CHECKPOINT, sae, opt, device)
        m.since_fired.copy_(counters["since_fired"])
        m.freq.copy_(counters["freq"])
    else:  # seeded alike everywhere; the broadcast rules out any kernel difference
        broadcast_tensors_(dist, [p.data for p in sae.parameters()])
    if resume:
        log.info("resuming %s from step %d", out, m.step)
    return m


def _diverged(m: Member, what: str) -> UserError:
    return UserError(
        f"{m.out}: training diverged at step {m.step} ({what}; lr={m.plan['lr']:.3g}), likely "
        "from a learning rate too high or non-finite activations in the harvest; the last "
        f"checkpoint is kept. Lower --lr and train into another --out (or delete {m.out})"
    )


def _check_loss(m: Member) -> None:
    first = int(m.diverged_at)
    if first >= 0:
        raise _diverged(m, f"the loss was non-finite from step {first + 1}")


def _check_finite(m: Member) -> None:
    """Refuse to write non-finite weights: stop on a non-finite loss seen since the last
    check, or on weights a step overflowed with a finite loss."""
    _check_loss(m)
    if m.latents.active:
        if not latent_parallel.weights_finite(m, m.latents):
            raise _diverged(m, "a weight is no longer finite")
        return
    finite = torch.stack([torch.isfinite(p).all() for _, p in m.sae.named_parameters()])
    if not bool(finite.all()):
        name = [n for n, _ in m.sae.named_parameters()][int(finite.to(torch.uint8).argmin())]
        raise _diverged(m, f"{name} is no longer finite")


def _log_step(
    m: Member, stats: dict[str, Any], cfg: TrainConfig, rate: float, write: bool = True
) -> None:
    """Write a log line, reading `stats` on the host (in place, one sync) and stopping
    first if the loss has been non-finite since the last check (every process checks; only
    the one that `write`s logs)."""
    _check_loss(m)
    if not write:
        return
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in stats.values()])
    stats.update(zip(stats, values.tolist()))
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

    The data is cfg.harvest (cached) or cfg.model run on cfg.corpus (live). Returns the run
    directory (for a sweep, the directory holding one run per SAE).
    """
    if cfg.harvest and cfg.model:
        raise UserError(
            "both --harvest and --model given; pass --harvest to train on a harvest, or --model "
            "(with --corpus and --hooks) to train live without one"
        )
    if not cfg.harvest and not cfg.model:
        raise UserError(
            "no training data given; pass --harvest cached_activations/<name>, or --model <name> "
            "to train live on the corpus"
        )
    device, dist = _join(cfg)
    source, held, eval_range = (_live if cfg.model else _cached)(cfg, device, progress, dist)
    plans = _plans(cfg, source, _data_keys(source, held, eval_range))
    return _locked(cfg, source, plans, device, progress, dist)


def _join(cfg: TrainConfig) -> tuple[torch.device, Dist]:
    """This process's device and place: under torchrun, its own GPU (LOCAL_RANK) in the
    process group, with every check of the split done alike on every process."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = local_device(resolve_device(cfg.device))
    dist = init(device)
    if cfg.parallel == "data":
        check_split(cfg.batch_size, dist)
    else:
        for s in cfg.sweep or [cfg.sae]:
            latent_parallel.check(s.arch, s.d_sae, s.k, dist.world, _aux_of(s))
            if _aux_every_of(s, cfg) != 1:
                raise UserError(
                    f"latent-parallel training computes the auxiliary loss on every token, not "
                    f"every {cfg.aux_every}th; pass --aux_every 1, or --parallel data"
                )
    return device, dist


def train_on(source: ActivationSource, cfg: TrainConfig, progress: bool = True) -> Path:
    """Train cfg's SAEs on any `ActivationSource`, e.g. activations in hand (`ArraySource`);
    cfg.harvest and cfg.model are ignored. Without a held-out harvest the run records no
    eval_range, so eval, the index and the app cannot open it; a live or cached `train` can.
    """
    device, dist = _join(cfg)
    plans = _plans(
        dataclasses.replace(cfg, harvest="", model=""), source, _data_keys(source, None, None)
    )
    return _locked(cfg, source, plans, device, progress, dist)


def _locked(
    cfg: TrainConfig,
    source: ActivationSource,
    plans: list[tuple[Path, dict[str, Any]]],
    device: torch.device,
    progress: bool,
    dist: Dist = SINGLE,
) -> Path:
    with contextlib.ExitStack() as locks:
        on_main(dist, device, lambda: [locks.enter_context(writer_lock(o)) for o, _ in plans])
        return _train(cfg, source, plans, device, progress, dist)


def _cached(
    cfg: TrainConfig, device: torch.device, progress: bool, dist: Dist = SINGLE
) -> tuple[StoreSource, ActivationStore, Range]:
    if cfg.hooks:
        raise UserError(
            "--hooks names the hook of live training (--model); pick a harvest's hook with --hook"
        )
    # Every process reads the same buffers, so rank 0's hashes vouch for all of them, and
    # only it appends to the harvest's record of checked files.
    verify = cfg.verify if dist.main else "off"
    store = ActivationStore(cfg.harvest, cfg.hook or None, verify=verify)
    train_range, eval_range = split_ranges(store, cfg.eval_tokens)
    # On CUDA batches cross in their storage dtype (half the bytes) and become float32 there.
    dtype = StoreSource.storage_dtype(store) if device.type == "cuda" else torch.float32
    return StoreSource(store, train_range, cfg.shuffle_buffer, dtype), store, eval_range


def live_hook(cfg: TrainConfig) -> str:
    """The hook a live run trains on: --hooks, else --hook, else the default hook."""
    hooks = cfg.hooks or [cfg.hook or DEFAULT_HOOK]
    if len(hooks) > 1:
        raise UserError(
            f"live training takes one hook at a time, not {len(hooks)} ({', '.join(hooks)}); "
            "start one saelab train per hook"
        )
    return hooks[0]


def heldout_config(cfg: TrainConfig) -> HarvestConfig:
    """The harvest of a live run's held-out set: the first eval_tokens of its corpus stream,
    which its training skips. Its default folder is named after everything that defines it,
    so runs on the same data share one held-out set."""
    hook = live_hook(cfg)
    h = HarvestConfig(
        model=cfg.model, hooks=[hook], corpus=cfg.corpus, text_field=cfg.text_field,
        split=cfg.split, n_tokens=cfg.eval_tokens, n_ctx=cfg.n_ctx,
        batch_size=cfg.model_batch_size, model_dtype=cfg.model_dtype, seed=cfg.seed,
        device=cfg.device, out=cfg.heldout,
    )  # fmt: skip
    if cfg.heldout:
        return h
    ident = {k: v for k, v in to_dict(h).items() if k not in ("out", "device")}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    out = f"cached_activations/{Path(cfg.model).name}-{hook}-heldout-{digest}"
    return dataclasses.replace(h, out=out)


def _live(
    cfg: TrainConfig, device: torch.device, progress: bool, dist: Dist = SINGLE
) -> tuple[LiveSource, ActivationStore, Range]:
    from saelab.harvest import harvest, n_contexts_for

    if not cfg.n_tokens:
        raise UserError(
            "live training needs a token count (a corpus has no epochs); pass --n_tokens"
        )
    if not cfg.eval_tokens:
        raise UserError(
            "live training harvests eval_tokens held-out tokens for eval, index and the app; "
            "pass --eval_tokens > 0"
        )
    hcfg = heldout_config(cfg)
    source = LiveSource(
        cfg.model, hcfg.hooks[0], n_tokens=cfg.n_tokens, corpus=cfg.corpus,
        text_field=cfg.text_field, split=cfg.split, seed=cfg.seed, n_ctx=cfg.n_ctx,
        skip_contexts=n_contexts_for(hcfg), model_dtype=cfg.model_dtype,
        model_batch_size=cfg.model_batch_size, shuffle_buffer=cfg.shuffle_buffer, device=device,
        dist=dist,
    )  # fmt: skip
    # Every process takes its share of the held-out harvest (rank 0 writes its files).
    held = ActivationStore(harvest(hcfg, progress=progress and dist.main, dist=dist), hcfg.hooks[0])
    return source, held, (0, held.n_tokens)


def _train(
    cfg: TrainConfig,
    source: ActivationSource,
    plans: list[tuple[Path, dict[str, Any]]],
    device: torch.device,
    progress: bool,
    dist: Dist = SINGLE,
) -> Path:
    olds = [prepare_run_dir(out, plan) for out, plan in plans]
    todo = [(o, p, old) for (o, p), old in zip(plans, olds) if not (old and old.get("complete"))]
    root = plans[0][0].parent if cfg.sweep else plans[0][0]
    if not todo:
        log.info("%s is already trained; nothing to do", root)
        return root
    resume = all(old and (o / CHECKPOINT).exists() for o, _, old in todo)
    dist.barrier()  # every process has read the run folders before rank 0 writes to them

    if resume:
        # Every member resumes: its checkpoint holds b_dec and its cfg.json the scale, so the
        # sample (seconds of reading or model forwards) would only stall the start.
        scale, median = 1.0, torch.zeros(source.d_in, device=device)
    else:
        scale, median = _init_scale_and_median(source, cfg, device, dist)
    members = [_make_member(o, p, old, scale, median, cfg, device, dist) for o, p, old in todo]
    if dist.main:
        _open_members(members, cfg)
    try:
        _run(members, source, cfg, device, progress and dist.main, dist)
    finally:
        for m in members:
            if m.logf is not None:
                m.logf.close()
            if m.wandb is not None:
                m.wandb.finish()
    for m in members:
        _check_finite(m)
    # Latent-split members whole on rank 0 (a collective), as one process would hold them.
    whole = [
        latent_parallel.gather_member(m, m.latents) if m.latents.active else m for m in members
    ]
    # Also the barrier that keeps every process until the run is on disk.
    on_main(dist, device, lambda: _finish([m for m in whole if m is not None], source, cfg))
    return root


def _finish(members: list[Member], source: ActivationSource, cfg: TrainConfig) -> None:
    """The final checkpoints and weights (rank 0), once the data is confirmed."""
    source.confirm_pending()
    for m in members:
        save_checkpoint(m.out / CHECKPOINT, m.sae, m.opt, m.step, m.counters())
        dead = int((m.since_fired >= cfg.dead_tokens).sum())
        m.sae.save(m.out, {**m.plan, "complete": True, "dead_latents": dead})


def _open_members(members: list[Member], cfg: TrainConfig) -> None:
    """The files a run writes while it trains (rank 0's alone)."""
    for m in members:
        m.out.mkdir(parents=True, exist_ok=True)
        m.sae.save(m.out, {**m.plan, "complete": False})
        trim_log(m.out / LOG, m.step)
        m.logf = open(m.out / LOG, "a")  # noqa: SIM115 - closed in _train
        m.wandb = _wandb_init(cfg, m.out, m.plan)


def _run(
    members: list[Member],
    source: ActivationSource,
    cfg: TrainConfig,
    device: torch.device,
    progress: bool,
    dist: Dist = SINGLE,
) -> None:
    n_steps = members[0].plan["n_steps"]
    start = min(m.step for m in members)
    grads = any(m.spec.needs_grads for m in members)
    stream = source.batches(
        cfg.batch_size,
        seed=cfg.seed,
        start_row=start * cfg.batch_size,
        grads=grads,
        # latent-parallel: every process sees every batch whole
        part=(dist.rank, dist.world) if cfg.parallel == "data" else (0, 1),
    )
    feed = _DeviceFeed(device)
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
        while step < n_steps:  # never ask for a batch past the last step: a live one costs
            batch = next(stream)  # the forwards of a whole buffer
            x, g = batch if isinstance(batch, tuple) else (batch, None)
            x = feed(x)
            g = feed(g) if g is not None else None
            rate = (step + 1 - start) * cfg.batch_size / (time.perf_counter() - t0)
            for m in members:
                if m.step != step:  # resumed ahead of the others: it has done this batch
                    continue
                for group in m.opt.param_groups:
                    group["lr"] = lr_at(m.step, n_steps, m.plan["lr"], cfg)
                xs = x * m.sae.input_scale
                stats = _train_step(m, xs, g if m.spec.needs_grads else None, cfg, dist)
                if m.step % cfg.log_every == 0 or m.step == n_steps:
                    _log_step(m, stats, cfg, rate, write=dist.main)
                    if len(members) == 1 and dist.main:
                        bar.set_postfix(
                            fvu=f"{stats['fvu']:.3f}",
                            dead=f"{stats['dead_frac']:.1%}",
                            tok_s=f"{rate:,.0f}",
                        )
                if cfg.checkpoint_every and m.step % cfg.checkpoint_every == 0:
                    _checkpoint(m, source, dist)
            step += 1
            bar.update(1)
    finally:
        bar.close()
        stream.close()


def _checkpoint(m: Member, source: ActivationSource, dist: Dist) -> None:
    """Check (on every process) and write (on rank 0, which alone verifies a harvest's
    checksums: its UserError reaches every process) a checkpoint of m; a latent-split m is
    gathered for it, into the file one process would write."""
    _check_finite(m)
    device = m.sae.W_dec.device
    if m.latents.active:
        on_main(dist, device, source.confirm_pending)
        latent_parallel.save_checkpoint(m.out / CHECKPOINT, m, m.latents)
        return

    def write() -> None:
        source.confirm_pending()
        save_checkpoint(m.out / CHECKPOINT, m.sae, m.opt, m.step, m.counters())

    on_main(dist, device, write)


class _DeviceFeed:
    """Batches onto the device as float32, crossing in the dtype they come in (a harvest's
    storage dtype on CUDA: half the bytes of float32).

    To CUDA a host batch goes through one of a few reused pinned buffers, so the copy runs
    asynchronously; a buffer is refilled only once the copy out of it has finished (the CUDA
    event recorded after it), so a batch in flight is never overwritten.
    """

    def __init__(self, device: torch.device, slots: int = 4) -> None:
        self.device, self.slots = device, slots
        self.rings: dict[tuple, list[tuple[torch.Tensor, Any]]] = {}
        self.turn = 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        # Only host batches bound for CUDA need staging ("cuda" and "cuda:0" compare unequal,
        # so the test is by type). No copy at all for float32 already on the device.
        if t.device.type != "cpu" or self.device.type != "cuda":
            return t.to(self.device).float()
        key = (tuple(t.shape), t.dtype)
        if key not in self.rings:
            self.rings[key] = [
                (torch.empty(t.shape, dtype=t.dtype, pin_memory=True), torch.cuda.Event())
                for _ in range(self.slots)
            ]
        pinned, done = self.rings[key][self.turn % self.slots]
        self.turn += 1
        done.synchronize()  # the copy out of this buffer (slots batches ago) has finished
        pinned.copy_(t)
        out = pinned.to(self.device, non_blocking=True)
        done.record()
        return out.float()


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
