"""saelab explain: the detection score by hand and with the embedded LM, held-out texts against
brute-force encodings, an endpoint explainer against a local OpenAI-style server, resume after
an interruption and a torn line, and refusals of bad input."""

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import saelab.explain as E
from saelab.cli import main
from saelab.config import ExplainConfig, IndexConfig
from saelab.errors import UserError
from saelab.feature_index import Context, FeatureIndex
from saelab.features import build_index
from saelab.runs import EXPLANATIONS, open_run

TPC = 15
KEY = "sk-test-7c1d9e0b-secret"
INDEX_CFG = IndexConfig(
    top_contexts=6, intervals=4, interval_samples=1, context_before=4, context_after=2,
    batch_size=256, device="cpu", logit_lens=False,
)  # fmt: skip


# ---------------------------------------------------------------------------------------
# The score, by hand


def test_balanced_accuracy_hand_worked():
    # Margins 3 2 1 0 | 0.5 -1 -2 -3: the median of all eight is 0.25, so 3 of 4 positives
    # and 3 of 4 negatives are called right; 15 of 16 pairs are ordered right.
    s = E.detection_score(np.array([3.0, 2, 1, 0]), np.array([0.5, -1, -2, -3]))
    assert (s["tp"], s["fn"], s["tn"], s["fp"]) == (3, 1, 3, 1)
    assert s["threshold"] == 0.25 and s["score"] == 0.75 and s["auc"] == 15 / 16
    # Agresti–Caffo: (3+1)/(4+2) in each arm, so 0.5·sqrt(2 · (2/3)(1/3) / 6).
    assert s["se"] == pytest.approx(0.5 * np.sqrt(2 * (2 / 9) / 6))
    # Answer texts (±1), threshold 0: TPR 2/3, TNR 3/4.
    t = E.detection_score(np.array([1.0, 1, -1]), np.array([-1.0, 1, -1, -1]), graded=False)
    assert (t["tp"], t["fn"], t["tn"], t["fp"]) == (2, 1, 3, 1)
    assert t["threshold"] == 0 and t["score"] == pytest.approx((2 / 3 + 3 / 4) / 2)


def test_an_explainer_that_says_the_same_to_every_text_scores_chance():
    # A "Yes" to everything (or a constant margin) must not look like skill.
    s = E.detection_score(np.full(5, 2.0), np.full(5, 2.0))
    assert s["score"] == 0.5 and s["auc"] == 0.5
    assert E.detection_score(np.ones(4), np.ones(4), graded=False)["score"] == 0.5


def test_parse_latents():
    assert E.parse_latents("3:6,1,4", 10) == [3, 4, 5, 1]
    assert E.parse_latents(" 2 : 4 , 0", 10) == [2, 3, 0]
    for bad in ("a-b", "1,,2", "-1", "3:"):
        with pytest.raises(UserError, match="is not a list like 0:50 or 12,40,7"):
            E.parse_latents(bad, 10)
    with pytest.raises(UserError, match="latent 10 is out of range; this SAE has latents 0..9"):
        E.parse_latents("8:11", 10)
    with pytest.raises(UserError, match="selects none"):
        E.parse_latents("5:5", 10)


def test_marked_wraps_runs_at_or_above_half_the_peak():
    toks = [" the", " big", " red", " dog", " ran"]
    ctx = Context(0, "top", 0, -1, 4.0, 0, toks, [0.0, 2.0, 4.0, 1.0, 2.5], 2)
    assert E.marked(ctx) == " the <<big red>> dog <<ran>>"


def test_clean_keeps_the_phrase():
    assert E.clean('The marked tokens are "names of rivers".\nMore text') == "names of rivers"
    assert E.clean("  the word 'ground'  ") == "the word 'ground'"


# ---------------------------------------------------------------------------------------
# The real scorer: the embedded LM on texts with and without a known word


