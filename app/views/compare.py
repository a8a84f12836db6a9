"""Compare: FVU against L0 (and dead fraction, ΔCE) for the selected runs, and one table per
architecture. Numbers come from each run's eval.json; the app never evaluates."""

import common
import streamlit as st

from saelab import viz
from saelab import workbench as wb

FORMATS = {
    "fvu": "{:.4f}",
    "l0": "{:.1f}",
    "dead_frac": "{:.2%}",
    "below_1e-5_frac": "{:.2%}",
    "delta_ce": "{:.4f}",
    "ce_score": "{:.4f}",
}


def main() -> None:
    st.title("Compare")
    common.query_error()
    all_runs = common.runs()
    if not all_runs:
        common.no_runs_message()
        return
    runs = common.selected(all_runs)
    rows = wb.metric_rows(runs)
    unevaluated = [common.display(r.path) for r in runs if r.eval is None]
    if unevaluated:
        st.caption(
            "Left out (no eval.json): "
            + ", ".join(f"`saelab eval {u}`" for u in unevaluated)
            + " measures them."
        )
    if not rows:
        st.info("None of these runs has eval.json yet.")
        return
    st.caption(f"{len(runs)} runs (choose them on the Runs page); one point per run and mode.")
    if len({r["name"] for r in rows}) < 2:
        st.info(
            "Only one run here has eval.json: select more runs on the Runs page (or evaluate "
            "them) to compare them."
        )
    fig = viz.frontier_figure([r for r in rows if r["fvu"] is not None])
    fig.update_layout(width=None)
    st.plotly_chart(fig)
    for arch in sorted({r["arch"] for r in rows}):
        st.subheader(arch)
        table = common.table([r for r in rows if r["arch"] == arch], FORMATS)
        st.dataframe(table.drop(columns="arch"), hide_index=True)
    contexts = {r.name: wb.ce_contexts((r.eval or {}).get("downstream")) for r in runs if r.eval}
    st.caption(
        "ΔCE from each run's eval.json, on its own held-out contexts (the Dark matter page's "
        "ΔCE uses saelab darkmatter's): "
        + "; ".join(f"{wb.md_escape(n)}: {c}" for n, c in contexts.items())
    )


with common.guard():
    main()
