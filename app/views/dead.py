"""Dead latents: firing frequencies, dead and under-used counts, the dead fraction during
training, a comparison across the selected runs, and the dead latents' decoder neighbours."""

import common
import numpy as np
import pandas as pd
import streamlit as st

from saelab import viz
from saelab import workbench as wb
from saelab.errors import UserError

# Streamlit shows bare strings in page scripts ("magic"), so these notes are comments.
MAX_LISTED = 200  # dead latents listed with their neighbours (one index query each)
RAREST = 20  # latents listed instead when none is dead


def _hist(info: wb.RunInfo) -> wb.FreqHist | None:
    """eval.json's histogram, else the feature index's frequencies."""
    if info.eval:
        return wb.freq_hist(info.eval)
    if info.has_index:
        try:
            idx = common.open_index(info.path)
        except UserError as e:
            st.warning(f"{info.name}: {e}")
            return None
        return wb.freq_hist_from_stats(idx.stats()["freq"], int(idx.meta.get("n_tokens", 0)))
    return None


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
            row["sample (tokens)"] = h.n_tokens
            row["source"] = "eval.json (held out)" if r.eval else "feature index"
            rows.append(row)
        table = common.table(rows, {"dead %": "{:.2f}", "sample (tokens)": "{:,}"})
        st.dataframe(table, hide_index=True)
        st.caption(
            "Every count of a row is on that row's sample. Dead: never fired on it. “freq < f” "
            "adds the latents in the histogram's bins below f; a column appears only where the "
            "sample can resolve f (more than 1/f tokens), else it would repeat the dead count. "
            "A latent firing less than once per sample size looks dead on a small sample."
        )
    series = {r.name: s for r in runs if (s := wb.dead_series(r.path))["tokens"]}
    if series:
        st.plotly_chart(viz.dead_over_training_figure(series))
    else:
        st.caption("No train_log.jsonl with dead fractions in these runs.")


def dead_list(info: wb.RunInfo) -> None:
    st.subheader(f"Dead and rarest latents of {info.name}")
    if not info.has_index:
        st.info(
            f"Listing dead latents needs the feature index: `saelab index "
            f"{common.display(info.path)}` builds it."
        )
        return
    idx = common.open_index(info.path)
    freq = idx.stats()["freq"]
    dead = [int(i) for i in (freq == 0).nonzero()[0]]
    n = int(idx.meta.get("n_tokens", 0))
    line = (
        f"On the index's sample of {n:,} tokens, {len(dead):,} of {len(freq):,} latents "
        "never fired."
    )
    h = wb.freq_hist(info.eval) if info.eval else None
    if h is not None:
        line += (
            f" (eval.json counts {h.never_fired:,} dead on its own sample of {h.n_tokens:,} "
            "held-out tokens: a latent that fires rarely can miss a smaller sample.)"
        )
    st.write(line + ("" if dead else f" The {RAREST} rarest instead:"))
    describe = common.describer(info, idx)
    listed = dead[:MAX_LISTED] or [int(i) for i in np.argsort(freq, kind="stable")[:RAREST]]
    rows = []
    for i in listed:
        card = idx.latent(i)
        near = ", ".join(
            f"{j} {wb.shorten(describe(j), 24)} ({c:.2f})" for j, c in card.neighbours[:3]
        )
        rows.append(
            {
                "latent": i, "label": describe(i), "frequency": freq[i],
                "decoder neighbours (cosine)": near,
            }
        )  # fmt: skip
    st.dataframe(pd.DataFrame(rows).style.format({"frequency": "{:.2e}"}), hide_index=True)
    if len(dead) > MAX_LISTED:
        st.caption(f"The first {MAX_LISTED} of {len(dead):,} are listed.")
    c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
    pick = c1.selectbox("Open in the feature browser", listed, key="dead_pick")
    if c2.button("Open"):
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
