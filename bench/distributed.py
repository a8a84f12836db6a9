"""Bytes communicated and time per TopK training step: data-parallel against latent-parallel.

    python bench/distributed.py                               # CPU, gloo, 1 and 2 ranks
    python bench/distributed.py --shapes 512,4096,32 --steps 2
    python bench/distributed.py --device cuda --worlds 1,2    # NCCL, one GPU per rank

For each shape (d_in, d_sae, k; global batch --batch, AuxK over a --dead fraction of latents
with k_aux = d_in/2 as in the trainer) and each world size, spawns that many processes with
torchrun's environment and times --steps steps (after one warm-up) of:

- dp: the bench's own minimal data-parallel step (saelab.trainer has no data-parallel path
  on this branch): each rank takes B/N rows, global FVU and AuxK denominators by all-reduce,
  one flat all-reduce of every parameter gradient, all-reduced firing counts;
- lp: `saelab.latent_parallel.train_step`: each rank holds d_sae/N latents and the full batch.

Bytes are what one rank put into collectives per step (`Dist.sent`), beside the figure
predicted from the shapes: dp ≈ 4·(2·d_sae·d_in + d_sae + d_in) + 8·d_sae, lp ≈
4·B·(k + k_aux) + 8·B·d_in + 4·d_in. The scaling check then compares the shapes: dp's bytes
grow with d_sae·d_in, lp's do not depend on d_sae. Times are medians per step; on a shared
CPU they show the work split, not a cluster's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from saelab import distributed, kernels, latent_parallel  # noqa: E402
from saelab.archs import EncodeArgs  # noqa: E402
from saelab.config import TrainConfig  # noqa: E402
from saelab.distributed import Dist  # noqa: E402
from saelab.sae import SparseCoder  # noqa: E402
from saelab.trainer import Member  # noqa: E402

SHAPES = "512,4096,32;512,16384,32"
DEAD_FOREVER = 10**9


def _member(d_in: int, d_sae: int, k: int, dead: float, device: torch.device) -> Member:
    """A full SAE as the trainer builds it, the same on every rank (seeded), with a fraction
    of latents dead for good so that AuxK runs every step."""
    torch.manual_seed(0)
    sae = SparseCoder(d_in, d_sae, k, "topk", device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
    m = Member(Path("unused"), {"aux_loss": "auxk", "k_aux": d_in // 2}, sae, opt)
    pick = torch.rand(d_sae, generator=torch.Generator().manual_seed(2)) < dead
    m.since_fired = pick.to(device, torch.int64) * DEAD_FOREVER
    m.freq = torch.zeros(d_sae, device=device)
    m.diverged_at = torch.full((), -1, dtype=torch.int64, device=device)
    return m


def _pinned(m: Member, dead: torch.Tensor, step: Callable[[], object]) -> Callable[[], None]:
    """`step` with the latents `dead` kept dead, so AuxK's work is the same every step."""

    def run() -> None:
        m.since_fired.masked_fill_(dead, DEAD_FOREVER)
        step()

    return run


def _sq_dev(t: torch.Tensor, dist: Dist, n: int) -> torch.Tensor:
    """Σ‖t − t̄‖² over the global batch of n rows, t̄ its global mean: one all-reduce."""
    s = dist.all_reduce_(torch.cat([t.sum(0), t.pow(2).sum().reshape(1)]).detach())
    return s[-1] - s[:-1].pow(2).sum() / n


