"""Feature-index build time and per-query latency at d_sae 16384 (the app's page queries).

    .venv/bin/python bench/index.py                 # random 16384-latent SAE, synthetic harvest
    .venv/bin/python bench/index.py --run runs/<name>   # time the queries of an existing index

The synthetic run is a freshly initialised SAE (tied encoder) saved as a finished run over a
synthetic harvest: its latents fire, which is all the index needs. Each query is timed on a
fresh connection (first call, cold) and then over random latents (median and max).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from saelab.config import IndexConfig  # noqa: E402
from saelab.feature_index import FeatureIndex  # noqa: E402
from saelab.features import build_index  # noqa: E402
from saelab.sae import SparseCoder  # noqa: E402
from saelab.synthetic import SyntheticData, write_harvest  # noqa: E402


def synthetic_run(root: Path, d_in: int, d_sae: int, k: int, n_tokens: int) -> Path:
    h = write_harvest(root / "h", SyntheticData(d_in=d_in, n_features=4096, k_true=16), n_tokens)
    run = root / "run"
    extra = {"harvest": str(h), "hook": "synthetic", "model": "synthetic", "complete": True}
    SparseCoder(d_in, d_sae, k).save(run, {**extra, "eval_range": [0, n_tokens]})
    return run


def timings(ix: FeatureIndex, n: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, ix.d_sae, n).tolist()
    queries = {
        "stats()": lambda i: ix.stats(),
        "latent(i)": lambda i: ix.latent(i),
        "contexts(i, 'top')": lambda i: ix.contexts(i),
        "contexts(i, 'interval')": lambda i: ix.contexts(i, "interval"),
        "search_token": lambda i: ix.search_token(
            "<0>" if ix.meta["model"] == "synthetic" else "the"
        ),
    }
    out: dict[str, list[float]] = {}
    for name, fn in queries.items():
        out[name] = []
        for i in ids:
            t = time.perf_counter()
            fn(i)
            out[name].append(time.perf_counter() - t)
    return out


def report(path: Path, n: int) -> None:
    t = time.perf_counter()
    ix = FeatureIndex(path)
    opened = 1e3 * (time.perf_counter() - t)
    print(f"open {opened:.1f} ms; d_sae {ix.d_sae}, {ix.meta['tokens']:,} tokens")
    print(f"{'query':26s} {'first':>9s} {'median':>9s} {'max':>9s}   (ms, {n} random latents)")
    for name, ts in timings(ix, n).items():
        ms = [1e3 * x for x in ts]
        print(f"{name:26s} {ms[0]:9.2f} {statistics.median(ms):9.2f} {max(ms):9.2f}")
    ix.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="an indexed run (skips the build)")
    p.add_argument("--d_sae", type=int, default=16384)
    p.add_argument("--d_in", type=int, default=256)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=50)
    args = p.parse_args()
    if args.run:
        report(Path(args.run) / "features.sqlite", args.queries)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run = synthetic_run(Path(tmp), args.d_in, args.d_sae, args.k, args.tokens)
        t = time.perf_counter()
        path = build_index(run, IndexConfig(device="cpu"), progress=False)
        build = time.perf_counter() - t
        size = path.stat().st_size / 2**20
        print(
            f"build: d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, {args.tokens:,} tokens: "
            f"{build:.1f} s, {size:.0f} MiB"
        )
        report(path, args.queries)


if __name__ == "__main__":
    main()
