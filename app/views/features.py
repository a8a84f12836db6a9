"""Feature browser: one latent at a time from the run's feature index (features.sqlite):
what it is about (your note, its explanation, or a label from the index), statistics,
activation histogram, logit lens, decoder neighbours, its activation on your own text, top
contexts and activation-interval groups; jump by id, by token or text search, or through a
neighbour. The latent lives in the URL (?latent=N), so the browser's Back steps through the
latents visited."""

import common
import streamlit as st

from saelab import viz
from saelab import workbench as wb
from saelab.feature_index import FeatureIndex

LATENT = "latent_id"  # session_state: the latent shown; other pages set it, then switch here
BOX = "_latent_box"
URL = "_latent_url"  # the ?latent= this page last wrote: a different one came from Back/Forward
STEER = "steer_latents"  # session_state read by the Steer page


def go(i: int) -> None:
    st.session_state[LATENT] = int(i)


def step(delta: int, d_sae: int) -> None:
    st.session_state[LATENT] = (int(st.session_state.get(LATENT, 0)) + delta) % d_sae


def from_box() -> None:
    st.session_state[LATENT] = int(st.session_state[BOX])


def read_query(d_sae: int) -> None:
    """?latent=N picks the latent when it differs from what this page last wrote there: on
    the first visit, and when Back or Forward brought another URL."""
    want = st.query_params.get("latent")
    if want is None or want == st.session_state.get(URL):
        return
    st.session_state[URL] = want
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


@st.cache_data(max_entries=64, show_spinner="Running the model…")
def rank_text(run: str, modified: float, model_name: str, text: str) -> list[tuple]:
    from saelab.steering import rank_latents

    coder = common.sae(run, modified)
    return [tuple(h) for h in rank_latents(common.model(model_name), coder, text, k=20)]


@st.cache_data(max_entries=64, show_spinner="Running the model…")
def text_acts(run: str, modified: float, model_name: str, text: str, latent: int) -> tuple:
    from saelab.steering import latent_activations

    coder = common.sae(run, modified)
    tokens, acts = latent_activations(common.model(model_name), coder, text, [latent])
    return tokens, acts[:, 0].tolist()


@st.cache_data(max_entries=32, show_spinner="Reading the whole context…")
def whole(run: str, modified: float, row: int, latent: int) -> tuple:
    from saelab.features import whole_context

    return whole_context(run, row, latent)


def hit_buttons(hits: list[tuple[int, str]], describe: wb.Describer, key: str = "hit") -> None:
    """Three columns of buttons, one per (latent, figure), each opening its latent."""
    cols = st.columns(3)
    for n, (j, figure) in enumerate(hits):
        cols[n % 3].button(
            f"{common.named(j, describe, 40)} · {figure}",
            key=f"{key}_{j}",
            on_click=go,
            args=(j,),
            width="stretch",
        )


def search(idx: FeatureIndex, info: wb.RunInfo, describe: wb.Describer) -> None:
    with st.expander("Search latents by token or text", expanded=False):
        c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
        how = c1.radio("Search by", ["token", "text"], key="search_kind", horizontal=True)
        query = c2.text_input(
            "Token (exact)" if how == "token" else "Text (the model runs on it)",
            key="search_query",
            placeholder="e.g. the" if how == "token" else "e.g. In the beginning",
        )
        if not query:
            return
        shown = wb.md_escape(query)
        if how == "token":
            hits = idx.search_token(query)
            if not hits:
                st.caption(f"No latent in the index fires on the token “{shown}”.")
                return
            st.caption(
                f"Latents that best detect the token “{shown}”: latent · label · F1 · firings "
                "on it (F1 is 1 for a latent that fires exactly on this token; click to open)"
            )
            hit_buttons([(h.latent, f"F1 {h.f1:.2f} · {h.count}×") for h in hits], describe)
            return
        loaded = common.model_and_sae(info)
        if loaded is None:
            return
        found = rank_text(str(info.path), common.mtime(info.path / wb.WEIGHTS), info.cfg["model"],
                          query)  # fmt: skip
        if not found:
            st.caption(f"No latent fires on “{shown}”.")
            return
        st.caption(
            f"Latents with the largest activation on any token of “{shown}” (the model runs "
            "on the text): latent · label · max activation (click to open)"
        )
        hit_buttons([(j, f"{v:.3g}") for j, v, _ in found], describe)


