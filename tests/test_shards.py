"""The harvest folder's writers and readers: the shard log, its torn lines, the header written
only at the start and the end, tokens.npy written in place, the readers' checksum record."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab import shards
from saelab.errors import UserError
from saelab.shards import CHECKED, LOG, META, TOKENS


def _meta(n_contexts: int, per: int = 3, d_in: int = 2) -> dict:
    return {
        "format": shards.FORMAT, "hooks": ["h"], "d_in": d_in, "dtype": "float32",
        "n_ctx": per + 1, "tokens_per_context": per, "n_contexts": n_contexts,
        "n_tokens": 0, "complete": False, "tokens_sha256": "", "shards": [],
    }  # fmt: skip


def write(path: Path, n_shards: int, shard_contexts: int = 2, total: int | None = None) -> dict:
    """A harvest of ``n_shards`` shards through `write_shard`; rows hold their own index."""
    n_contexts = total if total is not None else n_shards * shard_contexts
    meta = _meta(n_contexts)
    tokens = shards.TokensFile(path, n_contexts, 4, create=True)
    tokens.write(0, np.arange(n_contexts * 4, dtype=np.int32).reshape(-1, 4))
    tokens.sync()
    tokens.close()
    for i in range(n_shards):
        c0, c1 = i * shard_contexts, min((i + 1) * shard_contexts, n_contexts)
        rows = torch.arange(c0 * 3, c1 * 3, dtype=torch.float32)
        shards.write_shard(path, meta, i, c0, c1, {"acts/h": rows[:, None].repeat(1, 2)})
    return meta


def test_header_written_at_start_and_end_only(tmp_path, monkeypatch):
    writes: list[str] = []
    real = shards.write_meta
    monkeypatch.setattr(shards, "write_meta", lambda p, m: writes.append("meta") or real(p, m))
    write(tmp_path, 20, total=40)
    assert writes == ["meta", "meta"]  # the header before shard 0, the final one after 19
    header = json.loads((tmp_path / META).read_text())
    assert "shards" not in header and header["complete"] and header["n_tokens"] == 120
    want = hashlib.sha256((tmp_path / TOKENS).read_bytes()).hexdigest()
    assert header["tokens_sha256"] == want
    lines = (tmp_path / LOG).read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(20))


def test_read_meta_merges_header_and_log(tmp_path):
    write(tmp_path, 3, total=10)  # 3 of 5 shards: a harvest still running
    meta = shards.read_meta(tmp_path)
    assert [(s["context_start"], s["token_stop"]) for s in meta["shards"]] == [
        (0, 6), (2, 12), (4, 18)
    ]  # fmt: skip
    assert meta["n_tokens"] == 18 and not meta["complete"] and meta["tokens_sha256"] == ""
    e = meta["shards"][1]
    rel = shards.shard_path("acts", "h", 1)
    assert e["files"] == {rel: hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()}


@pytest.mark.parametrize("cut", [1, 20, -1])
def test_torn_last_line_is_ignored_by_readers_and_cut_by_writers(tmp_path, cut):
    write(tmp_path, 3, total=10)
    data = (tmp_path / LOG).read_bytes()
    lines = data.splitlines(keepends=True)
    (tmp_path / LOG).write_bytes(b"".join(lines[:2]) + lines[2][:cut])
    assert len(shards.read_meta(tmp_path)["shards"]) == 2
    shards.cut_torn_tail(tmp_path)
    assert (tmp_path / LOG).read_bytes() == b"".join(lines[:2])
    shards.cut_torn_tail(tmp_path)  # a clean log is left alone
    assert (tmp_path / LOG).read_bytes() == b"".join(lines[:2])


def test_damaged_middle_line_is_refused(tmp_path):
    write(tmp_path, 3, total=10)
    lines = (tmp_path / LOG).read_text().splitlines(keepends=True)
    (tmp_path / LOG).write_text(lines[0] + "{oops\n" + lines[2])
    with pytest.raises(UserError, match=f"line 2 of .*{LOG} is not a shard entry; delete it"):
        shards.read_meta(tmp_path)


def test_format1_meta_still_reads_and_converts(tmp_path):
    write(tmp_path, 3, total=10)
    merged = shards.read_meta(tmp_path)
    v1 = {**merged, "format": 1}
    (tmp_path / LOG).unlink()
    (tmp_path / META).write_text(json.dumps(v1))
    assert shards.read_meta(tmp_path) == v1
    shards.convert_v1(tmp_path, shards.read_meta(tmp_path))
    assert "shards" not in json.loads((tmp_path / META).read_text())
    assert shards.read_meta(tmp_path) == merged


def test_tokens_file_in_place(tmp_path):
    t = shards.TokensFile(tmp_path, 5, 3, create=True)
    t.write(2, np.array([[7, 8, 9], [1, 2, 3]]))
    t.sync()
    np.testing.assert_array_equal(t.read(1, 4), [[0, 0, 0], [7, 8, 9], [1, 2, 3]])
    t.close()
    arr = np.load(tmp_path / TOKENS)
    assert arr.dtype == np.int32 and arr.shape == (5, 3) and arr[3].tolist() == [1, 2, 3]
    with pytest.raises(UserError, match="tokens.npy is missing or corrupt; delete"):
        shards.TokensFile(tmp_path, 6, 3, create=False)


def test_checked_record_skips_torn_and_bad_lines(tmp_path):
    shards.append_checked(tmp_path, [("a.npy", "aa", 1, 2)])
    with open(tmp_path / CHECKED, "ab") as f:
        f.write(b'{"file": "b.npy", "sha2')  # a crash mid-append
    shards.append_checked(tmp_path, [("c.npy", "cc", 3, 4), ("a.npy", "a2", 5, 6)])
    with open(tmp_path / CHECKED, "ab") as f:
        f.write(b'{"file": "d.npy"}\n')
    assert shards.read_checked(tmp_path) == {"a.npy": ("a2", 5, 6), "c.npy": ("cc", 3, 4)}
