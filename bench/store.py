"""Read throughput of ActivationStore.batches against a plain sequential read of the same files,
and the cost of a resume on a many-shard harvest.

    .venv/bin/python bench/store.py              # writes a ~1 GB fp16 harvest to a temp dir
    .venv/bin/python bench/store.py --path cached_activations/<name> [--hook H]
    .venv/bin/python bench/store.py --resume [--n-shards 3000]

The goal is ``batches()`` at >= 0.8x a plain sequential read of the same files. Both sides are
warm page cache (the bench cannot drop it; a first plain pass warms it) and both are the best of
the same number of passes, interleaved so that a machine whose speed drifts slows both alike.
Two plain reads are shown: np.fromfile, which page-faults fresh memory for every file (the
goal's baseline), and readinto one reused buffer (no faults: the fastest a reader can copy).
Throughput counts storage bytes on both sides: the shard files' bytes for the plain reads, the
rows' fp16 bytes for batches (the same less one 128-byte header a shard), although batches come
out as float32, twice the bytes.

Each pass reads two epochs of one stream. The second is the goal's figure: a trainer reads one
stream for a whole run, so this is what it sees. The first also pays the stream's start (its
buffer slots and batch memory are fresh, page-faulted memory, about 0.8 GB at these sizes),
which a trainer pays once; it is shown beside it for comparison with earlier figures.

--resume: a synthetic harvest of many small shards. A first process opens it under
verify="first-read", takes the trainer's scale sample (20,000 rows), confirms it and reads its
first batch (then verifies the rest, as the rest of a first run would); a second process, as a
resumed training, opens it again, takes the same sample and gets its first shuffled batch from
a mid-run start_row. Each phase is timed in its own process; the goal for the resume is 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saelab import shards
from saelab.shards import sha256_file
from saelab.store import ActivationStore

HOOK = "blocks.6.hook_resid_post"


def write_harvest(
    root: Path, gb: float, d_in: int, n_ctx: int, shard_contexts: int, n_shards: int = 0
) -> Path:
    """An fp16 harvest of random activations, written through saelab's shard writers."""
    tpc = n_ctx - 1
    shard_rows = shard_contexts * tpc
    n_shards = n_shards or max(1, round(gb * 1e9 / (shard_rows * d_in * 2)))
    n_contexts = n_shards * shard_contexts
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 49152, (n_contexts, n_ctx), dtype=np.int32)
    tokens[:, 0] = 1
    meta = {
        "format": shards.FORMAT, "saelab_version": "bench", "model": "random",
        "model_dtype": "float32", "hooks": [HOOK], "d_in": d_in, "dtype": "float16",
        "n_ctx": n_ctx, "tokens_per_context": tpc, "n_contexts": n_contexts,
        "n_tokens_planned": n_contexts * tpc, "n_tokens": 0, "shard_contexts": shard_contexts,
        "batch_size": 16, "corpus": {}, "seed": 0, "grads": False, "complete": False,
        "tokens_sha256": shards.save_npy(root / shards.TOKENS, tokens), "shards": [],
    }  # fmt: skip
    for i in range(n_shards):
        x = rng.standard_normal((shard_rows, d_in), dtype=np.float32).astype("<f2")
        c0 = i * shard_contexts
        shards.write_shard(
            root, meta, i, c0, c0 + shard_contexts, {f"acts/{HOOK}": torch.from_numpy(x)}
        )
    return root


def plain_read(files: list[Path]) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for f in files:
        n += np.fromfile(f, dtype=np.uint8).nbytes
    return time.perf_counter() - t0, n


def reused_read(files: list[Path]) -> tuple[float, int]:
    sizes = [f.stat().st_size for f in files]
    buf = memoryview(np.empty(max(sizes), np.uint8))
    t0 = time.perf_counter()
    for f, size in zip(files, sizes):
        with open(f, "rb", buffering=0) as fh:
            fh.readinto(buf[:size])
    return time.perf_counter() - t0, sum(sizes)


def hash_all(files: list[Path]) -> tuple[float, int]:
    t0 = time.perf_counter()
    for f in files:
        sha256_file(f)
    return time.perf_counter() - t0, sum(f.stat().st_size for f in files)


def stream_epochs(store: ActivationStore, batch_size: int, seed: int, n: int) -> list[float]:
    """Seconds of each of the first n epochs of one stream of shuffled float32 batches."""
    stream = store.batches(batch_size, seed=seed)
    rows, times, t0 = 0, [], time.perf_counter()
    for epoch in range(1, n + 1):
        while rows < epoch * stream.rows_per_epoch:
            batch = next(stream)
            rows += len(batch)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    stream.close()
    assert batch.dtype == torch.float32
    return times


def report(label: str, seconds: float, nbytes: int) -> float:
    gbps = nbytes / 1e9 / seconds
    print(f"{label:<58} {nbytes / 1e9:6.2f} GB in {seconds:6.2f} s = {gbps:5.2f} GB/s")
    return gbps


