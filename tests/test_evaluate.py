"""Evaluation on held-out rows: numbers match a direct computation, files and errors."""

import json

import pytest
import torch

from saelab.cli import main
from saelab.config import EvalConfig
from saelab.errors import UserError
from saelab.evaluate import evaluate
from saelab.metrics import fvu
from saelab.sae import SparseCoder
from saelab.store import ActivationStore


@pytest.fixture(scope="module")
def run(tmp_path_factory, trained_run):
    root = tmp_path_factory.mktemp("e")
    return trained_run(root / "r", harvest={"n_tokens": 12_000}, d_sae=64, k=3, eval_tokens=3000)


def test_eval_matches_direct_computation(run):
    res = evaluate(EvalConfig(run=str(run)), progress=False)
    cfg = json.loads((run / "cfg.json").read_text())
    start, stop = cfg["eval_range"]
    assert res["eval_range"] == [start, stop] and res["n_tokens"] == stop - start
    assert cfg["train_range"][1] <= start  # held out: never trained on
    x = ActivationStore(cfg["harvest"]).read(start, stop)
    sae = SparseCoder.load(run)
    with torch.no_grad():
        x_hat = sae(x)
    assert res["fvu"] == pytest.approx(float(fvu(x.double(), x_hat.double())), rel=1e-4)
    assert res["l0"] <= 3 and 0 <= res["dead_frac"] <= 1
    assert json.loads((run / "eval.json").read_text())["fvu"] == res["fvu"]


def test_eval_cli_prints_table(run, capsys):
    assert main(["eval", str(run), "--n_tokens", "500"]) == 0
    out = capsys.readouterr().out
    assert "FVU" in out and "topk" in out
    assert json.loads((run / "eval.json").read_text())["n_tokens"] == 500


def test_eval_errors(tmp_path, run, capsys):
    with pytest.raises(UserError, match="not a run directory"):
        evaluate(EvalConfig(run=str(tmp_path)))
    cfg = json.loads((run / "cfg.json").read_text())
    half = tmp_path / "half"
    half.mkdir()
    (half / "cfg.json").write_text(json.dumps({**cfg, "complete": False}))
    with pytest.raises(UserError, match="has not finished training"):
        evaluate(EvalConfig(run=str(half)))
    assert main(["eval"]) == 2
    assert "no run given" in capsys.readouterr().err


def test_downstream_skipped_without_a_model(run, caplog):
    caplog.set_level("INFO")
    res = evaluate(EvalConfig(run=str(run), n_tokens=300), progress=False)
    assert "skipped" in res["downstream"] and "delta_ce" not in res
    assert "downstream metrics skipped" in caplog.text
