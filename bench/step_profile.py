"""Where one training step's time goes, per rule, at the benchmark shape (torch.profiler).

    python bench/step_profile.py                              # topk and mutual_choice
    python bench/step_profile.py --archs mutual_choice --aux zipf auxk none

Each rule trains `--warm` steps on the synthetic harvest of bench/train.py (so the firing
frequencies that aux_zipf reads are a trained SAE's, not an init's), then `--steps` steps
run under the profiler. Prints the mean step time and the self CPU time of the costliest
ops, grouped under the autograd node (backward) or the forward they ran in.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from bench.train import harvest_dir, parse_args  # noqa: E402
from saelab.config import SAEConfig, TrainConfig  # noqa: E402
from saelab.sae import SparseCoder  # noqa: E402
from saelab.sources import StoreSource  # noqa: E402
from saelab.store import ActivationStore  # noqa: E402
from saelab.trainer import Member, _aux_of, _train_step  # noqa: E402

try:  # the benchmark also profiles older saelab, for before/after figures
    from saelab.trainer import _aux_every_of
except ImportError:
    _aux_every_of = None


def flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archs", nargs="+", default=["topk", "mutual_choice"])
    p.add_argument("--aux", nargs="+", default=["default"], choices=["default", "auxk", "zipf"])
    p.add_argument("--aux_every", type=int, default=0, help="as train's --aux_every")
    p.add_argument("--warm", type=int, default=30)
    p.add_argument("--steps", type=int, default=7)


PHASES = {
    "saelab.kernels.global_topk": "mutual choice: global top-(k·B) selection",
    "saelab.kernels.eager.row_topk": "topk/feature choice: row/column top-k",
    "saelab.kernels.eager.column_topk": "feature choice: column top-m",
    "saelab.archs.mask_to_ragged": "selected entries → CSR code",
    "saelab.kernels.eager._masked_topk": "aux: candidate selection (masked top-k_aux)",
    "saelab.trainer.zipf_deficit": "aux: zipf deficits",
    "saelab.trainer._aux_fit": "aux: decode of the candidates (forward)",
    "saelab.trainer._losses": "losses",
    "saelab.trainer._fired_counts": "firing counts",
}
"""Functions timed as phases (module.function: label); autograd's nodes time the backward."""

NODES = {
    "aten::addmm": "encoder GEMM (forward; in the encode)",
    "SparseEncode": "encode forward (GEMM + selection + aux selection)",
    "RaggedEncode": "encode forward (GEMM + selection + aux selection)",
    "Decode": "decode forward",
    "RaggedDecode": "decode forward",
    "SparseEncodeBackward": "backward: encoder (code + aux)",
    "RaggedEncodeBackward": "backward: encoder (code + aux)",
    "RaggedDecodeBackward": "backward: decoder (code)",
    "DecodeBackward": "backward: decoder (code, or aux)",
    "Optimizer.step#Adam.step": "Adam step",
}


def wrap_phases() -> None:
    """Run each function of PHASES inside a profiler range of its name."""
    import importlib

    for path in PHASES:
        mod_name, fn_name = path.rsplit(".", 1)
        mod = importlib.import_module(mod_name)
        fn = getattr(mod, fn_name)

        def timed(*a, _fn=fn, _path=path, **kw):
            with record_function(_path):
                return _fn(*a, **kw)

        setattr(mod, fn_name, timed)
        for user in ("saelab.archs", "saelab.trainer", "saelab.kernels.eager"):
            u = importlib.import_module(user)
            if getattr(u, fn_name, None) is fn:
                setattr(u, fn_name, timed)


def phases(prof) -> dict[str, float]:
    """ms of each phase in one profiled step (CPU total, children included: the selection
    phases nest inside the encode forward, the encoder GEMM too)."""
    rows = {e.key: e for e in prof.key_averages()}
    out: dict[str, float] = {}
    for key, label in [*PHASES.items(), *NODES.items()]:
        if key in rows:
            out[label] = out.get(label, 0.0) + rows[key].cpu_time_total / 1e3
    return out


def member(arch: str, aux: str, args: argparse.Namespace, d_in: int) -> tuple[Member, TrainConfig]:
    torch.manual_seed(0)
    s = SAEConfig(arch, args.d_sae, args.k, aux=aux)  # type: ignore[arg-type]
    extra = {"aux_every": args.aux_every} if args.aux_every else {}
    cfg = TrainConfig(sae=s, batch_size=args.batch, dead_tokens=args.dead_tokens, **extra)
    sae = SparseCoder(d_in, args.d_sae, args.k, arch)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.resolved_lr(), fused=True)
    plan = {"aux_loss": _aux_of(s), "k_aux": d_in // 2, "lr": cfg.resolved_lr()}
    if _aux_every_of is not None:  # not in saelab before aux_every: every token
        plan["aux_every"] = _aux_every_of(s, cfg)
    m = Member(Path("unused"), plan, sae, opt)
    m.since_fired = torch.zeros(args.d_sae, dtype=torch.int64)
    m.freq = torch.zeros(args.d_sae)
    m.diverged_at = torch.full((), -1)
    return m, cfg


def main() -> None:
    args = parse_args(__doc__, tokens=300_000, more=flags)
    wrap_phases()
    path = harvest_dir(args.tokens, args.d_in, grads=True)
    store = ActivationStore(str(path))
    source = StoreSource(store, (0, store.n_tokens - 20_000), 262_144, torch.float32)
    sample = source.sample(20_000, seed=0)
    scale = (args.d_in / sample.pow(2).sum(1).mean()).sqrt()
    stream = source.batches(args.batch, seed=0)
    xs = [next(stream) * scale for _ in range(args.warm + args.steps)]
    stream.close()
    members = {}
    for arch in args.archs:
        for aux in args.aux:
            m, cfg = member(arch, aux, args, args.d_in)
            with torch.no_grad():
                m.sae.b_dec.copy_(sample.mean(0) * scale)
            for x in xs[: args.warm]:
                _train_step(m, x, None, cfg)
            members[f"{arch} aux={m.plan['aux_loss']}"] = (m, cfg)
    # Interleaved: step i of every member, then step i + 1, so load drift hits all alike.
    times: dict[str, list[float]] = {name: [] for name in members}
    parts: dict[str, list[dict[str, float]]] = {name: [] for name in members}
    for x in xs[args.warm :]:
        for name, (m, cfg) in members.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                _train_step(m, x, None, cfg)
                times[name].append(time.perf_counter() - t)
            parts[name].append(phases(prof))
    first = next(iter(members))
    for name in members:
        ratio = statistics.median(a / b for a, b in zip(times[first], times[name]))
        dt = statistics.median(times[name])
        print(
            f"\n=== {name}: median {dt * 1e3:.0f} ms/step ({args.batch / dt:,.0f} tok/s under "
            f"the profiler), {ratio:.2f}× {first} (median of per-step ratios)"
        )
        for label in parts[name][0]:
            ms = statistics.median(p.get(label, 0.0) for p in parts[name])
            print(f"  {label:55s} {ms:8.1f} ms")


if __name__ == "__main__":
    main()
