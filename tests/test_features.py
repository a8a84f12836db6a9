"""The feature index: every stored number against a brute-force recomputation on a tiny-model
run, search, idempotent and atomic rebuilds, and refusals of bad input."""

import hashlib
import json
import re
import shutil
import sqlite3

import numpy as np
import pytest
import torch

import saelab.features as F
from saelab.cli import main
from saelab.config import IndexConfig
from saelab.errors import UserError
from saelab.feature_index import FeatureIndex
from saelab.features import build_index
from saelab.models import load_tokenizer
from saelab.runs import INDEX
from saelab.sae import SparseCoder
from saelab.store import ActivationStore

TPC = 15  # tokens per context: n_ctx 16 minus BOS
CFG = IndexConfig(
    n_tokens=1700,  # ends inside a context: windows there reach rows that were not indexed
    top_contexts=5, intervals=4, interval_samples=2, context_before=4, context_after=2,
    batch_size=256, device="cpu",
)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_harvest, trained_run):
    root = tmp_path_factory.mktemp("feat")
    h = model_harvest(root, hook="blocks.1.hook_resid_post", n_tokens=TPC * 120)
    run = trained_run(root / "r", harvest=h, d_sae=96, k=6, eval_tokens=TPC * 40)
    build_index(run, CFG, progress=False)
    return run


@pytest.fixture(scope="module")
def dense(run):
    """Codes of every harvest row, densified: [n_tokens, d_sae]."""
    cfg = json.loads((run / "cfg.json").read_text())
    store = ActivationStore(cfg["harvest"])
    sae = SparseCoder.load(run)
    out = torch.zeros(store.n_tokens, sae.d_sae)
    with torch.no_grad():
        for a in range(0, store.n_tokens, CFG.batch_size):  # the batches the index used
            b = min(a + CFG.batch_size, store.n_tokens)
            code = sae.encode(store.read(a, b))
            out[a:b].scatter_(1, code.indices, code.values)
    return out.numpy()


@pytest.fixture(scope="module")
def index(run):
    ix = FeatureIndex.of_run(run)
    yield ix
    ix.close()


