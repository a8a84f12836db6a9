"""Steer: add, clamp or ablate latents while the model generates, through the same
saelab.steering calls as a notebook (add/clamp/ablate, compare_generations,
next_token_probs); the generations with and without the intervention side by side, and the
next-token probabilities that moved most. A seed makes every generation reproducible."""

import common
import streamlit as st

from saelab import workbench as wb

STEER = "steer_latents"  # set by the feature page's "Steer with this latent"
DEFAULT_PROMPT = "In the beginning God created"
MODES = {
    "add": "add strength × the latent's decoder direction at every token",
    "clamp": "set the latent's activation to strength wherever it fires",
    "ablate": "remove what the latent writes (strength is not used)",
}


def interventions(sae, latents: list[int], mode: str, strength: float) -> list:
    from saelab import steering

    if mode == "add":
        return [steering.add(sae, latents, strength)]
    if mode == "clamp":
        return [steering.clamp(sae, latents, strength)]
    return [steering.ablate(sae, latents)]


@st.cache_data(max_entries=32, show_spinner="Generating…")
def run_steering(
    run: str, modified: float, model_name: str, prompt: str, latents: tuple[int, ...],
    mode: str, strength: float, n_new: int, seed: int, temperature: float,
) -> tuple[dict[str, str], dict[str, float], dict[str, float]]:  # fmt: skip
    """(generations by name, next-token probabilities before, after)."""
    from saelab.steering import compare_generations, next_token_probs

    model, sae = common.model(model_name), common.sae(run, modified)
    ivs = interventions(sae, list(latents), mode, strength)
    texts = compare_generations(model, prompt, {"steered": ivs}, n_new, seed, temperature).texts
    vocab = int(model.cfg.d_vocab)
    before = next_token_probs(model, prompt, [], k=vocab)
    after = next_token_probs(model, prompt, ivs, k=vocab)
    return texts, before, after


def choose(d_sae: int, describe: wb.Describer) -> list[int]:
    if STEER in st.session_state:  # from the feature page: seed the box once
        st.session_state["steer_ids"] = ", ".join(map(str, st.session_state.pop(STEER)))
    text = st.text_input("Latents (ids, e.g. 12, 40)", key="steer_ids")
    latents = wb.parse_latents(text, d_sae)
    for i in latents:
        st.caption(common.named(i, describe, 100))
    return latents


def main() -> None:
    st.title("Steer")
    info = common.focus()
    if info is None or not common.need_complete(info):
        return
    loaded = common.model_and_sae(info)
    if loaded is None:
        return
    _, sae = loaded
    idx = common.open_index(info.path) if info.has_index else None
    describe = common.describer(info, idx)
    st.caption(f"model `{info.cfg.get('model')}`, hook `{info.cfg.get('hook')}`, SAE {info.name}")
    latents = choose(sae.d_sae, describe)
    c1, c2 = st.columns(2)
    mode = c1.radio("Mode", list(MODES), key="steer_mode", horizontal=True)
    c1.caption(MODES[mode])
    strength = c2.number_input("Strength", value=8.0, step=1.0, key="steer_strength",
                               disabled=mode == "ablate")  # fmt: skip
    prompt = st.text_area("Prompt", DEFAULT_PROMPT, key="steer_prompt", height=80)
    c1, c2, c3 = st.columns(3)
    n_new = c1.slider("New tokens", 1, 64, 20, key="steer_tokens")
    seed = int(c2.number_input("Seed", value=0, step=1, key="steer_seed"))
    temperature = c3.number_input("Temperature (0: greedy)", 0.0, 2.0, 1.0, 0.1,
                                  key="steer_temperature")  # fmt: skip
    if not latents:
        st.info("Pick one or more latents (or open one in the feature browser and click "
                "“Steer with this latent”).")  # fmt: skip
        return
    if not prompt.strip():
        st.info("Type a prompt.")
        return
    modified = common.mtime(info.path / wb.WEIGHTS)
    texts, before, after = run_steering(
        str(info.path), modified, info.cfg["model"], prompt, tuple(latents), mode,
        float(strength), n_new, seed, float(temperature),
    )  # fmt: skip
    left, right = st.columns(2)
    for col, name in ((left, "baseline"), (right, "steered")):
        col.markdown(f"**{'Without' if name == 'baseline' else 'With'} the intervention**")
        col.code(prompt + texts[name], language=None, wrap_lines=True)
    st.markdown("**Next-token probabilities that moved most**")
    rows = wb.prob_shifts(before, after, 12)
    for r in rows:
        r["token"] = repr(r["token"])
    st.dataframe(
        common.table(rows, {"before": "{:.2%}", "after": "{:.2%}", "change": "{:+.2%}"}),
        hide_index=True,
        height=35 * (len(rows) + 1) + 3,
    )
    st.caption(
        "Same seed, same sampling, with and without the intervention (saelab.steering."
        "compare_generations); the same calls work in a notebook."
    )


with common.guard():
    main()
