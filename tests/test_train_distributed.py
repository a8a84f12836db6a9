"""Data-parallel training (ALGORITHMS.md §9): two gloo processes, each on half of every
batch, train what one process trains on whole batches.

Tolerance: weights, thresholds and logged figures agree within atol 1e-5 (the two paths sum
the same numbers in another order); firing counters agree exactly. Runs at one world size
resumed at another end with the same weights, within that tolerance; runs killed and resumed
at the same world size end bitwise equal.
"""

import builtins
import faulthandler
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.archs import TRAINABLE
from saelab.cli import main
from saelab.config import SAEConfig, TrainConfig
from saelab.runs import CHECKPOINT
from saelab.store import ActivationStore
from saelab.trainer import train

ATOL = 1e-5
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def harvest(tmp_path_factory, synthetic_harvest) -> Path:
    path = tmp_path_factory.mktemp("h") / "syn"
    return synthetic_harvest(
        path, n_tokens=1600, d_in=16, n_features=64, tokens_per_context=31, shard_contexts=8,
        grads=True,
    )  # fmt: skip


def _cfg(harvest: Path, out: Path, **kw) -> TrainConfig:
    """A sweep of every trainable rule (one read of the data trains them all)."""
    base = dict(
        harvest=str(harvest), out=str(out), n_tokens=64 * 14, eval_tokens=310, batch_size=64,
        sweep=[SAEConfig(arch, 64, 4) for arch in TRAINABLE], dead_tokens=200,
        checkpoint_every=5, log_every=2, lr_warmup_steps=2, shuffle_buffer=256, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


SHORT = dict(sweep=[SAEConfig("mutual_choice", 64, 4), SAEConfig("feature_choice", 64, 4)])
"""The resume tests' sweep: the rules with thresholds and collectives of their own."""


def _members(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("cfg.json"))


def _assert_same_runs(a_root: Path, b_root: Path, atol: float) -> None:
    """Weights, thresholds, Adam state, counters and logs of every member agree."""
    runs = _members(a_root)
    assert [p.relative_to(a_root) for p in runs] == [
        p.relative_to(b_root) for p in _members(b_root)
    ]
    assert runs
    for a in runs:
        b = b_root / a.relative_to(a_root)
        ca, cb = load_file(a / CHECKPOINT), load_file(b / CHECKPOINT)
        assert ca.keys() == cb.keys()
        for k in ca:
            exact = k == "state.since_fired" or atol == 0
            tol = dict(rtol=0, atol=0) if exact else dict(rtol=0, atol=atol)
            torch.testing.assert_close(ca[k], cb[k], **tol, equal_nan=True, msg=f"{a.name} {k}")
        wa, wb = load_file(a / "sae.safetensors"), load_file(b / "sae.safetensors")
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, equal_nan=True)
        la, lb = (_log(a), _log(b))
        assert [r["step"] for r in la] == [r["step"] for r in lb]
        for ra, rb in zip(la, lb):
            for key in ("fvu", "aux", "l0", "dead_frac", "lr"):
                assert ra[key] == pytest.approx(rb[key], abs=atol), (a.name, ra["step"], key)
        assert json.loads((a / "cfg.json").read_text())["complete"]


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


def _record_writes(root: Path) -> list[str]:
    """Every file this process opens for writing, creates or renames into place under root."""
    seen: list[str] = []
    real_open, real_os_open, real_replace = builtins.open, os.open, os.replace

    def mine(p) -> bool:
        return str(Path(p).resolve()).startswith(str(root.resolve()))

    def spy_open(file, mode="r", *a, **k):
        if isinstance(file, (str, Path)) and set(mode) & set("wax+") and mine(file):
            seen.append(str(file))
        return real_open(file, mode, *a, **k)

    def spy_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and mine(path):
            seen.append(str(path))
        return real_os_open(path, flags, *a, **k)

    def spy_replace(src, dst, *a, **k):
        if mine(dst):
            seen.append(str(dst))
        return real_replace(src, dst, *a, **k)

    builtins.open, os.open, os.replace = spy_open, spy_os_open, spy_replace  # type: ignore[assignment]
    return seen


def _rank() -> int:
    """This process's rank; it also arms a watchdog, so a collective that one process never
    joins fails the test (the other process exits) instead of hanging it."""
    faulthandler.dump_traceback_later(240, exit=True)
    return int(os.environ["RANK"])


# ---------------------------------------------------------------------------------------
# Functions run in each spawned process (module level, for spawn)


def _train_sweep(harvest: Path, out: Path, report: Path) -> None:
    writes = _record_writes(out) if _rank() else []
    train(_cfg(harvest, out), progress=False)
    torch.save(writes, report / f"writes{_rank()}.pt")


class _Interrupt(Exception):
    pass


def _dying_at(step: int):
    real = ActivationStore.batches

    def dying(self, *a, **kw):
        for i, b in enumerate(real(self, *a, **kw)):
            if i == step:
                raise _Interrupt
            yield b

    ActivationStore.batches = dying  # type: ignore[method-assign]
    return real


def _kill_and_resume(harvest: Path, root: Path) -> None:
    """At 2 ranks: an uninterrupted run; a run killed after its checkpoint at step 10 and
    resumed; the 1-rank checkpoint in root/r1 resumed; and a run killed for 2 → 1."""
    _rank()
    short = SHORT
    train(_cfg(harvest, root / "r2full", **short), progress=False)
    for out, resume in (("r2cut", True), ("r2half", False)):
        real = _dying_at(12)
        try:
            train(_cfg(harvest, root / out, **short), progress=False)
        except _Interrupt:
            pass
        ActivationStore.batches = real  # type: ignore[method-assign]
        if resume:
            train(_cfg(harvest, root / out, **short), progress=False)
    train(_cfg(harvest, root / "r1", **short), progress=False)


