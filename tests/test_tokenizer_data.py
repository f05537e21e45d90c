import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hmst.data import (
    BatchSampler,
    TokenData,
    load_pretokenized,
    read_documents,
    split_documents_tail,
    write_pretokenized,
)
from hmst.tokenizer import HMSTTokenizer

SAMPLES = [
    "plain ascii",
    "accents: café naïve déjà vu",
    "CJK: 日本語のテキスト",
    "emoji 🙂👍🏽",
    "ctrl\t\x00\x1b[0m\r\n",
    "  leading and trailing spaces  ",
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip_samples(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=64))
def test_roundtrip_arbitrary_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_and_save_load(tokenizer, tmp_path):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.encode("hi", bos=True, eos=True)[0] == 0
    tokenizer.save(str(tmp_path))
    again = HMSTTokenizer.load(str(tmp_path))
    assert again.encode("ROMEO: what light") == tokenizer.encode("ROMEO: what light")
    assert again.hash() == tokenizer.hash()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        HMSTTokenizer.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        HMSTTokenizer.load(str(bad))


def test_stream_decoder_never_splits_characters(tokenizer):
    text = "naïve 日本語 🙂👍🏽 done"
    dec = tokenizer.decode_stream()
    pieces = [dec.step(i) for i in tokenizer.encode(text)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_token_byte_lengths(tokenizer):
    lengths = tokenizer.token_byte_lengths()
    text = "Shall I compare thee — 夏の日? 🙂"
    assert sum(lengths[i] for i in tokenizer.encode(text)) == len(text.encode())
    assert lengths[tokenizer.eos_id] == 0


def test_pretokenized_roundtrip_and_checks(tokenizer, tmp_path):
    ids = np.asarray(tokenizer.encode("to be or not to be " * 50, eos=True), np.uint16)
    out = str(tmp_path / "tok")
    m = write_pretokenized(out, ids, tokenizer, shard_tokens=100)
    assert len(m["shards"]) == -(-len(ids) // 100)
    data = load_pretokenized(out, tokenizer)
    assert data.segments[0].dtype == np.uint16
    assert np.array_equal(np.concatenate(data.segments), ids)
    other = HMSTTokenizer.train(["something else entirely " * 20], 280)
    with pytest.raises(ValueError, match="tokenized with"):
        load_pretokenized(out, other)
    shard = os.path.join(out, m["shards"][0]["file"])
    with open(shard, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="truncated"):
        load_pretokenized(out, tokenizer)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        f.write("{broken")
    with pytest.raises(ValueError, match="corrupt manifest"):
        load_pretokenized(out)


def test_sampler_determinism_resume_and_sharding():
    data = TokenData(
        [np.arange(5000, dtype=np.uint16), np.arange(300, dtype=np.uint16)]
    )
    a, b = BatchSampler(data, 16, seed=3), BatchSampler(data, 16, seed=3)
    first = a.next_batches(8, 2, 0, 1)
    assert all(
        np.array_equal(x, y)
        for (x, _), (y, _) in zip(first, b.next_batches(8, 2, 0, 1))
    )
    state = a.state_dict()
    expected = a.next_batches(8, 1, 0, 1)[0][0]
    c = BatchSampler(data, 16, seed=99)
    c.load_state_dict(state)
    assert np.array_equal(c.next_batches(8, 1, 0, 1)[0][0], expected)
    # world=2: the two ranks' slices concatenate to the world=1 batch
    r0, r1 = BatchSampler(data, 16, 5), BatchSampler(data, 16, 5)
    one = BatchSampler(data, 16, 5).next_batches(8, 1, 0, 1)[0][0]
    halves = [r0.next_batches(8, 1, 0, 2)[0][0], r1.next_batches(8, 1, 1, 2)[0][0]]
    assert np.array_equal(np.concatenate(halves), one)
    x, y = one[0], BatchSampler(data, 16, 5).next_batches(8, 1, 0, 1)[0][1][0]
    assert np.array_equal(x[1:], y[:-1])  # targets are inputs shifted by one


def test_corpus_shorter_than_one_sequence():
    with pytest.raises(ValueError, match="fewer than one training sequence"):
        BatchSampler(TokenData([np.arange(10, dtype=np.uint16)]), 16, 0)


def test_split_documents_tail():
    docs = ["a" * 50 + "\n" + "b" * 49 + "\n", "c" * 100]
    train, val = split_documents_tail(docs, 0.25)
    assert "".join(train) + "".join(val) == "".join(docs)
    assert val == ["c" * 50]


def test_read_documents_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        read_documents([str(tmp_path / "nope.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(ValueError, match="empty"):
        read_documents([str(empty)])
    rows = tmp_path / "docs.jsonl"
    rows.write_text("\n".join(json.dumps({"text": t}) for t in ["one doc", "two doc"]))
    assert read_documents([str(rows)]) == ["one doc", "two doc"]