@pytest.mark.slow
def test_embedded_explainer_detects_a_right_explanation_not_a_wrong_one():
    from saelab.explainers import LocalExplainer

    pos = [
        " the boat sailed across the ocean at dawn", " waves of the ocean hit the rocks",
        " she swam in the ocean every day", " the ocean was calm and blue",
        " fish live deep in the ocean", " an ocean breeze cooled the town",
    ]  # fmt: skip
    neg = [
        " he counted the coins on the table", " the train left the station late",
        " my brother fixed the old radio", " she wrote a letter to her friend",
        " the cat slept by the fire", " we bought bread at the market",
    ]  # fmt: skip
    lm = LocalExplainer("smollm2-135m", "cpu", batch_size=12)
    right = E.detection_score(*np.split(lm.detect('the word "ocean"', pos + neg)[0], [6]))
    wrong = E.detection_score(*np.split(lm.detect("kitchen tools", pos + neg)[0], [6]))
    assert right["score"] >= 0.75 and right["auc"] >= 0.8
    assert wrong["score"] <= 0.5 and right["auc"] - wrong["auc"] >= 0.4


# ---------------------------------------------------------------------------------------
# A tiny-model run, and a local OpenAI-style server


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_harvest, trained_run):
    root = tmp_path_factory.mktemp("explain")
    h = model_harvest(root, hook="blocks.0.hook_resid_post", n_tokens=TPC * 120)
    run = trained_run(root / "r", harvest=h, d_sae=64, k=4, eval_tokens=TPC * 20)
    build_index(run, INDEX_CFG, progress=False)
    return run


@pytest.fixture
def fresh(run, tmp_path):
    """A copy of the run (its harvest shared) with no explanations yet."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / EXPLANATIONS).unlink(missing_ok=True)
    return out


class _Server(ThreadingHTTPServer):
    """chat/completions that explains with the most common marked token and answers Yes when
    a text contains the described token; fails with 503 once `fail_at` explanations came."""

    logprobs = True
    fail_at: int | None = None

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.headers_seen: list[dict] = []
        self.explained = 0

    def answer(self, body: dict) -> dict:
        text = body["messages"][-1]["content"]
        marks = re.findall(r"<<(.+?)>>", text.split("\n\n", 1)[1]) if "<<" in text else []
        if marks:
            self.explained += 1
            if self.fail_at is not None and self.explained >= self.fail_at:
                raise ConnectionError
            return {"message": {"content": f'the token "{Counter(marks).most_common(1)[0][0]}"'}}
        said = re.search(r'contain the token "(.*)"\?', text, re.S)
        inner = re.search(r"^Text: (.*)\n\nDoes this text", text, re.S)
        yes = bool(said and inner and said[1] in inner[1])
        msg = {"content": "Yes" if yes else "No"}
        if not self.logprobs:
            return {"message": msg}
        top = [{"token": "Yes", "logprob": -0.1 if yes else -2.5},
               {"token": "No", "logprob": -2.5 if yes else -0.1}]  # fmt: skip
        return {"message": msg, "logprobs": {"content": [{"top_logprobs": top}]}}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        self.server.headers_seen.append(dict(self.headers))
        try:
            data = json.dumps({"choices": [self.server.answer(body)]}).encode()
        except ConnectionError:
            self.send_error(503, "going away")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = _Server()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv: _Server) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def _cli(run: Path, *flags: str) -> int:
    return main(["-q", "explain", str(run), "--device", "cpu", *flags])


def _window(c: Context) -> str:
    """A context's text as the explainer gets it: BOS (position 0) dropped, stripped."""
    at_bos = 1 + c.row % TPC - c.peak == 0
    return "".join(c.tokens[1:] if at_bos else c.tokens).strip()


def _live(run: Path, n: int) -> list[int]:
    fires = FeatureIndex.of_run(run).stats()["n_fires"]
    return [int(i) for i in np.nonzero(fires > 0)[0][:n]]


