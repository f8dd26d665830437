"""Chat prompts: a list of messages -> token ids, with special ids only where the format puts them.

`Llama3ChatFormat` is Meta's reference format. `TemplateChatFormat` renders a checkpoint's own
jinja chat template, as transformers' `apply_chat_template` does, but encodes the message contents
as plain text: a user who types "<|im_end|>" gets those characters, not the end of their turn.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from llama_jax.tokenizer import Llama3Tokenizer, Tokenizer

Message = dict  # {"role": str, "content": str}


def _check_messages(messages: Sequence[Mapping], roles: Sequence[str]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} is a {type(m).__name__}, not a dict")
        # Any other field would reach the template unescaped, and could carry special tokens.
        extra = set(m) - {"role", "content"}
        if extra:
            raise ValueError(f"message {i} has unsupported fields {sorted(extra)}")
        if m.get("role") not in roles:
            raise ValueError(f"message {i} has unknown role {m.get('role')!r}; expected one of {roles}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} content must be a str, got {type(m.get('content')).__name__}")


class Llama3ChatFormat:
    """Meta's Llama 3 chat format (the `ChatFormat` of Meta's reference `tokenizer.py`):

        <|begin_of_text|> then per message
        <|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>
        and, for the model to answer, <|start_header_id|>assistant<|end_header_id|>\\n\\n

    It adds no default system prompt, unlike the Hugging Face Llama 3.1 template.
    """

    roles = ("system", "user", "assistant", "ipython")

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        sid = tokenizer.special_token_id
        self._begin_of_text = sid("<|begin_of_text|>")
        self._start_header = sid("<|start_header_id|>")
        self._end_header = sid("<|end_header_id|>")
        self._eot = sid("<|eot_id|>")

    def encode_header(self, role: str) -> list[int]:
        return [
            self._start_header,
            *self.tokenizer.encode(role),
            self._end_header,
            *self.tokenizer.encode("\n\n"),
        ]

    def encode_message(self, message: Message) -> list[int]:
        _check_messages([message], self.roles)
        header = self.encode_header(message["role"])
        return header + self.tokenizer.encode(message["content"].strip()) + [self._eot]

    def encode_dialog(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Messages -> prompt ids, BOS included. With `add_generation_prompt`, ends with an open
        assistant header. Raises ValueError on an unknown role or non-string content."""
        _check_messages(messages, self.roles)
        ids = [self._begin_of_text]
        for message in messages:
            ids += self.encode_message(message)
        if add_generation_prompt:
            ids += self.encode_header("assistant")
        return ids


