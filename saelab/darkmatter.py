"""Dark matter: how much of an SAE's error is linearly predictable from its input.

Engels, Riggs & Tegmark, "Decomposing the dark matter of sparse autoencoders", arXiv
2410.14670 (docs/algorithms.md §6). With e = x − x̂ on a run's held-out rows, split into
disjoint fit and evaluation rows:

- e ≈ [x, 1]·W by least squares on the fit rows (normal equations streamed in float64, a tiny
  ridge for stability); R²(e) and R² of ‖e‖² on the evaluation rows. The paper: about half,
  and over 90%.
- e_lin = [x, 1]·W, e_nl = e − e_lin: FVU(x̂) against FVU(x̂ + e_lin), per-token norms
  (an SQLite table the app reads), the contexts with the largest nonlinear error, and the
  CE of splicing x̂, x̂ + e_lin and x̂ + e_nl into the model.
- Inference-time gradient pursuit over W_dec at the SAE's own L0, and how it changes the
  linear and the nonlinear error (the paper: the nonlinear part only slightly).
- `--scaling`: per-token error norms of several SAEs on the same rows, and the R² of
  ‖e_i‖ predicting ‖e_j‖, with and without ‖e_nl,i‖ as a second regressor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.config import DarkMatterConfig
from saelab.errors import UserError
from saelab.evaluate import context_tokens, downstream_ce, heldout_contexts, load_spliceable_model
from saelab.fitting import R2, LinearFit, gradient_pursuit, predict, r2_regression
from saelab.runs import (
    DARKMATTER,
    DARKMATTER_TOKENS,
    FIGURES,
    SCALING,
    SYNTHETIC,
    TOKEN_COLUMNS,
    OpenRun,
    open_run,
    write_json,
    write_token_table,
)
from saelab.shards import locate

log = logging.getLogger(__name__)

FIT_CAP, EVAL_CAP = 150_000, 300_000
"""Default fit and evaluation sizes are capped at the paper's."""
ROWS_PER_PARAM = 2
"""Fewest rows per predictor parameter (d_in + 1) for either split: below this the fit
over-fits and its held-out R² says little."""
WARN_ROWS_PER_PARAM = 20
"""Below this many fit rows per parameter, held-out R² is noticeably understated."""


# ---------------------------------------------------------------------------------------
# The analysis of one run


@dataclass
class Subject(OpenRun):
    """One run ready to analyse: the opened run and its fit/evaluation row split."""

    fit_rows: tuple[int, int] = (0, 0)
    eval_rows: tuple[int, int] = (0, 0)


