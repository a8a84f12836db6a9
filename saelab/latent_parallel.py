"""Latent-parallel TopK training: a dictionary too big for one device, split by latents.
Rules: topk and gradient_topk (g-SAE, arXiv 2411.10397).

With N ranks, rank r holds rows [r·n/N, (r+1)·n/N) of W_enc, b_enc and W_dec (and those
latents' Adam state and counters); b_dec is replicated. Every rank sees the SAME full
batch (ALGORITHMS.md §9; the TopK recipe of Gao et al. 2024, arXiv 2406.04093). A step:

1. each rank encodes with its shard (the rule itself, `SparseCoder.encode_scaled`): top-k
   candidates [B, k], plus the AuxK candidates among its dead latents;
2. all-gathers the candidates' keys (topk: the value; gradient_topk: its boosted score
   value·(1 + β|d_i·ĝ|), recomputed for the k candidates, ĝ's RMS being over the batch
   every rank holds whole) and keeps the global top-k per row. Only keys travel: a
   candidate's place in the gathered row names its rank and slot, so the owner
   knows which of its own latents won. Ties cannot change the step: a zero value (ReLU-
   clipped) decodes to nothing, passes no gradient and does not count as firing, whichever
   zero wins; two equal positive fp32 pre-activations need two latents with identical
   encoder rows and biases, which training does not produce. (In bf16, with its 8-bit
   mantissa, equal values do occur: either latent is then a valid top-k, and which one wins
   may differ from one process's choice, as it already does between torch.topk and the
   Triton kernel, neither of which specifies its tie order);
3. decodes the winners it owns (its other slots zeroed) into a partial x̂;
4. sums the partial x̂ with one all-reduce whose backward is the identity
   (`Dist.sum_identical_loss`: every rank then computes the same loss), and adds b_dec on
   rank 0's autograd path only, so b_dec's decoder gradient is counted once while its
   encoder gradient (each rank's own latents) is summed by the one all-reduce of b_dec.grad;
5. AuxK in the same way among the dead latents, scaled by min(n_dead/k_aux, 1) with n_dead
   all-reduced (each rank keeps the counters of its own latents);
6. decoder-gradient projection, Adam and the decoder normalisation are per-row: local.

The logged stats (fvu, aux, l0, dead_frac) are global. Per step a rank sends B·(k + k_aux)
candidate values, 2·B·d_in of partial reconstructions and d_in of b_dec gradient, against
the ~2·d_sae·d_in of a data-parallel gradient all-reduce.

Other rules would follow the same plan (`check` refuses them for now): mutual choice keeps
the global top-k·B of all-gathered per-rank candidates; feature choice needs no merge at
all, as a latent's top-m tokens are local to its owner, and only x̂ is all-reduced;
matching pursuit takes the argmax over the union of the ranks' best atoms at every one of
its k steps, a collective per step (and its residual update needs the winning atom's row),
so it costs k rounds instead of one.

Checkpoints are the single-process file (`saelab.checkpoint`), so a run resumes at any
number of ranks: rank 0 gathers the full SAE, Adam state and counters on the CPU and writes
them (NOTE: all in host memory at once, ~137 GB at d_sae 1M × d_in 4096, as safetensors
writes one dict; the way out is a streamed writer); every rank reads only its own rows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saelab import checkpoint, kernels
from saelab.archs import EncodeArgs, SparseCode
from saelab.config import TrainConfig
from saelab.distributed import Dist
from saelab.errors import UserError
from saelab.kernels.eager import host_reads_are_free
from saelab.sae import SparseCoder

if TYPE_CHECKING:  # the trainer will import this module to run it
    from saelab.trainer import Member

SUPPORTED = ("topk", "gradient_topk")
"""The rules latent-parallel training implements."""

ROW_SHARDED = ("W_enc", "b_enc", "W_dec")
"""Parameters split by latent (dim 0); the others (b_dec) are replicated on every rank."""

GATHER_CHUNK_BYTES = 64 << 20
"""Rows gathered per collective when assembling the full SAE on rank 0, which bounds the
device memory the gather takes beside the shard."""


def check(arch: str, d_sae: int, k: int, world: int, aux_loss: str = "auxk") -> None:
    """Refuse, with the fix, what latent-parallel training cannot do."""
    if arch not in SUPPORTED:
        raise UserError(
            f"latent-parallel training supports {', '.join(SUPPORTED)}, not {arch}; "
            "train it on one process or data-parallel"
        )
    if aux_loss != "auxk":
        raise UserError(
            f"latent-parallel training supports the AuxK auxiliary loss, not {aux_loss} "
            "(it ranks every latent's frequency); pass --sae.aux auxk"
        )
    if d_sae % world:
        raise UserError(
            f"d_sae={d_sae} does not split evenly over {world} ranks; pick a d_sae divisible "
            f"by {world} or another number of processes"
        )
    if k >= d_sae // world:
        raise UserError(
            f"k={k} is not below each rank's {d_sae // world} latents (d_sae/{world}); "
            "use fewer processes or a larger d_sae"
        )


# ---------------------------------------------------------------------------------------
# Shard and gather: the SAE, its Adam state and its per-latent counters


def _coder(like: SparseCoder, d_sae: int, device: torch.device) -> SparseCoder:
    """An SAE with `like`'s settings and d_sae latents, its values unset (to be copied in).
    Built on the meta device: no random init to pay for, and no RNG advanced."""
    sae = SparseCoder(
        like.d_in, d_sae, like.k, like.arch, like.input_scale, "meta", beta=like.beta
    ).to_empty(device=device)
    sae.compute_dtype = like.compute_dtype
    return sae


def _rows(name: str, t: Tensor, dist: Dist, n: int) -> Tensor:
    """This rank's part of a full parameter-shaped tensor t (all of it if replicated)."""
    if name not in ROW_SHARDED:
        return t
    lo, hi = dist.shard(n)
    return t[lo:hi]


