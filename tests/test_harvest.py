"""Harvest format, numerical parity with run_with_hooks, gradients, kill-safe resume, refusals."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

import saelab.harvest as H
from saelab import shards
from saelab.cli import main
from saelab.config import HarvestConfig
from saelab.corpus import contexts, load_texts
from saelab.errors import UserError
from saelab.models import load_model
from saelab.shards import LOG, REPAIR, read_meta, shard_path

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def cfg_for(tmp_path: Path, name: str = "h", **kw) -> HarvestConfig:
    base = dict(
        model="tiny", hooks=HOOKS, n_tokens=15 * 10, n_ctx=16, batch_size=3, shard_contexts=4,
        dtype="float32", out=str(tmp_path / name),
    )  # fmt: skip
    return HarvestConfig(**{**base, **kw})


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted harvest that several tests compare against."""
    tmp = tmp_path_factory.mktemp("ref")
    return H.harvest(cfg_for(tmp), progress=False)


def test_format(reference):
    header = json.loads((reference / "meta.json").read_text())
    assert "shards" not in header and header["model_dtype"] == "float32"
    lines = (reference / LOG).read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1, 2]
    meta = read_meta(reference)
    assert meta["format"] == 2 and meta["complete"] and meta["hooks"] == HOOKS
    assert (meta["n_ctx"], meta["tokens_per_context"], meta["d_in"]) == (16, 15, 64)
    assert meta["n_contexts"] == 10 and meta["n_tokens"] == meta["n_tokens_planned"] == 150
    tokens = np.load(reference / "tokens.npy")
    assert tokens.dtype == np.int32 and tokens.shape == (10, 16) and (tokens[:, 0] == 1).all()
    assert (
        hashlib.sha256((reference / "tokens.npy").read_bytes()).hexdigest() == meta["tokens_sha256"]
    )
    assert [s["context_start"] for s in meta["shards"]] == [0, 4, 8]
    assert [s["token_stop"] for s in meta["shards"]] == [60, 120, 150]
    for shard in meta["shards"]:
        assert set(shard["files"]) == {shard_path("acts", h, shard["index"]) for h in HOOKS}
        for rel, sha in shard["files"].items():
            arr = np.load(reference / rel)
            assert arr.shape == (shard["token_stop"] - shard["token_start"], 64)
            assert arr.dtype == np.float32
            assert hashlib.sha256((reference / rel).read_bytes()).hexdigest() == sha
    assert not list(reference.rglob(".*.tmp"))


def test_acts_match_run_with_hooks(reference, tiny):
    tokens = torch.from_numpy(np.load(reference / "tokens.npy")).long()
    for hook in HOOKS:
        _, cache = tiny.run_with_cache(tokens, names_filter=lambda n, hook=hook: n == hook)
        want = cache[hook][:, 1:].reshape(-1, 64).numpy()
        got = np.concatenate([np.load(reference / shard_path("acts", hook, i)) for i in range(3)])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_dtypes(tmp_path, reference, dtype):
    out = H.harvest(cfg_for(tmp_path, dtype=dtype, hooks=HOOKS[:1]), progress=False)
    got = np.load(out / shard_path("acts", HOOKS[0], 0))
    full = np.load(reference / shard_path("acts", HOOKS[0], 0))
    if dtype == "bfloat16":
        assert got.dtype == np.uint16
        got = torch.from_numpy(got.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_allclose(got, full, rtol=1e-2, atol=1e-2)


def test_grads_match_autograd(tmp_path, tiny):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid"]
    out = H.harvest(cfg_for(tmp_path, hooks=hooks, grads=True, n_tokens=60), progress=False)
    tokens = torch.from_numpy(np.load(out / "tokens.npy")).long()
    for hook in hooks:
        leaf = {}

        def swap(act, hook, leaf=leaf):
            leaf["x"] = act.detach().requires_grad_(True)
            return leaf["x"]

        with torch.enable_grad():
            logits = tiny.run_with_hooks(tokens, fwd_hooks=[(hook, swap)])
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"
            )
            (grad,) = torch.autograd.grad(loss, leaf["x"])
        got = np.load(out / shard_path("grads", hook, 0))
        np.testing.assert_allclose(got, grad[:, 1:].reshape(-1, 64).numpy(), atol=1e-5)
        acts = np.load(out / shard_path("acts", hook, 0))
        np.testing.assert_allclose(acts, leaf["x"][:, 1:].reshape(-1, 64).detach(), atol=1e-5)