def split_rows(
    heldout: tuple[int, int], cfg: DarkMatterConfig, d_in: int, where: str = "the run"
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Disjoint (fit, eval) row ranges, fit first, both inside the held-out rows."""
    start, stop = heldout
    n = stop - start
    n_fit = cfg.fit_tokens or min(n // 2, FIT_CAP)
    n_eval = cfg.score_tokens or min(n - n_fit, EVAL_CAP)
    need = ROWS_PER_PARAM * (d_in + 1)
    if n_fit + n_eval > n or min(n_fit, n_eval) < need:
        raise UserError(
            f"{where} has {n:,} held-out tokens; dark matter needs at least {need:,} to fit and "
            f"{need:,} to evaluate (asked {n_fit:,} + {n_eval:,}); retrain with a larger "
            f"--eval_tokens or lower --fit_tokens/--score_tokens"
        )
    if n_fit < WARN_ROWS_PER_PARAM * (d_in + 1):
        log.warning(
            "%s: only %s fit tokens for %s parameters per output; held-out R² will be "
            "understated (the paper fit on 150k)",
            where,
            f"{n_fit:,}",
            d_in + 1,
        )
    return (start, start + n_fit), (start + n_fit, start + n_fit + n_eval)


def prepare(run: str | Path, cfg: DarkMatterConfig) -> Subject:
    """Every check that can fail, before anything is computed or written."""
    s = prepare_unsplit(Path(run), cfg)
    fit, ev = split_rows(s.heldout, cfg, s.sae.d_in, str(run))
    return replace(s, fit_rows=fit, eval_rows=ev)


def _batches(s: Subject, rows: tuple[int, int], batch_size: int) -> Iterator[tuple[int, Tensor]]:
    for lo in range(rows[0], rows[1], batch_size):
        yield lo, s.store.read(lo, min(lo + batch_size, rows[1])).to(s.device)


@torch.no_grad()
def fit_pass(s: Subject, cfg: DarkMatterConfig) -> dict[str, Tensor]:
    """Predictors from the fit rows only: W for e, w for ‖e‖², and W_gp for the pursuit's
    error; one shared XᵀX, so all are one least-squares solve."""
    fit = LinearFit()
    for _, x in _batches(s, s.fit_rows, cfg.batch_size):
        e = x - s.sae(x)
        ys = [e, e.pow(2).sum(1, keepdim=True)]
        if cfg.pursuit != "none":
            ys.append(x - gradient_pursuit(s.sae, x, cfg.pursuit_steps, cfg.pursuit == "greedy"))
        fit.update(x, torch.cat(ys, 1))
    w, d = fit.solve(cfg.ridge), s.sae.d_in
    out = {"e": w[:, :d], "e_sq": w[:, d : d + 1]}
    if cfg.pursuit != "none":
        out["gp"] = w[:, d + 1 :]
    return out


def _sq(t: Tensor) -> Tensor:
    return t.pow(2).sum(1)


@dataclass
class _EvalSums:
    n: int = 0
    sum_x: Tensor | None = None
    sums: dict[str, float] = field(default_factory=dict)
    r2: dict[str, R2] = field(default_factory=dict)
    tokens: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, **terms: Tensor) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.sum())

    def keep(self, **cols: Tensor) -> None:
        for k, v in cols.items():
            self.tokens.setdefault(k, []).append(v.detach().cpu().numpy())

    def score(self, name: str, y: Tensor, y_hat: Tensor) -> None:
        self.r2.setdefault(name, R2()).update(y, y_hat)


@torch.no_grad()
def eval_pass(
    s: Subject, w: dict[str, Tensor], cfg: DarkMatterConfig
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Scores on the evaluation rows only, and the per-token table."""
    acc = _EvalSums()
    for lo, x in _batches(s, s.eval_rows, cfg.batch_size):
        xd = x.double()
        e = xd - s.sae(x).double()
        e_lin = predict(w["e"], x)
        e_nl = e - e_lin
        e_sq_pred = predict(w["e_sq"], x)[:, 0]
        acc.n += x.shape[0]
        acc.sum_x = xd.sum(0) if acc.sum_x is None else acc.sum_x + xd.sum(0)
        acc.add(x_sq=_sq(xd), e=_sq(e), lin=_sq(e_lin), nl=_sq(e_nl))
        acc.score("e", e, e_lin)
        acc.score("e_sq", _sq(e)[:, None], e_sq_pred[:, None])
        rows = torch.arange(lo, lo + x.shape[0])
        acc.keep(row=rows, e_norm=_sq(e).sqrt(), e_nl_norm=_sq(e_nl).sqrt())
        acc.keep(e_lin_norm=_sq(e_lin).sqrt(), e_sq_pred=e_sq_pred)
        if "gp" in w:
            e_gp = (
                xd - gradient_pursuit(s.sae, x, cfg.pursuit_steps, cfg.pursuit == "greedy").double()
            )
            gp_lin = predict(w["gp"], x)
            acc.add(gp=_sq(e_gp), gp_lin=_sq(gp_lin), gp_nl=_sq(e_gp - gp_lin))
            acc.add(gp_nl_reused=_sq(e_gp - e_lin))
            acc.score("gp", e_gp, gp_lin)
    tokens = {k: np.concatenate(v) for k, v in acc.tokens.items()}
    return _summary(acc, cfg), tokens


def _summary(acc: _EvalSums, cfg: DarkMatterConfig) -> dict[str, Any]:
    assert acc.sum_x is not None
    sst = acc.sums["x_sq"] - float(acc.sum_x.pow(2).sum()) / acc.n
    f = {k: v / sst for k, v in acc.sums.items()}
    out: dict[str, Any] = {
        "r2_e": acc.r2["e"].value,
        "r2_e_norm_sq": acc.r2["e_sq"].value,
        "fvu": f["e"],
        "fvu_linear": f["lin"],
        "fvu_nonlinear": f["nl"],
        "nonlinear_share": acc.sums["nl"] / acc.sums["e"],
    }
    if "gp" in acc.r2:
        out["pursuit"] = {
            "mode": cfg.pursuit,
            "steps": cfg.pursuit_steps,
            "fvu": f["gp"],
            "r2_e": acc.r2["gp"].value,
            "fvu_linear": f["gp_lin"],
            "fvu_nonlinear": f["gp_nl"],
            "fvu_nonlinear_reused_predictor": f["gp_nl_reused"],
            "change_linear": f["gp_lin"] - f["lin"],
            "change_nonlinear": f["gp_nl"] - f["nl"],
        }
    return out


def _norm_stats(v: np.ndarray) -> dict[str, float]:
    q = np.quantile(v, [0.5, 0.9, 0.99])
    return {"mean": float(v.mean()), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2])}


