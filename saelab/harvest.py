"""Record a model's activations (and optionally loss gradients) to resumable shards on disk.

The files are `saelab.shards`'s format (see there): shard files first, then the log line
that lists them, so a killed harvest resumes by making the shards its log does not list and
ends byte-identical to an uninterrupted one. A rerun of a finished harvest re-hashes every
listed file before it reports the harvest ready, and refuses with the repair hint
(`shards.REPAIR`) if one is bad.

The model runs in ``model_dtype`` (part of the harvest's identity). The corpus is tokenized as
the forwards need it (`saelab.corpus.iter_contexts`), each shard's windows written to
tokens.npy before the shard is logged; a resume re-tokenizes the contexts of listed shards and
refuses if they no longer match tokens.npy (the corpus changed). `saelab.harvest_array` writes
activations a user already has as a harvest through the same writers.

Under ``torchrun --nproc_per_node=N`` the N processes share one harvest (see `harvest`): rank
r makes every N-th missing shard, rank 0 writes every other file, and the folder is the same
bytes as one process's.

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
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saelab import __version__
from saelab.config import HarvestConfig
from saelab.corpus import iter_contexts, load_texts
from saelab.distributed import Dist, init, launched, local_device
from saelab.errors import UserError
from saelab.models import (
    enable_hooks,
    load_model,
    resolve_device,
    resolve_hook,
    resolve_model_dtype,
    stop_layer,
)
from saelab.runs import LOCK, writer_lock
from saelab.shards import (
    CHECKED,
    FORMAT,
    LOG,
    META,
    NP_DTYPES,
    READ_FORMATS,
    STORE_DTYPES,
    TOKENS,
    VERIFIER,
    TokensFile,
    check_header,
    convert_v1,
    covers,
    cut_torn_tail,
    finish,
    log_shards,
    read_meta,
    sha256_file,
    shard_entry,
    shard_path,
    write_meta,
    write_shard_files,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

# Fields that define a harvest; a directory made with other values is never touched.
IDENTITY = (
    "model", "model_dtype", "hooks", "n_ctx", "dtype", "corpus", "seed", "grads", "n_contexts"
)  # fmt: skip
# What harvests from before a field existed were made with.
_LEGACY = {"model_dtype": "float32"}
# Heads-split hooks ([batch, pos, head, d_head]) are stored with the heads concatenated.
_HEAD_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")


def harvest_dir(cfg: HarvestConfig) -> Path:
    return Path(cfg.out or f"cached_activations/{Path(cfg.model).name}-{cfg.hooks[0]}")


def n_contexts_for(cfg: HarvestConfig) -> int:
    return math.ceil(cfg.n_tokens / (cfg.n_ctx - 1))


# ---------------------------------------------------------------------------------------
# Checks done before anything is written


def _identity(cfg: HarvestConfig, n_contexts: int, device: torch.device) -> dict[str, Any]:
    corpus = {"spec": cfg.corpus, "text_field": cfg.text_field, "split": cfg.split}
    model_dtype = resolve_model_dtype(cfg.model_dtype, device)
    return {
        "model": cfg.model,
        "model_dtype": str(model_dtype).removeprefix("torch."),
        "hooks": list(cfg.hooks),
        "n_ctx": cfg.n_ctx,
        "dtype": cfg.dtype,
        "corpus": corpus,
        "seed": cfg.seed,
        "grads": cfg.grads,
        "n_contexts": n_contexts,
    }


def _keep_started_dtype(cfg: HarvestConfig, meta: dict[str, Any], ident: dict[str, Any]) -> None:
    """model_dtype 'auto' picks a dtype for a new harvest; one already started keeps the dtype
    it began with (whatever auto meant then, e.g. float32 before CPUs with bf16 got bfloat16),
    so a rerun resumes it instead of refusing it."""
    if cfg.model_dtype == "auto":
        ident["model_dtype"] = meta.get("model_dtype", _LEGACY["model_dtype"])


def _check_same(out: Path, meta: dict[str, Any], want: dict[str, Any]) -> None:
    if meta.get("format") not in READ_FORMATS:
        raise UserError(f"{out} has harvest format {meta.get('format')}, not {FORMAT}; delete it")
    for key in IDENTITY:
        had = meta.get(key, _LEGACY.get(key))
        if had != want[key]:
            asked = want[key]
            if key == "n_contexts":  # users set n_tokens; n_contexts is derived from it
                per = want["n_ctx"] - 1
                key, had, asked = "n_tokens", meta.get("n_tokens_planned"), asked * per
            raise UserError(
                f"{out} was harvested with {key}={had!r}, but {asked!r} was asked for; pass "
                "another --out or delete the directory"
            )


def _check_foreign(out: Path) -> None:
    ours = {TOKENS, LOG, CHECKED, "acts", "grads", LOCK}
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


def _new_meta(ident: dict[str, Any], d_in: int, shard_contexts: int, batch_size: int) -> dict:
    per = ident["n_ctx"] - 1
    return {
        "format": FORMAT,
        "saelab_version": __version__,
        **ident,
        "d_in": d_in,
        "tokens_per_context": per,
        "n_tokens_planned": ident["n_contexts"] * per,
        "n_tokens": 0,
        "shard_contexts": shard_contexts,
        "batch_size": batch_size,
        "complete": False,
        "tokens_sha256": "",
        "shards": [],
    }


def _batch_size(cfg: HarvestConfig, device: torch.device) -> int:
    """``batch_size`` 0 (auto): 16 contexts on CPU; on CUDA about 32k tokens per forward, or 16
    with gradients (the backward keeps the logits, [batch, n_ctx, vocab] in float32)."""
    if cfg.batch_size:
        return cfg.batch_size
    if device.type != "cuda" or cfg.grads:
        return 16
    return max(16, min(cfg.shard_contexts, 32768 // cfg.n_ctx))


class _Feed:
    """The corpus's token windows, drawn in order, block by block (`iter_contexts`)."""

    def __init__(self, blocks: Callable[[], Any], n_ctx: int, wanted: int, chunk: int) -> None:
        self._make, self.n_ctx, self.wanted, self.chunk = blocks, n_ctx, wanted, chunk
        self.restart()

    def restart(self) -> None:
        """Back to the corpus's first window (the stream is tokenized again)."""
        self._blocks = self._make()
        self._left = np.empty((0, self.n_ctx), np.int32)
        self.taken = 0

    def prime(self) -> None:
        """Tokenize the first block now: a bad corpus, or one too short to fill it, fails
        before anything is written (only the last block of a corpus is short)."""
        self._left = self._next()
        if len(self._left) < min(self.wanted, self.chunk):
            self.taken = len(self._left)
            self._blocks = iter(())
            self._next()

    def _next(self) -> np.ndarray:
        block = next(self._blocks, None)
        if block is None:
            raise UserError(
                f"the corpus fills only {self.taken} full contexts of {self.n_ctx} tokens; "
                f"{self.wanted} were asked for ({self.wanted * (self.n_ctx - 1)} tokens): "
                "lower n_tokens (and pick another --out) or use a bigger corpus"
            )
        return block

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n:
            if not len(self._left):
                self._left = self._next()
            parts.append(self._left[:n])
            self._left = self._left[n:]
            n -= len(parts[-1])
            self.taken += len(parts[-1])
        return np.concatenate(parts) if len(parts) != 1 else parts[0]


