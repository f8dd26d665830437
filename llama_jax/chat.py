"""Chat prompts: a list of messages -> token ids, with special ids only where the format puts them.

`Llama3ChatFormat` is Meta's reference format. `TemplateChatFormat` renders a checkpoint's own
jinja chat template, as transformers' `apply_chat_template` does, but encodes the message contents
as plain text: a user who types "<|im_end|>" gets those characters, not the end of their turn.

Tools (OpenAI's function definitions) are rendered in the format's own way: Llama 3.1's JSON tool
calling for `Llama3ChatFormat` (the functions offered at the top of the first user message, a call
answered as {"name": ..., "parameters": {...}}); the template's, for a template that takes `tools`;
otherwise (SmolLM2's template, say) the same offer as Llama 3.1's, a call answered as
{"name": ..., "arguments": {...}}. (In the first user message rather than a system prompt: there
SmolLM2-135M starts a call when a question needs one, and from a system prompt it never did.) Each
format gives the JSON schema of one call (`tool_call_schema`, for decoding constrained to a call),
and `parse_tool_calls` reads calls back out of a generated text. An assistant message may carry
`tool_calls`, and "tool" messages hold their results.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from llama_jax.tokenizer import Llama3Tokenizer, Tokenizer

Message = dict  # {"role": str, "content": str}, and "tool_calls" (assistant) or "tool_call_id" (tool)

_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A call of a function: its name, and its arguments as the JSON text of an object."""

    name: str
    arguments: str


def check_tools(tools: Sequence[Mapping]) -> list[dict]:
    """OpenAI's tool definitions, checked: [{"type": "function", "function": {"name", "description"?,
    "parameters"? (a JSON schema of an object)}}], names unique. Raises ValueError naming `tools`."""
    if not isinstance(tools, Sequence) or not tools:
        raise ValueError("tools: a non-empty list of function definitions")
    names = set()
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(t, Mapping) or t.get("type") != "function" or not isinstance(f, Mapping):
            raise ValueError(f'tools[{i}]: expected {{"type": "function", "function": {{...}}}}')
        name = f.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise ValueError(f"tools[{i}]: function name {name!r} must be 1 to 64 letters, digits, '_' or '-'")
        if name in names:
            raise ValueError(f"tools[{i}]: function name {name!r} given twice")
        names.add(name)
        if not isinstance(f.get("parameters", {}), Mapping):
            raise ValueError(f"tools[{i}]: parameters must be a JSON schema (an object)")
    return [dict(t) for t in tools]


def _functions(tools: Sequence[Mapping]) -> dict[str, Mapping]:
    return {t["function"]["name"]: t["function"] for t in tools}


def _rebased(schema, prefix: str):
    """schema with its local references ("#/...") moved under `prefix`: where it sits inside a
    bigger schema (a tool call's arguments)."""
    if isinstance(schema, Mapping):
        return {k: (prefix + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebased(v, prefix))
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rebased(v, prefix) for v in schema]
    return schema


def tool_call_schema(tools: Sequence[Mapping], name: str | None, arguments_key: str) -> dict:
    """The JSON schema of one call, {"name": ..., arguments_key: {...}}, of function `name` or (None)
    of any of `tools`, its arguments following the function's parameters."""
    functions = _functions(tools)
    if name is not None and name not in functions:
        raise ValueError(f"tool_choice: no function named {name!r} in tools")
    chosen = [name] if name is not None else list(functions)
    calls = []
    for i, n in enumerate(chosen):
        where = f"#/properties/{arguments_key}" if len(chosen) == 1 else f"#/anyOf/{i}/properties/{arguments_key}"
        params = _rebased(functions[n].get("parameters") or {"type": "object"}, where)
        calls.append({"type": "object", "properties": {"name": {"const": n}, arguments_key: params},
                      "required": ["name", arguments_key]})
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


# What a call may begin with: a JSON object or a list of them, Hermes' tag, Llama's <|python_tag|>.
_CALL_OPENINGS = ("{", "[", "<tool_call>", "<|python_tag|>")


def may_be_tool_call(text: str) -> bool:
    """Whether a generated text that begins so may yet be a tool call (`parse_tool_calls`): a
    stream holds such text back until it knows."""
    head = text.lstrip()
    return any(head.startswith(o) or o.startswith(head) for o in _CALL_OPENINGS)