@pytest.mark.parametrize("logprobs", [True, False])
def test_endpoint_explainer_end_to_end(fresh, server, monkeypatch, logprobs):
    server.logprobs = logprobs
    monkeypatch.setenv("SAELAB_TEST_KEY", KEY)
    ids = _live(fresh, 6)
    spec = ",".join(map(str, ids))
    flags = ("--api_key_env", "SAELAB_TEST_KEY", "--api_model", "m1", "--latents", spec)
    assert _cli(fresh, "--explainer", _url(server), *flags, "--n_show", "2", "--n_detect", "3") == 0
    lines = E.read_explanations(fresh)
    assert sorted(lines) == sorted(ids)
    ix = FeatureIndex.of_run(fresh)
    for i, d in lines.items():
        assert d["explainer"] == f"{_url(server)}#m1"
        # The explainer saw the even-ranked top contexts, marked: its answer is their most
        # common marked token, recomputed here from the index.
        shown = ix.contexts(i)[0:4:2]
        marks = [m for c in shown for m in re.findall(r"<<(.+?)>>", E.marked(c))]
        assert d["explanation"] == f'the token "{Counter(marks).most_common(1)[0][0]}"'
        assert d["n_scored"] == d["tp"] + d["fn"] + d["tn"] + d["fp"] == 2 * d["n_pos"]
        if not logprobs:
            assert d["threshold"] == 0.0
        assert d["score"] == pytest.approx((d["tp"] / d["n_pos"] + d["tn"] / d["n_pos"]) / 2)
    # The key went out in the header only, and is nowhere in the run folder.
    assert {h["Authorization"] for h in server.headers_seen} == {f"Bearer {KEY}"}
    assert all(r["model"] == "m1" and r["temperature"] == 0 for r in server.requests)
    for f in fresh.rglob("*"):
        assert not f.is_file() or KEY.encode() not in f.read_bytes(), f
    # Each line scores the server's answers: per latent one explanation request, then its
    # positives, then its negatives; margins as the server gave them.
    groups: list[list[float]] = []
    asked: list[list[str]] = []
    for r in server.requests:
        if r["max_tokens"] != 1:
            groups.append([])
            asked.append([])
            continue
        yes = server.answer(r)["message"]["content"] == "Yes"
        groups[-1].append((2.4 if logprobs else 1.0) * (1 if yes else -1))
        asked[-1].append(re.search(r"^Text: (.*)\n\nDoes", r["messages"][-1]["content"], re.S)[1])
    for i, margins, texts in zip(ids, groups, asked):
        d, m = lines[i], np.array(margins)
        # The positives come first: the held-out contexts' windows, in rank order.
        held = E.split_contexts(ix.contexts(i), ix.contexts(i, "interval"), 2)[1]
        want = [_window(c) for c in held[: d["n_pos"]]]
        assert texts[: d["n_pos"]] == want and not set(texts[d["n_pos"] :]) & set(want)
        s = E.detection_score(m[: d["n_pos"]], m[d["n_pos"] :], graded=logprobs)
        assert {k: d[k] for k in s} == pytest.approx(s)


