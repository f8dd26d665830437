"""Tokenizers: Meta's Llama 3 tiktoken BPE and Hugging Face `tokenizer.json` checkpoints.

Both follow one rule: `encode(text)` treats its input as plain text. The text of a special token
("<|eot_id|>", "<|im_end|>") typed by a user comes out as ordinary BPE pieces, never as the special
id, so a prompt cannot forge a turn boundary. Special ids come only from the chat formatter
(`llama_jax.chat`), which is the one caller of `encode_with_specials`.
"""

from __future__ import annotations

import abc
import base64
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken


class Tokenizer(abc.ABC):
    """The interface the rest of llama_jax uses.

    Attributes:
      vocab_size: number of ids, special tokens included.
      bos_id: id of the beginning-of-sequence token, or None if the checkpoint has none.
      add_bos: whether a raw-text prompt should start with `bos_id` (True for Llama 3).
      eos_ids: ids that end generation.
    """

    vocab_size: int
    bos_id: int | None
    add_bos: bool
    eos_ids: tuple[int, ...]

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Adds no BOS; special-token text stays text."""

    @abc.abstractmethod
    def encode_with_specials(self, text: str) -> list[int]:
        """Like `encode`, but special-token text becomes special ids. For chat templates only."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text; special ids decode to their text."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """All special tokens, text -> id."""

    @abc.abstractmethod
    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for, id by id (vocab_size entries; a special token's are its
        text). What a grammar over bytes (llama_jax.structured) and logprobs' `bytes` need: a
        token can hold part of a UTF-8 character, which `decode` would replace."""

    def special_token_id(self, name: str) -> int:
        """The id of a special token, e.g. `special_token_id("<|eot_id|>")`."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"{name!r} is not a special token of this tokenizer") from None


# ---------------------------------------------------------------------------------------------
# Llama 3 (tiktoken)

# Meta's split pattern, from the llama3 reference tokenizer.py.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_BASE_TOKENS = 128_000
LLAMA3_NUM_SPECIAL_TOKENS = 256
# Llama 3.1 names (meta-llama/llama-models). Llama 3.0 (and quicktok's llama3.special) has the same
# ids but names 128004, 128008 and 128010 reserved tokens and numbers the reserved ones up to 250.
_LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (a tool call follows)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED_SPECIALS + [
    f"<|reserved_special_token_{i}|>"
    for i in range(3, 3 + LLAMA3_NUM_SPECIAL_TOKENS - len(_LLAMA3_NAMED_SPECIALS))
]

# tiktoken's Rust core panics on much longer inputs (Meta's comment in the reference; still true
# in tiktoken 0.14: one million spaces overflow its regex stack).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
# ...and slows down on very long runs without a split point (openai/tiktoken#195).
MAX_NO_WHITESPACES_CHARS = 25_000


def _split_whitespaces_or_nonwhitespaces(s: str, max_len: int) -> Iterator[str]:
    """Cuts `s` so no piece has more than `max_len` consecutive whitespace or non-whitespace
    characters: the cuts of Meta's reference (every `max_len` characters into a long run), found
    with a regex instead of its per-character Python loop (re's `\\s` is `str.isspace`)."""
    start = 0
    # The lookbehinds make each run match only from its first character (linear time).
    for m in re.finditer(rf"(?<!\s)\s{{{max_len + 1},}}|(?<!\S)\S{{{max_len + 1},}}", s):
        for cut in range(m.start() + max_len, m.end(), max_len):
            yield s[start:cut]
            start = cut
    yield s[start:]


def _read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    # Not tiktoken.load.load_tiktoken_bpe: it caches files by path in a temp dir, so a different
    # file later written to the same path would silently load the stale copy.
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(
                    f"{path}:{lineno} is not a tiktoken BPE file line (base64 token, rank); "
                    "is this a SentencePiece model?"
                ) from e
    return ranks


