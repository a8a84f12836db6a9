"""Steer, clamp or ablate SAE latents inside a `TransformerBridge`, from a notebook.

An intervention edits the activation x at the SAE's hook, in the model's own units. With
D_i = W_dec[i] / input_scale (latent i's decoder direction in those units) and a_i(x) the
SAE's inference-mode code (thresholds for batch-level rules, no gradients for g-SAEs):

- `add(sae, i, scale)`:     x' = x + scale·D_i                       (activation steering)
- `clamp(sae, i, value)`:   x' = x + (value − a_i(x))·D_i where latent i fires, or at every
                            token with everywhere=True
- `ablate(sae, i)`:         x' = x − a_i(x)·D_i, i.e. x̂ without latent i plus the SAE error
                            term (x − x̂), so the edit removes only what the latent wrote

Each takes one latent or several (with one scale/value, or one per latent) and optional
`positions`: indices into the whole token sequence (prompt, then generated tokens; 0 is BOS).
An id or position is a Python or numpy integer or a 0-d integer tensor (what `argmax` gives);
several are a list of those or a 1-d integer tensor/array. Scales and values must be finite
numbers. Anything else (a float id, a NaN scale, an id outside [0, d_sae)) is a UserError.
`steer(model, *interventions)` applies them through `model.hooks(...)` and removes them on
exit; the model's weights are never touched.

Positions during generation: with the KV cache, each decoding step runs only the newest
token, so a hook sees a one-token tensor whose index 0 is *not* position 0. `generate` therefore
turns the KV cache off whenever an intervention names positions (every step then recomputes
the whole sequence and indices stay absolute); interventions without positions apply to every
token and keep the cache, which gives the same result because cached keys and values were
computed from the already-steered residual stream. Inside your own `model.generate(...)`
under `steer`, pass `use_past_kv_cache=False` if you use positions. Before it first trusts a
model's KV cache, `generate` checks one cached step against a full forward (`kv_cache_ok`), so
a library release that breaks the cache costs speed, never correctness.
"""

from __future__ import annotations

import html
import importlib.metadata
import logging
import math
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

import numpy as np
import torch
from torch import Tensor

from saelab.errors import UserError
from saelab.interop import load_sae
from saelab.models import load_model, resolve_hook, stop_layer
from saelab.sae import SparseCoder

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

logger = logging.getLogger(__name__)

__all__ = [
    "Intervention",
    "ablate",
    "add",
    "clamp",
    "compare_generations",
    "generate",
    "load_model",
    "load_sae",
    "next_token_probs",
    "steer",
    "top_latents",
]

# What the builders accept (see the module docstring); anything else is a UserError.
LatentIds = int | np.integer | Tensor | Sequence[int | np.integer | Tensor]
Coefs = float | Tensor | Sequence[float | Tensor]

# Hooks whose width is d_model: a d_in mismatch there is caught before any forward pass.
_RESIDUAL_WIDTH = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_in", "hook_out")
_RESIDUAL_WIDTH += ("hook_attn_out", "hook_mlp_out", "hook_embed")


# ---------------------------------------------------------------------------------------
# Interventions