def top_contexts(s: Subject, tokens: dict[str, np.ndarray], n: int) -> list[dict[str, Any]]:
    """The tokens with the largest ‖e_nl‖, one per context, with their text when there is
    a tokenizer (a synthetic harvest has none)."""
    tok = None
    if n and s.cfg.get("model") not in (None, SYNTHETIC):
        from saelab.models import load_tokenizer

        tok = load_tokenizer(s.cfg["model"])
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for i in np.argsort(-tokens["e_nl_norm"], kind="stable"):
        row = int(tokens["row"][i])
        ctx, pos = s.store.locate(row)
        if ctx in seen:
            continue
        seen.add(ctx)
        item = {
            "row": row,
            "context": ctx,
            "position": pos,
            "e_norm": float(tokens["e_norm"][i]),
            "e_nl_norm": float(tokens["e_nl_norm"][i]),
        }
        if tok is not None:
            window, at = s.store.context(row, before=24, after=4)
            item["token"] = tok.decode(window[at : at + 1])
            item["text"] = tok.decode(window[:at]) + "«" + item["token"] + "»"
            item["text"] += tok.decode(window[at + 1 :])
        out.append(item)
        if len(out) >= n:
            break
    return out


def three_way_ce(s: Subject, w: dict[str, Tensor], cfg: DarkMatterConfig) -> dict[str, Any]:
    """CE of splicing x̂, x̂ + e_lin and x̂ + e_nl (= x − e_lin) on evaluation-row contexts."""
    contexts = heldout_contexts(s.store, s.eval_rows, cfg.ce_contexts)
    if not contexts:
        return {"skipped": "no whole context inside the evaluation rows"}
    model = load_spliceable_model(s.cfg, s.device)
    if model is None:
        return {"skipped": f"model '{s.cfg.get('model')}' cannot be run"}
    sae, w_e = s.sae, w["e"]

    def lin(x: Tensor) -> Tensor:
        return predict(w_e, x).to(x.dtype)

    splices = {
        "sae": lambda x, g: sae(x),
        "sae+e_lin": lambda x, g: sae(x) + lin(x),
        "sae+e_nl": lambda x, g: x - lin(x),
    }
    tokens = context_tokens(s.store, contexts, s.device)
    return {
        **downstream_ce(model, s.cfg["hook"], tokens, splices, cfg.splice_from),
        "contexts": contexts,
    }