def test_complete_rerun_returns_at_once(reference, monkeypatch):
    before = snapshot(reference)
    monkeypatch.setattr(H, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert H.harvest(cfg_for(reference.parent), progress=False) == reference
    assert snapshot(reference) == before


class _Crash(BaseException):
    """Stands in for a kill: nothing in saelab catches a BaseException."""


def test_crash_at_every_write_resumes_identically(tmp_path, reference, monkeypatch):
    want = snapshot(reference)
    real_replace = os.replace
    real_append = shards.append_lines
    # tokens, meta, then per shard: its files (renamed) and its log line, then the final meta
    n_writes = 2 + 3 * (len(HOOKS) + 1) + 1
    for crash_at in range(1, n_writes + 1):
        calls = []

        def replace(src, dst, crash_at=crash_at, calls=calls):
            calls.append(dst)
            if len(calls) == crash_at:
                raise _Crash
            real_replace(src, dst)

        def append(file, text, fsync, crash_at=crash_at, calls=calls):
            calls.append(file)
            if len(calls) == crash_at:
                raise _Crash
            real_append(file, text, fsync)

        out = tmp_path / str(crash_at)
        monkeypatch.setattr(H.os, "replace", replace)
        monkeypatch.setattr(shards, "append_lines", append)
        with pytest.raises(_Crash):
            H.harvest(cfg_for(out), progress=False)
        monkeypatch.setattr(H.os, "replace", real_replace)
        monkeypatch.setattr(shards, "append_lines", real_append)
        H.harvest(cfg_for(out), progress=False)
        assert snapshot(out / "h") == want, f"crash before write {crash_at}"
    assert len(calls) == n_writes, "the last write is the final meta.json"


@pytest.mark.parametrize("cut", [1, 30, -1])
def test_torn_log_line_is_ignored_then_cut(tmp_path, reference, cut):
    """A crash mid-append leaves part of a line: readers skip it, the next run cuts it off."""
    out = tmp_path / "h"
    shutil.copytree(reference, out)
    lines = (out / LOG).read_bytes().splitlines(keepends=True)
    torn = lines[2][:cut]  # the last shard's line, cut short (-1: all but its newline)
    (out / LOG).write_bytes(b"".join(lines[:2]) + torn)
    header = json.loads((out / "meta.json").read_text())
    header.update(complete=False, n_tokens=0, tokens_sha256="")
    (out / "meta.json").write_text(json.dumps(header, indent=1))
    meta = read_meta(out)
    assert [s["index"] for s in meta["shards"]] == [0, 1]
    assert meta["n_tokens"] == 120 and not meta["complete"]
    H.harvest(cfg_for(tmp_path), progress=False)
    assert snapshot(out) == snapshot(reference)


def test_sigkill_resume_is_byte_identical(tmp_path):
    slow = dict(n_tokens=15 * 80, shard_contexts=2, batch_size=1)  # 40 shards: time to kill
    want = snapshot(H.harvest(cfg_for(tmp_path / "ref", **slow), progress=False))
    killed = cfg_for(tmp_path / "killed", **slow)
    code = (
        "from saelab.config import HarvestConfig; from saelab.harvest import harvest; "
        f"harvest(HarvestConfig(**{killed.__dict__!r}), progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ})
    meta = Path(killed.out) / "meta.json"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (Path(killed.out) / LOG).is_file():
            break
        time.sleep(0.01)
    time.sleep(0.02)  # lands anywhere in the next shard: mid-forward, mid-write or mid-meta
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads(meta.read_text())["complete"], "the run ended before it was killed"
    H.harvest(killed, progress=False)
    assert snapshot(Path(killed.out)) == want


def test_other_config_is_refused_untouched(reference):
    before = snapshot(reference)
    for change, key in [
        (dict(hooks=["blocks.1.hook_resid_post"]), "hooks"),
        (dict(dtype="float16"), "dtype"),
        (dict(n_ctx=32), "n_ctx"),
        (dict(corpus="other.txt"), "corpus"),
        (dict(model="smollm2-135m"), "model"),
        (dict(n_tokens=1000), "n_tokens"),
    ]:
        with pytest.raises(UserError, match=f"{key}=.*another --out or delete"):
            H.harvest(cfg_for(reference.parent, **change), progress=False)
    assert snapshot(reference) == before


def test_disk_space_refusal(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(H.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(UserError, match="needs .* GB but .* GB free"):
        H.harvest(cfg_for(tmp_path), progress=False)
    assert not (tmp_path / "h").exists()


def test_progress_bar(tmp_path, capsys):
    H.harvest(cfg_for(tmp_path, hooks=HOOKS[:1]), progress=True)
    err = capsys.readouterr().err
    assert "tok/s" in err and "150/150" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hooks", "blocks.0.hook_bogus"], "unknown hook"),
        (["--hooks", "blocks.40.hook_resid_post"], "layer 40 is beyond the model's 2 blocks"),
        (["--model", "nobody-org/no-such-model"], "cannot be loaded offline"),
        (["--corpus", "./no/such/corpus.txt"], "does not exist"),
    ],
)
def test_cli_bad_input_exits_2_and_touches_nothing(reference, tmp_path, capsys, flags, message):
    before = snapshot(reference)
    argv = ["harvest", "--model", "tiny", "--n_tokens", "100", "--n_ctx", "16"]
    argv += ["--out", str(reference.parent / "new"), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert snapshot(reference) == before
    assert not (reference.parent / "new").exists()


def test_gated_hooks_are_enabled_or_refused(tmp_path):
    out = H.harvest(cfg_for(tmp_path, hooks=["blocks.1.hook_mlp_in"], n_tokens=30), progress=False)
    assert json.loads((out / "meta.json").read_text())["complete"]
    with pytest.raises(UserError, match="blocks.0.attn.hook_result is not available"):
        H.harvest(cfg_for(tmp_path, name="r", hooks=["blocks.0.attn.hook_result"]), progress=False)
    assert not (tmp_path / "r").exists()


def test_duplicate_hooks_refused(tmp_path):
    with pytest.raises(UserError, match="twice"):
        H.harvest(cfg_for(tmp_path, hooks=[HOOKS[0], HOOKS[0]]), progress=False)


def _cli_argv(out: Path) -> list[str]:
    """`saelab harvest` with cfg_for's settings."""
    cfg = cfg_for(out.parent, out.name)
    flags = {k: getattr(cfg, k) for k in ("model", "n_tokens", "n_ctx", "batch_size", "dtype")}
    argv = ["harvest", "--hooks", ",".join(cfg.hooks), "--shard_contexts", "4", "--out", str(out)]
    return argv + [x for k, v in flags.items() for x in (f"--{k}", str(v))]


DAMAGE = {
    "flipped": ("is corrupted (sha256 differs from the harvest's)", lambda f: _flip(f)),
    "deleted": ("is missing though the harvest lists it", lambda f: f.unlink()),
    "truncated": ("is truncated", lambda f: f.write_bytes(f.read_bytes()[:-8])),
}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_rerun_of_a_finished_harvest_verifies_every_shard(tmp_path, reference, capsys, damage):
    out = tmp_path / "h"
    shutil.copytree(reference, out)
    message, spoil = DAMAGE[damage]
    spoil(out / shard_path("acts", HOOKS[1], 1))  # not the first hook, not the first shard
    before = snapshot(out)
    with pytest.raises(UserError, match=rf"shard_00001.npy {re.escape(message)}") as err:
        H.harvest(cfg_for(tmp_path), progress=False)
    assert "\n" not in str(err.value) and REPAIR in str(err.value)
    assert main(_cli_argv(out)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert message in lines[-1] and "harvest ready" not in "".join(lines)
    assert snapshot(out) == before, "a refused rerun writes nothing"

    # The repair hint, followed: drop the shard's line and later ones, rerun the same config.
    lines = (out / LOG).read_text().splitlines(keepends=True)
    (out / LOG).write_text(lines[0])
    H.harvest(cfg_for(tmp_path), progress=False)
    assert snapshot(out) == snapshot(reference)


def test_rerun_of_a_finished_harvest_checks_its_tokens(tmp_path, reference):
    out = tmp_path / "h"
    shutil.copytree(reference, out)
    _flip(out / "tokens.npy")
    with pytest.raises(UserError, match="tokens.npy is missing or corrupt; delete"):
        H.harvest(cfg_for(tmp_path), progress=False)


def test_cli_null_text_corpus_exits_2_naming_the_line(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a few words"}\n{"text": null}\n')
    assert main([*_cli_argv(tmp_path / "new"), "--corpus", str(corpus)]) == 2
    assert "c.jsonl:2 has null under 'text'" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ streaming and dtypes


def test_streamed_tokens_equal_the_whole_corpus_tokenized_at_once(reference, tiny):
    texts = load_texts("default", "text", "train", 0)
    want = contexts(texts, tiny.tokenizer, 16, 10)
    np.testing.assert_array_equal(np.load(reference / "tokens.npy"), want)


def test_model_dtype_recorded_and_part_of_the_identity(tmp_path, reference):
    cfg = cfg_for(tmp_path, hooks=HOOKS[:1], model_dtype="bfloat16")
    out = H.harvest(cfg, progress=False)
    assert read_meta(out)["model_dtype"] == "bfloat16"
    got = np.load(out / shard_path("acts", HOOKS[0], 0))
    full = np.load(reference / shard_path("acts", HOOKS[0], 0))
    assert not np.array_equal(got, full)  # the model really ran in bfloat16
    np.testing.assert_allclose(got, full, rtol=0.1, atol=0.1)
    before = snapshot(out)
    with pytest.raises(UserError, match="model_dtype='bfloat16', but 'float32' was asked"):
        H.harvest(cfg_for(tmp_path, hooks=HOOKS[:1], model_dtype="float32"), progress=False)
    assert snapshot(out) == before
    # auto keeps the dtype a harvest began with: the rerun finds this one complete
    assert H.harvest(cfg_for(tmp_path, hooks=HOOKS[:1], model_dtype="auto"), progress=False) == out
    assert snapshot(out) == before


def test_auto_resumes_in_the_dtype_the_harvest_began_with(tmp_path, reference, monkeypatch):
    """A harvest begun when auto meant float32 resumes in float32 where auto now means
    bfloat16 (a CPU with bf16), byte-identical to the uninterrupted one."""
    out = tmp_path / "h"
    shutil.copytree(reference, out)
    lines = (out / LOG).read_text().splitlines(keepends=True)
    (out / LOG).write_text(lines[0])
    monkeypatch.setenv("SAELAB_CPU_BF16", "1")
    H.harvest(cfg_for(tmp_path, model_dtype="auto"), progress=False)
    assert snapshot(out) == snapshot(reference)


def test_auto_batch_size():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert H._batch_size(HarvestConfig(n_ctx=128), cpu) == 16
    assert H._batch_size(HarvestConfig(n_ctx=128, shard_contexts=1024), cuda) == 256
    assert H._batch_size(HarvestConfig(n_ctx=1024), cuda) == 32
    assert H._batch_size(HarvestConfig(n_ctx=128), cuda) == 256  # a whole shard
    assert H._batch_size(HarvestConfig(n_ctx=128, grads=True), cuda) == 16
    assert H._batch_size(HarvestConfig(batch_size=5), cuda) == 5


def test_auto_batch_size_is_recorded_and_kept_on_resume(tmp_path, reference, monkeypatch):
    out = tmp_path / "h"
    shutil.copytree(reference, out)
    lines = (out / LOG).read_text().splitlines(keepends=True)
    (out / LOG).write_text(lines[0])
    # batch_size=3 is in the header: a resume asking for auto (16 on CPU) still runs batches
    # of 3, so the redone shards come out byte-identical.
    H.harvest(cfg_for(tmp_path, batch_size=0), progress=False)
    assert snapshot(out) == snapshot(reference)
    fresh = H.harvest(cfg_for(tmp_path, "auto", batch_size=0, hooks=HOOKS[:1]), progress=False)
    assert read_meta(fresh)["batch_size"] == 16


def test_format1_harvest_resumes_into_a_log(tmp_path, reference):
    """An unfinished harvest of an older saelab (shard list in meta.json, no model_dtype)."""
    out = tmp_path / "h"
    shutil.copytree(reference, out)
    meta = read_meta(out)
    del meta["model_dtype"]
    meta.update(format=1, shards=meta["shards"][:1], n_tokens=60, complete=False)
    (out / LOG).unlink()
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    H.harvest(cfg_for(tmp_path), progress=False)
    got, want = snapshot(out), snapshot(reference)
    assert got.pop("meta.json") != want.pop("meta.json") and got == want
    resumed = read_meta(out)
    assert resumed["format"] == 2 and resumed["complete"] and "model_dtype" not in resumed


def test_resume_refuses_a_changed_corpus(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"line {i} of some text to tokenize" for i in range(400)))
    cfg = cfg_for(tmp_path, corpus=str(corpus), hooks=HOOKS[:1])
    out = H.harvest(cfg, progress=False)
    lines = (out / LOG).read_text().splitlines(keepends=True)
    (out / LOG).write_text(lines[0])
    corpus.write_text(corpus.read_text().replace("line 3 ", "line three "))
    before = snapshot(out)
    with pytest.raises(UserError, match="differs from the corpus's tokens in contexts 0..4"):
        H.harvest(cfg, progress=False)
    assert snapshot(out) == before


def test_too_short_a_corpus_is_refused_before_writing(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"word{i}" for i in range(30)))  # a few of the 10 contexts
    with pytest.raises(UserError, match=r"fills only [1-9] full contexts .*lower n_tokens"):
        H.harvest(cfg_for(tmp_path, corpus=str(corpus)), progress=False)
    assert not (tmp_path / "h").exists()