@dataclass(frozen=True, eq=False)
class Intervention:
    """One edit of the activation at `hook`; build it with `add`, `clamp` or `ablate`."""

    kind: Literal["add", "clamp"]
    """add: x + Σ c_i D_i; clamp: move latent i's activation to c_i (ablate is clamp to 0)."""

    sae: SparseCoder
    hook: str
    latents: tuple[int, ...]
    coefs: tuple[float, ...]
    """The scale (add) or target value (clamp) of each latent, in the SAE's activation units."""

    positions: tuple[int, ...] | None = None
    """Absolute token positions to edit; None edits every token."""

    everywhere: bool = False
    """clamp only: also set the latent at tokens where it does not fire."""

    directions: Tensor = field(init=False, repr=False)
    """[L, d_in] decoder rows of `latents` in the model's units."""

    def __post_init__(self) -> None:
        rows = self.sae.W_dec.detach()[list(self.latents)] / self.sae.input_scale
        object.__setattr__(self, "directions", rows)

    def __call__(self, x: Tensor) -> Tensor:
        """The edited activations for x [batch, pos, d_in]; a new tensor, x is left as is."""
        if x.shape[-1] != self.sae.d_in:
            raise UserError(_width_error(self.sae, self.hook, x.shape[-1]))
        with torch.no_grad():
            coef = self._coefficients(x)  # [..., L]
            delta = coef @ self.directions.to(coef.dtype)
            edited = (x.to(delta.dtype) + delta).to(x.dtype)
            if self.positions is None:
                return edited
            keep = _position_mask(self.positions, x.shape[-2], x.device)
            return torch.where(keep[:, None], edited, x)

    def _coefficients(self, x: Tensor) -> Tensor:
        """How much of each direction to add, per token: [..., L]."""
        dtype = self.sae.W_dec.dtype
        coefs = torch.tensor(self.coefs, dtype=dtype, device=x.device)
        if self.kind == "add":
            return coefs.expand(*x.shape[:-1], len(self.latents))
        acts = latent_acts(self.sae, x, self.latents)
        target = coefs.expand_as(acts) if self.everywhere else torch.where(acts > 0, coefs, acts)
        return target - acts

    def hook_fn(self, acts: Tensor, hook: Any) -> Tensor:
        return self(acts)


def latent_acts(sae: SparseCoder, x: Tensor, latents: Sequence[int]) -> Tensor:
    """Inference-mode activations of `latents` for x [..., d_in], as a dense [..., L] tensor."""
    code = sae.encode(x)
    wanted = torch.as_tensor(list(latents), device=code.indices.device)
    hit = code.indices[:, :, None] == wanted  # [N, K, L]
    acts = (code.values[:, :, None] * hit).sum(1)
    return acts.reshape(*x.shape[:-1], len(latents))


def _position_mask(positions: tuple[int, ...], n: int, device: torch.device) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    inside = [p for p in positions if p < n]  # a prompt may be shorter than the positions
    mask[inside] = True
    return mask


def _width_error(sae: SparseCoder, hook: str, width: int) -> str:
    return (
        f"the SAE expects d_in={sae.d_in} but {hook} has width {width}; "
        "use an SAE trained on this model and hook"
    )


def _short(x: Any) -> str:
    """repr of a bad argument, kept to one short line for the error message."""
    text = " ".join(repr(x).split())
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(x: Any) -> str | None:
    """'i' for one integer, 'f' for one float (Python, numpy or a 0-d tensor), else None.

    Bools and complex numbers are neither: int()/float() would turn them into a silent
    wrong id or scale.
    """
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return "i" if isinstance(x, int) else "f"
    if isinstance(x, Tensor) and x.ndim == 0:
        if x.dtype == torch.bool or x.dtype.is_complex:
            return None
        return "f" if x.dtype.is_floating_point else "i"
    if isinstance(x, (np.ndarray, np.generic)) and x.ndim == 0:
        return {"i": "i", "u": "i", "f": "f"}.get(x.dtype.kind)
    return None


def _as_int(x: Any, what: str) -> int:
    """One id or count; a 0-d integer tensor (what argmax gives) counts as one."""
    if _kind(x) != "i":
        raise UserError(f"{what} {_short(x)} is not an integer; pass an int or an integer tensor")
    return int(x)


def _as_float(x: Any, what: str) -> float:
    """One finite number: NaN or inf would turn every steered activation (and probability) NaN."""
    if _kind(x) is None:
        raise UserError(f"{what} {_short(x)} is not a number; pass a finite float")
    value = float(x)
    if not math.isfinite(value):
        raise UserError(f"{what} {value} is not finite; pass a finite float")
    return value


def _items(values: Any, what: str) -> list[Any] | None:
    """The elements of a list, tuple or 1-d array/tensor; None for a single value."""
    if isinstance(values, (Tensor, np.ndarray)):
        if values.ndim == 0:
            return None
        if values.ndim > 1:
            raise UserError(
                f"{what}s must be one value or a flat list, not shape {tuple(values.shape)}"
            )
        return list(values)
    if isinstance(values, Iterable) and not isinstance(values, (str, bytes)):
        return list(values)
    return None


