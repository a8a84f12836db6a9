"""The Streamlit workbench (app/) under streamlit.testing's AppTest, on runs built here from
the tiny model: every page, its widgets changing what is shown, and every failure (empty or
missing runs dir, half-written run, corrupt files, missing index, paths escaping the runs
dir) shown as a message, never a stack trace. Also saelab.workbench and the viz HTML
helpers the pages use."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from saelab import viz
from saelab import workbench as wb
from saelab.config import DarkMatterConfig, EvalConfig, IndexConfig
from saelab.errors import UserError

HOME = Path(__file__).resolve().parent.parent / "app" / "Home.py"
RUN = "tiny-topk"
PLAIN = "sweep/plain"  # finished, but no eval.json, darkmatter.json or index
HALF = "half"  # cfg.json only, training not finished
PAGES = ["runs", "features", "dead", "darkmatter", "compare", "prompt", "steer"]


def build_runs(root: Path, model_harvest, trained_run) -> Path:
    """A runs dir with one fully analysed run on the tiny model, a finished run with nothing
    else, and a half-written run. Built once per test session (the browser test reuses it);
    model_harvest and trained_run are the conftest factories."""
    runs = root / "runs"
    if (runs / "READY").is_file():
        return runs
    from saelab.darkmatter import prepare, run_one
    from saelab.evaluate import evaluate
    from saelab.features import build_index

    h = model_harvest(root, n_tokens=31 * 200, n_ctx=32)
    run = trained_run(runs / RUN, harvest=h, d_sae=128, k=8, eval_tokens=31 * 100, log_every=2)
    evaluate(EvalConfig(run=str(run), ce_contexts=8), progress=False)
    dm = DarkMatterConfig(ce_contexts=4, top_contexts=5, pursuit_steps=3, figures=False)
    run_one(prepare(run, dm), dm)
    build_index(run, IndexConfig(run=str(run), top_contexts=5), progress=False)
    plain = runs / PLAIN
    plain.mkdir(parents=True)
    for name in ("cfg.json", "sae.safetensors", "train_log.jsonl"):
        shutil.copy(run / name, plain / name)
    (runs / HALF).mkdir()
    cfg = json.loads((run / "cfg.json").read_text())
    (runs / HALF / "cfg.json").write_text(json.dumps({**cfg, "complete": False}))
    (runs / "READY").write_text("")
    return runs


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory, model_harvest, trained_run):
    return build_runs(tmp_path_factory.getbasetemp() / "app", model_harvest, trained_run)


def app(monkeypatch, runs: Path, page: str = "runs", **query: str) -> AppTest:
    """The app on `runs`, showing `page` (query parameters as if from the URL)."""
    monkeypatch.setenv("SAELAB_RUNS_DIR", str(runs))
    at = AppTest.from_file(str(HOME), default_timeout=60)
    at.query_params.update(query)
    at.run()
    if page != "runs":
        at.switch_page(f"views/{page}.py").run()
    return at


def focus(at: AppTest, run: str) -> AppTest:
    at.sidebar.selectbox(key="_focus_box").set_value(run).run()
    return at


def clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def shown(at: AppTest) -> str:
    """Every message, caption and markdown on the page, as one string."""
    parts = [at.error, at.warning, at.info, at.caption, at.markdown, at.subheader, at.title]
    return "\n".join(texts(p) for p in parts)


def charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


# ---------------------------------------------------------------------------------------
# saelab.workbench


def test_inside_refuses_escapes(tmp_path):
    root = tmp_path / "runs"
    (root / "a" / "b").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "out").symlink_to(outside)
    (root / "alias").symlink_to(root / "a")
    assert wb.inside(root, "a/b") == (root / "a" / "b").resolve()
    assert wb.inside(root, "alias/b") == (root / "a" / "b").resolve()  # a link that stays in
    for bad in ("..", "../secret", "a/../../secret", "out", "out/x", str(outside), "/etc", ""):
        with pytest.raises(UserError, match="runs directory|outside"):
            wb.inside(root, bad)
    with pytest.raises(UserError, match="not a run"):
        wb.resolve_run(root, "a")


def test_run_names_nested_and_escaping_links(runs_dir, tmp_path):
    assert wb.run_names(runs_dir) == [HALF, PLAIN, RUN]
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(runs_dir / RUN, tmp_path / "elsewhere", ignore=lambda *a: ["features.sqlite"])
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    assert wb.run_names(root) == []
    assert wb.run_names(runs_dir / RUN) == ["."]


def test_list_runs_reports_problems_instead_of_raising(runs_dir):
    infos = {r.name: r for r in wb.list_runs(runs_dir)}
    assert infos[RUN].complete and not infos[RUN].problems and infos[RUN].has_index
    assert infos[PLAIN].complete and infos[PLAIN].eval is None and not infos[PLAIN].has_index
    assert not infos[HALF].complete and "not finished" in infos[HALF].problems[0]
    rows = {r["run"]: r for r in wb.runs_table(list(infos.values()))}
    assert rows[RUN]["FVU"] == pytest.approx(infos[RUN].eval["fvu"])  # numbers, not text
    assert rows[PLAIN]["FVU"] is None and "saelab eval" in rows[PLAIN]["status"]


def test_read_json_errors_are_one_line(tmp_path):
    (tmp_path / "bad.json").write_text('{"fvu": 0.1,')
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, match in (("bad", "not valid JSON"), ("list", "not a JSON object"), ("no", "not")):
        with pytest.raises(UserError, match=match) as e:
            wb.read_json(tmp_path / f"{name}.json", "rerun it")
        assert "\n" not in str(e.value) and "rerun it" in str(e.value)


def test_freq_hist_counts():
    ev = {
        "d_sae": 10,
        "n_tokens": 2_000_000,
        "log10_freq_hist": {"edges": [-8, -6, -5, -4, 0], "counts": [1, 2, 3, 1], "never_fired": 3},
    }
    h = wb.freq_hist(ev)
    assert h is not None
    assert wb.dead_counts(h) == {"dead": 3, "freq < 1e-6": 4, "freq < 1e-5": 6, "freq < 1e-4": 9}
    freq = np.array([0, 0, 1e-7, 1e-3, 0.5])
    g = wb.freq_hist_from_stats(freq, 100)
    assert g.never_fired == 2 and sum(g.counts) == 3 and g.below(1e-6) == 3
    small = wb.freq_hist({**ev, "n_tokens": 40_005})
    assert small is not None  # 40k tokens resolve 1e-4 only: 1e-5 would repeat the dead count
    assert wb.dead_counts(small) == {"dead": 3, "freq < 1e-4": 9}


def test_dead_series_skips_unparsable_lines(tmp_path):
    (tmp_path / "train_log.jsonl").write_text(
        '{"step": 1, "tokens": 10, "dead_frac": 0.5}\n{"step": 2, "tok\n'
        '{"step": 3, "tokens": 30, "dead_frac": 0.25}\n'
    )
    assert wb.dead_series(tmp_path) == {
        "step": [1.0, 3.0],
        "tokens": [10.0, 30.0],
        "dead_frac": [0.5, 0.25],
    }
    assert wb.dead_series(tmp_path / "missing")["tokens"] == []


def test_token_html_escapes_and_scales():
    out = viz.token_html(["<script>", ' "a"', "\n"], [0.0, 1.0, 2.0], peak=2)
    assert "<script>" not in out and "&lt;script&gt;" in out and "&quot;a&quot;" in out
    assert "rgba(228,87,86,0.50)" in out and "rgba(228,87,86,1.00)" in out and "↵" in out
    marked = viz.marked_html("x < y «<b>» z")
    assert "<b>" not in marked and "&lt;b&gt;</span> z" in marked and "x &lt; y " in marked


# ---------------------------------------------------------------------------------------
# Pages


def test_runs_page_lists_runs_and_shares_the_selection(monkeypatch, runs_dir):
    at = app(monkeypatch, runs_dir)
    clean(at)
    table = at.dataframe[0].value
    assert list(table["run"]) == [HALF, PLAIN, RUN]
    assert table.set_index("run").loc[PLAIN, "FVU"] == "-"
    assert f"saelab eval {runs_dir / PLAIN}" in shown(at)
    assert "not finished" in texts(at.warning)
    assert at.sidebar.selectbox(key="_focus_box").options == [HALF, PLAIN, RUN]
    assert at.sidebar.selectbox(key="_focus_box").value == PLAIN  # the first finished run
    at.multiselect[0].set_value([RUN, PLAIN]).run()
    clean(at)
    assert at.sidebar.selectbox(key="_focus_box").options == [RUN, PLAIN]
    at.switch_page("views/compare.py").run()
    at.switch_page("views/runs.py").run()
    assert at.multiselect[0].value == [RUN, PLAIN]  # kept across pages
    assert at.sidebar.selectbox(key="_focus_box").options == [RUN, PLAIN]


def test_feature_browser_widgets_change_the_card(monkeypatch, runs_dir):
    at = focus(app(monkeypatch, runs_dir, "features"), RUN)
    clean(at)
    assert texts(at.subheader).startswith("Latent 0")
    from saelab.feature_index import FeatureIndex

    ix = FeatureIndex.of_run(runs_dir / RUN)
    groups = {c.group for c in ix.contexts(0, "interval")}
    assert charts(at) == 2 and len(at.html) == 1 + len(groups)  # top contexts; each interval
    at.number_input[0].set_value(7).run()
    assert "Latent 7" in texts(at.subheader) and at.query_params["latent"] == "7"
    at.button[1].click().run()  # next
    assert "Latent 8" in texts(at.subheader)
    neighbour = next(b for b in at.button if (b.key or "").startswith("nb_"))
    neighbour.click().run()
    assert f"Latent {neighbour.key[3:]}" in texts(at.subheader)
    at.text_input(key="search_query").input("the").run()
    hits = [b for b in at.button if (b.key or "").startswith("hit_")]
    assert hits, "searching a common token finds latents"
    hits[-1].click().run()
    assert f"Latent {hits[-1].key[4:]}" in texts(at.subheader)
    at.radio(key="search_kind").set_value("text").run()
    at.text_input(key="search_query").input("In the beginning").run()
    clean(at)
    assert any((b.key or "").startswith("hit_") for b in at.button)


def test_feature_browser_query_and_messages(monkeypatch, runs_dir):
    at = app(monkeypatch, runs_dir, "features", run=RUN, latent="5")
    clean(at)
    assert "Latent 5" in texts(at.subheader)
    at = app(monkeypatch, runs_dir, "features", run=RUN, latent="100000")
    assert "out of range" in texts(at.warning) and "Latent 0" in texts(at.subheader)
    at = app(monkeypatch, runs_dir, "features", run=PLAIN)
    clean(at)
    assert f"saelab index {runs_dir / PLAIN}" in texts(at.info)


def _tiny(run: Path):
    from saelab.models import load_model
    from saelab.steering import load_sae

    return load_model("tiny"), load_sae(run).eval()


def test_feature_page_shows_explanation_note_and_labels(monkeypatch, runs_dir, tmp_path):
    from saelab.feature_index import FeatureIndex

    root = _copy_run(runs_dir, tmp_path)
    run = root / RUN
    card = FeatureIndex.of_run(run).latent(3)
    near = card.neighbours[0][0]
    (run / "explanations.jsonl").write_text(
        json.dumps({"latent": 3, "explanation": "the word __init__ [x](y)", "score": 0.81,
                    "n_scored": 40, "explainer": "fake"}) + '\n{"latent": 3, "expl'
    )  # fmt: skip
    at = app(monkeypatch, root, "features", run=RUN, latent="3")
    clean(at)
    md = texts(at.markdown)
    assert r"**Explanation:** the word \_\_init\_\_ \[x\]\(y\) \(score 0\.81\)" in md
    assert "detection score 0.81" in texts(at.caption) and "40 examples" in texts(at.caption)
    nb = at.button(key=f"nb_{near}")
    want = wb.md_escape(wb.shorten(FeatureIndex.of_run(run).latent(near).label(), 40))
    assert nb.label.startswith(f"#{near} · {want}")  # the index label of the neighbour
    at.text_area(key="note_3").input("my note: *commas*").run()
    at.button(key="save_note_3").click().run()
    clean(at)
    assert json.loads((run / "notes.json").read_text()) == {"3": "my note: *commas*"}
    assert r"**Your note:** my note\: \*commas\*" in texts(at.markdown)
    at.button(key="steer_this").click().run()  # steer with this latent
    assert at.title[0].value == "Steer" and at.text_input(key="steer_ids").value == "3"
    assert "my note" in texts(at.caption)


def test_your_text_box_matches_the_sae(monkeypatch, runs_dir):
    from saelab.steering import hook_activations, rank_latents

    at = app(monkeypatch, runs_dir, "features", run=RUN, latent="2")
    n_html = len(at.html)
    model, sae = _tiny(runs_dir / RUN)
    text = "In the beginning God created the heaven"
    x = hook_activations(model, text, sae.hook)
    with torch_no_grad():
        code = sae.encode(x)
    dense = np.zeros((x.shape[0], sae.d_sae))
    np.put_along_axis(dense, code.indices.numpy(), code.values.numpy(), 1)
    latent = int(dense[1:].sum(0).argmax())  # one that fires on this text
    best = dense[1:].max(0)  # text search ranks by the largest activation after BOS
    want = [j for j in np.argsort(-best, kind="stable")[:20] if best[j] > 0]
    got = rank_latents(model, sae, text, k=20)
    assert [h.latent for h in got] == want
    assert [h.value for h in got] == pytest.approx(best[want].tolist(), rel=1e-5)
    assert [h.position for h in got] == [1 + int(dense[1:, j].argmax()) for j in want]
    at.number_input[0].set_value(latent).run()
    at.text_input(key="own_text").input(text).run()
    clean(at)
    assert len(at.html) == n_html + 1 or latent != 2
    body = next(h.proto.body for h in at.html if "Beginning" in h.proto.body
                or " beginning" in h.proto.body)  # fmt: skip
    got = [float(v) for v in re.findall(r'data-v="([^"]+)"', body)]
    np.testing.assert_allclose(got, dense[:, latent], rtol=5e-3, atol=1e-3)  # shown at 3 digits
    vmax = float(re.search(r"maximum ([\d.e+-]+)", texts(at.caption)).group(1))
    from saelab.feature_index import FeatureIndex

    card = FeatureIndex.of_run(runs_dir / RUN).latent(latent)
    assert vmax == pytest.approx(card.max_act, rel=1e-2)  # the latent's own scale


def test_whole_context_on_the_page(monkeypatch, runs_dir):
    from saelab.features import whole_context

    at = app(monkeypatch, runs_dir, "features", run=RUN, latent="2")
    n_html = len(at.html)
    at.toggle(key="whole_on").set_value(True).run()
    clean(at)
    assert len(at.html) == n_html + 1
    tokens, acts, peak = whole_context(runs_dir / RUN, at.session_state["_ctx_row"], 2)
    body = at.html[1].proto.body  # after the top contexts
    got = [float(v) for v in re.findall(r'data-v="([^"]+)"', body)]
    assert len(got) == len(tokens) == 32 and body.count('class="sl-t sl-peak"') == 1
    np.testing.assert_allclose(got, acts, rtol=5e-3, atol=1e-3)


def test_interval_groups_on_the_page_add_up(monkeypatch, runs_dir):
    from saelab.feature_index import FeatureIndex

    ix = FeatureIndex.of_run(runs_dir / RUN)
    i = int(np.argmax(ix.stats()["n_fires"]))
    at = app(monkeypatch, runs_dir, "features", run=RUN, latent=str(i))
    clean(at)
    lines = [m for m in texts(at.markdown).splitlines() if m.startswith("**Interval")]
    counts = [int(re.search(r"· ([\d,]+) firings", m).group(1).replace(",", "")) for m in lines]
    assert len(lines) == len(ix.latent(i).intervals) and sum(counts) == ix.latent(i).n_fires


def test_search_escapes_the_query_and_ranks_text_by_activation(monkeypatch, runs_dir):
    from saelab.steering import rank_latents

    at = app(monkeypatch, runs_dir, "features", run=RUN)
    at.text_input(key="search_query").input("def __init__ [x](y)").run()
    clean(at)
    assert r"def \_\_init\_\_ \[x\]\(y\)" in texts(at.caption)
    assert "__init__" not in texts(at.caption)
    at.radio(key="search_kind").set_value("text").run()
    text = "In the beginning God created the heaven"
    at.text_input(key="search_query").input(text).run()
    clean(at)
    hits = [int(b.key[4:]) for b in at.button if (b.key or "").startswith("hit_")]
    model, sae = _tiny(runs_dir / RUN)
    want = rank_latents(model, sae, text, k=20)
    assert sorted(hits) == sorted(h.latent for h in want) and len(hits) > 3  # 3 columns
    for h in want:
        assert at.button(key=f"hit_{h.latent}").label.endswith(f" · {h.value:.3g}")


def test_back_steps_through_latents(monkeypatch, runs_dir):
    at = app(monkeypatch, runs_dir, "features", run=RUN, latent="4")
    at.button[1].click().run()  # next: 5
    assert at.query_params["latent"] == "5" and "Latent 5" in texts(at.subheader)
    at.query_params["latent"] = "4"  # what the browser's Back hands the script
    at.run()
    assert "Latent 4" in texts(at.subheader) and at.query_params["latent"] == "4"
    at.run()  # a plain rerun keeps it
    assert "Latent 4" in texts(at.subheader)


def test_steer_page_generates_as_the_api(monkeypatch, runs_dir):
    from saelab import steering

    at = app(monkeypatch, runs_dir, "steer", run=RUN)
    clean(at)
    assert "Pick one or more latents" in texts(at.info)
    at.text_input(key="steer_ids").input("3, 7").run()
    at.number_input(key="steer_strength").set_value(20.0).run()
    at.number_input(key="steer_seed").set_value(5).run()
    clean(at)
    model, sae = _tiny(runs_dir / RUN)
    prompt = at.text_area(key="steer_prompt").value
    ivs = [steering.add(sae, [3, 7], 20.0)]
    base = steering.generate(model, prompt, [], 20, 5, 1.0)
    steered = steering.generate(model, prompt, ivs, 20, 5, 1.0)
    assert [c.value for c in at.code] == [prompt + base, prompt + steered]
    assert base != steered
    before = steering.next_token_probs(model, prompt, [], k=1)
    table = at.dataframe[0].value
    assert len(table) == 12 and table["change"].str.match(r"^[+-]\d").all()
    assert repr(next(iter(before))) in set(table["token"]) or len(table) == 12
    at.radio(key="steer_mode").set_value("ablate").run()
    clean(at)
    assert at.number_input(key="steer_strength").disabled
    ablated = steering.generate(model, prompt, [steering.ablate(sae, [3, 7])], 20, 5, 1.0)
    assert at.code[1].value == prompt + ablated
    at.text_input(key="steer_ids").input("3, 99999").run()
    assert "out of range" in texts(at.error)


def torch_no_grad():
    import torch

    return torch.no_grad()


def test_dead_latents_page(monkeypatch, runs_dir):
    at = app(monkeypatch, runs_dir, "dead", run=RUN)
    clean(at)
    assert charts(at) == 2  # frequency histogram, dead fraction during training
    counts, listed = at.dataframe[0].value, at.dataframe[1].value
    assert list(counts["run"]) == [RUN]  # the only run with firing frequencies
    assert len(listed) > 0 and "decoder neighbours (cosine)" in listed.columns
    pick = int(listed["latent"][1])
    at.selectbox(key="dead_pick").set_value(pick).run()
    at.button[0].click().run()  # open in the feature browser
    assert at.title[0].value == "Feature browser" and f"Latent {pick}" in texts(at.subheader)
    at = focus(app(monkeypatch, runs_dir, "dead"), PLAIN)
    assert f"saelab index {runs_dir / PLAIN}" in texts(at.info)


def test_dark_matter_page(monkeypatch, runs_dir):
    at = app(monkeypatch, runs_dir, "darkmatter", run=RUN)
    clean(at)
    assert [m.label for m in at.metric][:2] == ["R²(e)", "R²(‖e‖²)"]
    assert charts(at) == 3  # norms, predicted vs actual, linear/nonlinear split
    assert len(at.html) == 1 and "«" not in at.html[0].proto.body
    assert "clean" in list(at.dataframe[0].value["splice"])
    dm = json.loads((runs_dir / RUN / "darkmatter.json").read_text())
    ev = json.loads((runs_dir / RUN / "eval.json").read_text())
    split = json.loads(at.get("plotly_chart")[2].proto.spec)
    assert split["layout"]["barmode"] == "group"  # the parts are not additive
    bars = {t["name"]: t["y"] for t in split["data"]}
    assert bars["total ‖e‖² (FVU)"][0] == pytest.approx(dm["fvu"])  # then pursuit's
    assert bars["nonlinear ‖e_nl‖²"][0] == pytest.approx(dm["fvu_nonlinear"])
    caption = texts(at.caption)
    assert wb.ce_contexts(dm["ce"]) in caption and wb.ce_contexts(ev["downstream"]) in caption
    assert wb.ce_contexts(dm["ce"]) != wb.ce_contexts(ev["downstream"])
    at = focus(at, PLAIN)
    assert f"saelab darkmatter {runs_dir / PLAIN}" in texts(at.info)


def test_compare_page(monkeypatch, runs_dir):
    at = app(monkeypatch, runs_dir, "compare")
    clean(at)
    assert charts(at) == 1 and "topk" in texts(at.subheader)
    assert list(at.dataframe[0].value["name"]) == [RUN]
    assert f"saelab eval {runs_dir / PLAIN}" in texts(at.caption)
    assert "select more runs" in texts(at.info)  # one evaluated run: nothing to compare yet
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    fvu = json.loads((runs_dir / RUN / "eval.json").read_text())["fvu"]
    assert fig["layout"]["yaxis"]["range"] == [0, pytest.approx(fvu * 1.15)]  # never negative
    ev = json.loads((runs_dir / RUN / "eval.json").read_text())
    assert f"{wb.md_escape(RUN)}: {wb.ce_contexts(ev['downstream'])}" in texts(at.caption)


def test_prompt_page_runs_the_model(monkeypatch, runs_dir):
    at = app(monkeypatch, runs_dir, "prompt", run=RUN)
    clean(at)
    first = at.dataframe[0].value
    assert len(first) > 3 and first["latents (activation)"].str.len().gt(0).any()
    assert len(at.html) == 1
    at.text_area(key="prompt_text").input("Hello world").run()
    clean(at)
    assert list(at.dataframe[0].value["token"])[1:] == ["Hello", " world"]
    at.button[0].click().run()  # open the highlighted latent in the feature browser
    assert at.title[0].value == "Feature browser"
    at = app(monkeypatch, runs_dir, "prompt", run=HALF)
    assert "not finished" in texts(at.warning) and not at.dataframe


# ---------------------------------------------------------------------------------------
# Failures are messages


@pytest.mark.parametrize("page", PAGES)
def test_empty_and_missing_runs_dir(monkeypatch, tmp_path, page):
    at = app(monkeypatch, tmp_path, page)
    clean(at)
    assert "No runs in" in texts(at.info)
    at = app(monkeypatch, tmp_path / "nowhere", page)
    clean(at)
    assert "does not exist" in texts(at.error) + texts(at.sidebar.error)


@pytest.mark.parametrize("page", PAGES)
def test_half_written_run_on_every_page(monkeypatch, runs_dir, page):
    at = app(monkeypatch, runs_dir, page, run=HALF)
    clean(at)
    assert not at.error


@pytest.mark.parametrize("bad", ["../..", "/etc", "tiny-topk/../../x", "escape"])
def test_query_run_outside_the_runs_dir(monkeypatch, runs_dir, tmp_path, bad):
    root = _copy_run(runs_dir, tmp_path)
    (root / "escape").symlink_to(runs_dir / PLAIN)
    at = app(monkeypatch, root, run=bad)
    clean(at)
    assert "outside" in texts(at.error) or "not a path inside" in texts(at.error)
    assert at.sidebar.selectbox(key="_focus_box").options == [RUN]
    at.switch_page("views/features.py").run()
    assert "Latent 0" in texts(at.subheader)  # the runs inside still work


def _copy_run(runs_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(runs_dir / RUN, root / RUN)
    return root


def test_corrupt_files_are_messages(monkeypatch, runs_dir, tmp_path):
    root = _copy_run(runs_dir, tmp_path)
    (root / RUN / "eval.json").write_text('{"fvu": ')
    (root / RUN / "darkmatter.json").write_text("not json")
    (root / RUN / "features.sqlite").write_bytes(b"garbage" * 100)
    at = app(monkeypatch, root)
    clean(at)
    assert "not valid JSON" in texts(at.warning)
    for page, want in (("features", "damaged"), ("darkmatter", "not valid JSON")):
        at.switch_page(f"views/{page}.py").run()
        clean(at)
        assert want in texts(at.error), page
    at.switch_page("views/dead.py").run()
    clean(at)
    assert "damaged" in texts(at.error)
    at.switch_page("views/compare.py").run()
    clean(at)
    assert "None of these runs" in texts(at.info)


def test_corrupt_cfg_and_token_table(monkeypatch, runs_dir, tmp_path):
    root = _copy_run(runs_dir, tmp_path)
    (root / RUN / "darkmatter_tokens.sqlite").write_bytes(b"\0" * 4096)
    at = app(monkeypatch, root, "darkmatter")
    clean(at)
    assert "not a readable table" in texts(at.error)
    (root / RUN / "cfg.json").write_text("{")
    at = app(monkeypatch, root)
    clean(at)
    assert "cfg.json is not valid JSON" in texts(at.warning)
    for page in PAGES[1:]:
        at.switch_page(f"views/{page}.py").run()
        clean(at)


def test_app_cli_refuses_bad_input_with_exit_2(tmp_path, capsys):
    from saelab.cli import main

    assert main(["app", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["app", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "--port" in err and len(err.strip().splitlines()) == 1


def test_the_app_data_layer_imports_no_torch():
    """The app's readers (and every page's saelab import) stay light: no torch, no trainer."""
    code = (
        "import sys; import saelab.workbench, saelab.viz, saelab.feature_index, saelab.runs; "
        "heavy = [m for m in ('torch', 'saelab.trainer', 'saelab.store', 'saelab.evaluate') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
