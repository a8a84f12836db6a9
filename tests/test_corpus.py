"""Corpus specs (default, local files, HF) and tokenization into BOS-led contexts."""

import json
import re
from itertools import islice

import numpy as np
import pytest

from saelab.corpus import contexts, iter_contexts, load_texts
from saelab.errors import UserError
from saelab.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


BIBLE_DOC = re.compile(r"^(\d )?[A-Z][a-z]+( of [A-Z][a-z]+| [A-Z][a-z]+)* \d+\n\n")


def test_default_mixes_bible_and_docstrings():
    docs = list(islice(load_texts("default"), 6))
    assert any(BIBLE_DOC.match(d) for d in docs)
    assert any(not BIBLE_DOC.match(d) and re.match(r"^[a-z_.]+[\n:]", d) for d in docs)
    assert docs == list(islice(load_texts("default"), 6))  # deterministic
    assert docs != list(islice(load_texts("default", seed=1), 6))


def test_default_interleaves_early(tok):
    ids = contexts(load_texts("default"), tok, 128, 40)
    docs = tok.decode(ids[:, 1:].ravel()).split(tok.eos_token)
    assert sum(bool(BIBLE_DOC.match(d)) for d in docs) >= 1
    assert sum(not BIBLE_DOC.match(d) for d in docs) >= 2


def test_txt_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    assert list(load_texts(str(tmp_path / "a.txt"))) == ["first paragraph\n\nsecond paragraph\n"]


def test_jsonl_and_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(3)) + "\n")
    assert list(load_texts(str(path), text_field="body")) == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(UserError, match="no field 'text'.*body.*--text_field"):
        list(load_texts(str(path)))


def test_directory_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"text": "sea"}) + "\n")
    (tmp_path / "a.md").write_text("ay")
    (tmp_path / "ignored.csv").write_text("x")
    assert list(load_texts(str(tmp_path))) == ["ay", "bee", "sea"]


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_texts(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="holds no text"):
        list(load_texts(str(tmp_path / "empty.txt")))
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="holds no .txt"):
        load_texts(str(tmp_path / "d"))


def test_hf_dataset_offline_suggests_local_or_default():
    with pytest.raises(UserError, match="cannot be loaded.*local .txt/.jsonl.*'default'"):
        list(load_texts("nobody-org/no-such-dataset-xyz"))


def test_contexts_shape_bos_and_eos(tok):
    docs = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]
    stream = []
    for d in docs:
        stream += [*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    n_ctx = 5
    ids = contexts(docs, tok, n_ctx, len(stream) // (n_ctx - 1))
    assert ids.dtype == np.int32 and ids.shape == (len(stream) // 4, n_ctx)
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert ids[:, 1:].ravel().tolist() == stream[: ids.shape[0] * 4]
    assert (ids[:, 1:] == tok.eos_token_id).sum() >= 2


def test_contexts_too_little_text(tok):
    with pytest.raises(UserError, match=r"only 0 full contexts of 16 .*lower n_tokens"):
        contexts(["a short text"], tok, 16, 10)


@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_iter_contexts_does_not_depend_on_chunk(tok, chunk):
    texts = [f"document {i} " + "word " * (i % 13) for i in range(60)]
    whole = contexts(texts, tok, 8, 40)
    blocks = list(iter_contexts(texts, tok, 8, chunk))
    assert all(len(b) == chunk for b in blocks[:-1]) and 0 < len(blocks[-1]) <= chunk
    streamed = np.concatenate(blocks)
    assert len(streamed) >= 40
    np.testing.assert_array_equal(streamed[:40], whole)


def test_unreachable_hub_fails_fast(monkeypatch):
    import saelab.models as M

    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(M, "hub_reachable", lambda: False)
    with pytest.raises(UserError, match="unreachable.*HF_HUB_OFFLINE=1.*'default'"):
        list(load_texts("nobody-org/no-such-dataset-xyz"))


@pytest.mark.parametrize(
    "value, got",
    [(None, "null"), (3, "a JSON int"), (["a"], "a JSON list"), ({"t": "a"}, "a JSON dict")],
)
def test_jsonl_text_that_is_not_a_string_is_refused_with_its_line(tmp_path, value, got):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "fine"}, {"text": value}, {"text": "never read"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    texts = load_texts(str(path))
    assert next(texts) == "fine"
    with pytest.raises(UserError, match=rf"c.jsonl:2 has {got} under 'text', not a string") as e:
        next(texts)
    assert "\n" not in str(e.value) and "delete the line" in str(e.value)


def test_non_utf8_jsonl_names_file_line_and_byte(tmp_path):
    path = tmp_path / "c.jsonl"
    good = (json.dumps({"text": "ok"}) + "\n").encode()
    path.write_bytes(good + b"\n" + b'{"text": "caf\xe9"}\n')  # latin-1, line 3
    offset = len(good) + 1 + len(b'{"text": "caf')
    with pytest.raises(
        UserError, match=rf"c.jsonl:3 is not UTF-8 \(byte 0xe9 at byte offset {offset}\); convert"
    ) as e:
        list(load_texts(str(path)))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["a.txt", "a.md"])
def test_non_utf8_text_file_names_file_line_and_byte(tmp_path, name):
    # Read whole before: decoded with replacement characters, the bad bytes went unnoticed.
    (tmp_path / name).write_bytes("line one\nnaïve\n".encode("latin-1"))
    with pytest.raises(UserError, match=rf"{name}:2 is not UTF-8 \(byte 0xef at byte offset 11\)"):
        list(load_texts(str(tmp_path)))  # found inside a directory too


def test_utf8_text_is_read_as_is(tmp_path):
    (tmp_path / "a.txt").write_text("naïve — ünïcode\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "日本"}, ensure_ascii=False) + "\n")
    assert list(load_texts(str(tmp_path))) == ["naïve — ünïcode\n", "日本"]


def test_hf_null_texts_are_skipped_with_one_warning(monkeypatch, caplog):
    import datasets

    import saelab.models as M

    class Stream(list):
        def shuffle(self, seed, buffer_size):
            return self

    rows = Stream([{"text": "a"}, {"text": None}, {"text": "b"}, {"text": None}])
    monkeypatch.setattr(M, "hub_offline", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows)
    assert list(load_texts("some-org/with-nulls")) == ["a", "b"]
    assert caplog.text.count("records with null 'text'; skipping them") == 1
    rows.append({"text": 7})
    with pytest.raises(UserError, match="has int under 'text', not text; pass --text_field"):
        list(load_texts("some-org/with-nulls"))
