"""`saelab compare`: runs side by side, as a table and a plotly figure.

Each run contributes its held-out metrics (eval.json; `evaluate.eval_results` computes it
where missing) and,
for batch-level rules and g-SAE, one extra row per evaluation mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saelab.errors import UserError
from saelab.runs import CFG, write_json

COLUMNS = [
    "name",
    "arch",
    "d_sae",
    "k",
    "mode",
    "fvu",
    "l0",
    "dead_frac",
    "below_1e-5_frac",
    "delta_ce",
]


def expand_runs(paths: list[str]) -> list[Path]:
    """Run directories named directly, or found one level below (a sweep directory)."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / CFG).is_file():
            runs.append(p)
        elif p.is_dir():
            runs += sorted(q.parent for q in p.glob(f"*/{CFG}"))
        else:
            raise UserError(f"{p} is not a run directory; pass runs/<name> (or a sweep folder)")
    if not runs:
        raise UserError(f"no runs found in {' '.join(paths)}; train some with saelab train")
    return runs


METRICS = ("fvu", "l0", "dead_frac", "below_1e-5_frac", "delta_ce", "ce_score")


def eval_rows(name: str, res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluation mode of an eval.json result, the inference mode first (a
    missing number is None, so a hand-edited file still gives rows)."""
    base = {"name": name, **{k: res.get(k) for k in ("arch", "d_sae", "k")}}
    rows = [{**base, "mode": "inference", **{k: res.get(k) for k in METRICS}}]
    for mode, m in (res.get("modes") or {}).items():
        rows.append({**base, "mode": mode, **{k: m.get(k) for k in METRICS}})
    return rows


def table(rows: list[dict]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(COLUMNS)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths))  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *map(line, cells)])


def write_comparison(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """compare.json and the FVU-against-L0 frontier (HTML, and PNG where Chromium is)."""
    from saelab.viz import frontier_figure, save_figure

    write_json(out / "compare.json", rows)
    primary = [r for r in rows if r["mode"] == "inference"]
    return [out / "compare.json", *save_figure(frontier_figure(primary), out / "frontier")]
