"""Reading a harvest: memmapped shards, checked once, streamed in exact shuffled epochs.

A harvest (written by ``saelab.harvest``) is ``meta.json`` + ``tokens.npy`` + one ``.npy`` per
shard, hook and kind (``acts``/``grads``). Activation row ``t`` is the token at position
``1 + t % tokens_per_context`` of context ``t // tokens_per_context`` (BOS is never stored).

Shuffling is two-level, as in nanoGPT-style flat memmaps but with exact epochs: per epoch a
seeded permutation of contiguous chunks (cheap sequential reads), consecutive chunks grouped
into buffers of about ``shuffle_buffer`` rows, rows permuted within each buffer. Every choice is
a pure function of ``(seed, epoch, token_range, chunk_rows, shuffle_buffer)``, so a stream can be
resumed at any row without reading what it skips.

Integrity: each shard file's header and size are checked against the harvest whenever it is
opened, under every policy. Its sha256 is then checked as ``verify`` says:

- ``"full"``: every file is hashed the first time this process reads it, on every start.
- ``"first-read"`` (the default): as "full", but each confirmed hash is appended to the
  harvest's record (`shards.CHECKED`: file, sha256, size, mtime_ns), and a file whose record
  still matches its size and mtime is trusted without hashing, so a resume or a second
  training hashes nothing again. A file rewritten since is hashed again (and refused if bad);
  a change that keeps both size and mtime is seen only by `ActivationStore.verify`. In a
  folder that cannot be written, confirmations are remembered for this process only.
- ``"off"``: nothing is hashed; only headers and sizes are checked.

What each read path guarantees under "full" and "first-read": `read` and `batches` never hand
out data before the hashes of the files it came from are confirmed (hashing runs on a
background thread, overlapped with the shuffle). `sample` does not wait: it queues the hashes
of the shards it touched and returns, so a start is not stalled by hashing; call
`confirm_pending` before saving anything that depends on a sample, which waits for those
hashes and raises if one failed. `verify` re-hashes every listed file under every policy. A
listed file that is missing (even one deleted after it was opened), truncated or changed is a
UserError naming it, with the repair hint `shards.REPAIR`.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from saelab.errors import UserError
from saelab.shards import (
    CHECKED,
    LOG,
    NP_DTYPES,
    REPAIR,
    TOKENS,
    VERIFIER,
    append_checked,
    check_header,
    locate,
    read_checked,
    read_meta,
    to_torch,
)

log = logging.getLogger(__name__)

CHUNK_ROWS = 4096
Verify = Literal["full", "first-read", "off"]
_Wait = Literal["here", "thread", "queue", "ahead"]

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- meta


@dataclass(frozen=True)
class _Shard:
    index: int
    start: int
    """First activation row (global)."""
    stop: int
    files: dict[str, str]
    """Path relative to the harvest -> sha256 hex."""


def _pick_hook(meta: dict[str, Any], hook: str | None, path: Path) -> str:
    hooks = list(meta["hooks"])
    if hook is None:
        if len(hooks) == 1:
            return hooks[0]
        raise UserError(
            f"harvest {path} has several hooks ({', '.join(hooks)}); pick one with --hook"
        )
    if hook not in hooks:
        raise UserError(
            f"hook {hook!r} is not in harvest {path} (it has: {', '.join(hooks)}); "
            "pick one of those with --hook or harvest that hook"
        )
    return hook


def _complete_shards(meta: dict[str, Any], path: Path) -> list[_Shard]:
    shards, row = [], 0
    for entry in meta["shards"]:
        shard = _Shard(
            int(entry["index"]),
            int(entry["token_start"]),
            int(entry["token_stop"]),
            dict(entry["files"]),
        )
        if shard.start != row or shard.stop <= shard.start:
            raise UserError(
                f"{path / LOG} lists shard {shard.index} at rows "
                f"[{shard.start}, {shard.stop}) after row {row}; {REPAIR}"
            )
        shards.append(shard)
        row = shard.stop
    if not shards:
        raise UserError(
            f"harvest {path} has no complete shard yet; let `saelab harvest` run (or resume it) "
            "until at least one shard is written"
        )
    return shards


def _missing(file: Path) -> UserError:
    # Deleted since it was opened (its memmap still reads): the message of a shard missing
    # at open, not an OSError from the hash's stat or open.
    return UserError(f"{file} is missing though the harvest lists it; {REPAIR}")


class _Checker:
    """The hashing side of one store: which files it trusts, what it still waits for, and
    the harvest's record of confirmed hashes (under "first-read")."""

    def __init__(self, path: Path, policy: str) -> None:
        if policy not in get_args(Verify):
            raise UserError(
                f"verify={policy!r} is not one of {', '.join(get_args(Verify))}; pick one of them"
            )
        self.path, self.policy = path, policy
        self._lock = threading.Lock()
        self._record = read_checked(path) if policy == "first-read" else {}
        self._persist = policy == "first-read"
        self._pending: list[tuple[Path, Future]] = []

    def _trusted(self, rel: str, sha: str) -> bool:
        if self.policy != "first-read":
            return self.policy == "off"
        entry = self._record.get(rel)
        if entry is None or entry[0] != sha:
            return False
        st = (self.path / rel).stat()
        return (st.st_size, st.st_mtime_ns) == entry[1:]

    def _recorded(self, fut: Future, rel: str, sha: str, st: os.stat_result) -> Future:
        """A future that resolves like ``fut``, once a success is in the record."""
        done: Future = Future()

        def then(f: Future) -> None:
            exc = f.exception()
            if exc is None:
                self._remember(rel, (sha, st.st_size, st.st_mtime_ns))
                done.set_result(None)
            else:
                done.set_exception(exc)

        fut.add_done_callback(then)
        return done

    def _remember(self, rel: str, entry: tuple[str, int, int]) -> None:
        with self._lock:
            if self._record.get(rel) == entry:
                return
            self._record[rel] = entry
            if not self._persist:
                return
            try:
                append_checked(self.path, [(rel, *entry)])
            except OSError as exc:
                self._persist = False
                log.debug(
                    "cannot record checksums in %s (%s); remembering them in this process only",
                    self.path / CHECKED, exc,
                )  # fmt: skip

    def confirm(self, rel: str, sha: str, wait: _Wait, fresh: bool = False) -> None:
        """Confirm a file's sha256 unless the policy trusts it: hashed in this thread ("here"),
        on the hashing thread while this one waits ("thread"), or queued, as pending ("queue") or
        ahead of a wait that follows ("ahead");
        `fresh` hashes it again whatever the policy or process has seen."""
        file = self.path / rel
        try:
            if not fresh and self._trusted(rel, sha):
                return
            st = file.stat()
            if fresh:
                VERIFIER.forget(file, sha)
            if wait == "here":
                VERIFIER.check(file, sha)
                fut: Future = Future()
                fut.set_result(None)
            else:
                fut = VERIFIER.submit(file, sha)
            if self.policy == "first-read":
                fut = self._recorded(fut, rel, sha, st)
            if wait == "thread":
                fut.result()
            elif wait == "queue":
                with self._lock:
                    self._pending.append((file, fut))
        except FileNotFoundError:
            raise _missing(file) from None

    def confirm_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for i, (file, fut) in enumerate(pending):
            try:
                fut.result()
            except FileNotFoundError:
                with self._lock:
                    self._pending[:0] = pending[i + 1 :]
                raise _missing(file) from None
            except BaseException:
                with self._lock:
                    self._pending[:0] = pending[i + 1 :]
                raise


