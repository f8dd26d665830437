"""Text from a stream of token ids, piece by piece, with stop strings: what a streaming request sends."""

from __future__ import annotations

from typing import Sequence


class Detokenizer:
    """One request's text, token by token, with stop strings.

    Decodes a window of recent tokens (vLLM's incremental detokenizer: the text of ids[prefix:]
    minus that of ids[prefix:read]), so each step costs a few tokens, not the whole output. A
    piece ending inside a multi-byte character waits for the rest. With stop strings the text
    ends just before the first one, even when it spans tokens, and the last len(longest) - 1
    characters are held back until they cannot begin one. Ids in `skip` (stop ids) are not text,
    as in `Llama.generate`."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), skip: Sequence[int] = ()):
        self.tokenizer, self.stop, self.skip = tokenizer, tuple(stop), frozenset(skip)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string)
        self.sent = 0  # characters of text handed out
        self.stopped = False  # a stop string was found
        self._hold = max(map(len, self.stop), default=1) - 1
        self._prefix = self._read = 0

    def add(self, ids: Sequence[int]) -> str:
        """Takes new token ids; returns the text that became final."""
        if self.tokenizer is None or self.stopped:
            return ""
        self.ids += [i for i in ids if i not in self.skip]
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return self._append(after[len(before):], final=False)

    def finish(self) -> str:
        """The rest of the text, once no token will come."""
        if self.tokenizer is None:
            return ""
        if not self.stopped:
            # Whatever the window held back (an unfinished character decodes to U+FFFD, as in
            # `Llama.generate`'s text).
            full = self.tokenizer.decode(self.ids)
            if full.startswith(self.text) and len(full) > len(self.text):
                return self._append(full[len(self.text):], final=True)
        return self._release(len(self.text))

    def _append(self, new: str, *, final: bool) -> str:
        start = max(0, len(self.text) - self._hold)  # a new match must end in the new text
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self._release(len(self.text))
        return self._release(len(self.text) if final else len(self.text) - self._hold)

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:upto], upto
        return piece
