"""Prompt: type text and see which latents fire on each token (saelab.steering.top_latents);
the model and the SAE are loaded once per process."""

import common
import pandas as pd
import streamlit as st

from saelab import viz
from saelab import workbench as wb
from saelab.runs import SYNTHETIC

DEFAULT_PROMPT = "In the beginning God created the heaven and the earth."


@st.cache_data(max_entries=64, show_spinner=False)
def fire(run: str, modified: float, model_name: str, prompt: str) -> list[tuple]:
    """Every firing latent at every token, strongest first."""
    from saelab.steering import top_latents

    coder = common.sae(run, modified)
    rows = top_latents(common.model(model_name), coder, prompt, k=coder.d_sae)
    return [tuple(r) for r in rows]


def main() -> None:
    st.title("Prompt")
    info = common.focus()
    if info is None or not common.need_complete(info):
        return
    name = info.cfg.get("model")
    if not name or name == SYNTHETIC:
        st.info(f"{info.name} was trained on a synthetic harvest: there is no model to prompt.")
        return
    st.caption(f"model `{name}`, hook `{info.cfg.get('hook')}`, SAE {info.name}")
    prompt = st.text_area("Prompt", DEFAULT_PROMPT, key="prompt_text", height=100)
    k = st.slider("Latents per token", 1, 20, 5, key="prompt_k")
    if not prompt.strip():
        st.info("Type some text.")
        return
    weights = info.path / "sae.safetensors"
    rows = fire(str(info.path), common.mtime(weights), name, prompt)
    describe = common.describer(info, common.open_index(info.path) if info.has_index else None)

    def named(i: int) -> str:
        label = describe(i)
        return f"{i} ({wb.shorten(label, 32)})" if label else str(i)

    table = pd.DataFrame(
        {
            "position": [r[0] for r in rows],
            "token": [repr(r[1])[1:-1] for r in rows],
            "latents (activation)": [
                "  ".join(f"{named(i)}: {v:.2f}" for i, v in zip(r[2][:k], r[3][:k])) for r in rows
            ],
        }
    )
    firing = sorted({i for r in rows for i in r[2][:k]})
    if not firing:
        st.info("No latent fires on this prompt.")
        st.dataframe(table, hide_index=True)
        return
    counts = {i: sum(i in r[2][:k] for r in rows) for i in firing}
    order = sorted(firing, key=lambda i: -counts[i])
    pick = st.selectbox(
        "Highlight a latent",
        order,
        format_func=lambda i: f"{named(i)}: in the top {k} at {counts[i]} tokens",
        key="prompt_latent",
    )
    acts = [dict(zip(r[2], r[3])).get(pick, 0.0) for r in rows]
    st.html(viz.token_html([r[1] for r in rows], acts))
    if st.button(f"Open latent {pick} in the feature browser"):
        st.session_state["latent_id"] = int(pick)
        st.switch_page("views/features.py")
    st.dataframe(table, hide_index=True, height=min(35 * (len(table) + 1) + 3, 640))
    st.caption(
        "Activations at the SAE's hook, in the SAE's units; the highlight shows every token "
        "the latent fires on. Steer with latents on the Steer page (or from a notebook with "
        "saelab.steering)."
    )


with common.guard():
    main()
