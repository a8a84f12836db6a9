"""Activation sources: every kind meets the protocol; live and array streams resume at any row,
share one shuffle plan (so live training equals training on the same contexts' activations),
a killed live run resumes exactly, and a live run's held-out harvest is disjoint from its
training contexts and opens in eval, index and dark matter."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.cli import main
from saelab.config import HarvestConfig, SAEConfig, TrainConfig
from saelab.corpus import contexts, load_texts
from saelab.errors import UserError
from saelab.harvest import harvest, n_contexts_for
from saelab.models import load_model
from saelab.sources import (
    ActivationSource,
    ArraySource,
    LiveSource,
    StoreSource,
    _Contexts,
    buffer_rows,
)
from saelab.store import ActivationStore
from saelab.trainer import _DeviceFeed, heldout_config, train, train_on

HOOK = "blocks.0.hook_resid_post"
N_CTX = 16
PER = N_CTX - 1
MB = 8  # contexts per model forward: live and harvest forwards line up on multiples of it


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """One finished live run, shared by the tests that only read it."""
    return train(_live_cfg(tmp_path_factory.mktemp("live") / "r"), progress=False)


def _live(model, n_tokens=PER * 40, skip=0, buffer=PER * 12, **kw):
    return LiveSource(
        model, HOOK, n_tokens=n_tokens, n_ctx=N_CTX, skip_contexts=skip, model_batch_size=MB,
        shuffle_buffer=buffer, **kw,
    )  # fmt: skip


def _take(stream, n):
    try:
        return [b if isinstance(b, tuple) else (b,) for _, b in zip(range(n), stream)]
    finally:
        stream.close()


def _cat(batches, i=0):
    return torch.cat([b[i] for b in batches])


def _live_cfg(out, **kw):
    base = dict(
        model="tiny", hooks=[HOOK], n_ctx=N_CTX, model_batch_size=MB, n_tokens=PER * 64,
        eval_tokens=PER * 20, batch_size=60, shuffle_buffer=PER * 16, out=str(out),
        heldout=str(out.parent / "heldout"), sae=SAEConfig("topk", 64, 4), dead_tokens=500,
        checkpoint_every=5, lr_warmup_steps=2, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------
# The protocol and the shared plan


def test_every_source_meets_the_protocol(tiny, synthetic_harvest, tmp_path):
    store = ActivationStore(synthetic_harvest(tmp_path / "h", n_tokens=620))
    sources = [
        StoreSource(store, (0, 310), shuffle_buffer=128),
        ArraySource(torch.randn(100, 8), shuffle_buffer=32),
        _live(tiny),
    ]
    for src in sources:
        assert isinstance(src, ActivationSource), src
        (x,) = _take(src.batches(7, seed=1), 1)[0]
        assert x.shape == (7, src.d_in) and x.dtype == torch.float32
        s = src.sample(20, seed=0)
        assert s.shape == (20, src.d_in) and s.dtype == torch.float32
        assert isinstance(src.identity(), dict) and src.n_tokens > 0


def test_store_batches_in_storage_dtype_reach_the_device_as_the_float32_ones(tmp_path):
    from saelab.synthetic import SyntheticData, write_harvest

    store = ActivationStore(write_harvest(tmp_path / "h", SyntheticData(16), 620, dtype="float16"))
    half = StoreSource(store, (0, 400), 128, StoreSource.storage_dtype(store))
    full = StoreSource(store, (0, 400), 128)
    feed = _DeviceFeed(torch.device("cpu"))
    for (a,), (b,) in zip(_take(half.batches(50, seed=1), 12), _take(full.batches(50, seed=1), 12)):
        assert a.dtype == torch.float16 and feed(a).dtype == torch.float32
        assert torch.equal(feed(a), b) and feed(b) is b  # float32 already there: no copy


def test_array_epoch_permutes_within_consecutive_buffers():
    rows = torch.arange(50, dtype=torch.float32)[:, None].repeat(1, 3)
    src = ArraySource(rows, tokens_per_context=5, shuffle_buffer=23)  # buffers of 4 contexts
    assert src.rows_per_buffer == buffer_rows(23, 5) == 20
    got = _cat(_take(src.batches(10, seed=3), 10))[:, 0]
    for epoch in range(2):
        e = got[epoch * 50 : (epoch + 1) * 50]
        for a, b in ((0, 20), (20, 40), (40, 50)):  # each buffer is a permutation of its rows
            assert sorted(e[a:b].tolist()) == list(range(a, b))
        assert not torch.equal(e, torch.arange(50.0))
    assert not torch.equal(got[:50], got[50:])  # the permutation depends on the epoch


@pytest.mark.parametrize("start_row", [0, 37, 180, 599, 641])
def test_array_start_row_yields_the_rest_of_the_stream(start_row):
    src = ArraySource(torch.randn(600, 4), tokens_per_context=6, shuffle_buffer=100)
    full = _cat(_take(src.batches(16, seed=5), 60))
    rest = _cat(_take(src.batches(16, seed=5, start_row=start_row), 10))
    assert torch.equal(rest, full[start_row : start_row + 160])


@pytest.mark.parametrize("start_row", [0, 37])
def test_array_parts_are_slices_of_each_batch(start_row):
    src = ArraySource(torch.randn(600, 4), tokens_per_context=6, shuffle_buffer=100)
    full = _take(src.batches(16, seed=5, start_row=start_row), 50)
    for r in range(4):
        mine = _take(src.batches(16, seed=5, start_row=start_row, part=(r, 4)), 50)
        assert all(torch.equal(a[0], b[0][4 * r : 4 * r + 4]) for a, b in zip(mine, full))


def test_array_files_read_like_the_array(tmp_path):
    acts, grads = torch.randn(90, 6), torch.randn(90, 6)
    np.save(tmp_path / "a.npy", acts.numpy())
    save_file({"acts": acts, "other": grads}, str(tmp_path / "a.safetensors"))
    want = _take(ArraySource(acts, grads=grads, shuffle_buffer=40).batches(8, grads=True), 15)
    for path in (tmp_path / "a.npy", tmp_path / "a.safetensors"):
        src = ArraySource(path, hook="acts", grads=grads, shuffle_buffer=40)
        got = _take(src.batches(8, grads=True), 15)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(want, got))
    with pytest.raises(UserError, match="name the activations' tensor"):
        ArraySource(tmp_path / "a.safetensors", hook="nope")


# ---------------------------------------------------------------------------------------
# Live


def test_context_cursor_reads_any_window_range_across_blocks(tiny):
    texts = lambda: load_texts("default")  # noqa: E731
    want = contexts(texts(), tiny.tokenizer, N_CTX, 60)
    cursor = _Contexts(texts, tiny.tokenizer, N_CTX, chunk=7)
    for start, count in [(0, 3), (3, 9), (19, 15), (34, 1), (2, 20), (40, 20)]:  # back: restart
        assert np.array_equal(cursor.take(start, count), want[start : start + count])
    with pytest.raises(UserError, match="corpus ran out"):
        _Contexts(lambda: iter(["a b c"]), tiny.tokenizer, N_CTX).take(0, 2)


def test_live_start_row_skips_whole_buffers_without_the_model(tiny, monkeypatch):
    src = _live(tiny)  # 40 contexts, buffers of 12 contexts = 180 rows
    full = _cat(_take(src.batches(25, seed=2), 30))  # past one epoch of 600 rows
    filled = []
    real = LiveSource._fill
    monkeypatch.setattr(
        LiveSource, "_fill", lambda self, a, b, g: filled.append((a, b)) or real(self, a, b, g)
    )
    for start in (200, 590):
        filled.clear()
        rest = _cat(_take(src.batches(25, seed=2, start_row=start), 4))
        torch.testing.assert_close(rest, full[start : start + 100], rtol=0, atol=0)
        assert filled[0][0] == (start % 600) // 180 * 180  # no forward of earlier buffers


def test_live_stream_equals_the_array_of_the_same_contexts(tiny, tmp_path):
    skip, n = 2 * MB, 40
    h = HarvestConfig(
        model="tiny", hooks=[HOOK], n_tokens=(skip + n) * PER, n_ctx=N_CTX, batch_size=MB,
        dtype="float32", out=str(tmp_path / "h"),
    )  # fmt: skip
    store = ActivationStore(harvest(h, progress=False))
    array = ArraySource(
        store.read(skip * PER, store.n_tokens), hook=HOOK, tokens_per_context=PER,
        shuffle_buffer=PER * 12,
    )  # fmt: skip
    live = _live(tiny, n_tokens=n * PER, skip=skip)
    a, b = _take(array.batches(33, seed=4), 25), _take(live.batches(33, seed=4), 25)
    torch.testing.assert_close(_cat(a), _cat(b), rtol=0, atol=1e-6)
    torch.testing.assert_close(array.sample(100, 1), live.sample(100, 1), rtol=0, atol=1e-6)


def test_live_gradients_equal_a_harvest_of_gradients(tiny, tmp_path):
    h = HarvestConfig(
        model="tiny", hooks=[HOOK], n_tokens=8 * PER, n_ctx=N_CTX, batch_size=MB,
        dtype="float32", grads=True, out=str(tmp_path / "h"),
    )  # fmt: skip
    store = ActivationStore(harvest(h, progress=False))
    array = ArraySource(
        store.read(0, store.n_tokens), grads=store.read(0, store.n_tokens, "grads"),
        tokens_per_context=PER, shuffle_buffer=PER * 4,
    )  # fmt: skip
    live = _live(tiny, n_tokens=8 * PER, buffer=PER * 4)
    a, b = _take(array.batches(20, grads=True), 6), _take(live.batches(20, grads=True), 6)
    for i in (0, 1):
        torch.testing.assert_close(_cat(a, i), _cat(b, i), rtol=0, atol=1e-6)
    assert _cat(b, 1).abs().sum() > 0


def test_live_training_equals_training_on_the_same_activations(live_run, tmp_path):
    cfg = _live_cfg(live_run)
    skip = n_contexts_for(heldout_config(cfg))
    h = HarvestConfig(
        model="tiny", hooks=[HOOK], n_tokens=skip * PER + cfg.n_tokens, n_ctx=N_CTX,
        batch_size=MB, dtype="float32", out=str(tmp_path / "h"),
    )  # fmt: skip
    store = ActivationStore(harvest(h, progress=False))
    array = ArraySource(
        store.read(skip * PER, store.n_tokens), hook=HOOK, tokens_per_context=PER,
        shuffle_buffer=cfg.shuffle_buffer,
    )  # fmt: skip
    array_run = train_on(array, _live_cfg(tmp_path / "array"), progress=False)
    a, b = load_file(live_run / "sae.safetensors"), load_file(array_run / "sae.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    la = [json.loads(x)["fvu"] for x in (live_run / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["fvu"] for x in (array_run / "train_log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-5) and la[-1] < la[0]


class _Interrupt(Exception):
    pass


def test_killed_live_run_resumes_to_the_same_weights(live_run, tmp_path, monkeypatch):
    full = live_run
    real = LiveSource.batches

    def dying(self, *a, **k):
        stream = real(self, *a, **k)
        for i, b in enumerate(stream):
            if i == 12:  # past the checkpoint at step 10
                raise _Interrupt
            yield b

    monkeypatch.setattr(LiveSource, "batches", dying)
    with pytest.raises(_Interrupt):
        train(_live_cfg(tmp_path / "cut"), progress=False)
    monkeypatch.setattr(LiveSource, "batches", real)

    def no_sample(self, *a, **k):
        raise AssertionError("a resume of checkpointed members samples nothing")

    monkeypatch.setattr(LiveSource, "sample", no_sample)
    cut = train(_live_cfg(tmp_path / "cut"), progress=False)
    a, b = load_file(full / "sae.safetensors"), load_file(cut / "sae.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda p: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
        for x in (p / "train_log.jsonl").read_text().splitlines()
    ]
    assert strip(full) == strip(cut)


def test_one_forward_feeds_every_member_of_a_live_sweep(tmp_path, monkeypatch):
    fills = []
    real = LiveSource._fill
    monkeypatch.setattr(
        LiveSource, "_fill", lambda self, a, b, g: fills.append((a, b)) or real(self, a, b, g)
    )
    sweep = [SAEConfig("topk", 64, 4), SAEConfig("topk", 32, 2)]
    cfg = _live_cfg(tmp_path / "sweep", sweep=sweep, n_tokens=PER * 32, checkpoint_every=0)
    root = train(cfg, progress=False)
    runs = sorted(p for p in root.iterdir() if (p / "cfg.json").is_file())
    assert [json.loads((p / "cfg.json").read_text())["complete"] for p in runs] == [True, True]
    size = cfg.shuffle_buffer // PER * PER
    # the scale sample's contexts, then each buffer of the epoch once
    assert fills[1:] == [(a, min(a + size, PER * 32)) for a in range(0, PER * 32, size)]


def test_heldout_and_training_contexts_are_disjoint_windows_of_one_stream(tiny, live_run):
    run, cfg = live_run, _live_cfg(live_run)
    run_cfg = json.loads((run / "cfg.json").read_text())
    held = ActivationStore(run_cfg["harvest"], HOOK)
    assert run_cfg["eval_range"] == [0, held.n_tokens] and "train_range" not in run_cfg
    assert run_cfg["live"]["skip_contexts"] == len(held.tokens())
    live = _live(tiny, n_tokens=cfg.n_tokens, skip=run_cfg["live"]["skip_contexts"])
    trained = live.tokens(0, live.n_contexts)
    n_held = len(held.tokens())
    stream = contexts(load_texts("default"), tiny.tokenizer, N_CTX, n_held + len(trained))
    assert np.array_equal(held.tokens(), stream[:n_held])
    assert np.array_equal(trained, stream[n_held:])


def test_eval_index_and_darkmatter_open_a_live_run(live_run):
    run = live_run
    assert main(["eval", str(run), "--device", "cpu", "--ce_contexts", "2"]) == 0
    assert main(["index", str(run), "--quiet"]) == 0
    dm = ["darkmatter", str(run), "--device", "cpu", "--figures", "false", "--ce_contexts", "2"]
    assert main(dm) == 0
    held_rows = json.loads((run / "cfg.json").read_text())["eval_range"][1]
    assert json.loads((run / "eval.json").read_text())["n_tokens"] == held_rows
    assert (run / "features.sqlite").is_file() and (run / "darkmatter.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("page", ["runs", "features", "darkmatter", "dead", "prompt"])
def test_the_app_shows_a_live_run(live_run, monkeypatch, page):
    from streamlit.testing.v1 import AppTest

    if not (live_run / "darkmatter.json").is_file():
        test_eval_index_and_darkmatter_open_a_live_run(live_run)
    monkeypatch.setenv("SAELAB_RUNS_DIR", str(live_run.parent))
    at = AppTest.from_file(str(Path(__file__).parent.parent / "app" / "Home.py"))
    at.default_timeout = 120
    at.run()
    if page != "runs":
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    if page == "runs":
        assert list(at.dataframe[0].value["run"]) == [live_run.name]


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--harvest", "h", "--model", "tiny"], "both --harvest and --model given"),
        ([], "no training data given"),
        (["--model", "tiny", "--eval_tokens", "30"], "pass --n_tokens"),
        (["--model", "tiny", "--n_tokens", "300", "--eval_tokens", "0"], "--eval_tokens > 0"),
        (["--model", "tiny", "--n_tokens", "300", "--hooks", "a,b"], "one hook at a time"),
        (["--harvest", "h", "--hooks", HOOK], "pick a harvest's hook with --hook"),
    ],
)
def test_cli_data_errors_exit_2_without_writing(tmp_path, capsys, monkeypatch, args, msg):
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
