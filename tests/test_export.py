"""Exports to SAELens and sparsify, checked against each library's published inference maths
(re-stated here, since CI cannot install either): unit decoder rows, rescaled values and
thresholds that reproduce saelab's codes and reconstructions, the metadata SAELens users
read, no local paths, round trips through saelab's importers, and the refusals."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import saelab
from saelab import UserError, export, interop, steering
from saelab.cli import main
from saelab.sae import SparseCoder

HOOK = "blocks.0.hook_resid_post"
RUN_CFG = {"hook": HOOK, "model": "tiny", "n_ctx": 16, "corpus": {"spec": "default"}}


def make_run(tmp_path, arch, scale, name="run", **cfg):
    g = torch.Generator().manual_seed(2)
    sae = SparseCoder(64, 256, 8, arch, input_scale=scale)
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_enc.copy_(0.05 * torch.randn(256, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(64, generator=g))
        if arch in ("feature_choice", "jumprelu"):
            sae.threshold.copy_(0.3 * torch.rand(256, generator=g))
        if arch == "mutual_choice":
            sae.threshold.fill_(0.2)
    sae.save(tmp_path / name, {**RUN_CFG, **cfg, "complete": True})
    return sae, tmp_path / name


def dense(sae, x):
    code = sae.encode(x)
    return torch.zeros(x.shape[0], sae.d_sae).scatter_add_(1, code.indices, code.values)


def raw_acts(scale):
    # Activations whose scaled norm is about sqrt(d_in), as the SAE saw in training.
    return torch.randn(300, 64, generator=torch.Generator().manual_seed(3)) / scale


def read(dest):
    weights = next(p for p in dest.iterdir() if p.suffix == ".safetensors")
    return json.loads((dest / "cfg.json").read_text()), load_file(weights)


def saelens_encode(dest, x, fold=False):
    """(feature values, reconstruction) as SAELens 6.x computes them from the files
    (sae_lens/saes/topk_sae.py and jumprelu_sae.py; `fold`: SAE.fold_W_dec_norm first)."""
    cfg, w = read(dest)
    W_enc, b_enc, W_dec, b_dec = w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]
    theta, topk = w.get("threshold"), cfg["architecture"] == "topk"
    rescale = topk and cfg["rescale_acts_by_decoder_norm"]
    if fold:
        if topk and not rescale:
            raise NotImplementedError("SAELens refuses to fold a TopK SAE without rescaling")
        n = W_dec.norm(dim=1)
        W_dec, W_enc, b_enc = W_dec / n[:, None], W_enc * n, b_enc * n
        theta = theta * n if theta is not None else None
    pre = (x - b_dec) @ W_enc + b_enc
    if not topk:
        acts = pre * (pre > theta)
        return acts, acts @ W_dec + b_dec
    n = W_dec.norm(dim=1) if rescale else torch.ones(W_dec.shape[0])
    values, indices = (pre * n).topk(cfg["k"], dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    return acts, (acts / n) @ W_dec + b_dec


def sparsify_encode(dest, x):
    """(values, reconstruction) as sparsify 1.x computes them (sparse_coder.py, fused_encoder.py):
    TopK(ReLU(encoder(x − b_dec))), decoded as values·W_dec + b_dec."""
    cfg, w = read(dest)
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    values, indices = pre.topk(cfg["k"], dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, indices, values)
    return acts, acts @ w["W_dec"] + w["b_dec"]


def factor(sae, units):
    """What exported feature values are in saelab's: ‖d_i‖/s per latent with unit rows."""
    return sae.W_dec.detach().norm(dim=1) / sae.input_scale if units == "saelens" else 1.0


SAELENS_ARCH = {
    "topk": "topk",
    "gradient_topk": "topk",
    "feature_choice": "jumprelu",
    "mutual_choice": "jumprelu",
    "jumprelu": "jumprelu",
}