def _check_tokens(out: Path, meta: dict[str, Any]) -> Path:
    path = out / TOKENS
    if not path.is_file() or sha256_file(path) != meta["tokens_sha256"]:
        raise UserError(f"{path} is missing or corrupt; delete {out} and harvest again")
    return path


def _finished(meta: dict[str, Any]) -> bool:
    """Complete and still listing every shard. Following the repair hint (deleting a damaged
    shard's entry and later ones) leaves "complete" true in a format-1 meta.json; the rerun
    must then redo them."""
    return bool(meta["complete"] and covers(meta["shards"], meta["n_contexts"]))


def _verify_complete(out: Path, meta: dict[str, Any], dist: Dist) -> None:
    """Re-hash tokens.npy and every file of every listed shard (all hooks and kinds); rank r
    of N takes every N-th shard, so the ranks share the reading and none waits long.

    A rerun that reports a harvest ready vouches for it, so it reads it all once (about 1 GB/s)
    rather than trust a log that a damaged or deleted shard file no longer matches.
    """
    if dist.main:
        _check_tokens(out, meta)
        n = sum(len(shard["files"]) for shard in meta["shards"])
        log.info("verifying the checksums of %d shard files in %s", n, out)
    for shard in meta["shards"][dist.rank :: dist.world]:
        rows = shard["token_stop"] - shard["token_start"]
        for rel, sha in shard["files"].items():
            check_header(out / rel, rows, meta["d_in"], NP_DTYPES[meta["dtype"]])
            VERIFIER.forget(out / rel, sha)  # hashed again, whatever this process has seen
            VERIFIER.check(out / rel, sha)