def test_held_out_texts_never_shown_and_negatives_silent(fresh):
    """Held-out positives are other contexts than the shown ones; negatives are windows on
    whose every token the SAE (encoded here from scratch) leaves the latent at zero."""
    ix = FeatureIndex.of_run(fresh)
    ids = _live(fresh, 8)
    cfg = ExplainConfig(run=str(fresh), n_detect=4, device="cpu")
    opened = open_run(fresh, "cpu")
    texts = E._Texts(opened, ix, ids, cfg)
    sae, store = opened.sae, opened.store
    for j, i in enumerate(ids):
        for w, centre in enumerate(texts.centres):
            rows = texts._rows(int(centre))
            with torch.no_grad():
                code = sae.encode(store.read(int(rows[0]), int(rows[-1]) + 1))
            fires = bool(((code.indices == i) & (code.values > 0)).any())
            assert texts.fired[w, j] == fires
        top, intervals = ix.contexts(i), ix.contexts(i, "interval")
        for n_show in (1, 2, 10):
            shown, held = E.split_contexts(top, intervals, n_show)
            assert len(shown) == min(n_show, (len(top) + 1) // 2)
            assert [c.act for c in shown] == sorted((c.act for c in shown), reverse=True)
            assert {c.row for c in shown}.isdisjoint(c.row for c in held)
            assert len(shown) + len(held) == len(top) + len(intervals)
        for c in top:  # a context's text is its window, BOS (position 0) dropped
            assert texts.text(c.row).strip() == _window(c)


def test_interrupted_run_resumes_to_the_same_file(run, tmp_path, server, monkeypatch):
    import shutil

    ids = ",".join(map(str, _live(run, 5)))
    flags = ("--explainer", _url(server), "--latents", ids, "--n_show", "2", "--n_detect", "2")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for d in (whole, cut):
        shutil.copytree(run, d)
        (d / EXPLANATIONS).unlink(missing_ok=True)
    assert _cli(whole, *flags) == 0
    asked = list(server.requests)
    third = [k for k, r in enumerate(asked) if r["max_tokens"] != 1][2]  # its explanation

    server.fail_at, server.explained = 3, 0  # the endpoint dies on the third latent
    assert _cli(cut, *flags) == 2
    assert len(E.read_explanations(cut)) == 2
    with open(cut / EXPLANATIONS, "a") as f:  # and a kill tore the line being written
        f.write('{"latent": 99, "explan')
    server.fail_at, server.requests = None, []
    assert _cli(cut, *flags) == 0
    assert server.requests == asked[third:]  # only the three latents not yet done
    assert (cut / EXPLANATIONS).read_bytes() == (whole / EXPLANATIONS).read_bytes()
    server.requests = []
    assert _cli(cut, *flags) == 0 and server.requests == []  # all done: nothing asked


def test_no_lm_writes_index_labels(fresh):
    ids = _live(fresh, 3)
    before = torch.get_num_threads()
    try:
        flags = ("--latents", ",".join(map(str, ids)), "--threads", "1")
        assert _cli(fresh, "--explainer", "none", *flags) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    ix = FeatureIndex.of_run(fresh)
    for i, d in E.read_explanations(fresh).items():
        peaks = Counter(c.tokens[c.peak].strip() or c.tokens[c.peak] for c in ix.contexts(i))
        top = peaks.most_common(1)[0][0]
        assert d["explanation"] == d["label"] and d["label"].startswith(f"fires on {top!r}")
        assert d["score"] is None and d["n_scored"] == 0 and d["explainer"] == "none"


def test_default_latents_are_a_seeded_sample_of_live_ones(fresh):
    ix = FeatureIndex.of_run(fresh)
    live = set(np.nonzero(ix.stats()["n_fires"] > 0)[0].tolist())
    a = E.choose_latents(ExplainConfig(n_latents=5, seed=1), ix)
    assert len(a) == 5 and set(a) <= live
    assert a == E.choose_latents(ExplainConfig(n_latents=5, seed=1), ix)
    assert a != E.choose_latents(ExplainConfig(n_latents=5, seed=2), ix)


# ---------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (("--latents", "0,5000"), {}, "latent 5000 is out of range; this SAE has latents 0..63"),
        (("--latents", "a-b"), {}, "--latents 'a-b' is not a list like 0:50 or 12,40,7"),
        (("--explainer", "http://127.0.0.1:{port}/v1"), {}, "cannot be reached"),
        (("--explainer", "http://127.0.0.1:{port}/v1", "--api_key_env", "SAELAB_NO_SUCH_KEY"),
         {}, "environment variable SAELAB_NO_SUCH_KEY is not set"),
        (("--explainer", "/no/such/model"), {}, "model directory /no/such/model does not exist"),
        (("--explainer", "http://127.0.0.1:{port}/v1", "--detection", "likelihood"), {},
         "cannot score by likelihood"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(fresh, capsys, flags, env, message):
    port = _closed_port()
    flags = tuple(f.format(port=port) for f in flags)
    before = sorted(p.name for p in fresh.iterdir())
    assert _cli(fresh, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in fresh.iterdir()) == before


def test_unindexed_run_is_refused(fresh, capsys):
    (fresh / "features.sqlite").unlink()
    assert _cli(fresh, "--explainer", "none") == 2
    assert "saelab index" in capsys.readouterr().err
    assert not (fresh / EXPLANATIONS).exists()
