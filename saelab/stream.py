"""Streaming a harvest in exact shuffled epochs: the shuffle plan, and the threads that turn it
into batches (``ActivationStore.batches``).

Shuffling is two-level, as in nanoGPT-style flat memmaps but with exact epochs: per epoch a
seeded permutation of contiguous chunks (cheap sequential reads), consecutive chunks grouped
into buffers of about ``shuffle_buffer`` rows, rows permuted within each buffer. Every choice is
a pure function of ``(seed, epoch, token_range, chunk_rows, shuffle_buffer)``, so a stream can be
resumed at any row without reading what it skips.

How a buffer becomes batches: reader threads copy each chunk from its shard's memmap into a
buffer slot, every row straight to its place in the shuffled order (one scatter, in the storage
dtype); the batches are then contiguous runs of the slot, each converted in one pass into
pooled batch memory by converter threads while the readers fill the other slot with the next
buffer. CPU time per GB of fp16 on a loaded 2-core machine (warm page cache): scatter 0.27 s,
conversion 0.36 s. The layout before it (a plain copy into the slot, then per batch a gather
through a scratch and a conversion) touched every byte once more: 0.89-1.04 s in all against
0.73-0.80 s, in paired runs.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from saelab.errors import UserError
from saelab.shards import to_torch

if TYPE_CHECKING:
    from saelab.store import ActivationStore

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


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


@dataclass(frozen=True)
class StreamSpec:
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


def _buffer_plan(
    store: ActivationStore, spec: StreamSpec
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


def _prequeue_hashes(store: ActivationStore, spec: StreamSpec, plan: list[np.ndarray]) -> None:
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


# --------------------------------------------------------------------------- the stream


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


def stream(store: ActivationStore, spec: StreamSpec) -> BatchStream:
    """The batches of ``spec``; its prefetch thread starts on the first ``next``."""
    PartOfBatches(spec.batch_size, spec.part)  # refuse a bad split here, not on the thread
    return BatchStream(_consume(store, spec), spec.hi - spec.lo)


def _consume(store: ActivationStore, spec: StreamSpec) -> Iterator[Batch]:
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


def _queue_batches(spec: StreamSpec) -> int:
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


def _produce(store: ActivationStore, spec: StreamSpec, q: queue.Queue, stop: threading.Event):
    batches = _batches(store, spec, stop)
    try:
        for batch in batches:
            if not _put(q, batch, stop):
                return
    except BaseException as exc:
        _put(q, exc, stop)
    finally:
        batches.close()  # its readers stop now, not when the generator is collected


# --------------------------------------------------------------------------- the producer


_READERS = 2
"""Threads that scatter chunks into one slot, and as many that convert the other slot into
batches: on 2 cores either pair takes both cores when the other waits (one converter alone
was the slower half: 0.36 against 0.27 s per GB)."""

_AHEAD = 2 * _READERS
"""Batches on the converters at once, beyond the finished ones in the queue."""


def _serial_torch() -> None:
    """Run this thread's torch ops on itself, never on torch's intra-op pool.

    Whole-batch ops on a 2-thread pool wait at every join for a core that another process or
    the readers hold: on a busy 2-core machine gathering and converting a buffer took
    1.2-1.6 s on the pool and 0.34 s on one thread (0.14 s when idle). The converters run
    side by side instead, each on one core.

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


class _Filling(NamedTuple):
    """A buffer on its way into a slot."""

    rows: int
    """Rows of the slot handed out, in order: [0, rows)."""
    reads: list[Future]
    shards: list[int]
    """The shards it reads, whose hashes are confirmed before any of its rows leave."""


