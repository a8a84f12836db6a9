"""Plotly figure builders, shared by the CLI, the app and notebooks (never imports streamlit)."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

# One colour per architecture, stable across figures.
ARCH_COLORS = {
    "topk": "#1f77b4",
    "gradient_topk": "#ff7f0e",
    "feature_choice": "#2ca02c",
    "mutual_choice": "#d62728",
    "matching_pursuit": "#9467bd",
    "jumprelu": "#8c564b",
}


def frontier_figure(rows: list[dict[str, Any]]) -> go.Figure:
    """FVU against mean L0, dead fraction, fraction firing below 1e-5 and (when measured)
    ΔCE: one point per run, one colour per architecture."""
    panels = [
        ("l0", "mean L0"),
        ("dead_frac", "dead fraction"),
        ("below_1e-5_frac", "fraction firing < 1e-5"),
    ]
    if any(r.get("delta_ce") is not None for r in rows):
        panels.append(("delta_ce", "ΔCE (nats)"))
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        shared_yaxes=True,
        subplot_titles=[t for _, t in panels],
        horizontal_spacing=0.04,
    )
    for arch in sorted({r["arch"] for r in rows}):
        group = [r for r in rows if r["arch"] == arch]
        for col, (key, _) in enumerate(panels, start=1):
            pts = [r for r in group if r.get(key) is not None]
            fig.add_trace(
                go.Scatter(
                    x=[r[key] for r in pts],
                    y=[r["fvu"] for r in pts],
                    mode="markers",
                    name=arch,
                    legendgroup=arch,
                    showlegend=col == 1,
                    marker={"size": 11, "color": ARCH_COLORS.get(arch)},
                    text=[r["name"] for r in pts],
                    hovertemplate="%{text}<br>x=%{x:.4g}<br>FVU=%{y:.4f}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fvu = [r["fvu"] for r in rows if r.get("fvu") is not None]
    # FVU is at least 0: never let autoscale (one point is centred in a ±1 range) go negative.
    fig.update_yaxes(range=[0, max([*fvu, 0.0]) * 1.15 or 1.0])
    fig.update_yaxes(title_text="FVU (held out)", row=1, col=1)
    fig.update_layout(
        title="SAE architectures side by side",
        height=420,
        width=330 * len(panels) + 120,
        template="plotly_white",
    )
    return fig


def save_figure(fig: go.Figure, stem: Path) -> list[Path]:
    """Write stem.html, and stem.png when a Chromium is available for kaleido."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    html = stem.with_suffix(".html")
    fig.write_html(html, include_plotlyjs=True)  # self-contained: viewable offline
    written = [html]
    try:
        _quiet_kaleido()
        fig.write_image(stem.with_suffix(".png"), scale=2)
        written.append(stem.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001 - PNG export is optional (needs a browser)
        logging.getLogger(__name__).warning(
            "PNG not written (%s); install chromium for PNG export", type(e).__name__
        )
    return written


def _quiet_kaleido() -> None:
    # kaleido and its browser driver log every temp-dir cleanup at INFO; the CLI logs at INFO.
    for name in ("kaleido", "choreographer"):
        logging.getLogger(name).setLevel(logging.WARNING)


def save_figures(figs: dict[str, go.Figure], folder: Path) -> list[Path]:
    """Write <name>.html for each figure, and the PNGs in one kaleido call (one browser start
    instead of one per figure) when a Chromium is available."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figs.items():
        fig.write_html(folder / f"{name}.html", include_plotlyjs=True)
        written.append(folder / f"{name}.html")
    pngs: list[str | Path] = [folder / f"{name}.png" for name in figs]
    try:
        import plotly.io as pio

        _quiet_kaleido()
        pio.write_images(list(figs.values()), pngs, scale=2)
        written += pngs
    except Exception as e:  # noqa: BLE001 - PNG export is optional (needs a browser)
        logging.getLogger(__name__).warning(
            "PNGs not written (%s); install chromium for PNG export", type(e).__name__
        )
    return written


# ---------------------------------------------------------------------------------------
# Dark matter (saelab.darkmatter; Engels et al., arXiv 2410.14670)

ERROR_COLORS = {"e_norm": "#444444", "e_lin_norm": "#1f77b4", "e_nl_norm": "#d62728"}
ERROR_LABELS = {"e_norm": "‖e‖", "e_lin_norm": "‖e_lin‖", "e_nl_norm": "‖e_nl‖"}


def error_norms_figure(
    norms: dict[str, Any], title: str = "SAE error norms per token", bins: int = 80
) -> go.Figure:
    """Histograms of per-token norms (‖e‖, ‖e_lin‖, ‖e_nl‖) on shared bins; binned here so
    that the HTML stays small for hundreds of thousands of tokens."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in norms.items()}
    hi = max((float(v.max()) for v in arrays.values() if v.size), default=1.0)
    edges = np.linspace(0.0, hi, bins + 1)
    mids = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for key, values in arrays.items():
        counts, _ = np.histogram(values, edges)
        fig.add_trace(
            go.Scatter(
                x=mids.tolist(),
                y=counts.tolist(),
                mode="lines",
                line={"shape": "hvh", "color": ERROR_COLORS.get(key)},
                fill="tozeroy",
                opacity=0.5,
                name=ERROR_LABELS.get(key, key),
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title="norm (model units)",
        yaxis_title="tokens",
        template="plotly_white",
        height=420,
        width=720,
    )
    return fig


def predicted_vs_actual_figure(
    actual: Any, predicted: Any, r2: float, max_points: int = 5000
) -> go.Figure:
    """‖e‖² against its linear prediction from x, on held-out tokens (an even subsample)."""
    step = max(1, len(actual) // max_points)
    a, p = [float(v) for v in actual[::step]], [float(v) for v in predicted[::step]]
    hi = max(a + p) if a else 1.0
    fig = go.Figure(
        [
            go.Scattergl(
                x=a, y=p, mode="markers", marker={"size": 3, "opacity": 0.4}, name="token"
            ),
            go.Scatter(x=[0, hi], y=[0, hi], mode="lines", name="y = x", line={"dash": "dash"}),
        ]
    )
    fig.update_layout(
        title=f"‖e‖² predicted linearly from x (R² = {r2:.3f})",
        xaxis_title="actual ‖e‖²",
        yaxis_title="predicted ‖e‖²",
        template="plotly_white",
        height=480,
        width=520,
    )
    return fig


def error_split_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Bars for `error_split_figure` from darkmatter.json: the SAE, and gradient pursuit
    when it was run."""
    rows = [{"name": "SAE", **result}]
    if "pursuit" in result:
        rows.append({"name": "gradient pursuit", **result["pursuit"]})
    return rows


def error_split_figure(rows: list[dict[str, Any]]) -> go.Figure:
    """The error ‖e‖² (FVU) and its linear and nonlinear parts ‖e_lin‖², ‖e_nl‖², each as a
    fraction of the activations' variance, side by side per SAE (rows need name, fvu_linear,
    fvu_nonlinear; fvu optional). Side by side, not stacked: e = e_lin + e_nl, but the two
    are not orthogonal on held-out tokens, so their squared norms need not add up to FVU."""
    names = [r["name"] for r in rows]
    total = (
        [go.Bar(x=names, y=[r["fvu"] for r in rows], name="total ‖e‖² (FVU)",
                marker_color=ERROR_COLORS["e_norm"])]
        if all("fvu" in r for r in rows) else []
    )  # fmt: skip
    fig = go.Figure(
        total
        + [
            go.Bar(
                x=names,
                y=[r["fvu_linear"] for r in rows],
                name="linear ‖e_lin‖²",
                marker_color=ERROR_COLORS["e_lin_norm"],
            ),
            go.Bar(
                x=names,
                y=[r["fvu_nonlinear"] for r in rows],
                name="nonlinear ‖e_nl‖²",
                marker_color=ERROR_COLORS["e_nl_norm"],
            ),
        ]  # fmt: skip
    )
    fig.update_layout(
        barmode="group",
        title="SAE error and its linear and nonlinear parts (not additive)",
        yaxis_title="fraction of variance of x",
        template="plotly_white",
        height=420,
        width=max(480, 140 * len(rows) + 260),
    )
    return fig


def scaling_heatmap(names: list[str], r2: list[list[float]], r2_nl: list[list[float]]) -> go.Figure:
    """R² of ‖e_i‖ (row) predicting ‖e_j‖ (column) per token, alone and with ‖e_nl,i‖."""
    fig = make_subplots(
        rows=1, cols=2, horizontal_spacing=0.14,
        subplot_titles=["‖e_i‖ → ‖e_j‖", "‖e_i‖ + ‖e_nl,i‖ → ‖e_j‖"],
    )  # fmt: skip
    for col, z in enumerate((r2, r2_nl), start=1):
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=names,
                y=names,
                zmin=0,
                zmax=1,
                colorscale="Viridis",
                text=[[f"{v:.2f}" for v in row] for row in z],
                texttemplate="%{text}",
                showscale=col == 2,
            ),  # fmt: skip
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="predicted SAE j", row=1, col=col)
    fig.update_yaxes(title_text="predictor SAE i", autorange="reversed", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    fig.update_layout(
        title="Per-token error norms across SAE widths (R²)",
        template="plotly_white",
        height=460,
        width=1000,
    )
    return fig


# ---------------------------------------------------------------------------------------
# Latents (the feature index, saelab.features) and firing frequencies

ACT_COLOR = (228, 87, 86)
"""Highlight colour of activating tokens (RGB); its opacity follows the activation."""


def _token_text(tok: str, empty: str = "∅") -> str:
    # Make whitespace tokens visible: a newline would otherwise vanish into the layout.
    return html.escape(tok.replace("\n", "↵").replace("\t", "⇥"), quote=True) or empty


MIN_ALPHA = 0.2
"""Least highlight opacity of a token the latent fires on, so a weak firing stays visible."""

_TOKEN_CSS = (
    "<style>.sl-ctx{font-family:ui-monospace,monospace;font-size:0.85rem;line-height:1.9;"
    "white-space:pre-wrap;word-break:break-word}"
    ".sl-t{position:relative}"
    ".sl-t:hover::after{content:attr(data-v);position:absolute;left:0;bottom:1.45em;"
    "background:#262730;color:#fff;font-size:0.7rem;padding:0 4px;border-radius:3px;"
    "white-space:nowrap;z-index:10;pointer-events:none}"
    ".sl-peak{outline:2px solid #1f2937;outline-offset:1px;border-radius:2px}</style>"
)
"""Instant tooltips (a CSS ::after from data-v, not the browser's slow title) and the peak
token's frame, drawn outside the glyphs so that any token, `__` or a space, shows it."""


def token_alpha(a: float, top: float) -> float:
    """Highlight opacity: act / top, at least MIN_ALPHA for any firing token, 0 otherwise."""
    if a <= 0 or top <= 0:
        return 0.0
    return min(max(a / top, MIN_ALPHA), 1.0)


def token_html(
    tokens: list[str], acts: list[float], peak: int | None = None, vmax: float | None = None
) -> str:
    """Tokens as one block of HTML spans whose background opacity is `token_alpha(act, vmax)`
    (vmax: the largest activation given); hovering shows the value at once. No padding
    between spans, so a word split into tokens reads as one word. Every token is escaped."""
    top = vmax if vmax and vmax > 0 else max([a for a in acts if a > 0], default=1.0)
    r, g, b = ACT_COLOR
    spans = []
    for i, (tok, a) in enumerate(zip(tokens, acts)):
        alpha = token_alpha(a, top)
        cls = "sl-t sl-peak" if i == peak else "sl-t"
        spans.append(
            f'<span class="{cls}" style="background:rgba({r},{g},{b},{alpha:.2f})" '
            f'data-v="{a:.3g}">{_token_text(tok)}</span>'
        )
    return f'{_TOKEN_CSS}<div class="sl-ctx">{"".join(spans)}</div>'


def marked_html(text: str, open_mark: str = "«", close_mark: str = "»") -> str:
    """Text holding one «marked» token (darkmatter.json's contexts) as HTML with the token
    highlighted; everything escaped."""
    before, sep, rest = text.partition(open_mark)
    token, _, after = rest.partition(close_mark) if sep else ("", "", "")
    r, g, b = ACT_COLOR
    body = _token_text(before, "")
    if sep:
        body += (
            f'<span style="background:rgba({r},{g},{b},0.85);border-radius:3px;padding:0 2px;'
            f'outline:1.5px solid #333">{_token_text(token)}</span>' + _token_text(after, "")
        )
    return (
        '<div style="font-family:ui-monospace,monospace;font-size:0.85rem;line-height:1.9;'
        f'white-space:pre-wrap;word-break:break-word">{body}</div>'
    )


def activation_hist_figure(
    edges: list[float], counts: list[int], n_zero: int | None = None, title: str = ""
) -> go.Figure:
    """A latent's histogram of non-zero activations (the feature index's bins)."""
    e = np.asarray(edges, dtype=np.float64)
    fig = go.Figure(
        go.Bar(
            x=((e[:-1] + e[1:]) / 2).tolist(),
            y=list(counts),
            width=(e[1:] - e[:-1]).tolist(),
            marker_color="rgb({},{},{})".format(*ACT_COLOR),
            hovertemplate="act %{x:.3g}<br>%{y} tokens<extra></extra>",
        )
    )
    title = title or "activations when firing"
    if n_zero is not None:
        title += f" ({n_zero:,} tokens at zero not shown)"
    fig.update_layout(
        title=title,
        xaxis_title="activation",
        yaxis_title="tokens",
        template="plotly_white",
        height=300,
        margin={"t": 50, "b": 40, "l": 50, "r": 10},
        bargap=0.02,
    )
    return fig


def logit_lens_figure(top: list[tuple[str, float]], bottom: list[tuple[str, float]]) -> go.Figure:
    """The tokens a latent's decoder direction promotes (top) and suppresses (bottom)."""
    pairs = sorted(top, key=lambda p: p[1]) if top else []
    low = sorted(bottom, key=lambda p: -p[1]) if bottom else []
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=["promoted", "suppressed"],
        horizontal_spacing=0.25,
    )
    for col, rows, color in ((1, pairs, "#2ca02c"), (2, low, "#d62728")):
        fig.add_trace(
            go.Bar(
                x=[v for _, v in rows],
                y=[repr(t)[1:-1] or "∅" for t, _ in rows],
                orientation="h",
                text=[f"{v:+.2f}" for _, v in rows],
                textposition="auto",
                marker_color=color,
                showlegend=False,
                hovertemplate="%{y}: %{x:.3g}<extra></extra>",
            ),
            row=1,
            col=col,
        )
    fig.update_yaxes(type="category")
    fig.update_layout(
        title="logit lens (W_dec · W_U)",
        template="plotly_white",
        height=max(260, 22 * max(len(pairs), len(low), 1) + 90),
        margin={"t": 60, "b": 30, "l": 10, "r": 10},
    )
    return fig


def freq_hist_figure(hists: dict[str, dict[str, Any]]) -> go.Figure:
    """log10 firing-frequency histograms (eval.json's `log10_freq_hist`: edges, counts,
    never_fired), one per run; never-firing latents get their own bar left of the axis."""
    fig = go.Figure()
    lo = min((h["edges"][0] for h in hists.values()), default=-8.0)
    for name, h in hists.items():
        e = np.asarray(h["edges"], dtype=np.float64)
        mids = ((e[:-1] + e[1:]) / 2).tolist()
        widths = (e[1:] - e[:-1]).tolist()
        fig.add_trace(
            go.Bar(
                x=[lo - 0.5, *mids],
                y=[h.get("never_fired", 0), *h["counts"]],
                width=[0.4, *widths],
                name=name,
                opacity=0.6 if len(hists) > 1 else 1.0,
                hovertemplate="log10 freq %{x:.2f}<br>%{y} latents<extra>" + name + "</extra>",
            )
        )
    fig.add_vline(x=lo - 0.2, line_dash="dot", line_color="#999")
    fig.add_vline(
        x=-5, line_dash="dash", line_color="#d62728", opacity=0.5,
        annotation_text="1e-5: rarely firing", annotation_position="top right",
    )  # fmt: skip
    fig.update_xaxes(
        tickvals=[lo - 0.5, *range(int(lo), 1)],
        ticktext=["never", *(f"1e{v}" for v in range(int(lo), 1))],
    )
    fig.update_layout(
        title="firing frequency per latent (held-out tokens)",
        xaxis_title="fraction of tokens the latent fires on (log scale)",
        yaxis_title="latents",
        barmode="overlay",
        template="plotly_white",
        height=380,
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def dead_over_training_figure(series: dict[str, dict[str, list[float]]]) -> go.Figure:
    """Dead fraction (train_log.jsonl) against training tokens, one line per run."""
    fig = go.Figure()
    for name, s in series.items():
        fig.add_trace(go.Scatter(x=s["tokens"], y=s["dead_frac"], mode="lines+markers", name=name))
    fig.update_layout(
        title="dead fraction during training",
        xaxis_title="training tokens",
        yaxis_title="dead fraction",
        yaxis_tickformat=".1%",
        yaxis_rangemode="tozero",
        template="plotly_white",
        height=380,
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def labelled_html(rows: list[tuple[str, str]]) -> str:
    """One block of context lines: each a small grey label (escaped here) over a body of
    HTML from token_html or marked_html (already escaped)."""
    cells = "".join(
        '<div style="margin:0 0 0.55rem 0"><div style="color:#808495;font-size:0.75rem">'
        f"{html.escape(label)}</div>{body}</div>"
        for label, body in rows
    )
    return f"<div>{cells}</div>"
