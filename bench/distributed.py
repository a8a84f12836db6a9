"""Bytes communicated and time per training step: data-parallel against latent-parallel,
both through the trainer's own steps.

    python bench/distributed.py                               # CPU, gloo, 1 and 2 ranks
    python bench/distributed.py --shapes 512,4096,32 --steps 2 --archs topk,mutual_choice
    python bench/distributed.py --device cuda --worlds 1,2    # NCCL, one GPU per rank

For each shape (d_in, d_sae, k; global batch --batch, k_aux = d_in/2, a --dead fraction of
latents kept dead so that AuxK runs every step), each rule in --archs and each world size,
spawns that many processes with torchrun's environment and times --steps steps (after one
warm-up) of `saelab.trainer._train_step` on a member built by `trainer._make_member`, on
random activations:

- dp (parallel="data"): each rank its B/N rows of the global batch;
- lp (parallel="latent"): each rank holds d_sae/N latents and the whole batch; only the
  rules in `latent_parallel.SUPPORTED`.

Bytes are what one rank put into collectives per step (`Dist.sent`, by kind), beside the
figure predicted from the shapes (`predicted`). The scaling check compares the shapes: dp's
bytes grow with d_sae·d_in, lp's with B·(k + k_aux) + 2·B·d_in, whatever d_sae. Times are
medians per step; on a shared CPU they show the work split, not a cluster's speed.
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from saelab import distributed, latent_parallel  # noqa: E402
from saelab.archs import ARCHS, feature_choice_m  # noqa: E402
from saelab.config import SAEConfig, TrainConfig  # noqa: E402
from saelab.distributed import Dist  # noqa: E402
from saelab.fields import to_dict  # noqa: E402
from saelab.trainer import Member, _make_member, _train_step  # noqa: E402

SHAPES = "512,4096,32;512,16384,32"
DEAD_FOREVER = 10**9
KINDS = ("all_reduce", "all_gather")  # the table's columns; a broadcast still fails the check


def predicted(
    mode: str, arch: str, d_in: int, d_sae: int, k: int, batch: int, world: int
) -> dict[str, int]:
    """Bytes one rank puts into each kind of collective per step, from the shapes alone."""
    if world == 1:
        return {}
    k_aux = d_in // 2
    if mode == "lp":  # candidates, partial x̂ and ê, b_dec's gradient, the dead count
        k_aux = min(k_aux, d_sae // world)
        return {
            "all_gather": 4 * batch * (k + k_aux),
            "all_reduce": 2 * 4 * batch * d_in + 4 * d_in + 8,
        }
    spec = ARCHS[arch]
    trained = d_sae * d_in + d_in + (d_sae * d_in + d_sae if spec.uses_encoder else 0)
    has_aux = arch != "matching_pursuit"
    # data_parallel.global_losses: float64 Σx, Σ‖x‖², the error (and the residual's), counts
    losses = 8 * ((d_in + 2) * (2 if has_aux else 1) + d_sae)
    out = {"all_reduce": 4 * trained + losses + (4 if spec.needs_grads else 0)}
    rows = batch // world
    if arch == "mutual_choice":  # each rank's top min(k·B, its entries) values
        out["all_gather"] = 4 * min(k * batch, rows * d_sae)
    elif arch == "feature_choice":  # each latent's top min(m, B/N) of this rank's rows
        out["all_gather"] = 4 * min(feature_choice_m(k, batch, d_sae), rows) * d_sae
    return out


def _member(
    mode: str,
    arch: str,
    shape: tuple[int, int, int],
    mean: torch.Tensor,
    dist: Dist,
    device: torch.device,
    args: argparse.Namespace,
) -> tuple[Member, torch.Tensor, TrainConfig]:
    """The member the trainer builds for this mode (seeded alike on every rank) and the
    mask of its latents to keep dead."""
    d_in, d_sae, k = shape
    cfg = TrainConfig(
        batch_size=args.batch, dead_tokens=DEAD_FOREVER,
        parallel="latent" if mode == "lp" else "data",
    )  # fmt: skip
    plan = {
        "train": {"sae": to_dict(SAEConfig(arch, d_sae, k))},
        "lr": 1e-4,
        "k_aux": d_in // 2,
        "aux_loss": ARCHS[arch].aux,
    }
    m = _make_member(Path("/nonexistent"), plan, None, 1.0, mean, cfg, device, dist)
    dead = torch.rand(d_sae, generator=torch.Generator().manual_seed(2)) < args.dead
    if m.latents.active:
        dead = dead[slice(*dist.shard(d_sae))]
    return m, dead.to(m.since_fired.device), cfg


def _time(step, dist: Dist, device: torch.device, steps: int) -> tuple[float, dict[str, int]]:
    """(median ms per step, bytes per step by kind) after one warm-up step."""
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
    return statistics.median(times), {k: v // steps for k, v in dist.sent.items()}


def _rows(shape, arch: str, args: argparse.Namespace, dist: Dist, device: torch.device):
    """This shape's and rule's dp (and lp) figures at this world size."""
    d_in = shape[0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, d_in, generator=gen).to(device)
    g = torch.randn(args.batch, d_in, generator=gen).to(device)
    lo, hi = dist.shard(args.batch)
    out = []
    for mode in ("dp", "lp") if arch in latent_parallel.SUPPORTED else ("dp",):
        m, dead, cfg = _member(mode, arch, shape, x.mean(0), dist, device, args)
        xs, gs = (x, g) if mode == "lp" else (x[lo:hi], g[lo:hi])
        grad = gs if ARCHS[arch].needs_grads else None

        def step(m=m, dead=dead, cfg=cfg, xs=xs, grad=grad) -> None:
            m.since_fired.masked_fill_(dead, DEAD_FOREVER)  # AuxK's work the same each step
            _train_step(m, xs, grad, cfg, dist)

        ms, sent = _time(step, dist, device, args.steps)
        out.append(dict(mode=mode, arch=arch, shape=shape, world=dist.world, ms=ms, sent=sent))
    return out


def _rank(rank: int, port: int, world: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(args.threads)
    device = distributed.local_device(torch.device(args.device))
    dist = distributed.init(device)
    rows = [
        r for s in _shapes(args.shapes) for a in args.archs.split(",")
        for r in _rows(s, a, args, dist, device)
    ]  # fmt: skip
    if dist.main:
        Path(out).write_text(json.dumps(rows))
    if dist.active:
        torch.distributed.destroy_process_group()


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
            _rank, args=(_free_port(), world, args, out), nprocs=world, start_method="spawn"
        )
        return json.loads(Path(out).read_text())


def _mb(sent: dict[str, int]) -> str:
    return " ".join(f"{sent.get(k, 0) / 1e6:9.3f}" for k in KINDS)


def report(rows: list[dict], batch: int) -> bool:
    """Prints the table and the scaling check; False if a measured byte count differs
    from its prediction or a ratio from its law."""
    print(f"\nglobal batch {batch}; both modes run saelab.trainer._train_step; "
          "MB per step and rank: all_reduce all_gather (measured | predicted)")  # fmt: skip
    cols = ("reduce", "gather") * 2
    print(f"{'mode':4s} {'arch':16s} {'d_in':>5s} {'d_sae':>6s} {'k':>4s} {'ranks':>5s} "
          "{:>9s} {:>9s} {:>9s} | {:>9s} {:>9s}".format("ms/step", *cols))  # fmt: skip
    ok = True
    for r in rows:
        d_in, d_sae, k = r["shape"]
        want = predicted(r["mode"], r["arch"], d_in, d_sae, k, batch, r["world"])
        same = r["sent"] == want
        ok &= same
        print(f"{r['mode']:4s} {r['arch']:16s} {d_in:5d} {d_sae:6d} {k:4d} {r['world']:5d} "
              f"{r['ms']:9.1f} {_mb(r['sent'])} | {_mb(want)}"
              + ("" if same else "  MISMATCH"))  # fmt: skip
    top = max(r["world"] for r in rows)
    laws = {
        "dp": (lambda s: s[1] * s[0], "d_sae·d_in"),
        "lp": (lambda s: batch * (s[2] + s[0] // 2) + 2 * batch * s[0], "B·(k+k_aux) + 2·B·d_in"),
    }
    for mode, arch in dict.fromkeys((r["mode"], r["arch"]) for r in rows):
        law, what = laws[mode]
        sel = [
            r for r in rows if (r["mode"], r["arch"], r["world"]) == (mode, arch, top) and top > 1
        ]
        for r in sel[1:]:
            got = sum(r["sent"].values()) / sum(sel[0]["sent"].values())
            expect = law(r["shape"]) / law(sel[0]["shape"])
            close = abs(got / expect - 1) < 0.05
            ok &= close
            print(f"{mode} {arch} at {top} ranks, {r['shape']} vs {sel[0]['shape']}: bytes "
                  f"×{got:.2f}, {what} ×{expect:.2f}" + ("" if close else "  OFF"))  # fmt: skip
    big = (4096, 1 << 20, 64, 4096, 8)
    dp, lp = (sum(predicted(m, "topk", *big[:3], *big[3:]).values()) for m in ("dp", "lp"))
    print("topk predicted at d_in {}, d_sae {}, k {}, batch {}, {} ranks: dp {:.1f} GB, "
          "lp {:.0f} MB per step and rank".format(*big, dp / 1e9, lp / 1e6))  # fmt: skip
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES, help="d_in,d_sae,k;... (default %(default)s)")
    p.add_argument("--archs", default="topk", help="rules, comma-separated (lp: topk, g-SAE)")
    p.add_argument("--batch", type=int, default=4096, help="global batch (tokens per step)")
    p.add_argument("--worlds", default="1,2", help="ranks to run with, e.g. 1,2,4")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    p.add_argument("--dead", type=float, default=0.1, help="fraction of latents dead (AuxK)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    args = p.parse_args()
    if unknown := set(args.archs.split(",")) - {a for a, s in ARCHS.items() if s.trainable}:
        sys.exit(f"--archs: unknown or untrainable {', '.join(sorted(unknown))}")
    worlds = [int(w) for w in args.worlds.split(",")]
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        sys.exit(f"--device cuda needs one GPU per rank; {torch.cuda.device_count()} visible")
    rows = [r for w in worlds for r in run_world(w, args)]
    rows.sort(key=lambda r: (r["arch"], r["mode"], r["shape"][1], r["shape"][2], r["world"]))
    if not report(rows, args.batch):
        sys.exit("measured bytes differ from the prediction (see MISMATCH/OFF above)")


if __name__ == "__main__":
    main()