def _fill(
    readers: ThreadPoolExecutor, store: ActivationStore, spec: StreamSpec, part: PartOfBatches,
    buffer: tuple[int, int, np.ndarray, int], slot: list[np.ndarray],
) -> _Filling:  # fmt: skip
    """Submit the reads of one buffer: slot row j <- the buffer's row perm[j] (this part's, from
    the skip on), one job per piece of a chunk within a shard."""
    epoch, b, chunks, skip = buffer
    n = int((chunks[:, 1] - chunks[:, 0]).sum())
    perm = _buffer_perm(spec.seed, epoch, b, n)[skip:]
    mine = part.take(len(perm))
    if mine is not None:
        perm = perm[mine]
    dest = np.full(n, -1, np.int64)  # slot row of each buffer row; -1: not handed out
    dest[perm] = np.arange(len(perm))
    reads, shards, at = [], {}, 0
    for a, z in chunks:
        for i, la, lz in store._pieces(int(a), int(z)):
            to = dest[at : at + lz - la]
            at += lz - la
            shards.setdefault(i)
            srcs = [store._mmap(kind, i) for kind in spec.kinds]
            reads.append(readers.submit(_scatter, srcs, la, lz, to, slot))
    return _Filling(len(perm), reads, list(shards))


def _scatter(srcs: list[np.ndarray], a: int, z: int, to: np.ndarray, slot: list[np.ndarray]):
    """``slot[to[r]] = src[a + r]`` for each kind, skipping rows whose ``to`` is -1."""
    keep = to >= 0
    if keep.all():
        for src, dst in zip(srcs, slot):
            dst[to] = src[a:z]
    elif keep.any():
        rows = np.flatnonzero(keep) + a
        for src, dst in zip(srcs, slot):
            dst[to[keep]] = src[rows]


def _batches(
    store: ActivationStore, spec: StreamSpec, stop: threading.Event
) -> Generator[Batch, None, None]:
    """Producer side: exact batches, straddling buffer and epoch edges.

    Two slots: while the converters turn the rows of one into batches, the readers fill the
    other with the next buffer. A slot is refilled only once every row of it is converted.
    """
    shape = (spec.chunk_rows * spec.chunks_per_buffer, store.d_in)
    slots = [[np.empty(shape, store._np_dtype) for _ in spec.kinds] for _ in range(2)]
    views = [[to_torch(a, store.storage_dtype) for a in slot] for slot in slots]
    part = PartOfBatches(spec.batch_size, spec.part)  # this process's rows of each batch
    pool = _BatchPool(part.local, store.d_in, spec.dtype, _queue_batches(spec) + _AHEAD + 4)
    readers = ThreadPoolExecutor(_READERS, "saelab-read")
    converters = ThreadPoolExecutor(_READERS, "saelab-convert", initializer=_serial_torch)
    plan = _buffer_plan(store, spec)
    ahead: deque[tuple[list[torch.Tensor], list[Future]]] = deque()
    out, jobs, have, converting = [pool.take() for _ in spec.kinds], [], 0, []
    try:
        filling = _fill(readers, store, spec, part, next(plan), slots[0])
        for n in range(sys.maxsize):
            cur = filling
            for job in converting:  # of the buffer before, in the slot filled next
                job.result()
            filling = _fill(readers, store, spec, part, next(plan), slots[(n + 1) % 2])
            for job in cur.reads:
                job.result()
            for i in cur.shards:
                for kind in spec.kinds:
                    store._confirm(kind, i, wait="thread")
            at, converting = 0, []
            while at < cur.rows:
                take = min(part.local - have, cur.rows - at)
                dst = [o[have : have + take] for o in out]
                src = [v[at : at + take] for v in views[n % 2]]
                converting.append(converters.submit(_convert, src, dst))
                jobs.append(converting[-1])
                have, at = have + take, at + take
                if have == part.local:
                    ahead.append((out, jobs))
                    out, jobs, have = [pool.take() for _ in spec.kinds], [], 0
                    while len(ahead) > _AHEAD:
                        done, waits = ahead.popleft()
                        for job in waits:
                            job.result()
                        yield done[0] if len(done) == 1 else (done[0], done[1])
                    if stop.is_set():
                        return
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        converters.shutdown(wait=True, cancel_futures=True)


def _convert(src: list[torch.Tensor], dst: list[torch.Tensor]) -> None:
    for s, d in zip(src, dst):
        d.copy_(s)
