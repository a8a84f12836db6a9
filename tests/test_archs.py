"""Every selection rule: its sparsity budget, a hand-worked case, and rule-specific maths."""

import pytest
import torch

from saelab.archs import (
    THRESHOLD_EMA,
    TRAINABLE,
    EncodeArgs,
    RaggedCode,
    feature_choice_m,
    mask_to_code,
    to_padded,
)
from saelab.sae import SparseCoder


def dense(code, n):
    code = to_padded(code)
    return torch.zeros(code.values.shape[0], n).scatter_add(1, code.indices, code.values)


def make(arch, d_in=12, d_sae=48, k=4, seed=0):
    torch.manual_seed(seed)
    s = SparseCoder(d_in, d_sae, k, arch)
    with torch.no_grad():
        s.b_enc.normal_(0, 0.1)
    return s


def set_weights(s, W_enc=None, W_dec=None, b_enc=None):
    with torch.no_grad():
        if W_enc is not None:
            s.W_enc.copy_(torch.tensor(W_enc))
        if W_dec is not None:
            s.W_dec.copy_(torch.tensor(W_dec))
        if b_enc is not None:
            s.b_enc.copy_(torch.tensor(b_enc))
        s.b_dec.zero_()


# ---- budgets -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "gradient_topk"])
def test_exactly_k_per_token(arch):
    s = make(arch)
    x = torch.randn(32, 12) * 3
    g = torch.randn(32, 12)
    for args in (EncodeArgs(training=True, grad=g), EncodeArgs()):
        code = s.encode_scaled(x, args).code
        assert code.values.shape == (32, 4)
        assert len({tuple(sorted(r)) for r in code.indices.tolist()}) > 1
        assert all(len(set(r)) == 4 for r in code.indices.tolist())


def test_feature_choice_exactly_m_per_latent():
    s = make("feature_choice", d_sae=16, k=4)
    x = torch.randn(40, 12)
    code = s.encode_scaled(x, EncodeArgs(training=True)).code
    m = feature_choice_m(4, 40, 16)
    assert m == 10
    counts = torch.bincount(code.indices[code.values > 0], minlength=16)
    # Each latent holds m slots; a slot may be zero only where ReLU(z) is zero.
    z = s.pre_acts(x)
    expected = torch.topk(z, m, dim=0).values.gt(0).sum(0)
    assert torch.equal(counts, expected)


def test_mutual_choice_exactly_k_times_b_in_total():
    s = make("mutual_choice", d_sae=16, k=3)
    with torch.no_grad():
        s.b_enc.fill_(5.0)  # all pre-activations positive: every selected slot is non-zero
    x = torch.randn(20, 12)
    code = s.encode_scaled(x, EncodeArgs(training=True)).code
    assert int((code.values > 0).sum()) == 3 * 20
    # and they are the global top k·B entries
    z = s.pre_acts(x).detach()
    assert torch.equal(dense(code, 16) > 0, z >= z.flatten().topk(60).values.min())
    assert float(s.threshold) == pytest.approx(float(z.flatten().topk(60).values.min()))


def test_matching_pursuit_at_most_T_steps():
    s = make("matching_pursuit", k=5)
    code = s.encode(torch.randn(30, 12))
    assert code.values.shape[1] <= 5
    assert ((code.values > 0).sum(1) <= 5).all()
    for row, vals in zip(code.indices.tolist(), code.values.tolist()):
        chosen = [i for i, v in zip(row, vals) if v > 0]
        assert len(chosen) == len(set(chosen))  # no repeats


# ---- hand-worked cases ------------------------------------------------------------------

E = [[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]]


def test_gradient_topk_hand_worked():
    # z = (2, 1.9, 0.5, ·); with g along e2 and β = 1, latent 1's score 1.9·(1 + |ĝ·e2|)
    # beats latent 0's 2·(1 + 0); plain TopK (no g) keeps latent 0.
    s = SparseCoder(3, 4, 1, "gradient_topk", beta=1.0)
    set_weights(s, W_enc=E, W_dec=E, b_enc=[0.0, 0, 0, -10])
    x = torch.tensor([[2.0, 1.9, 0.5]])
    g = torch.tensor([[0.0, 1.0, 0.0]])  # RMS over the batch is 1/√3: ĝ = (0, √3, 0)
    with_g = s.encode(x, grad=g)
    assert with_g.indices.tolist() == [[1]] and with_g.values.tolist() == [[pytest.approx(1.9)]]
    without = s.encode(x)
    assert without.indices.tolist() == [[0]] and without.values.tolist() == [[2.0]]


