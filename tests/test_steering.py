"""Steering on the tiny model: each intervention changes the hooked activation exactly as its
formula says (read one hook downstream), leaves the model as it was, and fails clearly."""

import weakref

import numpy as np
import pytest
import torch

from saelab import UserError, steering
from saelab.sae import SparseCoder

HOOK = "blocks.0.hook_resid_post"
DOWNSTREAM = "blocks.1.hook_in"  # block 1's input is block 0's (edited) output
PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def model():
    return steering.load_model("tiny")


def make_sae(arch="topk", d_in=64, scale=0.5, hook=HOOK):
    g = torch.Generator().manual_seed(1)
    sae = SparseCoder(d_in, 128, 8, arch, input_scale=scale)
    sae.reset_parameters(g)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(128, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        if arch == "mutual_choice":
            sae.threshold.fill_(0.05)
    sae.hook = hook
    return sae


def capture(model, hook, interventions=()):
    seen = []
    with steering.steer(model, *interventions):
        model.run_with_hooks(PROMPT, fwd_hooks=[(hook, lambda a, hook: seen.append(a.clone()))])
    return seen[0][0]


def dense(sae, x):
    code = sae.encode(x)
    out = torch.zeros(x.shape[0], sae.d_sae)
    return out.scatter_add_(1, code.indices, code.values)


@pytest.fixture(scope="module")
def clean(model):
    return capture(model, HOOK)


def test_downstream_hook_sees_the_hooked_activation(model, clean):
    assert torch.equal(capture(model, DOWNSTREAM), clean)


def test_add_writes_the_scaled_decoder_direction(model, clean):
    sae = make_sae()
    got = capture(model, DOWNSTREAM, [steering.add(sae, [3, 7], [2.0, -1.5])])
    want = clean + (2.0 * sae.W_dec[3] - 1.5 * sae.W_dec[7]) / sae.input_scale
    torch.testing.assert_close(got, want.detach())


@pytest.mark.parametrize("arch", ["topk", "mutual_choice"])
def test_ablate_keeps_the_error_term(model, clean, arch):
    sae = make_sae(arch)
    code = sae.encode(clean)
    latents = code.indices[2, :2].tolist()  # two latents that fire on token 2
    got = capture(model, DOWNSTREAM, [steering.ablate(sae, latents)])
    removed = torch.isin(code.indices, torch.tensor(latents))
    x_hat = sae.decode(code)
    x_hat_without = sae.decode(code._replace(values=code.values.masked_fill(removed, 0)))
    torch.testing.assert_close(got, (x_hat_without + (clean - x_hat)).detach())


def test_clamp_where_firing_and_everywhere(model, clean):
    sae = make_sae()
    acts = dense(sae, clean)
    latent = int(acts[3].argmax())
    fires = acts[:, latent] > 0
    assert fires.any() and not fires.all(), "pick a latent that fires on some tokens only"
    d = (sae.W_dec[latent] / sae.input_scale).detach()

    got = capture(model, DOWNSTREAM, [steering.clamp(sae, latent, 5.0)])
    want = clean + ((5.0 - acts[:, latent]) * fires)[:, None] * d
    torch.testing.assert_close(got, want)
    assert torch.equal(got[~fires], clean[~fires])

    got = capture(model, DOWNSTREAM, [steering.clamp(sae, latent, 5.0, everywhere=True)])
    torch.testing.assert_close(got, clean + (5.0 - acts[:, latent])[:, None] * d)


def test_positions_limit_the_edit(model, clean):
    sae = make_sae()
    got = capture(model, DOWNSTREAM, [steering.add(sae, 5, 3.0, positions=[1, 4, 99])])
    changed = (got != clean).any(-1)
    assert changed.nonzero().flatten().tolist() == [1, 4]
    torch.testing.assert_close(got[4], clean[4] + 3.0 * sae.W_dec[5].detach() / 0.5)


def test_several_interventions_compose(model, clean):
    sae = make_sae()
    got = capture(model, DOWNSTREAM, [steering.add(sae, 1, 1.0), steering.add(sae, 2, 2.0)])
    want = clean + (sae.W_dec[1] + 2.0 * sae.W_dec[2]).detach() / 0.5
    torch.testing.assert_close(got, want)


def test_model_is_unchanged_after_the_context(model):
    sae = make_sae()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(PROMPT)
    with pytest.raises(RuntimeError, match="inside"):
        with steering.steer(model, steering.add(sae, 0, 50.0), steering.ablate(sae, [1, 2])):
            assert not torch.equal(model(PROMPT), before)
            raise RuntimeError("inside")
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())
    assert torch.equal(model(PROMPT), before)