def _token_ids(run):
    cfg = json.loads((run / "cfg.json").read_text())
    tokens = ActivationStore(cfg["harvest"]).tokens()
    r = np.arange(CFG.n_tokens)
    return np.asarray(tokens[r // TPC, 1 + r % TPC])


def test_meta(index):
    m = index.meta
    assert m["n_tokens"] == CFG.n_tokens and m["rows"] == [0, CFG.n_tokens]
    assert m["top_contexts"] == 5
    assert (m["d_sae"], m["k"], m["arch"], m["model"]) == (96, 6, "topk", "tiny")
    assert m["logit_lens"] is True and m["version"] == F.VERSION and m["built_at"]


def test_statistics_match_brute_force(index, dense):
    acts = dense[: CFG.n_tokens]
    st = index.stats()
    n_fires = (acts > 0).sum(0)
    np.testing.assert_array_equal(st["n_fires"], n_fires)
    np.testing.assert_allclose(st["freq"], n_fires / CFG.n_tokens)
    np.testing.assert_allclose(st["max_act"], acts.max(0), rtol=1e-6)
    mean = acts.sum(0) / np.maximum(n_fires, 1)
    np.testing.assert_allclose(st["mean_act"], mean, rtol=1e-5)
    for i in range(acts.shape[1]):
        card = index.latent(i)
        assert sum(card.hist_counts) + card.n_zero == CFG.n_tokens
        assert card.n_fires == n_fires[i] and card.freq == st["freq"][i]
        if card.n_fires:
            fired = acts[:, i][acts[:, i] > 0]
            assert card.hist_edges[0] == 0 and card.hist_edges[-1] >= fired.max()
            assert card.hist_counts[-1] > 0  # empty bins above the maximum are trimmed
            want, _ = np.histogram(fired, bins=np.array(card.hist_edges))
            np.testing.assert_array_equal(card.hist_counts, want)


def _window_acts(dense, c, latent):
    """The latent's activation over a context's window, from the dense codes."""
    ctx, pos = c.row // TPC, 1 + c.row % TPC
    positions = range(pos - c.peak, pos - c.peak + len(c.tokens))
    return [0.0 if p == 0 else dense[ctx * TPC + p - 1, latent] for p in positions]


def test_top_contexts_match_brute_force(index, dense):
    acts = dense[: CFG.n_tokens]
    tok = load_tokenizer("tiny")
    seen_outside = dropped = repeated = 0
    store = ActivationStore(index.meta["harvest"])
    for i in range(acts.shape[1]):
        cand = np.argsort(-acts[:, i], kind="stable")[: 2 * CFG.top_contexts]
        cand = cand[acts[cand, i] > 0]
        kept: list[int] = []  # greedily, skipping peaks whose windows overlap a kept one's
        reach = CFG.context_before + CFG.context_after
        for r in cand.tolist():
            if all(r // TPC != s // TPC or abs(r - s) > reach for s in kept):
                kept.append(r)
        texts: list[list[int]] = []  # then those repeating a kept window's text
        distinct = []
        for r in kept:
            ids = store.context(r, 4, 2)[0].tolist()
            if ids not in texts:
                texts.append(ids)
                distinct.append(r)
        repeated += len(distinct) < len(kept)
        order = np.array(distinct[: CFG.top_contexts], np.int64)
        dropped += len(kept) < len(cand)
        got = index.contexts(i, "top")
        assert [c.row for c in got] == order.tolist()
        np.testing.assert_allclose([c.act for c in got], acts[order, i], rtol=1e-6)
        for rank, c in enumerate(got):
            assert (c.latent, c.kind, c.rank) == (i, "top", rank)
            assert c.acts[c.peak] == pytest.approx(c.act)
            np.testing.assert_allclose(c.acts, _window_acts(dense, c, i), rtol=1e-4, atol=1e-5)
            ctx, pos = c.row // TPC, 1 + c.row % TPC
            ids = store.context(c.row, 4, 2)[0]
            assert c.tokens == [tok.decode([t]) for t in ids]
            assert c.peak == min(pos, 4) and len(c.tokens) == min(16, pos + 3) - pos + c.peak
            seen_outside += ctx * TPC + min(pos + 2, TPC) - 1 >= CFG.n_tokens
    assert seen_outside  # some window reached past the indexed rows (re-encoded there)
    assert dropped  # the fixture has overlapping candidates, so de-duplication was exercised
    assert repeated  # and candidates repeating a text (the tiny corpus repeats sentences)


def test_interval_groups_count_every_firing_and_sample_inside(index, dense):
    acts = dense[: CFG.n_tokens]
    n_examples = 0
    for i in range(acts.shape[1]):
        card = index.latent(i)
        fired = acts[:, i][acts[:, i] > 0].astype(np.float64)
        if not fired.size:
            assert card.intervals == [] and index.contexts(i, "interval") == []
            continue
        assert len(card.intervals) == CFG.intervals
        assert sum(n for _, _, n in card.intervals) == card.n_fires == fired.size
        lo, hi = card.intervals[0][0], card.intervals[-1][1]
        assert lo == pytest.approx(fired.min(), rel=1e-6) and hi == pytest.approx(fired.max())
        width = (hi - lo) / CFG.intervals
        g = np.clip(np.floor((fired - lo) / width), 0, CFG.intervals - 1) if width else 0 * fired
        want = np.bincount(g.astype(int), minlength=CFG.intervals)
        np.testing.assert_array_equal([n for _, _, n in card.intervals], want)
        shown = index.contexts(i, "interval")
        assert [c.rank for c in shown] == list(range(len(shown)))
        assert [(-c.group, -c.act) for c in shown] == sorted((-c.group, -c.act) for c in shown)
        for j, (a, b, n) in enumerate(card.intervals):
            inside = [c for c in shown if c.group == j]
            assert len(inside) <= CFG.interval_samples and (n == 0) <= (not inside)
            for c in inside:
                assert a - 1e-5 <= c.act <= b + 1e-5 and c.act == pytest.approx(acts[c.row, i])
                assert c.acts[c.peak] == pytest.approx(c.act)
        every = [tuple(c.tokens) for c in index.contexts(i) + shown]
        assert len(set(every)) == len(every)  # no window text shown twice for a latent
        n_examples += len(shown)
    assert n_examples > acts.shape[1]


def test_label_names_the_most_frequent_tokens(index, dense, run):
    ids = _token_ids(run)
    tok = load_tokenizer("tiny")
    fires = dense[: CFG.n_tokens] > 0
    for i in range(0, fires.shape[1], 5):
        card = index.latent(i)
        if not card.n_fires:
            assert card.label() == "never fired"
            continue
        counts = np.bincount(ids[fires[:, i]])
        want = sorted(np.nonzero(counts)[0].tolist(), key=lambda t: (-counts[t], t))[:5]
        assert card.top_tokens == [(tok.decode([t]), int(counts[t])) for t in want]
        label = card.label()
        assert label.startswith(f"fires on '{want and tok.decode([want[0]])}'")
        assert f"promotes '{card.logit_top[0][0]}'" in label
    assert index.labels([3, 3, 1]) == {3: index.latent(3).label(), 1: index.latent(1).label()}


def test_whole_context_is_the_harvest_context_with_its_activations(index, dense, run):
    tok = load_tokenizer("tiny")
    store = ActivationStore(index.meta["harvest"])
    for c in index.contexts(7)[:2] + index.contexts(7, "interval")[:1]:
        tokens, acts, peak = F.whole_context(run, c.row, 7)
        ctx = c.row // TPC
        assert tokens == [tok.decode([int(t)]) for t in store.tokens()[ctx]]
        want = [0.0, *dense[ctx * TPC : (ctx + 1) * TPC, 7]]
        np.testing.assert_allclose(acts, want, rtol=1e-5, atol=1e-6)
        assert peak == 1 + c.row % TPC and acts[peak] == pytest.approx(c.act, rel=1e-5)
        assert tokens[peak - c.peak : peak - c.peak + len(c.tokens)] == c.tokens
    with pytest.raises(UserError, match="out of range"):
        F.whole_context(run, 0, 96)
    with pytest.raises(UserError, match="harvest row"):
        F.whole_context(run, 10**9, 0)


def test_neighbours_match_brute_force(index, run):
    W = SparseCoder.load(run).W_dec.detach()
    W = W / W.norm(dim=1, keepdim=True)
    cos = (W @ W.T).fill_diagonal_(-2).numpy()
    for i in range(0, cos.shape[0], 7):
        got = index.latent(i).neighbours
        want = np.argsort(-cos[i], kind="stable")[:10]
        assert [j for j, _ in got] == want.tolist()
        np.testing.assert_allclose([c for _, c in got], cos[i, want], rtol=1e-5, atol=1e-6)


def test_logit_lens_is_decoder_through_unembedding(index, run):
    from saelab.models import load_model

    model = load_model("tiny")
    sae = SparseCoder.load(run)
    ln = model.ln_final._original_component
    d = sae.W_dec[3].detach() / sae.input_scale
    logits = (d - d.mean()) @ (ln.weight[:, None] * model.W_U)
    card = index.latent(3)
    tok = load_tokenizer("tiny")
    assert card.logit_top[0][0] == tok.decode([int(logits.argmax())])
    assert card.logit_top[0][1] == pytest.approx(float(logits.max()), rel=1e-4)
    assert card.logit_bottom[0][1] == pytest.approx(float(logits.min()), rel=1e-4)
    assert len(card.logit_top) == len(card.logit_bottom) == 10


def test_search_token_ranks_latents_by_f1_as_brute_force(index, dense, run):
    ids = _token_ids(run)
    tok = load_tokenizer("tiny")
    common = np.bincount(ids).argmax()
    word = tok.decode([int(common)]).strip()
    forms = {word, " " + word, "Ġ" + word}
    same = [
        t for t in np.unique(ids).tolist()
        if {tok.decode([t]), tok.convert_ids_to_tokens(t)} & forms
    ]  # fmt: skip
    rows = np.isin(ids, same)
    fires = dense[: CFG.n_tokens] > 0
    counts = fires[rows].sum(0)
    f1 = 2 * counts / (fires.sum(0) + rows.sum())
    hits = index.search_token(word)
    best = int(np.argmax(f1))
    assert hits[0].latent == best and hits[0].f1 == pytest.approx(f1[best])
    assert hits[0].count == counts[best]
    fired = dense[: CFG.n_tokens][rows, best]
    assert hits[0].mean_act == pytest.approx(fired[fired > 0].mean(), rel=1e-5)
    assert [h.f1 for h in hits] == sorted((h.f1 for h in hits), reverse=True)
    assert hits[0].f1 > 0
    assert index.search_token("no-such-token-anywhere") == []
    assert index.search_text(word)[0].latent == hits[0].latent
    assert index.search_text(f"{word} {word} and")  # several tokens aggregate


def test_queries_smoke(index):
    """Every query the app makes, on each latent; latency is measured in bench/index.py."""
    st = index.stats()
    assert set(st) == {"freq", "mean_act", "max_act", "n_fires"} and len(st["freq"]) == 96
    for i in range(96):
        index.latent(i)
        index.contexts(i)
        index.contexts(i, "interval")
    with pytest.raises(UserError, match="out of range"):
        index.latent(96)
    with pytest.raises(UserError, match="out of range"):
        index.contexts(-1)
    with pytest.raises(UserError, match="kind"):
        index.contexts(0, "bottom")


def _dump(path):
    con = sqlite3.connect(path)
    try:
        return [ln for ln in con.iterdump() if "built_at" not in ln]
    finally:
        con.close()


def test_rebuild_is_idempotent(run):
    before = _dump(run / INDEX)
    build_index(run, CFG, progress=False)
    assert _dump(run / INDEX) == before
    assert not list(run.glob("*.tmp")) and not list(run.glob(".index-*"))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_failed_build_leaves_the_index_intact(run, monkeypatch):
    good = _sha(run / INDEX)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(F, "_vocab", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(run, CFG, progress=False)
    assert _sha(run / INDEX) == good and not list(run.glob(".index-*"))


def test_missing_incomplete_or_corrupt_index(run, tmp_path):
    with pytest.raises(UserError, match="saelab index"):
        FeatureIndex(tmp_path / INDEX)
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(UserError, match="damaged.*saelab index"):
        FeatureIndex(bad)
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes((run / INDEX).read_bytes()[:4096])
    with pytest.raises(UserError, match="saelab index"):
        FeatureIndex(cut).latent(0)
    half = tmp_path / "half.sqlite"
    shutil.copy(run / INDEX, half)
    con = sqlite3.connect(half)
    con.execute("DELETE FROM meta WHERE key = 'complete'")
    con.commit()
    con.close()
    with pytest.raises(UserError, match="incomplete"):
        FeatureIndex(half)


def test_cli_bad_runs_exit_2(run, tmp_path, capsys):
    good = _sha(run / INDEX)
    cfg = json.loads((run / "cfg.json").read_text())
    (tmp_path / "empty").mkdir()
    half = tmp_path / "half"
    half.mkdir()
    (half / "cfg.json").write_text(json.dumps({**cfg, "complete": False}))
    orphan = tmp_path / "orphan"
    shutil.copytree(run, orphan)
    (orphan / "cfg.json").write_text(json.dumps({**cfg, "harvest": str(tmp_path / "gone")}))
    for bad, msg in [
        (tmp_path / "missing", "not a directory"),
        (tmp_path / "empty", "not a run directory"),
        (half, "not finished training"),
        (orphan, "harvest .* is missing"),
    ]:
        assert main(["index", str(bad), "-q"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err
        assert re.search(msg, err), err
    assert _sha(orphan / INDEX) == good  # the copied index survived the failed build
    assert main(["index", "-q"]) == 2


def test_synthetic_run_skips_the_logit_lens(tmp_path, trained_run):
    run = trained_run(
        tmp_path / "r", harvest={"n_tokens": 3000}, arch="mutual_choice", d_sae=48, k=3,
        eval_tokens=600,
    )  # fmt: skip
    assert main(["index", str(run), "--rows", "heldout", "--top_contexts", "3", "-q"]) == 0
    ix = FeatureIndex.of_run(run)
    assert ix.meta["logit_lens"] is False and "synthetic" in ix.meta["logit_lens_note"]
    lo, hi = json.loads((run / "cfg.json").read_text())["eval_range"]
    assert ix.meta["rows"] == [lo, hi] and ix.meta["n_tokens"] == hi - lo
    card = ix.latent(int(ix.stats()["n_fires"].argmax()))
    assert card.logit_top == [] and sum(card.hist_counts) + card.n_zero == hi - lo
    assert ix.search_token("<0>") and ix.search_text("<0>")
    ix.close()
