"""`saelab export --format neuronpedia`: every written file against the schema (written from
SAEDashboard v0.8.0's public source), every exported number against the feature index, no
local paths anywhere, and refusals that write nothing and leave an existing export as it was."""

import json
import os
import shutil
import sqlite3
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from saelab import neuronpedia as NP
from saelab.cli import main
from saelab.config import IndexConfig
from saelab.errors import UserError
from saelab.feature_index import FeatureIndex
from saelab.features import build_index
from saelab.runs import INDEX

TPC = 15  # tokens per context: n_ctx 16 minus BOS
D_SAE = 160  # more than one batch file of 128
CFG = IndexConfig(
    n_tokens=1700, top_contexts=5, interval_samples=1, context_before=4,
    context_after=2, batch_size=256, device="cpu",
)  # fmt: skip
SCHEMA = json.loads(NP.SCHEMA.read_text())
FILES = ["batch-0.json", "batch-1.json", "decoder_neighbours.json", "run_settings.json"]
KIND = {"batch-0.json": "batch", "batch-1.json": "batch", "run_settings.json": "run_settings"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_harvest, trained_run):
    root = tmp_path_factory.mktemp("np")
    h = model_harvest(root, hook="blocks.1.hook_resid_post", n_tokens=TPC * 120)
    run = trained_run(root / "r", harvest=h, d_sae=D_SAE, k=6, eval_tokens=TPC * 40)
    build_index(run, CFG, progress=False)
    return run


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("np-out") / "export"
    assert NP.export_neuronpedia(run, out) == out
    return out


@pytest.fixture(scope="module")
def index(run):
    ix = FeatureIndex.of_run(run)
    yield ix
    ix.close()


def _docs(out: Path) -> dict[str, object]:
    return {p.name: json.loads(p.read_text()) for p in sorted(out.iterdir())}