def dp_step(m: Member, x: torch.Tensor, cfg: TrainConfig, dist: Dist, n: int) -> None:
    """The trainer's TopK step on this rank's rows x of a global batch of n rows."""
    sae, k_aux = m.sae, m.plan["k_aux"]
    dead = m.since_fired >= cfg.dead_tokens
    with kernels.matmul_precision(cfg.precision):
        enc = sae.encode_scaled(x, EncodeArgs(True, dead, k_aux))
        x_hat = sae.decode_scaled(enc.code)
        sse = (x_hat - x).pow(2).sum()
        loss = sse / _sq_dev(x, dist, n)
        aux_sse = torch.zeros_like(sse)
        if enc.aux is not None:
            e = (x - x_hat).detach()
            c = sae.compute
            e_hat = kernels.decode(c(enc.aux.values), enc.aux.indices, c(sae.W_dec), None)
            aux_sse = (e_hat.to(e.dtype) - e).pow(2).sum()
            scale = cfg.auxk_alpha * (dead.sum() / k_aux).clamp(max=1.0)
            loss = loss + aux_sse / _sq_dev(e, dist, n) * scale
        m.opt.zero_grad(set_to_none=True)
        loss.backward()
    params = [p for p in sae.parameters() if p.grad is not None]
    flat = dist.all_reduce_(torch.cat([p.grad.reshape(-1) for p in params]))  # type: ignore[union-attr]
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))  # type: ignore[union-attr]
    sae.project_decoder_grad()
    m.opt.step()
    sae.normalize_decoder()
    with torch.no_grad():
        values, indices = enc.code.values, enc.code.indices
        counts = torch.zeros(sae.d_sae, dtype=torch.int64, device=x.device)
        counts.index_add_(0, indices.reshape(-1), (values > 0).reshape(-1).to(torch.int64))
        dist.all_reduce_(counts)
        m.since_fired += n
        m.since_fired.masked_fill_(counts > 0, 0)
        dist.all_reduce_(torch.stack([sse.detach(), aux_sse.detach()]))  # the logged FVUs


def predicted(mode: str, d_in: int, d_sae: int, k: int, batch: int, world: int) -> int:
    """Bytes one rank puts into collectives per step, from the shapes alone."""
    if world == 1:
        return 0
    if mode == "dp":
        stats = 2 * 4 * (d_in + 1) + 2 * 4  # the two variances, the logged sums
        return 4 * (2 * d_sae * d_in + d_sae + d_in) + 8 * d_sae + stats
    k_aux = min(d_in // 2, d_sae // world)
    return 4 * batch * (k + k_aux) + 2 * 4 * batch * d_in + 4 * d_in + 8


def _time(step, dist: Dist, device: torch.device, steps: int) -> tuple[float, int]:
    """(median ms per step, bytes per step) after one warm-up step."""
    step()
    dist.sent.clear()
    times = []
    for _ in range(steps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), sum(dist.sent.values()) // steps


def _rank(rank: int, port: int, world: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(args.threads)
    device = distributed.local_device(torch.device(args.device))
    dist = distributed.init(device)
    rows = [r for shape in _shapes(args.shapes) for r in _shape_rows(shape, args, dist, device)]
    if dist.main:
        Path(out).write_text(json.dumps(rows))
    if dist.active:
        torch.distributed.destroy_process_group()


def _shape_rows(
    shape: tuple[int, int, int], args: argparse.Namespace, dist: Dist, device: torch.device
) -> list[dict]:
    """This shape's dp and lp figures at this world size."""
    d_in, d_sae, k = shape
    cfg = TrainConfig(dead_tokens=DEAD_FOREVER)
    x = torch.randn(args.batch, d_in, generator=torch.Generator().manual_seed(1)).to(device)
    m = _member(d_in, d_sae, k, args.dead, device)
    dead = m.since_fired > 0
    lo, hi = dist.shard(args.batch)
    dp = _time(
        _pinned(m, dead, lambda: dp_step(m, x[lo:hi], cfg, dist, args.batch)),
        dist, device, args.steps,
    )  # fmt: skip
    full = _member(d_in, d_sae, k, args.dead, torch.device("cpu"))
    local = latent_parallel.shard_member(full, dist, device)
    a, b = dist.shard(d_sae)
    lp = _time(
        _pinned(local, dead[a:b], lambda: latent_parallel.train_step(local, x, cfg, dist)),
        dist, device, args.steps,
    )  # fmt: skip
    return [
        dict(mode=mode, d_in=d_in, d_sae=d_sae, k=k, world=dist.world, ms=ms, sent=sent)
        for mode, (ms, sent) in (("dp", dp), ("lp", lp))
    ]


def _shapes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in s.split(",")) for s in text.split(";")]  # type: ignore[misc]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, args: argparse.Namespace) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.start_processes(
            _rank, args=(_free_port(), world, args, out), nprocs=world,
            start_method="spawn",
        )  # fmt: skip
        return json.loads(Path(out).read_text())


