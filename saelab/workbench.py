"""Data loading for the Streamlit workbench (app/): the runs under a runs directory, their
metrics and files, read defensively (half-written or corrupt files become one-line
`UserError`s), and every path from the browser checked to stay inside the runs directory.
Also what the app says about a latent: the user's note, else its explanation (`saelab
explain`), else a label built from the feature index alone; and markdown escaping for every
user string the app shows.

Nothing here imports streamlit; the app only lays out what these functions return.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saelab import runs
from saelab.compare import eval_rows
from saelab.errors import UserError
from saelab.runs import (
    CFG,
    DARKMATTER,
    DARKMATTER_TOKENS,
    EVAL,
    EXPLANATIONS,
    INDEX,
    LOG,
    NOTES,
    SCALING,
    WEIGHTS,
    is_finished,
    read_json,
    read_token_table,
    write_json,
)

RUNS_DEPTH = 2
"""Runs are found at runs/<name> and one level deeper (a sweep: runs/<sweep>/<name>)."""

UNDER_USED = (1e-6, 1e-5, 1e-4)
"""Firing-frequency thresholds the dead-latents page counts latents below."""


# ---------------------------------------------------------------------------------------
# Paths from the browser


def runs_root(path: str | Path) -> Path:
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"runs directory {path} does not exist; train a run with saelab train")
    return root


def inside(root: Path, rel: str | Path) -> Path:
    """`root / rel` resolved (symlinks followed), refused unless it stays inside root.

    `rel` comes from the browser (a query parameter, a selectbox), so absolute paths,
    `..` and symlinks pointing out of the runs directory are all refused."""
    root = root.resolve()
    rel = str(rel)
    if not rel or "\x00" in rel or Path(rel).is_absolute():
        raise UserError(f"{rel!r} is not a path inside the runs directory {root}")
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise UserError(f"{rel!r} points outside the runs directory {root}; refused")
    return target


def resolve_run(root: Path, name: str) -> Path:
    """The run directory called `name` (relative to root), checked to be inside root."""
    run = root.resolve() if name == "." else inside(root, name)
    if not (run / CFG).is_file():
        raise UserError(f"{name!r} is not a run in {root} (no {CFG})")
    return run


# ---------------------------------------------------------------------------------------
# Files


@dataclass
class RunInfo:
    """One run directory and what it holds, as far as it could be read."""

    name: str
    """Path relative to the runs directory ('.' when the runs directory is itself a run)."""

    path: Path
    cfg: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    """Why something is missing or unreadable, one line each."""

    @property
    def complete(self) -> bool:
        return is_finished(self.path)

    @property
    def has_index(self) -> bool:
        return (self.path / INDEX).is_file()

    @property
    def has_darkmatter(self) -> bool:
        return (self.path / DARKMATTER).is_file()

    @property
    def arch(self) -> str:
        return str(self.cfg.get("arch", "?"))


def run_info(root: Path, name: str) -> RunInfo:
    """Never raises for a run that exists: what cannot be read goes to `problems`."""
    path = resolve_run(root, name)
    info = RunInfo(name, path)
    try:
        info.cfg = read_json(path / CFG)
    except UserError as e:
        info.problems.append(str(e))
        return info
    if not info.cfg.get("complete"):
        info.problems.append(f"training has not finished (rerun saelab train for {name})")
    elif not (path / WEIGHTS).is_file():
        info.problems.append(f"{WEIGHTS} is missing")
    if (path / EVAL).is_file():
        try:
            info.eval = read_json(path / EVAL, f"rerun saelab eval {path}")
        except UserError as e:
            info.problems.append(str(e))
    return info


def run_names(root: Path) -> list[str]:
    """Names (relative to root, '/'-separated) of the run directories under root, sorted;
    symlinked directories that lead out of root are skipped."""
    root = root.resolve()
    if (root / CFG).is_file():
        return ["."]
    names = []
    for depth in range(1, RUNS_DEPTH + 1):
        for cfg in root.glob("/".join(["*"] * depth) + f"/{CFG}"):
            rel = cfg.parent.relative_to(root).as_posix()
            try:
                inside(root, rel)
            except UserError:
                continue
            names.append(rel)
    return sorted(names)


def first_complete(root: Path, names: list[str]) -> str:
    """The first finished run of `names` (the first name when none is): the default view."""
    for name in names:
        try:
            if run_info(root, name).complete:
                return name
        except UserError:
            continue
    return names[0]


def list_runs(root: Path) -> list[RunInfo]:
    return [run_info(root, n) for n in run_names(root)]


def _pct(v: Any) -> float | None:
    return None if v is None else 100 * float(v)


def runs_table(runs: list[RunInfo]) -> list[dict[str, Any]]:
    """One row per run for the Runs page (None where eval.json has no number)."""
    rows = []
    for r in runs:
        ev = r.eval or {}
        if r.problems:
            status = r.problems[0]
        elif r.eval is None:
            status = f"not evaluated: saelab eval {r.path}"
        else:
            status = "ok"
        rows.append(
            {
                "run": r.name,
                "arch": r.cfg.get("arch"),
                "d_sae": r.cfg.get("d_sae"),
                "k": r.cfg.get("k"),
                "FVU": ev.get("fvu"),
                "L0": ev.get("l0"),
                "dead %": _pct(ev.get("dead_frac")),
                "CE score": ev.get("ce_score"),
                "index": r.has_index,
                "dark matter": r.has_darkmatter,
                "status": status,
            }
        )
    return rows


def metric_rows(runs: list[RunInfo]) -> list[dict[str, Any]]:
    """compare.collect's rows (one per evaluation mode) from eval.json alone: the app never
    evaluates. Runs without eval.json are left out."""
    return [
        row
        for r in runs
        if r.eval is not None
        for row in eval_rows(r.name, {"arch": r.arch, **r.eval})
    ]


# ---------------------------------------------------------------------------------------
# Dead latents


@dataclass
class FreqHist:
    """eval.json's log10 firing-frequency histogram."""

    edges: list[float]
    counts: list[int]
    never_fired: int
    d_sae: int
    n_tokens: int

    def below(self, freq: float) -> int:
        """Latents firing less often than `freq` (the never-firing ones included), counting
        whole bins whose upper edge is at or below log10(freq)."""
        lim = math.log10(freq)
        n = sum(c for c, hi in zip(self.counts, self.edges[1:]) if hi <= lim + 1e-9)
        return self.never_fired + n


