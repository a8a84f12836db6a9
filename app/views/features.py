"""Feature browser: one latent at a time from the run's feature index (features.sqlite):
statistics, activation histogram, logit lens, decoder neighbours and highlighted contexts;
jump by id, by token or text search, or through a neighbour."""

import common
import streamlit as st

from saelab import viz
from saelab import workbench as wb
from saelab.feature_index import FeatureIndex

LATENT = "latent_id"  # session_state: the latent shown; other pages set it, then switch here
BOX = "_latent_box"


def go(i: int) -> None:
    st.session_state[LATENT] = int(i)


def step(delta: int, d_sae: int) -> None:
    st.session_state[LATENT] = (int(st.session_state.get(LATENT, 0)) + delta) % d_sae


def from_box() -> None:
    st.session_state[LATENT] = int(st.session_state[BOX])


def read_query(d_sae: int) -> None:
    """?latent=N picks the latent on the first visit to this page."""
    if st.session_state.get("_latent_query_read"):
        return
    st.session_state["_latent_query_read"] = True
    want = st.query_params.get("latent")
    if want is None:
        return
    try:
        i = int(want)
    except ValueError:
        st.warning(f"?latent={want!r} is not a latent id; showing latent 0")
        return
    if 0 <= i < d_sae:
        go(i)
    else:
        st.warning(f"latent {i} is out of range; this SAE has 0..{d_sae - 1}")


def navigator(d_sae: int) -> None:
    cur = min(max(int(st.session_state.get(LATENT, 0)), 0), d_sae - 1)
    st.session_state[LATENT] = cur
    st.session_state[BOX] = cur  # the widget's key is dropped on other pages; reseed it
    c1, c2, c3, _ = st.columns([2, 1, 1, 4], vertical_alignment="bottom")
    c1.number_input(f"Latent (0–{d_sae - 1})", 0, d_sae - 1, key=BOX, on_change=from_box)
    c2.button("◀ previous", on_click=step, args=(-1, d_sae), width="stretch")
    c3.button("next ▶", on_click=step, args=(1, d_sae), width="stretch")


def search(idx: FeatureIndex) -> None:
    with st.expander("Search latents by token or text", expanded=False):
        c1, c2 = st.columns([1, 4], vertical_alignment="bottom")
        how = c1.radio("Search by", ["token", "text"], key="search_kind", horizontal=True)
        query = c2.text_input(
            "Token" if how == "token" else "Text",
            key="search_query",
            placeholder="e.g. the" if how == "token" else "e.g. In the beginning",
        )
        if not query:
            return
        hits = idx.search_token(query) if how == "token" else idx.search_text(query)
        if not hits:
            st.caption(f"No latent in the index fires on {query!r}.")
            return
        st.caption(
            f"Latents that best detect {query!r}: latent · F1 · firings on it "
            "(F1 is 1 for a latent that fires exactly on this token; click to open)"
        )
        cols = st.columns(5)
        for n, h in enumerate(hits):
            cols[n % 5].button(
                f"#{h.latent} · {h.f1:.2f} · {h.count}×",
                key=f"hit_{h.latent}",
                on_click=go,
                args=(h.latent,),
                width="stretch",
            )


def card(idx: FeatureIndex, i: int) -> None:
    c = idx.latent(i)
    st.subheader(f"Latent {i}")
    m = st.columns(4)
    m[0].metric("firing frequency", f"{c.freq:.2%}")
    m[1].metric("tokens fired on", f"{c.n_fires:,}")
    m[2].metric("mean activation", f"{c.mean_act:.3g}")
    m[3].metric("max activation", f"{c.max_act:.3g}")
    if c.n_fires == 0:
        st.info(f"Latent {i} never fired on the {idx.meta.get('n_tokens', 0):,} indexed tokens.")
    left, right = st.columns(2)
    if c.n_fires:
        left.plotly_chart(viz.activation_hist_figure(c.hist_edges, c.hist_counts, c.n_zero))
    if c.logit_top or c.logit_bottom:
        right.plotly_chart(viz.logit_lens_figure(c.logit_top, c.logit_bottom))
    elif note := idx.meta.get("logit_lens_note"):
        right.caption(f"No logit lens: {note}")
    if c.neighbours:
        st.markdown("**Decoder neighbours** (latent · cosine; click to open)")
        cols = st.columns(5)
        for n, (j, cos) in enumerate(c.neighbours[:10]):
            cols[n % 5].button(
                f"{j} · {cos:.2f}", key=f"nb_{j}", on_click=go, args=(j,), width="stretch"
            )
    contexts(idx, i, c.max_act)


def contexts(idx: FeatureIndex, i: int, vmax: float) -> None:
    top, quantile = st.tabs(["Top activations", "Across the range (quantile samples)"])
    for tab, kind in ((top, "top"), (quantile, "quantile")):
        with tab:
            found = idx.contexts(i, kind)
            if not found:
                st.caption("No contexts stored.")
                continue
            rows = [
                (
                    f"activation {c.act:.3g} · harvest row {c.row}",
                    viz.token_html(c.tokens, c.acts, c.peak, vmax),
                )
                for c in found
            ]
            st.html(viz.labelled_html(rows))


def main() -> None:
    st.title("Feature browser")
    info = common.focus()
    if info is None:
        return
    path = info.path / wb.INDEX
    if not path.is_file():
        st.info(
            f"No feature index for {info.name}: `saelab index {common.display(info.path)}` "
            "builds it."
        )
        return
    idx = common.open_index(info.path)
    meta = idx.meta
    st.caption(
        f"{info.name}: {meta.get('arch')} · {meta.get('d_sae'):,} latents · k {meta.get('k')} · "
        f"{meta.get('n_tokens', 0):,} indexed tokens of {meta.get('model')} at {meta.get('hook')}"
    )
    d_sae = int(meta["d_sae"])
    read_query(d_sae)
    navigator(d_sae)
    search(idx)
    i = st.session_state[LATENT]
    st.query_params["latent"] = str(i)
    card(idx, i)


with common.guard():
    main()
