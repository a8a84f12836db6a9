"""The run and harvest folders' writer lock: two writers into one folder leave it exactly as
one writer would, and the second is told who holds it."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saelab.cli import main
from saelab.errors import UserError
from saelab.runs import LOCK, atomic_write, writer_lock

HARVEST = ["--model", "tiny", "--hooks", "blocks.0.hook_resid_post", "--n_ctx", "16"]
HARVEST += ["--dtype", "float32", "--batch_size", "1", "--shard_contexts", "2"]


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _second_writer_waits_out(argv: list[str], out: Path, started: Path, capsys) -> str:
    """Start `saelab argv` in a subprocess; once it is writing `started`, run the same
    command here; return what the second one printed. The first is left to finish."""
    proc = subprocess.Popen([sys.executable, "-m", "saelab", *argv, "-q"], env={**os.environ})
    try:
        deadline = time.time() + 120
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the first writer ended before the second started"
        capsys.readouterr()
        assert main([*argv, "-q"]) == 2
        err = capsys.readouterr().err
    finally:
        assert proc.wait(timeout=300) == 0
    assert f"pid {proc.pid}" in err and len(err.strip().splitlines()) == 1, err
    return err


def test_two_harvests_into_one_folder_leave_one_harvest(tmp_path, capsys):
    ref, out = tmp_path / "ref", tmp_path / "h"
    argv = ["harvest", *HARVEST, "--n_tokens", str(15 * 60)]
    assert main([*argv, "--out", str(ref), "-q"]) == 0
    err = _second_writer_waits_out([*argv, "--out", str(out)], out, out / "tokens.npy", capsys)
    assert "is being written by another saelab process" in err
    assert snapshot(out) == snapshot(ref)


def test_two_trains_into_one_run_leave_one_run(tmp_path, capsys, synthetic_harvest):
    h = synthetic_harvest(tmp_path / "h", n_tokens=40_000, d_in=32, n_features=128)
    argv = ["train", "--harvest", str(h), "--sae.d_sae", "256", "--sae.k", "8"]
    argv += ["--batch_size", "256", "--n_tokens", "150000", "--eval_tokens", "4000"]
    argv += ["--checkpoint_every", "50", "--log_every", "5", "--device", "cpu", "--threads", "1"]
    ref, out = tmp_path / "ref", tmp_path / "r"
    assert main([*argv, "--out", str(ref), "-q"]) == 0
    _second_writer_waits_out([*argv, "--out", str(out)], out, out / "train_log.jsonl", capsys)
    for name in ("sae.safetensors", "train_log.jsonl"):
        if name == "train_log.jsonl":  # timings differ; steps, losses and rates do not
            import json

            strip = lambda p: [  # noqa: E731
                {k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"}
                for ln in p.read_text().splitlines()
            ]
            assert strip(out / name) == strip(ref / name)
        else:
            assert (out / name).read_bytes() == (ref / name).read_bytes()


def test_the_lock_is_released_on_exit_and_a_folder_it_made_is_removed(tmp_path):
    with pytest.raises(RuntimeError), writer_lock(tmp_path / "new"):
        raise RuntimeError
    assert not (tmp_path / "new").exists()
    with writer_lock(tmp_path / "kept"):
        atomic_write(tmp_path / "kept" / "x", "1")
    assert (tmp_path / "kept" / LOCK).read_bytes() == b""  # no PID left behind
    with writer_lock(tmp_path / "kept"), pytest.raises(UserError, match=f"pid {os.getpid()}"):
        with writer_lock(tmp_path / "kept"):
            pass


@pytest.mark.parametrize("command", ["eval", "index", "darkmatter", "export", "compare"])
@pytest.mark.parametrize("damage", ["{not json", '["a list"]', '{"complete": true}'])
def test_a_damaged_cfg_json_is_one_line_for_every_reader(tmp_path, capsys, command, damage):
    run = tmp_path / "r"
    run.mkdir()
    (run / "cfg.json").write_text(damage)
    (run / "sae.safetensors").write_bytes(b"")
    argv = [command, str(run)] + ([str(tmp_path / "out")] if command == "export" else [])
    assert main([*argv, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run) in err, err
    assert (run / "cfg.json").read_text() == damage and not (tmp_path / "out").exists()


def test_a_full_disk_inside_a_foreign_writer_is_an_oserror_and_leaves_no_temp(tmp_path):
    import errno

    def safetensors_like(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    target = tmp_path / "w.safetensors"
    with pytest.raises(OSError) as got:
        atomic_write(target, safetensors_like)
    assert got.value.errno == errno.ENOSPC and got.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch, synthetic_harvest):
    """The CLI's OSError boundary gets the checkpoint writer's full disk as one line, and the
    rerun (space freed) resumes to the end."""
    import safetensors.torch

    from saelab import checkpoint

    h = synthetic_harvest(tmp_path / "h", n_tokens=8000)
    argv = ["train", "--harvest", str(h), "--out", str(tmp_path / "r"), "--sae.d_sae", "64"]
    argv += [
        "--sae.k",
        "4",
        "--batch_size",
        "256",
        "--eval_tokens",
        "1000",
        "--checkpoint_every",
        "4",
    ]
    real = safetensors.torch.save_file

    def full(*a, **k):
        raise safetensors.SafetensorError("I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    assert main([*argv, "-q"]) == 2
    err = [ln for ln in capsys.readouterr().err.split("\n") if "error" in ln]
    assert len(err) == 1 and "No space left on device" in err[0]
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert main([*argv, "-q"]) == 0
