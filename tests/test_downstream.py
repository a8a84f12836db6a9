"""Splicing into the tiny model: identity gives the clean CE (score 1), zeros the ablation CE
(score 0), the model is left unchanged, gradients match autograd, and `saelab eval` writes
the downstream section for a run on a tiny-model harvest."""

import json

import numpy as np
import pytest
import torch

from saelab.config import EvalConfig
from saelab.evaluate import (
    _add_downstream,
    clean_logits_and_grads,
    downstream_ce,
    evaluate,
    heldout_contexts,
    run_downstream,
    spliced_logits,
)
from saelab.models import load_model
from saelab.runs import OpenRun
from saelab.sae import SparseCoder
from saelab.store import ActivationStore

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(2, 1000, (6, 12), generator=g)
    t[:, 0] = 1  # BOS
    return t


def _ce(logits, tokens, s):
    lp = logits[:, s:-1].float().log_softmax(-1)
    return float(-lp.gather(-1, tokens[:, s + 1 :, None]).mean())


@pytest.mark.parametrize("splice_from", [1, 4])
def test_identity_is_clean_and_zeros_is_ablation(tiny, tokens, splice_from):
    splices = {"identity": lambda x, g: x.clone(), "zeros": lambda x, g: torch.zeros_like(x)}
    res = downstream_ce(tiny, HOOK, tokens, splices, splice_from=splice_from)
    ident, zeros = res["variants"]["identity"], res["variants"]["zeros"]
    assert ident["ce"] == pytest.approx(res["ce_clean"], abs=1e-5)
    assert ident["ce_score"] == pytest.approx(1.0, abs=1e-4) and ident["kl"] == pytest.approx(
        0, abs=1e-6
    )
    assert ident["kl_score"] == pytest.approx(1.0, abs=1e-4)
    assert zeros["ce"] == pytest.approx(res["ce_ablation"], abs=1e-6)
    assert zeros["ce_score"] == pytest.approx(0.0, abs=1e-6) and zeros["kl_score"] == 0.0
    with torch.no_grad():
        clean = tiny(tokens)
    assert res["ce_clean"] == pytest.approx(_ce(clean, tokens, splice_from), abs=1e-5)
    assert res["n_tokens"] == tokens.shape[0] * (tokens.shape[1] - 1 - splice_from)
    assert res["positions"] == [splice_from, tokens.shape[1] - 2]


def test_ce_and_kl_match_brute_force_on_a_noisy_splice(tiny, tokens):
    """The one-pass CE/KL accumulation equals log_softmax + kl_div done the long way."""
    g = torch.Generator().manual_seed(1)
    noise = {}

    def noisy(x, _g):
        noise.setdefault("n", torch.randn(x.shape, generator=g) * 0.5)
        return x + noise["n"]

    s = 2
    res = downstream_ce(tiny, HOOK, tokens, {"noisy": noisy}, splice_from=s)
    with torch.no_grad():
        p = tiny(tokens)[:, s:-1].float().log_softmax(-1)
        q = spliced_logits(tiny, HOOK, tokens, noisy, s)[:, s:-1].float().log_softmax(-1)
    kl = float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum")) / p.shape[0]
    kl /= p.shape[1]
    targets = tokens[:, s + 1 :, None]
    ce = float(-q.gather(-1, targets).mean())
    noisy = res["variants"]["noisy"]
    assert noisy["kl"] == pytest.approx(kl, rel=1e-4) and kl > 1e-3
    assert noisy["ce"] == pytest.approx(ce, rel=1e-5)
    # ΔCE's standard error is over contexts, paired with the clean CE of the same context.
    diff = (p.gather(-1, targets) - q.gather(-1, targets)).squeeze(-1).mean(1).double()
    assert noisy["delta_ce_se"] == pytest.approx(float(diff.std()) / len(diff) ** 0.5, rel=1e-4)


