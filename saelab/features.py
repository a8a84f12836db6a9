"""The feature index: what each latent of a run responds to, in one SQLite file the app reads
(through saelab.feature_index.FeatureIndex).

`build_index` streams the indexed harvest rows through the SAE once, keeping per latent on
tensors: firing count, activation sum and max, a histogram whose range doubles as larger
activations arrive (bins merge in pairs, so counts stay exact), and the running top-2N tokens
(the N best whose windows neither overlap a better one's nor repeat its text are shown). Every
firing (row, latent, activation) also goes to a temporary file, sorted by row, so the per-token
activations over a context window are lookups rather than a second encoding, and after the pass
the token → latents table, each latent's most frequent tokens and its interval groups are
counted from it. Interval groups: `intervals` equal-width activation intervals from the
latent's smallest firing activation (at or above any threshold of its rule) to its largest,
each with its exact share of firings and a few examples drawn uniformly (seeded) from the
firings inside it, like the interval groups of Anthropic's feature dashboards (Bricken et al.
2023); examples whose window text repeats one already shown are skipped.
Logit lens: a decoder row in the model's units (input scale undone) through the final norm's
gain and W_U, as in Bricken et al. 2023 (the standard logit lens also for hooks before the last
layer). Neighbours: top decoder cosines, chunked over d_sae × d_sae.

Schema (all written to a temporary file, then moved into place):
  meta(key PRIMARY KEY, value JSON)
  latents(id PRIMARY KEY, n_fires, freq, mean_act, max_act, n_zero, hist_edges JSON,
          hist_counts JSON, logit_top JSON [[text, logit]], logit_bottom JSON, neighbours JSON,
          intervals JSON [[lo, hi, n_fires]], top_tokens JSON [[text, firings on it]])
  contexts(latent, kind 'top'|'interval', rank, grp (interval number, -1 for top), act, row,
           peak, tokens BLOB int32, acts BLOB float32; PRIMARY KEY (latent, kind, rank))
  vocab(id PRIMARY KEY, text, piece, n: occurrences in the indexed rows), indexed on text, piece
  token_latents(token, rank, latent, count, mean_act; PRIMARY KEY (token, rank)): per token
          the latents that best pick it out, by F1 = 2·count / (latent fires + token occurrences),
          so a latent firing on nearly every token does not top every search
"""

from __future__ import annotations

import json
import logging
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab import __version__
from saelab.config import IndexConfig
from saelab.errors import UserError
from saelab.feature_index import VERSION
from saelab.runs import INDEX, SYNTHETIC, OpenRun, atomic_write, open_run
from saelab.shards import locate

log = logging.getLogger(__name__)

TOP_TOKENS = 5
"""Most frequent tokens kept per latent (for its label when it has no explanation)."""
_CANDIDATES = 3
"""Examples drawn per shown example of an interval, so repeated texts can be skipped."""
_CHUNK = 4_000_000
"""Entries per step of the post-pass work (token counts, window lookups)."""


# ---------------------------------------------------------------------------------------
# The pass


class _TopM:
    """Per-latent running top-m of a score, with payloads; ties go to the earlier entry.
    Entries at or below a latent's current m-th score are dropped first, so after warm-up a
    batch costs little more than a comparison."""

    def __init__(self, d_sae: int, m: int, device: torch.device, *dtypes: torch.dtype) -> None:
        self.score = torch.full((d_sae, m), float("-inf"), device=device)
        self.pay = [torch.full((d_sae, m), -1, dtype=dt, device=device) for dt in dtypes]

    def update(self, lat: Tensor, score: Tensor, *payload: Tensor) -> None:
        keep = (score > self.score[lat, -1]).nonzero()[:, 0]
        if not keep.numel():
            return
        o = keep[torch.argsort(score[keep], descending=True, stable=True)]
        o = o[torch.argsort(lat[o], stable=True)]  # by latent, best first within a latent
        lat, score, pay = lat[o], score[o], [p[o] for p in payload]
        counts = torch.bincount(lat, minlength=self.score.shape[0])
        slot = torch.arange(lat.numel(), device=lat.device) - (counts.cumsum(0) - counts)[lat]
        ok = slot < self.score.shape[1]
        new = torch.full_like(self.score, float("-inf"))
        new[lat[ok], slot[ok]] = score[ok]
        # A stable sort, not topk: on ties the earlier row (already kept) wins, reproducibly.
        both, j = torch.cat([self.score, new], 1).sort(dim=1, descending=True, stable=True)
        self.score, j = both[:, : new.shape[1]], j[:, : new.shape[1]]
        for i, (old, p) in enumerate(zip(self.pay, pay)):
            fresh = torch.full_like(old, -1)
            fresh[lat[ok], slot[ok]] = p[ok]
            self.pay[i] = torch.cat([old, fresh], 1).gather(1, j)


