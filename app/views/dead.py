"""Dead latents: firing frequencies, dead and under-used counts, the dead fraction during
training, a comparison across the selected runs, and the dead latents' decoder neighbours."""

import common
import pandas as pd
import streamlit as st

from saelab import viz
from saelab import workbench as wb

MAX_LISTED = 200
"""Dead latents listed with their neighbours (each is one index query)."""


def _hist(info: wb.RunInfo) -> wb.FreqHist | None:
    return wb.freq_hist(info.eval) if info.eval else None


def comparison(runs: list[wb.RunInfo]) -> None:
    hists = {r.name: h for r in runs if (h := _hist(r))}
    if not hists:
        st.info("No run here has eval.json: `saelab eval runs/<name>` measures firing frequencies.")
    else:
        st.plotly_chart(viz.freq_hist_figure({n: h.__dict__ for n, h in hists.items()}))
        rows = []
        for r in runs:
            if (h := hists.get(r.name)) is None:
                continue
            row = {"run": r.name, "arch": r.arch, "d_sae": h.d_sae}
            row |= {k: v for k, v in wb.dead_counts(h).items()}
            row["dead %"] = 100 * h.never_fired / max(h.d_sae, 1)
            row["held-out tokens"] = h.n_tokens
            rows.append(row)
        st.dataframe(pd.DataFrame(rows).style.format({"dead %": "{:.2f}"}), hide_index=True)
        st.caption(
            "Counts come from eval.json's binned histogram: “firing < f” counts whole bins "
            "below f plus the latents that never fired on the held-out tokens."
        )
    series = {r.name: s for r in runs if (s := wb.dead_series(r.path))["tokens"]}
    if series:
        st.plotly_chart(viz.dead_over_training_figure(series))
    else:
        st.caption("No train_log.jsonl with dead fractions in these runs.")


def dead_list(info: wb.RunInfo) -> None:
    st.subheader(f"Dead latents of {info.name}")
    if not info.has_index:
        st.info(
            f"Listing dead latents needs the feature index: `saelab index "
            f"{common.display(info.path)}` builds it."
        )
        return
    from saelab.features import FeatureIndex

    idx = FeatureIndex.of_run(info.path)
    try:
        stats = idx.stats()
        dead = [int(i) for i in (stats["freq"] == 0).nonzero()[0]]
        tokens = idx.meta.get("tokens")
        st.write(
            f"{len(dead):,} of {len(stats['freq']):,} latents never fired on the "
            f"{tokens:,} indexed tokens."
            if tokens
            else f"{len(dead):,} latents never fired."
        )
        if not dead:
            return
        rows = []
        for i in dead[:MAX_LISTED]:
            card = idx.latent(i)
            near = ", ".join(f"{j} ({c:.2f})" for j, c in card.neighbours[:5])
            rows.append({"latent": i, "decoder neighbours (cosine)": near})
    finally:
        idx.close()
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    if len(dead) > MAX_LISTED:
        st.caption(f"The first {MAX_LISTED} of {len(dead):,} are listed.")
    pick = st.selectbox("Open a dead latent in the feature browser", dead[:MAX_LISTED])
    if st.button("Open in feature browser"):
        st.session_state["latent_id"] = int(pick)
        st.switch_page("views/features.py")


def main() -> None:
    st.title("Dead latents")
    info = common.focus()
    if info is None:
        return
    runs = common.selected(common.runs())
    if len(runs) > 1:
        st.caption(f"Comparing {len(runs)} runs (choose them on the Runs page).")
    comparison(runs)
    dead_list(info)


with common.guard():
    main()
