"""Runs: every run under the runs directory with its held-out metrics; pick the ones the
other pages show."""

import common
import streamlit as st

from saelab import workbench as wb

FORMATS = {"FVU": "{:.4f}", "L0": "{:.1f}", "dead %": "{:.2f}", "CE score": "{:.4f}"}


def _keep_selection() -> None:
    st.session_state[common.SELECTED] = list(st.session_state["_runs_pick"])


def main() -> None:
    st.title("Runs")
    common.query_error()
    runs = common.runs()
    if not runs:
        common.no_runs_message()
        return
    rows = wb.runs_table(runs)
    st.dataframe(
        common.table(rows, FORMATS),
        hide_index=True,
        column_config={
            "index": st.column_config.CheckboxColumn("index", help="features.sqlite built"),
            "dark matter": st.column_config.CheckboxColumn("dark matter"),
        },
    )
    missing = [common.display(r.path) for r in runs if r.eval is None and r.complete]
    if missing:
        st.caption(
            "Runs without eval.json show “-”: "
            + ", ".join(f"`saelab eval {m}`" for m in missing)
            + " produces it."
        )
    names = [r.name for r in runs]
    # The widget's own key is dropped when another page is shown; the selection lives on
    # in SELECTED and seeds the widget again.
    st.session_state["_runs_pick"] = [
        n for n in st.session_state.get(common.SELECTED) or [] if n in names
    ]
    st.multiselect(
        "Selected runs (Compare, Dead latents and Dark matter compare these; none = all)",
        names,
        key="_runs_pick",
        on_change=_keep_selection,
        placeholder="all runs",
    )
    for r in runs:
        for p in r.problems:
            st.warning(f"{r.name}: {p}")


with common.guard():
    main()