def analyse(s: Subject, cfg: DarkMatterConfig) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """darkmatter.json's content and the per-token table, for one prepared run."""
    w = fit_pass(s, cfg)
    result, tokens = eval_pass(s, w, cfg)
    result = {
        "run": str(s.path),
        "arch": s.sae.arch,
        "d_sae": s.sae.d_sae,
        "k": s.sae.k,
        "hook": s.cfg["hook"],
        "fit_rows": list(s.fit_rows),
        "eval_rows": list(s.eval_rows),
        "n_fit": s.fit_rows[1] - s.fit_rows[0],
        "n_eval": s.eval_rows[1] - s.eval_rows[0],
        "ridge": cfg.ridge,
        **result,
        "norms": {k: _norm_stats(tokens[k]) for k in ("e_norm", "e_nl_norm", "e_lin_norm")},
        "top_nonlinear": top_contexts(s, tokens, cfg.top_contexts),
    }
    if cfg.ce_contexts:
        result["ce"] = three_way_ce(s, w, cfg)
    return result, tokens


# ---------------------------------------------------------------------------------------
# Files and figures


def run_figures(result: dict[str, Any], tokens: dict[str, np.ndarray], out: Path) -> list[Path]:
    from saelab import viz

    figs = {
        "darkmatter_norms": viz.error_norms_figure(
            {k: tokens[k] for k in ("e_norm", "e_lin_norm", "e_nl_norm")}
        ),
        "darkmatter_norm_sq": viz.predicted_vs_actual_figure(
            tokens["e_norm"] ** 2, tokens["e_sq_pred"], result["r2_e_norm_sq"]
        ),
        "darkmatter_split": viz.error_split_figure(viz.error_split_rows(result)),
    }
    return viz.save_figures(figs, out)


# ---------------------------------------------------------------------------------------
# Scaling across SAEs of one harvest and hook


def prepare_scaling(runs: list[Path], cfg: DarkMatterConfig) -> list[Subject]:
    """Runs on one harvest and hook, on their common held-out rows."""
    if len(runs) < 2:
        raise UserError("--scaling compares SAEs: pass two or more runs of one harvest and hook")
    subjects = [prepare_unsplit(r, cfg) for r in runs]
    key = lambda s: (str(Path(s.cfg["harvest"]).resolve()), s.cfg["hook"])  # noqa: E731
    if len({key(s) for s in subjects}) > 1:
        names = ", ".join(f"{s.path} ({s.cfg['harvest']}, {s.cfg['hook']})" for s in subjects)
        raise UserError(f"--scaling needs runs on one harvest and hook; got {names}")
    lo = max(s.cfg["eval_range"][0] for s in subjects)
    hi = min(s.cfg["eval_range"][1] for s in subjects)
    fit, ev = split_rows((lo, max(lo, hi)), cfg, subjects[0].sae.d_in, "the runs' common rows")
    return [replace(s, fit_rows=fit, eval_rows=ev) for s in subjects]


def prepare_unsplit(run: Path, cfg: DarkMatterConfig) -> Subject:
    opened = open_run(run, cfg.device)
    opened.heldout  # noqa: B018 - refuses a run without held-out rows before any work
    return Subject(**vars(opened))


