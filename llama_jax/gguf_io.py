"""GGUF (llama.cpp) checkpoints: config, tensors and tokenizer, read with the `gguf` package only.

Q8_0, Q4_0 and Q4_1 tensors are kept as they are (llama_jax.quant: int8 / int4 QArrays, the blocks
byte for byte) where every layer of a weight has the same one of those types; other tensors are
dequantized one at a time (`gguf.quants.dequantize`) into float32 in our layout. Two things differ
from a Hugging Face checkpoint:
- llama.cpp's converter permutes the rows of the q/k projections (its RoPE rotates interleaved
  pairs, ours and HF's rotate halves); we undo it as transformers' GGUF loader does
  (`LlamaTensorProcessor._reverse_permute_weights`).
- A GGUF has no tokenizer.json; for a byte-level BPE vocabulary (tokenizer.ggml.model "gpt2": SmolLM2,
  Llama 3) we build one with the `tokenizers` library, following transformers' GGUF tokenizer
  builder (`integrations/gguf/gguf_tokenizer_mapping.py`), so no torch/transformers at run time.
"""

from __future__ import annotations

import json
import mmap
import os
from typing import Iterator

import numpy as np

from llama_jax.checkpoint import param_shapes
from llama_jax.config import LlamaConfig
from llama_jax.quant import GGUF_BLOCK, GGUF_BLOCKS, QSpec, from_gguf, gguf_block_array


class GGUFError(ValueError):
    pass


