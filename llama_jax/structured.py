"""Structured output: decoding held to a grammar (xgrammar), so that what a request asks to be JSON
parses, and validates against its schema.

- `Grammars`: one model's grammars. Its vocabulary is the tokenizer's token bytes (llama_jax.tokenizer,
  either kind), special tokens left out (a grammar never writes one as text); each JSON schema is
  compiled once and kept, the least recently used dropped past `cache_size`. A grammar is JSON
  following a schema, or (`or_text`) that or any text that does not begin with "{": what a model
  offered tools may answer (tool_choice "auto"): a call it begins is held to the call's schema, as
  llama.cpp's lazy grammars do.
- `Matcher`: one request's place in its grammar: which tokens may come next (a bitmask), and each
  token accepted in turn. The request's stop ids are allowed only where the grammar may end, so a
  constrained answer ends when its grammar does.
- The decode loop's host side: the engine registers a call's matchers (`registered`); inside the
  jitted loop an `io_callback` per step runs `advance`, which accepts each row's new token and returns
  the next step's masks. A call so keeps its many steps: one call per token would pay the engine's
  per-call work (and a streamed chunk) every token, which costs more than the grammar itself.

A mask is [rows, ceil(V / 32)] int32, bit j of word i allowing token 32 i + j (xgrammar's layout);
llama_jax.sampling applies it on the device. xgrammar is optional (`pip install 'llama-jax[structured]'`):
nothing here imports it until a grammar is asked for.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import re
import threading
import weakref
from typing import Iterator, Sequence

import numpy as np

# json_object: any JSON object (OpenAI's json_object mode answers an object).
JSON_OBJECT_SCHEMA = '{"type": "object"}'


def mask_width(vocab_size: int) -> int:
    """Words of a mask row: one bit per token."""
    return -(-vocab_size // 32)


def schema_text(schema) -> str:
    """A JSON schema (a dict, a bool, or its JSON text) as the text its grammar is cached under.
    Property order is kept: it is the order a grammar writes the properties in."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema: not JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"json_schema: a schema is a JSON object (or a boolean), got {type(schema).__name__}")
    return json.dumps(schema, ensure_ascii=False)


def _one_line(e: Exception) -> str:
    # xgrammar's C++ errors start with a time and a source location: "[12:00:00] /path/x.cc:12: ...".
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", first)


class Matcher:
    """One request's state in its grammar: `fill` writes the tokens allowed next into a mask row,
    `accept` moves past a token."""

    def __init__(self, matcher):
        self._m = matcher

    def fill(self, masks: np.ndarray, row: int) -> None:
        if self._m.is_terminated():  # it accepted a stop id: its request is over, nothing comes next
            masks[row] = -1
        else:
            self._m.fill_next_token_bitmask(masks, row)

    def accept(self, token: int) -> None:
        if not self._m.accept_token(int(token)):
            raise RuntimeError(f"token {token} is outside its grammar's mask")

    @property
    def terminated(self) -> bool:
        return self._m.is_terminated()


