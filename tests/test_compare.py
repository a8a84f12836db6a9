"""A sweep of every architecture in one pass, then `saelab compare` over it."""

import json

import pytest
import yaml

from saelab.archs import TRAINABLE
from saelab.cli import main
from saelab.store import ActivationStore


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, synthetic_harvest):
    root = tmp_path_factory.mktemp("sweep")
    h = synthetic_harvest(root / "h", n_tokens=20_000, grads=True)
    preset = root / "all.yaml"
    preset.write_text(
        yaml.safe_dump(
            {
                "harvest": str(h),
                "out": str(root / "runs"),
                "batch_size": 512,
                "eval_tokens": 2000,
                "dead_tokens": 4000,
                "checkpoint_every": 0,
                "n_tokens": 30_000,
                "sweep": [{"arch": a, "d_sae": 64, "k": 3} for a in sorted(TRAINABLE)],
            }
        )
    )
    assert main(["train", "--config", str(preset), "-q"]) == 0
    return root


def test_sweep_trains_every_arch_on_one_read(sweep, monkeypatch):
    runs = sorted(p.name for p in (sweep / "runs").iterdir())
    assert runs == sorted(f"{a}-64-k3" for a in TRAINABLE)
    for name in runs:
        cfg = json.loads((sweep / "runs" / name / "cfg.json").read_text())
        log = (sweep / "runs" / name / "train_log.jsonl").read_text().splitlines()
        assert cfg["complete"] and json.loads(log[-1])["step"] == 30_000 // 512


def test_sweep_reads_the_store_once(tmp_path, monkeypatch, synthetic_harvest):
    h = synthetic_harvest(
        tmp_path / "h", d_in=8, n_features=16, k_true=2, n_tokens=3000,
        tokens_per_context=15, shard_contexts=16,
    )  # fmt: skip
    calls = []
    real = ActivationStore.batches
    monkeypatch.setattr(
        ActivationStore, "batches", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    preset = tmp_path / "s.yaml"
    preset.write_text(
        yaml.safe_dump(
            {
                "harvest": str(h),
                "out": str(tmp_path / "r"),
                "batch_size": 128,
                "eval_tokens": 300,
                "checkpoint_every": 0,
                "sweep": [
                    {"arch": "topk", "d_sae": 32, "k": 2},
                    {"arch": "topk", "d_sae": 16, "k": 4},
                ],
            }
        )
    )
    assert main(["train", "--config", str(preset), "-q"]) == 0
    assert len(calls) == 1
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"topk-32-k2", "topk-16-k4"}


def test_compare_writes_table_and_figure(sweep, capsys, html_figure):
    out = sweep / "cmp"
    assert main(["compare", str(sweep / "runs"), "--out", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    for arch in TRAINABLE:
        assert arch in text
    rows = json.loads((out / "compare.json").read_text())
    modes = {(r["arch"], r["mode"]) for r in rows}
    assert ("feature_choice", "batch") in modes and ("mutual_choice", "batch") in modes
    assert ("gradient_topk", "with_grad") in modes and ("matching_pursuit", "adaptive") in modes
    assert (out / "frontier.html").stat().st_size > 10_000
    for r in rows:
        assert 0 <= r["fvu"] < 1.5 and r["l0"] >= 0
    # The HTML draws each run's inference-mode numbers: per panel, one trace per arch.
    traces = html_figure(out / "frontier.html")["data"]
    primary = [r for r in rows if r["mode"] == "inference"]
    panels = {"x": "l0", "x2": "dead_frac", "x3": "below_1e-5_frac"}  # no ΔCE: synthetic
    assert sorted((t["xaxis"], t["name"]) for t in traces) == sorted(
        (axis, a) for axis in panels for a in TRAINABLE
    )
    for t in traces:
        mine = [r for r in primary if r["arch"] == t["name"]]
        assert list(t["text"]) == [r["name"] for r in mine] and len(mine) == 1
        assert list(t["x"]) == pytest.approx([r[panels[t["xaxis"]]] for r in mine])
        assert list(t["y"]) == pytest.approx([r["fvu"] for r in mine])


def test_frontier_figure_plots_the_rows():
    from saelab.viz import frontier_figure

    rows = [
        {"name": "a", "arch": "topk", "l0": 3.0, "fvu": 0.2, "dead_frac": 0.1,
         "below_1e-5_frac": 0.3, "delta_ce": 0.5},
        {"name": "b", "arch": "topk", "l0": 6.0, "fvu": 0.1, "dead_frac": 0.0,
         "below_1e-5_frac": 0.2, "delta_ce": None},
        {"name": "c", "arch": "mutual_choice", "l0": 4.0, "fvu": 0.15, "dead_frac": 0.05,
         "below_1e-5_frac": None, "delta_ce": 0.4},
    ]  # fmt: skip
    fig = frontier_figure(rows)
    keys = ["l0", "dead_frac", "below_1e-5_frac", "delta_ce"]  # ΔCE measured for some
    assert len(fig.data) == 2 * len(keys)
    for t in fig.data:
        col = 1 if t.xaxis == "x" else int(t.xaxis[1:])
        key = keys[col - 1]
        mine = [r for r in rows if r["arch"] == t.name and r[key] is not None]
        assert list(t.x) == [r[key] for r in mine] and list(t.y) == [r["fvu"] for r in mine]
        assert list(t.text) == [r["name"] for r in mine] and t.showlegend == (col == 1)


def test_feature_choice_threshold_mode_l0_near_k(sweep):
    ev = json.loads((sweep / "runs" / "feature_choice-64-k3" / "eval.json").read_text())
    assert ev["modes"]["batch"]["l0"] == pytest.approx(3, rel=0.35)
    assert ev["l0"] == pytest.approx(3, rel=0.35)