def _gather_rows(t: Tensor, dist: Dist) -> Tensor | None:
    """Every rank's t stacked along dim 0 in rank order, on rank 0's CPU (None elsewhere),
    gathered a chunk of rows at a time."""
    n = t.shape[0]
    out = torch.empty((dist.world * n, *t.shape[1:]), dtype=t.dtype) if dist.main else None
    row_bytes = max(1, t[0].numel() * t.element_size()) if n else 1
    step = max(1, GATHER_CHUNK_BYTES // row_bytes)
    for lo in range(0, n, step):
        part = dist.all_gather(t[lo : lo + step].contiguous())
        c = part.shape[0] // dist.world
        if out is not None:
            for r in range(dist.world):
                out[r * n + lo : r * n + lo + c] = part[r * c : (r + 1) * c].cpu()
    return out


def shard(full: SparseCoder, dist: Dist, device: torch.device | None = None) -> SparseCoder:
    """This rank's SAE: full's rows of its latents, on `device` (default: full's)."""
    check(full.arch, full.d_sae, full.k, dist.world)
    device = device or full.W_dec.device
    local = _coder(full, full.d_sae // dist.world, device)
    with torch.no_grad():
        for name, p in local.named_parameters():
            p.copy_(_rows(name, getattr(full, name), dist, full.d_sae))
    return local


def gather(local: SparseCoder, dist: Dist) -> SparseCoder | None:
    """The full SAE on rank 0's CPU (None on the others), e.g. to save it. Collective."""
    full = _coder(local, local.d_sae * dist.world, torch.device("cpu")) if dist.main else None
    for name, p in local.named_parameters():
        t = _gather_rows(p.detach(), dist) if name in ROW_SHARDED else p.detach().cpu()
        if full is not None:
            with torch.no_grad():
                getattr(full, name).copy_(t)
    return full


def _optimizer_like(opt: torch.optim.Optimizer, sae: SparseCoder) -> torch.optim.Optimizer:
    params = [p for p in sae.parameters() if p.requires_grad]
    new = type(opt)(params, **opt.defaults)
    for g_new, g in zip(new.param_groups, opt.param_groups):
        g_new["lr"] = g["lr"]
    return new


def _member(m: Member, sae: SparseCoder, opt: torch.optim.Optimizer, counters: dict) -> Member:
    return dataclasses.replace(
        m, sae=sae, opt=opt, since_fired=counters["since_fired"], freq=counters["freq"]
    )


def _set_state(
    opt: torch.optim.Optimizer, sae: SparseCoder, state: dict[str, dict[str, Tensor]]
) -> None:
    """opt's state for sae's parameters from {param name: {key: tensor}}, each tensor moved
    where the optimizer reads it (`checkpoint` owns that rule)."""
    for name, p in sae.named_parameters():
        if name in state:
            opt.state[p] = {
                k: v.clone().to(checkpoint._state_device(opt, p, k)) for k, v in state[name].items()
            }


def _named_state(m: Member) -> dict[str, dict[str, Tensor]]:
    """m's Adam state by parameter name, in the parameters' order (the same on every rank)."""
    return {n: dict(m.opt.state[p]) for n, p in m.sae.named_parameters() if p in m.opt.state}


def shard_member(full: Member, dist: Dist, device: torch.device | None = None) -> Member:
    """This rank's share of a whole member: its SAE rows, their Adam state and counters."""
    sae = shard(full.sae, dist, device)
    opt = _optimizer_like(full.opt, sae)
    n = full.sae.d_sae
    state = {
        name: {k: _rows(name, v, dist, n) if v.dim() else v for k, v in s.items()}
        for name, s in _named_state(full).items()
    }
    _set_state(opt, sae, state)
    dev = sae.W_dec.device
    lo, hi = dist.shard(n)
    counters = {k: v[lo:hi].clone().to(dev) for k, v in full.counters().items()}
    m = _member(full, sae, opt, counters)
    m.diverged_at = full.diverged_at.clone().to(dev)
    return m


def gather_member(m: Member, dist: Dist) -> Member | None:
    """The whole member on rank 0's CPU (None on the others): the full SAE, its Adam state
    and counters, exactly those a single process would hold. Collective."""
    full_sae = gather(m.sae, dist)
    state: dict[str, dict[str, Tensor]] = {}
    for name, s in _named_state(m).items():
        state[name] = {}
        for key in sorted(s):
            v = s[key]
            sharded = name in ROW_SHARDED and v.dim() > 0
            g = _gather_rows(v.detach(), dist) if sharded else v.detach().cpu()
            if g is not None:
                state[name][key] = g
    counters = {k: _gather_rows(v, dist) for k, v in m.counters().items()}
    if full_sae is None:
        return None
    opt = _optimizer_like(m.opt, full_sae)
    _set_state(opt, full_sae, state)
    full = _member(m, full_sae, opt, counters)
    full.diverged_at = m.diverged_at.cpu()
    return full


def save_checkpoint(path: Path, m: Member, dist: Dist) -> None:
    """The single-process checkpoint of m's whole member, written by rank 0. Collective."""
    full = gather_member(m, dist)
    if full is not None:
        checkpoint.save_checkpoint(path, full.sae, full.opt, m.step, full.counters())
    dist.barrier()


def dead_latents(m: Member, cfg: TrainConfig, dist: Dist) -> int:
    """Latents of the whole SAE that have not fired for cfg.dead_tokens tokens. Collective."""
    return int(dist.all_reduce_((m.since_fired >= cfg.dead_tokens).sum()))


def weights_finite(m: Member, dist: Dist) -> bool:
    """Whether every rank's weights are finite; the same answer on every rank, so all stop
    together. Collective."""
    bad = torch.stack([(~torch.isfinite(p)).sum() for p in m.sae.parameters()]).sum()
    return int(dist.all_reduce_(bad)) == 0


def load_checkpoint(path: Path, m: Member, dist: Dist) -> int:
    """Restore this rank's share of m from a (single-process) checkpoint, reading only its
    own latents' rows; returns the step."""
    rows = dist.shard(m.sae.d_sae * dist.world)
    device = m.sae.W_dec.device
    step, counters = checkpoint.load_checkpoint(path, m.sae, m.opt, device, rows, ROW_SHARDED)
    m.since_fired.copy_(counters["since_fired"])
    m.freq.copy_(counters["freq"])
    m.step = step
    return step


# ---------------------------------------------------------------------------------------
# One step


def _merge(key: Tensor, k: int, dist: Dist) -> tuple[Tensor, Tensor]:
    """(the global top-k keys per row [B, k'], which of this rank's slots won [B, K]) from
    every rank's candidates' keys [B, K]; k' = min(k, N·K)."""
    B, K = key.shape
    every = dist.all_gather(key)  # [N·B, K], rank-major
    every = every.view(dist.world, B, K).permute(1, 0, 2).reshape(B, dist.world * K)
    top, pos = torch.topk(every, min(k, every.shape[1]), dim=1, sorted=False)
    won = torch.zeros_like(every, dtype=torch.bool).scatter_(1, pos, True)
    return top, won[:, dist.rank * K : (dist.rank + 1) * K]


def _partial(sae: SparseCoder, values: Tensor, indices: Tensor, mine: Tensor) -> Tensor:
    """Σ of this rank's winners' decoder rows (its other slots zeroed), in fp32."""
    c = sae.compute
    kept = values * mine  # a zeroed slot passes no gradient back to the encoder
    return kernels.decode(c(kept), indices, c(sae.W_dec), None).to(sae.b_dec.dtype)


def _pad(values: Tensor, indices: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """A code [B, width], zero-padded: every rank's AuxK candidates take the same shape
    (the CPU kernel returns only as many as the rank has dead latents)."""
    extra = width - values.shape[1]
    if extra <= 0:
        return values, indices
    B = values.shape[0]
    return (
        torch.cat([values, values.new_zeros(B, extra)], 1),
        torch.cat([indices, indices.new_zeros(B, extra)], 1),
    )


def train_step(
    m: Member, x: Tensor, cfg: TrainConfig, dist: Dist, grad: Tensor | None = None
) -> dict[str, Tensor]:
    """One optimizer step of this rank's share of m on the full batch x [B, d_in] (scaled,
    the same on every rank; grad: gradient_topk's ∂CE/∂x, likewise):
    `trainer._train_step`'s maths, split by latents. Collective."""
    sae, k_aux = m.sae, m.plan["k_aux"]
    dead = m.since_fired >= cfg.dead_tokens
    n_dead = dist.all_reduce_(dead.sum())
    # The single-process kernel skips AuxK only where it can read the mask for free.
    use_aux = k_aux > 0 and not (host_reads_are_free(x) and int(n_dead) == 0)
    with kernels.matmul_precision(cfg.precision):
        enc = sae.encode_scaled(x, EncodeArgs(True, dead, k_aux if use_aux else 0, grad))
        assert isinstance(enc.code, SparseCode)  # the rules `check` admits
        values, indices = enc.code
        top, mine = _merge(_merge_key(sae, values, indices, x, grad), sae.k, dist)
        b_dec = sae.b_dec if dist.main else sae.b_dec.detach()
        x_hat = dist.sum_identical_loss(_partial(sae, values, indices, mine)) + b_dec
        fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        aux = _auxk(m, enc.aux, x, x_hat, n_dead, cfg, dist) if use_aux else None
        m.opt.zero_grad(set_to_none=True)
        (fvu if aux is None else fvu + aux).backward()
    if sae.b_dec.grad is not None:
        dist.all_reduce_(sae.b_dec.grad)
    sae.project_decoder_grad()
    m.opt.step()
    sae.normalize_decoder()
    aux_value = torch.zeros_like(fvu) if aux is None else aux.detach()
    _update_counters(m, values.detach() * mine, indices, fvu.detach() + aux_value, cfg)
    return {
        "fvu": fvu.detach(),
        "aux": aux_value,
        # a winner fires iff its key is positive (gradient_topk's boost is ≥ 1)
        "l0": (top > 0).sum(dtype=torch.float64) / x.shape[0],
        "dead_frac": n_dead.to(torch.float64) / (sae.d_sae * dist.world),
    }


@torch.no_grad()
def _merge_key(
    sae: SparseCoder, values: Tensor, indices: Tensor, x: Tensor, grad: Tensor | None
) -> Tensor:
    """What the rule ranked the candidates [B, k] by: their values for topk; for
    gradient_topk its score value·(1 + β|d_i·ĝ|) (`archs.gradient_topk`), recomputed for the
    candidates alone. ĝ's RMS is over the batch, which every rank holds whole."""
    if sae.arch != "gradient_topk" or grad is None:
        return values.detach()
    g = grad.to(x.dtype)
    g_hat = sae.compute(g / g.pow(2).mean().sqrt().clamp_min(1e-12))
    W_dec = sae.compute(sae.W_dec.detach())
    # one candidate slot at a time: [B, d_in] of scratch, never [B, k, d_in]
    dots = torch.stack([(W_dec[indices[:, j]] * g_hat).sum(1) for j in range(indices.shape[1])], 1)
    return values.detach() * dots.abs_().mul_(sae.beta).add_(1)


def _auxk(
    m: Member,
    code: SparseCode | None,
    x: Tensor,
    x_hat: Tensor,
    n_dead: Tensor,
    cfg: TrainConfig,
    dist: Dist,
) -> Tensor:
    """AuxK (`trainer._aux_loss`): the residual reconstructed by the global top-k_aux of the
    dead latents, from this rank's candidates among its own dead latents (`code`; None when
    it has none, which the CPU kernel reports without padding)."""
    k_aux = m.plan["k_aux"]
    if code is None:
        none = torch.zeros(x.shape[0], 0, dtype=torch.int64, device=x.device)
        code = SparseCode(m.sae.compute(none.to(x.dtype)), none)
    width = min(k_aux, m.sae.d_sae) if dist.active else code.values.shape[1]
    values, indices = _pad(*code, width)
    _, mine = _merge(values.detach(), k_aux, dist)
    e = (x - x_hat).detach()
    e_hat = dist.sum_identical_loss(_partial(m.sae, values, indices, mine))
    loss = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return loss * cfg.auxk_alpha * (n_dead / k_aux).clamp(max=1.0)


@torch.no_grad()
def _update_counters(
    m: Member, won: Tensor, indices: Tensor, loss: Tensor, cfg: TrainConfig
) -> None:
    """This rank's latents' counters from its winning values `won` [B, k] (zero: lost or
    not firing), and the step of a first non-finite loss; then the step count."""
    counts = torch.zeros(m.sae.d_sae, dtype=torch.int64, device=indices.device)
    counts.index_add_(0, indices.reshape(-1), (won > 0).reshape(-1).to(torch.int64))
    m.advance(counts, won.shape[0], loss, cfg)