def about(i: int, info: wb.RunInfo, describe: wb.Describer) -> None:
    """The label line, the explanation's provenance, the note editor and the steer link."""
    label, source = describe(i), describe.source(i)
    if label:
        name = {"note": "Your note", "explanation": "Explanation", "index": "From the index"}
        st.markdown(f"**{name[source]}:** {wb.md_escape(label, one_line=False)}")
    if (e := describe.explanations.get(i)) is not None:
        score = (
            "not scored"
            if e.score is None
            else f"detection score {e.score:.2f} (balanced accuracy on {e.n_scored} examples; "
            "chance is 0.50)"
        )
        st.caption(f"Explanation by {wb.md_escape(e.explainer or 'an explainer')}: {score}")
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    with c1.expander("Your note on this latent" + (" (saved)" if i in describe.notes else "")):
        text = st.text_area("Note", describe.notes.get(i, ""), key=f"note_{i}", height=80)
        if st.button("Save note", key=f"save_note_{i}"):
            wb.write_note(info.path, i, text)
            st.rerun()
        st.caption(f"Kept in {wb.NOTES} in the run folder; an empty note removes it.")
    if c2.button("Steer with this latent", key="steer_this", width="stretch"):
        st.session_state[STEER] = [i]
        st.switch_page("views/steer.py")


def own_text(info: wb.RunInfo, i: int, vmax: float) -> None:
    text = st.text_input(
        "Your text: the model runs on it and each token shows this latent's activation",
        key="own_text",
        placeholder="type any text",
    )
    if not text:
        return
    if common.model_and_sae(info) is None:
        return
    modified = common.mtime(info.path / wb.WEIGHTS)
    tokens, acts = text_acts(str(info.path), modified, info.cfg["model"], text, i)
    st.html(viz.token_html(tokens, acts, vmax=vmax))
    st.caption(
        f"Largest here {max(acts, default=0):.3g}; colours on the scale of the top contexts "
        f"(this latent's indexed maximum {vmax:.3g})."
    )


def card(idx: FeatureIndex, i: int, info: wb.RunInfo, describe: wb.Describer) -> None:
    c = idx.latent(i)
    st.subheader(f"Latent {i}")
    about(i, info, describe)
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
        right.caption(wb.lens_caveat(str(idx.meta.get("hook", ""))))
    elif note := idx.meta.get("logit_lens_note"):
        right.caption(f"No logit lens: {wb.md_escape(note)}")
    if c.neighbours:
        st.markdown("**Decoder neighbours** (latent · label · cosine; click to open)")
        hit_buttons([(j, f"{cos:.2f}") for j, cos in c.neighbours[:9]], describe, key="nb")
    own_text(info, i, c.max_act)
    contexts(idx, i, c, info)


def _row(x, vmax: float) -> tuple[str, str]:
    label = f"activation {x.act:.3g} · harvest row {x.row}"
    return label, viz.token_html(x.tokens, x.acts, x.peak, vmax)


def contexts(idx: FeatureIndex, i: int, c, info: wb.RunInfo) -> None:
    top, groups = st.tabs(["Top activations", "Across the range (activation intervals)"])
    vmax = c.max_act
    with top:
        found = idx.contexts(i, "top")
        if not found:
            st.caption("No contexts stored.")
        else:
            st.html(viz.labelled_html([_row(x, vmax) for x in found]))
            expand(found, i, info, vmax)
    with groups:
        examples = idx.contexts(i, "interval")
        if not c.intervals:
            st.caption("No firings, so no intervals.")
        for g in reversed(range(len(c.intervals))):
            lo, hi, n = c.intervals[g]
            share = n / max(c.n_fires, 1)
            inside = [x for x in examples if x.group == g]
            st.markdown(
                f"**Interval {g + 1} · activation {lo:.3g}–{hi:.3g}** · {n:,} firings "
                f"({share:.1%})" + ("" if inside or not n else " · no distinct example kept")
            )
            if inside:
                st.html(viz.labelled_html([_row(x, vmax) for x in inside]))


def expand(found: list, i: int, info: wb.RunInfo, vmax: float) -> None:
    """One chosen top context, shown whole (the harvest holds every context's tokens)."""
    with st.expander("Show a whole context"):
        n = st.selectbox(
            "Context",
            range(len(found)),
            format_func=lambda r: f"#{r + 1}: activation {found[r].act:.3g}",
            key="whole_ctx",
        )
        if n is None or not st.toggle("show it", key="whole_on"):
            return
        x = found[n]
        st.session_state["_ctx_row"] = x.row
        tokens, acts, peak = whole(str(info.path), common.mtime(info.path / wb.WEIGHTS), x.row, i)
        st.html(viz.token_html(tokens, acts, peak, vmax))


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
    describe = common.describer(info, idx)
    read_query(d_sae)
    navigator(d_sae)
    search(idx, info, describe)
    i = st.session_state[LATENT]
    st.query_params["latent"] = str(i)
    st.session_state[URL] = str(i)
    card(idx, i, info, describe)


with common.guard():
    main()
