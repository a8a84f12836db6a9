"""Evaluation on the run's held-out tokens: reconstruction, sparsity and downstream loss.

Reads the held-out row range the trainer recorded in cfg.json, streams it in order and
writes eval.json atomically. Downstream metrics (docs/algorithms.md §7) splice the SAE's
reconstruction into the model at its hook through forward hooks, on whole held-out contexts:
CE score = (L_abl − L_sae)/(L_abl − L_clean) with zero-ablation as L_abl (Gao et al. 2024,
arXiv 2406.04093), ΔCE = L_sae − L_clean, KL score = (KL_abl − KL_sae)/KL_abl. The g-SAE's
"with gradients" variant takes ∂CE/∂x from one backward per batch (Olmo et al., arXiv
2411.10397), since the harvest stores gradients only for training rows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saelab.archs import SparseCode
from saelab.config import EvalConfig
from saelab.errors import UserError
from saelab.metrics import ReconStats
from saelab.runs import EVAL, SYNTHETIC, OpenRun, finished_cfg, open_run, read_json, write_json
from saelab.sae import SparseCoder
from saelab.store import ActivationStore

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

SPLICE_TOKENS = 1024
"""Tokens per spliced forward: the [tokens, d_vocab] float32 logits (and their copies)
dominate memory, about 200 MB each at SmolLM2's 49k vocabulary."""


Encoder = Callable[[torch.Tensor, torch.Tensor | None], SparseCode]


def eval_modes(sae: SparseCoder, cfg: EvalConfig, has_grads: bool) -> dict[str, Encoder]:
    """The ways to encode held-out tokens: the inference rule first, then each alternative
    the papers report (batch selection, with gradients, adaptive pursuit)."""
    modes: dict[str, Encoder] = {"inference": lambda x, g: sae.encode(x)}
    if sae.arch == "gradient_topk" and has_grads:
        modes["with_grad"] = lambda x, g: sae.encode(x, grad=g)
    if sae.spec.threshold != "none" and sae.spec.trainable:  # a batch-level rule

        def batch_mode(x: torch.Tensor, g: torch.Tensor | None) -> SparseCode:
            saved = sae.threshold.clone()  # batch selection must not move the thresholds
            code = sae.encode(x, training=True)
            sae.threshold.copy_(saved)
            return code

        modes["batch"] = batch_mode
    if sae.arch == "matching_pursuit":
        modes["adaptive"] = lambda x, g: sae.encode(x, mp_tol=cfg.mp_tol, mp_max_steps=4 * sae.k)
    return modes


# ---------------------------------------------------------------------------------------
# Downstream: splicing a replacement for the hooked activation into the model.

Splice = Callable[[Tensor, Tensor | None], Tensor]
"""Replacement of hooked activations: (x [N, d_in], ∂CE/∂x [N, d_in] or None) → [N, d_in]."""


def heldout_contexts(store: ActivationStore, rows: tuple[int, int], limit: int) -> list[int]:
    """The first `limit` contexts all of whose activation rows lie in [rows[0], rows[1])."""
    start, stop = rows
    if stop <= start or limit <= 0:
        return []
    c0, p0 = store.locate(start)
    c1, p1 = store.locate(stop - 1)
    first = c0 if p0 == 1 else c0 + 1
    last = c1 if p1 == store.tokens_per_context else c1 - 1
    return list(range(first, min(last + 1, first + limit)))


def _splice_hook(fn: Splice, splice_from: int, grads: Tensor | None) -> Callable[..., Tensor]:
    def hook_fn(act: Tensor, hook: Any) -> Tensor:
        if act.ndim != 3:
            shape = tuple(act.shape)
            raise UserError(f"cannot splice into a hook of shape {shape}; need [B, P, d]")
        tail = act[:, splice_from:]
        g = None if grads is None else grads[:, splice_from:].reshape(-1, act.shape[-1])
        new = fn(tail.reshape(-1, act.shape[-1]), g).reshape(tail.shape).to(act.dtype)
        # A new tensor, never an in-place edit: the clean activation stays intact upstream.
        return torch.cat([act[:, :splice_from], new], 1)

    return hook_fn


def spliced_logits(
    model: TransformerBridge,
    hook: str,
    tokens: Tensor,
    fn: Splice,
    splice_from: int = 1,
    grads: Tensor | None = None,
) -> Tensor:
    """Logits [B, P, V] with positions ≥ splice_from of `hook` replaced by fn; hooks are
    removed on exit, so the model itself is never changed."""
    with model.hooks(fwd_hooks=[(hook, _splice_hook(fn, splice_from, grads))]):
        return model(tokens)