# --------------------------------------------------------------------------- shuffle plan


def _epoch_plan(
    lo: int, hi: int, seed: int, epoch: int, chunk_rows: int, chunks_per_buffer: int
) -> list[np.ndarray]:
    """The epoch's buffers, each an array of (start, stop) row ranges in reading order."""
    first = np.arange(lo // chunk_rows * chunk_rows, hi, chunk_rows, dtype=np.int64)
    chunks = np.stack([np.maximum(first, lo), np.minimum(first + chunk_rows, hi)], axis=1)
    rng = np.random.default_rng([seed, epoch, 0])
    chunks = chunks[rng.permutation(len(chunks))]
    return [chunks[i : i + chunks_per_buffer] for i in range(0, len(chunks), chunks_per_buffer)]


def _buffer_perm(seed: int, epoch: int, buffer: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1, buffer]).permutation(n)


def split_error(batch_size: int, world: int) -> UserError:
    """The refusal of a batch that does not split over `world` processes."""
    return UserError(
        f"batch_size {batch_size} does not split into {world} equal parts; pass a "
        f"--batch_size divisible by the number of processes ({world})"
    )


class PartOfBatches:
    """Which rows of a stream are process ``rank``'s of ``world``: rows
    [rank·b, (rank + 1)·b) of every batch of ``batch_size`` (b = batch_size/world), counted
    from the stream's first row. Fed the stream's rows in order, a piece at a time."""

    def __init__(self, batch_size: int, part: tuple[int, int]) -> None:
        rank, world = part
        if not 0 <= rank < world or batch_size % world:
            raise split_error(batch_size, world)
        self.batch_size, self.local = batch_size, batch_size // world
        self.lo, self.whole = rank * self.local, world == 1
        self.pos = 0

    def take(self, n: int) -> np.ndarray | None:
        """Offsets, among the next n rows, of this part's rows (None: all of them)."""
        if self.whole:
            return None
        at = (self.pos + np.arange(n)) % self.batch_size
        self.pos += n
        return np.flatnonzero((at >= self.lo) & (at < self.lo + self.local))