class _Pass:
    """Everything the streaming pass accumulates per latent."""

    def __init__(self, d_sae: int, cfg: IndexConfig, device: torch.device, tmp: Path) -> None:
        self.d_sae, self.bins = d_sae, cfg.hist_bins
        z = lambda dt: torch.zeros(d_sae, dtype=dt, device=device)  # noqa: E731
        self.n_fires, self.sum_act = z(torch.int64), z(torch.float64)
        self.max_act, self.hi = z(torch.float32), z(torch.float32)
        self.min_act = torch.full((d_sae,), float("inf"), device=device)
        self.hist = torch.zeros(d_sae, cfg.hist_bins, dtype=torch.int64, device=device)
        # Twice the contexts shown: those whose windows overlap a better one are dropped.
        self.top = _TopM(d_sae, 2 * cfg.top_contexts, device, torch.int64)
        self.keys_file, self.acts_file = tmp / "keys.i64", tmp / "acts.f32"
        self._keys, self._acts = open(self.keys_file, "wb"), open(self.acts_file, "wb")

    def update(self, lo: int, values: Tensor, indices: Tensor) -> None:
        indices, o = indices.sort(dim=1)  # rows ascending, latents ascending within a row:
        values = values.gather(1, o)  # the keys below come out sorted
        fire = values > 0  # a zero value is padding
        rows = torch.arange(lo, lo + values.shape[0], device=values.device)
        row = rows[:, None].expand_as(indices)[fire]
        lat, act = indices[fire], values[fire].float()
        self.n_fires += torch.bincount(lat, minlength=self.d_sae)
        self.sum_act += torch.bincount(lat, weights=act.double(), minlength=self.d_sae)
        self.max_act.scatter_reduce_(0, lat, act, "amax")
        self.min_act.scatter_reduce_(0, lat, act, "amin")
        self._histogram(lat, act)
        self.top.update(lat, act, row)
        (row * self.d_sae + lat).cpu().numpy().tofile(self._keys)
        act.cpu().numpy().tofile(self._acts)

    def _histogram(self, lat: Tensor, act: Tensor) -> None:
        m = torch.zeros_like(self.hi).scatter_reduce_(0, lat, act, "amax")
        first = (self.hi == 0) & (m > 0)
        self.hi[first] = m[first] * (1 + 2**-10)
        grow = (m >= self.hi).nonzero()[:, 0]
        if grow.numel():  # double the range until the new max fits; bins merge pairwise
            d = torch.ceil(torch.log2(m[grow] / self.hi[grow])).long().clamp(1, 62)
            d += (m[grow] >= self.hi[grow] * torch.exp2(d.float())).long()
            j = torch.arange(self.bins, device=d.device)[None] >> d[:, None]
            merged = torch.zeros_like(self.hist[grow]).scatter_add_(1, j, self.hist[grow])
            self.hist[grow] = merged
            self.hi[grow] *= torch.exp2(d.float())
        b = (act / self.hi[lat] * self.bins).long().clamp_(0, self.bins - 1)
        self.hist.view(-1).index_add_(0, lat * self.bins + b, torch.ones_like(b))

    def close(self) -> tuple[np.ndarray, np.ndarray]:
        """The firing keys (row · d_sae + latent, ascending) and their activations."""
        self._keys.close()
        self._acts.close()
        keys = np.fromfile(self.keys_file, dtype=np.int64)
        return keys, np.fromfile(self.acts_file, dtype=np.float32)


