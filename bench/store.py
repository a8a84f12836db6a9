"""Read throughput of ActivationStore.batches against a plain sequential read of the same files.

    .venv/bin/python bench/store.py              # writes a ~1 GB fp16 harvest to a temp dir
    .venv/bin/python bench/store.py --path cached_activations/<name> [--hook H]

All numbers are warm page cache (the bench cannot drop it): the plain read runs twice to show
that the first pass already reads from memory. Throughput counts storage bytes (fp16), although
batches come out as float32.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saelab.shards import sha256_file
from saelab.store import ActivationStore

HOOK = "blocks.6.hook_resid_post"


def write_harvest(root: Path, gb: float, d_in: int, n_ctx: int, shard_contexts: int) -> Path:
    """A format-1 fp16 harvest of random activations (what saelab harvest would write)."""
    tpc = n_ctx - 1
    shard_rows = shard_contexts * tpc
    n_shards = max(1, round(gb * 1e9 / (shard_rows * d_in * 2)))
    n_contexts = n_shards * shard_contexts
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 49152, (n_contexts, n_ctx), dtype=np.int32)
    tokens[:, 0] = 1
    np.save(root / "tokens.npy", tokens)
    (root / "acts" / HOOK).mkdir(parents=True)
    shards = []
    for i in range(n_shards):
        rel = f"acts/{HOOK}/shard_{i:05d}.npy"
        np.save(root / rel, rng.standard_normal((shard_rows, d_in), dtype=np.float32).astype("<f2"))
        sha = hashlib.sha256((root / rel).read_bytes()).hexdigest()
        c0, t0 = i * shard_contexts, i * shard_rows
        shards.append(
            {"index": i, "context_start": c0, "context_stop": c0 + shard_contexts,
             "token_start": t0, "token_stop": t0 + shard_rows, "files": {rel: sha}}
        )  # fmt: skip
    meta = {
        "format": 1, "saelab_version": "bench", "model": "random", "hooks": [HOOK],
        "d_in": d_in, "dtype": "float16", "n_ctx": n_ctx, "tokens_per_context": tpc,
        "n_contexts": n_contexts, "n_tokens_planned": n_contexts * tpc,
        "n_tokens": n_contexts * tpc, "shard_contexts": shard_contexts, "corpus": {},
        "seed": 0, "grads": False, "complete": True, "tokens_sha256": "", "shards": shards,
    }  # fmt: skip
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def plain_read(files: list[Path]) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for f in files:
        n += np.fromfile(f, dtype=np.uint8).nbytes
    return time.perf_counter() - t0, n


def hash_all(files: list[Path]) -> tuple[float, int]:
    t0 = time.perf_counter()
    for f in files:
        sha256_file(f)
    return time.perf_counter() - t0, sum(f.stat().st_size for f in files)


def stream_epoch(store: ActivationStore, batch_size: int, seed: int) -> tuple[float, int]:
    """One epoch of shuffled float32 batches; returns seconds and storage bytes delivered."""
    stream = store.batches(batch_size, seed=seed)
    rows, t0 = 0, time.perf_counter()
    while rows < stream.rows_per_epoch:
        batch = next(stream)
        rows += len(batch)
    seconds = time.perf_counter() - t0
    stream.close()
    assert batch.dtype == torch.float32
    return seconds, rows * store.d_in * np.dtype(store._np_dtype).itemsize


def report(label: str, seconds: float, nbytes: int) -> float:
    gbps = nbytes / 1e9 / seconds
    print(f"{label:<58} {nbytes / 1e9:6.2f} GB in {seconds:6.2f} s = {gbps:5.2f} GB/s")
    return gbps


def run(path: Path, hook: str | None, batch_size: int) -> None:
    store = ActivationStore(path, hook)
    files = [path / f"acts/{store.hook}/shard_{s.index:05d}.npy" for s in store.shards]
    shape = f"{store.n_tokens} rows x {store.d_in} {store.storage_dtype}"
    print(f"harvest {path}: {len(files)} shards, {shape}; torch threads {torch.get_num_threads()}")
    plain = report("plain np.fromfile, sequential (1st pass)", *plain_read(files))
    plain = report("plain np.fromfile, sequential (2nd pass)", *plain_read(files))
    report("sha256 of every shard, one thread (reference)", *hash_all(files))
    label = f"store.batches({batch_size}) fp32 epoch,"
    first = report(f"{label} incl. first-time sha256", *stream_epoch(store, batch_size, 0))
    # Three cached epochs: on a shared 2-core box another process can halve any one run.
    cached = max(
        report(f"{label} hashes cached (run {i})", *stream_epoch(store, batch_size, i))
        for i in (1, 2, 3)
    )
    print("all numbers are warm page cache (dropping it needs root); plain read ran twice")
    print(
        f"ratio store/plain: {first / plain:.2f} (first epoch), {cached / plain:.2f} (best later)"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", type=Path, help="existing harvest directory (default: write one)")
    p.add_argument("--hook", help="hook to read (default: the harvest's only hook)")
    p.add_argument("--gb", type=float, default=1.0, help="size of the written harvest")
    p.add_argument("--batch-size", type=int, default=4096)
    args = p.parse_args(argv)
    if args.path:
        run(args.path, args.hook, args.batch_size)
        return
    with tempfile.TemporaryDirectory(prefix="saelab-bench-") as tmp:
        t0 = time.perf_counter()
        path = write_harvest(Path(tmp), args.gb, d_in=576, n_ctx=128, shard_contexts=256)
        print(f"wrote bench harvest in {time.perf_counter() - t0:.1f} s")
        run(path, None, args.batch_size)


if __name__ == "__main__":
    main()