class BatchStream:
    """Infinite iterator of batches; ``rows_per_epoch`` lets callers count epochs.

    Closing it (or dropping the last reference) stops the prefetch thread.
    """

    def __init__(self, gen: Iterator[Batch], rows_per_epoch: int) -> None:
        self._gen = gen
        self.rows_per_epoch = rows_per_epoch

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the store


class ActivationStore:
    """One hook of one harvest, read-only; ``verify`` is the checksum policy (module
    docstring)."""

    def __init__(
        self, path: str | os.PathLike, hook: str | None = None, verify: Verify = "first-read"
    ) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.hook = _pick_hook(self.meta, hook, self.path)
        self.d_in = int(self.meta["d_in"])
        self.n_ctx = int(self.meta["n_ctx"])
        self.tokens_per_context = int(self.meta["tokens_per_context"])
        self.storage_dtype: str = self.meta["dtype"]
        self.has_grads = bool(self.meta.get("grads", False))
        self.shards = _complete_shards(self.meta, self.path)
        self.n_tokens = self.shards[-1].stop
        self._stops = np.array([s.stop for s in self.shards], dtype=np.int64)
        self._np_dtype = NP_DTYPES[self.storage_dtype]
        self._mmaps: dict[tuple[str, int], np.ndarray] = {}
        self._checker = _Checker(self.path, verify)

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, hook={self.hook!r}, n_tokens={self.n_tokens})"

    # ----------------------------------------------------------------- files

    def _relpath(self, kind: str, shard: _Shard) -> str:
        rel = f"{kind}/{self.hook}/shard_{shard.index:05d}.npy"
        if rel not in shard.files:
            raise UserError(f"harvest {self.path} does not list {rel}; {REPAIR}")
        return rel

    def _check_kind(self, kind: str) -> None:
        if kind not in ("acts", "grads"):
            raise ValueError(f"kind must be 'acts' or 'grads', not {kind!r}")
        if kind == "grads" and not self.has_grads:
            raise UserError(
                f"harvest {self.path} has no gradients; re-harvest with `saelab harvest --grads`"
            )

    def _mmap(self, kind: str, i: int) -> np.ndarray:
        key = (kind, i)
        if key not in self._mmaps:
            shard = self.shards[i]
            file = self.path / self._relpath(kind, shard)
            rows = shard.stop - shard.start
            offset = check_header(file, rows, self.d_in, self._np_dtype)
            self._mmaps[key] = np.memmap(
                file, self._np_dtype, "r", offset=offset, shape=(rows, self.d_in)
            )
        return self._mmaps[key]

    def _confirm(self, kind: str, i: int, wait: _Wait = "here") -> None:
        rel = self._relpath(kind, self.shards[i])
        self._checker.confirm(rel, self.shards[i].files[rel], wait)

    def _shard_of(self, row: int) -> int:
        return int(np.searchsorted(self._stops, row, side="right"))

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(shard, local start, local stop) covering global rows [start, stop)."""
        while start < stop:
            i = self._shard_of(start)
            end = min(stop, self.shards[i].stop)
            yield i, start - self.shards[i].start, end - self.shards[i].start
            start = end

    def _copy_rows(self, kind: str, start: int, stop: int, out: np.ndarray) -> set[int]:
        """Copy rows into ``out`` (no checksum wait); returns the shards touched."""
        touched, at = set(), 0
        for i, a, b in self._pieces(start, stop):
            out[at : at + b - a] = self._mmap(kind, i)[a:b]
            at += b - a
            touched.add(i)
        return touched

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.n_tokens})")

    # ----------------------------------------------------------------- random access

    def read(
        self, start: int, stop: int, kind: str = "acts", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``kind``, spanning shards, checked before return."""
        self._check_kind(kind)
        self._check_range(start, stop)
        raw = np.empty((stop - start, self.d_in), self._np_dtype)
        for i in self._copy_rows(kind, start, stop, raw):
            self._confirm(kind, i)
        return to_torch(raw, self.storage_dtype).to(dtype)

    def sample(
        self, n: int, *, seed: int = 0, token_range: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """``n`` distinct random rows (all rows if the range has fewer), float32.

        The hashes of the shards it reads are queued, not awaited: see `confirm_pending`."""
        lo, hi = self._range(token_range)
        rng = np.random.default_rng([seed, 2])
        rows = np.sort(rng.choice(hi - lo, size=min(n, hi - lo), replace=False)) + lo
        ends = np.searchsorted(rows, self._stops)  # rows[ends[i-1]:ends[i]] are in shard i
        parts = [np.empty((0, self.d_in), self._np_dtype)]
        for i in np.flatnonzero(np.diff(ends, prepend=0)).tolist():
            shard = self._mmap("acts", i)  # header and size first: names a truncation
            self._confirm("acts", i, wait="queue")
            mine = rows[(ends[i - 1] if i else 0) : ends[i]]
            parts.append(np.asarray(shard[mine - self.shards[i].start]))
        return to_torch(np.concatenate(parts), self.storage_dtype).to(torch.float32)

    def tokens(self) -> np.ndarray:
        """Memmap of ``tokens.npy``: int32 ``[n_contexts, n_ctx]``."""
        file = self.path / TOKENS
        if not file.is_file():
            raise UserError(f"{file} is missing; re-run `saelab harvest` to rewrite the harvest")
        return np.load(file, mmap_mode="r")

    def locate(self, row: int) -> tuple[int, int]:
        """(context index, position in context) of activation row ``row``; BOS is position 0."""
        self._check_range(row, row + 1)
        return locate(row, self.tokens_per_context)

    def context(self, row: int, before: int = 8, after: int = 4) -> tuple[np.ndarray, int]:
        """Token window around ``row``'s token, and the index of that token in the window."""
        ctx, pos = self.locate(row)
        a, b = max(0, pos - before), min(self.n_ctx, pos + after + 1)
        return np.array(self.tokens()[ctx, a:b]), pos - a

    def confirm_pending(self) -> None:
        """Wait until every shard `sample` has handed out is hashed; a UserError (with
        `shards.REPAIR`) if one is corrupt or gone. Call it before saving what a sample made."""
        self._checker.confirm_pending()

    def verify(self) -> None:
        """Re-hash every file the listed shards name (all hooks and kinds), in order, whatever
        the policy; under "first-read" the confirmations are recorded."""
        for shard in self.shards:
            for rel, sha in shard.files.items():
                file = self.path / rel
                check_header(file, shard.stop - shard.start, self.d_in, self._np_dtype)
                self._checker.confirm(rel, sha, "here", fresh=True)

    # ----------------------------------------------------------------- streaming

    def _range(self, token_range: tuple[int, int] | None) -> tuple[int, int]:
        lo, hi = (0, self.n_tokens) if token_range is None else map(int, token_range)
        if not 0 <= lo < hi <= self.n_tokens:
            raise UserError(
                f"token_range ({lo}, {hi}) is empty or outside harvest {self.path} "
                f"(0..{self.n_tokens} rows); shrink the range or harvest more tokens"
            )
        return lo, hi

    def rows_in(self, token_range: tuple[int, int] | None = None) -> int:
        """Rows per epoch of ``batches(token_range=...)``."""
        lo, hi = self._range(token_range)
        return hi - lo

    def batches(
        self,
        batch_size: int,
        *,
        token_range: tuple[int, int] | None = None,
        seed: int = 0,
        start_row: int = 0,
        shuffle_buffer: int = 262_144,
        dtype: torch.dtype = torch.float32,
        grads: bool = False,
        chunk_rows: int = CHUNK_ROWS,
        part: tuple[int, int] = (0, 1),
    ) -> BatchStream:
        """Infinite shuffled stream over ``token_range`` in exact epochs (see module docstring).

        ``start_row=r`` yields what the uninterrupted stream yields after its first ``r`` rows.
        With ``grads`` each item is ``(acts, grads)``, aligned row for row. ``part=(rank,
        world)`` yields only that process's slice of each batch (`PartOfBatches`): the whole
        buffer is read, but only the slice is shuffled, converted and handed out.
        """
        if batch_size <= 0 or shuffle_buffer <= 0 or chunk_rows <= 0 or start_row < 0:
            raise ValueError("batch_size, shuffle_buffer, chunk_rows must be > 0, start_row >= 0")
        kinds = ("acts", "grads") if grads else ("acts",)
        for kind in kinds:
            self._check_kind(kind)
        lo, hi = self._range(token_range)
        chunk_rows = min(chunk_rows, shuffle_buffer)
        spec = _StreamSpec(
            lo,
            hi,
            seed % 2**63,
            batch_size,
            chunk_rows,
            max(1, shuffle_buffer // chunk_rows),
            start_row,
            dtype,
            kinds,
            part,
        )
        PartOfBatches(batch_size, part)  # refuse a bad split here, not on the thread
        return BatchStream(_stream(self, spec), hi - lo)


@dataclass(frozen=True)
class _StreamSpec:
    lo: int
    hi: int
    seed: int
    batch_size: int
    chunk_rows: int
    chunks_per_buffer: int
    start_row: int
    dtype: torch.dtype
    kinds: tuple[str, ...]
    part: tuple[int, int] = (0, 1)


# --------------------------------------------------------------------------- prefetch


_LIVE: set[tuple[threading.Event, threading.Thread]] = set()


@atexit.register
def _stop_prefetchers() -> None:
    # A daemon thread still inside a torch op when the interpreter tears down aborts the
    # process ("terminate called without an active exception"): stop streams never closed.
    live = list(_LIVE)
    for stop, _ in live:
        stop.set()
    for _, thread in live:
        thread.join(timeout=10)


def _stream(store: ActivationStore, spec: _StreamSpec) -> Iterator[Batch]:
    """Consumer side: the thread starts on the first ``next`` and stops on close/GC."""
    q: queue.Queue = queue.Queue(maxsize=_queue_batches(spec))
    stop = threading.Event()
    thread = threading.Thread(
        target=_produce, args=(store, spec, q, stop), name="saelab-prefetch", daemon=True
    )
    _LIVE.add((stop, thread))
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
        _LIVE.discard((stop, thread))


def _queue_batches(spec: _StreamSpec) -> int:
    # A quarter buffer of finished batches: the thread can read the next buffer while the
    # trainer consumes them, without holding several fp32 buffers in memory.
    return max(2, spec.chunk_rows * spec.chunks_per_buffer // (4 * spec.batch_size))


class _BatchPool:
    """Batch memory recycled once the consumer has dropped every tensor and view of it.

    Fresh 10 MB allocations are page-faulted on first touch, which costs more than the
    fp16->fp32 conversion itself (measured: ~0.6 vs ~3 GB/s on 2 cores). A pooled array is
    free when only the pool refers to it: ``torch.from_numpy`` keeps the array alive for as
    long as any tensor shares its storage. The free array used last is handed out first: when
    the consumer keeps up, the same few arrays cycle and stay in cache.
    """

    def __init__(self, rows: int, d_in: int, dtype: torch.dtype, size: int) -> None:
        self._nbytes = rows * d_in * torch.empty((), dtype=dtype).element_size()
        self._shape, self._dtype, self._size = (rows, d_in), dtype, size
        self._arrays: list[np.ndarray] = []

    def take(self) -> torch.Tensor:
        for i in reversed(range(len(self._arrays))):
            if sys.getrefcount(self._arrays[i]) == 2:  # the list and getrefcount's argument
                arr = self._arrays.pop(i)
                break
        else:
            arr = np.empty(self._nbytes, np.uint8)
            if len(self._arrays) >= self._size:
                self._arrays.pop(0)  # held by the consumer for good: let it go
        self._arrays.append(arr)
        return torch.from_numpy(arr).view(self._dtype).view(self._shape)


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False


def _produce(store: ActivationStore, spec: _StreamSpec, q: queue.Queue, stop: threading.Event):
    batches = _batches(store, spec, stop)
    try:
        for batch in batches:
            if not _put(q, batch, stop):
                return
    except BaseException as exc:
        _put(q, exc, stop)
    finally:
        batches.close()  # its readers stop now, not when the generator is collected


def _prequeue_hashes(store: ActivationStore, spec: _StreamSpec, plan: list[np.ndarray]) -> None:
    """Queue background hashes of the range's shards in the order this epoch first needs them."""
    seen: dict[int, None] = {}
    for chunks in plan:
        for a, b in chunks:
            for i, _, _ in store._pieces(int(a), int(b)):
                seen.setdefault(i)
    for i in seen:
        for kind in spec.kinds:
            store._mmap(kind, i)  # header/size check up front: fail before any hashing
            store._confirm(kind, i, wait="ahead")


_READERS = 2
"""Threads that fill buffers and gather batches: one core's memcpy from the page cache and
one's gather and conversion run at once, and either takes the other's work when it is done."""

_AHEAD = 2 * _READERS
"""Batches on the readers at once, beyond the finished ones in the queue."""

_SCRATCH_BYTES = 1 << 19
"""A gathered piece of a batch before its conversion: small enough to stay in L2."""

_local = threading.local()


def _serial_torch() -> None:
    """Run this thread's torch ops on itself, never on torch's intra-op pool.

    Whole-batch ops on a 2-thread pool wait at every join for a core that another process or
    the other reader holds: on a busy 2-core machine gathering and converting a buffer took
    1.2-1.6 s on the pool and 0.34 s on one thread (0.14 s when idle). The readers run side by
    side instead, each on one core.

    NOTE: ``torch.set_num_threads(1)`` cannot do this: it also sets the count every thread
    that has not run a parallel op yet starts from, the trainer's included. OpenMP's limit
    is per thread, so it is set on the runtime torch loaded (only if loaded: RTLD_NOLOAD).
    Without one (another threading backend) this does nothing and the ops use the pool:
    same batches, slower on a busy machine. Way out: a per-thread setting in torch.
    """
    torch.get_num_threads()  # torch copies its count into a new thread on first use: before ours
    mode = getattr(os, "RTLD_NOLOAD", None)
    if mode is None:
        return
    for name in ("libgomp.so.1", "libiomp5.so", "libomp.so", "libomp.dylib"):
        try:
            ctypes.CDLL(name, mode=mode | os.RTLD_LAZY).omp_set_num_threads(1)
            return
        except (OSError, AttributeError):
            continue


def _buffer_plan(
    store: ActivationStore, spec: _StreamSpec
) -> Iterator[tuple[int, int, np.ndarray, int]]:
    """(epoch, buffer, its chunks, rows of it to skip) of every buffer from ``start_row`` on."""
    epoch, skip = divmod(spec.start_row, spec.hi - spec.lo)
    first_epoch = epoch
    while True:
        plan = _epoch_plan(
            spec.lo, spec.hi, spec.seed, epoch, spec.chunk_rows, spec.chunks_per_buffer
        )
        if epoch == first_epoch:
            _prequeue_hashes(store, spec, plan)
        ends = np.cumsum([int((c[:, 1] - c[:, 0]).sum()) for c in plan])
        first = int(np.searchsorted(ends, skip, side="right"))
        for b in range(first, len(plan)):
            yield epoch, b, plan[b], (skip - (int(ends[b - 1]) if b else 0) if b == first else 0)
        epoch, skip = epoch + 1, 0


def _batches(
    store: ActivationStore, spec: _StreamSpec, stop: threading.Event
) -> Generator[Batch, None, None]:
    """Producer side: exact batches, straddling buffer and epoch edges.

    The work runs as jobs on `_READERS` threads, in the order it is submitted: each buffer is
    read from the memmaps chunk by chunk into one of two slots, then each batch's rows are
    gathered from the slot and converted straight into pooled batch memory. A job first waits
    for the jobs it depends on (a gather for its buffer's reads, a read for the gathers still
    using the slot it overwrites), all submitted before it, so the readers never deadlock.
    """
    shape = (spec.chunk_rows * spec.chunks_per_buffer, store.d_in)
    slots = [[np.empty(shape, store._np_dtype) for _ in spec.kinds] for _ in range(2)]
    part = PartOfBatches(spec.batch_size, spec.part)  # this process's rows of each batch
    pool = _BatchPool(part.local, store.d_in, spec.dtype, _queue_batches(spec) + _AHEAD + 4)
    readers = ThreadPoolExecutor(_READERS, "saelab-read", initializer=_serial_torch)
    ahead: deque[tuple[list[torch.Tensor], list[Future], set[int]]] = deque()
    users: list[list[Future]] = [[], []]  # the gathers that read each slot
    out, jobs, shards, have = [pool.take() for _ in spec.kinds], [], set(), 0
    try:
        for n, (epoch, b, chunks, skip) in enumerate(_buffer_plan(store, spec)):
            raw = slots[n % 2]
            reads, rows = _submit_reads(readers, store, spec, chunks, raw, users[n % 2])
            users[n % 2] = []
            perm = _buffer_perm(spec.seed, epoch, b, rows)[skip:]
            mine = part.take(len(perm))
            perm = torch.from_numpy(perm if mine is None else perm[mine])
            src = [to_torch(r[:rows], store.storage_dtype) for r in raw]
            touched = {i for a, z in chunks for i, _, _ in store._pieces(int(a), int(z))}
            at = 0
            while at < len(perm):
                take = min(part.local - have, len(perm) - at)
                dst = [o[have : have + take] for o in out]
                job = readers.submit(_gather, src, perm[at : at + take], dst, reads)
                users[n % 2].append(job)
                jobs.append(job)
                shards |= touched
                have, at = have + take, at + take
                if have == part.local:
                    ahead.append((out, jobs, shards))
                    out, jobs, shards, have = [pool.take() for _ in spec.kinds], [], set(), 0
                    while len(ahead) > _AHEAD:
                        yield _finished(store, spec, *ahead.popleft())
                    if stop.is_set():
                        return
    finally:
        readers.shutdown(wait=True, cancel_futures=True)


def _finished(
    store: ActivationStore, spec: _StreamSpec, out: list[torch.Tensor], jobs: list[Future],
    shards: set[int],
) -> Batch:  # fmt: skip
    """The batch once its gathers are done and the shards it came from are confirmed."""
    for job in jobs:
        job.result()
    for i in sorted(shards):
        for kind in spec.kinds:
            store._confirm(kind, i, wait="thread")
    return out[0] if len(out) == 1 else (out[0], out[1])


def _submit_reads(
    readers: ThreadPoolExecutor, store: ActivationStore, spec: _StreamSpec, chunks: np.ndarray,
    raw: list[np.ndarray], users: list[Future],
) -> tuple[list[Future], int]:  # fmt: skip
    """One job per chunk, copying it into ``raw``; the jobs and the buffer's rows."""
    reads, at = [], 0
    for a, b in chunks:
        a, b = int(a), int(b)
        for kind, buf in zip(spec.kinds, raw):
            reads.append(readers.submit(_read, store, kind, a, b, buf[at : at + b - a], users))
        at += b - a
    return reads, at


def _read(store: ActivationStore, kind: str, a: int, b: int, out: np.ndarray, after: list[Future]):
    for job in after:
        job.result()
    store._copy_rows(kind, a, b, out)


def _gather(
    src: list[torch.Tensor], index: torch.Tensor, dst: list[torch.Tensor], after: list[Future]
) -> None:
    """``dst[j] = src[index[j]]``, converted to dst's dtype through a per-thread scratch."""
    for job in after:
        job.result()
    for s, d in zip(src, dst):
        if s.dtype == d.dtype:
            torch.index_select(s, 0, index, out=d)
            continue
        step = max(1, _SCRATCH_BYTES // (s.shape[1] * s.element_size()))
        scratch = getattr(_local, "scratch", None)
        if scratch is None or scratch.dtype != s.dtype or scratch.shape != (step, s.shape[1]):
            scratch = _local.scratch = torch.empty(step, s.shape[1], dtype=s.dtype)
        for j in range(0, len(index), step):
            m = min(step, len(index) - j)
            torch.index_select(s, 0, index[j : j + m], out=scratch[:m])
            d[j : j + m].copy_(scratch[:m])