class Grammars:
    """The grammars of one model: tokenizer (a llama_jax.tokenizer.Tokenizer), vocab_size (the
    model's: a mask's width; ids past the tokenizer's are never allowed), stop_ids (the model's eos:
    where a grammar may end when a request names no others)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Sequence[int], *, cache_size: int = 256):
        try:
            import xgrammar
        except ImportError:
            raise ValueError("json_schema: structured output needs the xgrammar package: pip install "
                             "'llama-jax[structured]'") from None
        if tokenizer is None:
            raise ValueError("json_schema: structured output needs a model with a tokenizer")
        if not stop_ids:
            raise ValueError("json_schema: structured output needs a stop token id (the model's eos) to end a grammar")
        self._xgr = xgrammar
        self.vocab_size = vocab_size
        vocab = tokenizer.token_bytes()[:vocab_size]
        for i in tokenizer.special_tokens.values():
            if i < len(vocab):
                vocab[i] = b""  # xgrammar's mark of a special token: never text
        vocab += [b""] * (vocab_size - len(vocab))
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=vocab_size,
                                      stop_token_ids=[int(i) for i in stop_ids])
        # Its own cache off: ours keys by schema text and bounds the count.
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: collections.OrderedDict[tuple[str, bool], object] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # requests are checked on the server's threads, matchers made on the engine's
        self._pending: dict[tuple[str, bool], threading.Lock] = {}
        self.compiled = 0  # grammars compiled so far (a cache miss each)

    def compile(self, schema: str, or_text: bool = False):
        """The compiled grammar of a JSON schema's text (see `schema_text`), or with `or_text` of
        that JSON or text not beginning with "{"; from the cache when seen before. Raises ValueError
        (one line) for a schema xgrammar cannot compile."""
        key = (schema, or_text)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            # Requests with one new schema arrive together: one compiles it, the others wait.
            pending = self._pending.setdefault(key, threading.Lock())
        with pending:
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            xgr = self._xgr
            try:
                # Compact JSON, one space after ':' and ',': whitespace left free lets a small model
                # write newlines until max_tokens.
                grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
                if or_text:
                    grammar = xgr.Grammar.union(grammar, xgr.Grammar.from_ebnf("root ::= ([^{] [^]*)?"))
                compiled = self._compiler.compile_grammar(grammar)
            except Exception as e:  # noqa: BLE001  xgrammar raises RuntimeError, ValueError, its own InvalidJSONError
                with self._lock:
                    self._pending.pop(key, None)
                raise ValueError(f"json_schema: {_one_line(e)}") from None
            with self._lock:
                self._pending.pop(key, None)
                self.compiled += 1
                self._cache[key] = compiled
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            return compiled

    def matcher(self, schema: str, stop_ids: Sequence[int], or_text: bool = False) -> Matcher:
        """A fresh Matcher of `compile(schema, or_text)`, ending at one of stop_ids."""
        if not stop_ids:
            raise ValueError("json_schema: a constrained request needs a stop token id to end with")
        compiled = self.compile(schema, or_text)
        return Matcher(self._xgr.GrammarMatcher(compiled, override_stop_tokens=[int(i) for i in stop_ids]))


_shared: "weakref.WeakKeyDictionary[object, dict[tuple, Grammars]]" = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def grammars_for(tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> Grammars:
    """The one Grammars of a tokenizer (for this vocab_size and stop_ids): every engine of a model,
    `Llama.generate`'s included, compiles a schema once."""
    key = (vocab_size, tuple(int(i) for i in stop_ids))
    with _shared_lock:
        per_tokenizer = _shared.setdefault(tokenizer, {}) if tokenizer is not None else {}
        if key not in per_tokenizer:
            per_tokenizer[key] = Grammars(tokenizer, vocab_size, stop_ids)
        return per_tokenizer[key]


# --- The decode loop's host side -------------------------------------------------------------------------

_calls: dict[int, tuple[list[Matcher | None], int]] = {}
_call_ids = itertools.count(1)


@contextlib.contextmanager
def registered(matchers: list[Matcher | None], width: int) -> Iterator[int]:
    """Registers a call's matchers (one per row, None for a row without a grammar) for `advance`;
    yields the id the call passes to it."""
    call = next(_call_ids) % (1 << 31)
    _calls[call] = (matchers, width)
    try:
        yield call
    finally:
        del _calls[call]


def next_masks(matchers: list[Matcher | None], width: int) -> np.ndarray:
    """The masks [rows, width] of each row's next token (every bit set for a row without a grammar)."""
    masks = np.full((len(matchers), width), -1, np.int32)
    for row, m in enumerate(matchers):
        if m is not None:
            m.fill(masks, row)
    return masks


def advance(call, tokens, going) -> np.ndarray:
    """The io_callback of a decode step: each row of registered call `call` that made a token
    (going [rows]) accepts it (tokens [rows]); returns the next step's masks [rows, width]."""
    matchers, width = _calls[int(call)]
    for row, m in enumerate(matchers):
        if m is not None and going[row]:
            m.accept(int(tokens[row]))
    return next_masks(matchers, width)
