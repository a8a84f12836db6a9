"""The harvest folder: its layout, names, dtypes, checksums, and writing and reading its parts.

Written through this module by `saelab.harvest` (and `saelab.synthetic`), read through it by
`saelab.store`.

Layout of a harvest directory (``cached_activations/<name>/``)::

    meta.json                       the header: written once at the start, once at the end
    shards.jsonl                    the shard log: one line per finished shard, appended
    tokens.npy                      int32 [n_contexts, n_ctx], BOS at position 0 of every
                                    context; filled block by block before each shard is logged
    acts/<hook>/shard_00000.npy     [contexts_in_shard * (n_ctx - 1), d_in]
    grads/<hook>/shard_00000.npy    same shape, only with grads=True
    checked.jsonl                   sha256 confirmations of readers (`saelab.store`'s
                                    'first-read'); appended, never required

Activations are stored as float16 or float32; bfloat16 as its raw uint16 bits (view them as
bfloat16 to read). BOS positions are not stored: row ``t`` of the token stream belongs to
context ``t // tokens_per_context`` at position ``1 + t % tokens_per_context``. ``<hook>`` is
the hook name as given (aliases such as ``blocks.6.hook_resid_post`` are kept).

meta.json holds the identity of the harvest (model, model_dtype, hooks, d_in, dtype, n_ctx,
corpus, seed, grads, n_contexts, shard_contexts, batch_size); once the harvest is finished it
is replaced by the same header with ``complete``, ``n_tokens`` and ``tokens_sha256`` (the
sha256 of tokens.npy). Each finished shard appends one JSON line to shards.jsonl, fsynced: its
index, context and token range and the sha256 of each of its files. One process writes the log
(`log_shards`; under torchrun, rank 0 for every rank's shards). A shard exists only once the
log lists it: its files are written under a temporary name and renamed first. A line cut
short by a crash (no trailing newline, or not JSON) is ignored by readers and cut off by the
next writer, so the cost of a shard's metadata is one short append, flat in the number of
shards. A harvest's writer leaves a log that lists a prefix of the shards; a resume of a log
with gaps (a line deleted by hand) appends the missing shards after later ones, and `finish`
rewrites the log in index order, so a finished log is always the same bytes. `read_meta`
merges header and log into the view readers use: ``meta["shards"]`` (in index order),
``n_tokens`` (tokens in listed shards) and ``complete``. Harvests of format 1 keep that
list inside meta.json (rewritten after every shard); they still read, and a resume converts
them.

A rerun of the same config makes the shards the log does not list; because every shard is
computed from a fixed set of batches (a resume keeps the batch_size and shard_contexts it
started with), the result is byte-identical to an uninterrupted run, whenever it was killed
and however many processes made it.
All hooks of one harvest must have the same width (d_in); ``[batch, pos, head, d_head]`` hooks
are stored with their heads concatenated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from saelab.errors import UserError
from saelab.runs import (
    append_lines,
    atomic_write,
    complete_lines,
    cut_torn_line,
    read_records,
)

log = logging.getLogger(__name__)

FORMAT = 2
"""2: header in meta.json, shards in the log; 1: the shard list inside meta.json (still read)."""
READ_FORMATS = (1, 2)
META = "meta.json"
LOG = "shards.jsonl"
CHECKED = "checked.jsonl"
TOKENS = "tokens.npy"
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
NP_DTYPES = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4")}
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
_REQUIRED = ("format", "hooks", "d_in", "dtype", "n_ctx", "tokens_per_context")
REPAIR = (
    f"delete that shard's line (and later ones) from {LOG} (in an older harvest: its entry in "
    'meta.json\'s "shards") and re-run `saelab harvest` with the same settings to redo them'
)


def locate(rows: Any, tokens_per_context: int) -> tuple[Any, Any]:
    """(context, position) of activation rows (an int or an integer array): BOS is position 0
    and is never stored, so row t is context t // tpc at position 1 + t % tpc."""
    return rows // tokens_per_context, 1 + rows % tokens_per_context


def shard_path(kind: str, hook: str, index: int) -> str:
    """Path of a shard file relative to the harvest directory; kind is 'acts' or 'grads'."""
    return f"{kind}/{hook}/shard_{index:05d}.npy"


def sha256_file(path: Path) -> str:
    h, block = hashlib.sha256(), bytearray(8 << 20)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            h.update(view[:n])  # hashlib releases the GIL on large updates
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Checksums, verified once per process