class Llama3Tokenizer(Tokenizer):
    """Meta's Llama 3 / 3.1 / 3.2 / 3.3 tokenizer: tiktoken over `tokenizer.model`.

    Args:
      path: Meta's `tokenizer.model` (one "base64-token rank" per line, 128000 lines).
      eos_ids: ids that end generation; defaults to <|end_of_text|> and <|eot_id|>.
    """

    def __init__(self, path: str | os.PathLike, *, eos_ids: Sequence[int] | None = None):
        ranks = _read_tiktoken_ranks(path)
        if len(ranks) != LLAMA3_NUM_BASE_TOKENS:
            raise ValueError(f"{path}: expected {LLAMA3_NUM_BASE_TOKENS} tokens, got {len(ranks)}")
        self._special = {
            tok: LLAMA3_NUM_BASE_TOKENS + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)
        }
        self._enc = tiktoken.Encoding(
            name=Path(path).name,
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self._special,
        )
        self.vocab_size = self._enc.n_vocab
        self.bos_id = self._special["<|begin_of_text|>"]
        self.add_bos = True
        if eos_ids is None:
            eos_ids = (self._special["<|end_of_text|>"], self._special["<|eot_id|>"])
        self.eos_ids = tuple(int(i) for i in eos_ids)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def _chunks(self, text: str) -> Iterator[str]:
        # Meta's reference cuts every 400k characters, even mid-word, which changes the ids there.
        # We cut at the last " " that follows a non-space instead: the piece holding that
        # non-space character always ends right before such a space (no alternative of the split
        # pattern can take a space after a non-space), so the cut is a pre-token boundary and the
        # ids equal those of the uncut text (as quicktok and HF tokenizers give). Only a window
        # with no such space (400k of CJK, say) is cut blindly, as Meta does.
        start = 0
        while len(text) - start > TIKTOKEN_MAX_ENCODE_CHARS:
            end = start + TIKTOKEN_MAX_ENCODE_CHARS
            cut = text.rfind(" ", start + 1, end + 1)
            while cut > start and text[cut - 1].isspace():
                cut = text.rfind(" ", start + 1, cut)
            end = cut if cut > start else end
            yield from _split_whitespaces_or_nonwhitespaces(text[start:end], MAX_NO_WHITESPACES_CHARS)
            start = end
        yield from _split_whitespaces_or_nonwhitespaces(text[start:], MAX_NO_WHITESPACES_CHARS)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk in self._chunks(text):
            ids.extend(self._enc.encode_ordinary(chunk))
        return ids

    def encode_with_specials(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk in self._chunks(text):
            ids.extend(self._enc.encode(chunk, allowed_special="all"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        # errors="replace": a prefix of a generation can end inside a multi-byte character.
        return self._enc.decode(list(ids))

    def token_bytes(self) -> list[bytes]:
        return [self._enc.decode_single_token_bytes(i) for i in range(self.vocab_size)]


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` checkpoint (e.g. SmolLM2) through the `tokenizers` library.

    Args:
      path: the `tokenizer.json` file.
      bos_token: text of the BOS token, or None if the model has none.
      eos_tokens: texts of the tokens that end generation.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        bos_token: str | None = None,
        eos_tokens: Sequence[str] | None = None,
    ):
        from tokenizers import Tokenizer as _HFTok

        self._tok = _HFTok.from_file(str(path))
        # `add_special_tokens=False` only skips the post-processor's BOS/EOS; added *special*
        # tokens in the text are still split out. `encode_special_tokens=True` makes the library
        # run them through the BPE model like any text. Non-special added tokens (normal vocab
        # entries such as "<think>" in some models) are still matched, as transformers does.
        self._plain = _HFTok.from_str(self._tok.to_str())
        self._plain.encode_special_tokens = True
        self._special = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = None if bos_token is None else self.special_token_id(bos_token)
        # Whether the checkpoint's post-processor prepends BOS to raw text (SmolLM2's does not).
        probe = self._tok.encode("a", add_special_tokens=True).ids
        self.add_bos = self.bos_id is not None and probe[:1] == [self.bos_id]
        self.eos_ids = tuple(self.special_token_id(t) for t in (eos_tokens or ()))

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def encode(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> list[bytes]:
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        if "ByteLevel" not in kinds:
            raise ValueError(f"token bytes: only byte-level BPE tokenizers are supported, this one's decoder is "
                             f"{sorted(k for k in kinds if k)}")
        # GPT-2's byte-level alphabet: each byte is one printable character (bytes_to_unicode).
        kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
        shifted = [b for b in range(256) if b not in kept]
        byte_of = {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(shifted)}
        added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        out = []
        for i in range(self.vocab_size):
            if i in added:  # added tokens are stored as their text, not in the byte alphabet
                out.append(added[i].encode())
                continue
            piece = self._tok.id_to_token(i)
            out.append(b"" if piece is None else bytes(byte_of[c] for c in piece))
        return out


# ---------------------------------------------------------------------------------------------
# Loading from a checkpoint directory


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


def _token_text(tok) -> str | None:
    # tokenizer_config.json stores a token as a string or as an AddedToken dict.
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _as_id_list(value) -> list[int] | None:
    if value is None:
        return None
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _is_tiktoken_file(path: Path) -> bool:
    # A Llama 2 style SentencePiece `tokenizer.model` is protobuf; tiktoken's is base64 lines.
    with open(path, "rb") as f:
        first = f.readline().split()
    try:
        token, rank = first
        base64.b64decode(token, validate=True)
        int(rank)
        return True
    except ValueError:  # also binascii.Error
        return False


def load_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
    """Loads the tokenizer of a checkpoint directory.

    `tokenizer.model` in tiktoken format -> `Llama3Tokenizer`; otherwise `tokenizer.json` ->
    `HFTokenizer`. BOS/EOS come from `generation_config.json`, then `config.json`, then
    `tokenizer_config.json`, whichever says first.
    """
    model_dir = Path(model_dir)
    gen_cfg = _read_json(model_dir / "generation_config.json")
    cfg = _read_json(model_dir / "config.json")
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    eos_ids = _as_id_list(gen_cfg.get("eos_token_id", cfg.get("eos_token_id")))

    tiktoken_file = model_dir / "tokenizer.model"
    if tiktoken_file.is_file() and _is_tiktoken_file(tiktoken_file):
        return Llama3Tokenizer(tiktoken_file, eos_ids=eos_ids)

    hf_file = model_dir / "tokenizer.json"
    if not hf_file.is_file():
        raise ValueError(
            f"{model_dir}: no tokenizer found (need a tiktoken tokenizer.model or tokenizer.json)"
        )
    tok = HFTokenizer(
        hf_file,
        bos_token=_token_text(tok_cfg.get("bos_token")),
        eos_tokens=[t for t in [_token_text(tok_cfg.get("eos_token"))] if t],
    )
    bos_id = gen_cfg.get("bos_token_id", cfg.get("bos_token_id"))
    if tok.bos_id is None and bos_id is not None:
        tok.bos_id = int(bos_id)
    if eos_ids:
        tok.eos_ids = tuple(eos_ids)
    return tok