def run(path: Path, hook: str | None, batch_size: int, passes: int) -> None:
    store = ActivationStore(path, hook)
    files = [path / f"acts/{store.hook}/shard_{s.index:05d}.npy" for s in store.shards]
    shape = f"{store.n_tokens} rows x {store.d_in} {store.storage_dtype}"
    print(f"harvest {path}: {len(files)} shards, {shape}; torch threads {torch.get_num_threads()}")
    epoch_bytes = store.n_tokens * store.d_in * np.dtype(store._np_dtype).itemsize
    report("plain np.fromfile, sequential (warms the page cache)", *plain_read(files))
    report("sha256 of every shard, one thread (reference)", *hash_all(files))
    label = f"store.batches({batch_size}) fp32"
    first = stream_epochs(store, batch_size, 0, 1)[0]
    first = report(f"{label}, first epoch incl. first-time sha256", first, epoch_bytes)
    plain, reused, fresh, steady = [], [], [], []
    for i in range(1, passes + 1):
        plain.append(report(f"plain np.fromfile, sequential (pass {i})", *plain_read(files)))
        reused.append(report(f"plain readinto a reused buffer (pass {i})", *reused_read(files)))
        start, then = stream_epochs(store, batch_size, i, 2)
        fresh.append(
            report(f"{label} {i}, epoch 1 of a stream, incl. its start", start, epoch_bytes)
        )
        steady.append(report(f"{label} {i}, epoch 2 of that stream", then, epoch_bytes))
    print(f"best of {passes}, warm page cache, hashes cached:")
    print(f"  ratio batches/np.fromfile  {max(steady) / max(plain):.2f}  (goal >= 0.8)")
    print(f"  ratio batches/readinto     {max(steady) / max(reused):.2f}")
    print(f"  ratio batches/np.fromfile, epoch 1 incl. start {max(fresh) / max(plain):.2f}")
    print(f"  first epoch (hashing every shard) / np.fromfile {first / max(plain):.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


SCALE_SAMPLE = 20_000


def _child(path: Path, mode: str, policy: str) -> None:
    """One process of --resume: prints its phases' seconds as one JSON line."""
    times, t0 = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        times[name] = time.perf_counter() - t0
        t0 = time.perf_counter()

    store = ActivationStore(path, verify=policy)  # type: ignore[arg-type]
    lap("open")
    store.sample(SCALE_SAMPLE, seed=0)
    lap("sample")
    store.confirm_pending()
    lap("confirm_pending")
    stream = store.batches(4096, seed=0, start_row=store.n_tokens // 2)
    next(stream)
    lap("first batch")
    stream.close()
    if mode == "first":
        store.verify()
        lap("verify (rest of a first run)")
    print(json.dumps(times))


def resume(n_shards: int) -> None:
    with tempfile.TemporaryDirectory(prefix="saelab-bench-") as tmp:
        t0 = time.perf_counter()
        path = write_harvest(Path(tmp), 0, d_in=128, n_ctx=128, shard_contexts=2, n_shards=n_shards)
        size = sum(f.stat().st_size for f in (path / "acts").rglob("*.npy"))
        print(f"wrote {n_shards} shards ({size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        for label, mode, policy in [
            ("first run, first-read", "first", "first-read"),
            ("resume, first-read", "resume", "first-read"),
            ("resume, full (for comparison)", "resume", "full"),
            ("resume, off", "resume", "off"),
        ]:
            argv = [sys.executable, __file__, "--child", str(path), mode, policy]
            t0 = time.perf_counter()
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            wall = time.perf_counter() - t0
            times = json.loads(out.strip().splitlines()[-1])
            phases = ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
            inside = sum(times.values())
            print(
                f"{label:<31} {inside:6.2f} s in the store ({wall:5.2f} s with startup): {phases}"
            )
    print("goal: a resume under 5 s in the store")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", type=Path, help="existing harvest directory (default: write one)")
    p.add_argument("--hook", help="hook to read (default: the harvest's only hook)")
    p.add_argument("--gb", type=float, default=1.0, help="size of the written harvest")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--passes", type=int, default=3, help="timed passes of each read")
    p.add_argument("--resume", action="store_true", help="measure a resume instead")
    p.add_argument("--n-shards", type=int, default=3000, help="shards of the --resume harvest")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(Path(args.child[0]), args.child[1], args.child[2])
    elif args.resume:
        resume(args.n_shards)
    elif args.path:
        run(args.path, args.hook, args.batch_size, args.passes)
    else:
        with tempfile.TemporaryDirectory(prefix="saelab-bench-") as tmp:
            t0 = time.perf_counter()
            path = write_harvest(Path(tmp), args.gb, d_in=576, n_ctx=128, shard_contexts=256)
            print(f"wrote bench harvest in {time.perf_counter() - t0:.1f} s")
            run(path, None, args.batch_size, args.passes)


if __name__ == "__main__":
    main()
