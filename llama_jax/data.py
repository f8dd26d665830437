"""Training data: text -> a memory-mapped token file -> packed rows of `tokens`, `segment_ids`, `positions`.

Documents are tokenized once, each as bos + text + eos (when the tokenizer has them), and appended to
one flat uint32 token file with the offsets of the documents beside it; later runs memory-map it, so a
corpus larger than RAM works. The held-out split is the corpus's last `eval_fraction` of tokens (cut
at a document boundary when one is near).

Packing (`plan_rows`) walks the token stream once. A document that fits in what is left of the
current row goes in whole; one that does not, but would fit in an empty row, starts a new row (the
rest of the current one is padding); one longer than a row is split, filling the current row and
continuing in the next ones. Every row is therefore a contiguous span of the token stream, and the
whole packing is one array of row boundaries. Inside a row each document (or piece of one) gets its
own segment id (1, 2, ...; 0 is padding) and positions restarting at 0, so attention and RoPE see
each document as if it were alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from typing import Iterable, Iterator, Sequence

import numpy as np

TOKEN_DTYPE = np.uint32
_TEXT_SUFFIXES = (".txt", ".md", ".rst")
_JSONL_SUFFIXES = (".jsonl",)
_TXT_CHUNK_CHARS = 1 << 20  # a big .txt file is read and tokenized a megabyte at a time


class DataError(ValueError):
    """Input data that cannot be trained on (missing, empty, malformed)."""


# --- Reading text -----------------------------------------------------------------------------------


def pydoc_documents() -> list[str]:
    """The offline default corpus: the Python reference documentation topics that every Python
    installation carries (`pydoc_data.topics`, 79 documents, about 465k characters), in key order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _source_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.endswith(_TEXT_SUFFIXES + _JSONL_SUFFIXES))
        if not files:
            raise DataError(f"{path}: no .txt, .md, .rst or .jsonl files in this directory")
        return files
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if not path.endswith(_TEXT_SUFFIXES + _JSONL_SUFFIXES):
        raise DataError(f"{path}: not a text corpus (.txt, .md, .rst, .jsonl with a 'text' field, or a directory)")
    return [path]


def _read_txt(path: str) -> Iterator[str]:
    """One document per text file, in pieces of about a megabyte cut before a line that starts with a
    non-space character, so that pieces tokenize as the whole would (up to rare merges at the cut)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        rest = ""
        while True:
            chunk = f.read(_TXT_CHUNK_CHARS)
            text = rest + chunk
            if not chunk:
                if text:
                    yield text
                return
            cut = _last_line_start(text)
            if cut <= 0 and len(text) < 8 * _TXT_CHUNK_CHARS:
                rest = text
                continue
            cut = cut if cut > 0 else len(text) - 1  # no line break in 8 MB: cut anywhere
            yield text[:cut + 1]
            rest = text[cut + 1:]


def _last_line_start(text: str) -> int:
    """The index of the last newline followed by a non-space character (-1 if none)."""
    i = len(text) - 1
    while True:
        i = text.rfind("\n", 0, i)
        if i < 0 or not text[i + 1].isspace():
            return i


def _read_jsonl(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: no string 'text' field")
            yield text


def _fingerprint(path: str | None) -> list:
    if path is None:
        return ["pydoc_data.topics", sys.version]
    return [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in _source_files(path)]


# --- Tokenizing once into a memory-mapped file ------------------------------------------------------


class TokenFile:
    """A tokenized corpus: `tokens` (memory-mapped uint32 [N]), `doc_starts` (int64 [n_docs + 1], the
    offset of each document and N at the end) and `eval_start` (where the held-out split begins)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = os.fspath(directory)
        with open(os.path.join(self.dir, "meta.json")) as f:
            self.meta = json.load(f)
        n = self.meta["n_tokens"]
        self.tokens = np.memmap(os.path.join(self.dir, "tokens.bin"), TOKEN_DTYPE, mode="r", shape=(n,))
        self.doc_starts = np.load(os.path.join(self.dir, "doc_starts.npy"))
        self.eval_start = int(self.meta["eval_start"])

    def split(self, name: str, seq_len: int, *, pad_id: int = 0) -> "PackedRows":
        """The packed rows of the "train" or "eval" split."""
        start, end = (0, self.eval_start) if name == "train" else (self.eval_start, len(self.tokens))
        return PackedRows(self.tokens, self.doc_starts, seq_len, start=start, end=end, pad_id=pad_id)