@dataclass
class _Subject(OpenRun):
    rows: tuple[int, int] = (0, 0)


def _prepare(run: str | Path, cfg: IndexConfig) -> _Subject:
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run} is not a directory; pass a run directory (runs/<name>)")
    opened = open_run(run, cfg.device)
    store = opened.store
    lo, hi = (0, store.n_tokens)
    if cfg.rows == "heldout":
        lo, hi = opened.heldout
    hi = min(hi, store.n_tokens, lo + cfg.n_tokens) if cfg.n_tokens else min(hi, store.n_tokens)
    if hi <= lo:
        raise UserError(f"{run}: no rows to index in [{lo}, {hi}); check --rows and --n_tokens")
    return _Subject(**vars(opened), rows=(lo, hi))


@torch.no_grad()
def _stream(s: _Subject, cfg: IndexConfig, tmp: Path, progress: bool) -> _Pass:
    acc = _Pass(s.sae.d_sae, cfg, s.device, tmp)
    lo, hi = s.rows
    starts = range(lo, hi, cfg.batch_size)
    for a in tqdm(starts, desc="index", unit="batch", disable=not progress):
        x = s.store.read(a, min(a + cfg.batch_size, hi)).to(s.device)
        code = s.sae.encode(x)
        acc.update(a, code.values, code.indices)
    return acc


# ---------------------------------------------------------------------------------------
# After the pass


def _lookup(keys: np.ndarray, acts: np.ndarray, q: np.ndarray) -> np.ndarray:
    """acts at sorted `keys` equal to each query key, 0 where absent."""
    if not keys.size:
        return np.zeros(q.shape, np.float32)
    i = np.searchsorted(keys, q).clip(0, keys.size - 1)
    return np.where(keys[i] == q, acts[i], 0).astype(np.float32)