def test_splice_keeps_early_positions_and_never_mutates(tiny, tokens):
    with torch.no_grad():
        clean = tiny(tokens)
        spliced = spliced_logits(tiny, HOOK, tokens, lambda x, g: torch.zeros_like(x), 5)
        after = tiny(tokens)
    # Causal model: predictions before the first spliced position are untouched.
    torch.testing.assert_close(spliced[:, :5], clean[:, :5])
    assert (spliced[:, 5:] - clean[:, 5:]).abs().max() > 1e-3
    torch.testing.assert_close(after, clean)  # the hook was removed
    assert not tiny.hook_dict[HOOK].fwd_hooks


def test_grads_match_autograd_and_reach_the_splice(tiny, tokens):
    leaf = {}

    def swap(act, hook):
        leaf["x"] = act.detach().requires_grad_(True)
        return leaf["x"]

    with torch.enable_grad():
        logits = tiny.run_with_hooks(tokens, fwd_hooks=[(HOOK, swap)])
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"
        )
        (want,) = torch.autograd.grad(loss, leaf["x"])
    got_logits, got = clean_logits_and_grads(tiny, HOOK, tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_logits, logits.detach())
    seen = []
    res = downstream_ce(
        tiny, HOOK, tokens, {"g": lambda x, g: seen.append(g) or x}, splice_from=2, with_grads=True
    )
    torch.testing.assert_close(seen[0], want[:, 2:].reshape(-1, want.shape[-1]))
    assert res["variants"]["g"]["ce_score"] == pytest.approx(1.0, abs=1e-4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, model_harvest, trained_run):
    root = tmp_path_factory.mktemp("ds")
    h = model_harvest(root, hook=HOOK, n_tokens=15 * 64, batch_size=16)
    return trained_run(
        root / "r",
        harvest=h,
        d_sae=128,
        k=8,
        batch_size=64,
        eval_tokens=15 * 16 + 7,  # not a whole number of contexts: the first one is partial
        dead_tokens=500,
    )


def test_heldout_contexts_lie_inside_eval_range(tiny_run):
    cfg = json.loads((tiny_run / "cfg.json").read_text())
    store = ActivationStore(cfg["harvest"])
    start, stop = cfg["eval_range"]
    ctxs = heldout_contexts(store, (start, stop), 100)
    tpc = store.tokens_per_context
    assert ctxs and all(start <= c * tpc and (c + 1) * tpc <= stop for c in ctxs)
    assert len(ctxs) == (stop - start) // tpc  # every whole context, none partial
    assert heldout_contexts(store, (start, stop), 3) == ctxs[:3]
    assert heldout_contexts(store, (start + 1, start + tpc), 5) == []


def test_eval_writes_downstream_section(tiny_run):
    res = evaluate(EvalConfig(run=str(tiny_run), ce_contexts=4), progress=False)
    ds = res["downstream"]
    assert ds["n_contexts"] == 4 and len(ds["contexts"]) == 4
    assert ds["n_tokens"] == 4 * 14 and ds["positions"] == [1, 14]
    sae = ds["variants"]["sae"]
    assert res["delta_ce"] == sae["delta_ce"] == pytest.approx(sae["ce"] - ds["ce_clean"])
    assert res["ce_score"] == sae["ce_score"] and np.isfinite(res["ce_score"])
    on_disk = json.loads((tiny_run / "eval.json").read_text())
    assert on_disk["delta_ce"] == res["delta_ce"] and "kl_score" in on_disk
    off = evaluate(EvalConfig(run=str(tiny_run), downstream=False), progress=False)
    assert "downstream" not in off and "delta_ce" not in off


def test_gradient_topk_also_reports_with_gradients(tiny_run):
    run_cfg = json.loads((tiny_run / "cfg.json").read_text())
    sae = SparseCoder(64, 128, 8, "gradient_topk", beta=4.0)
    store = ActivationStore(run_cfg["harvest"], run_cfg["hook"])
    run = OpenRun(tiny_run, run_cfg, sae, store, torch.device("cpu"))
    ds = run_downstream(EvalConfig(ce_contexts=2), run)
    plain, with_grad = ds["variants"]["sae"], ds["variants"]["with_grad"]
    assert plain["ce"] != with_grad["ce"]  # the gradients changed which latents fire
    result = {"modes": {}}
    _add_downstream(result, ds)
    assert result["modes"]["with_grad"]["delta_ce"] == with_grad["delta_ce"]
