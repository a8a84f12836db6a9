"""SparseCoder invariants, parametrized over every selection rule, and hand-worked cases."""

import json

import pytest
import torch

from saelab.archs import ARCHS, EncodeArgs, SparseCode
from saelab.config import Arch
from saelab.errors import UserError
from saelab.sae import SparseCoder


def test_arch_literal_matches_registry():
    assert set(Arch.__args__) == set(ARCHS)


@pytest.fixture(params=sorted(ARCHS))
def sae(request):
    torch.manual_seed(0)
    s = SparseCoder(d_in=12, d_sae=48, k=4, arch=request.param, input_scale=0.5)
    with torch.no_grad():
        s.b_enc.normal_(0, 0.1)
        s.b_dec.normal_(0, 0.1)
        if s.spec.threshold != "none":  # calibrate inference thresholds on one batch
            s.encode_scaled(torch.randn(64, 12), EncodeArgs(training=True))
    return s


def test_code_shapes(sae):
    x = torch.randn(10, 12)
    code = sae.encode(x)
    assert code.values.shape == code.indices.shape and code.values.shape[0] == 10
    assert (code.values >= 0).all() and code.indices.dtype == torch.int64
    assert ((code.indices >= 0) & (code.indices < 48)).all()


def test_forward_hand_worked():
    # d_in 2, three latents, k = 2, input_scale 2: x̂ = (W_decᵀ a + b_dec) / 2 with
    # a = TopK_2(ReLU(W_enc (2x − b_dec) + b_enc)).
    s = SparseCoder(2, 3, 2, "topk", input_scale=2.0)
    with torch.no_grad():
        s.W_enc.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1]]))
        s.b_enc.copy_(torch.tensor([0.0, 0, -1]))
        s.W_dec.copy_(torch.tensor([[1.0, 0], [0, 1], [0.6, 0.8]]))
        s.b_dec.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([[[1.0, 2.0], [2.0, -1.0], [-1.0, -1.0]]], dtype=torch.float64)
    # token 0: 2x − b_dec = (1.5, 4.5), z = (1.5, 4.5, 5.0): latents 2 and 1;
    #          x̂ = (5·(0.6, 0.8) + 4.5·(0, 1) + (0.5, −0.5)) / 2 = (3.5, 8.0) / 2
    # token 1: 2x − b_dec = (3.5, −1.5), z = (3.5, −1.5, 1.0): latents 0 and 2;
    #          x̂ = (3.5·(1, 0) + 1·(0.6, 0.8) + (0.5, −0.5)) / 2 = (4.6, 0.3) / 2
    # token 2: every z < 0, nothing fires: x̂ = b_dec / 2
    want = torch.tensor([[[1.75, 4.0], [2.3, 0.15], [0.25, -0.25]]], dtype=torch.float64)
    got = s(x)
    assert got.shape == (1, 3, 2) and got.dtype == torch.float64
    torch.testing.assert_close(got, want)


def _dense_forward(sae, x):
    """x̂ for raw activations x [N, d_in], densely from the weights (no encode or decode)."""
    xs = x * sae.input_scale - sae.b_dec
    W_dec = sae.W_dec.detach()
    a = torch.zeros(x.shape[0], sae.d_sae)
    if sae.arch == "matching_pursuit":  # k greedy steps, each latent at most once
        r, used = xs.clone(), torch.zeros_like(a, dtype=torch.bool)
        active = torch.ones(x.shape[0], dtype=torch.bool)
        for _ in range(sae.k):
            c = (r @ W_dec.T).masked_fill(used, float("-inf"))
            cj, j = c.max(1)
            active &= cj > 0
            for b in torch.nonzero(active).flatten().tolist():
                a[b, j[b]] += cj[b]
                r[b] -= cj[b] * W_dec[j[b]]
                used[b, j[b]] = True
    else:
        z = xs @ sae.W_enc.T + sae.b_enc
        if sae.spec.threshold == "none":  # topk, and gradient_topk without a gradient
            top = z.topk(sae.k, dim=1)
            a.scatter_(1, top.indices, top.values.relu())
        else:  # batch-level rules at inference: a JumpReLU at the calibrated threshold(s)
            a = torch.where(z > sae.threshold.clamp_min(0), z, torch.zeros_like(z))
    return (a @ W_dec + sae.b_dec) / sae.input_scale


