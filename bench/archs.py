"""Every trainable selection rule at one shape and budget, on one synthetic harvest.

    python bench/archs.py                      # d_in 512, d_sae 4096, k 32, batch 4096, 1M tokens
    python bench/archs.py --tokens 300000 --archs topk mutual_choice

Each rule trains with saelab's defaults for it (its own auxiliary loss) on the same synthetic
harvest (written once with stand-in gradients, which gradient_topk needs; see bench/train.py
for where it lives), then is evaluated on the same held-out tokens. Prints the steady
training-loop tokens/s (the last log line's rate: data reading included, setup excluded),
each rule's speed relative to TopK in this same run, held-out FVU, L0 and dead fraction.
Goals (issue 16): mutual_choice and feature_choice ≥ 0.7× TopK, matching_pursuit ≥ 0.3×.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from bench.train import EVAL_TOKENS  # noqa: E402
from saelab.archs import TRAINABLE  # noqa: E402
from saelab.config import EvalConfig, SAEConfig, TrainConfig  # noqa: E402
from saelab.evaluate import evaluate  # noqa: E402
from saelab.synthetic import SyntheticData, write_harvest  # noqa: E402

ROOT = Path(os.environ.get("SAELAB_BENCH_DIR", "/tmp/saelab-bench"))


def harvest_with_grads(tokens: int, d_in: int) -> Path:
    path = ROOT / f"synthetic-grads-d{d_in}-{tokens}"
    meta = path / "meta.json"
    if not meta.exists() or not json.loads(meta.read_text()).get("complete"):
        shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        data = SyntheticData(d_in=d_in)
        write_harvest(path, data, tokens + EVAL_TOKENS, dtype="float16", grads=True)
        print(f"wrote synthetic harvest {path} in {time.perf_counter() - t:.0f} s")
    return path


def train_one(path: Path, arch: str, args: argparse.Namespace) -> dict:
    from saelab.trainer import train

    out = ROOT / "runs" / f"archs-{arch}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(
        harvest=str(path),
        out=str(out),
        n_tokens=args.tokens,
        batch_size=args.batch,
        sae=SAEConfig(arch, args.d_sae, args.k),  # type: ignore[arg-type]
        eval_tokens=EVAL_TOKENS,
        threads=args.threads,
        checkpoint_every=0,
        dead_tokens=args.dead_tokens,
        precision=args.precision,
    )
    t = time.perf_counter()
    train(cfg, progress=False)
    elapsed = time.perf_counter() - t
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    res = evaluate(EvalConfig(run=str(out), downstream=False), progress=False)
    return {
        "arch": arch,
        "tok_s": log[-1]["tokens_per_s"],
        "tok_s_setup": args.tokens / elapsed,
        "fvu": res["fvu"],
        "l0": res["l0"],
        "dead": res["dead_frac"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--d_in", type=int, default=512)
    p.add_argument("--d_sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dead_tokens", type=int, default=1_000_000)
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--archs", nargs="+", default=list(TRAINABLE), choices=list(TRAINABLE))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    archs = ["topk"] + [a for a in args.archs if a != "topk"]  # TopK first: the reference
    print(
        f"d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, batch {args.batch}, "
        f"{args.tokens:,} tokens, {args.threads} threads, precision {args.precision}"
    )
    path = harvest_with_grads(args.tokens, args.d_in)
    rows = []
    for arch in archs:
        rows.append(train_one(path, arch, args))
        r = rows[-1]
        print(f"  {arch}: {r['tok_s']:,.0f} tok/s, FVU {r['fvu']:.3f}", flush=True)
    top = rows[0]["tok_s"]
    print(
        f"\n{'arch':18s} {'tok/s (loop)':>13s} {'× topk':>7s} {'tok/s (setup)':>14s} "
        f"{'held-out FVU':>13s} {'L0':>6s} {'dead':>6s}"
    )
    for r in rows:
        print(
            f"{r['arch']:18s} {r['tok_s']:13,.0f} {r['tok_s'] / top:7.2f} "
            f"{r['tok_s_setup']:14,.0f} {r['fvu']:13.3f} {r['l0']:6.1f} {r['dead']:6.1%}"
        )


if __name__ == "__main__":
    main()
