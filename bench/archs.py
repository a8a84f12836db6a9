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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from bench.train import harvest_dir, parse_args, run  # noqa: E402
from saelab.archs import TRAINABLE  # noqa: E402


def flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--archs", nargs="+", default=list(TRAINABLE), choices=list(TRAINABLE))


def main() -> None:
    args = parse_args(__doc__, tokens=1_000_000, more=flags)
    print(f"precision {args.precision}")
    archs = ["topk"] + [a for a in args.archs if a != "topk"]  # TopK first: the reference
    path = harvest_dir(args.tokens, args.d_in, grads=True)
    rows = []
    for arch in archs:
        name = f"archs-{arch}"
        rows.append(
            {"arch": arch, **run(path, name, args.tokens, args, arch, precision=args.precision)}
        )
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