def _ids(values: Any, what: str) -> tuple[int, ...]:
    items = _items(values, what)
    return tuple(_as_int(v, what) for v in (items if items is not None else [values]))


def _coefs(values: Any, n: int, what: str) -> tuple[float, ...]:
    """One float per latent: a single scale/value repeated, or one per latent."""
    items = _items(values, what)
    if items is None:
        return (_as_float(values, what),) * n
    if len(items) != n:
        raise UserError(f"{len(items)} {what}s for {n} latents; give one, or one per latent")
    return tuple(_as_float(v, what) for v in items)


def _count(value: Any, what: str, lo: int, hi: int | None, fix: str) -> int:
    """An integer argument within [lo, hi] (no upper bound when hi is None)."""
    n = _as_int(value, what)
    if n < lo or (hi is not None and n > hi):
        span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise UserError(f"{what}={n} is not in {span}; {fix}")
    return n


def _make(
    kind: Literal["add", "clamp"],
    sae: SparseCoder,
    latents: LatentIds,
    coefs: Coefs,
    positions: Iterable[int] | None,
    hook: str | None,
    everywhere: bool = False,
) -> Intervention:
    ids = _ids(latents, "latent id")
    if not ids:
        raise UserError("no latent ids given; pass one id or a non-empty list of ids")
    bad = [i for i in ids if not 0 <= i < sae.d_sae]
    if bad:
        raise UserError(
            f"latent id {bad[0]} is out of range; this SAE has latents 0-{sae.d_sae - 1}"
        )
    if kind == "clamp":
        _check_thresholds(sae)
    pos = None if positions is None else _ids(positions, "position")
    if pos is not None and any(p < 0 for p in pos):
        raise UserError("positions must be >= 0 (0 is the first token, BOS when prepended)")
    values = _coefs(coefs, len(ids), "scale" if kind == "add" else "value")
    return Intervention(kind, sae, _sae_hook(sae, hook), ids, values, pos, everywhere)


def _check_thresholds(sae: SparseCoder) -> None:
    # Batch-level rules encode single tokens through thresholds; NaN ones fire nothing.
    theta = getattr(sae, "threshold", None)
    if theta is not None and bool(torch.isnan(theta).any()):
        raise UserError(
            f"this {sae.arch} SAE has no inference thresholds yet, so no latent fires; "
            "use a trained run"
        )


def _sae_hook(sae: SparseCoder, hook: str | None) -> str:
    trained = getattr(sae, "hook", None)
    if hook is not None and trained is not None and hook != trained:
        raise UserError(
            f"this SAE was trained on {trained}, not {hook}; use hook={trained!r} or another SAE"
        )
    if hook is None and trained is None:
        raise UserError("this SAE does not record its hook; pass hook='blocks.N.hook_...'")
    return hook or trained  # type: ignore[return-value]


def add(
    sae: SparseCoder,
    latents: LatentIds,
    scale: Coefs,
    positions: Iterable[int] | None = None,
    hook: str | None = None,
) -> Intervention:
    """x' = x + Σ scale_i·D_i: write each latent's decoder direction, as if it fired at `scale`."""
    return _make("add", sae, latents, scale, positions, hook)


def clamp(
    sae: SparseCoder,
    latents: LatentIds,
    value: Coefs,
    positions: Iterable[int] | None = None,
    everywhere: bool = False,
    hook: str | None = None,
) -> Intervention:
    """Set each latent to `value` where it fires (or at every token), keeping the SAE error."""
    return _make("clamp", sae, latents, value, positions, hook, everywhere)


def ablate(
    sae: SparseCoder,
    latents: LatentIds,
    positions: Iterable[int] | None = None,
    hook: str | None = None,
) -> Intervention:
    """x' = x − Σ a_i(x)·D_i: remove the latents, keep the rest of x̂ and the error term."""
    return _make("clamp", sae, latents, 0.0, positions, hook)


