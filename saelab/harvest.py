"""Record a model's activations (and optionally loss gradients) to resumable shards on disk.

The files are `saelab.shards`'s format (see there): shards first, then the meta.json that
lists them, so a killed harvest resumes after its last listed shard and ends byte-identical
to an uninterrupted one. A rerun of a finished harvest re-hashes every listed file before it
reports the harvest ready, and refuses with the repair hint (`shards.REPAIR`) if one is bad.

Gradients (``grads``) are ``dL/dx`` at each hooked activation ``x``, where ``L`` is the sum of
the next-token cross-entropies over the context; they need the full forward and a backward.
Each is taken through a zero perturbation added at its hook, so with several hooks every
gradient is still the total derivative through all later layers.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saelab import __version__
from saelab.config import HarvestConfig
from saelab.corpus import contexts, load_texts
from saelab.errors import UserError
from saelab.models import enable_hooks, load_model, resolve_device, resolve_hook, stop_layer
from saelab.runs import LOCK, writer_lock
from saelab.shards import (
    FORMAT,
    META,
    STORE_DTYPES,
    TOKENS,
    read_meta,
    save_npy,
    sha256_file,
    write_meta,
    write_shard,
)
from saelab.store import ActivationStore

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

# Fields that define a harvest; a directory made with other values is never touched.
IDENTITY = ("model", "hooks", "n_ctx", "dtype", "corpus", "seed", "grads", "n_contexts")
# Heads-split hooks ([batch, pos, head, d_head]) are stored with the heads concatenated.
_HEAD_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")


def harvest_dir(cfg: HarvestConfig) -> Path:
    return Path(cfg.out or f"cached_activations/{Path(cfg.model).name}-{cfg.hooks[0]}")


def n_contexts_for(cfg: HarvestConfig) -> int:
    return math.ceil(cfg.n_tokens / (cfg.n_ctx - 1))


# ---------------------------------------------------------------------------------------
# Checks done before anything is written


def _identity(cfg: HarvestConfig, n_contexts: int) -> dict[str, Any]:
    corpus = {"spec": cfg.corpus, "text_field": cfg.text_field, "split": cfg.split}
    return {
        "model": cfg.model,
        "hooks": list(cfg.hooks),
        "n_ctx": cfg.n_ctx,
        "dtype": cfg.dtype,
        "corpus": corpus,
        "seed": cfg.seed,
        "grads": cfg.grads,
        "n_contexts": n_contexts,
    }


def _check_same(out: Path, meta: dict[str, Any], want: dict[str, Any]) -> None:
    if meta.get("format") != FORMAT:
        raise UserError(f"{out} has harvest format {meta.get('format')}, not {FORMAT}; delete it")
    for key in IDENTITY:
        if meta.get(key) != want[key]:
            had, asked = meta.get(key), want[key]
            if key == "n_contexts":  # users set n_tokens; n_contexts is derived from it
                per = want["n_ctx"] - 1
                key, had, asked = "n_tokens", meta.get("n_tokens_planned"), asked * per
            raise UserError(
                f"{out} was harvested with {key}={had!r}, but {asked!r} was asked for; pass "
                "another --out or delete the directory"
            )


def _check_foreign(out: Path) -> None:
    ours = {TOKENS, "acts", "grads", LOCK}
    temp = lambda p: p.name.startswith(".") and p.name.endswith(".tmp")  # noqa: E731
    if out.is_dir() and any(p.name not in ours and not temp(p) for p in out.iterdir()):
        raise UserError(f"{out} exists and is not a harvest; pass another --out or delete it")


def _check_disk(out: Path, need: int) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise UserError(
            f"harvest needs {need / 1e9:.2f} GB but {probe} has {free / 1e9:.2f} GB free; "
            "free some space, lower n_tokens or pick another --out"
        )


# ---------------------------------------------------------------------------------------
# Recording


def _flat(act: torch.Tensor, hook: str) -> torch.Tensor:
    """[batch, pos, d] view of a hooked activation."""
    if act.ndim == 4 and hook.endswith(_HEAD_HOOKS):
        return act.flatten(2)
    if act.ndim != 3:
        raise UserError(
            f"hook {hook} has shape {tuple(act.shape)}; only per-token [batch, pos, d] hooks "
            "can be harvested"
        )
    return act


def _probe_d_in(model: TransformerBridge, hooks: list[str], stop: int | None) -> int:
    widths: dict[str, int] = {}

    def grab(act: torch.Tensor, hook: Any, name: str) -> None:
        widths[name] = _flat(act, name).shape[-1]

    tokens = torch.ones((1, 4), dtype=torch.long, device=model.cfg.device)
    fwd = [(h, lambda a, hook, h=h: grab(a, hook, h)) for h in hooks]
    try:
        with torch.inference_mode(), model.hooks(fwd_hooks=fwd):
            model(tokens, stop_at_layer=stop)
    except ValueError as e:  # the bridge refuses hooks it cannot fire
        raise UserError(f"cannot record {', '.join(hooks)}: {e}; pick another hook") from None
    if missing := [h for h in hooks if h not in widths]:
        raise UserError(f"hook {missing[0]} never fires in a forward pass; pick another hook")
    if len(set(widths.values())) > 1:
        raise UserError(
            f"hooks have different widths ({widths}); harvest them under separate --out folders"
        )
    return widths[hooks[0]]


class _Enough(Exception):
    """Raised by the last hook of a forward: nothing after it is needed (e.g. the unembed)."""


class _Recorder:
    """Forward hooks that copy each batch's activations (BOS dropped) into shard buffers."""

    def __init__(self, model: TransformerBridge, hooks: list[str], grads: bool) -> None:
        self.model, self.hooks, self.grads = model, hooks, grads
        self.bufs: dict[str, torch.Tensor] = {}
        self.rows = slice(0, 0)
        self.live: dict[str, torch.Tensor] = {}
        self.fired = 0

    def _store(self, kind: str, hook: str, act: torch.Tensor) -> None:
        act = _flat(act, hook)[:, 1:]
        # Copy straight into the storage dtype: one pass, no float32 staging copy.
        self.bufs[f"{kind}/{hook}"][self.rows].view(act.shape).copy_(act)

    def _hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor | None:  # hook= comes by keyword
            self._store("acts", name, act.detach())
            self.fired += 1
            if not self.grads:
                if self.fired == len(self.hooks):
                    raise _Enough
                return None
            # dL/d(delta) at delta = 0 is dL/dx for the activation as the model uses it.
            # Marking `act` itself would miss paths where the bridge re-derives a hook's
            # value (hook_resid_mid), and a detached leaf would cut the paths between hooks.
            delta = torch.zeros_like(act, requires_grad=True)
            self.live[name] = delta
            return act + delta

        return fn

    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        return [(h, self._hook(h)) for h in self.hooks]

    def run(self, tokens: torch.Tensor, stop: int | None) -> None:
        self.fired = 0
        if self.grads:
            self._run_with_grads(tokens)
        else:
            # stop_at_layer skips whole blocks; _Enough also skips the rest of the last one
            # and the unembed when the hook sits in the final block.
            with torch.inference_mode():
                try:
                    self.model(tokens, stop_at_layer=stop)
                except _Enough:
                    pass
        # An unfired hook would leave uninitialised rows in the shard buffer.
        assert self.fired == len(self.hooks), f"{self.fired} of {len(self.hooks)} hooks fired"

    def _run_with_grads(self, tokens: torch.Tensor) -> None:
        with torch.enable_grad():
            logits = self.model(tokens)
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"
            )
            loss.backward()
        for h in self.hooks:
            self._store("grads", h, self.live.pop(h).grad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# The driver


def _new_meta(cfg: HarvestConfig, ident: dict[str, Any], d_in: int, tokens_sha: str) -> dict:
    per = cfg.n_ctx - 1
    return {
        "format": FORMAT,
        "saelab_version": __version__,
        **ident,
        "d_in": d_in,
        "tokens_per_context": per,
        "n_tokens_planned": ident["n_contexts"] * per,
        "n_tokens": 0,
        "shard_contexts": cfg.shard_contexts,
        "batch_size": cfg.batch_size,
        "complete": False,
        "tokens_sha256": tokens_sha,
        "shards": [],
    }


def _check_tokens(out: Path, meta: dict[str, Any]) -> Path:
    path = out / TOKENS
    if not path.is_file() or sha256_file(path) != meta["tokens_sha256"]:
        raise UserError(f"{path} is missing or corrupt; delete {out} and harvest again")
    return path


def _load_tokens(out: Path, meta: dict[str, Any]) -> np.ndarray:
    return np.load(_check_tokens(out, meta))


def _finished(meta: dict[str, Any]) -> bool:
    """Complete and still listing every shard. Following the repair hint (deleting a damaged
    shard's entry and later ones) leaves "complete" true; the rerun must then redo them."""
    shards = meta["shards"]
    return bool(meta["complete"] and shards and shards[-1]["context_stop"] == meta["n_contexts"])


def _verify_complete(out: Path, meta: dict[str, Any]) -> None:
    """Re-hash tokens.npy and every file of every listed shard (all hooks and kinds).

    A rerun that reports a harvest ready vouches for it, so it reads it all once (about 1 GB/s)
    rather than trust a meta.json that a damaged or deleted shard file no longer matches.
    """
    _check_tokens(out, meta)
    n = sum(len(shard["files"]) for shard in meta["shards"])
    log.info("verifying the checksums of %d shard files in %s", n, out)
    ActivationStore(out, meta["hooks"][0]).verify()


def _remove_temps(out: Path) -> None:
    for tmp in out.rglob(".*.tmp"):
        tmp.unlink()


def _planned_bytes(meta: dict[str, Any], start_contexts: int, itemsize: int) -> int:
    kinds = 2 if meta["grads"] else 1
    rows = (meta["n_contexts"] - start_contexts) * meta["tokens_per_context"]
    return rows * meta["d_in"] * itemsize * kinds * len(meta["hooks"])


def _prepare(
    cfg: HarvestConfig, out: Path, meta: dict[str, Any] | None, ident: dict[str, Any]
) -> tuple[Any, dict[str, Any], np.ndarray, int | None]:
    """Validate everything and load the model; write only once nothing can fail any more.

    meta: the directory's meta.json, already checked against ident (None if there is none).
    """
    if meta is None:
        _check_foreign(out)
    texts = load_texts(cfg.corpus, cfg.text_field, cfg.split, cfg.seed)
    model = load_model(cfg.model, device=str(resolve_device(cfg.device)))
    if cfg.n_ctx > model.cfg.n_ctx:
        raise UserError(f"n_ctx={cfg.n_ctx} exceeds the model's {model.cfg.n_ctx}; lower n_ctx")
    if len(set(cfg.hooks)) != len(cfg.hooks):
        raise UserError(f"hooks {cfg.hooks} name a hook twice; list each once")
    for h in cfg.hooks:
        resolve_hook(model, h)
    enable_hooks(model, cfg.hooks)
    stop = None if cfg.grads else stop_layer(model, cfg.hooks)
    d_in = _probe_d_in(model, cfg.hooks, stop)
    if meta is not None:
        if meta["d_in"] != d_in:
            raise UserError(
                f"{out} holds d_in={meta['d_in']} but the model gives {d_in}; pass another "
                "--out or delete the directory"
            )
        tokens = _load_tokens(out, meta)
    else:
        tokens = contexts(texts, model.tokenizer, cfg.n_ctx, ident["n_contexts"])
        meta = _new_meta(cfg, ident, d_in, "")
    itemsize = torch.empty((), dtype=STORE_DTYPES[cfg.dtype]).element_size()
    done = meta["shards"][-1]["context_stop"] if meta["shards"] else 0
    extra = 0 if meta["tokens_sha256"] else tokens.nbytes
    _check_disk(out, _planned_bytes(meta, done, itemsize) + extra)
    return model, meta, tokens, stop


def _limit_threads() -> None:
    # torch sizes its pool by the machine's cores; in a container limited to fewer, the extra
    # threads only contend (with each other and with the writer thread).
    if hasattr(os, "sched_getaffinity"):
        usable = len(os.sched_getaffinity(0))
        if torch.get_num_threads() > usable:
            torch.set_num_threads(usable)


def harvest(cfg: HarvestConfig, progress: bool = True) -> Path:
    """Harvest (or resume) ``cfg`` into `harvest_dir(cfg)` and return that directory."""
    out = harvest_dir(cfg)
    with writer_lock(out, "harvest"):
        return _harvest(cfg, out, progress)


def _harvest(cfg: HarvestConfig, out: Path, progress: bool) -> Path:
    meta = read_meta(out) if (out / META).is_file() else None
    ident = _identity(cfg, n_contexts_for(cfg))
    if meta is not None:
        _check_same(out, meta, ident)
        if _finished(meta):
            _verify_complete(out, meta)
            log.info("%s is already complete (checksums verified)", out)
            return out
    model, meta, tokens, stop = _prepare(cfg, out, meta, ident)
    _limit_threads()
    out.mkdir(parents=True, exist_ok=True)
    _remove_temps(out)
    if not meta["tokens_sha256"]:
        meta["tokens_sha256"] = save_npy(out / TOKENS, tokens)
        write_meta(out, meta)
    _run_shards(model, meta, tokens, stop, out, progress)
    return out


def _run_shards(
    model: Any, meta: dict, tokens: np.ndarray, stop: int | None, out: Path, progress: bool
) -> None:
    n, sc, bs = meta["n_contexts"], meta["shard_contexts"], meta["batch_size"]
    per = meta["tokens_per_context"]
    rec = _Recorder(model, meta["hooks"], meta["grads"])
    kinds = ["acts", "grads"] if meta["grads"] else ["acts"]
    dtype = STORE_DTYPES[meta["dtype"]]
    tokens_t = torch.from_numpy(tokens).long()
    start = len(meta["shards"])
    bar = tqdm(
        total=meta["n_tokens_planned"], initial=meta["n_tokens"], unit="tok", unit_scale=True,
        disable=not progress, desc=f"harvest {out.name}", smoothing=0.1,
    )  # fmt: skip
    try:
        pending: Future | None = None
        with ThreadPoolExecutor(max_workers=1) as writer, model.hooks(fwd_hooks=rec.fwd_hooks()):
            for index in range(start, math.ceil(n / sc)):
                c0, c1 = index * sc, min((index + 1) * sc, n)
                rows = (c1 - c0) * per
                keys = [f"{k}/{h}" for k in kinds for h in meta["hooks"]]
                rec.bufs = {k: torch.empty((rows, meta["d_in"]), dtype=dtype) for k in keys}
                # Batches start at the shard boundary, so a resumed shard sees the same batches.
                for b0 in range(c0, c1, bs):
                    b1 = min(b0 + bs, c1)
                    rec.rows = slice((b0 - c0) * per, (b1 - c0) * per)
                    rec.run(tokens_t[b0:b1].to(model.cfg.device), stop)
                    bar.update((b1 - b0) * per)
                if pending is not None:
                    pending.result()  # at most one shard in flight: bounded memory, ordered meta
                pending = writer.submit(write_shard, out, meta, index, c0, c1, rec.bufs)
            if pending is not None:
                pending.result()
    finally:
        bar.close()  # before any error line, so it does not share the bar's line
