"""Training data: packing documents into rows, the token file, the held-out split, the batch iterator."""

import json

import numpy as np
import pytest

from llama_jax import data
from llama_jax.data import pack_documents, positions_from_segments


def _docs(lengths, start=10):
    out, next_id = [], start
    for n in lengths:
        out.append(list(range(next_id, next_id + n)))
        next_id += n
    return out


def test_pack_whole_documents_with_segments_and_positions():
    docs = _docs([5, 3, 7, 4])
    rows = pack_documents(docs, 11, pad_id=0)
    # 5 + 3 fit the first row; 7 does not fit the 3 left and would fit an empty row: a new row.
    np.testing.assert_array_equal(rows["tokens"][0], docs[0] + docs[1] + [0] * 3)
    np.testing.assert_array_equal(rows["segment_ids"][0], [1] * 5 + [2] * 3 + [0] * 3)
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(rows["tokens"][1], docs[2] + docs[3])
    np.testing.assert_array_equal(rows["segment_ids"][1], [1] * 7 + [2] * 4)
    np.testing.assert_array_equal(rows["positions"][1], list(range(7)) + list(range(4)))
    assert rows["tokens"].shape == (2, 11) and all(v.dtype == np.int32 for v in rows.values())


def test_pack_splits_long_documents_filling_rows():
    docs = _docs([4, 13, 2])
    rows = pack_documents(docs, 6)
    stream = sum(docs, [])
    # The long document fills the first row's 2 free places and goes on in the next rows; the short
    # one after it does not fit the 1 place left, so it starts a row of its own.
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1, 2, 2], [1] * 6, [1] * 5 + [0],
                                                        [1, 1, 0, 0, 0, 0]])
    real = rows["segment_ids"] > 0
    np.testing.assert_array_equal(rows["tokens"][real], stream)
    # Each piece of the split document restarts its positions.
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(rows["positions"][1], range(6))
    np.testing.assert_array_equal(rows["positions"][2], [0, 1, 2, 3, 4, 0])


def test_pack_every_token_once_in_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 50)
    docs = _docs(lengths)
    rows = pack_documents(docs, 17)
    real = rows["segment_ids"] > 0
    np.testing.assert_array_equal(rows["tokens"][real], np.concatenate(docs))
    # positions restart exactly where segment ids change
    np.testing.assert_array_equal(positions_from_segments(rows["segment_ids"]), rows["positions"])


def test_pack_rejects_nothing_to_pack():
    with pytest.raises(data.DataError, match="empty corpus"):
        pack_documents([[], []], 8)
    with pytest.raises(data.DataError, match="seq_len"):
        pack_documents([[1, 2, 3]], 1)


class _CharTokenizer:
    """One token per byte; bos 1, eos 2."""

    bos_id, eos_ids, vocab_size = 1, (2,), 259

    def encode(self, text):
        return [b + 3 for b in text.encode()]


def test_tokenize_corpus_files_once_with_held_out_tail(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world\n")
    (corpus / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["abc", "", "defgh"] * 10) + "\n")
    (corpus / "ignored.bin").write_bytes(b"\0")
    tok = data.tokenize_corpus(corpus, _CharTokenizer(), tmp_path / "cache", eval_fraction=0.2, progress=False)
    ids = tok.tokens.tolist()
    assert ids[:14] == [1] + [b + 3 for b in b"hello world\n"] + [2]
    assert tok.meta["n_docs"] == 21  # the text file and 20 non-empty lines
    assert len(ids) == 14 + 10 * (5 + 7)
    assert tok.eval_start in tok.doc_starts  # cut at a document boundary near 80%
    assert abs(tok.eval_start - 0.8 * len(ids)) <= 0.1 * len(ids)
    train, held = tok.split("train", 8), tok.split("eval", 8)
    assert train.n_tokens + held.n_tokens == len(ids)
    # The second time reads the cached file.
    again = data.tokenize_corpus(corpus, _CharTokenizer(), tmp_path / "cache", eval_fraction=0.2, progress=False)
    assert again.dir == tok.dir


def test_one_long_text_file_is_cut_inside(tmp_path):
    (tmp_path / "book.txt").write_text("x" * 1000)
    tok = data.tokenize_corpus(tmp_path / "book.txt", _CharTokenizer(), tmp_path / "c", eval_fraction=0.1,
                               progress=False)
    assert tok.eval_start == 902  # no document boundary: exactly 90% of 1002 tokens
    held = tok.split("eval", 64)
    assert held[0]["positions"][0, 0] == 0 and held[0]["segment_ids"][0, 0] == 1


@pytest.mark.parametrize("content, needle", [("", "empty corpus"), ("{}\n", "no string 'text'"),
                                             ("not json\n", "not valid JSON")])
def test_bad_corpus_errors(tmp_path, content, needle):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(data.DataError, match=needle):
        data.tokenize_corpus(tmp_path / "c.jsonl", _CharTokenizer(), tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("tokens-*"))  # nothing half-written left behind


def test_missing_and_unknown_paths(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.tokenize_corpus(tmp_path / "nope.txt", _CharTokenizer(), tmp_path / "cache", progress=False)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(data.DataError, match="not a text corpus"):
        data.tokenize_corpus(tmp_path / "x.csv", _CharTokenizer(), tmp_path / "cache", progress=False)


def test_pydoc_is_the_default_corpus():
    docs = data.pydoc_documents()
    assert len(docs) >= 70 and sum(map(len, docs)) > 300_000


def test_batches_resume_where_they_stopped():
    rows = data.PackedRows(np.arange(200), np.array([0, 50, 120, 200]), 8)
    straight = data.Batches(rows, 3, seed=5)
    first = [next(straight) for _ in range(30)]  # several epochs of 25 rows
    part = data.Batches(rows, 3, seed=5)
    [next(part) for _ in range(11)]
    resumed = data.Batches(rows, 3, **part.state())
    for want in first[11:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # every row once per epoch
    seen = np.concatenate([b["tokens"][:, 0] for b in first])[:len(rows)]
    assert sorted(seen) == sorted(rows[np.arange(len(rows))]["tokens"][:, 0])


def test_eval_batches_have_one_shape():
    rows = data.PackedRows(np.arange(100), np.array([0, 100]), 16)
    batches = data.eval_batches(rows, 4)
    assert [b["tokens"].shape for b in batches] == [(4, 16), (4, 16)]
    assert (batches[-1]["segment_ids"][3:] == 0).all()  # 7 rows: the last batch has one empty row