@torch.no_grad()
def _encode_rows(s: _Subject, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted firing keys and activations of a few scattered rows (window edges outside the
    indexed range)."""
    if not rows.size:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    x = torch.cat([s.store.read(int(r), int(r) + 1) for r in rows]).to(s.device)
    code = s.sae.encode(x)
    fire = (code.values > 0).cpu().numpy()
    row = np.broadcast_to(rows[:, None], fire.shape)[fire]
    keys = row * s.sae.d_sae + code.indices.cpu().numpy()[fire]
    o = np.argsort(keys)
    return keys[o], code.values.float().cpu().numpy()[fire][o]


def _window_tokens(
    s: _Subject, cfg: IndexConfig, row: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids [N, W] of each context's window, its validity mask and its positions."""
    n_ctx = s.store.n_ctx
    ctx, pos = locate(row, s.store.tokens_per_context)
    p = pos[:, None] + np.arange(-cfg.context_before, cfg.context_after + 1)
    valid = (p >= 0) & (p < n_ctx)
    return np.asarray(s.store.tokens()[ctx[:, None], p.clip(0, n_ctx - 1)]), valid, p


def _windows(
    s: _Subject, cfg: IndexConfig, fires: tuple[np.ndarray, np.ndarray], latent: np.ndarray,
    row: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Token ids [N, W], per-token activations [N, W] of each context's latent, and a validity
    mask (windows clipped at the context's edges; BOS has no activation, so 0)."""
    tpc = s.store.tokens_per_context
    ctx, _ = locate(row, tpc)
    toks, valid, p = _window_tokens(s, cfg, row)
    wrow = ctx[:, None] * tpc + p - 1
    has = valid & (p >= 1)
    inside = has & (wrow >= s.rows[0]) & (wrow < s.rows[1])
    key = wrow * s.sae.d_sae + latent[:, None]
    acts = np.zeros(p.shape, np.float32)
    acts[inside] = _lookup(*fires, key[inside])
    outside = has & ~inside
    extra = _encode_rows(s, np.unique(wrow[outside]))
    acts[outside] = _lookup(*extra, key[outside])
    return toks, acts, valid


def _token_table(
    fires: tuple[np.ndarray, np.ndarray],
    tok_of_row: np.ndarray,
    lo: int,
    n_fires: np.ndarray,
    keep: int,
) -> tuple[list[tuple], dict[int, list[tuple[int, int]]]]:
    """Rows (token, rank, latent, count, mean_act): per token the `keep` latents with the best
    F1 as detectors of it (ties: more firings on it, then lower id); and per latent its
    TOP_TOKENS most frequent tokens as (token, firings on it)."""
    d_sae = n_fires.size
    pair, cnt, tot = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    keys, acts = fires
    for a in range(0, keys.size, _CHUNK):
        k = keys[a : a + _CHUNK]
        p = tok_of_row[k // d_sae - lo].astype(np.int64) * d_sae + k % d_sae
        u, inv = np.unique(np.concatenate([pair, p]), return_inverse=True)
        ones = np.ones(p.size, np.int64)
        cnt = np.bincount(inv, np.concatenate([cnt, ones]), minlength=u.size).astype(np.int64)
        tot = np.bincount(inv, np.concatenate([tot, acts[a : a + _CHUNK]]), minlength=u.size)
        pair = u
    tok, lat, mean = pair // d_sae, pair % d_sae, tot / np.maximum(cnt, 1)
    o = np.lexsort((tok, -cnt, lat))
    first = np.searchsorted(lat[o], lat[o], side="left")
    o = o[np.arange(o.size) - first < TOP_TOKENS]
    most: dict[int, list[tuple[int, int]]] = {}
    for t, j, c in zip(tok[o].tolist(), lat[o].tolist(), cnt[o].tolist()):
        most.setdefault(j, []).append((t, c))
    n_tok = np.bincount(tok_of_row.astype(np.int64))
    f1 = 2 * cnt / (n_fires[lat] + n_tok[tok])
    o = np.lexsort((lat, -cnt, -f1, tok))
    tok, lat, cnt, mean = tok[o], lat[o], cnt[o], mean[o]
    first = np.searchsorted(tok, tok, side="left")
    rank = np.arange(tok.size) - first
    ok = rank < keep
    return list(zip(*(c[ok].tolist() for c in (tok, rank, lat, cnt, mean)))), most


@dataclass
class _Intervals:
    """Each latent's `n` equal-width activation intervals from lo to hi (its smallest and
    largest firing activations): firings per interval [d_sae, n], and candidate examples
    (latent, interval, row, act), in random order within an interval."""

    lo: np.ndarray
    hi: np.ndarray
    counts: np.ndarray
    latent: np.ndarray
    grp: np.ndarray
    row: np.ndarray
    act: np.ndarray

    def bounds(self, i: int) -> list[list[float]]:
        """[[lo, hi, firings]] of latent i's intervals; [] when it never fired."""
        n = self.counts.shape[1]
        if not self.counts[i].sum():
            return []
        e = np.linspace(float(self.lo[i]), float(self.hi[i]), n + 1).tolist()
        return [[e[j], e[j + 1], int(self.counts[i, j])] for j in range(n)]


def _intervals(acc: _Pass, fires: tuple[np.ndarray, np.ndarray], cfg: IndexConfig) -> _Intervals:
    keys, acts = fires
    n, d_sae = cfg.intervals, acc.d_sae
    lo = acc.min_act.cpu().numpy().astype(np.float64)
    hi = acc.max_act.cpu().numpy().astype(np.float64)
    lo[~np.isfinite(lo)] = 0.0
    width = (hi - lo) / n
    lat = keys % d_sae
    w = width[lat]
    g = np.floor((acts - lo[lat]) / np.where(w > 0, w, 1.0))
    g = np.where(w > 0, g, 0).astype(np.int64).clip(0, n - 1)  # the maximum goes in the last
    group = lat * n + g
    counts = np.bincount(group, minlength=d_sae * n).reshape(d_sae, n)
    prio = np.random.default_rng(cfg.seed).random(keys.size)
    o = np.lexsort((prio, group))
    first = np.searchsorted(group[o], group[o], side="left")
    o = o[np.arange(o.size) - first < _CANDIDATES * cfg.interval_samples]
    return _Intervals(lo, hi, counts, lat[o], g[o], keys[o] // d_sae, acts[o])


@torch.no_grad()
def _neighbours(W_dec: Tensor, n: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-n decoder cosines of each latent with the others: ids and cosines [d_sae, n]."""
    W = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
    n = min(n, W.shape[0] - 1)
    ids, cos = [], []
    for a in range(0, W.shape[0], chunk):
        sim = W[a : a + chunk] @ W.T
        sim[torch.arange(sim.shape[0]), torch.arange(a, a + sim.shape[0])] = float("-inf")
        c, i = sim.topk(n, dim=1)
        ids.append(i.cpu())
        cos.append(c.cpu())
    return torch.cat(ids).numpy(), torch.cat(cos).numpy()


@torch.no_grad()
def _logit_lens(s: _Subject, n: int, chunk: int = 256) -> tuple[Any, str | None]:
    """(top ids, top logits, bottom ids, bottom logits) per latent, or None and why not."""
    model_name = s.cfg.get("model", SYNTHETIC)
    if model_name in (None, SYNTHETIC):
        return None, "synthetic harvest: no model, so no logit lens"
    try:
        from saelab.models import load_model

        model = load_model(model_name)
    except Exception as e:  # noqa: BLE001 - any failure means the same: skip with a note
        return None, f"model {model_name} could not be loaded ({type(e).__name__}: {e})"
    W_U = model.W_U.float().to(s.device)
    if W_U.shape[0] != s.sae.d_in:
        return None, f"hook {s.cfg['hook']} is not in the residual stream (d_in ≠ d_model)"
    ln = getattr(getattr(model, "ln_final", None), "_original_component", None)
    gain = getattr(ln, "weight", None)
    centre = isinstance(ln, torch.nn.LayerNorm)  # LayerNorm removes the mean; RMSNorm does not
    if gain is not None:
        W_U = gain.float().to(s.device)[:, None] * W_U
    out: list[list[Tensor]] = [[], [], [], []]
    for a in range(0, s.sae.d_sae, chunk):
        d = s.sae.W_dec[a : a + chunk].float() / s.sae.input_scale
        if centre:
            d = d - d.mean(1, keepdim=True)
        logits = d @ W_U
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        for lst, t in zip(out, (top.indices, top.values, bottom.indices, bottom.values)):
            lst.append(t.cpu())
    return [torch.cat(t).numpy() for t in out], None


def _vocab(model: str | None, ids: np.ndarray) -> list[tuple[int, str, str]]:
    """(id, decoded text, tokenizer piece) for each id; '<id>' without a tokenizer."""
    if model not in (None, SYNTHETIC):
        from saelab.models import load_tokenizer

        try:
            tok = load_tokenizer(model)
        except UserError as e:
            log.warning("no tokenizer for %s (%s); tokens are shown as ids", model, e)
        else:
            pieces = tok.convert_ids_to_tokens(ids.tolist())
            texts = tok.batch_decode([[int(i)] for i in ids])
            return list(zip(ids.tolist(), texts, pieces))
    return [(int(i), f"<{i}>", f"<{i}>") for i in ids]


@torch.no_grad()
def whole_context(run: str | Path, row: int, latent: int) -> tuple[list[str], list[float], int]:
    """The whole harvest context holding harvest `row` (the app's "show the whole context"):
    its tokens (BOS first), `latent`'s activation on each (0 on BOS, which is not stored),
    and the index of `row`'s token."""
    s = open_run(run)
    if not 0 <= latent < s.sae.d_sae:
        raise UserError(f"latent {latent} is out of range; this SAE has 0..{s.sae.d_sae - 1}")
    tpc = s.store.tokens_per_context
    if not 0 <= row < s.store.n_tokens:
        raise UserError(f"harvest row {row} is out of range; this harvest has {s.store.n_tokens}")
    ctx, pos = locate(int(row), tpc)
    x = s.store.read(ctx * tpc, min((ctx + 1) * tpc, s.store.n_tokens)).to(s.device)
    code = s.sae.encode(x)
    acts = (code.values.float() * (code.indices == latent)).sum(1).cpu().tolist()
    ids = np.asarray(s.store.tokens()[ctx])[: len(acts) + 1].astype(np.int64)
    words = {i: text for i, text, _ in _vocab(s.cfg.get("model"), np.unique(ids))}
    return [words[int(t)] for t in ids], [0.0, *acts], pos


# ---------------------------------------------------------------------------------------
# Writing the file

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
CREATE TABLE latents (id INTEGER PRIMARY KEY, n_fires INTEGER, freq REAL, mean_act REAL,
    max_act REAL, n_zero INTEGER, hist_edges TEXT, hist_counts TEXT, logit_top TEXT,
    logit_bottom TEXT, neighbours TEXT, intervals TEXT, top_tokens TEXT);
CREATE INDEX latents_stats ON latents (id, freq, mean_act, max_act, n_fires);
CREATE TABLE contexts (latent INTEGER, kind TEXT, rank INTEGER, grp INTEGER, act REAL, row INTEGER,
    peak INTEGER, tokens BLOB, acts BLOB, PRIMARY KEY (latent, kind, rank)) WITHOUT ROWID;
CREATE TABLE vocab (id INTEGER PRIMARY KEY, text TEXT, piece TEXT, n INTEGER);
CREATE INDEX vocab_text ON vocab (text);
CREATE INDEX vocab_piece ON vocab (piece);
CREATE TABLE token_latents (token INTEGER, rank INTEGER, latent INTEGER, count INTEGER,
    mean_act REAL, PRIMARY KEY (token, rank)) WITHOUT ROWID;
"""


def _latent_rows(
    acc: _Pass, n_tokens: int, lens: Any, words: dict[int, str], nb: Any, iv: _Intervals,
    most: dict[int, list[tuple[int, int]]],
):  # fmt: skip
    n_fires = acc.n_fires.cpu().numpy()
    mean = (acc.sum_act.cpu().numpy() / np.maximum(n_fires, 1)).tolist()
    max_act, hi = acc.max_act.cpu().numpy().tolist(), acc.hi.cpu().numpy().tolist()
    hist = acc.hist.cpu().numpy()
    for i in range(acc.d_sae):
        nz = np.nonzero(hist[i])[0]
        used = int(nz[-1]) + 1 if nz.size else 0
        edges = [hi[i] * j / acc.bins for j in range(used + 1)] if used else []
        top = bottom = []
        if lens is not None:
            top = [[words[int(t)], float(v)] for t, v in zip(lens[0][i], lens[1][i])]
            bottom = [[words[int(t)], float(v)] for t, v in zip(lens[2][i], lens[3][i])]
        near = [[int(j), float(c)] for j, c in zip(nb[0][i], nb[1][i])]
        tokens = [[words[t], c] for t, c in most.get(i, [])]
        n = int(n_fires[i])
        yield (
            i, n, n / n_tokens, mean[i], max_act[i], n_tokens - n, json.dumps(edges),
            json.dumps(hist[i, :used].tolist()), json.dumps(top), json.dumps(bottom),
            json.dumps(near), json.dumps(iv.bounds(i)), json.dumps(tokens),
        )  # fmt: skip


def _context_rows(ctx: dict[str, np.ndarray], toks: np.ndarray, acts: np.ndarray, valid, before):
    first = valid.argmax(1)
    for n in np.nonzero(ctx["keep"])[0]:
        v = valid[n]
        yield (
            int(ctx["latent"][n]), str(ctx["kind"][n]), int(ctx["rank"][n]), int(ctx["grp"][n]),
            float(ctx["act"][n]), int(ctx["row"][n]), before - int(first[n]),
            toks[n][v].astype("<i4").tobytes(), acts[n][v].astype("<f4").tobytes(),
        )  # fmt: skip


def _distinct_top(
    score: np.ndarray, rows: np.ndarray, tpc: int, reach: int
) -> tuple[np.ndarray, np.ndarray]:
    """(latent, slot) of each latent's candidates, best first, skipping any whose window would
    overlap a better kept one's (same context, peaks at most `reach` tokens apart): two
    neighbouring tokens of one sentence show as one context, not two."""
    lat_out, slot_out = [], []
    for i in np.nonzero(score[:, 0] > float("-inf"))[0]:
        kept: list[int] = []
        for j in np.nonzero(score[i] > float("-inf"))[0]:
            r = rows[i, j]
            if all(r // tpc != rows[i, k] // tpc or abs(r - rows[i, k]) > reach for k in kept):
                kept.append(int(j))
        lat_out += [i] * len(kept)
        slot_out += kept
    return np.array(lat_out, np.int64), np.array(slot_out, np.int64)


def _candidates(acc: _Pass, cfg: IndexConfig, tpc: int, iv: _Intervals) -> dict[str, np.ndarray]:
    """Every context that may be shown: the top candidates of each latent (grp -1, best
    first), then its interval candidates (highest interval first, random order within)."""
    score, rows = acc.top.score.cpu().numpy(), acc.top.pay[0].cpu().numpy()
    lat, slot = _distinct_top(score, rows, tpc, cfg.context_before + cfg.context_after)
    o = np.lexsort((np.arange(iv.latent.size), -iv.grp, iv.latent))
    return {
        "latent": np.concatenate([lat, iv.latent[o]]).astype(np.int64),
        "grp": np.concatenate([np.full(lat.size, -1), iv.grp[o]]).astype(np.int64),
        "act": np.concatenate([score[lat, slot], iv.act[o]]).astype(np.float32),
        "row": np.concatenate([rows[lat, slot], iv.row[o]]).astype(np.int64),
    }


def _choose(ctx: dict[str, np.ndarray], toks: np.ndarray, valid: np.ndarray, cfg: IndexConfig):
    """Adds keep, kind and rank to the candidates: per latent the first top_contexts top
    candidates and interval_samples per interval whose window text is not one already kept
    for that latent (a docstring repeated across the corpus shows once); interval examples
    are ranked by interval, highest first, then by activation."""
    n = ctx["latent"].size
    keep, rank = np.zeros(n, bool), np.zeros(n, np.int64)
    seen: dict[int, set[bytes]] = {}
    quota: dict[tuple[int, int], int] = {}
    for m in range(n):
        i, g = int(ctx["latent"][m]), int(ctx["grp"][m])
        limit = cfg.top_contexts if g < 0 else cfg.interval_samples
        text = toks[m][valid[m]].tobytes()
        texts = seen.setdefault(i, set())
        if quota.get((i, g), 0) >= limit or text in texts:
            continue
        texts.add(text)
        quota[(i, g)] = quota.get((i, g), 0) + 1
        keep[m] = True
    kind = np.where(ctx["grp"] < 0, "top", "interval")
    for k in ("top", "interval"):
        idx = np.nonzero(keep & (kind == k))[0]
        o = idx[np.lexsort((-ctx["act"][idx], -ctx["grp"][idx], ctx["latent"][idx]))]
        lat = ctx["latent"][o]
        rank[o] = np.arange(o.size) - np.searchsorted(lat, lat, side="left")
    return {**ctx, "keep": keep, "kind": kind, "rank": rank}


def _write(path: Path, meta: dict[str, Any], tables: dict[str, Any]) -> None:
    """Build the file at `path` in one transaction; meta last, so it marks completion."""
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.executescript(_SCHEMA)
        for name, rows in tables.items():
            width = len(con.execute(f"SELECT * FROM {name} LIMIT 0").description)
            con.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' * width)})", rows)
        items = [(k, json.dumps(v)) for k, v in {**meta, "complete": True}.items()]
        con.executemany("INSERT INTO meta VALUES (?, ?)", items)
        con.commit()
    finally:
        con.close()


def build_index(run: str | Path, cfg: IndexConfig | None = None, progress: bool = True) -> Path:
    """Build runs/<name>/features.sqlite (see the module docstring); returns its path.

    Written to a temporary file and moved into place, so a failed or interrupted build
    leaves any existing index untouched; the same run and config give the same file.
    """
    cfg = cfg or IndexConfig()
    s = _prepare(run, cfg)
    t0, (lo, hi) = time.perf_counter(), s.rows
    path = s.path / INDEX
    with tempfile.TemporaryDirectory(dir=s.path, prefix=".index-") as tmp:
        acc = _stream(s, cfg, Path(tmp), progress)
        fires = acc.close()
        t1 = time.perf_counter()
        r = np.arange(lo, hi)
        tpc = s.store.tokens_per_context
        tok_of_row = np.asarray(s.store.tokens()[locate(r, tpc)])
        n_fires = acc.n_fires.cpu().numpy()
        token_rows, most = _token_table(fires, tok_of_row, lo, n_fires, cfg.token_latents)
        iv = _intervals(acc, fires, cfg)
        ctx = _candidates(acc, cfg, tpc, iv)
        ctx = _choose(ctx, *_window_tokens(s, cfg, ctx["row"])[:2], cfg)
        ctx = {k: v[ctx["keep"]] for k, v in ctx.items()}  # activations only for those shown
        toks, acts, valid = _windows(s, cfg, fires, ctx["latent"], ctx["row"])
        del fires
    nb = _neighbours(s.sae.W_dec.detach().float(), cfg.neighbours)
    lens, note = _logit_lens(s, cfg.logit_tokens) if cfg.logit_lens else (None, "not asked for")
    if note:
        log.info("logit lens skipped: %s", note)
    shown = toks[valid]
    ids = [tok_of_row, shown] + ([lens[0].ravel(), lens[2].ravel()] if lens else [])
    vocab = _vocab(s.cfg.get("model"), np.unique(np.concatenate(ids)).astype(np.int64))
    n_tok = np.bincount(tok_of_row.astype(np.int64))
    vocab = [(i, text, piece, int(n_tok[i]) if i < n_tok.size else 0) for i, text, piece in vocab]
    words = {i: text for i, text, _, _ in vocab}
    meta = {
        "run": str(s.path), "harvest": s.cfg["harvest"], "model": s.cfg.get("model"),
        "hook": s.cfg["hook"], "d_sae": s.sae.d_sae, "k": s.sae.k, "arch": s.sae.arch,
        "n_tokens": hi - lo, "rows": [lo, hi], "row_choice": cfg.rows,
        "top_contexts": cfg.top_contexts,
        "intervals": cfg.intervals, "interval_samples": cfg.interval_samples,
        "context": [cfg.context_before, cfg.context_after], "logit_lens": lens is not None,
        "logit_lens_note": note, "built_at": datetime.now(timezone.utc).isoformat(),
        "version": VERSION, "saelab_version": __version__, "config": asdict(cfg),
    }  # fmt: skip
    tables = {
        "latents": _latent_rows(acc, hi - lo, lens, words, nb, iv, most),
        "contexts": _context_rows(ctx, toks, acts, valid, cfg.context_before),
        "vocab": vocab,
        "token_latents": token_rows,
    }
    atomic_write(path, lambda tmp_db: _write(tmp_db, meta, tables))
    log.info(
        "indexed %s latents over %s tokens in %.1f s (pass %.1f s): %s",
        f"{s.sae.d_sae:,}", f"{hi - lo:,}", time.perf_counter() - t0, t1 - t0, path,
    )  # fmt: skip
    return path
