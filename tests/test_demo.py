"""End to end on the embedded model: `saelab demo --quick` harvests, trains, evaluates and
indexes the features for the app."""

import json

import pytest

from saelab.cli import main
from saelab.feature_index import FeatureIndex


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "FVU" in out and "demo-topk-quick" in out
    ev = json.loads((tmp_path / "runs/demo-topk-quick/eval.json").read_text())
    assert ev["fvu"] < 0.5 and ev["l0"] == pytest.approx(32, abs=1)
    index = FeatureIndex.of_run(tmp_path / "runs/demo-topk-quick")
    assert index.meta["d_sae"] == 1024 and index.stats()["freq"].max() > 0
    assert "saelab app runs" in out
    meta = json.loads(
        (tmp_path / "cached_activations/smollm2-135m-demo-quick/meta.json").read_text()
    )
    assert meta["complete"] and meta["d_in"] == 576
    # A second run finds everything done and changes nothing.
    before = (tmp_path / "runs/demo-topk-quick/sae.safetensors").read_bytes()
    assert main(["demo", "--quick"]) == 0
    assert (tmp_path / "runs/demo-topk-quick/sae.safetensors").read_bytes() == before