def test_errors_name_the_problem(model):
    sae = make_sae()
    with pytest.raises(UserError, match="trained on blocks.0.hook_resid_post"):
        steering.add(sae, 0, 1.0, hook="blocks.1.hook_resid_post")
    with pytest.raises(UserError, match="latent id 128 is out of range.*0-127"):
        steering.clamp(sae, [0, 128], 1.0)
    with pytest.raises(UserError, match="latent id -1"):
        steering.ablate(sae, -1)
    with pytest.raises(UserError, match="2 scales for 3 latents"):
        steering.add(sae, [0, 1, 2], [1.0, 2.0])
    with pytest.raises(UserError, match="2 values for 3 latents"):
        steering.clamp(sae, [0, 1, 2], [1.0, 2.0])
    narrow = make_sae(d_in=32)
    with pytest.raises(UserError, match="d_in=32 but blocks.0.hook_resid_post has width 64"):
        with steering.steer(model, steering.add(narrow, 0, 1.0)):
            pass
    with pytest.raises(UserError, match="d_in=32"):
        steering.top_latents(model, narrow, PROMPT)
    with pytest.raises(UserError, match="beyond the model"):
        with steering.steer(model, steering.add(make_sae(hook="blocks.9.hook_resid_post"), 0, 1)):
            pass
    untrained = SparseCoder(64, 128, 8, "feature_choice")
    untrained.hook = HOOK
    with pytest.raises(UserError, match="no inference thresholds yet"):
        steering.ablate(untrained, 0)
    assert steering.add(untrained, 0, 1.0).latents == (0,)  # adding needs no encoding
    unnamed = make_sae(hook=None)
    with pytest.raises(UserError, match="pass hook="):
        steering.add(unnamed, 0, 1.0)
    assert steering.add(unnamed, 0, 1.0, hook=HOOK).hook == HOOK


@pytest.mark.parametrize(
    "ids, want",
    [
        (np.int64(3), (3,)),
        (torch.tensor(3), (3,)),  # what argmax returns
        (np.array(3), (3,)),
        ([np.int32(3), torch.tensor(4), 5], (3, 4, 5)),
        (torch.tensor([3, 4]), (3, 4)),  # what topk(...).indices gives
        (np.array([3, 4], dtype=np.uint8), (3, 4)),
    ],
)
def test_latent_ids_of_any_integer_type(clean, ids, want):
    sae = make_sae()
    assert steering.add(sae, ids, np.float32(2.0)).latents == want
    assert steering.ablate(sae, ids).latents == want
    assert steering.clamp(sae, ids, torch.tensor(1.5)).coefs == (1.5,) * len(want)
    x = clean[None]
    assert torch.equal(steering.add(sae, ids, 2.0)(x), steering.add(sae, list(want), 2.0)(x))


def test_argmax_latent_clamps_like_its_int(model, clean):
    sae = make_sae()
    latent = dense(sae, clean)[3].argmax()  # a 0-d tensor
    got = capture(model, DOWNSTREAM, [steering.clamp(sae, latent, 5.0)])
    assert torch.equal(got, capture(model, DOWNSTREAM, [steering.clamp(sae, int(latent), 5.0)]))


NAN, INF = float("nan"), float("inf")
BAD_BUILDS = [
    # (builder, latents, coef, positions, message)
    ("add", 3.0, 1.0, None, "latent id 3.0 is not an integer"),
    ("add", True, 1.0, None, "latent id True is not an integer"),
    ("add", "3", 1.0, None, "latent id '3' is not an integer"),
    ("add", torch.tensor(3.0), 1.0, None, r"latent id tensor\(3.\) is not an integer"),
    ("add", [], 1.0, None, "no latent ids given"),
    ("add", torch.tensor([[1, 2]]), 1.0, None, r"not shape \(1, 2\)"),
    ("add", np.int64(128), 1.0, None, "latent id 128 is out of range; .* 0-127"),
    ("clamp", torch.tensor(-1), 1.0, None, "latent id -1 is out of range"),
    ("add", 3, NAN, None, "scale nan is not finite"),
    ("add", 3, INF, None, "scale inf is not finite"),
    ("add", [3, 4], [1.0, -INF], None, "scale -inf is not finite"),
    ("add", 3, torch.tensor(NAN), None, "scale nan is not finite"),
    ("add", 3, "2", None, "scale '2' is not a number"),
    ("add", 3, None, None, "scale None is not a number"),
    ("clamp", 3, NAN, None, "value nan is not finite"),
    ("clamp", 3, np.float32(INF), None, "value inf is not finite"),
    ("add", 3, 1.0, [1.5], "position 1.5 is not an integer"),
    ("add", 3, 1.0, [-1], "positions must be >= 0"),
]


