"""Data loading for the Streamlit workbench (app/): the runs under a runs directory, their
metrics and files, read defensively (half-written or corrupt files become one-line
`UserError`s), and every path from the browser checked to stay inside the runs directory.

Nothing here imports streamlit; the app only lays out what these functions return.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saelab.compare import eval_rows
from saelab.errors import UserError
from saelab.runs import (
    CFG,
    DARKMATTER,
    DARKMATTER_TOKENS,
    EVAL,
    INDEX,
    LOG,
    SCALING,
    WEIGHTS,
    is_finished,
    read_json,
    read_token_table,
)

RUNS_DEPTH = 2
"""Runs are found at runs/<name> and one level deeper (a sweep: runs/<sweep>/<name>)."""

UNDER_USED = (1e-6, 1e-5, 1e-4)
"""Firing-frequency thresholds the dead-latents page counts latents below."""


# ---------------------------------------------------------------------------------------
# Paths from the browser


def runs_root(path: str | Path) -> Path:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"runs directory {path} does not exist; train a run with saelab train")
    return root


def inside(root: Path, rel: str | Path) -> Path:
    """`root / rel` resolved (symlinks followed), refused unless it stays inside root.

    `rel` comes from the browser (a query parameter, a selectbox), so absolute paths,
    `..` and symlinks pointing out of the runs directory are all refused."""
    root = root.resolve()
    rel = str(rel)
    if not rel or "\x00" in rel or Path(rel).is_absolute():
        raise UserError(f"{rel!r} is not a path inside the runs directory {root}")
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise UserError(f"{rel!r} points outside the runs directory {root}; refused")
    return target


def resolve_run(root: Path, name: str) -> Path:
    """The run directory called `name` (relative to root), checked to be inside root."""
    run = root.resolve() if name == "." else inside(root, name)
    if not (run / CFG).is_file():
        raise UserError(f"{name!r} is not a run in {root} (no {CFG})")
    return run


# ---------------------------------------------------------------------------------------
# Files


@dataclass
class RunInfo:
    """One run directory and what it holds, as far as it could be read."""

    name: str
    """Path relative to the runs directory ('.' when the runs directory is itself a run)."""

    path: Path
    cfg: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    """Why something is missing or unreadable, one line each."""

    @property
    def complete(self) -> bool:
        return is_finished(self.path)

    @property
    def has_index(self) -> bool:
        return (self.path / INDEX).is_file()

    @property
    def has_darkmatter(self) -> bool:
        return (self.path / DARKMATTER).is_file()

    @property
    def arch(self) -> str:
        return str(self.cfg.get("arch", "?"))


def run_info(root: Path, name: str) -> RunInfo:
    """Never raises for a run that exists: what cannot be read goes to `problems`."""
    path = resolve_run(root, name)
    info = RunInfo(name, path)
    try:
        info.cfg = read_json(path / CFG)
    except UserError as e:
        info.problems.append(str(e))
        return info
    if not info.cfg.get("complete"):
        info.problems.append(f"training has not finished (rerun saelab train for {name})")
    elif not (path / WEIGHTS).is_file():
        info.problems.append(f"{WEIGHTS} is missing")
    if (path / EVAL).is_file():
        try:
            info.eval = read_json(path / EVAL, f"rerun saelab eval {path}")
        except UserError as e:
            info.problems.append(str(e))
    return info


def run_names(root: Path) -> list[str]:
    """Names (relative to root, '/'-separated) of the run directories under root, sorted;
    symlinked directories that lead out of root are skipped."""
    root = root.resolve()
    if (root / CFG).is_file():
        return ["."]
    names = []
    for depth in range(1, RUNS_DEPTH + 1):
        for cfg in root.glob("/".join(["*"] * depth) + f"/{CFG}"):
            rel = cfg.parent.relative_to(root).as_posix()
            try:
                inside(root, rel)
            except UserError:
                continue
            names.append(rel)
    return sorted(names)


def first_complete(root: Path, names: list[str]) -> str:
    """The first finished run of `names` (the first name when none is): the default view."""
    for name in names:
        try:
            if run_info(root, name).complete:
                return name
        except UserError:
            continue
    return names[0]


def list_runs(root: Path) -> list[RunInfo]:
    return [run_info(root, n) for n in run_names(root)]


def _pct(v: Any) -> float | None:
    return None if v is None else 100 * float(v)


def runs_table(runs: list[RunInfo]) -> list[dict[str, Any]]:
    """One row per run for the Runs page (None where eval.json has no number)."""
    rows = []
    for r in runs:
        ev = r.eval or {}
        if r.problems:
            status = r.problems[0]
        elif r.eval is None:
            status = f"not evaluated: saelab eval {r.path}"
        else:
            status = "ok"
        rows.append(
            {
                "run": r.name,
                "arch": r.cfg.get("arch"),
                "d_sae": r.cfg.get("d_sae"),
                "k": r.cfg.get("k"),
                "FVU": ev.get("fvu"),
                "L0": ev.get("l0"),
                "dead %": _pct(ev.get("dead_frac")),
                "CE score": ev.get("ce_score"),
                "index": r.has_index,
                "dark matter": r.has_darkmatter,
                "status": status,
            }
        )
    return rows


def metric_rows(runs: list[RunInfo]) -> list[dict[str, Any]]:
    """compare.collect's rows (one per evaluation mode) from eval.json alone: the app never
    evaluates. Runs without eval.json are left out."""
    return [
        row
        for r in runs
        if r.eval is not None
        for row in eval_rows(r.name, {"arch": r.arch, **r.eval})
    ]


# ---------------------------------------------------------------------------------------
# Dead latents


@dataclass
class FreqHist:
    """eval.json's log10 firing-frequency histogram."""

    edges: list[float]
    counts: list[int]
    never_fired: int
    d_sae: int
    n_tokens: int

    def below(self, freq: float) -> int:
        """Latents firing less often than `freq` (the never-firing ones included), counting
        whole bins whose upper edge is at or below log10(freq)."""
        lim = math.log10(freq)
        n = sum(c for c, hi in zip(self.counts, self.edges[1:]) if hi <= lim + 1e-9)
        return self.never_fired + n