def freq_hist(ev: dict[str, Any]) -> FreqHist | None:
    h = ev.get("log10_freq_hist")
    if not h:
        return None
    return FreqHist(
        list(h["edges"]),
        list(h["counts"]),
        int(h.get("never_fired", 0)),
        int(ev.get("d_sae") or 0),
        int(ev.get("n_tokens") or 0),
    )


def freq_hist_from_stats(freq: np.ndarray, n_tokens: int) -> FreqHist:
    """The same histogram from the feature index's per-latent frequencies."""
    edges = np.linspace(-8.0, 0.0, 33)
    alive = freq[freq > 0]
    counts, _ = np.histogram(np.clip(np.log10(alive), -8.0, 0.0), edges)
    return FreqHist(
        edges.tolist(), counts.tolist(), int((freq == 0).sum()), int(freq.size), n_tokens
    )


def dead_counts(h: FreqHist) -> dict[str, int]:
    """Dead (never fired) and "freq < f" counts on the histogram's own sample. Only the
    thresholds that sample can resolve are counted: on n tokens a latent that fires at all
    has frequency at least 1/n, so "freq < f" with f ≤ 1/n would only repeat the dead count."""
    out = {"dead": h.never_fired}
    for f in UNDER_USED:
        if f * h.n_tokens > 1:
            out[f"freq < {f:.0e}".replace("e-0", "e-")] = h.below(f)
    return out