@pytest.mark.parametrize("builder, latents, coef, positions, message", BAD_BUILDS)
def test_bad_builder_inputs_are_one_line_user_errors(builder, latents, coef, positions, message):
    with pytest.raises(UserError, match=message) as err:
        getattr(steering, builder)(make_sae(), latents, coef, positions=positions)
    assert "\n" not in str(err.value)


BAD_CALLS = [
    ("next_token_probs", dict(k=10**6), r"k=1000000 is not in 1\.\.\d+; .*vocabulary"),
    ("next_token_probs", dict(k=0), r"k=0 is not in 1\.\."),
    ("next_token_probs", dict(k=2.5), "k 2.5 is not an integer"),
    ("generate", dict(max_new_tokens=-1), "max_new_tokens=-1 is not in >= 1"),
    ("generate", dict(max_new_tokens=0), "max_new_tokens=0 is not in >= 1"),
    ("generate", dict(temperature=-1), "temperature=-1.0 is negative; pass 0"),
    ("generate", dict(temperature=NAN), "temperature nan is not finite"),
    ("compare_generations", dict(max_new_tokens=-5), "max_new_tokens=-5"),
    ("top_latents", dict(k=0), r"k=0 is not in 1\.\.128"),
    ("top_latents", dict(k=129), r"k=129 is not in 1\.\.128; .*d_sae"),
]


@pytest.mark.parametrize("fn, kwargs, message", BAD_CALLS)
def test_bad_counts_are_one_line_user_errors(model, fn, kwargs, message):
    args = {
        "next_token_probs": (model, "Hello"),
        "generate": (model, "Hello"),
        "compare_generations": (model, "Hello", {}),
        "top_latents": (model, make_sae(), "Hello"),
    }[fn]
    with pytest.raises(UserError, match=message) as err:
        getattr(steering, fn)(*args, **kwargs)
    assert "\n" not in str(err.value)


def test_generate_is_deterministic_with_a_seed(model):
    sae = make_sae()
    ivs = [steering.add(sae, 3, 4.0)]
    torch.manual_seed(123)
    expected_rng = torch.rand(1)
    torch.manual_seed(123)
    a = steering.generate(model, "Hello", ivs, max_new_tokens=6, seed=7)
    assert torch.equal(torch.rand(1), expected_rng), "generate must not consume the caller's RNG"
    assert a == steering.generate(model, "Hello", ivs, max_new_tokens=6, seed=7)
    assert a != steering.generate(model, "Hello", ivs, max_new_tokens=6, seed=8)


def greedy_by_hand(model, prompt, interventions, n):
    tokens = model.to_tokens(prompt)
    with torch.no_grad(), steering.steer(model, *interventions):
        for _ in range(n):
            nxt = model(tokens)[0, -1].argmax()
            tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    return model.tokenizer.decode(tokens[0, model.to_tokens(prompt).shape[1] :])


@pytest.mark.parametrize("positions", [None, [1, 5]])
def test_generate_steers_every_step_at_absolute_positions(model, positions):
    # Position 5 is a generated token: only absolute indexing over the whole sequence reaches it.
    sae = make_sae()
    ivs = [steering.add(sae, 9, 60.0, positions=positions)]
    got = steering.generate(model, "Hello there", ivs, max_new_tokens=5, temperature=0)
    assert got == greedy_by_hand(model, "Hello there", ivs, 5)
    assert got != steering.generate(model, "Hello there", [], max_new_tokens=5, temperature=0)