def parse_tool_calls(text: str, tools: Sequence[Mapping]) -> list[ToolCall] | None:
    """The calls a generated text makes, or None when it is not (only) calls: a JSON object
    {"name": <one of tools>, "arguments" or "parameters": {...}}, a list of them, or such objects
    each between <tool_call> and </tool_call>; Llama's <|python_tag|> before them is allowed."""
    functions = _functions(tools)
    body = text.strip().removeprefix("<|python_tag|>").strip()
    blocks = re.findall(r"<tool_call>(.*?)</tool_call>", body, flags=re.S)
    if blocks and not re.sub(r"<tool_call>.*?</tool_call>", "", body, flags=re.S).strip():
        pieces = blocks
    elif blocks or not body:
        return None
    else:
        pieces = [body]
    calls = []
    for piece in pieces:
        try:
            value = json.loads(piece)
        except json.JSONDecodeError:
            return None
        for call in value if isinstance(value, list) else [value]:
            if not isinstance(call, Mapping) or call.get("name") not in functions:
                return None
            args = call.get("arguments", call.get("parameters"))
            if isinstance(args, str):  # some models write the arguments as a JSON string
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return None
            if not isinstance(args, Mapping):
                return None
            calls.append(ToolCall(call["name"], json.dumps(args, ensure_ascii=False)))
    return calls or None


def _check_messages(messages: Sequence[Mapping], roles: Sequence[str]) -> list[dict]:
    """The messages, checked, as dicts: an assistant's "tool_calls" as ToolCalls (its content may then
    be None: ""), a tool message's "tool_call_id" kept."""
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} is a {type(m).__name__}, not a dict")
        role = m.get("role")
        # Any other field would reach the template unescaped, and could carry special tokens.
        allowed = {"role", "content"} | {"assistant": {"tool_calls"}, "tool": {"tool_call_id", "name"}}.get(role, set())
        extra = set(m) - allowed
        if extra:
            raise ValueError(f"message {i} has unsupported fields {sorted(extra)}")
        if role not in roles:
            raise ValueError(f"message {i} has unknown role {role!r}; expected one of {roles}")
        out = {"role": role, "content": m.get("content")}
        if "tool_calls" in m:
            out["tool_calls"] = _message_tool_calls(m["tool_calls"], i)
            if out["content"] is None:
                out["content"] = ""
        if not isinstance(out["content"], str):
            raise ValueError(f"message {i} content must be a str, got {type(out['content']).__name__}")
        for key in ("tool_call_id", "name"):
            if key in m:
                if not isinstance(m[key], str):
                    raise ValueError(f"message {i} {key} must be a str")
                out[key] = m[key]
        checked.append(out)
    return checked


def _message_tool_calls(calls, i: int) -> list[ToolCall]:
    bad = ValueError(f'message {i} tool_calls: a list of {{"type": "function", "function": {{"name", "arguments"}}}} '
                     "with arguments the JSON text of an object")
    if not isinstance(calls, list):
        raise bad
    out = []
    for c in calls:
        f = c.get("function") if isinstance(c, Mapping) else None
        if not isinstance(f, Mapping) or c.get("type", "function") != "function" or not isinstance(f.get("name"), str):
            raise bad
        try:
            args = json.loads(f.get("arguments"))
        except (TypeError, json.JSONDecodeError):
            raise bad from None
        if not isinstance(args, Mapping):
            raise bad
        out.append(ToolCall(f["name"], json.dumps(args, ensure_ascii=False)))
    return out


