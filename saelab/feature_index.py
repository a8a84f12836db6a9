"""Reading a feature index (features.sqlite, written by saelab.features.build_index).

`FeatureIndex` answers the app's queries (a latent's card, its contexts, token search) from
indexed tables, each in well under a millisecond at 16k latents (bench/index.py). The schema
is documented where it is written, in saelab/features.py.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from saelab.errors import UserError
from saelab.runs import INDEX, SYNTHETIC

VERSION = 5
"""Bumped whenever the schema or the meaning of a column changes; older files are refused."""


@dataclass
class LatentCard:
    """One latent's statistics, histogram, logit lens and decoder neighbours."""

    id: int
    freq: float
    n_fires: int
    mean_act: float
    max_act: float
    hist_edges: list[float]
    hist_counts: list[int]
    n_zero: int
    logit_top: list[tuple[str, float]]
    logit_bottom: list[tuple[str, float]]
    neighbours: list[tuple[int, float]]
    """(latent id, decoder cosine), most similar first."""
    intervals: list[tuple[float, float, int]]
    """(lo, hi, firings) of equal-width activation intervals from the smallest firing
    activation to the largest; the firings add up to n_fires."""
    top_tokens: list[tuple[str, int]]
    """The tokens it fires on most often, with how often."""

    def label(self, n: int = 3) -> str:
        """A short description from the index alone (no LM): the tokens it fires on most
        and the tokens its decoder direction promotes most (logit lens)."""
        if not self.n_fires:
            return "never fired"
        parts = ["fires on " + " ".join(_quoted(t) for t, _ in self.top_tokens[:n])]
        if self.logit_top:
            parts.append("promotes " + " ".join(_quoted(t) for t, _ in self.logit_top[:n]))
        return " · ".join(parts)


@dataclass
class Context:
    """A token window around one activation of a latent."""

    latent: int
    kind: str
    """'top' (rank 0 = highest activation) or 'interval' (examples drawn uniformly within each
    activation interval; highest interval first, then highest activation)."""
    rank: int
    group: int
    """The activation interval (an index into LatentCard.intervals); -1 for top contexts."""
    act: float
    row: int
    """Global harvest row of the peak token."""
    tokens: list[str]
    acts: list[float]
    """The latent's activation on each token of the window (0 on BOS)."""
    peak: int
    """Index of the peak token within tokens."""


@dataclass
class TokenHit:
    latent: int
    count: int
    """Firings on the searched tokens."""

    mean_act: float
    f1: float = 0.0
    """2·count / (latent's firings + the tokens' occurrences): 1 for a perfect detector."""


_CARD = [f.name for f in fields(LatentCard)]
_KINDS = ("top", "interval")
_JSON = ("hist_edges", "hist_counts", "logit_top", "logit_bottom", "neighbours", "intervals",
         "top_tokens")  # fmt: skip


def _quoted(token: str) -> str:
    """A token as a short quoted string with its whitespace visible (' the', '↵')."""
    return "'" + token.replace("\n", "↵").replace("\t", "⇥") + "'"


