"""Kernels and the training step at the precisions training uses (fp32, tf32, bf16).

    python bench/kernels.py                              # CUDA: eager and Triton, both shapes
    python bench/kernels.py --precision bf16 --iters 50 --dead 0
    python bench/kernels.py --device cpu --shapes 512,4096,32 --precision fp32,bf16

Per shape (default d_in 768 / d_sae 32768 / k 32 and d_in 2304 / d_sae 65536 / k 64, batch
4096), precision and backend: milliseconds for the TopK encoder forward + backward (with
AuxK over a --dead fraction of latents, k_aux = d_in/2 as in the trainer), the decoder
forward + backward, the trainer's own step (`trainer._train_step`: encode, decode, FVU + AuxK,
backward, fused Adam, decoder renorm; fp32 master weights whatever the precision), its
tokens/s and peak memory. Then, on CUDA, the fused encoder's forward ÷ a bare cuBLAS GEMM
[B, d_in] × [d_in, d_sae] at the same precision (goal ≤ 1.2: the top-k nearly free), and
each precision's step against the fp32 eager step (goal for bf16 on Triton: ≥ 2).

On the CPU only the eager backend runs. All timed calls take turns (every precision and
backend's encode, decode and step once per round), so a shared machine's drift slows them
alike; each time is the median over rounds. Peak memory is the step's own, on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from saelab import kernels  # noqa: E402
from saelab.archs import EncodeArgs, SparseCode  # noqa: E402
from saelab.config import TrainConfig  # noqa: E402
from saelab.sae import SparseCoder  # noqa: E402
from saelab.trainer import Member, _train_step  # noqa: E402

SHAPES = [(768, 32768, 32), (2304, 65536, 64)]
DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_all(fns: dict[str, Callable[[], object]], iters: int, device: str) -> dict[str, float]:
    """Median milliseconds per call of each fn, after two warm-up calls each (Triton
    compiles on the first); the fns take turns, one call each per round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(2):
        for fn in fns.values():
            fn()
    for _ in range(iters):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


