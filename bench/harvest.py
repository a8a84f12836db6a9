"""Harvest throughput against a bare `model(tokens, stop_at_layer=L)` over the same contexts.

    python bench/harvest.py [--model smollm2-135m --hook blocks.6.hook_resid_post --n_tokens 20000]

Model loading and tokenization are excluded from both timings; the harvest timing covers the
forwards, the hook copies, the shard writes, checksums and meta updates.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import saelab.harvest as H
from saelab.config import DEFAULT_HOOK, DEFAULT_MODEL, HarvestConfig
from saelab.shards import TOKENS, save_npy


def bare_forward(model, tokens: torch.Tensor, stop: int | None, batch_size: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b0 in range(0, len(tokens), batch_size):
            model(tokens[b0 : b0 + batch_size], stop_at_layer=stop)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--hook", default=DEFAULT_HOOK)
    p.add_argument("--n_tokens", type=int, default=20_000)
    p.add_argument("--n_ctx", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(
            model=args.model, hooks=[args.hook], n_tokens=args.n_tokens, n_ctx=args.n_ctx,
            batch_size=args.batch_size, dtype=args.dtype, out=f"{tmp}/bench",
        )  # fmt: skip
        model, meta, tokens, stop = H._prepare(cfg, Path(tmp) / "bench")
        tokens_t = torch.from_numpy(tokens).long()
        n = tokens.shape[0] * (cfg.n_ctx - 1)
        print(f"{cfg.model} {args.hook}: {tokens.shape[0]} contexts of {cfg.n_ctx}, {n} tokens")
        print(f"torch threads: {torch.get_num_threads()}, stop_at_layer={stop}")
        bare_forward(model, tokens_t[: cfg.batch_size], stop, cfg.batch_size)  # warm-up
        bare, harvest = [], []
        # Interleaved repeats, best of each: other load on the machine only ever slows a run.
        for rep in range(args.repeats):
            bare.append(bare_forward(model, tokens_t, stop, cfg.batch_size))
            harvest.append(
                harvest_once(model, copy.deepcopy(meta), tokens, stop, Path(tmp) / str(rep))
            )

    print(f"bare forward: {n / min(bare):8.0f} tokens/s  (runs: {_fmt(bare)})")
    print(f"harvest:      {n / min(harvest):8.0f} tokens/s  (runs: {_fmt(harvest)})")
    print(f"ratio:        {min(bare) / min(harvest):8.3f}")


def harvest_once(model, meta: dict, tokens, stop: int | None, out: Path) -> float:
    out.mkdir(parents=True)
    meta["tokens_sha256"] = save_npy(out / TOKENS, tokens)
    t0 = time.perf_counter()
    H._run_shards(model, meta, tokens, stop, out, progress=False)
    return time.perf_counter() - t0


def _fmt(times: list[float]) -> str:
    return ", ".join(f"{t:.1f} s" for t in times)


if __name__ == "__main__":
    main()