# ---- SAELens ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(SAELENS_ARCH))
@pytest.mark.parametrize("scale", [0.25, 0.3])
@pytest.mark.parametrize("units", ["saelens", "saelab"])
def test_saelens_export_reproduces_codes_in_its_units(tmp_path, arch, scale, units):
    sae, run = make_run(tmp_path, arch, scale)
    dest = export.export_saelens(run, tmp_path / "out", units=units)
    cfg, w = read(dest)
    assert cfg["architecture"] == SAELENS_ARCH[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"]) == (64, 256, "none")
    assert w["W_enc"].shape == (64, 256) and w["W_dec"].shape == (256, 64)
    assert ("threshold" in w) == (cfg["architecture"] == "jumprelu")
    assert cfg.get("k") == (8 if cfg["architecture"] == "topk" else None)
    norms = w["W_dec"].norm(dim=1)
    want_norm = torch.ones(256) if units == "saelens" else torch.full((256,), 1 / scale)
    torch.testing.assert_close(norms, want_norm, rtol=1e-6, atol=1e-6)

    x = raw_acts(scale)
    ours = dense(sae, x)
    assert (ours != 0).any(1).all(), "the test data must make latents fire"
    c = factor(sae, units)
    for fold in (False, True):
        if fold and units == "saelab" and cfg["architecture"] == "topk":
            with pytest.raises(NotImplementedError):  # the trade-off of saelab's units
                saelens_encode(dest, x, fold=True)
            continue
        acts, recon = saelens_encode(dest, x, fold)
        assert torch.equal(acts != 0, ours != 0), "the same latents fire"
        # Folding a saelab-units JumpReLU export moves its values to SAELens's units.
        cf = factor(sae, "saelens") if fold else c
        torch.testing.assert_close(acts, ours * cf, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(recon, sae.forward(x).detach(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", list(SAELENS_ARCH))
@pytest.mark.parametrize("units", ["saelens", "saelab"])
def test_saelens_round_trip_comes_back_as_trained(tmp_path, arch, units):
    sae, run = make_run(tmp_path, arch, 0.25)
    back = interop.load_saelens(export.export_saelens(run, tmp_path / "out", units=units))
    assert (back.arch, back.hook, back.k, back.input_scale) == (arch, HOOK, 8, 0.25)
    x = raw_acts(0.25)
    want, got = dense(sae, x), dense(back, x)
    assert torch.equal(got != 0, want != 0)
    if units == "saelab":  # a power-of-two scale folds in and out without rounding
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(back.forward(x), sae.forward(x).detach(), rtol=1e-5, atol=1e-5)


def test_saelens_metadata_fields(tmp_path):
    _, run = make_run(
        tmp_path,
        "topk",
        0.5,
        model="smollm2-135m",
        hook="blocks.3.hook_out",  # the bridge's own name for the residual stream
        n_ctx=128,
        corpus={"spec": "default", "text_field": "text", "split": "train"},
        harvest_identity={"n_tokens": 300_000, "tokens_sha256": "ab" * 32},
    )
    meta = read(export.export_saelens(run, tmp_path / "out"))[0]["metadata"]
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Q4_1" in meta["model_conversion"] and "dequantized" in meta["model_conversion"]
    assert meta["hook_name"] == "blocks.3.hook_resid_post"  # HookedTransformer resolves it too
    assert (meta["context_size"], meta["prepend_bos"]) == (128, True)
    assert meta["seqpos_slice"] == [1, None]  # the harvest skips BOS
    assert meta["dataset_path"] is None and "Bible" in meta["dataset"]
    assert meta["model_from_pretrained_kwargs"]["center_writing_weights"] is False
    assert meta["saelab"]["hook"] == "blocks.3.hook_out" and meta["saelab"]["units"] == "saelens"
    assert meta["saelab"]["harvest"]["tokens_sha256"] == "ab" * 32
    # saelab's import names the model as saelab.load_model takes it.
    assert interop.load_saelens(tmp_path / "out").model_name == "smollm2-135m"
    _, run = make_run(tmp_path, "topk", 0.5, "hf", corpus={"spec": "roneneldan/TinyStories"})
    meta = read(export.export_saelens(run, tmp_path / "out-hf"))[0]["metadata"]
    assert meta["dataset_path"] == "roneneldan/TinyStories" and "TinyStories" in meta["dataset"]


# HookedTransformer.hook_dict of TransformerLens 3.9 (one block, optional hooks on), minus
# the "blocks.0." prefix; bench/interop.py checks exported names against the real class.
HT_NAMES = {
    "hook_embed", "hook_pos_embed", "ln_final.hook_normalized", "ln_final.hook_scale",
    "unembed.hook_in", "unembed.hook_out", "hook_resid_pre", "hook_resid_mid",
    "hook_resid_post", "hook_attn_in", "hook_attn_out", "hook_mlp_in", "hook_mlp_out",
    "hook_q_input", "hook_k_input", "hook_v_input", "ln1.hook_normalized", "ln1.hook_scale",
    "ln2.hook_normalized", "ln2.hook_scale", "attn.hook_q", "attn.hook_k", "attn.hook_v",
    "attn.hook_z", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_result",
    "mlp.hook_pre", "mlp.hook_post",
}  # fmt: skip


def test_hook_names_resolve_in_the_bridge_and_hookedtransformer():
    from saelab.models import load_model, tl_hook

    hooks = load_model("tiny").hook_dict
    is_ht = lambda name: re.sub(r"^blocks\.\d+\.", "", name) in HT_NAMES  # noqa: E731
    for name, point in hooks.items():
        mapped = tl_hook(name)
        assert hooks[mapped] is point, name  # the bridge resolves the exported name
        if any(is_ht(k) for k, p in hooks.items() if p is point):
            assert is_ht(mapped), (name, mapped)  # and so does HookedTransformer, if it can
    assert tl_hook("blocks.2.attn.o.hook_in") == "blocks.2.attn.hook_z"
    assert tl_hook("blocks.2.hook_mlp_out") == "blocks.2.hook_mlp_out"


def test_trained_run_exports_its_context_without_its_harvest(tmp_path, trained_run):
    import shutil

    run = trained_run(tmp_path / "run", harvest={"n_tokens": 3000}, d_sae=32, k=2, eval_tokens=300)
    shutil.rmtree(tmp_path / "h")
    meta = read(export.export_saelens(run, tmp_path / "out"))[0]["metadata"]
    assert meta["context_size"] == 32 and meta["model_name"] == "synthetic"
    assert meta["dataset"].startswith("synthetic activations")


# ---- no local paths --------------------------------------------------------------------


def strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_no_absolute_paths_in_any_exported_file(tmp_path, synthetic_harvest, fmt):
    from pathlib import Path

    model = tmp_path / "models" / "my-model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"_name_or_path": "org/base-model"}))
    corpus = tmp_path / "texts" / "notes.jsonl"
    h = synthetic_harvest(tmp_path / "harvest", n_tokens=500)
    _, run = make_run(
        tmp_path,
        "topk",
        0.5,
        model=str(model),
        harvest=str(h.resolve()),
        corpus={"spec": str(corpus), "text_field": "text", "split": "train"},
    )
    dest = export.export(run, tmp_path / "out", fmt)
    home = str(Path.home())
    for f in dest.iterdir():
        text = f.read_bytes()[:20_000].decode("utf-8", "replace")
        assert str(tmp_path) not in text and home not in text, f.name
    cfg, _ = read(dest)
    meta = cfg.get("metadata", cfg)
    assert meta["model_name"] == "org/base-model" and "my-model" in meta["model_conversion"]
    assert "notes.jsonl" in meta["dataset"] and meta["dataset_path"] is None
    for s in strings(cfg):
        assert not re.match(r"^(/|~|[A-Za-z]:[\\/])", s), s


# ---- sparsify --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "gradient_topk"])
@pytest.mark.parametrize("scale", [0.25, 0.3])
@pytest.mark.parametrize("units", ["saelens", "saelab"])
def test_sparsify_export_and_round_trip(tmp_path, arch, scale, units):
    sae, run = make_run(tmp_path, arch, scale)
    dest = export.export_sparsify(run, tmp_path / "layers.0", units=units)
    cfg, w = read(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["cfg.json", "sae.safetensors"]
    assert sorted(w) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"]
    assert w["encoder.weight"].shape == (256, 64) and w["W_dec"].shape == (256, 64)
    fields = {"activation": "topk", "num_latents": 256, "k": 8, "d_in": 64}
    assert {k: cfg[k] for k in fields} == fields
    assert cfg["skip_connection"] is False and cfg["transcode"] is False
    assert cfg["normalize_decoder"] == (units == "saelens")
    x = raw_acts(scale)
    ours = dense(sae, x)
    acts, recon = sparsify_encode(dest, x)
    assert torch.equal(acts != 0, ours != 0)
    torch.testing.assert_close(acts, ours * factor(sae, units), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon, sae.forward(x).detach(), rtol=1e-5, atol=1e-4)

    back = steering.load_sae(dest)  # told apart from a saelab run by its cfg.json
    assert (back.arch, back.hook, back.k, back.input_scale) == (arch, HOOK, 8, scale)
    got = dense(back, x)
    assert torch.equal(got != 0, ours != 0)
    torch.testing.assert_close(got, ours, rtol=1e-6, atol=1e-6)


# ---- refusals, destinations, CLI -------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, arch, message",
    [
        ("saelens", "matching_pursuit", "picked again and stops a token at the first repeat"),
        ("sparsify", "matching_pursuit", "sparsify coders are TopK or GroupMax"),
        ("sparsify", "feature_choice", "no thresholded \\(JumpReLU\\) coder; use --format saelens"),
        ("sparsify", "mutual_choice", "no thresholded \\(JumpReLU\\) coder; use --format saelens"),
        ("sparsify", "jumprelu", "no thresholded \\(JumpReLU\\) coder; use --format saelens"),
    ],
)
def test_export_refuses_what_the_format_cannot_hold(tmp_path, capsys, fmt, arch, message):
    _, run = make_run(tmp_path, arch, 1.0)
    with pytest.raises(UserError, match=message):
        export.export(run, tmp_path / "out", fmt)
    assert main(["export", "--format", fmt, str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0])
    assert not (tmp_path / "out").exists()


def test_export_refuses_untrained_thresholds_and_bad_units(tmp_path):
    sae = SparseCoder(8, 16, 2, "feature_choice")  # thresholds still NaN: never trained
    sae.save(tmp_path / "fresh")
    with pytest.raises(UserError, match="no inference threshold yet"):
        export.export_saelens(tmp_path / "fresh", tmp_path / "out", allow_unfinished=True)
    _, run = make_run(tmp_path, "topk", 0.5)
    with pytest.raises(UserError, match="units 'raw' is not one of saelens, saelab"):
        export.export(run, tmp_path / "out", units="raw")
    with pytest.raises(UserError, match="format 'hf' is not one of saelens, sparsify"):
        export.export(run, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_export_destination_rules(tmp_path, fmt):
    _, run = make_run(tmp_path, "topk", 0.5)
    (tmp_path / "empty").mkdir()
    export.export(run, tmp_path / "empty", fmt)
    # Re-exporting the same run replaces the earlier export, leaving no temp dirs behind.
    first = sorted(p.name for p in (tmp_path / "empty").iterdir())
    export.export(run, tmp_path / "empty", fmt)
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    _, other = make_run(tmp_path, "topk", 0.5, name="other")
    with pytest.raises(UserError, match="not an export of"):
        export.export(other, tmp_path / "empty", fmt)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export.export(run, tmp_path / "foreign", fmt)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_cli_export(tmp_path, capsys):
    _, run = make_run(tmp_path, "mutual_choice", 0.5)
    assert main(["export", "--format", "saelens", str(run), str(tmp_path / "out")]) == 0
    assert steering.load_sae(tmp_path / "out").arch == "mutual_choice"
    args = ["export", "--units", "saelab", str(run), str(tmp_path / "raw")]
    assert main(args) == 0
    assert read(tmp_path / "raw")[0]["metadata"]["saelab"]["units"] == "saelab"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert main(["export", str(run), str(tmp_path / "busy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("saelab export: error:") and "choose another destination" in err[-1]
    _, topk = make_run(tmp_path, "topk", 0.5, name="topk")
    assert main(["export", "--format", "sparsify", str(topk), str(tmp_path / "sp")]) == 0
    assert interop.load_sparsify(tmp_path / "sp").arch == "topk"


@pytest.mark.parametrize("complete", [False, None])  # written mid-training, or never set
def test_unfinished_run_is_refused_unless_asked(tmp_path, capsys, complete):
    sae, run = make_run(tmp_path, "topk", 0.5)
    cfg = json.loads((run / "cfg.json").read_text())
    cfg.pop("complete")
    if complete is not None:
        cfg["complete"] = complete
    (run / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert main(["export", str(run), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has not finished training" in err[0] and "saelab train" in err[0]
    assert not out.exists()
    with pytest.raises(UserError, match="has not finished training"):
        export.export_saelens(run, out)
    with pytest.raises(UserError, match="has not finished training"):
        saelab.load_sae(run)
    loaded = saelab.load_sae(run, allow_unfinished=True)
    assert torch.equal(loaded.W_dec, sae.W_dec) and loaded.hook == HOOK
    export.export_saelens(run, out, allow_unfinished=True)
    assert interop.load_saelens(out).d_sae == 256
    assert interop.export_saelens is export.export_saelens  # the old import path still works