LATENT = dict(
    parallel="latent", sweep=[SAEConfig("topk", 64, 4), SAEConfig("gradient_topk", 64, 4)]
)
"""Latent-parallel training's rules, with latents dead from step 4 on, so AuxK runs."""


def _train_latent(harvest: Path, root: Path) -> None:
    """At 2 ranks, each holding 32 of the 64 latents: an uninterrupted run, and a run killed
    after its checkpoint at step 10 and resumed."""
    _rank()
    train(_cfg(harvest, root / "lp", **LATENT), progress=False)
    real = _dying_at(12)
    try:
        train(_cfg(harvest, root / "lpcut", **LATENT), progress=False)
    except _Interrupt:
        pass
    ActivationStore.batches = real  # type: ignore[method-assign]
    train(_cfg(harvest, root / "lpcut", **LATENT), progress=False)


def _bad_batch(harvest: Path, out: Path, report: Path) -> None:
    code = main(["train", "--harvest", str(harvest), "--out", str(out), "--batch_size", "63",
                 "--eval_tokens", "310", "--sae.d_sae", "64", "--device", "cpu"])  # fmt: skip
    (report / f"code{_rank()}").write_text(str(code))


def _train_live(cfg: TrainConfig) -> None:
    _rank()
    train(cfg, progress=False)


# ---------------------------------------------------------------------------------------


def test_two_ranks_equal_one_for_every_rule(harvest, tmp_path, run_ranks):
    """Every trainable rule, gradient_topk with gradients from the harvest; rank 1 writes
    nothing (rank 0 writes every file)."""
    run_ranks(_train_sweep, 2, harvest, tmp_path / "two", tmp_path)
    one = train(_cfg(harvest, tmp_path / "one"), progress=False)
    _assert_same_runs(one, tmp_path / "two", ATOL)
    assert torch.load(tmp_path / "writes1.pt") == []
    assert len(_members(one)) == len(TRAINABLE)


def test_kill_and_resume_across_world_sizes(harvest, tmp_path, run_ranks):
    short = SHORT
    # A 1-rank run killed after its checkpoint at step 10, which 2 ranks then finish.
    real = _dying_at(12)
    try:
        with pytest.raises(_Interrupt):
            train(_cfg(harvest, tmp_path / "r1", **short), progress=False)
    finally:
        ActivationStore.batches = real  # type: ignore[method-assign]
    run_ranks(_kill_and_resume, 2, harvest, tmp_path)
    # 2 ranks killed, then one process finishes.
    train(_cfg(harvest, tmp_path / "r2half", **short), progress=False)
    full = train(_cfg(harvest, tmp_path / "r1full", **short), progress=False)
    _assert_same_runs(tmp_path / "r2full", tmp_path / "r2cut", atol=0)
    for resumed in ("r1", "r2half"):
        _assert_same_runs(full, tmp_path / resumed, ATOL)


def test_latent_parallel_two_ranks_equal_one(harvest, tmp_path, run_ranks):
    """The trainer with --parallel latent at 2 ranks trains what one process trains, and
    writes the same files (weights, checkpoint, log); killed and resumed, it ends bitwise
    equal to its uninterrupted run."""
    run_ranks(_train_latent, 2, harvest, tmp_path)
    one = train(_cfg(harvest, tmp_path / "one", **LATENT), progress=False)
    _assert_same_runs(one, tmp_path / "lp", ATOL)
    _assert_same_runs(tmp_path / "lp", tmp_path / "lpcut", atol=0)
    assert any(r["aux"] > 0 for r in _log(tmp_path / "lp" / "topk-64-k4"))


def test_bad_batch_size_exits_2_on_every_rank(harvest, tmp_path, run_ranks):
    run_ranks(_bad_batch, 2, harvest, tmp_path / "bad", tmp_path)
    assert [(tmp_path / f"code{r}").read_text() for r in (0, 1)] == ["2", "2"]
    assert not (tmp_path / "bad").exists()


def test_live_two_ranks_equal_one(tmp_path, run_ranks):
    """Each rank runs the model (and, for gradient_topk, its backward) on half of each
    buffer's contexts; rank 0 harvests the held-out set."""
    per = 15
    cfg = lambda out: TrainConfig(  # noqa: E731
        model="tiny", hooks=[HOOK], n_ctx=16, model_batch_size=4, n_tokens=per * 24,
        eval_tokens=per * 4, batch_size=30, shuffle_buffer=per * 7, out=str(out),
        heldout=str(out.parent / f"{out.name}-heldout"),
        sweep=[SAEConfig("topk", 64, 4), SAEConfig("gradient_topk", 64, 4)],
        dead_tokens=100, checkpoint_every=5, log_every=2, lr_warmup_steps=2, device="cpu",
    )  # fmt: skip
    run_ranks(_train_live, 2, cfg(tmp_path / "two"))
    one = train(cfg(tmp_path / "one"), progress=False)
    _assert_same_runs(one, tmp_path / "two", ATOL)


def test_torchrun_cli_trains_data_parallel(harvest, tmp_path):
    """The documented launch: torchrun --nproc_per_node=2 -m saelab train …"""
    torchrun = Path(sys.executable).parent / "torchrun"
    args = ["train", "--harvest", str(harvest), "--batch_size", "64", "--n_tokens", "640",
            "--eval_tokens", "310", "--sae.d_sae", "64", "--sae.k", "4", "--device", "cpu",
            "--log_every", "2", "--shuffle_buffer", "256"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    launch = [str(torchrun), "--nproc_per_node=2", "-m", "saelab", *args]
    done = subprocess.run(
        [*launch, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    _assert_same_runs(tmp_path / "one", tmp_path / "two", ATOL)
