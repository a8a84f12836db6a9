"""saelab.harvest_array: activations a user already has, written as a harvest folder."""

from pathlib import Path

import numpy as np
import pytest
import torch

import saelab.harvest_array as HA
from saelab.errors import UserError
from saelab.shards import read_meta
from saelab.store import ActivationStore


class _Crash(BaseException):
    """Stands in for a kill: nothing in saelab catches a BaseException."""


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _user_data(rows_per_ctx: int = 7, n_contexts: int = 9, d_in: int = 5):
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((rows_per_ctx * n_contexts, d_in)).astype(np.float32)
    tokens = rng.integers(2, 1000, (n_contexts, rows_per_ctx + 1)).astype(np.int64)
    tokens[:, 0] = 1
    return acts, tokens


def test_array_round_trips_through_the_store(tmp_path):
    acts, tokens = _user_data()
    out = HA.harvest_array(tmp_path / "a", acts, tokens=tokens, hook="my.hook", shard_rows=20)
    s = ActivationStore(out)
    assert (s.hook, s.d_in, s.n_tokens, s.storage_dtype) == ("my.hook", 5, 63, "float32")
    np.testing.assert_array_equal(s.read(0, 63).numpy(), acts)
    assert len(s.shards) == 5  # 20 rows -> 2 contexts of 7 per shard, 9 contexts
    np.testing.assert_array_equal(s.tokens(), tokens)
    window, i = s.context(10, before=2, after=0)
    assert window[i] == tokens[1, 4] and s.locate(10) == (1, 4)
    meta = read_meta(out)
    assert meta["complete"] and meta["corpus"] == {"array": "ndarray"}
    s.verify()
    stream = s.batches(9, chunk_rows=8, shuffle_buffer=16)
    rows = np.concatenate([next(stream).numpy().copy() for _ in range(7)])  # one epoch
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, acts.tolist()))


def test_array_from_npy_and_safetensors_files(tmp_path):
    from safetensors.torch import save_file

    acts, _ = _user_data()
    np.save(tmp_path / "x.npy", acts.astype(np.float16))
    s = ActivationStore(HA.harvest_array(tmp_path / "n", tmp_path / "x.npy"))
    assert s.storage_dtype == "float16" and s.tokens_per_context == 63  # placeholder tokens
    np.testing.assert_array_equal(s.read(0, 63, dtype=torch.float16).numpy(), acts.astype("f2"))
    bf = torch.from_numpy(acts).to(torch.bfloat16)
    save_file({"acts": bf, "other": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="holds acts, other; name .* key="):
        HA.harvest_array(tmp_path / "s", tmp_path / "x.safetensors")
    s = ActivationStore(HA.harvest_array(tmp_path / "s", tmp_path / "x.safetensors", key="acts"))
    assert s.storage_dtype == "bfloat16"
    torch.testing.assert_close(s.read(0, 63, dtype=torch.bfloat16), bf, rtol=0, atol=0)


def test_array_write_resumes_after_a_crash(tmp_path, monkeypatch):
    acts, tokens = _user_data()
    want = snapshot(HA.harvest_array(tmp_path / "ref", acts, tokens=tokens, shard_rows=20))
    real = HA.write_shard

    def crash_on_third(out, meta, index, *args):
        if index == 2:
            raise _Crash
        real(out, meta, index, *args)

    monkeypatch.setattr(HA, "write_shard", crash_on_third)
    with pytest.raises(_Crash):
        HA.harvest_array(tmp_path / "k", acts, tokens=tokens, shard_rows=20)
    monkeypatch.setattr(HA, "write_shard", real)
    assert snapshot(HA.harvest_array(tmp_path / "k", acts, tokens=tokens, shard_rows=20)) == want
    with pytest.raises(UserError, match="holds another harvest"):
        HA.harvest_array(tmp_path / "k", acts[:14], tokens=tokens[:2])


def test_array_bad_input(tmp_path):
    acts, tokens = _user_data()
    with pytest.raises(UserError, match=r"shape \[63\]; activations must be \[rows, d_in\]"):
        HA.harvest_array(tmp_path / "a", acts[:, 0])
    with pytest.raises(UserError, match="do not match 63 activation rows"):
        HA.harvest_array(tmp_path / "a", acts, tokens=tokens[:, :5])
    assert not (tmp_path / "a").exists()