@pytest.mark.parametrize("check", ["1", "0"])
def test_a_broken_kv_cache_is_caught_and_skipped(model, monkeypatch, caplog, check):
    """The tiny model recomputes every step, so a wrapper stands in for a broken cache: with
    the cache on, every decoded step's logits come back shifted."""
    monkeypatch.setattr(steering, "_KV_VERDICT", weakref.WeakKeyDictionary())
    monkeypatch.setenv("SAELAB_KV_CHECK", check)
    real, calls = model.generate, []

    def broken_cache(*args, use_past_kv_cache=True, **kwargs):
        calls.append(use_past_kv_cache)
        out = real(*args, use_past_kv_cache=use_past_kv_cache, **kwargs)
        if use_past_kv_cache and kwargs.get("output_logits"):
            out.logits = (out.logits[0], *(lg + torch.randn_like(lg) for lg in out.logits[1:]))
        return out

    monkeypatch.setattr(model, "generate", broken_cache)
    steering.generate(model, "Hello there", [], max_new_tokens=5, temperature=0)
    if check == "1":
        assert calls == [True, False]  # the check, then decoding without the cache
        assert "KV cache of this model gives wrong logits" in caplog.text
        assert "transformers" in caplog.text
        steering.generate(model, "Hello again", [], max_new_tokens=5, temperature=0)
        assert calls == [True, False, False]  # checked once per model
    else:
        assert calls == [True]


def test_a_working_kv_cache_is_kept(model, monkeypatch):
    monkeypatch.setattr(steering, "_KV_VERDICT", weakref.WeakKeyDictionary())
    assert steering.kv_cache_ok(model, "Hello there")


def test_compare_generations_table(model):
    sae = make_sae()
    table = steering.compare_generations(
        model, "Hello", {"steered": [steering.add(sae, 3, 40.0)]}, max_new_tokens=4
    )
    assert list(table.texts) == ["baseline", "steered"]
    assert table.texts["baseline"] == steering.generate(model, "Hello", [], max_new_tokens=4)
    text = str(table)
    assert "baseline |" in text and "steered  |" in text and "\n" not in table.texts["steered"]
    assert "<table>" in table._repr_html_()


def test_top_latents_lists_firing_latents_per_token(model, clean):
    sae = make_sae()
    table = steering.top_latents(model, sae, PROMPT, k=3)
    assert [r.token for r in table] == model.to_str_tokens(PROMPT)
    acts = dense(sae, clean)
    for row in table:
        want = acts[row.position].topk(3)
        assert row.latents == want.indices.tolist()
        assert row.values == pytest.approx(want.values.tolist())
    assert str(table).splitlines()[1].split()[1] == repr(table[1].token)


def test_next_token_probs_moves_under_steering(model):
    sae = make_sae()
    base = steering.next_token_probs(model, "Hello", k=5, tokens=[" the"])
    assert len(base) == 6 and all(0 < p < 1 for p in base.values())
    steered = steering.next_token_probs(model, "Hello", [steering.add(sae, 3, 80.0)], k=5)
    assert steered != base
    with pytest.raises(UserError, match="not one"):
        steering.next_token_probs(model, "Hello", tokens=[" the quick"])


def test_load_sae_reads_a_run_and_its_hook(tmp_path):
    sae = make_sae(hook=None)
    sae.save(tmp_path / "run", {"hook": HOOK, "model": "tiny", "complete": True})
    loaded = steering.load_sae(tmp_path / "run")
    assert loaded.hook == HOOK and loaded.model_name == "tiny"
    assert torch.equal(loaded.W_dec, sae.W_dec)
    with pytest.raises(UserError, match="holds no SAE"):
        steering.load_sae(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("guard", ["on", "off"])
def test_kv_cache_generation_matches_full_recompute(monkeypatch, guard):
    """On the embedded model, every decoding step's logits (steering every token) equal a full
    forward over the sequence so far, within 1e-3 of the logits' scale in fp32 (a working
    cache differs by ~1e-6). "off" trusts the cache without checking: it fails on releases
    whose KV cache is broken (transformers 5.24.0), which is what the guard is for."""
    if guard == "off":
        monkeypatch.setenv("SAELAB_KV_CHECK", "0")
    model = steering.load_model()
    sae = SparseCoder(576, 256, 8)
    sae.hook = "blocks.3.hook_resid_post"
    ivs = [steering.add(sae, 0, 30.0)]
    prompt = "The capital of France is"
    out = steering.decode(model, prompt, ivs, 6, temperature=0)
    n_prompt = model.to_tokens(prompt).shape[1]
    assert len(out.logits) == 6
    with torch.no_grad(), steering.steer(model, *ivs):
        for i, logits in enumerate(out.logits):
            full = model(out.sequences[:, : n_prompt + i])[0, -1]
            gap = (logits[0] - full).abs().max().item()
            assert gap <= 1e-3 * full.abs().max().item(), f"step {i}: logits off by {gap:.3g}"
