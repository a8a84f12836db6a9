"""Explanations of latents and their detection scores: `saelab explain RUN`.

Explanation: the explainer LM (saelab.explainers: a local HF model, the embedded SmolLM2 by
default, or an OpenAI-compatible endpoint) reads the latent's top-activating contexts from the
feature index, the even ranks 0, 2, 4, …, with the tokens at or above half the context's peak
marked <<like this>>, and names what they share in a short phrase (greedy, so reproducible).
Two worked examples precede the question: small models follow a shown format far better than
a described one.

Detection score, after Bills et al. 2023 ("Language models can explain neurons in language
models") and EleutherAI's delphi (Paulo et al., arXiv 2410.13928): held-out positives, the
odd-ranked top contexts and the interval examples (never shown to the explainer), and as many
negatives, random windows of the same shape from the indexed rows on none of whose tokens the
SAE fires the latent, are given to the explainer with the explanation, which returns a margin
per text (saelab.explainers: its log-likelihood gain from reading the explanation first, or
its Yes/No log-odds to "does this text contain <explanation>?"). Texts above the median margin
are called positive. The set is balanced by construction, so the median is the threshold of an
explainer without a bias towards either answer; a 135M model answers "Yes" (or "No") to nearly
anything, and a fixed threshold would measure that bias instead of the explanation. (Margins
read from an endpoint's answer text, ±1, use threshold 0.) The score is the balanced accuracy
(TPR + TNR) / 2 against chance 0.5, with a standard error (Agresti–Caffo: one hit and one miss
added to each arm, so 10 of 10 does not claim zero error); the rank AUC is kept too.

Default latents: a seeded random sample of live latents. Its mean score estimates the whole
SAE's; the most frequent latents would be the densest and least interpretable ones, and scoring
every latent with a 135M explainer on a CPU takes seconds each.

Without an LM (`--explainer none`) the explanation is a label from the index alone: the tokens
the latent peaks on most often and its top logit-lens tokens; no score.

The file is runs.EXPLANATIONS (see there): one line appended per latent as it finishes, so a
killed run loses at most the latent in progress and a rerun skips the latents this explainer
already did; a torn last line is dropped before appending.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from saelab.config import ExplainConfig
from saelab.errors import UserError
from saelab.feature_index import Context, FeatureIndex, LatentCard
from saelab.runs import (
    EXPLANATIONS,
    SYNTHETIC,
    append_lines,
    cut_torn_line,
    finished_cfg,
    read_explanations,
    writer_lock,
)

if TYPE_CHECKING:
    from saelab.explainers import Chat, Explainer
    from saelab.runs import OpenRun

log = logging.getLogger(__name__)

CHANCE = 0.5
_EXAMPLES = [
    (
        [" the rain fell on the dry <<ground>> all", " he planted the seed in the <<ground>> and",
         " they sat down on the <<ground>> to rest"],
        'the word "ground"',
    ),
    (
        ["    print(total<<)>>", " if len(items<<)>> > 0:", " return max(a, b<<)>>"],
        "closing parentheses in code",
    ),
]  # fmt: skip
"""Worked examples put before the question, of two kinds (one word, a category), so that a
small explainer copies the format but not one kind of answer."""
_SYSTEM = "You explain what a feature of a language model responds to, in a few words."


# ---------------------------------------------------------------------------------------
# Reading the file, and which latents to do


def parse_latents(spec: str, d_sae: int) -> list[int]:
    """'0:50' (a range, end excluded), '12,40,7', or both mixed; in the order given, once each."""
    if not re.fullmatch(r"\s*\d+(\s*:\s*\d+)?(\s*,\s*\d+(\s*:\s*\d+)?)*\s*", spec):
        raise UserError(f"--latents {spec!r} is not a list like 0:50 or 12,40,7 (or both mixed)")
    ids: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition(":")
        ids += list(range(int(a), int(b))) if b else [int(a)]
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad or not ids:
        what = f"latent {bad[0]} is out of range" if bad else f"--latents {spec!r} selects none"
        raise UserError(f"{what}; this SAE has latents 0..{d_sae - 1}")
    return list(dict.fromkeys(ids))


def choose_latents(cfg: ExplainConfig, ix: FeatureIndex) -> list[int]:
    if cfg.latents:
        return parse_latents(cfg.latents, ix.d_sae)
    live = np.nonzero(ix.stats()["n_fires"] > 0)[0]
    pick = np.random.default_rng(cfg.seed).permutation(live)[: cfg.n_latents]
    return sorted(int(i) for i in pick)


# ---------------------------------------------------------------------------------------
# Prompts


def label(card: LatentCard, top: list[Context]) -> str:
    """The explanation an index alone gives: peak tokens by count, then logit-lens tokens."""
    if not top:
        return "never fires in the indexed tokens"
    peaks = Counter(c.tokens[c.peak].strip() or c.tokens[c.peak] for c in top)
    fires = ", ".join(repr(t) for t, _ in peaks.most_common(3))
    lens = ", ".join(repr(t.strip() or t) for t, _ in card.logit_top[:3])
    return f"fires on {fires}" + (f"; promotes {lens}" if lens else "")


def marked(ctx: Context) -> str:
    """The context's text with the tokens at or above half its peak wrapped in << >> (runs of
    them together), leading spaces kept outside the marks."""
    hot = [a >= 0.5 * ctx.act and a > 0 for a in ctx.acts]
    out, i = [], 0
    while i < len(ctx.tokens):
        if not hot[i]:
            out.append(ctx.tokens[i])
            i += 1
            continue
        j = i
        while j < len(ctx.tokens) and hot[j]:
            j += 1
        span = "".join(ctx.tokens[i:j])
        lead = span[: len(span) - len(span.lstrip())]
        out.append(f"{lead}<<{span.lstrip()}>>")
        i = j
    return "".join(out).replace("\n", " ")


def _excerpts(texts: list[str]) -> str:
    return "\n".join(f"{n}. {t.strip()}" for n, t in enumerate(texts, 1))


def _ask(texts: list[str]) -> str:
    return (
        "Text excerpts where a feature fires; the tokens where it fires most are marked "
        f"<<like this>>.\n\n{_excerpts(texts)}\n\nWhat do the marked tokens have in common? "
        "Answer with a short phrase only."
    )


def explain_chat(shown: list[Context]) -> Chat:
    chat = [{"role": "system", "content": _SYSTEM}]
    for texts, answer in _EXAMPLES:
        chat += [{"role": "user", "content": _ask(texts)}, {"role": "assistant", "content": answer}]
    return chat + [{"role": "user", "content": _ask([marked(c) for c in shown])}]


def clean(answer: str) -> str:
    """The explainer's answer as a short phrase: first line, no quotes or leading framing."""
    line = next((ln.strip() for ln in answer.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(the )?(marked )?(tokens?|feature)s? (detects?|are|is|have in common:?)\s+",
                  "", line, flags=re.I)  # fmt: skip
    for _ in range(2):  # a quoted phrase with a full stop inside or outside the quotes
        line = line.strip().rstrip(".").strip()
        if len(line) > 1 and line[0] == line[-1] and line[0] in "\"'`":
            line = line[1:-1]
    return line[:120]


# ---------------------------------------------------------------------------------------
# The score


def detection_score(pos: np.ndarray, neg: np.ndarray, graded: bool = True) -> dict[str, Any]:
    """Balanced accuracy of margins > threshold (the median margin when graded, else 0) as
    the call "fires", with its confusion counts, Agresti–Caffo standard error and rank AUC."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    t = float(np.median(np.concatenate([pos, neg]))) if graded else 0.0
    tp, tn = int((pos > t).sum()), int((neg <= t).sum())
    fn, fp = pos.size - tp, neg.size - tn
    tpr, tnr = tp / pos.size, tn / neg.size
    a, b = (tp + 1) / (pos.size + 2), (tn + 1) / (neg.size + 2)
    se = 0.5 * float(np.sqrt(a * (1 - a) / (pos.size + 2) + b * (1 - b) / (neg.size + 2)))
    greater = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    return {
        "score": (tpr + tnr) / 2, "se": se, "chance": CHANCE, "auc": float(greater),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "threshold": t,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------
# Held-out texts


class _Texts:
    """Windows of harvest tokens as text (BOS dropped), shaped like the index's contexts, and
    a seeded pool of windows with the latents (of those asked for) that fire anywhere in each."""

    def __init__(self, opened: OpenRun, ix: FeatureIndex, latents: list[int], cfg: ExplainConfig):
        import torch

        from saelab.models import load_tokenizer

        self.tpc, self.n_ctx = opened.store.tokens_per_context, opened.store.n_ctx
        self.before, self.after = (int(x) for x in ix.meta["context"])
        self.tokens = opened.store.tokens()
        model = opened.cfg.get("model") or ix.meta.get("model")
        tok = None if model in (None, SYNTHETIC) else load_tokenizer(model)
        self._word = (lambda i: tok.decode([i])) if tok is not None else (lambda i: f"<{i}>")
        self._words: dict[int, str] = {}
        lo, hi = (int(x) for x in ix.meta["rows"])
        n = min(hi - lo, max(16 * cfg.n_detect, 256))
        self.centres = np.sort(np.random.default_rng([cfg.seed, 1]).choice(hi - lo, n, False)) + lo
        rows = [self._rows(int(r)) for r in self.centres]
        win = np.repeat(np.arange(n), [r.size for r in rows])
        col = {lat: j for j, lat in enumerate(latents)}
        self.fired = np.zeros((n, len(latents)), bool)
        with torch.no_grad():  # a window's rows are consecutive: one read each
            x = torch.cat([opened.store.read(int(r[0]), int(r[-1]) + 1) for r in rows])
            for a in range(0, x.shape[0], 4096):
                code = opened.sae.encode(x[a : a + 4096].to(opened.device))
                v, ids = code.values.cpu().numpy(), code.indices.cpu().numpy()
                w_of = np.broadcast_to(win[a : a + 4096, None], v.shape)
                for w, lat in zip(w_of[v > 0], ids[v > 0]):
                    if int(lat) in col:
                        self.fired[w, col[int(lat)]] = True
        self.col = col

    def _rows(self, row: int) -> np.ndarray:
        """Harvest rows of the window around `row` (BOS, never stored, excluded)."""
        ctx, pos = divmod(row, self.tpc)
        p = np.arange(pos + 1 - self.before, pos + 2 + self.after)
        p = p[(p >= 1) & (p < self.n_ctx)]
        return ctx * self.tpc + p - 1

    def text(self, row: int) -> str:
        ctx = row // self.tpc
        out = []
        for r in self._rows(row):
            i = int(self.tokens[ctx, 1 + r % self.tpc])
            if i not in self._words:
                self._words[i] = self._word(i)
            out.append(self._words[i])
        return "".join(out)

    def negatives(self, latent: int, n: int, seed: int) -> list[str]:
        silent = np.nonzero(~self.fired[:, self.col[latent]])[0]
        pick = np.random.default_rng([seed, 2, latent]).permutation(silent)[:n]
        return [self.text(int(self.centres[w])) for w in sorted(pick)]


# ---------------------------------------------------------------------------------------
# One latent, and the run


def split_contexts(
    top: list[Context], intervals: list[Context], n_show: int
) -> tuple[list[Context], list[Context]]:
    """(shown to the explainer, held out to score it): the even top ranks below 2·n_show are
    shown; the other top ranks, then the interval examples, are held out."""
    shown = top[0 : 2 * n_show : 2]
    return shown, [c for k, c in enumerate(top) if k % 2 or k >= 2 * n_show] + intervals


def explain_latent(
    i: int, ix: FeatureIndex, cfg: ExplainConfig, explainer: Explainer | None,
    texts: _Texts | None,
) -> dict[str, Any]:  # fmt: skip
    top = ix.contexts(i, "top")
    shown, held = split_contexts(top, ix.contexts(i, "interval"), cfg.n_show)
    line: dict[str, Any] = {"latent": i, "label": label(ix.latent(i), top)}
    line |= {"explainer": explainer.name if explainer else "none", "n_shown": len(shown)}
    if explainer is None or texts is None or not shown:
        return {**line, "explanation": line["label"], "score": None, "n_scored": 0}
    explanation = clean(explainer.complete(explain_chat(shown), cfg.max_new_tokens))
    pos = [texts.text(c.row) for c in held[: cfg.n_detect]]
    neg = texts.negatives(i, len(pos), cfg.seed)
    line |= {"explanation": explanation, "seed": cfg.seed}
    if not (pos and neg):
        return {**line, "score": None, "n_scored": 0, "note": "no held-out positives or negatives"}
    margins, graded = explainer.detect(explanation, pos + neg)
    result = detection_score(margins[: len(pos)], margins[len(pos) :], graded)
    return {**line, **result, "n_scored": len(pos) + len(neg), "n_pos": len(pos)}


def explain_run(cfg: ExplainConfig, progress: bool = True) -> Path:
    """Explain and score the latents `cfg` selects into the run's explanations.jsonl (see the
    module docstring); every check, and loading the explainer, before anything is written."""
    from tqdm.auto import tqdm

    if not cfg.run:
        raise UserError("no run given; use saelab explain runs/<name>")
    run = Path(cfg.run)
    finished_cfg(run)
    ix = FeatureIndex.of_run(run)
    latents = choose_latents(cfg, ix)
    explainer = None
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    if cfg.explainer != "none":
        from saelab.explainers import make_explainer

        explainer = make_explainer(
            cfg.explainer, api_model=cfg.api_model, api_key_env=cfg.api_key_env, seed=cfg.seed,
            device=cfg.device, batch_size=cfg.batch_size, detection=cfg.detection,
        )  # fmt: skip
    name = explainer.name if explainer else "none"
    path = run / EXPLANATIONS
    with writer_lock(run):
        done = {i for i, d in read_explanations(run).items() if d.get("explainer") == name}
        todo = [i for i in latents if i not in done]
        log.info("explain: %d latents, %d already done by %s", len(latents), len(done), name)
        texts = None
        if explainer is not None and todo:
            from saelab.runs import open_run

            texts = _Texts(open_run(run, cfg.device), ix, todo, cfg)
        cut_torn_line(path)
        for i in tqdm(todo, desc="explain", unit="latent", disable=not progress):
            append_lines(path, json.dumps(explain_latent(i, ix, cfg, explainer, texts)) + "\n")
    return path


def summary(run: str | Path, latents: list[int] | None = None) -> str:
    """Mean detection score (with its spread) of the scored latents, against chance."""
    lines = read_explanations(run)
    scores = [d["score"] for i, d in lines.items() if d.get("score") is not None
              and (latents is None or i in latents)]  # fmt: skip
    if not scores:
        return f"{len(lines)} latents explained, none scored"
    s = np.array(scores)
    return (
        f"{s.size} latents scored: balanced accuracy mean {s.mean():.3f} ± "
        f"{s.std(ddof=1) / np.sqrt(s.size) if s.size > 1 else 0:.3f} (s.e.), sd {s.std():.3f}, "
        f"median {np.median(s):.3f}; chance {CHANCE}"
    )