def _remove_temps(out: Path) -> None:
    for tmp in out.rglob(".*.tmp"):
        tmp.unlink()


def _planned_bytes(meta: dict[str, Any], itemsize: int) -> int:
    kinds = 2 if meta["grads"] else 1
    done = sum(s["context_stop"] - s["context_start"] for s in meta["shards"])
    rows = (meta["n_contexts"] - done) * meta["tokens_per_context"]
    return rows * meta["d_in"] * itemsize * kinds * len(meta["hooks"])


def _prepare(
    cfg: HarvestConfig,
    out: Path,
    meta: dict[str, Any] | None,
    ident: dict[str, Any],
    device: torch.device,
) -> tuple[Any, dict[str, Any], _Feed, int | None]:
    """Validate everything and load the model; write only once nothing can fail any more.

    meta: the directory's merged meta, already checked against ident (None if there is none).
    """
    if meta is None:
        _check_foreign(out)
    texts = [load_texts(cfg.corpus, cfg.text_field, cfg.split, cfg.seed)]
    dtype = STORE_DTYPES[ident["model_dtype"]]
    model = load_model(cfg.model, device=str(device), dtype=dtype)
    if cfg.n_ctx > model.cfg.n_ctx:
        raise UserError(f"n_ctx={cfg.n_ctx} exceeds the model's {model.cfg.n_ctx}; lower n_ctx")
    if len(set(cfg.hooks)) != len(cfg.hooks):
        raise UserError(f"hooks {cfg.hooks} name a hook twice; list each once")
    for h in cfg.hooks:
        resolve_hook(model, h)
    enable_hooks(model, cfg.hooks)
    stop = None if cfg.grads else stop_layer(model, cfg.hooks)
    d_in = _probe_d_in(model, cfg.hooks, stop)
    if meta is not None and meta["d_in"] != d_in:
        raise UserError(
            f"{out} holds d_in={meta['d_in']} but the model gives {d_in}; pass another "
            "--out or delete the directory"
        )
    fresh = meta is None
    if meta is None:
        meta = _new_meta(ident, d_in, cfg.shard_contexts, _batch_size(cfg, device))
    n = meta["n_contexts"]
    chunk = min(n, 1024)

    def blocks() -> Any:  # the texts already opened, then the corpus afresh on a restart
        src = texts.pop() if texts else load_texts(cfg.corpus, cfg.text_field, cfg.split, cfg.seed)
        return iter_contexts(src, model.tokenizer, cfg.n_ctx, chunk)

    feed = _Feed(blocks, cfg.n_ctx, n, chunk)
    feed.prime()
    itemsize = torch.empty((), dtype=STORE_DTYPES[cfg.dtype]).element_size()
    extra = n * cfg.n_ctx * 4 if fresh else 0
    _check_disk(out, _planned_bytes(meta, itemsize) + extra)
    return model, meta, feed, stop


