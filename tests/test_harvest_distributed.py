"""Harvest under torchrun: N ranks write the same folder as one process, a killed multi-rank
harvest resumes with any number of ranks, and a refusal on one rank stops every rank."""

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.multiprocessing import ProcessExitedException

import saelab.harvest as H
from saelab.cli import main
from saelab.config import HarvestConfig
from saelab.errors import UserError
from saelab.runs import writer_lock
from saelab.shards import LOG, read_meta, shard_path

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
# 14 contexts in shards of 3: five shards (the last of 2), so two ranks take rounds [0, 1],
# [2, 3], [4] and rank 1 sits the last one out; batches of 2 split each shard unevenly.
BASE = dict(
    model="tiny", hooks=HOOKS, n_tokens=15 * 14, n_ctx=16, batch_size=2, shard_contexts=3,
    dtype="float32",
)  # fmt: skip


def cfg_for(out: Path, **kw) -> dict:
    return {**BASE, "out": str(out), **kw}


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def one_process(kw: dict) -> Path:
    """The harvest as one process makes it, on one thread like every spawned rank (so no
    difference can come from the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return H.harvest(HarvestConfig(**kw), progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return one_process(cfg_for(tmp_path_factory.mktemp("ref") / "h"))


class _Crash(BaseException):
    """Stands in for a kill: nothing in saelab catches a BaseException."""


def _harvest_rank(kws: list[dict], crash_at: int | None = None) -> None:
    """Harvest each config in turn on this rank; with crash_at, rank 1 dies writing that shard."""
    if crash_at is not None and os.environ["RANK"] == "1":
        real = H.write_shard_files

        def crash(out, meta, index, *args):
            if index == crash_at:
                raise _Crash
            return real(out, meta, index, *args)

        H.write_shard_files = crash
    for kw in kws:
        H.harvest(HarvestConfig(**kw), progress=False)


@pytest.fixture(scope="module")
def killed(tmp_path_factory, run_ranks):
    """A 2-rank harvest whose rank 1 died writing shard 3 (torch then stopped rank 0)."""
    out = tmp_path_factory.mktemp("killed") / "h"
    with pytest.raises(ProcessExitedException, match="process 1 terminated"):
        run_ranks(_harvest_rank, 2, [cfg_for(out)], 3)
    meta = read_meta(out)
    assert not meta["complete"] and not (out / shard_path("acts", HOOKS[0], 3)).exists()
    return out


def with_gaps(reference: Path, out: Path) -> Path:
    """A copy of the reference whose log lists shards 0, 1 and 3 only: 2 and 4 lost their files
    and their windows in tokens.npy, and the header is the unfinished one."""
    shutil.copytree(reference, out)
    lines = (reference / LOG).read_text().splitlines(keepends=True)
    (out / LOG).write_text(lines[0] + lines[1] + lines[3])
    header = json.loads((out / "meta.json").read_text())
    header.update(complete=False, n_tokens=0, tokens_sha256="")
    (out / "meta.json").write_text(json.dumps(header, indent=1))
    tokens = np.load(out / "tokens.npy", mmap_mode="r+")
    tokens[6:9] = tokens[12:] = 0
    tokens.flush()
    del tokens
    for shard in (2, 4):
        for hook in HOOKS:
            (out / shard_path("acts", hook, shard)).unlink()
    return out


def test_two_ranks_write_the_folder_of_one_process(tmp_path, run_ranks, reference, killed):
    """Three 2-rank harvests (one spawn, to save process starts): a fresh one, the resume of
    the killed one and the resume of a log with gaps. Every file is compared byte for byte,
    meta.json and shards.jsonl included: nothing in them (no timestamp, no rank, no world
    size) depends on how many processes made them, or how many runs."""
    outs = [tmp_path / "fresh", tmp_path / "resumed", with_gaps(reference, tmp_path / "gaps")]
    shutil.copytree(killed, outs[1])
    run_ranks(_harvest_rank, 2, [cfg_for(out) for out in outs])
    for out in outs:
        assert snapshot(out) == snapshot(reference), out.name


def test_killed_two_rank_harvest_resumes_in_one_process(tmp_path, killed, reference):
    out = tmp_path / "h"
    shutil.copytree(killed, out)
    one_process(cfg_for(out))
    assert snapshot(out) == snapshot(reference)


def test_resume_makes_only_the_shards_the_log_lacks(tmp_path, reference, monkeypatch):
    out = with_gaps(reference, tmp_path / "h")
    made, real = [], H.write_shard_files

    def spy(out, meta, index, *args):
        made.append(index)
        return real(out, meta, index, *args)

    monkeypatch.setattr(H, "write_shard_files", spy)
    one_process(cfg_for(out))
    assert made == [2, 4]
    assert snapshot(out) == snapshot(reference)  # the log back in index order


def _cli_rank(report: Path, runs: list[list[str]]) -> None:
    """Run each argv through `main` on this rank; record the exit codes and stderr. Rank 0
    refuses to write shard 2 of a folder named "overflow" (as on an fp16 overflow)."""
    if os.environ["RANK"] == "0":
        real = H.write_shard_files

        def refuse(out, meta, index, *args):
            if out.name == "overflow" and index == 2:
                raise UserError("shard 2 holds non-finite values")
            return real(out, meta, index, *args)

        H.write_shard_files = refuse
    codes, errs = [], []
    for argv in runs:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            codes.append(main(argv))
        errs.append(err.getvalue())
    torch.save((codes, errs), report / f"rank{os.environ['RANK']}.pt")


def _argv(out: Path, **kw) -> list[str]:
    """`saelab harvest` with cfg_for's settings."""
    cfg = cfg_for(out, **kw)
    argv = ["harvest", "--quiet", "--hooks", ",".join(cfg.pop("hooks"))]
    return argv + [x for k, v in cfg.items() for x in (f"--{k}", str(v))]