def dead_series(run: Path) -> dict[str, list[float]]:
    """Dead fraction over training from train_log.jsonl; lines that do not parse (a log
    being written) are skipped."""
    out: dict[str, list[float]] = {"step": [], "tokens": [], "dead_frac": []}
    try:
        lines = (run / LOG).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return out
    for line in lines:
        try:
            row = json.loads(line)
            vals = [float(row["step"]), float(row["tokens"]), float(row["dead_frac"])]
        except (ValueError, KeyError, TypeError):
            continue
        for key, v in zip(out, vals):
            out[key].append(v)
    return out


# ---------------------------------------------------------------------------------------
# Dark matter


def darkmatter(run: Path) -> dict[str, Any]:
    return read_json(run / DARKMATTER, f"saelab darkmatter {run} writes it")


def darkmatter_tokens(run: Path) -> dict[str, np.ndarray] | None:
    """The per-token error table, or None when it is absent; UserError when unreadable."""
    path = run / DARKMATTER_TOKENS
    if not path.is_file():
        return None
    try:
        return read_token_table(path)
    except sqlite3.Error as e:
        raise UserError(
            f"{path} is not a readable table ({e}); rerun saelab darkmatter {run}"
        ) from None


def scaling_result(root: Path, run: Path) -> tuple[Path, dict[str, Any]] | None:
    """`saelab darkmatter --scaling`'s result next to `run` (in its parent folder), if any."""
    root, run = root.resolve(), run.resolve()
    if run == root:
        return None
    path = run.parent / SCALING / "scaling.json"
    if not path.is_file():
        return None
    path = inside(root, path.relative_to(root))  # a symlinked folder must not lead out
    return path, read_json(path, "rerun saelab darkmatter --scaling")


def ce_contexts(ce: dict[str, Any] | None) -> str:
    """Which contexts a CE measurement used (its 'n_contexts', 'n_tokens', 'contexts'), so
    that two ΔCEs on different context sets are never read as one number."""
    if not ce or not ce.get("n_contexts"):
        return "contexts not recorded"
    ids = ce.get("contexts") or []
    span = f", harvest contexts {min(ids)}–{max(ids)}" if ids else ""
    return f"{ce['n_contexts']} held-out contexts ({ce.get('n_tokens', 0):,} tokens{span})"


def ce_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The three-way CE (clean, each splice, zero-ablation) as table rows."""
    ce = result.get("ce") or {}
    if "variants" not in ce:
        return []
    rows = [{"splice": "clean", "CE (nats)": ce.get("ce_clean"), "ΔCE": 0.0}]
    for name, v in ce["variants"].items():
        rows.append({"splice": name, "CE (nats)": v.get("ce"), "ΔCE": v.get("delta_ce")})
    rows.append(
        {
            "splice": "zero ablation",
            "CE (nats)": ce.get("ce_ablation"),
            "ΔCE": _sub(ce.get("ce_ablation"), ce.get("ce_clean")),
        }
    )
    return rows


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# ---------------------------------------------------------------------------------------
# What a latent is about: notes, explanations, index labels


@dataclass
class Explanation:
    """One line of explanations.jsonl."""

    latent: int
    explanation: str
    score: float | None
    """Detection balanced accuracy in [0, 1]; chance is 0.5."""
    n_scored: int
    explainer: str


def read_explanations(run: Path) -> dict[int, Explanation]:
    """explanations.jsonl by latent (`saelab.runs.read_explanations`); {} when absent."""
    out = {}
    for i, d in runs.read_explanations(run).items():
        score = d.get("score")
        try:
            out[i] = Explanation(
                i, d["explanation"], None if score is None else float(score),
                int(d.get("n_scored") or 0), str(d.get("explainer") or ""),
            )  # fmt: skip
        except (TypeError, ValueError):
            raise UserError(
                f"{run / EXPLANATIONS} has a bad score for latent {i}; delete that line or "
                "rerun saelab explain"
            ) from None
    return out


_NOTES_LOCK = threading.Lock()


def read_notes(run: Path) -> dict[int, str]:
    """notes.json as {latent: text}; {} when absent."""
    path = run / NOTES
    if not path.is_file():
        return {}
    data = read_json(path, f"fix or delete {path}")
    try:
        return {int(k): str(v) for k, v in data.items()}
    except ValueError:
        raise UserError(f"{path} has a key that is not a latent id; fix or delete it") from None


def write_note(run: Path, latent: int, text: str) -> dict[int, str]:
    """Set (or, with blank text, remove) the note on `latent`, keeping every other note;
    written atomically. Returns the notes now on disk."""
    with _NOTES_LOCK:  # Streamlit sessions are threads of one process
        notes = read_notes(run)
        if text.strip():
            notes[int(latent)] = text.strip()
        else:
            notes.pop(int(latent), None)
        write_json(run / NOTES, {str(k): v for k, v in sorted(notes.items())})
    return notes


@dataclass
class Describer:
    """What to show beside a latent id: the user's note, else the explanation and its score,
    else `index_label` (from FeatureIndex: the tokens it fires on, the tokens it promotes)."""

    notes: dict[int, str]
    explanations: dict[int, Explanation]
    index_label: Any = None
    """A function latent → label, or None when the run has no index."""

    def source(self, i: int) -> str:
        if i in self.notes:
            return "note"
        if i in self.explanations:
            return "explanation"
        return "index" if self.index_label else "none"

    def __call__(self, i: int) -> str:
        i = int(i)
        if i in self.notes:
            return self.notes[i]
        if (e := self.explanations.get(i)) is not None:
            score = "" if e.score is None else f" (score {e.score:.2f})"
            return e.explanation + score
        return self.index_label(i) if self.index_label else ""


def describer(run: Path, index: Any = None) -> Describer:
    """Notes and explanations of `run`, and `index`'s LM-free labels (index may be None)."""
    label = None
    if index is not None:
        label = lambda i: index.latent(i).label()  # noqa: E731
    return Describer(read_notes(run), read_explanations(run), label)


