"""The `saelab` command's boundaries: a bad flag or an OS error is one line and exit status 2,
nothing half-made is left behind, and -q works before or after the command."""

import errno
import json
import logging
import os
import pathlib
from pathlib import Path

import pytest

import saelab.harvest as H
from saelab.cli import COMMANDS, build_parser, main, os_error_line
from saelab.shards import META

DATA = dict(d_in=16, n_features=64, k_true=3, seed=1)
# A small, fast training run on the module's synthetic harvest.
TRAIN = [
    *("--sae.d_sae", "32", "--sae.k", "4", "--batch_size", "256", "--eval_tokens", "600"),
    *("--dead_tokens", "2000", "--checkpoint_every", "0", "--scale_sample", "1000"),
    *("--shuffle_buffer", "1024"),
]
# A small, fast harvest of the random tiny model.
HARVEST = ["--model", "tiny", "--hooks", "blocks.0.hook_resid_post", "--n_tokens", "150"]
HARVEST += ["--n_ctx", "16", "--batch_size", "4", "--shard_contexts", "4", "--dtype", "float32"]


@pytest.fixture(scope="module")
def harvest(tmp_path_factory, synthetic_harvest) -> Path:
    path = tmp_path_factory.mktemp("h") / "syn"
    return synthetic_harvest(path, n_tokens=3000, tokens_per_context=31, **DATA)


@pytest.fixture(scope="module")
def run(tmp_path_factory, harvest) -> Path:
    out = tmp_path_factory.mktemp("r") / "run"
    assert main(["train", "--harvest", str(harvest), "--out", str(out), *TRAIN]) == 0
    return out


def error_line(capsys, command: str) -> str:
    """The error of a command that had begun work: the last line of stderr, after any
    progress bar (a bar cut short by the error leaves no newline behind it)."""
    err = capsys.readouterr().err
    prefix = f"saelab {command}: error: "
    assert err.count(prefix) == 1 and err.endswith("\n") and "Traceback" not in err, err
    return err.splitlines()[-1].partition(prefix)[2]


def only_line(capsys, command: str) -> str:
    """The error of a command that must have written nothing else: no traceback, no usage."""
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"saelab {command}: error: "), err
    return err.strip().removeprefix(f"saelab {command}: error: ")


def tree(path: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
        for p in sorted(path.rglob("*"))
    }


# ---------------------------------------------------------------------------------------
# Bad values: refused when the config is built, before anything is written