# llama.cpp tensor name -> (our path, whether per layer, kind of transform).
_TABLE = {
    "token_embd.weight": (("tok_embeddings",), False, None),
    "output_norm.weight": (("norm", "weight"), False, None),
    "output.weight": (("output",), False, "T"),
    "attn_norm.weight": (("layers", "attention_norm", "weight"), True, None),
    "attn_q.weight": (("layers", "attention", "wq"), True, "q"),
    "attn_k.weight": (("layers", "attention", "wk"), True, "k"),
    "attn_v.weight": (("layers", "attention", "wv"), True, "T"),
    "attn_output.weight": (("layers", "attention", "wo"), True, "T"),
    "ffn_norm.weight": (("layers", "ffn_norm", "weight"), True, None),
    "ffn_gate.weight": (("layers", "feed_forward", "w1"), True, "T"),
    "ffn_up.weight": (("layers", "feed_forward", "w3"), True, "T"),
    "ffn_down.weight": (("layers", "feed_forward", "w2"), True, "T"),
}
# Split regexes for byte-level vocabularies, by tokenizer.ggml.pre (as transformers maps them).
# None: GPT-2's own pre-tokenizer regex (ByteLevel with use_regex).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {"gpt2": None, "smollm": None, "default": None,
               "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def drop_mapped_pages(a: np.ndarray) -> None:
    """Tells the kernel this process is done with the memory-mapped file pages behind `a` (a view of
    an np.memmap), so they leave its resident set; they stay in the page cache and are read back if
    touched again. Without this, reading a mapped file tensor by tensor grows RSS to the file size."""
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if not isinstance(base, mmap.mmap) or not hasattr(base, "madvise"):
        return
    start = np.frombuffer(base, np.uint8).ctypes.data
    lo, hi = np.lib.array_utils.byte_bounds(a)
    page = mmap.PAGESIZE
    lo = (lo - start) // page * page
    hi = min(len(base), -(-(hi - start) // page) * page)
    if hi > lo:
        base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class GGUFCheckpoint:
    """A .gguf file of the llama architecture: `config`, `tensors()`, `tokenizer_files()`."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = os.fspath(path)
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot read ({e.strerror})") from None
        except Exception as e:  # the reader raises ValueError/IndexError/struct.error on bad bytes
            raise GGUFError(f"{self.path}: not a valid GGUF file, truncated or corrupt ({e})") from None
        size = os.path.getsize(self.path)
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise GGUFError(f"{self.path}: truncated GGUF file (tensor {t.name!r} ends past the end)")
        self._metadata: dict = {}  # decoded lazily: the token list alone takes seconds
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.config = self._config()

    def _get(self, key, default=KeyError):
        if key not in self._metadata and key in self.reader.fields:
            try:
                self._metadata[key] = self.reader.fields[key].contents()
            except Exception:  # a malformed value reads as absent
                self._metadata[key] = None
        if self._metadata.get(key) is not None:
            return self._metadata[key]
        if default is KeyError:
            raise GGUFError(f"{self.path}: missing metadata {key!r}")
        return default

    def _config(self) -> LlamaConfig:
        arch = self._get("general.architecture")
        if arch != "llama":
            raise GGUFError(f"{self.path}: unsupported architecture {arch!r} (only 'llama')")
        if "rope_freqs.weight" in self._tensors or self._get("llama.rope.scaling.type", "none") != "none":
            raise GGUFError(f"{self.path}: RoPE frequency scaling (Llama 3.1+ rope_freqs) is not supported "
                            "for GGUF yet; convert the Hugging Face checkpoint instead")
        n_heads = int(self._get("llama.attention.head_count"))
        dim = int(self._get("llama.embedding_length"))
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else int(self._get("llama.vocab_size"))
        head_dim = self._get("llama.attention.key_length", None) or self._get("llama.rope.dimension_count", None)
        bos = self._get("tokenizer.ggml.bos_token_id", None)
        eos = [self._get(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
        try:
            return LlamaConfig(
                vocab_size=vocab, dim=dim, n_layers=int(self._get("llama.block_count")), n_heads=n_heads,
                n_kv_heads=int(self._get("llama.attention.head_count_kv", n_heads)),
                ffn_dim=int(self._get("llama.feed_forward_length")),
                head_dim=int(head_dim) if head_dim else None,
                norm_eps=float(self._get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(self._get("llama.rope.freq_base", 10000.0)),
                max_seq_len=int(self._get("llama.context_length", 8192)),
                tie_embeddings="output.weight" not in self._tensors,
                bos_id=None if bos is None else int(bos),
                eos_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            )
        except ValueError as e:
            raise GGUFError(f"{self.path}: {e}") from None

    def _expected(self) -> dict[str, tuple[tuple[str, ...], int | None, str | None, tuple[int, ...]]]:
        """llama.cpp name -> (our path, layer, transform, shape as the GGUF stores it, numpy order)."""
        shapes = param_shapes(self.config)
        out = {}
        for name, (path, per_layer, fn) in _TABLE.items():
            if path not in shapes:
                continue
            ours = shapes[path][1:] if per_layer else shapes[path]
            theirs = tuple(reversed(ours)) if fn else ours
            for i in range(self.config.n_layers) if per_layer else [None]:
                out[name if i is None else f"blk.{i}.{name}"] = (path, i, fn, theirs)
        return out

    def kept(self) -> dict[tuple[str, ...], QSpec]:
        """The weights `tensors(keep_quantized=True)` yields as QArrays: our path -> QSpec. A weight
        is kept when all its tensors (one per layer) have the same type among GGUF_BLOCKS."""
        types: dict[tuple[str, ...], set[str]] = {}
        for name, (path, _, fn, _) in self._expected().items():
            if name in self._tensors:
                types.setdefault((path, fn), set()).add(self._tensors[name].tensor_type.name)
        kept = {}
        for (path, fn), names in types.items():
            if len(names) == 1 and (t := next(iter(names))) in GGUF_BLOCKS:
                _, fmt, has_min = GGUF_BLOCKS[t]
                kept[path] = QSpec(fmt, GGUF_BLOCK, -2 if fn else -1, "float16", has_min)
        return kept

    def dequantized_types(self) -> dict[str, int]:
        """Quantized GGUF types `tensors(keep_quantized=True)` dequantizes to float: name -> tensors."""
        kept, counts = self.kept(), {}
        for name, (path, *_) in self._expected().items():
            t = self._tensors.get(name)
            if t is not None and path not in kept and t.tensor_type.name not in ("F32", "F16", "BF16"):
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    def tensors(self, *, allow_extra: bool = False, keep_quantized: bool = False
                ) -> Iterator[tuple[tuple[str, ...], int | None, np.ndarray]]:
        """Yields (our path, layer index or None, array in our layout) in file order, after checking
        every tensor is present with its expected shape: float32, or with keep_quantized a QArray
        for the weights `kept()` names."""
        import gguf

        expected = self._expected()
        missing = [n for n in expected if n not in self._tensors]
        if missing:
            raise GGUFError(f"{self.path}: missing tensor {missing[0]!r}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        for name, t in self._tensors.items():
            if name not in expected:
                if not allow_extra:
                    raise GGUFError(f"{self.path}: unexpected tensor {name!r}")
                continue
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if shape != expected[name][3]:
                raise GGUFError(f"{self.path}: tensor {name!r} has shape {shape}, expected {expected[name][3]}")
        c = self.config
        kept = self.kept() if keep_quantized else {}
        for t in sorted((t for t in self.reader.tensors if t.name in expected), key=lambda t: t.data_offset):
            path, layer, fn, shape = expected[t.name]
            if path in kept:
                # Rows are whole blocks, so the q/k row permutation is undone on the blocks.
                blocks = gguf_block_array(t.data, t.tensor_type.name, shape)
                if fn in ("q", "k"):
                    blocks = _reverse_permute(blocks, c.n_heads if fn == "q" else c.n_kv_heads)
                yield path, layer, from_gguf(t.tensor_type.name, blocks, transposed=not fn)
                drop_mapped_pages(t.data)
                continue
            a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32, copy=False)
            if fn == "q":
                a = _reverse_permute(a, c.n_heads)
            elif fn == "k":
                a = _reverse_permute(a, c.n_kv_heads)
            yield path, layer, (a.T if fn else a)
            drop_mapped_pages(t.data)  # written by now (an f32 tensor may be a view of the map)

    def tokenizer_files(self) -> dict[str, str]:
        """File name -> text: tokenizer.json, tokenizer_config.json, generation_config.json and
        chat_template.jinja (when the GGUF has a template)."""
        kind = self._get("tokenizer.ggml.model", None)
        if kind != "gpt2":
            raise GGUFError(f"{self.path}: tokenizer.ggml.model {kind!r} is not supported (only byte-level "
                            "BPE, 'gpt2')")
        pre = self._get("tokenizer.ggml.pre", "default")
        if pre not in _PRE_SPLITS:
            raise GGUFError(f"{self.path}: tokenizer.ggml.pre {pre!r} is not supported "
                            f"(known: {', '.join(sorted(_PRE_SPLITS))})")
        tokens = list(self._get("tokenizer.ggml.tokens"))
        types = list(self._get("tokenizer.ggml.token_type", None) or [])
        merges = list(self._get("tokenizer.ggml.merges", None) or [])
        add_bos = bool(self._get("tokenizer.ggml.add_bos_token", False))
        c = self.config
        tok = build_byte_level_tokenizer(tokens, types, merges, split=_PRE_SPLITS[pre],
                                         bos_id=c.bos_id if add_bos else None)
        name = lambda i: None if i is None else tokens[i]  # noqa: E731
        tok_cfg = {"bos_token": name(c.bos_id), "eos_token": name(c.eos_ids[0] if c.eos_ids else None),
                   "add_bos_token": add_bos, "tokenizer_class": "PreTrainedTokenizerFast"}
        template = self._get("tokenizer.chat_template", None)
        files = {"tokenizer.json": tok.to_str(),
                 "generation_config.json": json.dumps({"bos_token_id": c.bos_id, "eos_token_id": list(c.eos_ids)},
                                                      indent=2)}
        if template:
            tok_cfg["chat_template"] = template
            files["chat_template.jinja"] = template
        files["tokenizer_config.json"] = json.dumps(tok_cfg, indent=2)
        return files


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation: w [n_head * E, D] (rows grouped per head as E/2
    interleaved pairs) -> rows as (E/2 first halves, E/2 second halves) per head."""
    e2 = w.shape[0] // n_head // 2
    return w.reshape(n_head, e2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # (H, 2, E/2, D)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every token with these)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_byte_level_tokenizer(tokens: list[str], token_types: list[int], merges: list[str], *,
                               split: str | None = None, bos_id: int | None = None):
    """A `tokenizers.Tokenizer` for a llama.cpp byte-level BPE vocabulary, built as transformers'
    GGUF loader builds it: tokens outside the byte alphabet respelled as their UTF-8 bytes, control
    tokens (type 3) added as special, user-defined ones (type 4) as plain added tokens, `split`
    (a regex) replacing GPT-2's pre-tokenizer regex, and BOS prepended only if `bos_id` is given."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        t = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
        vocab.setdefault(t, i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; transformers skips it.
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, token_types) if ty == _CONTROL and set(t) <= alphabet]
    tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, token_types) if ty == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    if bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos} $B:1",
                                                           special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return tok