class _Verifier:
    """Process-wide sha256 cache: each file is hashed at most once per (size, mtime)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[tuple, Future] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _key(self, path: Path, sha: str) -> tuple:
        st = path.stat()
        return (str(path.resolve()), st.st_size, st.st_mtime_ns, sha)

    def _claim(self, path: Path, sha: str) -> tuple[Future, bool]:
        key = self._key(path, sha)
        with self._lock:
            fut = self._futures.get(key)
            if fut is not None:
                return fut, False
            fut = self._futures[key] = Future()
            return fut, True

    def submit(self, path: Path, sha: str) -> Future:
        """Queue a background hash (a no-op if the file is already hashed or queued)."""
        fut, mine = self._claim(path, sha)
        if mine:
            self._queue.put((path, sha, fut))
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    # Daemon: a pending queue must not delay interpreter exit.
                    self._thread = threading.Thread(
                        target=self._work, name="saelab-verify", daemon=True
                    )
                    self._thread.start()
        return fut

    def check(self, path: Path, sha: str) -> None:
        """Hash now in this thread unless another thread already is; raise on mismatch."""
        fut, mine = self._claim(path, sha)
        if mine:
            _run_hash(path, sha, fut)
        fut.result()

    def forget(self, path: Path, sha: str) -> None:
        with self._lock:
            self._futures.pop(self._key(path, sha), None)

    def _work(self) -> None:
        while True:
            path, sha, fut = self._queue.get()
            _run_hash(path, sha, fut)


def _run_hash(path: Path, sha: str, fut: Future) -> None:
    try:
        digest = sha256_file(path)
        if digest != sha:
            raise UserError(f"{path} is corrupted (sha256 differs from the harvest's); {REPAIR}")
        log.debug("sha256 ok: %s", path)
        fut.set_result(None)
    except BaseException as exc:  # handed to whoever waits on the data
        fut.set_exception(exc)


VERIFIER = _Verifier()


# ---------------------------------------------------------------------------------------
# Writing: atomic, checksummed, hashed on the way out (no second read)


class _HashingWriter:
    def __init__(self, f: BinaryIO, sha: Any) -> None:
        self.f, self.sha = f, sha

    def write(self, data: Any) -> int:
        self.sha.update(data)
        return self.f.write(data)


def save_npy(path: Path, arr: np.ndarray) -> str:
    """The same bytes as np.save, written atomically from the array's memory; the sha256."""
    arr = np.ascontiguousarray(arr)
    sha = hashlib.sha256()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f, sha)
            header = np.lib.format.header_data_from_array_1_0(arr)
            np.lib.format.write_array_header_1_0(w, header)  # type: ignore[arg-type]
            w.write(memoryview(arr).cast("B"))  # type: ignore[arg-type]  # ndarray is a buffer

    atomic_write(path, write)
    return sha.hexdigest()


class TokensFile:
    """tokens.npy written in place, block by block: created at its full size (holes read as
    zeros), rows written with pwrite and synced before the shard that uses them is logged, so
    no copy of every token is ever held in memory."""

    def __init__(self, path: Path, n_contexts: int, n_ctx: int, create: bool) -> None:
        file = path / TOKENS
        shape = (n_contexts, n_ctx)
        if create:

            def write(tmp: Path) -> None:
                np.lib.format.open_memmap(tmp, "w+", np.int32, shape)

            atomic_write(file, write)
        try:
            mm = np.load(file, mmap_mode="r")
            ok = mm.shape == shape and mm.dtype == np.int32 and mm.flags.c_contiguous
            self.offset = mm.offset
            del mm
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"{file} is missing or corrupt; delete {path} and harvest again")
        self.n_ctx = n_ctx
        self._fd = os.open(file, os.O_RDWR)

    def read(self, c0: int, c1: int) -> np.ndarray:
        row = self.n_ctx * 4
        data = os.pread(self._fd, (c1 - c0) * row, self.offset + c0 * row)
        return np.frombuffer(data, np.int32).reshape(-1, self.n_ctx)

    def write(self, c0: int, rows: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(rows, np.int32)).cast("B")  # type: ignore[arg-type]
        at = self.offset + c0 * self.n_ctx * 4
        while len(data):
            n = os.pwrite(self._fd, data, at)
            data, at = data[n:], at + n

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write the header: everything in ``meta`` but the shard list, which lives in the log."""
    atomic_write(path / META, json.dumps(header(meta), indent=1))


def header(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "shards"}


def cut_torn_tail(path: Path) -> None:
    """Writers call this before appending to the log: drop a line a crash cut short."""
    cut_torn_line(path / LOG)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The shards the log lists, in order; a torn last line is ignored."""
    fix = (
        "delete it and later lines and re-run `saelab harvest` with the same settings to redo "
        "those shards"
    )
    return read_records(path / LOG, "a shard entry", fix)