def _compile_template(template: str):
    # The environment transformers' apply_chat_template uses: templates come from checkpoints, so
    # they run sandboxed; trim_blocks/lstrip_blocks change the whitespace they render.
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        # rendering just keeps the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class TemplateChatFormat:
    """A checkpoint's jinja chat template, encoded so that only the template can emit specials.

    The template is rendered twice: with the real messages, and with a random sentinel in place of
    each content. The sentinel rendering tells which characters the template wrote; special-token
    text is looked for only there. The real rendering is then cut at those special tokens and the
    text between them (template text and contents together) is encoded with the plain
    `tokenizer.encode`. For messages without special-token text this is exactly what transformers'
    `apply_chat_template(..., tokenize=True)` gives: transformers also cuts at special tokens and
    BPE-encodes the text between them, so no BPE piece ever straddles a template/content boundary
    differently. (Special tokens with `lstrip`/`rstrip` set, which eat neighbouring spaces in the
    `tokenizers` library, are not modelled; SmolLM2 and Llama 3 have none.)

    If the template changes the contents (e.g. `| trim`, or branches on them), the sentinel
    rendering no longer lines up with the real one; then the real rendering is encoded with
    specials, which is safe only when no content holds special-token text, and raises otherwise.

    Args:
      template: the jinja source (`chat_template.jinja`, or `chat_template` in tokenizer_config).
      tokenizer: the checkpoint's tokenizer.
      bos_token, eos_token: texts bound to the template's `bos_token` / `eos_token` variables.
      roles: roles accepted in messages; the role is template text, so it must come from a list.
      **template_kwargs: more template variables (e.g. `pad_token`).
    """

    def __init__(
        self,
        template: str,
        tokenizer: Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        *,
        roles: Sequence[str] = ("system", "user", "assistant", "tool"),
        **template_kwargs,
    ):
        self.tokenizer = tokenizer
        self.roles = tuple(roles)
        self._template = _compile_template(template)
        self._kwargs = dict(template_kwargs)
        for name, value in (("bos_token", bos_token), ("eos_token", eos_token)):
            if value is not None:
                self._kwargs[name] = value
        self._special_ids = tokenizer.special_tokens
        # Longest first, so at one position the longest special wins (as in `tokenizers`).
        by_length = sorted(self._special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(s) for s in by_length))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt as text, exactly as transformers' `apply_chat_template(tokenize=False)`."""
        _check_messages(messages, self.roles)
        return self._render([dict(m) for m in messages], add_generation_prompt)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self._kwargs,
        )

    def _split_specials(self, text: str) -> list[str | int]:
        # Text -> pieces: str for plain text, int for a special token id.
        pieces: list[str | int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            pieces += [text[pos : m.start()], self._special_ids[m.group()]]
            pos = m.end()
        pieces.append(text[pos:])
        return pieces

    def _encode_pieces(self, pieces: list[str | int]) -> list[int]:
        # Adjacent text pieces are encoded together, as one string between two specials.
        ids: list[int] = []
        text: list[str] = []
        for piece in pieces:
            if isinstance(piece, str):
                text.append(piece)
            else:
                ids += self.tokenizer.encode("".join(text)) + [piece]
                text = []
        return ids + self.tokenizer.encode("".join(text))

    def encode_dialog(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Messages -> prompt ids (BOS only if the template writes one). Raises ValueError on an
        unknown role, non-string content, or (see class doc) unsafe content."""
        real = self.render(messages, add_generation_prompt)
        contents = [m["content"] for m in messages]
        nonce = secrets.token_hex(8)
        sentinels = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
        marked = self._render(
            [{"role": m["role"], "content": s} for m, s in zip(messages, sentinels)],
            add_generation_prompt,
        )
        # re.split with a group: template text, message index, template text, ...
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", marked)
        if "".join(contents[int(p)] if k % 2 else p for k, p in enumerate(parts)) == real:
            pieces: list[str | int] = []
            for k, part in enumerate(parts):
                pieces += [contents[int(part)]] if k % 2 else self._split_specials(part)
            return self._encode_pieces(pieces)

        # The template rewrote or dropped some content: fall back to the real rendering.
        for i, content in enumerate(contents):
            if self._special_re.search(content):
                raise ValueError(
                    f"message {i} contains special-token text and this chat template changes message "
                    "contents, so it cannot be encoded safely"
                )
        return self._encode_pieces(self._split_specials(real))


def _read_chat_template(model_dir: Path) -> str | None:
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    cfg_path = model_dir / "tokenizer_config.json"
    template = json.loads(cfg_path.read_text()).get("chat_template") if cfg_path.is_file() else None
    if isinstance(template, list):  # several named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def chat_format_for(model_dir, tokenizer: Tokenizer) -> Llama3ChatFormat | TemplateChatFormat:
    """The chat format of a checkpoint: Meta's format for a tiktoken Llama 3 tokenizer, else the
    directory's `chat_template.jinja` or tokenizer_config.json "chat_template"."""
    model_dir = Path(model_dir)
    if isinstance(tokenizer, Llama3Tokenizer):
        return Llama3ChatFormat(tokenizer)
    template = _read_chat_template(model_dir)
    if template is None:
        raise ValueError(f"{model_dir}: no chat template (chat_template.jinja or tokenizer_config.json)")
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

    def token_text(tok):
        return tok.get("content") if isinstance(tok, dict) else tok

    return TemplateChatFormat(
        template,
        tokenizer,
        bos_token=token_text(cfg.get("bos_token")),
        eos_token=token_text(cfg.get("eos_token")),
    )
