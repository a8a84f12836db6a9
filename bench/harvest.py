"""Harvest costs: throughput against a bare forward, and the metadata written per shard.

    python bench/harvest.py [--model smollm2-135m --hook blocks.6.hook_resid_post --n_tokens 20000]
    python bench/harvest.py --meta [--shards 100,3000]

Throughput: model loading and tokenization are excluded from both timings; the harvest timing
covers the forwards, the hook copies, the shard and tokens.npy writes, checksums and the log.

--meta: tiny synthetic shards (no model) written through `shards.write_shard`; prints the
time and bytes per shard spent on meta.json and the shard log, over the last 100 shards, and
for comparison what format 1 spent (meta.json with the whole shard list rewritten and
fsynced after every shard) at the same shard count.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import saelab.harvest as H
from saelab import shards
from saelab.config import DEFAULT_HOOK, DEFAULT_MODEL, HarvestConfig
from saelab.distributed import SINGLE
from saelab.models import resolve_device
from saelab.runs import atomic_write


def bare_forward(model, tokens: torch.Tensor, stop: int | None, batch_size: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b0 in range(0, len(tokens), batch_size):
            model(tokens[b0 : b0 + batch_size], stop_at_layer=stop)
    return time.perf_counter() - t0


def throughput(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(
            model=args.model, hooks=[args.hook], n_tokens=args.n_tokens, n_ctx=args.n_ctx,
            batch_size=args.batch_size, dtype=args.dtype, out=f"{tmp}/bench",
        )  # fmt: skip
        device = resolve_device(cfg.device)
        ident = H._identity(cfg, H.n_contexts_for(cfg), device)
        model, meta, feed, stop = H._prepare(cfg, Path(tmp) / "bench", None, ident, device)
        tokens = feed.take(meta["n_contexts"])
        tokens_t = torch.from_numpy(tokens).long().to(model.cfg.device)
        bs = meta["batch_size"]
        n = tokens.shape[0] * (cfg.n_ctx - 1)
        print(f"{cfg.model} {args.hook}: {tokens.shape[0]} contexts of {cfg.n_ctx}, {n} tokens")
        print(f"torch threads: {torch.get_num_threads()}, stop_at_layer={stop}, batch {bs}")
        print(f"model dtype: {meta['model_dtype']}, device: {model.cfg.device}")
        bare_forward(model, tokens_t[:bs], stop, bs)  # warm-up
        bare, harvest = [], []
        # Interleaved repeats, best of each: other load on the machine only ever slows a run.
        for rep in range(args.repeats):
            bare.append(bare_forward(model, tokens_t, stop, bs))
            harvest.append(
                harvest_once(model, copy.deepcopy(meta), tokens, stop, Path(tmp) / str(rep))
            )

    print(f"bare forward: {n / min(bare):8.0f} tokens/s  (runs: {_fmt(bare)})")
    print(f"harvest:      {n / min(harvest):8.0f} tokens/s  (runs: {_fmt(harvest)})")
    print(f"ratio:        {min(bare) / min(harvest):8.3f}")


def harvest_once(model, meta: dict, tokens: np.ndarray, stop: int | None, out: Path) -> float:
    out.mkdir(parents=True)
    n = len(tokens)
    feed = H._Feed(lambda: iter([tokens]), tokens.shape[1], n, n)
    t0 = time.perf_counter()
    file = shards.TokensFile(out, n, tokens.shape[1], create=True)
    shards.write_meta(out, meta)
    ranks = H._Ranks(SINGLE, torch.device(model.cfg.device))
    H._run_shards(model, meta, feed, 0, file, stop, out, ranks, progress=False)
    file.close()
    return time.perf_counter() - t0


def _fmt(times: list[float]) -> str:
    return ", ".join(f"{t:.1f} s" for t in times)


# ---------------------------------------------------------------------------------------
# Metadata per shard


def _meta(n_shards: int) -> dict:
    return {
        "format": shards.FORMAT, "saelab_version": "bench", "model": "none",
        "model_dtype": "float32", "hooks": ["blocks.6.hook_resid_post"], "n_ctx": 2,
        "dtype": "float16", "corpus": {"spec": "default", "text_field": "text", "split": "train"},
        "seed": 0, "grads": False, "n_contexts": n_shards, "d_in": 4, "tokens_per_context": 1,
        "n_tokens_planned": n_shards, "n_tokens": 0, "shard_contexts": 1, "batch_size": 16,
        "complete": False, "tokens_sha256": "", "shards": [],
    }  # fmt: skip


def metadata(n_shards: int) -> None:
    spent = {"seconds": 0.0}
    real_append, real_meta = shards.append_lines, shards.write_meta

    def timed(fn):
        def run(*args, **kw):
            t0 = time.perf_counter()
            fn(*args, **kw)
            spent["seconds"] += time.perf_counter() - t0

        return run

    shards.append_lines, shards.write_meta = timed(real_append), timed(real_meta)
    try:
        with tempfile.TemporaryDirectory(prefix="saelab-bench-") as tmp:
            out = Path(tmp)
            meta = _meta(n_shards)
            shards.TokensFile(out, n_shards, 2, create=True).close()
            buf = {"acts/blocks.6.hook_resid_post": torch.ones((1, 4), dtype=torch.float16)}
            last = max(1, min(100, n_shards // 2))
            for i in range(n_shards):
                if i == n_shards - last:
                    spent["seconds"] = 0.0
                    log_before = (out / shards.LOG).stat().st_size
                shards.write_shard(out, meta, i, i, i + 1, buf)
            per_shard = spent["seconds"] / last
            log_bytes = ((out / shards.LOG).stat().st_size - log_before) / last
            header = (out / shards.META).stat().st_size
            old_bytes, old_seconds = _format1_rewrite(out, meta)
    finally:
        shards.append_lines, shards.write_meta = real_append, real_meta
    print(
        f"{n_shards:>6} shards: log + meta {per_shard * 1e3:7.2f} ms/shard, "
        f"{log_bytes:6.0f} B/shard (+ a {header} B header twice); format 1 at this size: "
        f"{old_seconds * 1e3:7.2f} ms/shard, {old_bytes / 1e3:8.1f} kB/shard"
    )


def _format1_rewrite(out: Path, meta: dict) -> tuple[int, float]:
    """One meta.json with the whole shard list, written and fsynced as format 1 did per shard."""
    text = json.dumps({**meta, "format": 1}, indent=1)
    t0, reps = time.perf_counter(), 5
    for _ in range(reps):
        atomic_write(out / "format1.json", text)
    return len(text), (time.perf_counter() - t0) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--hook", default=DEFAULT_HOOK)
    p.add_argument("--n_tokens", type=int, default=20_000)
    p.add_argument("--n_ctx", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=0)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--meta", action="store_true", help="measure the metadata per shard instead")
    p.add_argument("--shards", default="100,3000", help="shard counts for --meta")
    args = p.parse_args()
    if args.meta:
        for n in map(int, args.shards.split(",")):
            metadata(n)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