def _limit_threads() -> None:
    # torch sizes its pool by the machine's cores; in a container limited to fewer, the extra
    # threads only contend (with each other and with the writer thread).
    if hasattr(os, "sched_getaffinity"):
        usable = len(os.sched_getaffinity(0))
        if torch.get_num_threads() > usable:
            torch.set_num_threads(usable)


@dataclass
class _Ranks:
    """This process among the ranks of one harvest, and the device its collectives use."""

    dist: Dist
    device: torch.device

    def step(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on every rank; if it failed on any, every rank raises (a failed one its
        own error), so none waits forever for a rank that stopped."""
        try:
            result, err = fn(), None
        except (UserError, OSError) as e:
            result, err = None, e
        self.agree(err)
        return result

    def agree(self, err: BaseException | None) -> None:
        failed = torch.tensor([float(err is not None)], device=self.device)
        if self.dist.all_reduce_(failed).item():
            raise err or UserError(
                "another rank of this harvest stopped with the error it printed; fix that and "
                "run the same command again (it resumes)"
            )


def harvest(cfg: HarvestConfig, progress: bool = True, dist: Dist | None = None) -> Path:
    """Harvest (or resume) ``cfg`` into `harvest_dir(cfg)` and return that directory.

    Under ``torchrun --nproc_per_node=N`` every rank calls this (``dist``: the job's, from
    `saelab.distributed.init`; pass `SINGLE` to harvest alone in one rank of a job). Rank 0
    holds the writer lock and alone writes meta.json, tokens.npy and the log. The shards still
    missing are dealt out in rounds of N, rank r making the r-th of each; after a round, the
    ranks gather their shards' checksums and rank 0 logs the round in index order. Every rank
    tokenizes the corpus itself (the same windows) and makes a shard from the same batches as
    one process would, so the folder is byte-identical whatever N, and a killed harvest
    resumes with any N, making only the shards its log does not list.
    """
    out = harvest_dir(cfg)
    if dist is None and launched() and cfg.device.startswith("cuda:"):
        raise UserError(
            f"--device {cfg.device} puts every process on one GPU; under torchrun pass --device "
            "cuda (or auto): each process then takes its own GPU (LOCAL_RANK)"
        )
    device = local_device(resolve_device(cfg.device))
    ranks = _Ranks(init(device) if dist is None else dist, device)
    with ExitStack() as stack:
        return _harvest(cfg, out, ranks, stack, progress)


def _read_meta(out: Path) -> dict[str, Any] | None:
    return read_meta(out) if (out / META).is_file() else None


def _harvest(
    cfg: HarvestConfig, out: Path, ranks: _Ranks, stack: ExitStack, progress: bool
) -> Path:
    main = ranks.dist.main
    ident = _identity(cfg, n_contexts_for(cfg), ranks.device)

    def lock_and_check() -> dict[str, Any] | None:
        if not main:
            return None
        stack.enter_context(writer_lock(out, "harvest"))
        meta = _read_meta(out)
        if meta is not None:
            _keep_started_dtype(cfg, meta, ident)
            _check_same(out, meta, ident)
        return meta

    meta = ranks.step(lock_and_check)
    if ranks.dist.active:  # the others read only once rank 0 holds the lock (no writer then)
        meta = ranks.step(lambda: meta if main else _read_meta(out))
        if meta is not None:
            _keep_started_dtype(cfg, meta, ident)
    if meta is not None and _finished(meta):
        ranks.step(lambda: _verify_complete(out, meta, ranks.dist))
        if main:
            log.info("%s is already complete (checksums verified)", out)
        return out
    fresh = meta is None
    model, meta, feed, stop = ranks.step(lambda: _prepare(cfg, out, meta, ident, ranks.device))
    _limit_threads()

    def start() -> tuple[TokensFile | None, int]:
        tokens = None
        if main:
            out.mkdir(parents=True, exist_ok=True)
            _remove_temps(out)
            tokens = TokensFile(out, meta["n_contexts"], meta["n_ctx"], create=fresh)
            stack.callback(tokens.close)
            if fresh:
                write_meta(out, meta)
            elif meta["format"] == 1:
                convert_v1(out, meta)
            else:
                cut_torn_tail(out)
        meta["tokens_sha256"] = ""  # hashed once the last shard is logged
        return tokens, _skip_done(meta, feed, tokens, out)

    tokens, next_index = ranks.step(start)
    _run_shards(model, meta, feed, next_index, tokens, stop, out, ranks, progress)
    if main and not meta["complete"]:  # killed between the last log line and the final header
        finish(out, meta)
    ranks.dist.barrier()  # every rank returns a finished harvest
    return out


def _skip_done(meta: dict[str, Any], feed: _Feed, tokens: TokensFile | None, out: Path) -> int:
    """Re-tokenize the contexts up to the last listed shard; rank 0 (the one with ``tokens``)
    checks those of listed shards against tokens.npy. Returns the next shard's index."""
    listed = {s["index"] for s in meta["shards"]}
    sc = meta["shard_contexts"]
    for index in range(max(listed, default=-1) + 1):
        c0, c1 = index * sc, min((index + 1) * sc, meta["n_contexts"])
        windows = feed.take(c1 - c0)
        if tokens is None or index not in listed:
            continue
        if not np.array_equal(windows, tokens.read(c0, c1)):
            raise UserError(
                f"{out / TOKENS} differs from the corpus's tokens in contexts {c0}..{c1} (the "
                f"corpus changed since the harvest started?); delete {out} and harvest again"
            )
    return max(listed, default=-1) + 1


def _run_shards(
    model: Any,
    meta: dict,
    feed: _Feed,
    next_index: int,
    tokens: TokensFile | None,
    stop: int | None,
    out: Path,
    ranks: _Ranks,
    progress: bool,
) -> None:
    """Make the shards the log does not list, in rounds of one per rank (see `harvest`)."""
    n, sc, per = meta["n_contexts"], meta["shard_contexts"], meta["tokens_per_context"]
    rank, world = ranks.dist.rank, ranks.dist.world
    listed = {s["index"] for s in meta["shards"]}
    todo = [i for i in range(math.ceil(n / sc)) if i not in listed]
    if todo and todo[0] < next_index:  # a gap before the last listed shard
        feed.restart()
        next_index = 0
    rec = _Recorder(model, meta["hooks"], meta["grads"])
    bar = tqdm(
        total=meta["n_tokens_planned"], initial=meta["n_tokens"], unit="tok", unit_scale=True,
        disable=not progress or not ranks.dist.main, desc=f"harvest {out.name}", smoothing=0.1,
    )  # fmt: skip
    try:
        pending: Future | None = None
        with ThreadPoolExecutor(max_workers=1) as writer, model.hooks(fwd_hooks=rec.fwd_hooks()):
            for r0 in range(0, len(todo), world):
                round_ = todo[r0 : r0 + world]
                mine = round_[rank] if rank < len(round_) else None
                job = None
                for index in range(next_index, round_[-1] + 1):
                    c0, c1 = index * sc, min((index + 1) * sc, n)
                    windows = feed.take(c1 - c0)
                    if tokens is not None and index in round_:
                        tokens.write(c0, windows)
                    if index == mine:
                        job = (index, c0, c1, _record(rec, meta, windows, stop, bar))
                    elif index in round_:
                        bar.update((c1 - c0) * per)  # another rank's; they keep pace
                next_index = round_[-1] + 1
                if tokens is not None:
                    tokens.sync()  # the round's windows are on disk before its log lines
                _collect(pending, ranks, out, meta)  # at most one shard in flight per rank
                pending = None
                if job is not None:
                    pending = writer.submit(_write, out, meta, *job, not ranks.dist.active)
            _collect(pending, ranks, out, meta)
    finally:
        bar.close()  # before any error line, so it does not share the bar's line


def _record(
    rec: _Recorder, meta: dict, windows: np.ndarray, stop: int | None, bar: Any
) -> dict[str, torch.Tensor]:
    """One shard's buffers. Batches start at the shard's first context, so its bytes do not
    depend on which rank makes it, nor on whether it is made in a resume."""
    per, bs, dtype = meta["tokens_per_context"], meta["batch_size"], STORE_DTYPES[meta["dtype"]]
    kinds = ["acts", "grads"] if meta["grads"] else ["acts"]
    tokens_t = torch.from_numpy(windows).to(rec.model.cfg.device, torch.long)
    rows = len(windows) * per
    keys = [f"{k}/{h}" for k in kinds for h in meta["hooks"]]
    rec.bufs = {k: torch.empty((rows, meta["d_in"]), dtype=dtype) for k in keys}
    for b0 in range(0, len(windows), bs):
        b1 = min(b0 + bs, len(windows))
        rec.rows = slice(b0 * per, b1 * per)
        rec.run(tokens_t[b0:b1], stop)
        bar.update((b1 - b0) * per)
    return rec.bufs


def _write(
    out: Path, meta: dict, index: int, c0: int, c1: int, bufs: dict, log_now: bool
) -> dict[str, Any]:
    """On the writer thread: the shard's files, and its log line when this is the only rank."""
    entry = write_shard_files(out, meta, index, c0, c1, bufs)
    if log_now:
        log_shards(out, meta, [entry])
    return entry


def _collect(pending: Future | None, ranks: _Ranks, out: Path, meta: dict) -> None:
    """Wait for this rank's shard in flight. With several ranks, every rank sends its shard's
    index and checksums (or that it failed) to all; rank 0 logs the shards (rank order is
    index order within a round) before any failed one, then every rank raises if one failed."""
    entry, err = None, None
    if pending is not None:
        try:
            entry = pending.result()
        except (UserError, OSError) as e:
            err = e
    if not ranks.dist.active:
        if err is not None:
            raise err
        return
    rows = ranks.dist.all_gather(_encode(entry, err, meta).to(ranks.device)).cpu()
    status = rows[:, 0].tolist()
    # Shards up to the first failed one only: the log stays a prefix, which readers need.
    cut = status.index(2) if 2 in status else len(status)
    entries = [_decode(row, meta) for row in rows[:cut] if row[0] == 1]
    if ranks.dist.main and entries:
        log_shards(out, meta, entries)
    if cut < len(status):
        raise err or UserError(
            "another rank of this harvest stopped with the error it printed; fix that and run "
            "the same command again (it resumes)"
        )


def _file_keys(meta: dict, index: int) -> list[str]:
    """The shard's files, in the order `_record` fills them and the log lists them."""
    kinds = ["acts", "grads"] if meta["grads"] else ["acts"]
    return [shard_path(k, h, index) for k in kinds for h in meta["hooks"]]


def _encode(entry: dict | None, err: BaseException | None, meta: dict) -> torch.Tensor:
    """[1, 2 + 4 * files] int64: status (0 no shard, 1 a shard, 2 failed), index, then each
    file's sha256 as four int64 words."""
    row = torch.zeros((1, 2 + 4 * len(_file_keys(meta, 0))), dtype=torch.int64)
    if err is not None:
        row[0, 0] = 2
    elif entry is not None:
        digest = b"".join(
            bytes.fromhex(entry["files"][k]) for k in _file_keys(meta, entry["index"])
        )
        row[0, 0], row[0, 1] = 1, entry["index"]
        row[0, 2:] = torch.from_numpy(np.frombuffer(digest, np.int64).copy())
    return row


def _decode(row: torch.Tensor, meta: dict) -> dict[str, Any]:
    index, sc = int(row[1]), meta["shard_contexts"]
    c0, c1 = index * sc, min((index + 1) * sc, meta["n_contexts"])
    digest = row[2:].numpy().tobytes()
    keys = _file_keys(meta, index)
    files = {k: digest[32 * i : 32 * (i + 1)].hex() for i, k in enumerate(keys)}
    return shard_entry(index, c0, c1, meta["tokens_per_context"], files)