def _tokenizer_id(tokenizer) -> str:
    probe = "Tokenizer probe: The quick brown fox, 1234 \u00e9\u4e2d\n\n  def f(x):\treturn x"
    ident = [type(tokenizer).__name__, getattr(tokenizer, "vocab_size", None), tokenizer.bos_id,
             list(tokenizer.eos_ids), tokenizer.encode(probe)]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def tokenize_corpus(path: str | os.PathLike | None, tokenizer, cache_dir: str | os.PathLike, *,
                    eval_fraction: float = 0.05, progress: bool = True) -> TokenFile:
    """Tokenizes the corpus at `path` (a .txt/.md/.rst file: one document; a .jsonl file: one
    document per line's "text"; a directory of them; None: `pydoc_documents()`) once into
    `cache_dir/tokens-HASH/`, reusing it when the files and tokenizer are unchanged. Each document is
    bos + ids + eos, where the tokenizer has them. Returns the TokenFile; raises DataError for an
    empty corpus or one too small to hold out `eval_fraction` of it."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    src = None if path is None else os.path.abspath(os.fspath(path))
    key = json.dumps([_fingerprint(src), _tokenizer_id(tokenizer), eval_fraction])
    out = os.path.join(os.fspath(cache_dir), "tokens-" + hashlib.sha256(key.encode()).hexdigest()[:16])
    if os.path.isfile(os.path.join(out, "meta.json")):
        return TokenFile(out)

    from tqdm import tqdm

    os.makedirs(os.fspath(cache_dir), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_ids[0]] if tokenizer.eos_ids else []
    doc_starts, n = [], 0
    try:
        if src is None:
            docs = pydoc_documents()
            sources = [("pydoc_data.topics", lambda: iter(docs), sum(len(d) for d in docs))]
        else:
            sources = [(f, (lambda f=f: (_read_jsonl if f.endswith(_JSONL_SUFFIXES) else _read_txt)(f)),
                        os.path.getsize(f)) for f in _source_files(src)]
        bar = tqdm(total=sum(s for _, _, s in sources), unit="B", unit_scale=True, desc="tokenize",
                   disable=None if progress else True, file=sys.stderr)
        with open(os.path.join(tmp, "tokens.bin"), "wb") as f:
            for name, read, _ in sources:
                one_doc = not name.endswith(_JSONL_SUFFIXES) and name != "pydoc_data.topics"
                pieces = []
                for text in read():
                    bar.update(len(text.encode("utf-8", errors="replace")) if src is not None else len(text))
                    ids = tokenizer.encode(text)
                    if one_doc:  # a text file is one document, read in pieces
                        if not pieces and ids:
                            doc_starts.append(n)
                            ids = bos + ids
                        pieces.append(len(ids))
                    elif ids:
                        doc_starts.append(n)
                        ids = bos + ids + eos
                    else:
                        continue
                    np.asarray(ids, TOKEN_DTYPE).tofile(f)
                    n += len(ids)
                if one_doc and sum(pieces):
                    np.asarray(eos, TOKEN_DTYPE).tofile(f)
                    n += len(eos)
        bar.close()
        if n < 2:
            where = "pydoc_data.topics" if src is None else src
            raise DataError(f"{where}: empty corpus (no text to train on)")
        starts = np.asarray(doc_starts + [n], np.int64)
        eval_start = _eval_start(starts, eval_fraction)
        if eval_fraction and (eval_start < 2 or n - eval_start < 2):
            raise DataError(f"corpus too small: {n} tokens cannot hold out {eval_fraction:.0%} for evaluation")
        np.save(os.path.join(tmp, "doc_starts.npy"), starts)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"source": src or "pydoc_data.topics", "n_tokens": n, "n_docs": len(doc_starts),
                       "eval_start": eval_start, "eval_fraction": eval_fraction,
                       "tokenizer": _tokenizer_id(tokenizer)}, f, indent=1)
        if os.path.isdir(out):  # another process got there first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenFile(out)


def _eval_start(doc_starts: np.ndarray, fraction: float) -> int:
    """Where the held-out tail begins: the document boundary nearest to (1 - fraction) of the
    tokens when one lies within half the fraction of it, else exactly there (splitting a document)."""
    n = int(doc_starts[-1])
    if fraction == 0:
        return n
    target = round(n * (1 - fraction))
    inner = doc_starts[1:-1]
    if len(inner):
        best = int(inner[np.argmin(np.abs(inner - target))])
        if abs(best - target) <= fraction * n / 2:
            return best
    return target


# --- Packing ----------------------------------------------------------------------------------------


def plan_rows(doc_starts: np.ndarray, seq_len: int, *, start: int = 0, end: int | None = None) -> np.ndarray:
    """Row boundaries [n_rows + 1] over the token span [start, end) of a stream whose documents begin
    at `doc_starts` (see the module docstring for the rule). Row r is tokens[b[r]:b[r + 1]], at most
    seq_len long."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    end = int(doc_starts[-1]) if end is None else end
    inner = doc_starts[(doc_starts > start) & (doc_starts < end)]
    bounds, row_start = [start], start
    for doc_start, doc_end in zip([start, *inner.tolist()], [*inner.tolist(), end]):
        p = doc_start
        while p < doc_end:
            fill = p - row_start
            if doc_end - p <= seq_len - fill:  # the rest of the document fits
                p = doc_end
                if p - row_start == seq_len:
                    bounds.append(p)
                    row_start = p
            elif fill and p == doc_start and doc_end - p <= seq_len:  # fits an empty row: start one
                bounds.append(p)
                row_start = p
            else:  # too long for any row: fill this one and go on in the next
                p = row_start + seq_len
                bounds.append(p)
                row_start = p
    if bounds[-1] != end:
        bounds.append(end)
    return np.asarray(bounds, np.int64)


