"""ActivationStore on hand-built harvests whose rows encode their own index."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab import shards
from saelab import store as store_module
from saelab import stream as stream_module
from saelab.errors import UserError
from saelab.store import ActivationStore

HOOK = "blocks.0.hook_resid_post"
BOS = 1
_NP = {"float16": np.float16, "float32": np.float32}


def encode_rows(rows: np.ndarray, d_in: int) -> np.ndarray:
    """Row t -> [t % 128, t // 128 % 128, t // 16384, noise...]: exact even in bf16."""
    rng = np.random.default_rng(rows[0] if len(rows) else 0)
    x = rng.standard_normal((len(rows), d_in)).astype(np.float32)
    x[:, 0], x[:, 1], x[:, 2] = rows % 128, rows // 128 % 128, rows // 16384
    return x


def decode_rows(x: torch.Tensor) -> np.ndarray:
    x = x.to(torch.float32).numpy().astype(np.int64)
    return x[:, 0] + 128 * x[:, 1] + 16384 * x[:, 2]


def _store_bytes(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.astype(_NP[dtype])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_harvest(
    tmp_path: Path,
    n_contexts: int = 24,
    n_ctx: int = 9,
    d_in: int = 6,
    shard_contexts: int = 5,
    dtype: str = "float16",
    hooks: tuple[str, ...] = (HOOK,),
    grads: bool = False,
    name: str = "h",
) -> Path:
    """A complete harvest; acts rows encode their index, grads are -acts (hook h adds 1000*h)."""
    root = tmp_path / name
    root.mkdir()
    tpc = n_ctx - 1
    tokens = np.arange(n_contexts * n_ctx, dtype=np.int32).reshape(n_contexts, n_ctx) + 100
    tokens[:, 0] = BOS
    np.save(root / "tokens.npy", tokens)
    shards = []
    for index, c0 in enumerate(range(0, n_contexts, shard_contexts)):
        c1 = min(c0 + shard_contexts, n_contexts)
        t0, t1 = c0 * tpc, c1 * tpc
        files = {}
        for h, hook in enumerate(hooks):
            acts = encode_rows(np.arange(t0, t1), d_in)
            acts[:, 3:] += 1000 * h
            for kind, data in [("acts", acts), ("grads", -acts)][: 2 if grads else 1]:
                rel = f"{kind}/{hook}/shard_{index:05d}.npy"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                np.save(root / rel, _store_bytes(data, dtype))
                files[rel] = _sha(root / rel)
        shards.append(
            {
                "index": index,
                "context_start": c0,
                "context_stop": c1,
                "token_start": t0,
                "token_stop": t1,
                "files": files,
            }
        )
    meta = {
        "format": 1,
        "saelab_version": "test",
        "model": "tiny",
        "hooks": list(hooks),
        "d_in": d_in,
        "dtype": dtype,
        "n_ctx": n_ctx,
        "tokens_per_context": tpc,
        "n_contexts": n_contexts,
        "n_tokens_planned": n_contexts * tpc,
        "n_tokens": n_contexts * tpc,
        "shard_contexts": shard_contexts,
        "corpus": {},
        "seed": 0,
        "grads": grads,
        "complete": True,
        "tokens_sha256": _sha(root / "tokens.npy"),
        "shards": shards,
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _edit_meta(root: Path, **changes) -> None:
    """Change meta.json, or the shard log where a format-2 harvest keeps its "shards"."""
    meta = json.loads((root / "meta.json").read_text())
    if meta["format"] == 2 and "shards" in changes:
        entries = changes.pop("shards")
        (root / shards.LOG).write_text("".join(json.dumps(e) + "\n" for e in entries))
    meta.update(changes)
    (root / "meta.json").write_text(json.dumps(meta))


def take_rows(stream, n_batches: int) -> list[np.ndarray]:
    return [decode_rows(next(stream)) for _ in range(n_batches)]


SMALL = dict(chunk_rows=8, shuffle_buffer=32)  # several chunks per buffer, many buffers


@pytest.fixture(params=[1, 2], ids=["format1", "format2"])
def harvest(tmp_path: Path, request) -> Path:
    """24 contexts x 8 rows = 192 rows in 5 shards: the shard list inside meta.json (format 1,
    as older saelab wrote it), or converted to a header and a shard log (format 2)."""
    root = make_harvest(tmp_path)
    if request.param == 2:
        shards.convert_v1(root, shards.read_meta(root))
    return root


# ------------------------------------------------------------------ random access


def test_attributes(harvest: Path):
    s = ActivationStore(harvest)
    assert (s.hook, s.d_in, s.n_tokens, s.n_ctx, s.tokens_per_context) == (HOOK, 6, 192, 9, 8)
    assert s.storage_dtype == "float16" and not s.has_grads


def test_read_spans_shards(harvest: Path):
    s = ActivationStore(harvest)
    whole = s.read(0, s.n_tokens)
    assert whole.dtype == torch.float32 and whole.shape == (192, 6)
    np.testing.assert_array_equal(decode_rows(whole), np.arange(192))
    parts = torch.cat([s.read(a, b) for a, b in [(0, 30), (30, 41), (41, 150), (150, 192)]])
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)
    assert s.read(35, 45, dtype=torch.float16).dtype == torch.float16
    assert s.read(7, 7).shape == (0, 6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
def test_storage_dtype_round_trip(tmp_path: Path, dtype: str):
    s = ActivationStore(make_harvest(tmp_path, dtype=dtype))
    expect = torch.from_numpy(encode_rows(np.arange(0, 40), 6))
    expect = expect.to(
        {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    )
    torch.testing.assert_close(s.read(0, 40), expect.float(), rtol=0, atol=0)
    np.testing.assert_array_equal(decode_rows(next(s.batches(50, **SMALL))).size, 50)


def test_locate_and_context_skip_bos(harvest: Path):
    s = ActivationStore(harvest)
    tokens = s.tokens()
    assert tokens.shape == (24, 9) and (tokens[:, 0] == BOS).all()
    assert s.locate(0) == (0, 1)
    assert s.locate(7) == (0, 8)
    assert s.locate(8) == (1, 1)
    assert s.locate(191) == (23, 8)
    for row in [0, 5, 8, 100, 191]:
        ctx, pos = s.locate(row)
        window, i = s.context(row, before=3, after=2)
        assert window[i] == tokens[ctx, pos] == 100 + ctx * 9 + pos
        np.testing.assert_array_equal(window, tokens[ctx, max(0, pos - 3) : pos + 3])
    window, i = s.context(8, before=3)
    assert window[0] == BOS and i == 1
    with pytest.raises(IndexError):
        s.locate(192)


def test_sample_distinct_rows_in_range(harvest: Path):
    s = ActivationStore(harvest)
    rows = decode_rows(s.sample(50, seed=3, token_range=(20, 120)))
    assert len(set(rows)) == 50 and rows.min() >= 20 and rows.max() < 120
    np.testing.assert_array_equal(rows, decode_rows(s.sample(50, seed=3, token_range=(20, 120))))
    assert len(s.sample(10_000)) == 192
    assert s.sample(0).shape == (0, 6)


# ------------------------------------------------------------------ streaming


def test_exact_epochs(harvest: Path):
    s = ActivationStore(harvest)
    stream = s.batches(25, seed=1, **SMALL)  # 25 does not divide 192
    assert stream.rows_per_epoch == 192
    rows = np.concatenate(take_rows(stream, 3 * 192 // 25 + 1))
    for e in range(3):
        assert sorted(rows[e * 192 : (e + 1) * 192]) == list(range(192))
    assert not np.array_equal(rows[:192], rows[192:384])  # reshuffled each epoch
    assert not np.array_equal(rows[:192], np.arange(192))


def test_default_sizes_shuffle_everything(harvest: Path):
    rows = np.concatenate(take_rows(ActivationStore(harvest).batches(64), 3))
    assert sorted(rows) == list(range(192))


def test_seed_determinism(harvest: Path):
    s = ActivationStore(harvest)
    a = np.concatenate(take_rows(s.batches(16, seed=5, **SMALL), 20))
    b = np.concatenate(take_rows(s.batches(16, seed=5, **SMALL), 20))
    c = np.concatenate(take_rows(s.batches(16, seed=6, **SMALL), 20))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rows_shuffled_within_each_buffer(harvest: Path):
    s = ActivationStore(harvest)

    def buffers(seed: int, chunk_rows: int, shuffle_buffer: int) -> np.ndarray:
        # One batch per buffer: 192 rows divide into buffers of shuffle_buffer rows.
        stream = s.batches(shuffle_buffer, seed=seed, chunk_rows=chunk_rows,
                           shuffle_buffer=shuffle_buffer)  # fmt: skip
        return np.stack(take_rows(stream, 192 // shuffle_buffer))

    # One chunk per buffer: each buffer holds the 8 rows of one chunk, in a seeded order.
    one = buffers(5, 8, 8)
    assert sorted((one // 8).tolist()) == [[c] * 8 for c in range(24)]
    perms = one % 8  # the order of each buffer's rows, independent of which chunk it holds
    assert all(sorted(p) == list(range(8)) for p in perms.tolist())
    unsorted = [p != sorted(p) for p in perms.tolist()]
    assert sum(unsorted) >= 22  # an identity permutation of 8 has probability 1/40320
    assert len({tuple(p) for p in perms.tolist()}) >= 20  # each buffer draws its own order
    np.testing.assert_array_equal(buffers(5, 8, 8), one)  # deterministic in the seed
    assert not np.array_equal(buffers(6, 8, 8) % 8, perms)
    # Four chunks per buffer: whole chunks, their rows interleaved, not read one by one.
    four = buffers(5, 8, 32)
    for rows in four:
        chunks = rows // 8
        assert sorted(np.bincount(chunks, minlength=24).tolist()) == [0] * 20 + [8] * 4
        assert len(set(chunks[:8].tolist())) > 1  # not chunk after chunk
        assert int((np.diff(rows) == 1).sum()) < 10  # a run of 31 without a shuffle
    np.testing.assert_array_equal(buffers(5, 8, 32), four)


@pytest.mark.parametrize("r", [1, 13, 32, 45, 191, 192, 200, 389])
def test_resume_matches_tail(harvest: Path, r: int):
    s = ActivationStore(harvest)
    full = np.concatenate(take_rows(s.batches(10, seed=2, **SMALL), 60))
    resumed = np.concatenate(take_rows(s.batches(7, seed=2, start_row=r, **SMALL), 30))
    np.testing.assert_array_equal(resumed, full[r : r + len(resumed)])


def test_token_range_split_is_disjoint(harvest: Path):
    s = ActivationStore(harvest)
    train = np.concatenate(take_rows(s.batches(10, token_range=(0, 150), **SMALL), 15))
    test = np.concatenate(take_rows(s.batches(7, token_range=(150, 192), **SMALL), 6))
    assert sorted(train) == list(range(150)) and sorted(test) == list(range(150, 192))
    assert s.rows_in((150, 192)) == 42
    with pytest.raises(UserError, match="token_range"):
        s.batches(4, token_range=(100, 500))


def test_grads_aligned(tmp_path: Path):
    s = ActivationStore(make_harvest(tmp_path, grads=True))
    first = s.batches(33, grads=True, **SMALL)
    resumed = s.batches(50, seed=4, start_row=170, grads=True, **SMALL)
    for acts, grads in [next(first), next(first), next(resumed)]:
        torch.testing.assert_close(grads, -acts, rtol=0, atol=0)
    torch.testing.assert_close(s.read(10, 60, kind="grads"), -s.read(10, 60))


def test_other_hook_and_dtype_out(tmp_path: Path):
    root = make_harvest(tmp_path, hooks=("a", "b"))
    a, b = ActivationStore(root, "a"), ActivationStore(root, "b")
    torch.testing.assert_close(b.read(0, 9)[:, 3:], a.read(0, 9)[:, 3:] + 1000, atol=1, rtol=0)
    assert next(a.batches(8, dtype=torch.float16, **SMALL)).dtype == torch.float16


def test_prefetch_thread_stops(harvest: Path):
    def prefetchers() -> int:
        return sum(t.name == "saelab-prefetch" for t in threading.enumerate())

    s = ActivationStore(harvest)
    before = prefetchers()
    stream = s.batches(4, **SMALL)
    next(stream)
    assert prefetchers() == before + 1
    stream.close()
    assert prefetchers() == before
    stream = s.batches(4, **SMALL)
    next(stream)
    del stream
    gc.collect()
    deadline = time.monotonic() + 5
    while prefetchers() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert prefetchers() == before


def test_batch_memory_recycled_only_when_dropped(harvest: Path):
    s = ActivationStore(harvest)
    stream = s.batches(8, **SMALL)
    kept = next(stream)
    kept_view = kept[:, :3]
    expect = kept.clone()
    del kept
    ptrs = set()
    for _ in range(60):  # dropped at once: the pool hands the same memory out again
        ptrs.add(next(stream).data_ptr())
    assert len(ptrs) < 20
    torch.testing.assert_close(kept_view, expect[:, :3], rtol=0, atol=0)


def planned_rows(lo: int, hi: int, seed: int, chunk_rows: int, shuffle_buffer: int, n: int):
    """The stream's first n rows straight from the plan: each buffer's chunks in plan order,
    their rows concatenated and permuted by the buffer's permutation."""
    chunk_rows = min(chunk_rows, shuffle_buffer)
    out, epoch = [], 0
    while sum(map(len, out)) < n:
        plan = stream_module._epoch_plan(
            lo, hi, seed, epoch, chunk_rows, max(1, shuffle_buffer // chunk_rows)
        )
        for b, chunks in enumerate(plan):
            rows = np.concatenate([np.arange(a, z) for a, z in chunks])
            out.append(rows[stream_module._buffer_perm(seed, epoch, b, len(rows))])
        epoch += 1
    return np.concatenate(out)[:n]


@pytest.mark.parametrize(
    "batch, chunk_rows, shuffle_buffer",
    [(25, 8, 32), (100, 8, 8), (7, 5, 20), (64, 16, 64), (400, 4, 12)],
    ids=["in-buffer", "batch-13-buffers", "ragged", "batch-is-buffer", "batch-over-epochs"],
)
def test_stream_follows_the_plan_row_for_row(tmp_path: Path, batch, chunk_rows, shuffle_buffer):
    # Batches that span many buffers reuse each buffer slot within one batch: the reads into
    # a slot must wait for every gather from it.
    s = ActivationStore(make_harvest(tmp_path, grads=True))
    lo, hi, seed = 5, 190, 3
    n_batches = 4 * (hi - lo) // batch + 1
    stream = s.batches(batch, seed=seed, token_range=(lo, hi), grads=True,
                       chunk_rows=chunk_rows, shuffle_buffer=shuffle_buffer)  # fmt: skip
    acts, grads = zip(*(next(stream) for _ in range(n_batches)))
    stream.close()
    rows = np.concatenate([decode_rows(a) for a in acts])
    np.testing.assert_array_equal(
        rows, planned_rows(lo, hi, seed, chunk_rows, shuffle_buffer, n_batches * batch)
    )
    torch.testing.assert_close(torch.cat(grads), -torch.cat(acts), rtol=0, atol=0)


_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_stream_rows_equal_read_in_every_storage_dtype(tmp_path: Path, dtype: str):
    """Each row a stream hands out is the stored row, in the storage dtype or in float32, bit
    for bit what `read` (which converts its own way) gives for that row."""
    s = ActivationStore(make_harvest(tmp_path, dtype=dtype))
    every = s.read(0, s.n_tokens)
    for out in (torch.float32, _TORCH[dtype]):
        stream = s.batches(25, seed=1, dtype=out, start_row=3, **SMALL)
        got = torch.cat([next(stream) for _ in range(10)])
        stream.close()
        assert got.dtype == out
        rows = planned_rows(0, 192, 1, SMALL["chunk_rows"], SMALL["shuffle_buffer"], 253)[3:]
        torch.testing.assert_close(got.float(), every[rows], rtol=0, atol=0)


def test_scatter_places_each_row_and_skips_the_unwanted():
    src = np.arange(12, dtype=np.float16).reshape(6, 2)  # row r is [2r, 2r + 1]
    slot = np.full((4, 2), -1, np.float16)
    stream_module._scatter([src], 1, 5, np.array([2, -1, 0, 3]), [slot])  # rows 1..4
    np.testing.assert_array_equal(slot, [[6, 7], [-1, -1], [2, 3], [8, 9]])
    stream_module._scatter([src], 0, 2, np.array([1, 0]), [slot])  # every row wanted
    np.testing.assert_array_equal(slot, [[2, 3], [0, 1], [2, 3], [8, 9]])


def test_reader_threads_stop_with_the_stream(harvest: Path):
    def readers() -> int:
        return sum(
            t.name.startswith(("saelab-read", "saelab-convert")) for t in threading.enumerate()
        )

    s = ActivationStore(harvest)
    before = readers()
    stream = s.batches(4, **SMALL)
    next(stream)
    assert readers() > before
    stream.close()
    assert readers() == before


@pytest.mark.skipif(
    "OpenMP" not in torch.__config__.parallel_info(), reason="torch without OpenMP threads"
)
def test_readers_run_torch_serially_and_leave_other_threads_alone():
    seen: dict[str, int] = {}

    def reader() -> None:
        stream_module._serial_torch()
        seen["reader"] = torch.get_num_threads()

    def started_later() -> None:
        seen["later"] = torch.get_num_threads()

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for target in (reader, started_later):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join()
        assert seen == {"reader": 1, "later": 2}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_half_written_harvest_reads_listed_shards(harvest: Path):
    meta = shards.read_meta(harvest)
    _edit_meta(harvest, shards=meta["shards"][:2], n_tokens=80, complete=False)
    s = ActivationStore(harvest)
    assert s.n_tokens == 80
    rows = np.concatenate(take_rows(s.batches(16, **SMALL), 10))
    assert sorted(rows) == sorted(list(range(80)) * 2)


# ------------------------------------------------------------------ errors


def test_missing_dir(tmp_path: Path):
    with pytest.raises(UserError, match="saelab harvest"):
        ActivationStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="meta.json"):
        ActivationStore(tmp_path / "empty")


def test_bad_meta(harvest: Path):
    (harvest / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        ActivationStore(harvest)
    (harvest / "meta.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="not a saelab harvest"):
        ActivationStore(harvest)


def test_hook_errors_list_hooks(tmp_path: Path):
    root = make_harvest(tmp_path, hooks=("hook_x", "hook_y"))
    with pytest.raises(UserError, match="hook_x, hook_y"):
        ActivationStore(root, "hook_z")
    with pytest.raises(UserError, match="several hooks.*hook_x, hook_y.*--hook"):
        ActivationStore(root)


def test_no_complete_shard(harvest: Path):
    _edit_meta(harvest, shards=[], n_tokens=0)
    with pytest.raises(UserError, match="no complete shard"):
        ActivationStore(harvest)


def test_truncated_shard_named(harvest: Path):
    f = harvest / f"acts/{HOOK}/shard_00002.npy"
    f.write_bytes(f.read_bytes()[:-10])
    s = ActivationStore(harvest)
    s.read(0, 40)  # untouched shards still read
    with pytest.raises(UserError, match="shard_00002.npy is truncated") as err:
        s.read(80, 90)
    assert "\n" not in str(err.value) and "saelab harvest" in str(err.value)
    with pytest.raises(UserError, match="shard_00002.npy is truncated"):
        next(s.batches(8, **SMALL))


READS = {
    "read": lambda s: s.read(80, 90),
    "sample": lambda s: s.sample(200),
    "verify": lambda s: s.verify(),
    "batches": lambda s: take_rows(s.batches(8, **SMALL), 30),  # 240 rows: a whole epoch
}


@pytest.mark.parametrize("opened", [False, True], ids=["before-open", "after-open"])
@pytest.mark.parametrize("path", list(READS))
def test_deleted_shard_named_on_every_read_path(tmp_path: Path, path: str, opened: bool):
    root = make_harvest(tmp_path)
    s = ActivationStore(root)
    if opened:
        s._mmap("acts", 2)  # its memmap still reads: only the checksum can notice
    (root / f"acts/{HOOK}/shard_00002.npy").unlink()
    with pytest.raises(UserError, match="shard_00002.npy is missing though the harvest") as err:
        READS[path](s)
    assert "\n" not in str(err.value) and "saelab harvest" in str(err.value)


@pytest.mark.parametrize("path", ["read", "batches"])  # hashed here, and on the hash thread
def test_shard_deleted_while_hashing_is_named(harvest: Path, monkeypatch, path: str):
    def deleted(file: Path) -> str:
        raise FileNotFoundError(2, "No such file or directory", str(file))

    monkeypatch.setattr(shards, "sha256_file", deleted)
    with pytest.raises(UserError, match=r"shard_\d{5}.npy is missing though the harvest lists"):
        READS[path](ActivationStore(harvest))


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_shard_named(harvest: Path):
    _corrupt(harvest / f"acts/{HOOK}/shard_00003.npy")
    s = ActivationStore(harvest)
    s.read(0, 40)
    with pytest.raises(UserError, match="shard_00003.npy is corrupted"):
        s.read(125, 130)
    with pytest.raises(UserError, match="shard_00003.npy is corrupted"):
        ActivationStore(harvest).verify()
    with pytest.raises(UserError, match="shard_00003.npy is corrupted"):
        take_rows(ActivationStore(harvest).batches(8, token_range=(120, 192), **SMALL), 1)


def test_corruption_caught_before_stream_yields(tmp_path: Path):
    root = make_harvest(tmp_path, name="c")
    _corrupt(root / f"acts/{HOOK}/shard_00004.npy")
    seen: list[np.ndarray] = []
    with pytest.raises(UserError, match="shard_00004.npy is corrupted"):
        for batch in ActivationStore(root).batches(4, **SMALL):
            seen.append(decode_rows(batch))
    assert all(rows.max() < 160 for rows in seen)  # shard 4 holds rows 160..191


def test_verify_passes_on_clean_harvest(tmp_path: Path):
    ActivationStore(make_harvest(tmp_path, grads=True, hooks=("a", "b")), "a").verify()


def test_grads_missing(harvest: Path):
    s = ActivationStore(harvest)
    with pytest.raises(UserError, match="saelab harvest --grads"):
        s.batches(8, grads=True)
    with pytest.raises(UserError, match="saelab harvest --grads"):
        s.read(0, 4, kind="grads")


# ------------------------------------------------------------------ checksum policies


@pytest.fixture
def hashes(monkeypatch) -> list[Path]:
    """The files hashed from now on, by a fresh process-wide verifier (as in a new process)."""
    seen: list[Path] = []
    real = shards.sha256_file

    def counting(path: Path) -> str:
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(shards, "sha256_file", counting)
    monkeypatch.setattr(store_module, "VERIFIER", shards._Verifier())
    return seen


def _new_process(monkeypatch) -> None:
    monkeypatch.setattr(store_module, "VERIFIER", shards._Verifier())


def _read_all(s: ActivationStore) -> None:
    s.read(0, s.n_tokens)


def test_first_read_hashes_once_and_remembers_in_the_harvest(harvest, hashes, monkeypatch):
    _read_all(ActivationStore(harvest))
    assert len(hashes) == 5
    record = shards.read_checked(harvest)
    assert sorted(record) == [f"acts/{HOOK}/shard_{i:05d}.npy" for i in range(5)]
    _new_process(monkeypatch)
    s = ActivationStore(harvest)
    _read_all(s)
    take_rows(s.batches(8, **SMALL), 30)
    s.sample(100)
    s.confirm_pending()
    assert len(hashes) == 5, "a new process trusted the record"


def test_first_read_record_survives_a_real_new_process(harvest):
    code = (
        "import sys; from saelab import shards; from saelab.store import ActivationStore\n"
        "n = []; real = shards.sha256_file\n"
        "shards.sha256_file = lambda p: n.append(p) or real(p)\n"
        "s = ActivationStore(sys.argv[1]); s.read(0, s.n_tokens); print(len(n))\n"
    )
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code, str(harvest)], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    assert run() == "5"
    assert run() == "0"


def test_first_read_rehashes_a_changed_file_and_refuses_a_bad_one(harvest, hashes, monkeypatch):
    _read_all(ActivationStore(harvest))
    shard1, shard3 = (harvest / f"acts/{HOOK}/shard_{i:05d}.npy" for i in (1, 3))
    shard1.write_bytes(shard1.read_bytes())  # same bytes, new mtime: hashed again, accepted
    _corrupt(shard3)
    del hashes[:]
    _new_process(monkeypatch)
    s = ActivationStore(harvest)
    s.read(0, 120)
    assert hashes == [shard1]
    with pytest.raises(UserError, match="shard_00003.npy is corrupted"):
        s.read(120, 130)
    record = shards.read_checked(harvest)
    assert record[f"acts/{HOOK}/shard_00001.npy"][2] == shard1.stat().st_mtime_ns


def test_record_of_another_sha_is_not_trusted(harvest, hashes, monkeypatch):
    _read_all(ActivationStore(harvest))
    rel = f"acts/{HOOK}/shard_00002.npy"
    sha, size, mtime = shards.read_checked(harvest)[rel]
    (harvest / shards.CHECKED).write_text(
        json.dumps({"file": rel, "sha256": "0" * 64, "size": size, "mtime_ns": mtime}) + "\n"
    )
    del hashes[:]
    _new_process(monkeypatch)
    ActivationStore(harvest).read(80, 90)
    assert hashes == [harvest / rel]


def test_full_hashes_on_every_start_and_records_nothing(harvest, hashes, monkeypatch):
    _read_all(ActivationStore(harvest))
    _new_process(monkeypatch)
    del hashes[:]
    record = (harvest / shards.CHECKED).read_bytes()
    _read_all(ActivationStore(harvest, verify="full"))
    assert len(hashes) == 5
    assert (harvest / shards.CHECKED).read_bytes() == record


def test_off_hashes_nothing_but_checks_headers(harvest, hashes):
    _corrupt(harvest / f"acts/{HOOK}/shard_00003.npy")
    s = ActivationStore(harvest, verify="off")
    _read_all(s)
    take_rows(s.batches(8, **SMALL), 30)
    s.sample(100)
    s.confirm_pending()
    assert hashes == [] and not (harvest / shards.CHECKED).exists()
    with pytest.raises(UserError, match="shard_00003.npy is corrupted"):
        ActivationStore(harvest, verify="off").verify()  # verify() hashes whatever the policy
    f = harvest / f"acts/{HOOK}/shard_00002.npy"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(UserError, match="shard_00002.npy is truncated"):
        ActivationStore(harvest, verify="off").read(80, 90)


def test_unknown_policy_refused(harvest):
    with pytest.raises(UserError, match="verify='sometimes' is not one of full, first-read, off"):
        ActivationStore(harvest, verify="sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["first-read", "full"])
def test_sample_does_not_wait_for_hashes_but_confirm_pending_does(harvest, monkeypatch, policy):
    _corrupt(harvest / f"acts/{HOOK}/shard_00003.npy")
    gate, real = threading.Event(), shards.sha256_file

    def gated(path: Path) -> str:
        gate.wait(timeout=2)  # a sample that waited for its hashes would wait here
        return real(path)

    monkeypatch.setattr(shards, "sha256_file", gated)
    _new_process(monkeypatch)
    s = ActivationStore(harvest, verify=policy)
    rows = decode_rows(s.sample(150, seed=1))
    assert not gate.is_set() and len(set(rows)) == 150  # handed out before any hash finished
    gate.set()
    with pytest.raises(UserError, match="shard_00003.npy is corrupted") as err:
        s.confirm_pending()
    assert "saelab harvest" in str(err.value)


def test_confirm_pending_on_a_clean_sample(harvest, hashes):
    s = ActivationStore(harvest)
    s.sample(150)
    s.confirm_pending()
    assert len(hashes) == 5 and len(shards.read_checked(harvest)) == 5
    s.confirm_pending()  # nothing left


def test_unwritable_folder_remembers_in_process(harvest, hashes, monkeypatch, caplog):
    def read_only(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(store_module, "append_checked", read_only)
    s = ActivationStore(harvest)
    with caplog.at_level(logging.DEBUG, logger="saelab.store"):
        _read_all(s)
        _read_all(s)
    assert len(hashes) == 5 and not (harvest / shards.CHECKED).exists()
    assert len([r for r in caplog.records if "cannot record checksums" in r.message]) == 1


@pytest.mark.parametrize("start", [0, 13, 190])
def test_parts_are_slices_of_each_batch(harvest: Path, start: int):
    """Data parallelism: process r of 3 gets rows [4r, 4r + 4) of each batch of 12, across
    buffer and epoch edges, from any start row; a split that is not even is refused."""
    s = ActivationStore(harvest)
    full = take_rows(s.batches(12, seed=3, start_row=start, **SMALL), 40)
    for r in range(3):
        mine = take_rows(s.batches(12, seed=3, start_row=start, part=(r, 3), **SMALL), 40)
        for got, whole in zip(mine, full):
            np.testing.assert_array_equal(got, whole[4 * r : 4 * r + 4])
    with pytest.raises(UserError, match="divisible"):
        s.batches(10, part=(0, 3))