def clean_logits_and_grads(
    model: TransformerBridge, hook: str, tokens: Tensor
) -> tuple[Tensor, Tensor]:
    """Clean logits and ∂L/∂x at `hook`, L the summed next-token CE (as the harvest's grads),
    taken through a zero perturbation so that every path through the hook is counted."""
    box: dict[str, Tensor] = {}

    def add_delta(act: Tensor, hook: Any) -> Tensor:
        box["delta"] = torch.zeros_like(act, requires_grad=True)
        return act + box["delta"]

    with torch.enable_grad(), model.hooks(fwd_hooks=[(hook, add_delta)]):
        logits = model(tokens)
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"
        )
        (grad,) = torch.autograd.grad(loss, box["delta"])
    return logits.detach(), grad


class _Scored(NamedTuple):
    """Per-prediction quantities of one forward, from a single pass over its logits."""

    logits: Tensor
    """[b, P, V] float32 logits at the predicting positions."""

    lse: Tensor
    """[b, P] logsumexp of the logits."""

    target_logprob: Tensor
    """[b, P] log q(next token)."""


def _scored(logits: Tensor, targets: Tensor, splice_from: int) -> _Scored:
    # Logits at positions ≥ splice_from are the ones the splice can change. No full
    # log_softmax is materialised: at a 49k vocabulary each [tokens, V] pass costs as much
    # as a quarter of the model's forward on a CPU.
    lg = logits[:, splice_from:-1].float()
    lse = lg.logsumexp(-1)
    return _Scored(lg, lse, lg.gather(-1, targets).squeeze(-1) - lse)