def write_shard(
    out: Path, meta: dict[str, Any], index: int, c0: int, c1: int, bufs: dict[str, torch.Tensor]
) -> None:
    """A shard's files, then the log line that lists them (one process writing alone)."""
    log_shards(out, meta, [write_shard_files(out, meta, index, c0, c1, bufs)])


def write_shard_files(
    out: Path, meta: dict[str, Any], index: int, c0: int, c1: int, bufs: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Write a shard's files (``bufs``: "kind/hook" -> rows) and return its log entry. Any
    rank may call this; only the log's writer (`log_shards`) makes the shard exist."""
    files = {}
    for key, buf in bufs.items():
        kind, hook = key.split("/", 1)
        buf = buf.cpu()
        if not bool(torch.isfinite(buf).all()):  # fp16 overflows to inf past 65504
            raise UserError(
                f"shard {index} of {kind} at {hook} holds non-finite values ({buf.dtype} "
                f"overflow?); nothing of it was written: harvest with --dtype bfloat16 or float32"
            )
        rel = shard_path(kind, hook, index)
        files[rel] = save_npy(out / rel, to_numpy(buf))
    return shard_entry(index, c0, c1, meta["tokens_per_context"], files)


def shard_entry(index: int, c0: int, c1: int, per: int, files: dict[str, str]) -> dict[str, Any]:
    """A shard's log entry; ``files`` maps each file (`shard_path`) to its sha256."""
    return {
        "index": index,
        "context_start": c0,
        "context_stop": c1,
        "token_start": c0 * per,
        "token_stop": c1 * per,
        "files": files,
    }


def log_shards(out: Path, meta: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """Append finished shards to the log, in one fsynced write (the header first if there is
    none yet, the final header once every shard is listed). The one writer of the log."""
    if not (out / META).is_file():
        write_meta(out, {**meta, "format": FORMAT, "complete": False, "n_tokens": 0})
    append_lines(out / LOG, "".join(json.dumps(e) + "\n" for e in entries), fsync=True)
    shards = meta["shards"]
    before = shards[-1]["index"] if shards else -1
    shards.extend(entries)
    if entries[0]["index"] < before:  # a gap filled: rare, and near-sorted lists sort in O(n)
        shards.sort(key=lambda e: e["index"])
    meta["n_tokens"] += n_tokens(entries)
    # O(1) per shard until the count says everything may be listed (a harvest has ~10^4 shards)
    if meta["n_tokens"] >= meta["n_contexts"] * meta["tokens_per_context"]:
        if covers(shards, meta["n_contexts"]):
            finish(out, meta)


def covers(shards: list[dict[str, Any]], n_contexts: int | None) -> bool:
    """Whether ``shards`` (in index order) list every context once, from 0 to n_contexts."""
    at = 0
    for s in shards:
        if s["context_start"] != at:
            return False
        at = s["context_stop"]
    return bool(shards) and at == n_contexts


def n_tokens(shards: list[dict[str, Any]]) -> int:
    return sum(s["token_stop"] - s["token_start"] for s in shards)


def finish(out: Path, meta: dict[str, Any]) -> None:
    """The final header, once the log lists every shard: complete, with the tokens' sha256
    (hashed here unless the writer knows it). Shards made by several processes, or after a
    resume that filled gaps, may have been logged out of order: the log is rewritten in
    index order first (atomically), so every finished log is the same bytes."""
    if not meta.get("tokens_sha256"):
        meta["tokens_sha256"] = sha256_file(out / TOKENS)
    logged = read_log(out)
    if [e["index"] for e in logged] != sorted(e["index"] for e in logged):
        logged.sort(key=lambda e: e["index"])
        atomic_write(out / LOG, "".join(json.dumps(e) + "\n" for e in logged))
    meta["complete"] = True
    write_meta(out, meta)


def convert_v1(path: Path, meta: dict[str, Any]) -> None:
    """Give a format-1 harvest (shard list inside meta.json) a log, then a format-2 header.
    A crash in between leaves meta.json as it was, and the next run converts again."""
    atomic_write(path / LOG, "".join(json.dumps(s) + "\n" for s in meta["shards"]))
    meta["format"] = FORMAT
    meta["n_tokens"] = n_tokens(meta["shards"])  # what the log lists, whatever the old header said
    write_meta(path, meta)


# ---------------------------------------------------------------------------------------
# Reading


def read_meta(path: Path) -> dict[str, Any]:
    """A harvest's header merged with its log (``shards``, ``n_tokens``, ``complete``),
    validated, or a UserError naming what is wrong and the fix."""
    meta_path = path / META
    if not path.is_dir() or not meta_path.is_file():
        raise UserError(
            f"no harvest at {path} (missing {meta_path.name}); run `saelab harvest` to create it "
            "or pass the path of an existing cached_activations/<name> directory"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(
            f"{meta_path} is not valid JSON ({exc}); delete the harvest and re-run `saelab harvest`"
        ) from None
    v1 = isinstance(meta, dict) and meta.get("format") == 1
    required = _REQUIRED + (("shards",) if v1 else ())
    missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(
            f"{meta_path} is not a saelab harvest (missing {', '.join(missing)}); "
            "point at a directory written by `saelab harvest`"
        )
    if meta["format"] not in READ_FORMATS:
        raise UserError(
            f"{meta_path} has harvest format {meta['format']!r}, this saelab reads "
            f"{' and '.join(map(str, READ_FORMATS))}; use the saelab version that wrote it or "
            "re-run `saelab harvest`"
        )
    if meta["dtype"] not in NP_DTYPES:
        raise UserError(
            f"{meta_path} has unknown dtype {meta['dtype']!r} (expected one of "
            f"{', '.join(NP_DTYPES)}); re-run `saelab harvest`"
        )
    if meta["format"] != 1:
        # Several ranks' shards, or a resume that filled gaps, may be logged out of order.
        shards = meta["shards"] = sorted(read_log(path), key=lambda e: e["index"])
        meta["n_tokens"] = n_tokens(shards)
        meta["complete"] = bool(meta.get("complete")) and covers(shards, meta.get("n_contexts"))
    meta.setdefault("tokens_sha256", "")
    return meta


def read_checked(path: Path) -> dict[str, tuple[str, int, int]]:
    """The readers' record of confirmed hashes: relative file -> (sha256, size, mtime_ns).
    It is only a cache: unreadable lines are skipped, and later lines win."""
    record = {}
    for line in complete_lines(path / CHECKED):
        try:
            e = json.loads(line)
            record[str(e["file"])] = (str(e["sha256"]), int(e["size"]), int(e["mtime_ns"]))
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            continue
    return record


def append_checked(path: Path, entries: list[tuple[str, str, int, int]]) -> None:
    """Record confirmed hashes (file, sha256, size, mtime_ns); raises OSError if the folder is
    not writable. Not fsynced: a record lost in a crash only costs one more hash."""
    keys = ("file", "sha256", "size", "mtime_ns")
    text = "".join(json.dumps(dict(zip(keys, e))) + "\n" for e in entries)
    append_lines(path / CHECKED, text, fsync=False)


def check_header(file: Path, rows: int, d_in: int, dtype: np.dtype) -> int:
    """Shape, dtype and byte size against the harvest: catches truncated and mismatched
    files. Returns the header's length, where the rows start."""
    try:
        f = open(file, "rb")
    except FileNotFoundError:
        raise UserError(f"{file} is missing though the harvest lists it; {REPAIR}") from None
    with f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                raise ValueError(f"npy version {version}")
            shape, fortran, got = read_header(f)
        except ValueError:
            raise UserError(f"{file} is not a readable .npy file (truncated?); {REPAIR}") from None
        header_len = f.tell()
        size = os.fstat(f.fileno()).st_size
    expected = header_len + rows * d_in * dtype.itemsize
    if shape != (rows, d_in) or got != dtype or fortran:
        raise UserError(
            f"{file} holds {got}{list(shape)}, the harvest says {dtype}[{rows}, {d_in}]; {REPAIR}"
        )
    if size != expected:
        raise UserError(f"{file} is truncated ({size} of {expected} bytes); {REPAIR}")
    return header_len


def to_torch(raw: np.ndarray, storage: str) -> torch.Tensor:
    """Zero-copy view of storage-dtype rows as a torch tensor (bf16 is kept as uint16 bits)."""
    if storage == "bfloat16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(raw)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: keep the raw bits
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()
