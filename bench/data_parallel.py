"""Data-parallel training step: time per step and bytes each process sends per step.

    python bench/data_parallel.py                                  # one process: the baseline
    torchrun --nproc_per_node=2 bench/data_parallel.py             # 2 processes (gloo on CPU)
    torchrun --nproc_per_node=8 bench/data_parallel.py --device cuda --d_in 2304 \\
        --d_sae 65536 --k 64 --batch 32768                         # 8 GPUs (NCCL)

Runs `saelab.trainer._train_step` on random activations (each process its B/N rows of a
global batch B) for every rule in --archs, and prints per rule: ms per step, global tokens/s,
and the bytes this process put into each kind of collective per step (`Dist.sent`): the
gradient all-reduce is 4·(trained parameters) bytes, the loss sums and firing counts at most
8·(2·d_in + d_sae + 4), and the batch-level rules all-gather their candidates (mutual
choice k·B values, feature choice min(m, B/N)·d_sae; g-SAE one value).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from saelab.archs import ARCHS, TRAINABLE
from saelab.config import SAEConfig, TrainConfig
from saelab.distributed import init, local_device
from saelab.fields import to_dict
from saelab.models import resolve_device
from saelab.trainer import _make_member, _train_step, feature_choice_m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d_in", type=int, default=512)
    p.add_argument("--d_sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096, help="global batch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--archs", default=",".join(TRAINABLE))
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    device = local_device(resolve_device(a.device))
    dist = init(device)
    local = a.batch // dist.world
    cfg = TrainConfig(batch_size=a.batch, device=a.device, dead_tokens=a.batch * 4)
    gen = torch.Generator().manual_seed(dist.rank)
    x = torch.randn(local, a.d_in, generator=gen).to(device)
    g = torch.randn(local, a.d_in, generator=gen).to(device)
    if dist.main:
        print(f"{dist.world} process(es) on {device}; global batch {a.batch}, d_in {a.d_in}, "
              f"d_sae {a.d_sae}, k {a.k}")  # fmt: skip
    for arch in a.archs.split(","):
        s = SAEConfig(arch, a.d_sae, a.k)
        plan = {
            "train": {"sae": to_dict(s)},
            "lr": 1e-4,
            "k_aux": a.d_in // 2,
            "aux_loss": ARCHS[arch].aux,
            "feature_choice_m": feature_choice_m(a.k, a.batch, a.d_sae),
        }
        m = _make_member(Path("/nonexistent"), plan, None, 1.0, x.mean(0), cfg, device, dist)
        grad = g if ARCHS[arch].needs_grads else None
        _train_step(m, x, grad, cfg, dist)  # warm-up
        dist.sent.clear()
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.steps):
            _train_step(m, x, grad, cfg, dist)
        float(m.freq.sum())  # wait for the device
        dist.barrier()
        dt = (time.perf_counter() - t) / a.steps
        if dist.main:
            sent = ", ".join(f"{k} {v / a.steps / 2**20:.2f} MiB" for k, v in dist.sent.items())
            print(f"{arch:17s} {dt * 1e3:8.1f} ms/step {a.batch / dt:10,.0f} tok/s  "
                  f"sent/step: {sent or 'nothing'}")  # fmt: skip


if __name__ == "__main__":
    main()