class PackedRows:
    """The packed rows of a token span: `len(rows)` rows; `rows[indices]` -> a batch dict of int32
    numpy arrays `tokens`, `segment_ids`, `positions` [len(indices), seq_len]."""

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int, *, start: int = 0,
                 end: int | None = None, pad_id: int = 0):
        self.tokens, self.doc_starts, self.seq_len, self.pad_id = tokens, np.asarray(doc_starts), seq_len, pad_id
        self.bounds = plan_rows(self.doc_starts, seq_len, start=start, end=end)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.bounds[-1] - self.bounds[0])

    def __getitem__(self, indices) -> dict[str, np.ndarray]:
        indices = np.atleast_1d(np.asarray(indices, np.int64))
        b, t = len(indices), self.seq_len
        out = {"tokens": np.full((b, t), self.pad_id, np.int32), "segment_ids": np.zeros((b, t), np.int32),
               "positions": np.zeros((b, t), np.int32)}
        for j, r in enumerate(indices.tolist()):
            lo, hi = int(self.bounds[r]), int(self.bounds[r + 1])
            idx = np.arange(lo, hi)
            doc = np.searchsorted(self.doc_starts, idx, side="right") - 1  # the document of each token
            doc_start = np.maximum(self.doc_starts[doc], lo)  # a piece of a split document starts at lo
            out["tokens"][j, :hi - lo] = self.tokens[lo:hi]
            out["segment_ids"][j, :hi - lo] = doc - doc[0] + 1
            out["positions"][j, :hi - lo] = idx - doc_start
        return out


def pack_documents(docs: Iterable[Sequence[int]], seq_len: int, *, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Packs tokenized documents (lists of ids, each already with the tokenizer's bos/eos) into rows:
    a dict of int32 numpy arrays `tokens`, `segment_ids` (1, 2, ... per document in a row, 0 for
    padding) and `positions` (restarting at 0 for each document), each [n_rows, seq_len]. Documents
    longer than a row are split; the module docstring has the rule."""
    docs = [np.asarray(d, np.int64) for d in docs]
    docs = [d for d in docs if len(d)]
    if not docs:
        raise DataError("pack_documents: no tokens (empty corpus)")
    stream = np.concatenate(docs)
    starts = np.cumsum([0] + [len(d) for d in docs])
    rows = PackedRows(stream, starts, seq_len, pad_id=pad_id)
    return rows[np.arange(len(rows))]


class Batches:
    """An endless iterator of training batches over packed rows, shuffled each epoch.

    Each batch holds `rows_per_batch` rows. Its position (rows consumed) and seed are its whole
    state: `state()` goes into a checkpoint, `Batches(rows, n, **state)` continues exactly."""

    def __init__(self, rows: PackedRows, rows_per_batch: int, *, seed: int = 0, position: int = 0,
                 shuffle: bool = True, part: tuple[int, int] | None = None):
        """part: (start, stop): yield only those rows of each batch (one process's share of a
        multi-process step, Trainer.process_rows); the position still counts whole batches."""
        if len(rows) == 0:
            raise DataError("no training rows (empty corpus)")
        self.rows, self.rows_per_batch, self.seed, self.position, self.shuffle = rows, rows_per_batch, seed, position, shuffle
        self.part = (0, rows_per_batch) if part is None else tuple(part)
        self._epoch, self._order = None, None

    def _index(self, i: int) -> int:
        epoch, k = divmod(i, len(self.rows))
        if not self.shuffle:
            return k
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        return int(self._order[k])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = [self._index(self.position + i) for i in range(*self.part)]
        self.position += self.rows_per_batch
        return self.rows[idx]

    def state(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    @property
    def epoch(self) -> float:
        return self.position / len(self.rows)


def eval_batches(rows: PackedRows, batch_size: int, *, max_rows: int | None = None) -> list[dict[str, np.ndarray]]:
    """The first `max_rows` rows (all by default) in batches of exactly batch_size rows (the last one
    padded with empty rows, which hold no targets), so evaluation compiles once."""
    n = len(rows) if max_rows is None else min(len(rows), max_rows)
    out = []
    for lo in range(0, n, batch_size):
        batch = rows[np.arange(lo, min(lo + batch_size, n))]
        short = batch_size - len(batch["tokens"])
        if short:
            batch = {k: np.concatenate([v, np.zeros((short, v.shape[1]), v.dtype)]) for k, v in batch.items()}
            batch["tokens"][-short:] = rows.pad_id
        out.append(batch)
    return out


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 at each change of segment id along a row (0 on padding)."""
    b, t = segment_ids.shape
    idx = np.broadcast_to(np.arange(t), (b, t))
    starts = np.concatenate([np.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return np.where(segment_ids != 0, idx - first, 0).astype(np.int32)