def _offer_tools(messages: list[dict], tools: list[dict], arguments_key: str) -> list[dict]:
    """messages with the tools offered at the top of the first user message, in the words of the Hugging
    Face Llama 3.1 template (its `tools_in_user_message`)."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first is None:
        raise ValueError("tools: they are offered in the first user message, and there is none")
    offer = ("Given the following functions, please respond with a JSON for a function call with its proper "
             "arguments that best answers the given prompt.\n\n"
             f'Respond in the format {{"name": function name, "{arguments_key}": dictionary of argument name and its '
             "value}.Do not use variables.\n\n")
    offer += "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)
    messages = list(messages)
    messages[first] = {**messages[first], "content": offer + messages[first]["content"].strip()}
    return messages


def _call_text(call: ToolCall, arguments_key: str) -> str:
    """A call as the model writes it: {"name": ..., arguments_key: {...}}."""
    return json.dumps({"name": call.name, arguments_key: json.loads(call.arguments)}, ensure_ascii=False)


class Llama3ChatFormat:
    """Meta's Llama 3 chat format (the `ChatFormat` of Meta's reference `tokenizer.py`):

        <|begin_of_text|> then per message
        <|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>
        and, for the model to answer, <|start_header_id|>assistant<|end_header_id|>\\n\\n

    It adds no default system prompt, unlike the Hugging Face Llama 3.1 template. Tools follow
    Llama 3.1's JSON tool calling as that template renders it: the instructions and each function's
    JSON go at the top of the first user message; a call is {"name": ..., "parameters": {...}};
    a "tool" message (its result) is an `ipython` turn.
    """

    roles = ("system", "user", "assistant", "ipython", "tool")
    tool_arguments_key = "parameters"

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
        [message] = _check_messages([message], self.roles)
        return self._encode_checked(message)

    def _encode_checked(self, message: dict) -> list[int]:
        content = message["content"]
        if message.get("tool_calls"):
            content = "\n".join(_call_text(c, self.tool_arguments_key) for c in message["tool_calls"])
        header = self.encode_header("ipython" if message["role"] == "tool" else message["role"])
        return header + self.tokenizer.encode(content.strip()) + [self._eot]

    def encode_dialog(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                      tools: Sequence[Mapping] | None = None) -> list[int]:
        """Messages -> prompt ids, BOS included. With `add_generation_prompt`, ends with an open
        assistant header; with `tools`, the first user message offers them. Raises ValueError on an
        unknown role or non-string content."""
        messages = _check_messages(messages, self.roles)
        if tools:
            messages = _offer_tools(messages, check_tools(tools), self.tool_arguments_key)
        ids = [self._begin_of_text]
        for message in messages:
            ids += self._encode_checked(message)
        if add_generation_prompt:
            ids += self.encode_header("assistant")
        return ids

    def tool_call_schema(self, tools: Sequence[Mapping], name: str | None = None) -> dict:
        """The JSON schema of a call of function `name` (None: any of `tools`)."""
        return tool_call_schema(tools, name, self.tool_arguments_key)


def _environment():
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
    return env


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

    Tools: a template that takes `tools` gets them, and assistant `tool_calls` as transformers
    passes them ({"type": "function", "function": {"name", "arguments": {...}}}); these are template
    text, so special-token text in them is refused. A template that does not gets them offered in
    the first user message (see the module doc), and an assistant's calls as its text.

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
        import jinja2.meta

        self.tokenizer = tokenizer
        self.roles = tuple(roles)
        env = _environment()
        self._template = env.from_string(template)
        self.takes_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(template))
        self._kwargs = dict(template_kwargs)
        for name, value in (("bos_token", bos_token), ("eos_token", eos_token)):
            if value is not None:
                self._kwargs[name] = value
        self._special_ids = tokenizer.special_tokens
        # Longest first, so at one position the longest special wins (as in `tokenizers`).
        by_length = sorted(self._special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(s) for s in by_length))

    tool_arguments_key = "arguments"

    def tool_call_schema(self, tools: Sequence[Mapping], name: str | None = None) -> dict:
        """The JSON schema of a call of function `name` (None: any of `tools`)."""
        return tool_call_schema(tools, name, self.tool_arguments_key)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None) -> str:
        """The prompt as text, exactly as transformers' `apply_chat_template(tokenize=False)`."""
        return self._render(*self._template_input(messages, tools), add_generation_prompt)

    def _template_input(self, messages: Sequence[Message], tools) -> tuple[list[dict], list | None]:
        """Checked messages and tools, as the template takes them."""
        messages = _check_messages(messages, self.roles)
        tools = check_tools(tools) if tools else None
        if self.takes_tools:
            out = [{**m, "tool_calls": [{"type": "function", "function": {"name": c.name, "arguments": json.loads(
                c.arguments)}} for c in m["tool_calls"]]} if "tool_calls" in m else m for m in messages]
            for what, value in [("tools", tools)] + [(f"message {i}", {k: v for k, v in m.items() if k != "content"})
                                                     for i, m in enumerate(out)]:
                if self._special_re.search(json.dumps(value, ensure_ascii=False)):
                    raise ValueError(f"{what}: special-token text in what the template writes as it is")
            return out, tools
        out = []
        for m in messages:  # only roles and contents reach this template
            calls = "\n".join(_call_text(c, self.tool_arguments_key) for c in m.get("tool_calls", ()))
            out.append({"role": m["role"], "content": "\n".join(t for t in (m["content"], calls) if t)})
        return (_offer_tools(out, tools, self.tool_arguments_key) if tools else out), None

    def _render(self, messages: list[dict], tools: list | None, add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=messages,
            tools=tools,
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

    def encode_dialog(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                      tools: Sequence[Mapping] | None = None) -> list[int]:
        """Messages -> prompt ids (BOS only if the template writes one); `tools` offered as the class
        doc says. Raises ValueError on an unknown role, non-string content, or (see class doc)
        unsafe content."""
        messages, tools = self._template_input(messages, tools)
        real = self._render(messages, tools, add_generation_prompt)
        contents = [m["content"] for m in messages]
        nonce = secrets.token_hex(8)
        sentinels = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
        marked = self._render([{**m, "content": s} for m, s in zip(messages, sentinels)], tools, add_generation_prompt)
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
