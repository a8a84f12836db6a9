"""saelab.latent_parallel: a TopK SAE split by latents over 2 gloo ranks trains as one process
does, and its checkpoints are the single-process file."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from saelab import checkpoint, distributed, latent_parallel, trainer
from saelab.config import SAEConfig, TrainConfig
from saelab.distributed import Dist
from saelab.errors import UserError

D_IN, D_SAE, K, K_AUX, B, STEPS = 16, 64, 4, 8, 64, 5
CFG = TrainConfig(dead_tokens=B, lr_warmup_steps=0)
"""dead_tokens = one batch: latents that miss a step are dead, so AuxK works every step."""


def _member(out: Path, arch: str = "topk") -> trainer.Member:
    """A member as the trainer builds it (seeded init, b_dec at the data's median)."""
    plan = {
        "train": {"sae": vars(SAEConfig(arch, D_SAE, K))},
        "lr": 3e-3,
        "k_aux": K_AUX,
        "aux_loss": "auxk",
    }
    m = trainer._make_member(out, plan, None, 1.0, _median(), CFG, torch.device("cpu"))
    m.since_fired[:6] = B  # dead from the start, all on rank 0: rank 1 has no AuxK candidates
    return m


def _raw(n: int) -> list[torch.Tensor]:
    """A few strong directions plus noise, so some latents die."""
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(6, D_IN, generator=g)
    return [
        torch.randn(B, 6, generator=g).relu() @ basis + 0.1 * torch.randn(B, D_IN, generator=g)
        for _ in range(n)
    ]


def _median() -> torch.Tensor:
    return _raw(1)[0].median(0).values


def _batches(n: int) -> list[torch.Tensor]:
    """Tie-free data but for ties at zero: the first rows sit at b_dec's start, so in the
    first step every latent's z is exactly 0 there (b_enc = 0) and any k of them may win."""
    out = _raw(n)
    for x in out:
        x[:4] = _median()
    return out


def _grads(n: int, arch: str) -> list[torch.Tensor | None]:
    """gradient_topk's ∂CE/∂x stand-ins (None for topk)."""
    g = torch.Generator().manual_seed(2)
    return [torch.randn(B, D_IN, generator=g) if arch == "gradient_topk" else None] * n


def _state(m: trainer.Member) -> dict[str, torch.Tensor]:
    """Everything a member carries, by name: weights, Adam state, counters."""
    out = {f"sae.{n}": p.detach().clone() for n, p in m.sae.named_parameters()}
    for n, p in m.sae.named_parameters():
        for key, v in m.opt.state[p].items():
            out[f"opt.{n}.{key}"] = torch.as_tensor(v).clone()
    out.update({f"state.{k}": v.clone() for k, v in m.counters().items()})
    return out


def _reference(out: Path, steps: int, arch: str = "topk") -> tuple[trainer.Member, list[dict]]:
    m = _member(out, arch)
    data = zip(_batches(steps), _grads(steps, arch))
    return m, [trainer._train_step(m, x, g, CFG) for x, g in data]


def _train_two_ranks(out: Path, arch: str) -> None:
    d = distributed.init()
    m = latent_parallel.shard_member(_member(out / f"r{d.rank}", arch), d)
    data = zip(_batches(STEPS), _grads(STEPS, arch))
    stats = [latent_parallel.train_step(m, x, CFG, d, g) for x, g in data]
    latent_parallel.save_checkpoint(out / "ckpt.safetensors", m, d)
    dead = latent_parallel.dead_latents(m, CFG, d)
    full = latent_parallel.gather_member(m, d)
    if full is not None:
        torch.save({"state": _state(full), "stats": stats, "dead": dead}, out / "lp.pt")
    d.barrier()  # no rank tears gloo down while another is still in a collective


@pytest.mark.parametrize("arch", ["topk", "gradient_topk"])
def test_two_ranks_train_as_one_process(tmp_path, run_ranks, arch):
    run_ranks(_train_two_ranks, 2, tmp_path, arch)
    got = torch.load(tmp_path / "lp.pt")
    ref, ref_stats = _reference(tmp_path / "ref", STEPS, arch)
    want = _state(ref)
    assert got["state"].keys() == want.keys()
    for name, w in want.items():
        # fp32 sums in another order (partial x̂ per rank); seen: ≤ 6e-8 after 5 steps
        torch.testing.assert_close(got["state"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    assert got["dead"] == int((want["state.since_fired"] >= B).sum()) > 0
    assert all(r["aux"] > 0 for r in ref_stats), "AuxK must work in every step"
    for s, r in zip(got["stats"], ref_stats):
        for key in ("fvu", "aux", "l0", "dead_frac"):
            torch.testing.assert_close(s[key], r[key], rtol=1e-5, atol=1e-6, msg=key)
    # The 2-rank checkpoint is a single-process one: it resumes in one process as is.
    one = _member(tmp_path / "one", arch)
    step, counters = checkpoint.load_checkpoint(
        tmp_path / "ckpt.safetensors", one.sae, one.opt, torch.device("cpu")
    )
    one.since_fired.copy_(counters["since_fired"])
    one.freq.copy_(counters["freq"])
    assert step == STEPS
    for name, v in _state(one).items():
        assert torch.equal(v, got["state"][name]), name


def _resume_two_ranks(out: Path) -> None:
    d = distributed.init()
    m = latent_parallel.shard_member(_member(out / f"r{d.rank}"), d)
    step = latent_parallel.load_checkpoint(out / "one.safetensors", m, d)
    local = _state(m)
    latent_parallel.save_checkpoint(out / "two.safetensors", m, d)
    full = latent_parallel.gather_member(m, d)
    finite = [latent_parallel.weights_finite(m, d)]
    if d.rank == 1:
        with torch.no_grad():
            m.sae.W_dec[0, 0] = float("inf")
    finite.append(latent_parallel.weights_finite(m, d))  # one rank's inf stops every rank
    torch.save({"step": step, "local": local, "finite": finite}, out / f"local{d.rank}.pt")
    if full is not None:
        torch.save(_state(full), out / "gathered.pt")
    d.barrier()


def test_one_process_checkpoint_shards_and_gathers_back_exactly(tmp_path, run_ranks):
    ref, _ = _reference(tmp_path / "ref", 2)
    checkpoint.save_checkpoint(
        tmp_path / "one.safetensors", ref.sae, ref.opt, ref.step, ref.counters()
    )
    run_ranks(_resume_two_ranks, 2, tmp_path)
    want = _state(ref)
    half = D_SAE // 2
    for r in range(2):
        got = torch.load(tmp_path / f"local{r}.pt")
        assert got["step"] == 2 and got["finite"] == [True, False]
        for name, v in got["local"].items():
            rows = name.split(".")[1] in latent_parallel.ROW_SHARDED or name.startswith("state")
            w = want[name][r * half : (r + 1) * half] if rows and v.dim() else want[name]
            assert torch.equal(v, w), (r, name)
    gathered = torch.load(tmp_path / "gathered.pt")
    assert gathered.keys() == want.keys()
    for name, w in want.items():
        assert torch.equal(gathered[name], w), name
    # Written from 2 ranks, the same file as from one process.
    a = safe_open(str(tmp_path / "one.safetensors"), "pt")
    b = safe_open(str(tmp_path / "two.safetensors"), "pt")
    assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
    for key in a.keys():
        assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_one_rank_step_is_the_trainer_step(tmp_path):
    """World 1: the split step is the trainer's own, bit for bit."""
    ref, ref_stats = _reference(tmp_path / "ref", 3)
    m = latent_parallel.shard_member(_member(tmp_path / "lp"), distributed.SINGLE)
    stats = [latent_parallel.train_step(m, x, CFG, distributed.SINGLE) for x in _batches(3)]
    for name, w in _state(ref).items():
        assert torch.equal(_state(m)[name], w), name
    for s, r in zip(stats, ref_stats):
        for key in r:
            assert torch.equal(s[key], r[key]), key


def test_refuses_what_it_cannot_split():
    with pytest.raises(UserError, match="d_sae=64 does not split evenly over 3"):
        latent_parallel.check("topk", 64, 4, 3)
    with pytest.raises(UserError, match="does not split evenly"):
        latent_parallel.shard(_member(Path("unused")).sae, Dist(0, 3))
    with pytest.raises(UserError, match="supports topk, gradient_topk, not mutual_choice"):
        latent_parallel.check("mutual_choice", 64, 4, 2)
    with pytest.raises(UserError, match="not zipf"):
        latent_parallel.check("topk", 64, 4, 2, aux_loss="zipf")
    with pytest.raises(UserError, match="k=32 is not below"):
        latent_parallel.check("topk", 64, 32, 2)