def _check(model: TransformerBridge, iv: Intervention) -> None:
    resolve_hook(model, iv.hook)
    device = next(model.parameters()).device
    if iv.sae.W_dec.device != device:
        raise UserError(
            f"the SAE is on {iv.sae.W_dec.device} and the model on {device}; "
            f"move the SAE with sae.to('{device}')"
        )
    width = int(model.cfg.d_model)
    if iv.hook.endswith(_RESIDUAL_WIDTH) and iv.sae.d_in != width:
        raise UserError(_width_error(iv.sae, iv.hook, width))


@contextmanager
def steer(model: TransformerBridge, *interventions: Intervention) -> Iterator[TransformerBridge]:
    """Apply the interventions inside the block (in the order given, when they share a hook)."""
    for iv in interventions:
        _check(model, iv)
    with model.hooks(fwd_hooks=[(iv.hook, iv.hook_fn) for iv in interventions]):
        yield model


# ---------------------------------------------------------------------------------------
# Reading the effect


def _device_rng(model: TransformerBridge) -> list[Any]:
    device = next(model.parameters()).device
    return [device] if device.type == "cuda" else []


def generate(
    model: TransformerBridge,
    prompt: str,
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 20,
    seed: int = 0,
    temperature: float = 1.0,
) -> str:
    """The continuation of `prompt` (new text only) under the interventions.

    Sampling is seeded with `seed` on a forked RNG, so the same call gives the same text and
    the caller's RNG state is left alone; temperature=0 decodes greedily.
    """
    out = decode(model, prompt, interventions, max_new_tokens, seed, temperature)
    n_prompt = model.to_tokens(prompt).shape[-1]
    return model.tokenizer.decode(out.sequences[0, n_prompt:], skip_special_tokens=False)


def decode(
    model: TransformerBridge,
    prompt: str,
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 20,
    seed: int = 0,
    temperature: float = 1.0,
) -> Any:
    """`generate`'s decoding loop: an output with `.sequences` (prompt and new tokens) and
    `.logits` (one [1, d_vocab] tensor per new token)."""
    max_new_tokens = _count(max_new_tokens, "max_new_tokens", 1, None, "ask for 1 or more")
    temperature = _as_float(temperature, "temperature")
    if temperature < 0:
        raise UserError(
            f"temperature={temperature} is negative; pass 0 (greedy) or a positive value (sampling)"
        )
    use_cache = all(iv.positions is None for iv in interventions) and kv_cache_ok(model, prompt)
    with torch.random.fork_rng(devices=_device_rng(model)), steer(model, *interventions):
        torch.manual_seed(seed)
        return model.generate(
            prompt,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            use_past_kv_cache=use_cache,
            return_type="tokens",
            output_logits=True,
            verbose=False,
        )


# Verdicts of `kv_cache_ok`, per model object.
_KV_VERDICT: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def kv_cache_ok(model: TransformerBridge, prompt: str) -> bool:
    """Whether one KV-cached decoding step gives the logits of a full forward.

    Some library releases break the bridge's KV cache and decode garbage without an error
    (transformers 5.24.0 with transformer-lens 4.3.0). Checked once per model, on the first
    prompt: greedy-decode two tokens with the cache, recompute the second token's logits
    with a full forward, and compare them relative to the logits' scale (1e-3 in fp32, 5e-2
    in half precision, where a working cache differs by about 1e-6 and a broken one by the
    whole scale). A broken cache logs one warning with the installed versions, and
    `generate` decodes without it. `SAELAB_KV_CHECK=0` skips the check (and trusts the cache).
    """
    if os.environ.get("SAELAB_KV_CHECK", "1") == "0":
        return True
    if model not in _KV_VERDICT:
        with torch.no_grad():
            out: Any = model.generate(  # output_logits: a ModelOutput (sequences, logits)
                prompt, 2, do_sample=False, output_logits=True, return_type="tokens", verbose=False
            )
            if len(out.logits) < 2:  # stopped at EOS: nothing was decoded from the cache
                return True
            full = model(out.sequences[:, :-1])[0, -1].float()
        cached = out.logits[1][0].float()
        rtol = 1e-3 if full.dtype == cached.dtype == torch.float32 else 5e-2
        gap = (cached - full).abs().max().item()
        scale = full.abs().max().item()
        _KV_VERDICT[model] = ok = gap <= rtol * scale
        if not ok:
            logger.warning(
                "the KV cache of this model gives wrong logits (max gap %.3g on a scale of %.3g) "
                "under %s; decoding without it (slower, correct). Install saelab's locked "
                "versions (make setup) to get the cache back.",
                gap,
                scale,
                _versions(),
            )
    return _KV_VERDICT[model]


