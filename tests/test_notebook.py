"""notebooks/steering.ipynb runs end to end (on the tiny model with an SAE built here)."""

from pathlib import Path

import pytest
import torch

from saelab.sae import SparseCoder

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "steering.ipynb"


def test_steering_notebook_runs(tmp_path, monkeypatch):
    sae = SparseCoder(64, 128, 8, "topk", input_scale=0.5)
    sae.reset_parameters(torch.Generator().manual_seed(0))
    # "complete": load_sae refuses runs that have not finished training.
    extra = {"hook": "blocks.1.hook_resid_post", "model": "tiny", "complete": True}
    sae.save(tmp_path / "run", extra)
    # The kernel inherits this process's environment.
    monkeypatch.setenv("SAELAB_NB_RUN", str(tmp_path / "run"))
    monkeypatch.setenv("SAELAB_NB_TOKENS", "3")
    monkeypatch.delenv("SAELAB_NB_MODEL", raising=False)  # taken from the run's cfg.json
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": NOTEBOOK.parent}}
    )
    client.execute()
    text = "\n".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert "topk SAE with 128 latents (k=8) at blocks.1.hook_resid_post" in text
    assert "baseline |" in text and "+10 " in text
    assert "ablated: P(' earth'" in text
