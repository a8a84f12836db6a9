"""Reading a harvest: memmapped shards, checked once, streamed in exact shuffled epochs.

A harvest (written by ``saelab.harvest``) is ``meta.json`` + ``tokens.npy`` + one ``.npy`` per
shard, hook and kind (``acts``/``grads``). Activation row ``t`` is the token at position
``1 + t % tokens_per_context`` of context ``t // tokens_per_context`` (BOS is never stored).

``batches`` streams the rows in exact shuffled epochs, resumable at any row: the plan and the
threads live in `saelab.stream`.

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

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
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
from saelab.stream import BatchStream, StreamSpec, stream

log = logging.getLogger(__name__)

CHUNK_ROWS = 4096
Verify = Literal["full", "first-read", "off"]
_Wait = Literal["here", "thread", "queue", "ahead"]


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
        """Infinite shuffled stream over ``token_range`` in exact epochs (`saelab.stream`).

        ``start_row=r`` yields what the uninterrupted stream yields after its first ``r`` rows.
        With ``grads`` each item is ``(acts, grads)``, aligned row for row. ``part=(rank,
        world)`` yields only that process's slice of each batch (`PartOfBatches`): only the
        slice's rows are read, shuffled, converted and handed out.
        """
        if batch_size <= 0 or shuffle_buffer <= 0 or chunk_rows <= 0 or start_row < 0:
            raise ValueError("batch_size, shuffle_buffer, chunk_rows must be > 0, start_row >= 0")
        kinds = ("acts", "grads") if grads else ("acts",)
        for kind in kinds:
            self._check_kind(kind)
        lo, hi = self._range(token_range)
        chunk_rows = min(chunk_rows, shuffle_buffer)
        spec = StreamSpec(
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
        return stream(self, spec)
