"""Eager vs Triton kernels at training shapes (needs a CUDA GPU).

    python bench/kernels.py                      # bf16, both shapes
    python bench/kernels.py --dtype float32 --iters 50 --dead 0

Per shape (d_in 768 / d_sae 32768 / k 32 and d_in 2304 / d_sae 65536 / k 64, batch 4096)
and backend: milliseconds for the TopK encoder forward + backward (with AuxK over a --dead
fraction of latents, k_aux = d_in/2 as in the trainer), the decoder forward + backward, a
whole training step (encode, decode, FVU + AuxK loss, backward, Adam, decoder renorm), and
the step's peak memory. Last, the fused encoder's forward time ÷ a bare cuBLAS GEMM
[B, d_in] × [d_in, d_sae] in bf16: the price of the top-k on top of the matmul.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from saelab import kernels  # noqa: E402
from saelab.archs import EncodeArgs  # noqa: E402
from saelab.sae import SparseCoder  # noqa: E402

SHAPES = [(768, 32768, 32), (2304, 65536, 64)]


def timed(fn: Callable[[], object], iters: int) -> float:
    """Mean milliseconds per call after two warm-up calls (Triton compiles on the first)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


class Setup:
    def __init__(self, d_in, d_sae, k, batch, dtype, dead: float, device: str = "cuda"):
        g = torch.Generator(device=device).manual_seed(0)
        self.sae = SparseCoder(d_in, d_sae, k, "topk", device=device, dtype=dtype)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=1e-4)
        self.x = torch.randn(batch, d_in, device=device, dtype=dtype, generator=g)
        self.mask = torch.rand(d_sae, device=device, generator=g) < dead
        self.k_aux = d_in // 2 if bool(self.mask.any()) else 0
        self.args = EncodeArgs(True, self.mask if self.k_aux else None, self.k_aux)
        code = self.sae.encode_scaled(self.x, self.args).code
        self.values, self.indices = code.values.detach(), code.indices

    def encode(self) -> None:
        self.sae.zero_grad(set_to_none=True)
        enc = self.sae.encode_scaled(self.x, self.args)
        loss = enc.code.values.float().sum()
        if enc.aux is not None:
            loss = loss + enc.aux.values.float().sum()
        loss.backward()

    def decode(self) -> None:
        self.sae.zero_grad(set_to_none=True)
        values = self.values.clone().requires_grad_()
        out = kernels.decode(values, self.indices, self.sae.W_dec, self.sae.b_dec)
        out.float().pow(2).sum().backward()

    def step(self) -> None:
        sae, x = self.sae, self.x
        enc = sae.encode_scaled(x, self.args)
        x_hat = sae.decode_scaled(enc.code)
        loss = (x_hat - x).float().pow(2).sum() / (x - x.mean(0)).float().pow(2).sum()
        if enc.aux is not None:
            e = (x - x_hat).detach()
            e_hat = kernels.decode(enc.aux.values, enc.aux.indices, sae.W_dec, None)
            loss = loss + (e_hat - e).float().pow(2).sum() / e.float().pow(2).sum() / 32
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.project_decoder_grad()
        self.opt.step()
        sae.normalize_decoder()


def bench_shape(d_in: int, d_sae: int, k: int, args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    print(f"\nd_in {d_in}, d_sae {d_sae}, k {k}, batch {args.batch}, {args.dtype}, "
          f"dead {args.dead:.0%}")  # fmt: skip
    print(f"{'backend':8s} {'encode f+b':>11s} {'decode f+b':>11s} {'step':>9s} {'peak':>9s}")
    for backend in ("eager", "triton"):
        kernels.use_backend(backend)
        try:
            s = Setup(d_in, d_sae, k, args.batch, dtype, args.dead)
            enc = timed(s.encode, args.iters)
            dec = timed(s.decode, args.iters)
            step = timed(s.step, args.iters)
            torch.cuda.reset_peak_memory_stats()
            s.step()
            peak = torch.cuda.max_memory_allocated() / 2**30
        except torch.cuda.OutOfMemoryError:
            print(f"{backend:8s} out of memory")
            continue
        finally:
            torch.cuda.empty_cache()
        print(f"{backend:8s} {enc:9.2f}ms {dec:9.2f}ms {step:7.2f}ms {peak:7.2f}GiB")

    from saelab.kernels.triton_select import fused_topk

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(args.batch, d_in, device="cuda", dtype=torch.bfloat16, generator=g)
    W = torch.randn(d_sae, d_in, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.zeros(d_sae, device="cuda", dtype=torch.bfloat16)
    fused = timed(lambda: fused_topk(x, W, b, k), args.iters)
    gemm = timed(lambda: x @ W.T, args.iters)
    print(f"fused encoder forward {fused:.2f}ms ÷ cuBLAS bf16 GEMM {gemm:.2f}ms = "
          f"{fused / gemm:.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dead", type=float, default=0.1, help="fraction of latents under AuxK")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (the Triton kernels run only there); skipped.")
        return 0
    try:
        kernels.use_backend("triton")
    except ImportError as e:
        print(f"bench/kernels.py needs Triton ({e}); skipped.")
        return 0
    print(torch.cuda.get_device_name())
    for d_in, d_sae, k in SHAPES:
        bench_shape(d_in, d_sae, k, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
