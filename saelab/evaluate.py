"""Evaluation on the run's held-out tokens: reconstruction and sparsity, in model units.

Reads the held-out row range the trainer recorded in cfg.json, streams it in order and
writes eval.json atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.archs import SparseCode
from saelab.config import EvalConfig
from saelab.errors import UserError
from saelab.metrics import ReconStats
from saelab.sae import CFG, SparseCoder
from saelab.store import ActivationStore
from saelab.trainer import resolve_device

EVAL = "eval.json"


def load_run(run: str | Path) -> tuple[dict[str, Any], SparseCoder]:
    run = Path(run)
    if not (run / CFG).is_file():
        raise UserError(f"{run} is not a run directory (no {CFG}); train one with saelab train")
    cfg = json.loads((run / CFG).read_text())
    if not cfg.get("complete"):
        raise UserError(f"{run} has not finished training; rerun its saelab train command")
    return cfg, SparseCoder.load(run)


Encoder = Callable[[torch.Tensor, torch.Tensor | None], SparseCode]


def eval_modes(sae: SparseCoder, cfg: EvalConfig, has_grads: bool) -> dict[str, Encoder]:
    """The ways to encode held-out tokens: the inference rule first, then each alternative
    the papers report (batch selection, with gradients, adaptive pursuit)."""
    modes: dict[str, Encoder] = {"inference": lambda x, g: sae.encode(x)}
    if sae.arch == "gradient_topk" and has_grads:
        modes["with_grad"] = lambda x, g: sae.encode(x, grad=g)
    if sae.spec.threshold != "none":

        def batch_mode(x: torch.Tensor, g: torch.Tensor | None) -> SparseCode:
            saved = sae.threshold.clone()  # batch selection must not move the thresholds
            code = sae.encode(x, training=True)
            sae.threshold.copy_(saved)
            return code

        modes["batch"] = batch_mode
    if sae.arch == "matching_pursuit":
        modes["adaptive"] = lambda x, g: sae.encode(x, mp_tol=cfg.mp_tol, mp_max_steps=4 * sae.k)
    return modes


@torch.no_grad()
def evaluate(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    if not cfg.run:
        raise UserError("no run given; pass saelab eval runs/<name>")
    run_cfg, sae = load_run(cfg.run)
    device = resolve_device(cfg.device)
    sae.to(device)
    store = ActivationStore(run_cfg["harvest"], run_cfg["hook"])
    start, stop = run_cfg["eval_range"]
    if cfg.n_tokens:
        stop = min(stop, start + cfg.n_tokens)
    if stop <= start:
        raise UserError(f"{cfg.run} has no held-out tokens; retrain with --eval_tokens > 0")
    modes = eval_modes(sae, cfg, store.has_grads)
    stats = {name: ReconStats(sae.d_sae) for name in modes}
    for lo in tqdm(range(start, stop, cfg.batch_size), desc="eval", disable=not progress):
        hi = min(lo + cfg.batch_size, stop)
        x = store.read(lo, hi).to(device)
        g = store.read(lo, hi, kind="grads").to(device) if "with_grad" in modes else None
        for name, encode in modes.items():
            code = encode(x, g)
            stats[name].update(x, sae.decode(code), *code)
    results = {name: s.result() for name, s in stats.items()}
    result = {
        "run": str(cfg.run),
        "arch": sae.arch,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "hook": run_cfg["hook"],
        "eval_range": [start, stop],
        **results.pop("inference"),
        "modes": results,
    }
    result["dead_window_tokens"] = result["n_tokens"]
    path = Path(cfg.run) / EVAL
    tmp = path.with_name(EVAL + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    return result


def summary_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """A plain-text table of the headline metrics, one row per run."""
    head = ["run", "arch", "d_sae", "k", "FVU", "nMSE", "L0", "dead %", "dense %", "tokens"]
    body = [
        [
            Path(name).name,
            r["arch"],
            str(r["d_sae"]),
            str(r["k"]),
            f"{r['fvu']:.3f}",
            f"{r['normalized_mse']:.3f}",
            f"{r['l0']:.1f}",
            f"{100 * r['dead_frac']:.1f}",
            f"{100 * r['dense_frac']:.1f}",
            f"{r['n_tokens']:,}",
        ]
        for name, r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