def _versions() -> str:
    names = ("torch", "transformers", "transformer-lens")
    return ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)


@dataclass
class Comparison:
    """Generations of one prompt under named sets of interventions; prints as a table."""

    prompt: str
    texts: dict[str, str]

    def __str__(self) -> str:
        width = max(len(name) for name in self.texts)
        lines = [f"prompt: {self.prompt!r}"]
        lines += [f"{name:<{width}} | {_one_line(t)}" for name, t in self.texts.items()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td><b>{html.escape(n)}</b></td><td>{html.escape(_one_line(t))}</td></tr>"
            for n, t in self.texts.items()
        )
        return f"<p>prompt: <code>{html.escape(self.prompt)}</code></p><table>{rows}</table>"


def _one_line(text: str) -> str:
    return text.replace("\n", "⏎")


def compare_generations(
    model: TransformerBridge,
    prompt: str,
    interventions: dict[str, Sequence[Intervention]],
    max_new_tokens: int = 20,
    seed: int = 0,
    temperature: float = 1.0,
) -> Comparison:
    """Generate once per entry with the same seed; a "baseline" row comes first unless some
    entry already has no interventions."""
    runs = dict(interventions)
    if all(runs.values()):
        runs = {"baseline": [], **runs}
    texts = {
        name: generate(model, prompt, ivs, max_new_tokens, seed, temperature)
        for name, ivs in runs.items()
    }
    return Comparison(prompt, texts)


class TokenLatents(NamedTuple):
    """The strongest latents at one token."""

    position: int
    token: str
    latents: list[int]
    """Latent ids, strongest first."""

    values: list[float]
    """Their activations, in the SAE's units."""


@dataclass
class TopLatents:
    """`top_latents`' answer: one row per token."""

    rows: list[TokenLatents]

    def __iter__(self) -> Iterator[TokenLatents]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> TokenLatents:
        return self.rows[i]

    def __str__(self) -> str:
        lines = []
        for r in self.rows:
            pairs = "  ".join(f"{i}:{v:.2f}" for i, v in zip(r.latents, r.values))
            lines.append(f"{r.position:>4} {r.token!r:<16} {pairs}")
        return "\n".join(lines)


def hook_activations(model: TransformerBridge, prompt: str, hook: str) -> Tensor:
    """The activations [pos, d] at `hook` for `prompt` (BOS prepended), running no further."""
    resolve_hook(model, hook)
    seen: list[Tensor] = []

    def capture(acts: Tensor, hook: Any) -> None:
        seen.append(acts.detach())

    with torch.no_grad():
        model.run_with_hooks(
            prompt, fwd_hooks=[(hook, capture)], stop_at_layer=stop_layer(model, [hook])
        )
    return seen[0][0]


def top_latents(
    model: TransformerBridge, sae: SparseCoder, prompt: str, k: int = 5, hook: str | None = None
) -> TopLatents:
    """For each token of `prompt`: the k latents with the largest activations (firing only)."""
    k = _count(k, "k", 1, sae.d_sae, f"ask for 1 to {sae.d_sae} latents (this SAE's d_sae)")
    code = _codes(model, sae, prompt, hook)
    order = code.values.argsort(dim=1, descending=True)
    values, ids = code.values.gather(1, order), code.indices.gather(1, order)
    tokens = cast(list[str], model.to_str_tokens(prompt))  # one string in, one list out
    rows = []
    for pos, token in enumerate(tokens):
        firing = values[pos] > 0
        rows.append(
            TokenLatents(
                pos, token, ids[pos][firing][:k].tolist(), values[pos][firing][:k].tolist()
            )
        )
    return TopLatents(rows)


