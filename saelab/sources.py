"""What the trainer reads: `ActivationSource`, and its three kinds.

- `StoreSource`: a harvest's training rows, read through `saelab.store` (cached training).
- `LiveSource`: the model run on the corpus while training goes, no cache (DESIGN.md, "Scale
  beyond one machine": a 1B-token fp16 cache of one 2304-wide hook is 4.6 TB).
- `ArraySource`: activations the user already has (a tensor or array, a `.npy` or a
  safetensors file).

Live and array sources share one shuffle plan. The stream's rows (context-major, BOS dropped,
as a harvest stores them) are cut, in order, into buffers of whole contexts of about
``shuffle_buffer`` rows; each buffer is permuted by a permutation that is a pure function of
(seed, epoch, buffer index), and batches are cut from the permuted buffers, straddling them.
So ``start_row=r`` can skip every buffer before row ``r`` without computing it (a live source
re-tokenizes them, no model forward) and yields exactly what the uninterrupted stream yields
after its first ``r`` rows; and a live source yields the same batches as an array source of
the same contexts' activations. Buffers live on the training device: activations never leave
it, and batches are converted to float32 there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from saelab.corpus import iter_contexts, load_texts
from saelab.distributed import SINGLE, Dist
from saelab.errors import UserError
from saelab.harvest import _probe_d_in, _Recorder
from saelab.models import enable_hooks, load_model, resolve_hook, resolve_model_dtype, stop_layer
from saelab.shards import STORE_DTYPES
from saelab.store import ActivationStore
from saelab.stream import BatchStream, PartOfBatches

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class BatchIterator(Protocol):
    """An endless iterator of batches (``(acts, grads)`` pairs when grads were asked for)
    that `close` stops (releasing threads or device buffers)."""

    def __iter__(self) -> Iterator[Batch]: ...
    def __next__(self) -> Batch: ...
    def close(self) -> None: ...


@runtime_checkable
class ActivationSource(Protocol):
    """The activations of one hook, in exact shuffled epochs."""

    hook: str
    d_in: int
    has_grads: bool
    """Whether ``batches(grads=True)`` can give dL/dx with each row (gradient_topk)."""
    n_tokens: int
    """Rows per epoch."""

    def identity(self) -> dict[str, Any]:
        """What the run's cfg.json records about this training data."""
        ...

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` rows (fewer if an epoch has fewer), float32, for the scale and b_dec init."""
        ...

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        start_row: int = 0,
        grads: bool = False,
        part: tuple[int, int] = (0, 1),
    ) -> BatchIterator:
        """Endless shuffled stream; ``start_row=r`` yields what the uninterrupted stream
        yields after its first ``r`` rows. ``part=(rank, world)``: only that process's slice
        of each batch (`saelab.stream.PartOfBatches`), for data-parallel training."""
        ...

    def confirm_pending(self) -> None:
        """Raise a UserError if anything handed out so far (the sample included) failed its
        integrity check; the trainer calls it before it saves what depends on that data."""
        ...


# ---------------------------------------------------------------------------------------
# Cached: a harvest


class StoreSource:
    """The rows ``token_range`` of a harvest, shuffled by `ActivationStore.batches`.

    Batches come in ``dtype``: the trainer asks for the storage dtype when it trains on CUDA
    (half the bytes to move; converted to float32 on the device) and float32 otherwise.
    """

    def __init__(
        self,
        store: ActivationStore,
        token_range: tuple[int, int],
        shuffle_buffer: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.store, self.token_range = store, (int(token_range[0]), int(token_range[1]))
        self.hook, self.d_in, self.has_grads = store.hook, store.d_in, store.has_grads
        self.n_tokens = store.rows_in(self.token_range)
        self.shuffle_buffer, self.dtype = shuffle_buffer, dtype

    def __repr__(self) -> str:
        return f"harvest {self.store.path}"

    @staticmethod
    def storage_dtype(store: ActivationStore) -> torch.dtype:
        return STORE_DTYPES[store.storage_dtype]

    def identity(self) -> dict[str, Any]:
        return {"train_range": list(self.token_range)}

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        return self.store.sample(n, seed=seed, token_range=self.token_range)

    def confirm_pending(self) -> None:
        self.store.confirm_pending()

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        start_row: int = 0,
        grads: bool = False,
        part: tuple[int, int] = (0, 1),
    ) -> BatchIterator:
        return self.store.batches(
            batch_size,
            token_range=self.token_range,
            seed=seed,
            start_row=start_row,
            shuffle_buffer=self.shuffle_buffer,
            dtype=self.dtype,
            grads=grads,
            part=part,
        )


# ---------------------------------------------------------------------------------------
# The plan shared by live and array sources


def buffer_rows(shuffle_buffer: int, tokens_per_context: int) -> int:
    """Rows per buffer: the whole contexts that fit in shuffle_buffer rows (at least one)."""
    return max(1, shuffle_buffer // tokens_per_context) * tokens_per_context


def _perm(seed: int, epoch: int, buffer: int, n: int, device: torch.device) -> torch.Tensor:
    rng = np.random.default_rng([seed % 2**63, epoch, 3, buffer])
    return torch.from_numpy(rng.permutation(n)).to(device)


class _Planned:
    """A stream of ``n_tokens`` rows per epoch in buffers of ``rows_per_buffer``; subclasses
    give `_fill`: rows [a, b) of an epoch, in stream order, on ``device``."""

    n_tokens: int
    rows_per_buffer: int
    tokens_per_context: int
    device: torch.device

    def _fill(self, a: int, b: int, grads: bool) -> list[torch.Tensor]:
        raise NotImplementedError

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """A seeded choice of ``n`` rows of the first whole contexts that hold ``n`` rows.

        Not spread over the epoch (for a live source that would cost a forward of every
        context it touches); the scale and a median need no more.
        """
        per = self.tokens_per_context
        m = min(self.n_tokens, math.ceil(n / per) * per)
        rows = self._fill(0, m, False)[0]
        pick = np.sort(np.random.default_rng([seed % 2**63, 2]).choice(m, min(n, m), False))
        return rows[torch.from_numpy(pick).to(rows.device)].float()

    def confirm_pending(self) -> None:
        """Nothing to confirm: the rows come straight from memory or the model."""

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        start_row: int = 0,
        grads: bool = False,
        part: tuple[int, int] = (0, 1),
    ) -> BatchIterator:
        if batch_size <= 0 or start_row < 0:
            raise ValueError("batch_size must be > 0 and start_row >= 0")
        if grads and not getattr(self, "has_grads", False):
            raise UserError(f"{self!r} has no gradients; give them or train another arch")
        mine = PartOfBatches(batch_size, part)
        return BatchStream(self._stream(mine, seed, start_row, grads), self.n_tokens)

    def _buffers(
        self, seed: int, epoch: int, skip: int, grads: bool
    ) -> Iterator[list[torch.Tensor]]:
        """The epoch's permuted buffers from row ``skip`` on (earlier buffers never filled)."""
        n, size = self.n_tokens, self.rows_per_buffer
        for b in range(skip // size, math.ceil(n / size)):
            a, z = b * size, min((b + 1) * size, n)
            perm = _perm(seed, epoch, b, z - a, self.device)[max(skip - a, 0) :]
            yield [t[perm] for t in self._fill(a, z, grads)]

    def _stream(
        self, mine: PartOfBatches, seed: int, start_row: int, grads: bool
    ) -> Iterator[Batch]:
        # Whole batches are cut, then sliced: every process then fills each buffer at the
        # same batch, which a live source's shared forwards (collectives) need; cutting only
        # a process's rows would have the first ones finish a batch a buffer earlier.
        epoch, skip = divmod(start_row, self.n_tokens)
        batch_size, lo = mine.batch_size, mine.lo
        parts: list[list[torch.Tensor]] = []
        have = 0
        while True:
            for buf in self._buffers(seed, epoch, skip, grads):
                at, rows = 0, buf[0].shape[0]
                while at < rows:
                    take = min(batch_size - have, rows - at)
                    parts.append([t[at : at + take] for t in buf])
                    have, at = have + take, at + take
                    if have == batch_size:
                        out = [torch.cat(ts)[lo : lo + mine.local].float() for ts in zip(*parts)]
                        yield out[0] if len(out) == 1 else (out[0], out[1])
                        parts, have = [], 0
            epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------------------------------
# Activations in hand


def _open_array(data: Any, key: str) -> tuple[Any, str]:
    """(row-sliceable [n, d] array, description) from a tensor, an array or a file path."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return data, f"in-memory {tuple(data.shape)}"
    path = Path(data)
    if not path.is_file():
        raise UserError(f"activations file {path} does not exist; pass a .npy or .safetensors")
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r"), path.name
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        f = safe_open(str(path), "pt")
        keys = list(f.keys())
        if key not in keys and len(keys) != 1:
            raise UserError(
                f"{path} holds {', '.join(keys)}; name the activations' tensor with its key"
            )
        return f.get_slice(key if key in keys else keys[0]), path.name
    raise UserError(f"{path} is neither .npy nor .safetensors; save the activations as one")


def _rows(arr: Any, a: int, b: int, device: torch.device) -> torch.Tensor:
    got = arr[a:b]
    t = got if isinstance(got, torch.Tensor) else torch.from_numpy(np.array(got))  # a copy
    return t.to(device)


class ArraySource(_Planned):
    """Activations already in hand: ``[n, d_in]`` rows in stream order (a harvest's row order:
    ``tokens_per_context`` rows per context), optionally with gradients of the same shape.

    Arrays and ``.npy`` files are read a buffer at a time (``.npy`` memmapped), so a file
    larger than memory is fine.
    """

    def __init__(
        self,
        data: Any,
        *,
        hook: str = "activations",
        grads: Any = None,
        tokens_per_context: int = 1,
        shuffle_buffer: int = 262_144,
        device: str | torch.device = "cpu",
    ) -> None:
        self.acts, self.source = _open_array(data, hook)
        self.grads = None if grads is None else _open_array(grads, hook)[0]
        shape = tuple(self.acts.get_shape() if hasattr(self.acts, "get_shape") else self.acts.shape)
        if len(shape) != 2 or shape[0] == 0:
            raise UserError(f"activations {self.source} have shape {shape}; give [n_rows, d_in]")
        self.hook, self.n_tokens, self.d_in = hook, int(shape[0]), int(shape[1])
        self.has_grads = self.grads is not None
        self.tokens_per_context = tokens_per_context
        self.rows_per_buffer = buffer_rows(shuffle_buffer, tokens_per_context)
        self.device = torch.device(device)

    def __repr__(self) -> str:
        return f"ArraySource({self.source})"

    def identity(self) -> dict[str, Any]:
        return {"array": {"source": self.source, "n_tokens": self.n_tokens, "d_in": self.d_in}}

    def _fill(self, a: int, b: int, grads: bool) -> list[torch.Tensor]:
        arrays = [self.acts, self.grads] if grads else [self.acts]
        return [_rows(arr, a, b, self.device) for arr in arrays]


# ---------------------------------------------------------------------------------------
# Live: the model run on the corpus


class _Contexts:
    """Token windows of the corpus by index, read forward; going back restarts the corpus."""

    def __init__(self, texts: Any, tokenizer: Any, n_ctx: int, chunk: int = 1024) -> None:
        self.texts, self.tokenizer, self.n_ctx, self.chunk = texts, tokenizer, n_ctx, chunk
        self._blocks: Iterator[np.ndarray] | None = None
        self._pending = np.empty((0, n_ctx), np.int32)
        self._at = 0  # index of the first pending window

    def take(self, start: int, count: int) -> np.ndarray:
        """Windows [start, start + count) of the stream, tokenizing what it skips."""
        if self._blocks is None or start < self._at:
            self._blocks = iter_contexts(self.texts(), self.tokenizer, self.n_ctx, self.chunk)
            self._pending, self._at = self._pending[:0], 0
        out = []
        while count:
            if not len(self._pending):
                block = next(self._blocks, None)
                if block is None:
                    raise UserError(
                        f"the corpus ran out at context {self._at}; {start + count} contexts of "
                        f"{self.n_ctx} tokens are needed: lower --n_tokens or use a bigger corpus"
                    )
                self._pending = block
            drop = min(max(start - self._at, 0), len(self._pending))
            keep = min(count, len(self._pending) - drop)
            out.append(self._pending[drop : drop + keep])
            self._pending = self._pending[drop + keep :]
            self._at += drop + keep
            start, count = start + keep, count - keep
        return np.concatenate(out)


class LiveSource(_Planned):
    """Activations of ``hook`` computed as they are needed: the training contexts are windows
    ``skip_contexts`` to ``skip_contexts + ceil(n_tokens / (n_ctx - 1))`` of the corpus stream
    (`saelab.corpus.iter_contexts`, as a harvest takes them), run through the model in
    ``model_batch_size``-context forwards in ``model_dtype``. With grads, each forward runs the
    whole model and a backward of the next-token loss (as `harvest --grads` does).

    Under data parallelism (``dist``) every process calls each method in step, since a
    buffer's forwards are shared out among them (see `_fill`).
    """

    has_grads = True

    def __init__(
        self,
        model: str | TransformerBridge,
        hook: str,
        *,
        n_tokens: int,
        corpus: str = "default",
        text_field: str = "text",
        split: str = "train",
        seed: int = 0,
        n_ctx: int = 128,
        skip_contexts: int = 0,
        model_dtype: str = "auto",
        model_batch_size: int = 16,
        shuffle_buffer: int = 262_144,
        device: str | torch.device = "cpu",
        dist: Dist = SINGLE,
    ) -> None:
        self.device, self.dist = torch.device(device), dist
        self.dtype = resolve_model_dtype(model_dtype, self.device)
        self.texts_spec = (corpus, text_field, split, seed)
        if isinstance(model, str):
            load_texts(*self.texts_spec)  # a bad corpus fails before the model loads
            self.model = load_model(model, device=str(self.device), dtype=self.dtype)
            name = model
        else:
            self.model, name = model, str(getattr(model.cfg, "model_name", "model"))
        if n_ctx > self.model.cfg.n_ctx:
            raise UserError(f"n_ctx={n_ctx} exceeds the model's {self.model.cfg.n_ctx}; lower it")
        resolve_hook(self.model, hook)
        enable_hooks(self.model, [hook])
        self.stop = stop_layer(self.model, [hook])
        self.hook, self.n_ctx, self.skip = hook, n_ctx, skip_contexts
        self.d_in = _probe_d_in(self.model, [hook], self.stop)
        self.tokens_per_context = per = n_ctx - 1
        self.n_contexts = math.ceil(n_tokens / per)
        self.n_tokens = self.n_contexts * per
        self.rows_per_buffer = buffer_rows(shuffle_buffer, per)
        self.model_batch_size = model_batch_size
        # Tokenize a buffer's worth at a time: a (re)start of the corpus stream then costs
        # about one buffer of tokenization, not a fixed large block.
        self.contexts = _Contexts(
            lambda: load_texts(*self.texts_spec), self.model.tokenizer, n_ctx,
            chunk=self.rows_per_buffer // per,
        )  # fmt: skip
        self._ident = {
            "model": name,
            "hooks": [hook],
            "corpus": dict(zip(("spec", "text_field", "split"), self.texts_spec)),
            "n_ctx": n_ctx,
            "model_dtype": model_dtype,
            "seed": seed,
            "skip_contexts": skip_contexts,
            "n_contexts": self.n_contexts,
        }

    def __repr__(self) -> str:
        return f"LiveSource({self._ident['model']}, {self.hook})"

    def identity(self) -> dict[str, Any]:
        return {"live": dict(self._ident)}

    def tokens(self, start: int, count: int) -> np.ndarray:
        """int32 ``[count, n_ctx]``: training contexts ``start`` to ``start + count``."""
        return self.contexts.take(self.skip + start, count)

    def _fill(self, a: int, b: int, grads: bool) -> list[torch.Tensor]:
        per = self.tokens_per_context
        first, n = a // per, (b - a) // per
        if not self.dist.active:
            return self._forward(first, n, grads)
        # Each process runs the model on its share of the contexts and all of them gather the
        # buffer: the same rows everywhere (the shuffle needs the whole buffer) for 1/N of
        # the forwards. Shares are padded to one size, which all_gather needs.
        share = math.ceil(n / self.dist.world)
        lo = min(self.dist.rank * share, n)
        out = []
        for t in self._forward(first + lo, min(lo + share, n) - lo, grads):
            padded = t.new_zeros(share * per, self.d_in)
            padded[: t.shape[0]] = t
            out.append(self.dist.all_gather(padded)[: n * per])
        return out

    def _forward(self, first: int, n: int, grads: bool) -> list[torch.Tensor]:
        """The rows of training contexts [first, first + n), and their grads with ``grads``."""
        per = self.tokens_per_context
        tokens = torch.from_numpy(self.tokens(first, n)).long() if n else None
        rec = _Recorder(self.model, [self.hook], grads)
        kinds = ["acts", "grads"] if grads else ["acts"]
        shape = (n * per, self.d_in)
        rec.bufs = {
            f"{k}/{self.hook}": torch.empty(shape, dtype=self.dtype, device=self.device)
            for k in kinds
        }
        mb = self.model_batch_size
        with self.model.hooks(fwd_hooks=rec.fwd_hooks()):
            for c in range(0, n, mb):
                assert tokens is not None
                rec.rows = slice(c * per, min(c + mb, n) * per)
                rec.run(tokens[c : c + mb].to(self.device), None if grads else self.stop)
        return list(rec.bufs.values())