def test_a_refusal_on_any_rank_exits_2_on_every_rank(tmp_path, run_ranks, reference):
    locked, bad = tmp_path / "locked", tmp_path / "bad"
    damaged = tmp_path / "damaged"  # finished; rank 1 verifies shards 1 and 3
    shutil.copytree(reference, damaged)
    shard = damaged / shard_path("acts", HOOKS[1], 1)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40
    shard.write_bytes(bytes(data))
    before = snapshot(damaged)
    runs = [
        _argv(locked),
        _argv(bad, corpus=str(tmp_path / "none.txt")),
        _argv(bad, device="cuda:0"),
        _argv(damaged),
        _argv(tmp_path / "overflow"),  # rank 1 makes shard 3 while rank 0 fails on shard 2
    ]
    with writer_lock(locked, "harvest"):  # another harvest is writing the folder
        run_ranks(_cli_rank, 2, tmp_path, runs)
        assert [p.name for p in locked.iterdir()] == [".lock"]
    (codes0, errs0), (codes1, errs1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert codes0 == codes1 == [2] * len(runs)
    # Only rank 0 takes the lock; rank 1 learns that rank 0 stopped instead of waiting for it.
    assert "is being written by another saelab process" in errs0[0]
    assert "another rank of this harvest stopped" in errs1[0]
    # Shard 1 is rank 1's to verify: rank 0 stops because rank 1 did.
    assert "shard_00001.npy is corrupted" in errs1[3]
    assert "another rank of this harvest stopped" in errs0[3]
    assert "non-finite" in errs0[4] and "another rank of this harvest stopped" in errs1[4]
    meta = read_meta(tmp_path / "overflow")  # shard 3 is not logged: the log stays a prefix
    assert [s["index"] for s in meta["shards"]] == [0, 1] and not meta["complete"]
    for errs in (errs0, errs1):
        assert "does not exist" in errs[1] and "puts every process on one GPU" in errs[2]
        assert "Traceback" not in "".join(errs)
    assert not bad.exists() and snapshot(damaged) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_cli_grads_equal_one_process(tmp_path):
    want = one_process(cfg_for(tmp_path / "one", grads=True, n_tokens=15 * 7))
    out = tmp_path / "two"
    argv = _argv(out, grads=True, n_tokens=15 * 7)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "saelab", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / shard_path("grads", HOOKS[1], 2)).is_file()
    assert snapshot(out) == snapshot(want)