def freq_hist(ev: dict[str, Any]) -> FreqHist | None:
    h = ev.get("log10_freq_hist")
    if not h:
        return None
    return FreqHist(
        list(h["edges"]),
        list(h["counts"]),
        int(h.get("never_fired", 0)),
        int(ev.get("d_sae") or 0),
        int(ev.get("n_tokens") or 0),
    )


def freq_hist_from_stats(freq: np.ndarray, n_tokens: int) -> FreqHist:
    """The same histogram from the feature index's per-latent frequencies."""
    edges = np.linspace(-8.0, 0.0, 33)
    alive = freq[freq > 0]
    counts, _ = np.histogram(np.clip(np.log10(alive), -8.0, 0.0), edges)
    return FreqHist(
        edges.tolist(), counts.tolist(), int((freq == 0).sum()), int(freq.size), n_tokens
    )


def dead_counts(h: FreqHist) -> dict[str, int]:
    out = {"dead": h.never_fired}
    for f in UNDER_USED:
        out[f"freq < {f:.0e}".replace("e-0", "e-")] = h.below(f)
    return out


def dead_series(run: Path) -> dict[str, list[float]]:
    """Dead fraction over training from train_log.jsonl; lines that do not parse (a log
    being written) are skipped."""
    out: dict[str, list[float]] = {"step": [], "tokens": [], "dead_frac": []}
    try:
        lines = (run / LOG).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return out
    for line in lines:
        try:
            row = json.loads(line)
            vals = [float(row["step"]), float(row["tokens"]), float(row["dead_frac"])]
        except (ValueError, KeyError, TypeError):
            continue
        for key, v in zip(out, vals):
            out[key].append(v)
    return out


# ---------------------------------------------------------------------------------------
# Dark matter


def darkmatter(run: Path) -> dict[str, Any]:
    return read_json(run / DARKMATTER, f"saelab darkmatter {run} writes it")


def darkmatter_tokens(run: Path) -> dict[str, np.ndarray] | None:
    """The per-token error table, or None when it is absent; UserError when unreadable."""
    path = run / DARKMATTER_TOKENS
    if not path.is_file():
        return None
    try:
        return read_token_table(path)
    except sqlite3.Error as e:
        raise UserError(
            f"{path} is not a readable table ({e}); rerun saelab darkmatter {run}"
        ) from None


def scaling_result(root: Path, run: Path) -> tuple[Path, dict[str, Any]] | None:
    """`saelab darkmatter --scaling`'s result next to `run` (in its parent folder), if any."""
    root, run = root.resolve(), run.resolve()
    if run == root:
        return None
    path = run.parent / SCALING / "scaling.json"
    if not path.is_file():
        return None
    path = inside(root, path.relative_to(root))  # a symlinked folder must not lead out
    return path, read_json(path, "rerun saelab darkmatter --scaling")


def ce_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The three-way CE (clean, each splice, zero-ablation) as table rows."""
    ce = result.get("ce") or {}
    if "variants" not in ce:
        return []
    rows = [{"splice": "clean", "CE (nats)": ce.get("ce_clean"), "ΔCE": 0.0}]
    for name, v in ce["variants"].items():
        rows.append({"splice": name, "CE (nats)": v.get("ce"), "ΔCE": v.get("delta_ce")})
    rows.append(
        {
            "splice": "zero ablation",
            "CE (nats)": ce.get("ce_ablation"),
            "ΔCE": _sub(ce.get("ce_ablation"), ce.get("ce_clean")),
        }
    )
    return rows


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
