"""SAELens export/import round trips, and hand-written SAELens and sparsify fixtures built from
their documented layouts, checked against hand-computed codes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import saelab
from saelab import UserError, interop, steering
from saelab.cli import main
from saelab.sae import SparseCoder

HOOK = "blocks.0.hook_resid_post"


def make_run(tmp_path, arch, scale, name="run"):
    g = torch.Generator().manual_seed(2)
    sae = SparseCoder(64, 256, 8, arch, input_scale=scale)
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_enc.copy_(0.05 * torch.randn(256, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(64, generator=g))
        if arch == "feature_choice":
            sae.threshold.copy_(0.3 * torch.rand(256, generator=g))
        if arch == "mutual_choice":
            sae.threshold.fill_(0.2)
    sae.save(tmp_path / name, {"hook": HOOK, "model": "tiny", "harvest": "h", "complete": True})
    return sae, tmp_path / name


def dense(sae, x):
    code = sae.encode(x)
    return torch.zeros(x.shape[0], sae.d_sae).scatter_add_(1, code.indices, code.values)


def raw_acts(scale):
    # Activations whose scaled norm is about sqrt(d_in), as the SAE saw in training.
    return torch.randn(300, 64, generator=torch.Generator().manual_seed(3)) / scale


EXPECTED_ARCH = {
    "topk": ("topk", "topk"),
    "gradient_topk": ("topk", "topk"),
    "feature_choice": ("jumprelu", "feature_choice"),
    "mutual_choice": ("jumprelu", "mutual_choice"),
}


@pytest.mark.parametrize("arch", list(EXPECTED_ARCH))
@pytest.mark.parametrize("scale", [0.25, 0.3])
def test_round_trip_gives_identical_codes(tmp_path, arch, scale):
    sae, run = make_run(tmp_path, arch, scale)
    dest = interop.export_saelens(run, tmp_path / "out")
    cfg = json.loads((dest / "cfg.json").read_text())
    w = load_file(dest / "sae_weights.safetensors")
    assert cfg["architecture"] == EXPECTED_ARCH[arch][0]
    assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"]) == (64, 256, "none")
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == "tiny"
    assert w["W_enc"].shape == (64, 256) and w["W_dec"].shape == (256, 64)
    assert ("threshold" in w) == (cfg["architecture"] == "jumprelu")
    assert cfg.get("k") == (8 if cfg["architecture"] == "topk" else None)

    back = interop.load_saelens(dest)
    assert back.arch == EXPECTED_ARCH[arch][1] and back.hook == HOOK and back.k == 8
    x = raw_acts(scale)
    want, got = dense(sae, x), dense(back, x)
    assert torch.equal(got != 0, want != 0), "the same latents fire"
    if scale == 0.25:  # a power of two folds into the weights without rounding
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back.forward(x), sae.forward(x).detach(), rtol=1e-5, atol=1e-5)
    assert (want != 0).any(1).all(), "the test data must make latents fire"


def test_export_refuses_what_saelens_cannot_hold(tmp_path):
    _, run = make_run(tmp_path, "matching_pursuit", 1.0)
    with pytest.raises(UserError, match="matching_pursuit has no SAELens equivalent"):
        interop.export_saelens(run, tmp_path / "out")
    sae = SparseCoder(8, 16, 2, "feature_choice")  # thresholds still NaN: never trained
    sae.save(tmp_path / "fresh")
    with pytest.raises(UserError, match="no inference threshold yet"):
        interop.export_saelens(tmp_path / "fresh", tmp_path / "out", allow_unfinished=True)
    assert not (tmp_path / "out").exists()


def test_export_destination_rules(tmp_path):
    _, run = make_run(tmp_path, "topk", 0.5)
    (tmp_path / "empty").mkdir()
    interop.export_saelens(run, tmp_path / "empty")
    # Re-exporting the same run replaces the earlier export, leaving no temp dirs behind.
    interop.export_saelens(run, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    _, other = make_run(tmp_path, "topk", 0.5, name="other")
    with pytest.raises(UserError, match="not an export of"):
        interop.export_saelens(other, tmp_path / "empty")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        interop.export_saelens(run, tmp_path / "foreign")
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_cli_export(tmp_path, capsys):
    _, run = make_run(tmp_path, "mutual_choice", 0.5)
    assert main(["export", "--format", "saelens", str(run), str(tmp_path / "out")]) == 0
    assert steering.load_sae(tmp_path / "out").arch == "mutual_choice"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert main(["export", str(run), str(tmp_path / "busy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("saelab export: error:") and "choose another destination" in err[-1]


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
        interop.export_saelens(run, out)
    with pytest.raises(UserError, match="has not finished training"):
        saelab.load_sae(run)
    loaded = saelab.load_sae(run, allow_unfinished=True)
    assert torch.equal(loaded.W_dec, sae.W_dec) and loaded.hook == HOOK
    interop.export_saelens(run, out, allow_unfinished=True)
    assert interop.load_saelens(out).d_sae == 256


# ---- hand-written fixtures -------------------------------------------------------------
# d_in 3, d_sae 4. With x = (3, 1, 2) and b_dec = (1, 0, 0): x − b_dec = (2, 1, 2) and
# z = (x − b_dec) W_enc + b_enc = (2, 1 + 0.5, 2 − 0.75, 2 + 1 − 2) = (2, 1.5, 1.25, 1).
# With x = (1, 0.2, 0.4): z = (0, 0.7, −0.35, −0.2).
W_ENC = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, -1]])  # [d_in, d_sae]
B_ENC = torch.tensor([0.0, 0.5, -0.75, 0])
W_DEC = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]])
B_DEC = torch.tensor([1.0, 0, 0])
X = torch.tensor([[3.0, 1, 2], [1, 0.2, 0.4]])


def saelens_dir(tmp_path, architecture, extra_cfg=(), **tensors):
    path = tmp_path / f"saelens-{architecture}"
    path.mkdir()
    weights = {"W_enc": W_ENC, "b_enc": B_ENC, "W_dec": W_DEC, "b_dec": B_DEC, **tensors}
    save_file({k: v.contiguous() for k, v in weights.items()}, path / "sae_weights.safetensors")
    cfg = {
        "architecture": architecture,
        "d_in": 3,
        "d_sae": 4,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.5.0", "hook_name": HOOK, "model_name": "gpt2"},
        **dict(extra_cfg),
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    "architecture, extra, tensors, codes",
    [
        ("topk", {"k": 2}, {}, [[2, 1.5, 0, 0], [0, 0.7, 0, 0]]),
        (
            "jumprelu",
            {},
            {"threshold": torch.tensor([0.5, 0.5, 0.5, 2.0])},
            [[2, 1.5, 1.25, 0], [0, 0.7, 0, 0]],
        ),
        ("standard", {}, {}, [[2, 1.5, 1.25, 1], [0, 0.7, 0, 0]]),
        (  # z = x W_enc + b_enc = (3, 1.5, 1.25, 2): latent 3 is at its threshold, so off
            "jumprelu",
            {"apply_b_dec_to_input": False},
            {"threshold": torch.tensor([0.5, 0.5, 0.5, 2.0])},
            [[3, 1.5, 1.25, 0], [1, 0.7, 0, 0]],
        ),
    ],
)
def test_saelens_fixture_matches_hand_computation(tmp_path, architecture, extra, tensors, codes):
    sae = steering.load_sae(saelens_dir(tmp_path, architecture, extra, **tensors))
    assert sae.hook == HOOK and sae.model_name == "gpt2"
    torch.testing.assert_close(dense(sae, X), torch.tensor(codes))
    # Decoding is a·W_dec + b_dec on raw activations.
    code = sae.encode(X[:1])
    want = torch.tensor(codes[0]) @ W_DEC + B_DEC
    torch.testing.assert_close(sae.decode(code)[0], want)


def test_saelens_topk_rescaled_by_decoder_norm(tmp_path):
    # Row 0 of W_dec has norm 2: SAELens selects on z·‖d‖ = (4, 1.5, 1.25, 1) and decodes
    # (a/‖d‖)·W_dec, i.e. 4·(1, 0, 0) + 1.5·(0, 1, 0) + b_dec = (5, 1.5, 0).
    w_dec = W_DEC.clone()
    w_dec[0] = torch.tensor([2.0, 0, 0])
    path = saelens_dir(
        tmp_path, "topk", {"k": 2, "rescale_acts_by_decoder_norm": True}, W_dec=w_dec
    )
    sae = interop.load_saelens(path)
    torch.testing.assert_close(dense(sae, X[:1]), torch.tensor([[4.0, 1.5, 0, 0]]))
    torch.testing.assert_close(sae.forward(X[:1]), torch.tensor([[5.0, 1.5, 0]]))


def test_saelens_refusals(tmp_path):
    path = saelens_dir(tmp_path, "jumprelu", {"normalize_activations": "layer_norm"})
    with pytest.raises(UserError, match="normalizes activations"):
        interop.load_saelens(path)
    path = saelens_dir(tmp_path, "gated")
    with pytest.raises(UserError, match="'gated' is not supported"):
        interop.load_saelens(path)


def sparsify_dir(tmp_path, name="layers.1", **cfg_changes):
    path = tmp_path / name
    path.mkdir()
    tensors = {
        "encoder.weight": W_ENC.T.contiguous(),  # nn.Linear keeps [d_sae, d_in]
        "encoder.bias": B_ENC,
        "W_dec": W_DEC,
        "b_dec": B_DEC,
    }
    save_file(tensors, path / "sae.safetensors")
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": 4,
        "k": 2,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": 3,
        **cfg_changes,
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def test_sparsify_fixture_matches_hand_computation(tmp_path):
    sae = steering.load_sae(sparsify_dir(tmp_path))
    assert (sae.arch, sae.k, sae.d_sae, sae.hook) == ("topk", 2, 4, "blocks.1.hook_resid_post")
    torch.testing.assert_close(dense(sae, X), torch.tensor([[2, 1.5, 0, 0], [0, 0.7, 0, 0]]))
    torch.testing.assert_close(sae.forward(X[:1]), torch.tensor([[3.0, 1.5, 0]]))
    assert interop.sparsify_hook("model.layers.3.mlp") == "blocks.3.hook_mlp_out"
    other = interop.load_sparsify(sparsify_dir(tmp_path, "embed"), hook="hook_embed")
    assert other.hook == "hook_embed"


def test_sparsify_refusals(tmp_path):
    with pytest.raises(UserError, match="activation=groupmax"):
        interop.load_sparsify(sparsify_dir(tmp_path, "a", activation="groupmax"))
    with pytest.raises(UserError, match="transcode"):
        interop.load_sparsify(sparsify_dir(tmp_path, "b", transcode=True))
    with pytest.raises(UserError, match="do not belong together"):
        interop.load_sparsify(sparsify_dir(tmp_path, "c", num_latents=8))
    # A sparsify save directory holds one sub-directory per hookpoint.
    with pytest.raises(UserError, match="holds SAEs in a, b, c"):
        steering.load_sae(tmp_path)
