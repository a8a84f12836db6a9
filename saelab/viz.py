"""Plotly figure builders, shared by the CLI, the app and notebooks (never imports streamlit)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

# One colour per architecture, stable across figures.
ARCH_COLORS = {
    "topk": "#1f77b4",
    "gradient_topk": "#ff7f0e",
    "feature_choice": "#2ca02c",
    "mutual_choice": "#d62728",
    "matching_pursuit": "#9467bd",
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
        fig.write_image(stem.with_suffix(".png"), scale=2)
        written.append(stem.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001 - PNG export is optional (needs a browser)
        logging.getLogger(__name__).warning(
            "PNG not written (%s); install chromium for PNG export", type(e).__name__
        )
    return written
