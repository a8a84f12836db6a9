"""Corpus specs (default, local files, HF) and tokenization into BOS-led contexts."""

import json
import re
from itertools import islice

import numpy as np
import pytest

from saelab.corpus import contexts, load_texts
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
    with pytest.raises(UserError, match=r"only \d+ tokens.*lower n_tokens or use a bigger corpus"):
        contexts(["a short text"], tok, 16, 10)


def test_unreachable_hub_fails_fast(monkeypatch):
    import saelab.models as M

    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(M, "hub_reachable", lambda: False)
    with pytest.raises(UserError, match="unreachable.*HF_HUB_OFFLINE=1.*'default'"):
        list(load_texts("nobody-org/no-such-dataset-xyz"))