_AUTOLINK = re.compile(r"(?<=://)|(?<=@)|(?i:(?<=www)(?=\.))")
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:=^&])")


def md_escape(text: str, one_line: bool = True) -> str:
    """`text` as literal markdown: every markdown, HTML and Streamlit directive character
    (`:red[…]`, `$…$`) backslash-escaped, so `__init__` stays `__init__` and `[a](b)` is no
    link; newlines become ↵ on one line."""
    text = str(text)
    if one_line:
        text = text.replace("\r", "").replace("\n", "↵")
    # The markdown renderer turns bare URLs and e-mail addresses in text into links whatever
    # the escapes; an invisible word joiner inside them keeps them plain text.
    text = _AUTOLINK.sub("\u2060", text)
    return _MARKDOWN.sub(r"\\\1", text)


def shorten(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------------------------------
# Steering from the browser


def parse_latents(text: str, d_sae: int) -> list[int]:
    """Latent ids typed as '12, 40 7' (commas or spaces), each once, in the order given."""
    out: list[int] = []
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        try:
            i = int(part)
        except ValueError:
            raise UserError(f"{part!r} is not a latent id; type ids such as 12, 40") from None
        if not 0 <= i < d_sae:
            raise UserError(f"latent {i} is out of range; this SAE has 0..{d_sae - 1}")
        if i not in out:
            out.append(i)
    return out


def prob_shifts(before: dict[str, float], after: dict[str, float], n: int = 10) -> list[dict]:
    """The n next tokens whose probability moved most (by |after − before|), biggest first;
    a token missing from one side counts as probability 0 there."""
    rows = [
        {"token": t, "before": before.get(t, 0.0), "after": after.get(t, 0.0)}
        for t in set(before) | set(after)
    ]
    for r in rows:
        r["change"] = r["after"] - r["before"]
    rows.sort(key=lambda r: (-abs(r["change"]), r["token"]))
    return rows[:n]


def lens_caveat(hook: str) -> str:
    """What to expect of a logit lens read at `hook`."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    where = f"layer {m.group(1)}" if m else hook
    return (
        f"Logit lens at {where}: the decoder direction read straight through the final norm "
        "and unembedding (values are logits per unit of activation). Before the last layers "
        "the residual stream is not yet in the output basis, so the lens often looks like "
        "subword noise there; the contexts are the better guide."
    )