class Setup:
    """One SAE as the trainer builds it (fp32 master weights, fused Adam) at a precision."""

    def __init__(self, d_in, d_sae, k, batch, precision: str, dead: float, device: str):
        g = torch.Generator(device=device).manual_seed(0)
        self.precision, self.device = precision, device
        sae = SparseCoder(d_in, d_sae, k, "topk", device=device)
        sae.compute_dtype = DTYPE[precision]
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
        self.m = Member(Path("unused"), {"aux_loss": "auxk", "k_aux": d_in // 2}, sae, opt)
        dead_mask = torch.rand(d_sae, device=device, generator=g) < dead
        self.m.since_fired = dead_mask.to(torch.int64) * 10**9
        self.m.freq = torch.zeros(d_sae, device=device)
        self.m.diverged_at = torch.full((), -1, dtype=torch.int64, device=device)
        self.cfg = TrainConfig(precision=precision)  # type: ignore[arg-type]
        self.x = torch.randn(batch, d_in, device=device, generator=g)
        self.args = EncodeArgs(True, dead_mask, d_in // 2)
        with kernels.matmul_precision(precision):
            code = sae.encode_scaled(self.x, self.args).code
        self.values, self.indices = code.values.detach(), code.indices

    def encode(self) -> None:
        sae = self.m.sae
        sae.zero_grad(set_to_none=True)
        with kernels.matmul_precision(self.precision):
            enc = sae.encode_scaled(self.x, self.args)
            loss = enc.code.values.float().sum()
            if enc.aux is not None:
                loss = loss + enc.aux.values.float().sum()
            loss.backward()

    def decode(self) -> None:
        sae = self.m.sae
        sae.zero_grad(set_to_none=True)
        values = self.values.clone().requires_grad_()
        with kernels.matmul_precision(self.precision):
            sae.decode_scaled(SparseCode(values, self.indices)).pow(2).sum().backward()

    def step(self) -> None:
        self.m.since_fired.clamp_(max=10**9)  # the dead stay dead, the live stay live
        _train_step(self.m, self.x, None, self.cfg)


def with_backend(backend: str, fn: Callable[[], None]) -> Callable[[], None]:
    def call() -> None:
        kernels.use_backend(backend)
        fn()

    return call


def bench_shape(d_in: int, d_sae: int, k: int, args: argparse.Namespace) -> dict[str, float]:
    """Prints the rows of one shape; returns the step times by 'precision/backend'."""
    print(f"\nd_in {d_in}, d_sae {d_sae}, k {k}, batch {args.batch}, dead {args.dead:.0%}")
    print(
        f"{'precision':9s} {'backend':7s} {'encode f+b':>11s} {'decode f+b':>11s} "
        f"{'step':>10s} {'tok/s':>10s} {'peak':>9s}"
    )
    backends = ["eager", "triton"] if args.device == "cuda" else ["eager"]
    setups: dict[str, Setup] = {}
    for precision in args.precision.split(","):
        for backend in backends:
            kernels.use_backend(backend)
            setups[f"{precision}/{backend}"] = Setup(
                d_in, d_sae, k, args.batch, precision, args.dead, args.device
            )
    fns = {}
    for name, s in setups.items():
        for op, fn in (("enc", s.encode), ("dec", s.decode), ("step", s.step)):
            fns[f"{name}/{op}"] = with_backend(name.split("/")[1], fn)
    try:
        t = timed_all(fns, args.iters, args.device)
    except torch.OutOfMemoryError:
        print("out of memory; try fewer --precision values at a time")
        return {}
    steps: dict[str, float] = {}
    for name, s in setups.items():
        peak = float("nan")
        if args.device == "cuda":
            kernels.use_backend(name.split("/")[1])
            torch.cuda.reset_peak_memory_stats()
            s.step()
            peak = torch.cuda.max_memory_allocated() / 2**30
        steps[name] = step = t[f"{name}/step"]
        print(
            f"{name.split('/')[0]:9s} {name.split('/')[1]:7s} {t[f'{name}/enc']:9.2f}ms "
            f"{t[f'{name}/dec']:9.2f}ms {step:8.2f}ms {args.batch / step * 1e3:10,.0f} "
            + (f"{peak:7.2f}GiB" if args.device == "cuda" else f"{'-':>9s}")
        )
    del setups
    if args.device == "cuda":
        torch.cuda.empty_cache()
        fused_vs_gemm(d_in, d_sae, k, args)
    base = steps.get("fp32/eager")
    for name, ms in steps.items():
        if base and name != "fp32/eager":
            print(f"step {name}: {base / ms:.2f}× the fp32 eager step")
    return steps


def fused_vs_gemm(d_in: int, d_sae: int, k: int, args: argparse.Namespace) -> None:
    from saelab.kernels.triton_select import fused_topk

    g = torch.Generator(device="cuda").manual_seed(1)
    for precision in args.precision.split(","):
        dtype = DTYPE[precision]
        x = torch.randn(args.batch, d_in, device="cuda", generator=g).to(dtype)
        W = torch.randn(d_sae, d_in, device="cuda", generator=g).to(dtype)
        b = torch.zeros(d_sae, device="cuda", dtype=dtype)
        with kernels.matmul_precision(precision):
            t = timed_all(
                {
                    "fused": lambda x=x, W=W, b=b: fused_topk(x, W, b, k),
                    "gemm": lambda x=x, W=W: x @ W.T,
                },
                args.iters,
                "cuda",
            )
        print(
            f"fused encoder forward, {precision}: {t['fused']:.2f}ms ÷ cuBLAS GEMM "
            f"{t['gemm']:.2f}ms = {t['fused'] / t['gemm']:.2f} (goal ≤ 1.2)"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="fp32,tf32,bf16", help="comma-separated")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shapes", default="", help="d_in,d_sae,k;... (default: both GPU shapes)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--dead", type=float, default=0.1, help="fraction of latents under AuxK")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device; run with --device cpu for the eager CPU figures; skipped.")
            return 0
        try:
            kernels.use_backend("triton")
        except ImportError as e:
            print(f"bench/kernels.py needs Triton on CUDA ({e}); skipped.")
            return 0
        print(torch.cuda.get_device_name())
    shapes = (
        [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
        if args.shapes
        else SHAPES
    )
    for d_in, d_sae, k in shapes:
        bench_shape(d_in, d_sae, k, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
