"""TopK training throughput and held-out FVU on synthetic activations from a known dictionary.

    python bench/train.py                       # d_in 512, d_sae 4096, k 32, batch 4096, 2M tokens
    python bench/train.py --tokens 500000       # shorter
    python bench/train.py --baseline            # also Adam at lr 2e-4, constant (the usual recipe)
    python bench/train.py --precision fp32,bf16 --seeds 3 --tokens 400000

Prints tokens/s (whole training loop, data reading included) and the FVU on 100k held-out
tokens. The synthetic harvest is written once to $SAELAB_BENCH_DIR (default /tmp/saelab-bench).

With several precisions and seeds the runs interleave (seed 0 in each precision, then
seed 1, ...), so a machine whose speed drifts slows both alike, and a summary gives each
precision's mean ± std of tokens/s and FVU over seeds, and the per-seed ratio of tokens/s
to the first precision's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from saelab.config import EvalConfig, SAEConfig, TrainConfig
from saelab.evaluate import evaluate
from saelab.synthetic import SyntheticData, write_harvest
from saelab.trainer import train

EVAL_TOKENS = 100_000 // 127 * 127 + 127


def harvest_dir(tokens: int, d_in: int, grads: bool = False, mean_offset: float = 0.0) -> Path:
    """The synthetic harvest of these benchmarks (with stand-in gradients for gradient_topk
    when `grads`, every token shifted by a vector of norm `mean_offset`), written once."""
    root = Path(os.environ.get("SAELAB_BENCH_DIR", "/tmp/saelab-bench"))
    offset = f"offset{mean_offset:g}-" if mean_offset else ""
    path = root / f"synthetic-{'grads-' if grads else ''}{offset}d{d_in}-{tokens}"
    if (
        not (path / "meta.json").exists()
        or not json.loads((path / "meta.json").read_text())["complete"]
    ):
        shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        data = SyntheticData(d_in=d_in, mean_offset=mean_offset)
        write_harvest(path, data, tokens + EVAL_TOKENS, dtype="float16", grads=grads)
        print(f"wrote synthetic harvest {path} in {time.perf_counter() - t:.0f} s")
    return path


def run(
    path: Path, name: str, tokens: int, args: argparse.Namespace, arch: str = "topk", **overrides
) -> dict[str, float]:
    """Train and evaluate one SAE; prints a line and returns its figures: loop tokens/s
    (`tok_s`), tokens/s with setup (`tok_s_setup`), held-out `fvu`, `l0` and `dead`."""
    out = Path(os.environ.get("SAELAB_BENCH_DIR", "/tmp/saelab-bench")) / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(
        harvest=str(path),
        out=str(out),
        n_tokens=tokens,
        batch_size=args.batch,
        sae=SAEConfig(arch, args.d_sae, args.k),  # type: ignore[arg-type]
        eval_tokens=EVAL_TOKENS,
        threads=args.threads,
        checkpoint_every=0,
        dead_tokens=args.dead_tokens,
        **overrides,
    )
    t = time.perf_counter()
    train(cfg, progress=False)
    elapsed = time.perf_counter() - t
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steady = log[-1]["tokens_per_s"]
    res = evaluate(EvalConfig(run=str(out)), progress=False)
    print(
        f"{name:28s} lr {cfg.resolved_lr():.1e}  {steady:9,.0f} tok/s (loop)  "
        f"{tokens / elapsed:9,.0f} tok/s (incl. setup)  held-out FVU {res['fvu']:.3f}  "
        f"L0 {res['l0']:.1f}  dead {res['dead_frac']:.1%}"
    )
    return {
        "tok_s": steady,
        "tok_s_setup": tokens / elapsed,
        "fvu": res["fvu"],
        "l0": res["l0"],
        "dead": res["dead_frac"],
    }


def precisions(path: Path, args: argparse.Namespace) -> None:
    """The same runs in each precision of --precision, seeds interleaved, then a summary."""
    names = args.precision.split(",")
    rate: dict[str, list[float]] = {p: [] for p in names}
    fvu: dict[str, list[float]] = {p: [] for p in names}
    for seed in range(args.seeds):
        for p in names:
            r = run(path, f"{p} seed {seed}", args.tokens, args, precision=p, seed=seed)
            rate[p].append(r["tok_s"])
            fvu[p].append(r["fvu"])

    def ms(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.4g} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.2g}"

    print(f"\n{'precision':10s} {'tok/s (mean ± std)':>22s} {'FVU (mean ± std)':>22s}  ratio")
    for p in names:
        ratios = [a / b for a, b in zip(rate[p], rate[names[0]])]
        print(
            f"{p:10s} {ms(rate[p]):>22s} {ms(fvu[p]):>22s}  "
            f"{' '.join(f'{x:.2f}' for x in ratios)} (tok/s ÷ {names[0]}, per seed)"
        )


def parse_args(
    doc: str,
    extra: bool = False,
    tokens: int = 2_000_000,
    more: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The shared flags of the training benchmarks (`more` adds a script's own); sets torch's
    threads."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--d_in", type=int, default=512)
    p.add_argument("--d_sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dead_tokens", type=int, default=1_000_000)
    if extra:
        p.add_argument("--baseline", action="store_true", help="also run Adam lr 2e-4 constant")
        p.add_argument(
            "--precision", default="", help="comma-separated precisions to compare, e.g. fp32,bf16"
        )
        p.add_argument("--seeds", type=int, default=1, help="seeds per precision (--precision)")
    if more is not None:
        more(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, batch {args.batch}, "
        f"{args.tokens:,} tokens, {args.threads} threads"
    )
    return args


def main() -> None:
    args = parse_args(__doc__, extra=True)
    path = harvest_dir(args.tokens, args.d_in)
    if args.precision:
        precisions(path, args)
        return
    run(path, "saelab defaults", args.tokens, args)
    if args.baseline:
        run(path, "Adam lr 2e-4 constant", args.tokens, args, lr=2e-4, lr_decay_frac=0.0)


if __name__ == "__main__":
    main()