@torch.no_grad()
def test_forward_matches_dense_reference(sae):
    x = torch.randn(3, 5, 12) * 2
    want = _dense_forward(sae, x.reshape(15, 12)).reshape(3, 5, 12)
    torch.testing.assert_close(sae(x), want, atol=1e-5, rtol=1e-5)
    fired = (want - sae.b_dec / sae.input_scale).abs().amax(-1) > 1e-3
    assert fired.float().mean() > 0.5  # most tokens fire some latent: the check has teeth


def test_encode_is_batch_independent(sae):
    x = torch.randn(9, 12)
    whole = sae.encode(x)
    for i in range(9):
        one = sae.encode(x[i : i + 1])
        dense = lambda c: torch.zeros(c.values.shape[0], 48).scatter_add(1, c.indices, c.values)  # noqa: E731
        torch.testing.assert_close(dense(one)[0], dense(whole)[i])


def test_save_load_round_trip(sae, tmp_path):
    sae.save(tmp_path, {"hook": "blocks.0.hook_resid_post"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["arch"] == sae.arch and cfg["hook"] == "blocks.0.hook_resid_post"
    loaded = SparseCoder.load(tmp_path)
    x = torch.randn(6, 12)
    assert loaded.input_scale == sae.input_scale
    torch.testing.assert_close(loaded(x), sae(x))
    for (n, a), (_, b) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_decoder_rows_unit_norm_after_a_step(sae):
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(32, 12)
    enc = sae.encode_scaled(x, EncodeArgs(training=True))
    loss = (sae.decode_scaled(enc.code) - x).pow(2).sum()
    loss.backward()
    sae.project_decoder_grad()
    # The projected gradient is orthogonal to every row.
    g = sae.W_dec.grad
    assert ((g * sae.W_dec).sum(1).abs() <= 1e-6 * g.norm(dim=1) + 1e-7).all()
    opt.step()
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))


def test_tied_init():
    s = SparseCoder(8, 32, 2)
    assert torch.equal(s.W_enc, s.W_dec)
    torch.testing.assert_close(s.W_dec.norm(dim=1), torch.ones(32))


def test_topk_hand_worked():
    # d_in 3, four latents along known directions; b_dec = 0, b_enc = (0, 0, 0, -1).
    s = SparseCoder(3, 4, 2, "topk")
    with torch.no_grad():
        s.W_enc.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]))
        s.W_dec.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]]))
        s.b_enc.copy_(torch.tensor([0.0, 0, 0, -1]))
        s.b_dec.zero_()
    # z = (3, 1, -2, 3): latents 0 and 3 tie at 3 and win; latent 2 is negative.
    code = s.encode(torch.tensor([[3.0, 1.0, -2.0]]))
    dense = torch.zeros(4).scatter_add(0, code.indices[0], code.values[0])
    assert dense.tolist() == [3.0, 0.0, 0.0, 3.0]
    # x̂ = 3·(1,0,0) + 3·(0.6,0.8,0)
    torch.testing.assert_close(s.decode(code), torch.tensor([[4.8, 2.4, 0.0]]))


def test_input_scale_is_undone_by_decode():
    s = SparseCoder(4, 16, 15, input_scale=3.0)
    with torch.no_grad():
        s.W_enc.copy_(torch.eye(4).repeat(4, 1))
        s.W_dec.copy_(torch.eye(4).repeat(4, 1))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    code = s.encode(x)
    assert float(code.values.max().detach()) == pytest.approx(12.0)  # scaled units
    # Each direction appears 4 times and k = 15 keeps them all but one, so x̂ ≠ x; the
    # point here is units: decode divides the scale back out.
    xs = s.decode_scaled(code) / 3.0
    torch.testing.assert_close(s.decode(code), xs)


@pytest.mark.parametrize(
    "kwargs,msg",
    [({"k": 48}, "k=48"), ({"k": 0}, "k=0"), ({"arch": "nope"}, "unknown arch 'nope'")],
)
def test_bad_construction(kwargs, msg):
    args = {"d_in": 4, "d_sae": 48, "k": 4, **kwargs}
    with pytest.raises(UserError, match=msg):
        SparseCoder(**args)


def test_load_missing_and_damaged(tmp_path):
    with pytest.raises(UserError, match="holds no trained SAE"):
        SparseCoder.load(tmp_path)
    SparseCoder(4, 8, 2).save(tmp_path)
    (tmp_path / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="damaged"):
        SparseCoder.load(tmp_path)


def test_sparse_code_is_a_named_tuple():
    c = SparseCode(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.int64))
    values, indices = c
    assert values is c.values and indices is c.indices