@torch.no_grad()
def downstream_ce(
    model: TransformerBridge,
    hook: str,
    tokens: Tensor,
    splices: dict[str, Splice],
    splice_from: int = 1,
    with_grads: bool = False,
) -> dict[str, Any]:
    """Clean, zero-ablated and spliced next-token CE (and KL from clean) on `tokens` [C, n_ctx].

    CE and KL are averaged over predictions made at positions splice_from … n_ctx − 2.
    with_grads: pass each splice ∂CE/∂x of the clean model (one extra backward per batch).
    """
    n_ctx = tokens.shape[1]
    if not 1 <= splice_from < n_ctx - 1:
        raise UserError(f"splice_from={splice_from} leaves nothing to predict at n_ctx={n_ctx}")
    variants = {"zero_ablation": lambda x, g: torch.zeros_like(x), **splices}
    ce: dict[str, list[Tensor]] = {name: [] for name in ["clean", *variants]}
    kl = dict.fromkeys(variants, 0.0)
    per_batch = max(1, SPLICE_TOKENS // n_ctx)
    n = 0
    for lo in range(0, tokens.shape[0], per_batch):
        toks = tokens[lo : lo + per_batch]
        targets = toks[:, splice_from + 1 :, None]
        grads = None
        if with_grads:
            logits, grads = clean_logits_and_grads(model, hook, toks)
        else:
            logits = model(toks)
        clean = _scored(logits, targets, splice_from)
        ce["clean"].append(-clean.target_logprob.mean(-1))
        # KL(p‖q) per row = Σ p·log p − Σ p·logits_q + lse_q (as Σ p = 1): p and the
        # Σ p·log p term are computed once per batch, each variant costs one product.
        p = (clean.logits - clean.lse[..., None]).exp_()
        neg_entropy = (p * clean.logits).sum(-1, dtype=torch.float64) - clean.lse
        for name, fn in variants.items():
            q = _scored(
                spliced_logits(model, hook, toks, fn, splice_from, grads), targets, splice_from
            )
            ce[name].append(-q.target_logprob.mean(-1))
            cross = (p * q.logits).sum(-1, dtype=torch.float64) - q.lse
            kl[name] += float((neg_entropy - cross).sum())
        n += targets.numel()
    per_context = {k: torch.cat(v).double() for k, v in ce.items()}
    return _scores(per_context, {k: v / n for k, v in kl.items()}) | {
        "n_contexts": int(tokens.shape[0]),
        "n_tokens": n,
        "positions": [splice_from, n_ctx - 2],
        "splice_from": splice_from,
    }


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _paired_se(a: Tensor, b: Tensor) -> float | None:
    """Standard error of mean(a − b) over contexts (None with fewer than two)."""
    return float((a - b).std() / len(a) ** 0.5) if len(a) > 1 else None


def _scores(per_context: dict[str, Tensor], kl: dict[str, float]) -> dict[str, Any]:
    """CE scores from per-context mean CE [C] (every context predicts as many tokens)."""
    ce = {k: float(v.mean()) for k, v in per_context.items()}
    clean, abl, kl_abl = ce["clean"], ce["zero_ablation"], kl["zero_ablation"]
    variants = {
        name: {
            "ce": ce[name],
            "kl": kl[name],
            "delta_ce": ce[name] - clean,
            "delta_ce_se": _paired_se(per_context[name], per_context["clean"]),
            "ce_score": _ratio(abl - ce[name], abl - clean),
            "kl_score": _ratio(kl_abl - kl[name], kl_abl),
        }
        for name in kl
        if name != "zero_ablation"
    }
    return {"ce_clean": clean, "ce_ablation": abl, "kl_ablation": kl_abl, "variants": variants}


def context_tokens(store: ActivationStore, contexts: list[int], device: torch.device) -> Tensor:
    return torch.from_numpy(np.asarray(store.tokens()[contexts], dtype=np.int64)).to(device)


def load_spliceable_model(run_cfg: dict[str, Any], device: torch.device) -> Any:
    """The run's model with its hook enabled, or None (logged) when there is no model."""
    from saelab.models import enable_hooks, load_model, resolve_hook

    name = run_cfg.get("model")
    if not name or name == SYNTHETIC:
        log.info("downstream metrics skipped: the harvest has no model behind it (%s)", name)
        return None
    model = load_model(name, device=str(device))
    resolve_hook(model, run_cfg["hook"])
    enable_hooks(model, [run_cfg["hook"]])
    return model


def run_downstream(cfg: EvalConfig, run: OpenRun) -> dict[str, Any]:
    """The `downstream` section of eval.json: the SAE (inference rule) spliced on whole
    held-out contexts, and for gradient_topk also with on-the-fly gradients."""
    run_cfg, sae, store = run.cfg, run.sae, run.store
    contexts = heldout_contexts(store, run.heldout, cfg.ce_contexts)
    if not contexts:
        log.info("downstream metrics skipped: no whole context inside the held-out rows")
        return {"skipped": "no whole held-out context"}
    device = sae.W_dec.device
    model = load_spliceable_model(run_cfg, device)
    if model is None:
        return {"skipped": f"model '{run_cfg.get('model')}' cannot be run"}
    splices: dict[str, Splice] = {"sae": lambda x, g: sae(x)}
    grads = sae.arch == "gradient_topk"
    if grads:
        splices["with_grad"] = lambda x, g: sae(x, grad=g)
    tokens = context_tokens(store, contexts, device)
    res = downstream_ce(model, run_cfg["hook"], tokens, splices, cfg.splice_from, grads)
    return {**res, "contexts": contexts}


@torch.no_grad()
def evaluate(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    if not cfg.run:
        raise UserError("no run given; pass saelab eval runs/<name>")
    run = open_run(cfg.run, cfg.device)
    sae, store, device = run.sae, run.store, run.device
    start, stop = run.heldout
    if cfg.n_tokens:
        stop = min(stop, start + cfg.n_tokens)
    if stop <= start:
        raise UserError(f"{cfg.run} has no held-out tokens; retrain with --eval_tokens > 0")
    modes = eval_modes(sae, cfg, store.has_grads)
    stats = {name: ReconStats(sae.d_sae) for name in modes}
    for lo in tqdm(range(start, stop, cfg.batch_size), desc="eval", disable=not progress):
        hi = min(lo + cfg.batch_size, stop)
        x = store.read(lo, hi).to(device)
        g = store.read(lo, hi, kind="grads").to(device) if "with_grad" in modes else None
        for name, encode in modes.items():
            code = encode(x, g)
            stats[name].update(x, sae.decode(code), *code)
    results = {name: s.result() for name, s in stats.items()}
    result = {
        "run": str(cfg.run),
        "arch": sae.arch,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "hook": run.cfg["hook"],
        "eval_range": [start, stop],
        **results.pop("inference"),
        "modes": results,
    }
    result["dead_window_tokens"] = result["n_tokens"]
    if cfg.downstream and cfg.ce_contexts:
        _add_downstream(result, run_downstream(cfg, run))
    write_json(run.path / EVAL, result)
    return result


def _add_downstream(result: dict[str, Any], ds: dict[str, Any]) -> None:
    """Headline CE/KL numbers at the top level (and per mode), details under `downstream`."""
    result["downstream"] = ds
    keys = ("delta_ce", "delta_ce_se", "ce_score", "kl_score")
    for name, v in ds.get("variants", {}).items():
        target = result if name == "sae" else result["modes"].setdefault(name, {})
        target.update({k: v[k] for k in keys})


def eval_results(
    runs: list[Path], cfg: EvalConfig, progress: bool = True
) -> list[tuple[Path, dict[str, Any]]]:
    """Each finished run's eval.json, evaluated first where it is missing."""
    for run in runs:
        finished_cfg(run)  # every run checked before any is evaluated
    out = []
    for run in runs:
        path = run / EVAL
        if path.is_file():
            res = read_json(path, f"delete it and rerun saelab eval {run}")
        else:
            res = evaluate(dataclasses.replace(cfg, run=str(run)), progress)
        out.append((run, res))
    return out


def summary_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """A plain-text table of the headline metrics, one row per run."""
    head = ["run", "arch", "d_sae", "k", "FVU", "nMSE", "L0", "dead %", "dense %", "tokens"]
    body = [
        [
            Path(name).name,
            r["arch"],
            str(r["d_sae"]),
            str(r["k"]),
            f"{r['fvu']:.3f}",
            f"{r['normalized_mse']:.3f}",
            f"{r['l0']:.1f}",
            f"{100 * r['dead_frac']:.1f}",
            f"{100 * r['dense_frac']:.1f}",
            f"{r['n_tokens']:,}",
        ]
        for name, r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
