"""Live training throughput against its two parts: the bare model forward and the SAE step.

    python bench/live.py                                  # smollm2-135m, default hook, CPU
    python bench/live.py --device cuda --n_tokens 2000000 --d_sae 65536 --batch_size 8192

In one process, on the same contexts and the same batches:

1. live: `saelab.trainer.train_on` a `LiveSource` (the model runs on the corpus as it trains);
2. forward: the model alone, to the hook, on the same (pre-tokenized) contexts;
3. SAE: `train_on` an `ArraySource` of the activations 2 recorded (same shuffle plan, so the
   same batches and shapes), i.e. the SAE step with the model taken away.

Prints each one's tokens/s, by wall clock and by this process's CPU time (on a machine shared
with other work the CPU figures are the steadier), and live / (serial sum of 2 and 3): 1.0
means live training adds nothing to running the two parts back to back. The goal on CPU is
>= 0.85. Phases 1 and 3 are whole `train_on` calls (run folder, scale sample and all).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from saelab.config import DEFAULT_HOOK, DEFAULT_MODEL, SAEConfig, TrainConfig
from saelab.harvest import _Recorder
from saelab.models import resolve_device
from saelab.sources import ArraySource, LiveSource
from saelab.trainer import train_on


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process CPU seconds of a block (the device synchronised at both ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Clock:
        _sync(self.device)
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c


def bare_forward(src: LiveSource, clock: Clock) -> torch.Tensor:
    """Activations of every training row, float32 on the device; the forwards timed."""
    per, mb = src.tokens_per_context, src.model_batch_size
    tokens = torch.from_numpy(src.tokens(0, src.n_contexts)).long()
    rec = _Recorder(src.model, [src.hook], False)
    buf = torch.empty((src.n_tokens, src.d_in), dtype=src.dtype, device=src.device)
    rec.bufs = {f"acts/{src.hook}": buf}
    with clock, src.model.hooks(fwd_hooks=rec.fwd_hooks()):
        for c in range(0, len(tokens), mb):
            rec.rows = slice(c * per, min(c + mb, len(tokens)) * per)
            rec.run(tokens[c : c + mb].to(src.device), src.stop)
    return buf.float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--hook", default=DEFAULT_HOOK)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n_tokens", type=int, default=60_000)
    p.add_argument("--d_sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=4096)
    p.add_argument("--n_ctx", type=int, default=128)
    p.add_argument("--shuffle_buffer", type=int, default=32_768)
    p.add_argument("--model_batch_size", type=int, default=16)
    args = p.parse_args()
    device = resolve_device(args.device)
    t = time.perf_counter()
    src = LiveSource(
        args.model, args.hook, n_tokens=args.n_tokens, n_ctx=args.n_ctx, device=device,
        model_batch_size=args.model_batch_size, shuffle_buffer=args.shuffle_buffer,
    )  # fmt: skip
    print(f"{args.model} {args.hook} on {device} ({src.dtype}), loaded in "
          f"{time.perf_counter() - t:.1f} s; {src.n_tokens:,} tokens, d_in {src.d_in}")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="saelab-bench-live-"))
    try:
        cfg = TrainConfig(
            sae=SAEConfig("topk", args.d_sae, args.k), n_tokens=src.n_tokens,
            batch_size=args.batch_size, scale_sample=256, checkpoint_every=0, device=str(device),
        )  # fmt: skip
        live, fwd, sae = Clock(device), Clock(device), Clock(device)
        with live:
            train_on(src, replace(cfg, out=str(root / "live")), False)
        acts = bare_forward(src, fwd)
        array = ArraySource(
            acts, hook=src.hook, tokens_per_context=src.tokens_per_context,
            shuffle_buffer=args.shuffle_buffer, device=device,
        )  # fmt: skip
        with sae:
            train_on(array, replace(cfg, out=str(root / "sae")), False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = src.n_tokens
    for what in ("wall", "cpu"):
        t_live, t_fwd, t_sae = (getattr(c, what) for c in (live, fwd, sae))
        print(
            f"[{what}] live training {n / t_live:9,.0f} tok/s   bare forward {n / t_fwd:9,.0f}"
            f"   SAE step alone {n / t_sae:9,.0f}   forward + SAE {n / (t_fwd + t_sae):9,.0f}"
            f"   live / (forward + SAE) = {(t_fwd + t_sae) / t_live:.2f}  (goal >= 0.85)"
        )


if __name__ == "__main__":
    main()
