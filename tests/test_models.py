"""load_model for every kind of name, hook resolution and stop_layer."""

import pytest
import torch

from saelab.errors import UserError
from saelab.models import (
    cpu_has_bf16,
    load_model,
    load_tokenizer,
    resolve_hook,
    resolve_model_dtype,
    stop_layer,
)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_tiny_is_deterministic_and_eval(tiny):
    again = load_model("tiny")
    assert not tiny.training
    assert tiny.cfg.n_layers == 2 and tiny.cfg.d_vocab == len(load_tokenizer("tiny"))
    for (n, p), (_, q) in zip(tiny.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n
        assert not p.requires_grad


@pytest.mark.parametrize(
    "suffix", ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out"]
)
def test_tiny_supports_resid_aliases(tiny, suffix):
    assert resolve_hook(tiny, f"blocks.1.{suffix}") == (f"blocks.1.{suffix}", 1)


def test_stop_at_layer_matches_resid_post(tiny):
    tokens = torch.randint(0, 1000, (2, 9))
    seen = {}
    tiny.run_with_hooks(
        tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: seen.setdefault("a", a))]
    )
    out = tiny(tokens, stop_at_layer=stop_layer(tiny, ["blocks.0.hook_resid_post"]))
    assert torch.allclose(out, seen["a"])


def test_stop_layer(tiny):
    assert stop_layer(tiny, ["blocks.0.hook_resid_post"]) == 1
    assert stop_layer(tiny, ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]) == 2
    assert stop_layer(tiny, ["hook_embed"]) == 1
    assert stop_layer(tiny, ["ln_final.hook_normalized"]) is None


def test_unknown_hook_lists_valid_ones(tiny):
    with pytest.raises(
        UserError, match=r"unknown hook 'blocks.0.hook_bogus'.*hook_resid_post.*0-1"
    ):
        resolve_hook(tiny, "blocks.0.hook_bogus")


def test_layer_beyond_model(tiny):
    with pytest.raises(UserError, match=r"layer 40 is beyond the model's 2 blocks \(0-1\)"):
        resolve_hook(tiny, "blocks.40.hook_resid_post")


def test_local_hf_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("tiny")
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg)
    hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"))
    assert model.cfg.n_layers == 2 and model.cfg.d_model == 32
    assert resolve_hook(model, "blocks.1.hook_resid_post") == ("blocks.1.hook_resid_post", 1)
    tokens = torch.tensor([[tok.bos_token_id, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf.eval()(tokens).logits, atol=1e-4)


@pytest.mark.parametrize("name", ["nobody-org/no-such-model-xyz", "gpt2-not-a-model"])
def test_unloadable_model_names_the_default(name):
    with pytest.raises(UserError, match="cannot be loaded offline.*smollm2-135m"):
        load_model(name)


def test_missing_local_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_embedded_model_loads_from_cache(monkeypatch):
    import saelab.models as M

    load_model("smollm2-135m")  # builds the cache on a fresh machine
    # Later loads read the cached safetensors: the GGUF is never opened (dequantized) again.
    monkeypatch.setattr(M, "_gguf_dir", lambda: pytest.fail("dequantized the GGUF again"))
    model = load_model("smollm2-135m")
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab) == (30, 576, 49152)
    tok = load_tokenizer("smollm2-135m")
    ids = [tok.bos_token_id, *tok("In the beginning God created the")["input_ids"]]
    with torch.no_grad():
        top = model(torch.tensor([ids]))[0, -1].argmax().item()
    assert tok.decode([top]).strip() in ("heaven", "earth")  # a real model, not random weights
    with pytest.raises(UserError, match=r"layer 40 is beyond the model's 30 blocks \(0-29\)"):
        resolve_hook(model, "blocks.40.hook_resid_post")


def test_unreachable_hub_fails_fast(monkeypatch):
    import saelab.models as M

    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(M, "hub_reachable", lambda: False)
    with pytest.raises(UserError, match="cannot be loaded offline"):
        load_model("nobody-org/no-such-model-xyz")


def test_cache_dir_appears_whole_or_not_at_all(tmp_path):
    from saelab.models import _atomic_dir

    def fill_then_die(tmp):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # stands in for a kill half-way through the first load

    with pytest.raises(KeyboardInterrupt):
        _atomic_dir(tmp_path / "cache", fill_then_die)
    assert not (tmp_path / "cache").exists()
    assert _atomic_dir(tmp_path / "cache", lambda tmp: (tmp / "ok").write_text("1")).is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_model_dtype_is_bfloat16_on_cuda_and_on_cpus_with_bf16(monkeypatch, has_bf16):
    monkeypatch.delenv("SAELAB_CPU_BF16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
    assert cpu_has_bf16() is has_bf16
    want = torch.bfloat16 if has_bf16 else torch.float32
    assert resolve_model_dtype("auto", torch.device("cpu")) == want
    assert resolve_model_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_model_dtype("float32", torch.device("cuda")) == torch.float32
    assert resolve_model_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_cpu_bf16_detection_can_be_forced_and_defaults_to_float32(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv("SAELAB_CPU_BF16", "0")
    assert resolve_model_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setenv("SAELAB_CPU_BF16", "1")
    assert resolve_model_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.delenv("SAELAB_CPU_BF16")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe
    assert resolve_model_dtype("auto", torch.device("cpu")) == torch.float32
