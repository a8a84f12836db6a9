"""Time of the dark-matter analysis of a run against the time it took to train.

    .venv/bin/python bench/darkmatter.py                      # runs/demo-topk (saelab demo)
    .venv/bin/python bench/darkmatter.py --run runs/<name> [--ce_contexts 0] [--pursuit none]

Training time comes from train_log.jsonl: its tokens_per_s is cumulative since the (last)
start, so tokens / tokens_per_s of the final line is the training wall time (a resumed run
reports only its last leg). The analysis is timed stage by stage: fit pass, evaluation pass
(with gradient pursuit), three-way CE splice (model forwards), and writing the files.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import saelab.darkmatter as D
from saelab.config import DarkMatterConfig


def train_seconds(run: Path) -> float:
    lines = [json.loads(ln) for ln in (run / "train_log.jsonl").read_text().splitlines() if ln]
    last = lines[-1]
    return last["tokens"] / last["tokens_per_s"]


def timed(label: str, times: dict[str, float], fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    times[label] = time.perf_counter() - t
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo-topk")
    p.add_argument("--ce_contexts", type=int, default=DarkMatterConfig.ce_contexts)
    p.add_argument("--pursuit", default="support", choices=["support", "greedy", "none"])
    args = p.parse_args()
    run = Path(args.run)
    if not (run / "train_log.jsonl").is_file():
        raise SystemExit(f"{run} has no train_log.jsonl; make it with `.venv/bin/saelab demo`")
    cfg = DarkMatterConfig(ce_contexts=args.ce_contexts, pursuit=args.pursuit, figures=False)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    s = timed("prepare", times, D.prepare, run, cfg)
    w = timed("fit pass", times, D.fit_pass, s, cfg)
    result, tokens = timed("eval pass", times, D.eval_pass, s, w, cfg)
    if cfg.ce_contexts:
        timed("three-way CE", times, D.three_way_ce, s, w, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        timed("token table", times, D.write_token_table, Path(tmp) / "t.sqlite", s.store, tokens)
    total = time.perf_counter() - t0
    n = s.fit_rows[1] - s.fit_rows[0] + s.eval_rows[1] - s.eval_rows[0]
    train_s = train_seconds(run)
    print(f"run {run}: d_in {s.sae.d_in}, d_sae {s.sae.d_sae}, k {s.sae.k}, {n:,} held-out tokens")
    for label, t in times.items():
        print(f"  {label:14s} {t:7.1f} s")
    print(
        f"dark matter total {total:.1f} s   vs   training {train_s:.1f} s  ({total / train_s:.2f}x)"
    )
    no_ce = total - times.get("three-way CE", 0.0)
    print(
        f"without the CE splice (model forwards): {no_ce:.1f} s ({no_ce / train_s:.2f}x training)"
    )
    print(f"R²(e) {result['r2_e']:.3f}, R²(‖e‖²) {result['r2_e_norm_sq']:.3f}")


if __name__ == "__main__":
    main()