class FeatureIndex:
    """Read-only access to a features.sqlite; one connection, safe to share across threads
    (Streamlit reruns on other threads)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        hint = f"run `saelab index {self.path.parent}`"
        if not self.path.is_file():
            raise UserError(f"{self.path} does not exist; {hint}")
        self._lock = threading.Lock()
        self._words: dict[int, str] | None = None
        self._stats: dict[str, np.ndarray] | None = None
        uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            self._con = sqlite3.connect(uri, uri=True, check_same_thread=False)
            rows = self._con.execute("SELECT key, value FROM meta").fetchall()
            self.meta: dict[str, Any] = {k: json.loads(v) for k, v in rows}
        except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
            raise UserError(f"{self.path} is damaged ({e}); {hint} to rebuild it") from None
        if not self.meta.get("complete"):
            raise UserError(f"{self.path} is incomplete; {hint} to rebuild it")
        if self.meta.get("version") != VERSION:
            raise UserError(f"{self.path} was built by another saelab version; {hint}")
        self.d_sae = int(self.meta["d_sae"])

    @classmethod
    def of_run(cls, run: str | Path) -> FeatureIndex:
        return cls(Path(run) / INDEX)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._con.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as e:
                raise UserError(
                    f"{self.path} is damaged ({e}); run `saelab index {self.path.parent}`"
                ) from None

    def _check(self, i: int) -> int:
        if not 0 <= int(i) < self.d_sae:
            raise UserError(f"latent {i} is out of range; this SAE has 0..{self.d_sae - 1}")
        return int(i)

    def stats(self) -> dict[str, np.ndarray]:
        """freq, mean_act, max_act, n_fires of every latent (index = latent id); read once
        (a covering index makes that one scan), then copies of the cached arrays."""
        if self._stats is None:
            sql = "SELECT freq, mean_act, max_act, n_fires FROM latents ORDER BY id"
            cols = list(zip(*self._query(sql))) or [(), (), (), ()]
            names = ("freq", "mean_act", "max_act")
            self._stats = {k: np.array(c, np.float64) for k, c in zip(names, cols)}
            self._stats["n_fires"] = np.array(cols[3], np.int64)
        return {k: v.copy() for k, v in self._stats.items()}

    def latent(self, i: int) -> LatentCard:
        (row,) = self._query(
            f"SELECT {', '.join(_CARD)} FROM latents WHERE id = ?", (self._check(i),)
        )
        v = dict(zip(_CARD, row))
        for key in _JSON:
            v[key] = [tuple(x) if isinstance(x, list) else x for x in json.loads(v[key])]
        return LatentCard(**v)

    def labels(self, ids: list[int]) -> dict[int, str]:
        """LatentCard.label of each id (one indexed lookup each)."""
        return {int(i): self.latent(i).label() for i in dict.fromkeys(ids)}

    def _vocab(self) -> dict[int, str]:
        if self._words is None:
            self._words = dict(self._query("SELECT id, text FROM vocab"))
        return self._words

    def contexts(self, i: int, kind: str = "top") -> list[Context]:
        if kind not in _KINDS:
            raise UserError(f"context kind {kind!r} is not one of {', '.join(_KINDS)}")
        rows = self._query(
            "SELECT rank, grp, act, row, peak, tokens, acts FROM contexts "
            "WHERE latent = ? AND kind = ? ORDER BY rank",
            (self._check(i), kind),
        )
        words = self._vocab()
        return [
            Context(
                i,
                kind,
                rank,
                grp,
                act,
                row,
                [words.get(int(t), f"<{t}>") for t in np.frombuffer(toks, "<i4")],
                np.frombuffer(acts, "<f4").astype(float).tolist(),
                peak,
            )  # fmt: skip
            for rank, grp, act, row, peak, toks, acts in rows
        ]

    def _hits(self, ids: list[int], limit: int) -> list[TokenHit]:
        """Hits summed over token ids: counts add, mean activations weight by count."""
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        rows = self._query(
            f"SELECT latent, count, mean_act FROM token_latents WHERE token IN ({marks})",
            tuple(ids),
        )
        count: dict[int, int] = {}
        total: dict[int, float] = {}
        for lat, c, m in rows:
            count[lat] = count.get(lat, 0) + c
            total[lat] = total.get(lat, 0.0) + c * m
        (n_tok,) = self._query(
            f"SELECT COALESCE(SUM(n), 0) FROM vocab WHERE id IN ({marks})", tuple(ids)
        )[0]
        n_fires = self.stats()["n_fires"]
        f1 = {j: 2 * count[j] / max(int(n_fires[j]) + n_tok, 1) for j in count}
        best = sorted(count, key=lambda j: (-f1[j], -count[j], j))[:limit]
        return [TokenHit(j, count[j], total[j] / count[j], f1[j]) for j in best]

    def search_token(self, token: str, limit: int = 20) -> list[TokenHit]:
        """Latents firing most often on a token, matched exactly as decoded text or as the
        tokenizer's piece, also with a leading space ('the' finds 'the' and ' the'/'Ġthe')."""
        forms = (token, " " + token, token, "Ġ" + token)
        rows = self._query(
            "SELECT id FROM vocab WHERE text IN (?, ?) OR piece IN (?, ?)",
            forms,
        )
        return self._hits(sorted({r[0] for r in rows}), limit)

    def search_text(self, text: str, limit: int = 20) -> list[TokenHit]:
        """Hits aggregated over the tokens of `text` as the run's tokenizer splits it (each
        distinct token once). Counts are lower bounds: each token keeps only its top latents."""
        model = self.meta.get("model")
        if model in (None, SYNTHETIC):
            words = self._vocab()
            by_text = {w: i for i, w in words.items()}
            ids = [by_text[w] for w in text.split() if w in by_text]
        else:
            from saelab.models import load_tokenizer

            ids = load_tokenizer(model).encode(text, add_special_tokens=False)
        return self._hits(sorted(set(ids)), limit)

    def close(self) -> None:
        with self._lock:
            self._con.close()