def scaling(subjects: list[Subject], cfg: DarkMatterConfig) -> dict[str, Any]:
    """R²[i][j] of ‖e_j‖ regressed on ‖e_i‖ per token, and with ‖e_nl,i‖ added."""
    cfg = replace(cfg, pursuit="none")
    subjects = sorted(subjects, key=lambda s: s.sae.d_sae)
    norms, nl, rows = [], [], []
    for s in subjects:
        summary, tokens = eval_pass(s, fit_pass(s, cfg), cfg)
        norms.append(tokens["e_norm"])
        nl.append(tokens["e_nl_norm"])
        rows.append({"run": str(s.path), "d_sae": s.sae.d_sae, "k": s.sae.k, **summary})
    n = len(subjects)
    r2 = [[r2_regression(norms[j], norms[i]) for j in range(n)] for i in range(n)]
    r2_nl = [[r2_regression(norms[j], norms[i], nl[i]) for j in range(n)] for i in range(n)]
    return {
        "runs": rows,
        "names": [f"{s.path.name} ({s.sae.d_sae})" for s in subjects],
        "eval_rows": list(subjects[0].eval_rows),
        "fit_rows": list(subjects[0].fit_rows),
        "r2_norm": r2,
        "r2_norm_with_nonlinear": r2_nl,
        "note": "row i predicts column j; in-sample fits of 2 or 3 parameters on the eval rows",
    }


# ---------------------------------------------------------------------------------------
# CLI


def summary_lines(result: dict[str, Any]) -> str:
    lines = [
        f"dark matter of {result['run']} ({result['n_fit']:,} fit + {result['n_eval']:,} "
        "eval tokens, held out)",
        f"  R²(e) = {result['r2_e']:.3f}   R²(‖e‖²) = {result['r2_e_norm_sq']:.3f}"
        "   (paper: about 0.5 and over 0.9)",
        f"  FVU(x̂) = {result['fvu']:.4f}   FVU(x̂ + e_lin) = {result['fvu_nonlinear']:.4f}",
    ]
    if gp := result.get("pursuit"):
        lines.append(
            f"  gradient pursuit ({gp['mode']}): FVU {gp['fvu']:.4f}, linear part "
            f"{result['fvu_linear']:.4f} → {gp['fvu_linear']:.4f}, nonlinear "
            f"{result['fvu_nonlinear']:.4f} → {gp['fvu_nonlinear']:.4f}"
        )
    ce = result.get("ce", {})
    if "variants" in ce:
        parts = [
            f"{k} {v['ce']:.3f} (Δ {v['delta_ce']:+.3f} ± {v['delta_ce_se'] or 0:.3f})"
            for k, v in ce["variants"].items()
        ]
        lines.append(
            f"  CE (nats, {ce['n_tokens']:,} tokens): clean {ce['ce_clean']:.3f}, "
            f"{', '.join(parts)}, zero-ablation {ce['ce_ablation']:.3f}"
        )
    return "\n".join(lines)


def run_one(s: Subject, cfg: DarkMatterConfig) -> dict[str, Any]:
    """Analyse one run and write darkmatter.json, its token table and (optionally) figures."""
    result, tokens = analyse(s, cfg)
    ctx, pos = locate(tokens["row"].astype(np.int64), s.store.tokens_per_context)
    table = {"row": tokens["row"].astype(np.int64), "context": ctx, "position": pos}
    table |= {k: tokens[k].astype(np.float64) for k in TOKEN_COLUMNS[3:]}
    write_token_table(s.path / DARKMATTER_TOKENS, table)
    write_json(s.path / DARKMATTER, result)
    if cfg.figures:
        result["figures"] = [str(p) for p in run_figures(result, tokens, s.path / FIGURES)]
    return result


def run_scaling(subjects: list[Subject], cfg: DarkMatterConfig) -> tuple[Path, list[Path]]:
    """`scaling` over the subjects, written beside the first run: (scaling.json, figures)."""
    res = scaling(subjects, cfg)
    out = subjects[0].path.parent / SCALING
    write_json(out / "scaling.json", res)
    if not cfg.figures:
        return out / "scaling.json", []
    from saelab import viz

    figs = {
        "scaling_r2": viz.scaling_heatmap(
            res["names"], res["r2_norm"], res["r2_norm_with_nonlinear"]
        ),
        "scaling_split": viz.error_split_figure(
            [{"name": n, **r} for n, r in zip(res["names"], res["runs"])]
        ),
    }
    return out / "scaling.json", viz.save_figures(figs, out)