@pytest.mark.parametrize("tile", [7, 16, 48, 8192])
def test_gradient_topk_tiles_match_the_dense_score(tile, monkeypatch):
    # The score ReLU(z)·(1 + β|ĝ·d_i|) taken tile by tile with a running top-k selects what
    # one top-k of the dense [B, d_sae] score selects (tiles of 7 and 16 leave a partial
    # last tile and tiles narrower than k; 48 = d_sae, 8192 > d_sae).
    monkeypatch.setattr("saelab.archs.GRADIENT_TOPK_TILE", tile)
    s = make("gradient_topk", k=9)
    s.beta = 2.0
    x, g = torch.randn(64, 12) * 2, torch.randn(64, 12)
    code = s.encode_scaled(x, EncodeArgs(grad=g)).code

    z = torch.addmm(s.b_enc, x - s.b_dec, s.W_enc.T).detach()
    g_hat = g / g.pow(2).mean().sqrt()
    score = z.relu() * (1 + 2.0 * (g_hat @ s.W_dec.T).abs()).detach()
    top = score.topk(9, dim=1).indices
    ref = torch.zeros_like(z).scatter(1, top, z.gather(1, top).relu())
    assert (ref > 0).sum() > 64 * 5  # most selections fire: the order is exercised
    torch.testing.assert_close(dense(code, 48), ref)


def test_feature_choice_hand_worked():
    # Three tokens, two latents (e1, e2), k = 1, B = 3, d_sae = 2: m = ⌊1·3/2⌋ = 1.
    s = SparseCoder(3, 2, 1, "feature_choice")
    set_weights(s, W_enc=E[:2], W_dec=E[:2], b_enc=[0.0, 0.0])
    x = torch.tensor([[3.0, 1, 0], [2, 0, 0], [1, 2, 0]])
    code = s.encode_scaled(x, EncodeArgs(training=True)).code
    # latent 0 takes token 0 (3 > 2 > 1), latent 1 takes token 2 (2 > 1 > 0); token 1 gets none.
    assert dense(code, 2).tolist() == [[3.0, 0], [0, 0], [0, 2.0]]
    # thresholds: the first batch sets θ to the m-th largest value of each column
    assert s.threshold.tolist() == [3.0, 2.0]
    inf = s.encode(torch.tensor([[3.5, 1.5, 0]]))
    assert dense(inf, 2).tolist() == [[3.5, 0.0]]  # 3.5 > θ0 = 3, 1.5 < θ1 = 2


def test_mutual_choice_hand_worked():
    # k = 1, B = 2: the two largest entries of the 2×2 matrix, wherever they are.
    s = SparseCoder(3, 2, 1, "mutual_choice")
    set_weights(s, W_enc=E[:2], W_dec=E[:2], b_enc=[0.0, 0.0])
    x = torch.tensor([[3.0, 2.5, 0], [1, 0.5, 0]])
    code = s.encode_scaled(x, EncodeArgs(training=True)).code
    assert dense(code, 2).tolist() == [[3.0, 2.5], [0, 0]]  # token 1 gets nothing
    assert s.threshold.tolist() == [2.5]
    got = dense(s.encode(torch.tensor([[2.6, 2.4, 0]])), 2)
    torch.testing.assert_close(got, torch.tensor([[2.6, 0.0]]))