def next_token_probs(
    model: TransformerBridge,
    prompt: str,
    interventions: Sequence[Intervention] = (),
    k: int = 10,
    tokens: Sequence[str] = (),
) -> dict[str, float]:
    """The k most likely next tokens after `prompt` under the interventions, with their
    probabilities, plus any `tokens` asked for by name (each must be a single token)."""
    d_vocab = int(model.cfg.d_vocab)
    k = _count(k, "k", 1, d_vocab, f"ask for 1 to {d_vocab} tokens (the vocabulary size)")
    with torch.no_grad(), steer(model, *interventions):
        logits = model(prompt, return_type="logits")[0, -1]
    probs = logits.float().softmax(-1)
    top = probs.topk(k)
    out = {model.tokenizer.decode([int(i)]): float(p) for p, i in zip(top.values, top.indices)}
    for tok in tokens:
        ids = model.tokenizer.encode(tok, add_special_tokens=False)
        if len(ids) != 1:
            raise UserError(f"{tok!r} is {len(ids)} tokens, not one; pick a single token")
        out[tok] = float(probs[ids[0]])
    return out


def _codes(model: TransformerBridge, sae: SparseCoder, prompt: str, hook: str | None) -> Any:
    hook = _sae_hook(sae, hook)
    _check_thresholds(sae)
    acts = hook_activations(model, prompt, hook)
    if acts.shape[-1] != sae.d_in:
        raise UserError(_width_error(sae, hook, acts.shape[-1]))
    with torch.no_grad():
        return sae.encode(acts)


def latent_activations(
    model: TransformerBridge,
    sae: SparseCoder,
    prompt: str,
    latents: Sequence[int] | int,
    hook: str | None = None,
) -> tuple[list[str], Tensor]:
    """The tokens of `prompt` (BOS first) and the activations [pos, L] of `latents` at each
    (0 where a latent does not fire)."""
    ids = _ids(latents, "latent")
    for i in ids:
        if not 0 <= i < sae.d_sae:
            raise UserError(f"latent {i} is out of range; this SAE has 0..{sae.d_sae - 1}")
    code = _codes(model, sae, prompt, hook)
    wanted = torch.as_tensor(ids, device=code.indices.device)
    acts = (code.values[:, :, None] * (code.indices[:, :, None] == wanted)).sum(1)
    return cast(list[str], model.to_str_tokens(prompt)), acts.float().cpu()


class LatentHit(NamedTuple):
    """A latent's strongest activation on a text."""

    latent: int
    value: float
    position: int
    """The token it peaks on (1 = the first token after BOS)."""


def rank_latents(
    model: TransformerBridge, sae: SparseCoder, prompt: str, k: int = 20, hook: str | None = None
) -> list[LatentHit]:
    """The k latents with the largest activation on any token of `prompt` after BOS (the
    first token's residual stream is an outlier that many latents fire on), strongest first."""
    k = _count(k, "k", 1, sae.d_sae, f"ask for 1 to {sae.d_sae} latents (this SAE's d_sae)")
    code = _codes(model, sae, prompt, hook)
    values, indices = code.values[1:].float(), code.indices[1:]
    if not values.numel():
        return []
    best = torch.zeros(sae.d_sae, device=values.device)
    best.scatter_reduce_(0, indices.reshape(-1), values.reshape(-1), "amax")
    top = best.topk(min(k, int((best > 0).sum())))
    hits = []
    for v, i in zip(top.values.tolist(), top.indices.tolist()):
        at = ((indices == i) & (values == v)).nonzero()[0, 0]
        hits.append(LatentHit(int(i), float(v), int(at) + 1))
    return hits
