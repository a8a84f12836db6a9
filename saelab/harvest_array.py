"""Activations a user already has (an array, a tensor, a .npy or a .safetensors file) written as
a harvest folder, through `saelab.harvest`'s writers, so training, evaluation and the app read
them like any harvest.

Split from `saelab.harvest` so that module stays the model-driven harvest; the folder format is
still `saelab.shards`'s and the identity fields still `harvest.IDENTITY`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.errors import UserError
from saelab.harvest import IDENTITY, _check_foreign, _new_meta, _remove_temps
from saelab.runs import writer_lock
from saelab.shards import (
    META,
    STORE_DTYPES,
    TOKENS,
    cut_torn_tail,
    read_meta,
    save_npy,
    write_shard,
)


def harvest_array(
    out: str | os.PathLike,
    acts: np.ndarray | torch.Tensor | str | os.PathLike,
    *,
    tokens: np.ndarray | None = None,
    hook: str = "acts",
    key: str | None = None,
    dtype: str | None = None,
    model: str = "array",
    shard_rows: int = 1 << 20,
) -> Path:
    """Write activations a user already has as a harvest folder that `ActivationStore` (and so
    training, evaluation and the app) reads, through the same writers as `harvest`.

    ``acts``: ``[rows, d_in]``, an array, a tensor, a ``.npy`` file (memory-mapped) or a
    ``.safetensors`` file (``key`` names the tensor if it holds several); it is read shard by
    shard. ``tokens``: the token ids behind the rows, int ``[n_contexts, n_ctx]`` with BOS at
    position 0, whose non-BOS positions are the rows in order; without them, tokens.npy holds
    placeholder zeros in contexts of the largest ``tokens_per_context`` up to 1024 that
    divides the rows. ``dtype``: the storage dtype (default: the array's if float16, bfloat16
    or float32, else float32). A rerun after a crash resumes after the last logged shard.
    """
    src, rows, d_in, src_dtype = _array_source(acts, key)
    tokens = _tokens_for(tokens, rows)
    dtype = dtype or (src_dtype if src_dtype in STORE_DTYPES else "float32")
    if dtype not in STORE_DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(STORE_DTYPES)}; pick one")
    n_contexts, n_ctx = tokens.shape
    sc = max(1, shard_rows // (n_ctx - 1))
    name = Path(acts).name if isinstance(acts, (str, os.PathLike)) else type(acts).__name__
    ident = {
        "model": model, "model_dtype": None, "hooks": [hook], "n_ctx": n_ctx, "dtype": dtype,
        "corpus": {"array": name}, "seed": 0, "grads": False, "n_contexts": n_contexts,
    }  # fmt: skip
    meta = _new_meta(ident, d_in, sc, 0)
    path = Path(out)
    with writer_lock(path, "harvest"):
        if (path / META).is_file():
            old = read_meta(path)
            if any(old.get(k) != meta[k] for k in (*IDENTITY, "d_in", "shard_contexts")):
                raise UserError(f"{path} holds another harvest; pass another out or delete it")
            meta = old
            cut_torn_tail(path)
        else:
            _check_foreign(path)
            meta["tokens_sha256"] = save_npy(path / TOKENS, tokens.astype(np.int32))
        _remove_temps(path)
        per = n_ctx - 1
        listed = {s["index"] for s in meta["shards"]}
        for index in (i for i in range(math.ceil(n_contexts / sc)) if i not in listed):
            c0, c1 = index * sc, min((index + 1) * sc, n_contexts)
            block = src(c0 * per, c1 * per).to(STORE_DTYPES[dtype])
            write_shard(path, meta, index, c0, c1, {f"acts/{hook}": block})
    return path


def _tokens_for(tokens: np.ndarray | None, rows: int) -> np.ndarray:
    """The token ids behind `rows` activation rows: the given ones, checked, else placeholder
    zeros in contexts of the largest length up to 1024 that divides the rows."""
    if tokens is None:
        per = max(d for d in range(1, min(rows, 1024) + 1) if rows % d == 0)
        tokens = np.zeros((rows // per, per + 1), np.int32)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[0] * (tokens.shape[1] - 1) != rows:
        raise UserError(
            f"tokens of shape {list(tokens.shape)} do not match {rows} activation rows; pass "
            "[n_contexts, n_ctx] token ids whose n_contexts * (n_ctx - 1) equals the rows"
        )
    return tokens


def _array_source(
    acts: np.ndarray | torch.Tensor | str | os.PathLike, key: str | None
) -> tuple[Callable[[int, int], torch.Tensor], int, int, str]:
    """(rows a..b as a tensor, rows, d_in, dtype name) of what `harvest_array` was given."""
    if isinstance(acts, (str, os.PathLike)):
        if str(acts).endswith(".safetensors"):
            return _safetensors_source(Path(acts), key)
        try:
            acts = np.load(acts, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise UserError(
                f"cannot read {acts} as .npy ({exc}); pass a .npy or .safetensors file"
            ) from None
    if isinstance(acts, torch.Tensor):
        t = acts.detach().cpu()
        rows, d_in = _rows_cols(t.shape, "acts")
        return (lambda a, b: t[a:b]), rows, d_in, str(t.dtype).removeprefix("torch.")
    arr = np.asarray(acts)
    rows, d_in = _rows_cols(arr.shape, "acts")
    return (lambda a, b: torch.from_numpy(np.array(arr[a:b]))), rows, d_in, str(arr.dtype)


def _safetensors_source(
    path: Path, key: str | None
) -> tuple[Callable[[int, int], torch.Tensor], int, int, str]:
    from safetensors import safe_open

    f = safe_open(str(path), framework="pt")
    names = list(f.keys())
    key = key or (names[0] if len(names) == 1 else None)
    if key not in names:
        raise UserError(f"{path} holds {', '.join(names)}; name the activations' tensor with key=")
    part = f.get_slice(key)
    rows, d_in = _rows_cols(part.get_shape(), path)
    name = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(part.get_dtype(), "")
    return (lambda a, b: part[a:b]), rows, d_in, name


def _rows_cols(shape: Any, what: Any) -> tuple[int, int]:
    if len(shape) != 2 or not shape[0]:
        raise UserError(f"{what} has shape {list(shape)}; activations must be [rows, d_in]")
    return int(shape[0]), int(shape[1])
