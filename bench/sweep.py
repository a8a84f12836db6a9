"""A sweep reads the store once: reading costs less than training the slowest SAE alone.

    python bench/sweep.py [--tokens 500000]

Prints, on the synthetic harvest of bench/train.py: the time to stream the training tokens
from the store with nothing else running, the time to train each SAE alone, and the time
to train all of them as one sweep (one read), next to the sum of the solo times.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from bench.train import EVAL_TOKENS, harvest_dir  # noqa: E402
from saelab.config import SAEConfig, TrainConfig
from saelab.store import ActivationStore
from saelab.trainer import train

SWEEP = [
    SAEConfig("topk", 4096, 32),
    SAEConfig("mutual_choice", 4096, 32),
    SAEConfig("topk", 8192, 32),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=500_000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = harvest_dir(2_000_000, 512)
    out = Path("/tmp/saelab-bench/sweep")
    shutil.rmtree(out, ignore_errors=True)

    store = ActivationStore(path)
    stream = store.batches(4096, token_range=(0, store.n_tokens - EVAL_TOKENS), seed=0)
    t = time.perf_counter()
    for _, x in zip(range(args.tokens // 4096), stream):
        x.mul_(1.0)  # touch the batch, as training does
    stream.close()
    read = time.perf_counter() - t
    print(f"store read alone: {read:6.1f} s for {args.tokens:,} tokens")

    base = dict(
        harvest=str(path),
        n_tokens=args.tokens,
        eval_tokens=EVAL_TOKENS,
        checkpoint_every=0,
        threads=args.threads,
    )
    solo = []
    for s in SWEEP:
        t = time.perf_counter()
        train(TrainConfig(**base, sae=s, out=str(out / f"solo-{s.arch}-{s.d_sae}")), False)
        solo.append(time.perf_counter() - t)
        print(f"train alone {s.arch:14s} d_sae {s.d_sae:5d}: {solo[-1]:6.1f} s")
    t = time.perf_counter()
    train(TrainConfig(**base, sweep=SWEEP, out=str(out / "sweep")), False)
    both = time.perf_counter() - t
    print(
        f"sweep of {len(SWEEP)} in one read: {both:6.1f} s (solo runs add up to {sum(solo):.1f} s)"
    )
    print(f"read / slowest solo training = {read / max(solo):.2f} (must be ≤ 1)")


if __name__ == "__main__":
    main()
