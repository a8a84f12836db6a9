"""Imports: hand-written SAELens and sparsify fixtures built from their documented layouts,
checked against hand-computed codes, and the labels they come back with. (Exports and round
trips: test_export.py.)"""

import json

import pytest
import torch
from safetensors.torch import save_file

from saelab import UserError, interop, steering

HOOK = "blocks.0.hook_resid_post"


def dense(sae, x):
    code = sae.encode(x)
    return torch.zeros(x.shape[0], sae.d_sae).scatter_add_(1, code.indices, code.values)


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
    path = tmp_path / f"saelens-{architecture}-{len(list(tmp_path.iterdir()))}"
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
    # Labelled as what it computes: topk, or the thresholded ReLU (standard is θ = 0).
    assert sae.arch == ("topk" if architecture == "topk" else "jumprelu")
    assert sae.input_scale == 1.0
    if architecture != "topk":
        want = tensors.get("threshold", torch.zeros(4))
        assert torch.equal(sae.threshold, want)
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


def test_saelens_log_threshold_and_negative_threshold(tmp_path):
    # Pre-6.0 SAELens saved log θ. A negative θ (exported elsewhere) passes negative z, as
    # SAELens's JumpReLU z·[z > θ] does: x = (1, 0.2, 0.4) gives z = (0, 0.7, −0.35, −0.2).
    log_theta = torch.tensor([0.5, 0.5, 0.5, 2.0]).log()
    sae = interop.load_saelens(saelens_dir(tmp_path, "jumprelu", log_threshold=log_theta))
    torch.testing.assert_close(sae.threshold, torch.tensor([0.5, 0.5, 0.5, 2.0]))
    theta = torch.tensor([0.5, 0.5, -0.5, 2.0])
    sae = interop.load_saelens(saelens_dir(tmp_path, "jumprelu", threshold=theta))
    torch.testing.assert_close(dense(sae, X[1:]), torch.tensor([[0, 0.7, -0.35, 0]]))


def test_saelens_refusals(tmp_path):
    path = saelens_dir(tmp_path, "jumprelu", {"normalize_activations": "layer_norm"})
    with pytest.raises(UserError, match="normalizes activations"):
        interop.load_saelens(path)
    path = saelens_dir(tmp_path, "gated")
    with pytest.raises(UserError, match="'gated' is not supported"):
        interop.load_saelens(path)
    # A BatchTopK training save keeps topk_threshold; its inference form is a JumpReLU SAE.
    path = saelens_dir(tmp_path, "batchtopk", {"k": 2}, topk_threshold=torch.tensor(0.4))
    with pytest.raises(UserError, match="batchtopk training save.*save_inference_model"):
        interop.load_saelens(path)
    path = saelens_dir(tmp_path, "jumprelu", {"reshape_activations": "hook_z"})
    with pytest.raises(UserError, match="hook_z"):
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