def _features(out: Path) -> list[dict]:
    batches = sorted(out.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [f for p in batches for f in json.loads(p.read_text())["features"]]


def _validate(doc: object, kind: str | None = None) -> None:
    """Against the whole schema (exactly one document kind matches), and its own kind."""
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    if kind:
        only = {**SCHEMA, "oneOf": [{"$ref": f"#/$defs/{kind}"}]}
        jsonschema.Draft202012Validator(only).validate(doc)


def test_schema_is_valid_and_every_file_follows_it(exported):
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    docs = _docs(exported)
    assert sorted(docs) == FILES
    for name, doc in docs.items():
        _validate(doc, KIND.get(name, "decoder_neighbours"))
    assert len(docs["batch-0.json"]["features"]) == NP.FEATURES_PER_BATCH
    assert [f["feature_index"] for f in _features(exported)] == list(range(D_SAE))
    with pytest.raises(jsonschema.ValidationError):  # the schema does reject things
        _validate({**docs["batch-0.json"], "features": [{"feature_index": 0}]})


def test_activations_equal_the_index(exported, index):
    """Every context's tokens, per-token values, peak and group against FeatureIndex."""
    n_top = n_quantile = 0
    for f in _features(exported):
        i = f["feature_index"]
        card = index.latent(i)
        top, quantile = index.contexts(i, "top"), index.contexts(i, "interval")
        assert len(f["activations"]) == len(top) + len(quantile)
        for a, c in zip(f["activations"], top + quantile):
            assert a["tokens"] == c.tokens and len(a["values"]) == len(a["tokens"])
            np.testing.assert_array_equal(np.float32(a["values"]), np.float32(c.acts))
            assert a["qualifying_token_index"] == c.peak
            assert np.float32(a["values"][c.peak]) == np.float32(c.act)
        for a in f["activations"][: len(top)]:
            assert (a["bin_min"], a["bin_contains"]) == (-1, -1)
            assert np.float32(a["bin_max"]) == np.float32(card.max_act)
        for a, c in zip(f["activations"][len(top) :], quantile):
            assert a["bin_min"] <= c.act * (1 + 1e-6) and c.act <= a["bin_max"] * (1 + 1e-6)
            lo, hi, n = card.intervals[c.group]
            assert (a["bin_min"], a["bin_max"]) == (lo, hi)
            assert a["bin_contains"] == n / card.n_fires
        n_top, n_quantile = n_top + len(top), n_quantile + len(quantile)
    assert n_top > D_SAE and n_quantile > D_SAE  # the fixture has both kinds, for most latents


def test_logit_lens_histogram_frequency_and_neighbours_equal_the_index(exported, index):
    feats = _features(exported)
    near = json.loads((exported / NP.NEIGHBOURS).read_text())["features"]
    st = index.stats()
    assert any(f["pos_str"] for f in feats)  # the tiny model has a tokenizer and an unembedding
    for f, nb in zip(feats, near):
        card = index.latent(f["feature_index"])
        assert f["pos_str"] == [t for t, _ in card.logit_top]
        assert f["neg_str"] == [t for t, _ in card.logit_bottom]
        np.testing.assert_array_equal(np.float32(f["pos_values"]), [v for _, v in card.logit_top])
        np.testing.assert_array_equal(
            np.float32(f["neg_values"]), [v for _, v in card.logit_bottom]
        )
        assert f["frac_nonzero"] == card.freq == st["freq"][card.id]
        assert f["freq_hist_data_bar_heights"] == card.hist_counts
        e = card.hist_edges
        assert f["freq_hist_data_bar_values"] == [(a + b) / 2 for a, b in zip(e, e[1:])]
        assert nb["feature_index"] == card.id
        assert nb["topkCosSimIndices"] == [j for j, _ in card.neighbours]
        np.testing.assert_array_equal(
            np.float32(nb["topkCosSimValues"]), [c for _, c in card.neighbours]
        )


def test_metadata(exported, index):
    s = json.loads((exported / NP.RUN_SETTINGS).read_text())
    b = json.loads((exported / "batch-1.json").read_text())
    assert (b["model_id"], b["layer"], b["sae_set"], b["sae_id_suffix"]) == ("tiny", 1, "r", None)
    assert (s["model_id"], s["layer"], s["sae_set"]) == ("tiny", 1, "r")
    assert s["n_tokens_in_prompt"] == 16 and s["n_prompts_total"] == -(-CFG.n_tokens // TPC)
    m = s["saelab"]
    assert (m["hook"], m["d_in"], m["d_sae"], m["arch"], m["k"]) == (
        "blocks.1.hook_resid_post", 64, D_SAE, "topk", 6,
    )  # fmt: skip
    assert m["saedashboard"] == {"release": "v0.8.0", "commit": NP.SAEDASHBOARD["commit"]}
    assert "King James Bible" in m["dataset"] and m["dataset"] == s["huggingface_dataset_path"]
    ix = m["index"]
    assert (ix["n_tokens"], ix["built_at"]) == (CFG.n_tokens, index.meta["built_at"])
    f = b["features"][0]
    assert (f["dataset"], f["n_prompts_total"]) == (m["dataset"], s["n_prompts_total"])


def test_model_and_dataset_names():
    repo, hf, what = NP.model_id("smollm2-135m")
    assert repo == hf == "HuggingFaceTB/SmolLM2-135M-Instruct" and "Q4_1" in what
    assert NP.model_id("EleutherAI/pythia-70m")[:2] == ("EleutherAI/pythia-70m",) * 2
    assert NP.model_id("/srv/models/My-Model")[:2] == ("My-Model", None)
    assert NP.model_id("synthetic")[:2] == ("synthetic", None)
    assert NP.dataset({"spec": "monology/pile-uncopyrighted"}) == "monology/pile-uncopyrighted"
    assert NP.dataset({"spec": "/home/me/texts/notes.jsonl"}) == "local text: notes.jsonl"
    assert NP.dataset({"synthetic": {}}).startswith("synthetic")
    assert NP.dataset(None).startswith("unknown")


def _strings(doc: object):
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict):
        for k, v in doc.items():
            yield k
            yield from _strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings(v)


def _assert_no_paths(out: Path, *paths: Path) -> None:
    places = {str(p) for p in paths} | {str(Path.home()), os.getcwd()}
    for p in out.iterdir():
        text = p.read_text()
        assert not [q for q in places if q in text], p.name
        # A single token may be '/' or '/usr', never a whole path.
        bad = [s for s in _strings(json.loads(text)) if os.path.isabs(s) and len(Path(s).parts) > 2]
        assert not bad, (p.name, bad[:3])


def test_no_absolute_paths(exported, run, tmp_path_factory):
    harvest = json.loads((run / "cfg.json").read_text())["harvest"]
    _assert_no_paths(exported, run.resolve(), Path(harvest), tmp_path_factory.getbasetemp())


def _set_meta(path: Path, **values) -> None:
    con = sqlite3.connect(path)
    con.executemany("UPDATE meta SET value = ? WHERE key = ?",
                    [(json.dumps(v), k) for k, v in values.items()])  # fmt: skip
    con.commit()
    con.close()


def test_local_model_and_corpus_paths_are_not_exported(run, tmp_path):
    """A run of a local model directory on a local corpus file: names only, no paths."""
    cfg = json.loads((run / "cfg.json").read_text())
    h = Path(shutil.copytree(cfg["harvest"], tmp_path / "h"))
    meta = json.loads((h / "meta.json").read_text())
    meta["corpus"]["spec"] = str(tmp_path / "corpora" / "psalms.txt")
    (h / "meta.json").write_text(json.dumps(meta))
    r = Path(shutil.copytree(run, tmp_path / "r2"))
    model = str(tmp_path / "models" / "MyLM-1B")
    (r / "cfg.json").write_text(json.dumps({**cfg, "model": model, "harvest": str(h)}))
    _set_meta(r / INDEX, model=model, harvest=str(h))
    out = NP.export_neuronpedia(r, tmp_path / "out")
    s = json.loads((out / NP.RUN_SETTINGS).read_text())
    assert (s["model_id"], s["hf_model_path"]) == ("MyLM-1B", None)
    assert s["huggingface_dataset_path"] == "local text: psalms.txt"
    _assert_no_paths(out, tmp_path, run.resolve())


def test_missing_or_stale_index_is_refused(run, tmp_path, capsys):
    bare = Path(shutil.copytree(run, tmp_path / "bare", ignore=shutil.ignore_patterns(INDEX)))
    with pytest.raises(UserError, match=r"no feature index .*saelab index .*bare"):
        NP.export_neuronpedia(bare, tmp_path / "out")
    assert main(["export", "--format", "neuronpedia", str(bare), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`saelab index" in err
    stale = Path(shutil.copytree(run, tmp_path / "stale"))
    _set_meta(stale / INDEX, k=7)
    with pytest.raises(UserError, match=r"stale \(index vs run: k 7 vs 6\); run `saelab index"):
        NP.export_neuronpedia(stale, tmp_path / "out")
    _set_meta(stale / INDEX, version=1)  # built by another saelab version
    with pytest.raises(UserError, match="another saelab version; run `saelab index"):
        NP.export_neuronpedia(stale, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_block_hook_is_refused(run, tmp_path):
    r = Path(shutil.copytree(run, tmp_path / "r"))
    cfg = json.loads((r / "cfg.json").read_text())
    (r / "cfg.json").write_text(json.dumps({**cfg, "hook": "hook_embed"}))
    _set_meta(r / INDEX, hook="hook_embed")
    with pytest.raises(UserError, match="hook hook_embed names no layer"):
        NP.export_neuronpedia(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_export_leaves_the_existing_one_untouched(run, tmp_path, monkeypatch):
    out = NP.export_neuronpedia(run, tmp_path / "out")
    before = _snapshot(out)
    real = NP.feature

    def failing(ix, card, common):
        if card.id == D_SAE - 1:  # in the last batch: earlier ones are already written
            raise RuntimeError("disk on fire")
        return real(ix, card, common)

    monkeypatch.setattr(NP, "feature", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        NP.export_neuronpedia(run, out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    monkeypatch.undo()
    (out / "batch-0.json").write_text("{}")
    assert NP.export_neuronpedia(run, out) == out  # an earlier export of this run is replaced
    assert _snapshot(out) == before


def test_foreign_destination_is_refused(run, tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and is not a Neuronpedia export of r;"):
        NP.export_neuronpedia(run, dest)
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        NP.export_neuronpedia(run, tmp_path / "f")
    assert _snapshot(dest) == {"notes.txt": b"mine"} and (tmp_path / "f").read_text() == "x"


def test_cli_formats(run, exported, tmp_path, capsys):
    for fmt in ("neuronpedia", "saedashboard"):  # one layout under two names
        out = tmp_path / fmt
        assert main(["export", "--format", fmt, str(run), str(out), "-q"]) == 0
        assert _snapshot(out) == _snapshot(exported)  # deterministic, too
    assert main(["export", "--format", "nope", str(run), str(tmp_path / "x")]) == 2
    assert "invalid choice" in capsys.readouterr().err