@pytest.mark.parametrize(
    "flags,field",
    [
        (["--shuffle_buffer", "0"], "shuffle_buffer"),
        (["--scale_sample", "-1"], "scale_sample"),
        (["--scale_sample", "0"], "scale_sample"),
        (["--lr", "nan"], "lr"),
        (["--lr", "inf"], "lr"),
        (["--betas", "1.5,0.9"], "betas"),
        (["--betas", "0.9"], "betas"),
        (["--threads", "-1"], "threads"),
        (["--device", "tpu"], "device"),
        (["--device", "cuda:x"], "device"),
        (["--freq_decay", "5"], "freq_decay"),
        (["--freq_decay", "1"], "freq_decay"),
        (["--auxk_alpha", "-1"], "auxk_alpha"),
        (["--lr_warmup_steps", "-5"], "lr_warmup_steps"),
        (["--sae.beta", "nan"], "sae.beta"),
        (["--k_aux", "4097"], "k_aux"),
        (["--sae.d_sae", "64", "--k_aux", "65"], "k_aux"),
        (["--batch_size", "3.5"], "batch_size"),
        (["--batch_size", "inf"], "batch_size"),
    ],
)
def test_train_refuses_bad_values_before_writing(flags, field, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out, runs/…, would land here
    assert main(["train", "--harvest", "h", *flags]) == 2
    msg = only_line(capsys, "train")
    assert msg.startswith(field + "=") or msg.startswith(field + " "), msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv,field",
    [
        (["harvest", "--n_ctx", "1"], "n_ctx"),
        (["harvest", "--hooks", ""], "hooks"),
        (["train", "--shuffle_buffer", "0"], "shuffle_buffer"),
        (["eval", "r", "--mp_tol", "1"], "mp_tol"),
        (["compare", "r", "--batch_size", "0"], "batch_size"),
        (["darkmatter", "r", "--ridge", "nan"], "ridge"),
        (["index", "r", "--hist_bins", "0"], "hist_bins"),
        (["index", "r", "--device", "tpu"], "device"),
        (["explain", "r", "--n_show", "0"], "n_show"),
    ],
)
def test_every_command_refuses_a_bad_field_in_one_line(argv, field, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert only_line(capsys, argv[0]).startswith(field + "=")
    assert list(tmp_path.iterdir()) == []


def test_every_config_command_is_covered_above():
    tested = {"harvest", "train", "eval", "compare", "darkmatter", "index", "explain"}
    assert tested == {name for name, cmd in COMMANDS.items() if cmd.config is not None}


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_app_refuses_a_port_out_of_range(port, capsys):
    assert main(["app", "--port", port]) == 2
    assert "1..65535" in only_line(capsys, "app")


def test_a_refused_value_leaves_nothing_in_the_way(harvest, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", "--harvest", str(harvest), "--out", str(out), *TRAIN]
    assert main([*argv, "--shuffle_buffer", "0"]) == 2
    assert only_line(capsys, "train").startswith("shuffle_buffer=0 must be positive")
    assert not out.exists()
    assert main(argv) == 0
    assert json.loads((out / "cfg.json").read_text())["complete"]


# ---------------------------------------------------------------------------------------
# OS errors: one line naming the path and the fix


def test_train_out_below_a_file(harvest, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    bad = blocker / "x"
    argv = ["train", "--harvest", str(harvest), *TRAIN, "--out"]
    assert main([*argv, str(bad)]) == 2
    msg = error_line(capsys, "train")
    assert msg.startswith(f"{bad}: Not a directory; a folder on that path is a file"), msg
    assert tree(tmp_path) == {"file": b"keep me"}
    assert main([*argv, str(tmp_path / "good")]) == 0


def test_train_out_that_is_a_file(harvest, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert main(["train", "--harvest", str(harvest), *TRAIN, "--out", str(blocker)]) == 2
    assert error_line(capsys, "train").startswith(f"{blocker}: ")
    assert blocker.read_text() == "keep me"


def test_harvest_out_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert main(["harvest", *HARVEST, "--out", str(blocker)]) == 2
    msg = error_line(capsys, "harvest")
    assert msg.startswith(f"{blocker}: File exists; something is in the way there"), msg
    assert tree(tmp_path) == {"file": b"keep me"}
    assert main(["harvest", *HARVEST, "--out", str(tmp_path / "h")]) == 0
    assert json.loads((tmp_path / "h" / META).read_text())["complete"]


def test_a_name_too_long(harvest, tmp_path, capsys):
    long = tmp_path / ("a" * 300)
    assert main(["train", "--harvest", str(harvest), *TRAIN, "--out", str(long)]) == 2
    msg = error_line(capsys, "train")
    assert msg.startswith(f"{long}: File name too long; choose a shorter name"), msg
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder(harvest, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root writes through 0o500: raise what a read-only mount would
        mkdir = pathlib.Path.mkdir

        def read_only_mkdir(self, *args, **kwargs):
            if ro in self.parents:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return mkdir(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "mkdir", read_only_mkdir)
    try:
        argv = ["train", "--harvest", str(harvest), *TRAIN, "--out"]
        assert main([*argv, str(ro / "run")]) == 2
        msg = error_line(capsys, "train")
        assert msg.startswith(f"{ro / 'run'}: "), msg
        assert ("read-only file system" if os.geteuid() == 0 else "permissions") in msg.lower()
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)
    monkeypatch.undo()
    assert main([*argv, str(tmp_path / "rw")]) == 0


def test_a_full_disk_mid_harvest_then_resume(tmp_path, monkeypatch, capsys):
    write = H.write_shard_files

    def full_on_second_shard(out, meta, index, *args):
        if index == 1:  # like a failed write() on a full disk: the OS names no file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(out, meta, index, *args)

    monkeypatch.setattr(H, "write_shard_files", full_on_second_shard)
    argv = ["harvest", *HARVEST, "--out", str(tmp_path / "h")]
    assert main(argv) == 2
    msg = error_line(capsys, "harvest")
    assert msg == (
        "No space left on device; free some space or write elsewhere, "
        "then run the same command again"
    )
    monkeypatch.undo()
    assert main(argv) == 0
    meta = json.loads((tmp_path / "h" / META).read_text())
    assert meta["complete"] and meta["n_tokens"] >= 150


def test_export_below_a_file(run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert main(["export", str(run), str(blocker / "x")]) == 2
    assert error_line(capsys, "export").startswith(f"{blocker}: ")
    assert tree(tmp_path) == {"file": b"keep me"}


@pytest.mark.parametrize(
    "error,line",
    [
        (
            PermissionError(errno.EACCES, "Permission denied", "/x/y"),
            "/x/y: Permission denied; fix its permissions",
        ),
        (
            OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"),
            "/a -> /b: Invalid cross-device link; check the path",
        ),
        (OSError(errno.EIO, "Input/output error", "a\nb"), "a b: Input/output error; check"),
        (OSError("no errno at all"), "no errno at all; check the path"),
    ],
)
def test_os_error_line(error, line):
    text = os_error_line(error)
    assert text.startswith(line) and "\n" not in text


# ---------------------------------------------------------------------------------------
# -q before or after the command


@pytest.mark.parametrize("command", list(COMMANDS))
def test_quiet_flag_in_either_position(command):
    parser = build_parser()
    args = {"export": ["r", "o"], "compare": ["r"], "darkmatter": ["r"]}.get(command, [])
    assert parser.parse_known_args(["-q", command, *args])[0].quiet
    assert parser.parse_known_args([command, *args, "-q"])[0].quiet
    assert not parser.parse_known_args([command, *args])[0].quiet


@pytest.mark.parametrize(
    "argv,level",
    [
        (["-q", "export", "none", "out"], logging.WARNING),
        (["export", "none", "out", "-q"], logging.WARNING),
        (["export", "none", "out"], logging.INFO),
    ],
)
def test_quiet_sets_the_log_level(argv, level, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    levels = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    main(argv)
    assert levels == [level]
