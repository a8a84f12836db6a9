"""Dark matter: the streamed fits on constructed errors with known answers, gradient pursuit,
held-out discipline, the files the app reads, --scaling, and refusals of bad input."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import saelab.darkmatter as D
import saelab.fitting as FIT
from saelab import runs
from saelab.cli import main
from saelab.config import DarkMatterConfig
from saelab.errors import UserError
from saelab.sae import SparseCoder
from saelab.store import ActivationStore

D_IN = 16


# ---------------------------------------------------------------------------------------
# The fitting functions on constructed x and e


def _x(n, d=D_IN, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def test_streamed_fit_equals_one_shot_least_squares():
    x, y = _x(600), _x(600, 5, seed=1)
    fit = FIT.LinearFit()
    for lo in range(0, 600, 128):
        fit.update(x[lo : lo + 128], y[lo : lo + 128])
    want = torch.linalg.lstsq(FIT.affine(x), y.double()).solution
    torch.testing.assert_close(fit.solve(ridge=0.0), want, atol=1e-8, rtol=1e-8)
    assert fit.n == 600


def _fit_and_score(x_fit, e_fit, x_ev, e_ev):
    fit = FIT.LinearFit()
    fit.update(x_fit, e_fit)
    w = fit.solve()
    r2 = FIT.R2()
    for lo in range(0, len(x_ev), 100):  # streamed in batches, as the eval pass does
        r2.update(e_ev[lo : lo + 100], FIT.predict(w, x_ev[lo : lo + 100]))
    return w, r2.value


def test_linear_error_is_fully_predicted():
    A, c = _x(D_IN, seed=2), torch.randn(D_IN)
    x_fit, x_ev = _x(2000, seed=3), _x(1000, seed=4)
    w, r2 = _fit_and_score(x_fit, x_fit @ A + c, x_ev, x_ev @ A + c)
    assert r2 == pytest.approx(1.0, abs=1e-9)
    e_nl = (x_ev @ A + c).double() - FIT.predict(w, x_ev)
    assert float(e_nl.norm()) < 1e-5 * float((x_ev @ A).norm())  # float32 targets


def test_noise_error_is_not_predicted():
    x_fit, x_ev = _x(4000, seed=5), _x(4000, seed=6)
    e_fit, e_ev = torch.randn(4000, D_IN), torch.randn(4000, D_IN)
    _, r2 = _fit_and_score(x_fit, e_fit, x_ev, e_ev)
    assert abs(r2) < 0.02


def test_norm_can_be_linear_while_the_direction_is_not():
    """The paper's finding in miniature: ‖e‖² linear in x, e's direction random."""
    x = _x(6000, seed=7)
    b = torch.rand(D_IN) * 0.1
    norm_sq = x @ b + 3.0  # > 0 for these x
    u = torch.randn(6000, D_IN)
    e = u / u.norm(dim=1, keepdim=True) * norm_sq.clamp_min(0).sqrt()[:, None]
    y = torch.cat([e, e.pow(2).sum(1, keepdim=True)], 1)
    w, _ = _fit_and_score(x[:3000], y[:3000], x[3000:], y[3000:])
    r2_e, r2_sq = FIT.R2(), FIT.R2()
    pred = FIT.predict(w, x[3000:])
    r2_e.update(e[3000:], pred[:, :D_IN])
    r2_sq.update(y[3000:, D_IN:], pred[:, D_IN:])
    assert abs(r2_e.value) < 0.02 and r2_sq.value > 0.99


def test_r2_regression():
    a = np.linspace(0, 1, 200)
    assert FIT.r2_regression(3 * a + 1, a) == pytest.approx(1.0)
    noise = np.random.default_rng(0).normal(size=200)
    assert FIT.r2_regression(noise, a) < 0.05
    assert FIT.r2_regression(a + noise, a, noise) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------
# Gradient pursuit


def test_greedy_pursuit_recovers_a_sparse_sum():
    sae = SparseCoder(8, 16, 2)
    eye = torch.eye(8)
    pairs = (eye + eye.roll(1, 1)) / 2**0.5
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, pairs]))
        sae.W_enc.copy_(sae.W_dec)
    x = 3 * eye[0] + 2 * eye[4]
    got = FIT.gradient_pursuit(sae, x[None], steps=5, greedy=True)
    torch.testing.assert_close(got[0], x, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory, synthetic_harvest, trained_run):
    """Two trained TopK SAEs of different widths on one synthetic harvest."""
    root = tmp_path_factory.mktemp("dm")
    h = synthetic_harvest(root / "h", d_in=D_IN, n_tokens=9_000)
    return [
        trained_run(root / f"r{width}", harvest=h, d_sae=width, k=3, eval_tokens=3000)
        for width in (32, 64)
    ]


@pytest.mark.parametrize("greedy", [False, True])
def test_pursuit_never_worse_than_the_sae(synth, greedy):
    sae = SparseCoder.load(synth[0])
    x = ActivationStore(json.loads((synth[0] / "cfg.json").read_text())["harvest"]).read(0, 500)
    with torch.no_grad():
        err_sae = (x - sae(x)).pow(2).sum(1)
    err_gp = (x - FIT.gradient_pursuit(sae, x, steps=10, greedy=greedy)).pow(2).sum(1)
    if not greedy:  # refining the SAE's own support only ever lowers the error
        assert (err_gp <= err_sae * (1 + 1e-5) + 1e-6).all()
    assert err_gp.mean() < err_sae.mean()


# ---------------------------------------------------------------------------------------
# The pipeline on a stand-in SAE whose error is known


class FixedError(nn.Module):
    """A stand-in "SAE" with x − x̂ = err(x)."""

    def __init__(self, err):
        super().__init__()
        self.err, self.d_in, self.d_sae, self.k, self.arch = err, D_IN, 1, 1, "stand-in"

    def forward(self, x):
        return x - self.err(x)


def _subject(run, sae, cfg):
    s = D.prepare(run, cfg)
    return dataclasses.replace(s, sae=sae)


def test_exactly_linear_error_leaves_no_nonlinear_part(synth):
    A = _x(D_IN, seed=8) * 0.1
    cfg = DarkMatterConfig(pursuit="none", batch_size=500)
    s = _subject(synth[0], FixedError(lambda x: x @ A + 0.3), cfg)
    res, tokens = D.eval_pass(s, D.fit_pass(s, cfg), cfg)
    assert res["r2_e"] == pytest.approx(1.0, abs=1e-6)
    assert res["fvu_nonlinear"] < 1e-8 * res["fvu"] and res["nonlinear_share"] < 1e-8
    assert np.all(tokens["e_nl_norm"] < 1e-5 * tokens["e_norm"].mean())


def test_noise_error_is_all_nonlinear(synth):
    def scrambled(x):  # deterministic in x, but no linear trace of it
        return torch.sin(1e3 * x @ _x(D_IN, seed=9))

    cfg = DarkMatterConfig(pursuit="none", batch_size=500)
    s = _subject(synth[0], FixedError(scrambled), cfg)
    res, _ = D.eval_pass(s, D.fit_pass(s, cfg), cfg)
    assert abs(res["r2_e"]) < 0.05 and res["nonlinear_share"] > 0.95


# ---------------------------------------------------------------------------------------
# The command


def test_fit_and_eval_rows_are_disjoint_held_out(synth, monkeypatch):
    run = synth[0]
    cfg = json.loads((run / "cfg.json").read_text())
    reads = {"fit": [], "eval": []}
    phase = ["eval"]
    real_read, real_fit = ActivationStore.read, D.fit_pass

    def read(self, start, stop, kind="acts", **kw):
        reads[phase[0]].append((start, stop))
        return real_read(self, start, stop, kind, **kw)

    def fit_pass(s, c):
        phase[0] = "fit"
        try:
            return real_fit(s, c)
        finally:
            phase[0] = "eval"

    monkeypatch.setattr(ActivationStore, "read", read)
    monkeypatch.setattr(D, "fit_pass", fit_pass)
    assert main(["darkmatter", str(run), "--figures", "false", "-q"]) == 0
    res = json.loads((run / runs.DARKMATTER).read_text())
    (f0, f1), (e0, e1) = res["fit_rows"], res["eval_rows"]
    start, stop = cfg["eval_range"]
    assert cfg["train_range"][1] <= start <= f0 < f1 <= e0 < e1 <= stop
    assert all(f0 <= a < b <= f1 for a, b in reads["fit"]) and reads["fit"]
    assert all(e0 <= a < b <= e1 for a, b in reads["eval"]) and reads["eval"]
    assert res["n_fit"] == (stop - start) // 2 and e1 == stop  # defaults: half each
    assert 0 <= res["r2_e"] <= 1 and res["pursuit"]["fvu"] < res["fvu"]
    assert "ce" not in res or "skipped" in res["ce"]  # synthetic: no model to splice into
    top = res["top_nonlinear"]
    assert len({t["context"] for t in top}) == len(top) and "text" not in top[0]
    table = runs.read_token_table(run / runs.DARKMATTER_TOKENS)
    assert table["row"].tolist() == list(range(e0, e1))
    i = int(np.argmax(table["e_nl_norm"]))
    assert (table["context"][i], table["position"][i]) == ActivationStore(cfg["harvest"]).locate(
        int(table["row"][i])
    )
    assert top[0]["e_nl_norm"] == pytest.approx(table["e_nl_norm"][i])


def test_figures_are_written(synth, monkeypatch, html_figure):
    import plotly.io as pio

    def no_browser(*a, **k):
        raise RuntimeError("no browser in this test")

    monkeypatch.setattr(pio, "write_images", no_browser)
    assert main(["darkmatter", str(synth[1]), "--score_tokens", "1000", "-q"]) == 0
    figures = synth[1] / "figures"
    names = {p.name for p in figures.iterdir()}
    assert {"darkmatter_norms.html", "darkmatter_norm_sq.html", "darkmatter_split.html"} <= names
    res = json.loads((synth[1] / runs.DARKMATTER).read_text())
    assert res["n_eval"] == 1000
    table = runs.read_token_table(synth[1] / runs.DARKMATTER_TOKENS)
    assert len(table["row"]) == 1000

    # Histograms of the table's three per-token norms on shared bins up to the largest.
    norms = {"‖e‖": "e_norm", "‖e_lin‖": "e_lin_norm", "‖e_nl‖": "e_nl_norm"}
    traces = html_figure(figures / "darkmatter_norms.html")["data"]
    assert [t["name"] for t in traces] == list(norms)
    hi = max(float(table[c].max()) for c in norms.values())
    for t in traces:
        mids, counts = np.asarray(t["x"]), np.asarray(t["y"])
        width = mids[1] - mids[0]
        assert counts.sum() == 1000 and mids[-1] + width / 2 == pytest.approx(hi)
        mean = float((mids * counts).sum() / 1000)
        assert abs(mean - table[norms[t["name"]]].mean()) <= width / 2 + 1e-9
    assert 0 < table["e_nl_norm"].mean() < table["e_norm"].mean()

    # ‖e‖² against its prediction, token by token (1000 tokens: no subsampling).
    fig = html_figure(figures / "darkmatter_norm_sq.html")
    points = fig["data"][0]
    np.testing.assert_allclose(np.asarray(points["x"]), table["e_norm"] ** 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(points["y"]), table["e_sq_pred"], rtol=1e-6)
    assert f"{res['r2_e_norm_sq']:.3f}" in fig["layout"]["title"]["text"]

    # The split: linear and nonlinear FVU of the SAE and of gradient pursuit.
    bars = {t["name"]: t for t in html_figure(figures / "darkmatter_split.html")["data"]}
    gp = res["pursuit"]
    for name, key in [("linear", "fvu_linear"), ("nonlinear", "fvu_nonlinear"), ("total", "fvu")]:
        (t,) = [t for n, t in bars.items() if n.startswith(name)]
        assert list(t["x"]) == ["SAE", "gradient pursuit"]
        assert list(t["y"]) == pytest.approx([res[key], gp[key]])


def test_scaling_matrix(synth, monkeypatch, html_figure):
    monkeypatch.setattr("plotly.io.write_images", lambda *a, **k: None)
    argv = ["darkmatter", "--scaling", str(synth[1]), str(synth[0]), "-q"]
    assert main(argv) == 0
    out = synth[0].parent / runs.SCALING
    res = json.loads((out / "scaling.json").read_text())
    assert [r["d_sae"] for r in res["runs"]] == [32, 64]  # ordered by width
    r2, r2_nl = np.array(res["r2_norm"]), np.array(res["r2_norm_with_nonlinear"])
    assert r2.shape == (2, 2) and np.allclose(np.diag(r2), 1.0)
    assert (r2_nl >= r2 - 1e-9).all() and (r2 <= 1 + 1e-9).all()
    heat = html_figure(out / "scaling_r2.html")["data"]
    assert [t["type"] for t in heat] == ["heatmap", "heatmap"]
    for t, want in zip(heat, (r2, r2_nl)):
        assert list(t["x"]) == list(t["y"]) == res["names"]
        np.testing.assert_allclose(np.asarray(t["z"], dtype=float), want)
    bars = html_figure(out / "scaling_split.html")["data"]
    assert [list(t["x"]) for t in bars] == [res["names"]] * 3
    for t, key in zip(bars, ("fvu", "fvu_linear", "fvu_nonlinear")):  # total first
        assert list(t["y"]) == pytest.approx([r[key] for r in res["runs"]])


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_bad_input_returns_2_and_writes_nothing(synth, tmp_path, capsys, synthetic_harvest):
    runs = tmp_path / "runs"
    shutil.copytree(synth[0], runs / "a", ignore=shutil.ignore_patterns("darkmatter*", "fig*"))
    cfg = json.loads((runs / "a/cfg.json").read_text())
    (runs / "half").mkdir()
    (runs / "half/cfg.json").write_text(json.dumps({**cfg, "complete": False}))
    other = synthetic_harvest(
        tmp_path / "h2", d_in=D_IN, n_features=8, k_true=32.0, n_tokens=3_100,
        tokens_per_context=127, shard_contexts=256,
    )  # fmt: skip
    shutil.copytree(runs / "a", runs / "b")
    (runs / "b/cfg.json").write_text(json.dumps({**cfg, "harvest": str(other)}))
    before = _files(tmp_path)
    a = str(runs / "a")
    cases = {
        # A valid run first: nothing is written for it either when a later one is bad.
        "not a run": [a, str(tmp_path / "nowhere")],
        "not finished": [a, str(runs / "half")],
        "held-out tokens": [a, "--fit_tokens", "2000", "--score_tokens", "2000"],
        "one harvest": ["--scaling", a, str(runs / "b")],
        "two or more": ["--scaling", a],
    }
    for msg, argv in cases.items():
        assert main(["darkmatter", *argv]) == 2
        assert msg in capsys.readouterr().err
    assert _files(tmp_path) == before
    with pytest.raises(UserError, match="must not be negative"):
        DarkMatterConfig(ridge=-1.0)


# ---------------------------------------------------------------------------------------
# The three-way CE splice on the tiny model


def test_three_way_ce_on_the_tiny_model(tmp_path, model_harvest, trained_run):
    h = model_harvest(tmp_path, n_tokens=15 * 120)
    run = trained_run(tmp_path / "r", harvest=h, d_sae=128, k=8, eval_tokens=15 * 60)
    cfg = DarkMatterConfig(ce_contexts=3, top_contexts=2, pursuit_steps=3)
    res, _ = D.analyse(D.prepare(run, cfg), cfg)
    ce = res["ce"]
    assert set(ce["variants"]) == {"sae", "sae+e_lin", "sae+e_nl"}
    assert ce["n_contexts"] == 3 and ce["positions"] == [1, 14]
    e0, e1 = res["eval_rows"]
    assert all(e0 <= c * 15 and (c + 1) * 15 <= e1 for c in ce["contexts"])
    assert all(np.isfinite(v["ce"]) for v in ce["variants"].values())
    assert np.isfinite(ce["ce_clean"]) and np.isfinite(ce["ce_ablation"])
    assert "«" in res["top_nonlinear"][0]["text"]  # a real tokenizer: text around the token