def report(rows: list[dict], batch: int) -> bool:
    """Prints the table and the scaling check; False if a measured byte count differs
    from its prediction or a ratio from its law."""
    print(f"\nglobal batch {batch}; dp = the bench's own minimal data-parallel step, "
          "lp = saelab.latent_parallel.train_step")  # fmt: skip
    print(f"{'mode':4s} {'d_in':>5s} {'d_sae':>6s} {'k':>4s} {'ranks':>5s} {'ms/step':>9s} "
          f"{'MB/step/rank':>13s} {'predicted':>10s}")  # fmt: skip
    ok = True
    for r in rows:
        want = predicted(r["mode"], r["d_in"], r["d_sae"], r["k"], batch, r["world"])
        ok &= r["sent"] == want
        print(f"{r['mode']:4s} {r['d_in']:5d} {r['d_sae']:6d} {r['k']:4d} {r['world']:5d} "
              f"{r['ms']:9.1f} {r['sent'] / 1e6:13.3f} {want / 1e6:10.3f}"
              + ("" if r["sent"] == want else "  MISMATCH"))  # fmt: skip
    top = max(r["world"] for r in rows)
    for mode, law, what in (
        ("dp", lambda r: r["d_sae"] * r["d_in"], "d_sae·d_in"),
        ("lp", lambda r: batch * (r["k"] + r["d_in"] // 2) + 2 * batch * r["d_in"],
         "B·(k + k_aux) + 2·B·d_in"),
    ):  # fmt: skip
        sel = [r for r in rows if r["mode"] == mode and r["world"] == top and top > 1]
        for r in sel[1:]:
            got, expect = r["sent"] / sel[0]["sent"], law(r) / law(sel[0])
            close = abs(got / expect - 1) < 0.05
            ok &= close
            print(f"{mode} at {top} ranks, d_sae {r['d_sae']} k {r['k']} vs d_sae "
                  f"{sel[0]['d_sae']} k {sel[0]['k']}: bytes ×{got:.2f}, {what} ×{expect:.2f}"
                  + ("" if close else "  OFF"))  # fmt: skip
    big = (4096, 1 << 20, 64, 4096, 8)
    print(
        "predicted at d_in {}, d_sae {}, k {}, batch {}, {} ranks: dp {:.1f} GB, lp {:.0f} MB "
        "per step and rank".format(
            *big, predicted("dp", *big[:3], batch=big[3], world=big[4]) / 1e9,
            predicted("lp", *big[:3], batch=big[3], world=big[4]) / 1e6,
        )
    )  # fmt: skip
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES, help="d_in,d_sae,k;... (default %(default)s)")
    p.add_argument("--batch", type=int, default=4096, help="global batch (tokens per step)")
    p.add_argument("--worlds", default="1,2", help="ranks to run with, e.g. 1,2,4")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    p.add_argument("--dead", type=float, default=0.1, help="fraction of latents dead (AuxK)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per rank (each rank has its own share of the machine, as on a cluster)",
    )
    args = p.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        sys.exit(f"--device cuda needs one GPU per rank; {torch.cuda.device_count()} visible")
    rows = [r for w in worlds for r in run_world(w, args)]
    rows.sort(key=lambda r: (r["d_sae"], r["k"], r["mode"], r["world"]))
    if not report(rows, args.batch):
        sys.exit("measured bytes differ from the prediction (see MISMATCH/OFF above)")


if __name__ == "__main__":
    main()