def test_jumprelu_hand_worked():
    # a_i = z_i·[z_i > θ_i], as SAELens's JumpReLU: no ReLU, so a negative θ passes negative z.
    s = SparseCoder(3, 3, 1, "jumprelu")
    assert s.threshold.tolist() == [0.0, 0.0, 0.0]  # a new one is the plain ReLU SAE
    set_weights(s, W_enc=E[:3], W_dec=E[:3], b_enc=[0.0, 0, 0])
    s.threshold.copy_(torch.tensor([1.0, 2.0, -1.0]))
    x = torch.tensor([[1.5, 2.0, -0.5], [0.5, 3.0, -2.0]])
    # z = x: latent 0 fires above 1, latent 1 strictly above 2, latent 2 above −1.
    assert dense(s.encode(x), 3).tolist() == [[1.5, 0, -0.5], [0, 3.0, 0]]
    # Training mode changes nothing: the rule has no batch selection and no EMA.
    code = s.encode_scaled(x, EncodeArgs(training=True)).code
    assert dense(code, 3).tolist() == [[1.5, 0, -0.5], [0, 3.0, 0]]
    assert s.threshold.tolist() == [1.0, 2.0, -1.0]


def test_jumprelu_cannot_be_trained(tmp_path, synthetic_harvest, capsys):
    from saelab.cli import main

    h = synthetic_harvest(tmp_path / "h", n_tokens=2000)
    args = ["train", "--harvest", str(h), "--out", str(tmp_path / "r"), "--sae.arch", "jumprelu"]
    assert main([*args, "--sae.d_sae", "32", "--sae.k", "2", "--eval_tokens", "200", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "jumprelu is inference-only" in err[0] and "train one of" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("arch", ["feature_choice", "mutual_choice"])
def test_threshold_is_an_ema_over_training_batches(arch):
    # θ₁ = t₁, then θ ← (1 − λ)·θ + λ·t_b with λ = THRESHOLD_EMA, where t_b is batch b's
    # selection threshold: per latent the m-th largest z of its column (feature_choice), or
    # the (k·B)-th largest z of the batch (mutual_choice), floored at zero.
    s = make(arch, d_sae=16, k=3)
    W_enc, b_enc = s.W_enc.detach().clone(), s.b_enc.detach().clone()
    theta = first = None
    for b, (size, scale) in enumerate([(40, 1.0), (24, 3.0), (40, 0.5), (32, 2.0), (40, 4.0)]):
        x = torch.randn(size, 12, generator=torch.Generator().manual_seed(b)) * scale
        z = x @ W_enc.T + b_enc  # b_dec is zero
        if arch == "feature_choice":
            m = max(1, 3 * size // 16)
            t = z.sort(0, descending=True).values[m - 1].clamp_min(0)
        else:
            t = z.flatten().sort(descending=True).values[3 * size - 1].clamp_min(0).reshape(1)
        if theta is None:
            theta = first = t
        else:
            theta = (1 - THRESHOLD_EMA) * theta + THRESHOLD_EMA * t
        s.encode_scaled(x, EncodeArgs(training=True))
        torch.testing.assert_close(s.threshold, theta, atol=1e-6, rtol=1e-5)
    # Neither the first batch's threshold nor the last one's: every batch counted.
    assert (theta - first).abs().max() > 0.1 and (theta - t).abs().max() > 0.1
    s.encode(torch.randn(8, 12))  # inference leaves it alone
    torch.testing.assert_close(s.threshold, theta, atol=1e-6, rtol=1e-5)


def test_matching_pursuit_hand_worked():
    # Atoms e1 and (0.6, 0.8, 0); x = (1.2, 1.6, 0.5) = 2·d1 + 0.5·e3.
    s = SparseCoder(3, 4, 2, "matching_pursuit")
    set_weights(s, W_dec=E)
    code = s.encode(torch.tensor([[1.2, 1.6, 0.5]]))
    # step 1: c = (1.2, 1.6, 0.5, 2.0) → d3 with 2.0; r = (0, 0, 0.5).
    # step 2: c = (0, 0, 0.5, ·) → e3 with 0.5; r = 0.
    assert code.indices.tolist() == [[3, 2]]
    torch.testing.assert_close(code.values, torch.tensor([[2.0, 0.5]]))
    torch.testing.assert_close(s.decode(code), torch.tensor([[1.2, 1.6, 0.5]]))


def test_matching_pursuit_stops_on_non_positive_correlation():
    s = SparseCoder(3, 4, 3, "matching_pursuit")
    set_weights(s, W_dec=E)
    code = s.encode(torch.tensor([[-1.0, -1.0, -1.0]]))  # every correlation negative
    assert (code.values == 0).all()


# ---- rule-specific maths -------------------------------------------------------------------


def test_mp_adaptive_inference_stops_early():
    torch.manual_seed(3)
    s = SparseCoder(12, 24, 8, "matching_pursuit")
    set_weights(s, W_dec=torch.cat([torch.eye(12), -torch.eye(12)]).tolist())
    # Three atoms plus a little noise: fixed-k pursuit spends all 8 steps on the noise.
    x = torch.zeros(1, 12)
    x[0, :3] = torch.tensor([2.0, 1.5, 1.0])
    x += 0.01 * torch.randn(1, 12).abs()
    fixed = s.encode(x)
    adaptive = s.encode(x, mp_tol=0.05, mp_max_steps=8)
    assert int((adaptive.values > 0).sum()) < int((fixed.values > 0).sum()) <= 8
    r = (x - s.decode(adaptive)).norm()
    assert r <= 0.05 * (x - s.b_dec).norm() + 1e-4


def test_mask_to_code_pads_rows():
    z = torch.tensor([[1.0, -2, 3], [4, 5, 6]])
    v, i = mask_to_code(z, torch.tensor([1, 0, 1, 1]), torch.tensor([0, 2, 1, 2]))
    assert v.shape == (2, 3)
    assert dense_from(v, i, 3).tolist() == [[0, 0, 3.0], [4.0, 5.0, 6.0]]


def dense_from(v, i, n):
    return torch.zeros(v.shape[0], n).scatter_add(1, i, v)


@pytest.mark.parametrize("arch", sorted(TRAINABLE))
def test_short_training_learns_synthetic_dictionary(arch):
    from saelab.synthetic import SyntheticData

    data = SyntheticData(d_in=16, n_features=32, k_true=3, seed=4)
    g = torch.Generator().manual_seed(0)
    s = SparseCoder(16, 64, 3, arch)
    opt = torch.optim.Adam([p for p in s.parameters() if p.requires_grad], lr=3e-3)
    fvus = []
    for _ in range(300):
        x = data.sample(256, g)
        grad = torch.randn_like(x) if arch == "gradient_topk" else None
        enc = s.encode_scaled(x, EncodeArgs(training=True, grad=grad))
        x_hat = s.decode_scaled(enc.code)
        loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        s.project_decoder_grad()
        opt.step()
        s.normalize_decoder()
        fvus.append(loss.item())
    first, last = sum(fvus[:10]) / 10, sum(fvus[-20:]) / 20
    assert last < 0.25 and last < 0.5 * first, (arch, first, last)


@pytest.mark.parametrize("skewed", [0, 1, 3, 20])
def test_global_topk_is_exact(skewed):
    from saelab.kernels import global_topk

    torch.manual_seed(5)
    z = torch.randn(64, 200)
    # Skewed tokens hold far more than their share of the winners: up to B/8 of them take
    # the second pass (whole rows beside the others' candidates), more the full top-K.
    z[torch.arange(skewed) * 3] += 10
    K = 64 * 4
    top, rows, cols = global_topk(z, K)
    assert torch.equal(z[rows, cols], top)
    assert len(set(zip(rows.tolist(), cols.tolist()))) == K
    assert torch.equal(top.sort().values, z.flatten().topk(K).values.sort().values)


def test_adaptive_pursuit_code_is_ragged():
    s = make("matching_pursuit", k=4)
    x = torch.randn(30, 12)
    enc = s.encode_scaled(x, EncodeArgs(mp_tol=0.6, mp_max_steps=8))
    code = enc.code
    assert isinstance(code, RaggedCode)
    counts = code.offsets.diff()
    assert counts.min() < counts.max() and int(counts.max()) <= 8
    assert (code.values > 0).all()  # no padding travels
    full = s.encode_scaled(x, EncodeArgs(mp_max_steps=8)).code  # the same pursuit, all 8 steps
    pad = to_padded(code)
    width = pad.indices.shape[1]
    keep = pad.values > 0
    assert torch.equal(pad.indices[keep], full.indices[:, :width][keep])
    torch.testing.assert_close(pad.values[keep], full.values[:, :width][keep])
