"""Dark matter (Engels et al., arXiv 2410.14670): how much of the SAE error is linearly
predictable from the input, from darkmatter.json and its per-token table."""

import common
import pandas as pd
import streamlit as st

from saelab import viz
from saelab import workbench as wb
from saelab.runs import DARKMATTER_TOKENS

NORMS = ("e_norm", "e_lin_norm", "e_nl_norm")


def headline(dm: dict) -> None:
    cols = st.columns(5)
    cols[0].metric("R²(e)", f"{dm['r2_e']:.3f}", help="paper: about 0.5")
    cols[1].metric("R²(‖e‖²)", f"{dm['r2_e_norm_sq']:.3f}", help="paper: over 0.9")
    cols[2].metric("FVU(x̂)", f"{dm['fvu']:.4f}")
    cols[3].metric("FVU(x̂ + e_lin)", f"{dm['fvu_nonlinear']:.4f}")
    cols[4].metric("nonlinear share of ‖e‖²", f"{dm['nonlinear_share']:.1%}")
    st.caption(
        f"{dm['n_fit']:,} fit + {dm['n_eval']:,} evaluation tokens, all held out; "
        f"hook {dm.get('hook', '?')}."
    )


def figures(info: wb.RunInfo, dm: dict) -> None:
    path = info.path / DARKMATTER_TOKENS
    tokens = common.darkmatter_tokens(str(info.path), common.mtime(path))
    left, right = st.columns(2)
    if tokens is None:
        left.info(f"{DARKMATTER_TOKENS} is missing, so the per-token figures are not shown.")
    else:
        left.plotly_chart(viz.error_norms_figure({k: tokens[k] for k in NORMS}))
        right.plotly_chart(
            viz.predicted_vs_actual_figure(
                tokens["e_norm"] ** 2, tokens["e_sq_pred"], dm["r2_e_norm_sq"]
            )
        )
    left, right = st.columns(2)
    left.plotly_chart(viz.error_split_figure(viz.error_split_rows(dm)))
    left.caption(
        "e = e_lin + e_nl, but the two parts are not orthogonal on these held-out tokens, so "
        "‖e_lin‖² + ‖e_nl‖² need not equal ‖e‖²; the bars stand side by side, not stacked."
    )
    with right:
        if ce := wb.ce_rows(dm):
            st.markdown("**Splicing into the model**")
            st.dataframe(
                pd.DataFrame(ce).style.format({"CE (nats)": "{:.4f}", "ΔCE": "{:+.4f}"}),
                hide_index=True,
            )
            st.caption(
                f"ΔCE on {wb.ce_contexts(dm.get('ce'))} (saelab darkmatter). The Compare page's "
                f"ΔCE comes from eval.json, on "
                f"{wb.ce_contexts((info.eval or {}).get('downstream'))}: a different context "
                "set, so the two numbers differ."
            )
        elif skipped := (dm.get("ce") or {}).get("skipped"):
            st.caption(f"CE splicing skipped: {skipped}")
        if gp := dm.get("pursuit"):
            st.markdown(f"**Gradient pursuit** ({gp['mode']}, {gp['steps']} steps)")
            st.dataframe(
                pd.DataFrame(
                    [
                        {"": "SAE", **{k: dm[k] for k in ("fvu", "fvu_linear", "fvu_nonlinear")}},
                        {
                            "": "pursuit",
                            **{k: gp[k] for k in ("fvu", "fvu_linear", "fvu_nonlinear")},
                        },
                    ]
                ).style.format("{:.4f}", subset=["fvu", "fvu_linear", "fvu_nonlinear"]),
                hide_index=True,
            )


def top_contexts(dm: dict) -> None:
    top = dm.get("top_nonlinear") or []
    st.subheader("Largest nonlinear error")
    if not top:
        st.caption("darkmatter.json lists no contexts.")
        return
    if "text" not in top[0]:
        st.caption("A synthetic harvest has no text; rows and norms only.")
        st.dataframe(pd.DataFrame(top), hide_index=True)
        return
    rows = [
        (
            f"‖e_nl‖ = {t['e_nl_norm']:.1f} · ‖e‖ = {t['e_norm']:.1f} · "
            f"context {t['context']}, position {t['position']}",
            viz.marked_html(t["text"]),
        )
        for t in top
    ]
    st.html(viz.labelled_html(rows))


def across_runs(runs: list[wb.RunInfo], focus: wb.RunInfo) -> None:
    rows = []
    for r in runs:
        if r.has_darkmatter:
            try:
                rows.append({"name": r.name, **wb.darkmatter(r.path)})
            except Exception as e:  # noqa: BLE001 - one bad file must not hide the rest
                st.warning(f"{r.name}: {e}")
    if len(rows) > 1:
        st.subheader("Across the selected runs")
        st.plotly_chart(viz.error_split_figure(rows))
    scaling = wb.scaling_result(common.root(), focus.path)
    if scaling:
        path, res = scaling
        st.subheader("Error norms across SAE widths")
        st.caption(f"from {path}: {res.get('note', '')}")
        st.plotly_chart(
            viz.scaling_heatmap(res["names"], res["r2_norm"], res["r2_norm_with_nonlinear"])
        )


def main() -> None:
    st.title("Dark matter")
    info = common.focus()
    if info is None:
        return
    if not info.has_darkmatter:
        st.info(
            f"No dark-matter analysis for {info.name}: "
            f"`saelab darkmatter {common.display(info.path)}` writes it."
        )
    else:
        dm = wb.darkmatter(info.path)
        headline(dm)
        figures(info, dm)
        top_contexts(dm)
    across_runs(common.selected(common.runs()), info)


with common.guard():
    main()
