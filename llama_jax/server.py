"""An OpenAI-compatible HTTP server: `create_app(llama)` is an ASGI app (FastAPI) over an `EngineThread`.

Endpoints: POST /v1/chat/completions and /v1/completions (streaming as server-sent events, ending
with `data: [DONE]`), GET /v1/models, /health and /metrics (Prometheus text). This file holds only
the protocol: the pydantic request models, the response and chunk formats, errors as OpenAI's
`{"error": {"message", "type", "param", "code"}}` bodies. Generation, batching and the request
checks are the engine's (llama_jax/engine.py, the one `Llama.generate` runs too); structured
output its grammars' (llama_jax/structured.py); tools the chat format's (llama_jax/chat.py: how
they are offered, the schema of a call, reading calls back).

- `response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name",
  "schema", "strict"}}: decoding held to the schema (any object for json_object), on both endpoints.
- `tools` and `tool_choice`: "none" (tools not offered), "auto" (offered; an answer that begins a
  call is held to a call's schema, any other is text), "required" or {"type": "function",
  "function": {"name"}} (held to a call of any, or of that, function). Calls come back as
  `tool_calls` with finish_reason "tool_calls"; streamed, the text that may be a call is held back
  until it is known, and a call goes out as two tool_calls deltas (its name, then its arguments).
- `logprobs`: chat's `logprobs: true` and `top_logprobs` (0 to 20), completions' `logprobs: n`,
  in OpenAI's shapes, from the distribution each token was drawn from.

Run it with `llama-jax serve`, or `uvicorn.run(create_app(llama_jax.load(path)))`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Callable, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from llama_jax import chat as chat_lib
from llama_jax.engine import Engine, EngineThread, NotRunning, Output, QueueFull, Request
from llama_jax.sampling import TOP_LOGPROBS
from llama_jax.structured import JSON_OBJECT_SCHEMA

log = logging.getLogger("llama_jax.server")

RETRY_AFTER_S = 1  # what a client told 429/503 waits before trying again


# --- Requests ------------------------------------------------------------------------------------


class _Model(BaseModel):
    # strict: "5" is not a number and 1 is not a string; fields we do not know are ignored, as
    # OpenAI's clients send some (user, frequency_penalty, ...) that change nothing here.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class FunctionCall(_Model):
    name: str
    arguments: str  # JSON text


class ToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: str
    content: str | list[TextPart] | None = None  # None: an assistant's message of tool calls
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None  # a tool message's: the call it answers

    def as_dict(self) -> dict:
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        out = {"role": self.role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(_Model):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: FunctionName


class JSONSchema(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the schema is followed either way


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None

    def answer_schema(self) -> str | dict | None:
        """The JSON schema an answer follows (None: free text)."""
        if self.type == "json_schema":
            if self.json_schema is None:
                raise _BadRequest('response_format: type "json_schema" needs a json_schema', "response_format")
            return self.json_schema.schema_
        return JSON_OBJECT_SCHEMA if self.type == "json_object" else None


class StreamOptions(_Model):
    include_usage: bool = False


class _Generation(_Model):
    """The fields both endpoints share. Extensions (vLLM's): top_k, stop token ids (in `stop` or
    `stop_token_ids`), ignore_eos (run to max_tokens), return_token_ids (each choice gets its
    `token_ids`)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0  # OpenAI's default; 0 is greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str | int] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    response_format: ResponseFormat | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise _BadRequest("n: only n=1 is supported", "n")


def _check_top_logprobs(n: int | None, field: str) -> None:
    if n is not None and not 0 <= n <= TOP_LOGPROBS:
        raise _BadRequest(f"{field}: must be in [0, {TOP_LOGPROBS}], got {n}", field)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # a call's answer holds what the model writes: one or several
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise _BadRequest("messages: must be a non-empty list", "messages")
        if self.tool_choice is not None and not self.tools:
            raise _BadRequest("tool_choice: only allowed when tools are given", "tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise _BadRequest("top_logprobs: needs logprobs: true", "top_logprobs")
        _check_top_logprobs(self.top_logprobs, "top_logprobs")

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_mode(self) -> str:
        """"none", "auto", "required", or the function's name that tool_choice names."""
        if not self.tools:
            return "none"
        choice = self.tool_choice or "auto"
        return choice if isinstance(choice, str) else choice.function.name


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name, bad in (("echo", self.echo), ("best_of", self.best_of not in (None, 1)), ("suffix", self.suffix)):
            if bad:
                raise _BadRequest(f"{name}: not supported", name)
        _check_top_logprobs(self.logprobs, "logprobs")

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise _BadRequest("prompt: one prompt per request", "prompt")
            p = p[0]
        return p


# --- Errors ----------------------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
                405: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None,
           code: str | None = None, kind: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind or _ERROR_TYPES.get(status, "error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# The engine's checks speak Llama.generate's names; a client knows OpenAI's.
_PARAMS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "stop": "stop",
           "stop_token_ids": "stop", "message": "messages", "tools": "tools", "logprobs": "logprobs"}


def _from_check(e: ValueError, prompt_field: str, max_tokens_field: str) -> _BadRequest:
    """A request check's ValueError as a 400: OpenAI's field names in the message and `param`."""
    msg = str(e).splitlines()[0]
    for prefix in ("prompts[0]: ", "prompt: "):
        if msg.startswith(prefix):
            msg = f"{prompt_field}: {msg[len(prefix):]}"
    if "max_new_tokens" in msg:
        return _BadRequest(msg.replace("max_new_tokens", max_tokens_field), max_tokens_field)
    return _BadRequest(msg, _PARAMS.get(msg.split()[0].rstrip(":"), prompt_field))


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "TextPart"}


def _where(loc) -> str:
    """A pydantic error location as the client wrote it: ("stop", "list[str]", 0) -> "stop.0"
    (a union names the member it tried)."""
    return ".".join(str(x) for x in loc if isinstance(x, int) or not ("[" in x or x in _TYPE_TAGS)) or "body"


# --- The app ---------------------------------------------------------------------------------------


def create_app(llama, *, engine: EngineThread | None = None, model_name: str = "llama-jax", max_queue: int = 64,
               api_key: str | None = None, **options) -> FastAPI:
    """An ASGI app serving `llama` (a `Llama`) with OpenAI's HTTP API.

    options: the Engine's (max_batch, max_seq_len, kv_cache_tokens, block_size, prefill_chunk,
    decode_steps, prefix_caching); max_queue: requests waiting beyond the running ones before 429.
    Without `engine` the app makes one, starts it now and stops it when the app shuts down; with
    one, the caller starts and stops it. api_key: when given, every /v1 and /metrics request must
    carry `Authorization: Bearer <api_key>` (else 401); /health stays open. model_name: the base model's id,
    which /v1/models lists and responses carry. With LoRA adapters (`load(adapters=...)`), /v1/models lists
    each too, a request whose `model` is an adapter's name runs with it (in the same batches as the
    others), and any other name but the base's is a 404; without adapters a request may name any model."""
    if api_key is not None and not api_key:
        raise ValueError("api_key: must not be empty")
    adapters = tuple(llama.adapter_names)
    if model_name in adapters:
        raise ValueError(f"model_name: {model_name!r} is also an adapter's name")
    own = engine is None
    if not own and options:
        raise TypeError(f"create_app: {sorted(options)} are options of a new engine, not of the one given")
    sched = EngineThread(Engine(llama, **options), max_queue=max_queue) if own else engine
    if own:
        sched.start()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if own:
            sched.stop()

    app = FastAPI(title="llama-jax", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = sched
    http_errors: dict[int, int] = {}  # responses with an error status, for /metrics
    created = int(time.time())
    # Each token's bytes, for logprobs' texts: read from the tokenizer at the first request that asks.
    vocab = functools.cache(lambda: None if llama.tokenizer is None else llama.tokenizer.token_bytes())

    def failed(http: HTTPRequest, status: int, message: str, param: str | None = None, *,
               retry: bool = False, code: str | None = None, kind: str | None = None) -> JSONResponse:
        """An error response (the log line of a request that did not run); `retry` adds Retry-After."""
        http_errors[status] = http_errors.get(status, 0) + 1
        log.info("%s %d %s", http.url.path, status, message)
        return _error(status, message, param, {"Retry-After": str(RETRY_AFTER_S)} if retry else None, code, kind)

    if api_key is not None:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def _authorize(http: HTTPRequest, call_next):
            if http.url.path.startswith(("/v1", "/metrics")):
                # Compared in constant time: the key cannot be found by timing the answers.
                if not hmac.compare_digest(http.headers.get("authorization", "").encode(), expected):
                    return failed(http, 401, "invalid API key: send the header 'Authorization: Bearer <key>'",
                                  code="invalid_api_key")
            return await call_next(http)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = first.get("loc", ())[1:]  # after "body"
        if first.get("type") == "json_invalid":
            return failed(request, 400, f"invalid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
        return failed(request, 400, f"{_where(loc)}: {first.get('msg', 'invalid value')}",
                      str(loc[0]) if loc else None)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return failed(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):  # the server stays up; the client learns it was us
        log.exception("request failed")
        return failed(request, 500, f"internal error: {type(exc).__name__}")

    @app.get("/health")
    def health(http: HTTPRequest):
        if not sched.running:
            return failed(http, 503, sched.error or "the engine is not running", retry=True)
        return {"status": "ok", **sched.load()}

    @app.get("/v1/models")
    def models():
        card = {"object": "model", "created": created, "owned_by": "llama-jax", "max_model_len": sched.max_seq_len}
        return {"object": "list", "data": [{"id": model_name, **card, "root": model_name, "parent": None}]
                + [{"id": name, **card, "root": name, "parent": model_name} for name in adapters]}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(_prometheus(sched, http_errors), media_type="text/plain; version=0.0.4")

    def structure(body: _Generation, chat: bool) -> tuple[str | dict | None, bool, str | None, list[dict] | None]:
        """What constrains the answer: (JSON schema, or text too, the field it comes from, the tools
        offered)."""
        schema = None if body.response_format is None else body.response_format.answer_schema()
        mode = body.tool_mode() if chat else "none"
        if mode == "none":
            return schema, False, "response_format", None
        if schema is not None:
            raise _BadRequest('response_format: not supported with tools unless tool_choice is "none"',
                              "response_format")
        if llama.chat_format is None:
            raise _BadRequest("messages: this model has no chat format (no tokenizer or chat template)", "messages")
        try:
            tools = chat_lib.check_tools([t.model_dump(exclude_none=True) for t in body.tools])
            name = None if mode in ("auto", "required") else mode
            schema = llama.chat_format.tool_call_schema(tools, name)
        except ValueError as e:
            raise _BadRequest(str(e), str(e).split(":")[0].split("[")[0]) from None
        return schema, mode == "auto", "tools", tools

    async def generate(http: HTTPRequest, body: _Generation, prompt, *, chat: bool):
        """The shared path: check, submit, then stream chunks or gather one response."""
        prompt_field = "messages" if chat else "prompt"
        max_tokens_field = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if chat and body.max_completion_tokens is not None else body.max_tokens
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stop_ids = [s for s in stop if isinstance(s, int)] + list(body.stop_token_ids or [])
        tools = None
        name, adapter = model_name, None
        if body.model in adapters:
            name, adapter = body.model, body.model
        elif adapters and body.model is not None and body.model != model_name:
            return failed(http, 404, f"The model `{body.model}` does not exist (served: "
                          f"{', '.join((model_name, *adapters))})", "model", code="model_not_found",
                          kind="invalid_request_error")
        try:
            body.check_supported()
            schema, or_text, schema_field, tools = structure(body, chat)
            if schema is not None and body.ignore_eos:
                raise _BadRequest(f"ignore_eos: not supported with {schema_field}: a constrained answer ends with "
                                  "the model's eos", "ignore_eos")
            if chat:
                if llama.chat_format is None:
                    raise ValueError("this model has no chat format (no tokenizer or chat template)")
                prompt = llama.chat_format.encode_dialog(prompt, add_generation_prompt=True, tools=tools)
            kwargs = dict(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=None if body.top_k in (0, -1) else body.top_k,  # vLLM's "off"
                          seed=secrets.randbits(32) if body.seed is None else body.seed,
                          stop_token_ids=stop_ids, stop=[s for s in stop if isinstance(s, str)],
                          ignore_eos=body.ignore_eos, json_schema=schema, json_or_text=or_text,
                          logprobs=body.top_logprobs_asked(), **({} if adapter is None else {"adapter": adapter}))
            # A new schema compiles its grammar here: off the event loop.
            request = await asyncio.to_thread(sched.make_request, prompt, **kwargs)
        except _BadRequest as e:
            return failed(http, 400, str(e), e.param)
        except ValueError as e:
            if str(e).startswith("json_schema:"):
                return failed(http, 400, f"{schema_field}: {str(e).removeprefix('json_schema: ')}", schema_field)
            e = _from_check(e, prompt_field, max_tokens_field)
            return failed(http, 400, str(e), e.param)
        try:
            job = _Job(sched, request)
        except QueueFull as e:
            return failed(http, 429, f"server busy: {e}; retry later", retry=True)
        except NotRunning as e:
            return failed(http, 503, str(e), retry=True)
        fmt = _Format(chat, name, request, body, tools, vocab)
        path = http.url.path
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(http, job, fmt, include_usage, path), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        outs = []
        try:
            async for out in job.outputs(http):
                outs.append(out)
        finally:
            job.handle.cancel()  # a no-op once finished; frees the slot if the client left
        if not outs or outs[-1].finish_reason is None:  # the client left
            return failed(http, 499, "client disconnected")
        last = outs[-1]
        _log(path, job, last)
        if last.finish_reason == "error":
            return failed(http, 500, last.error or "generation failed")
        if last.finish_reason == "cancelled":
            return failed(http, 503, "the server is shutting down", retry=True)
        return fmt.response(outs)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest, body: ChatCompletionRequest):
        return await generate(http, body, [m.as_dict() for m in body.messages], chat=True)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest, body: CompletionRequest):
        try:
            prompt = body.single_prompt()
        except _BadRequest as e:
            return failed(http, 400, str(e), e.param)
        return await generate(http, body, prompt, chat=False)

    return app


class _Job:
    """A submitted request seen from the event loop: the engine's thread puts its Outputs on an
    asyncio queue."""

    def __init__(self, sched: EngineThread, request: Request):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.started = time.perf_counter()

        def put(out: Output):
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, out)
            except RuntimeError:  # the loop is closed: nobody listens any more
                self.handle.cancel()

        self.handle = sched.submit(request, put)

    async def outputs(self, http: HTTPRequest) -> AsyncIterator[Output]:
        """Outputs until the last; stops early when the client disconnects."""
        while True:
            try:
                out = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return
                continue
            yield out
            if out.finish_reason is not None:
                return


class _Format:
    """OpenAI's response and chunk bodies, for chat ("chat.completion") or text ("text_completion");
    `tools`: the tools offered (a chat answer may be calls); `vocab`: each token's bytes (None
    without a tokenizer), for logprobs."""

    def __init__(self, chat: bool, model: str, request: Request, body: _Generation, tools: list[dict] | None,
                 vocab: Callable[[], list[bytes] | None]):
        self.chat, self.model, self.request, self.token_ids = chat, model, request, body.return_token_ids
        self.tools, self.vocab = tools, vocab
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text_offset = 0  # completions' logprobs: characters of the answer before the next token

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, last: Output) -> dict:
        return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                "total_tokens": last.prompt_tokens + last.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": last.cached_tokens}}

    def tool_calls(self, text: str, finish_reason: str | None, *, stream: bool = False) -> list[dict] | None:
        """The calls an answer makes (stream: as the two deltas of each), or None."""
        if not self.tools or finish_reason != "stop":
            return None
        calls = chat_lib.parse_tool_calls(text, self.tools)
        if calls is None:
            return None
        out = []
        for i, c in enumerate(calls):
            head = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function"}
            if stream:  # the name first, the arguments after, as OpenAI streams them
                out += [{"index": i, **head, "function": {"name": c.name, "arguments": ""}},
                        {"index": i, "function": {"arguments": c.arguments}}]
            else:
                out.append({**head, "function": {"name": c.name, "arguments": c.arguments}})
        return out

    def logprobs(self, outs: list[Output]) -> dict | None:
        """The logprobs of the tokens of `outs` (their text's: stop ids left out) in OpenAI's shape."""
        if self.request.params.logprobs is None:
            return None
        stops = self.request.params.stop_token_ids
        pairs = [(t, lp) for o in outs for t, lp in zip(o.token_ids, o.logprobs or ()) if t not in stops]
        vocab = self.vocab()
        text = lambda i: vocab[i].decode("utf-8", errors="replace") if vocab else str(i)  # noqa: E731
        if self.chat:
            def entry(i: int, logprob: float) -> dict:
                return {"token": text(i), "logprob": logprob, "bytes": list(vocab[i]) if vocab else None}

            return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                                for t, lp in pairs], "refusal": None}
        offsets = []
        for t, _ in pairs:
            offsets.append(self.text_offset)
            self.text_offset += len(text(t))
        return {"tokens": [text(t) for t, _ in pairs], "token_logprobs": [lp.logprob for _, lp in pairs],
                "top_logprobs": [{text(i): v for i, v in lp.top} for _, lp in pairs], "text_offset": offsets}

    def response(self, outs: list[Output]) -> dict:
        text = "".join(o.text for o in outs)
        last = outs[-1]
        choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": self.logprobs(outs)}
        if self.chat:
            calls = self.tool_calls(text, last.finish_reason)
            if calls:
                choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
                choice["finish_reason"] = "tool_calls"
            else:
                choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = self._base("chat.completion" if self.chat else "text_completion")
        if self.token_ids:
            choice["token_ids"] = [t for o in outs for t in o.token_ids]
            body["prompt_token_ids"] = list(self.request.prompt)
        return {**body, "choices": [choice], "usage": self.usage(last)}

    def chunk(self, text: str | None, outs: list[Output] = (), finish_reason=None, *, role=False, usage=None,
              choices=True, tool_calls: list[dict] | None = None) -> str:
        """A chunk of `text` (None: no content) and the token ids and logprobs of `outs`."""
        body = self._base("chat.completion.chunk" if self.chat else "text_completion")
        if choices:
            choice = {"index": 0, "finish_reason": finish_reason,
                      "logprobs": self.logprobs(outs) if outs else None}
            if self.chat:
                choice["delta"] = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
                if tool_calls:
                    choice["delta"]["tool_calls"] = tool_calls
            else:
                choice["text"] = text or ""
            if self.token_ids:
                choice["token_ids"] = [t for o in outs for t in o.token_ids]
            body["choices"] = [choice]
        else:
            body["choices"] = []
        if role and self.token_ids:
            body["prompt_token_ids"] = list(self.request.prompt)
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"


async def _sse(http: HTTPRequest, job: _Job, fmt: _Format, include_usage: bool, path: str) -> AsyncIterator[str]:
    """The chunks of a streamed response. With stream_options.include_usage the usage comes in a
    last chunk with no choices (OpenAI's format); otherwise in the chunk with the finish_reason.
    When tools were offered, text that may be a call waits (with its tokens) until it is known:
    a call goes out as tool_calls deltas, anything else as content."""
    last = None
    held: list[Output] = []  # what may be a call
    holding = fmt.chat and fmt.tools is not None
    try:
        if fmt.chat:
            yield fmt.chunk("", role=True)
        async for out in job.outputs(http):
            if out.finish_reason is not None:
                last = out
                break
            if holding:
                held.append(out)
                text = "".join(o.text for o in held)
                if not text or chat_lib.may_be_tool_call(text):
                    continue
                holding = False
                yield fmt.chunk(text, held)
                held = []
            elif out.text or ((fmt.token_ids or out.logprobs) and out.token_ids):
                yield fmt.chunk(out.text, [out])
        if last is None:  # the client left
            return
        if last.finish_reason in ("error", "cancelled"):
            err = {"message": last.error or "generation stopped: the server is shutting down",
                   "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': err})}\n\n"
        else:
            outs = held + [last]
            text = "".join(o.text for o in outs)
            calls = fmt.tool_calls(text, last.finish_reason, stream=True) if holding else None
            finish_reason = last.finish_reason
            if calls:
                yield fmt.chunk(None, outs, tool_calls=calls[:1])
                for call in calls[1:]:
                    yield fmt.chunk(None, tool_calls=[call])
                finish_reason = "tool_calls"
            elif text or ((fmt.token_ids or last.logprobs) and any(o.token_ids for o in outs)):
                yield fmt.chunk(text, outs)
            usage = fmt.usage(last)
            yield fmt.chunk(None if fmt.chat else "", finish_reason=finish_reason,
                            usage=None if include_usage else usage)
            if include_usage:
                yield fmt.chunk(None, usage=usage, choices=False)
        yield "data: [DONE]\n\n"
    finally:
        # A disconnected client lands here too (the stream is cancelled): free its slot now.
        job.handle.cancel()
        if last is not None:
            _log(path, job, last)
        else:
            log.info("%s cancelled: client disconnected after %.2fs", path, time.perf_counter() - job.started)


def _log(path: str, job: _Job, last: Output) -> None:
    """One line per finished request."""
    total = time.perf_counter() - job.started
    ttft = last.time_to_first_token_s
    rate = ""
    if ttft is not None and last.completion_tokens > 1 and total > ttft:
        rate = f" {(last.completion_tokens - 1) / (total - ttft):.1f} tok/s"
    log.info("%s %s prompt=%d completion=%d ttft=%s total=%.3fs%s", path, last.finish_reason, last.prompt_tokens,
             last.completion_tokens, "-" if ttft is None else f"{ttft:.3f}s", total, rate)


def _prometheus(sched: EngineThread, http_errors: dict[int, int]) -> str:
    """The engine's counters, gauges and histograms in Prometheus' text format."""
    st, load = sched.stats(), sched.load()
    lines = []

    def metric(name, kind, help_, samples):
        lines.extend([f"# HELP llama_jax_{name} {help_}", f"# TYPE llama_jax_{name} {kind}"])
        for labels, value in samples:
            lines.append(f"llama_jax_{name}{labels} {value}")

    metric("requests_total", "counter", "Finished requests, by finish reason.",
           [(f'{{finish_reason="{r}"}}', n) for r, n in sorted(st.requests.items())] or [("", 0)])
    metric("requests_rejected_total", "counter", "Requests refused because the queue was full (429).",
           [("", st.rejected)])
    metric("http_errors_total", "counter", "Error responses, by status.",
           [(f'{{status="{s}"}}', n) for s, n in sorted(http_errors.items())] or [("", 0)])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", st.prompt_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", st.generation_tokens)])
    metric("queue_depth", "gauge", "Requests waiting to start.", [("", load["waiting"])])
    metric("requests_running", "gauge", "Requests prefilling or decoding.", [("", load["running"])])
    metric("max_batch", "gauge", "The most requests running together.", [("", load["max_batch"])])
    metric("kv_blocks_used", "gauge", "KV cache blocks held by running requests.", [("", load["kv_blocks_used"])])
    metric("kv_blocks_total", "gauge", "KV cache blocks in the pool.", [("", load["kv_blocks_total"])])
    metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix cache.",
           [("", st.prefix_cache_hit_tokens)])
    metric("preemptions_total", "counter", "Running requests that gave back their KV blocks, to be recomputed.",
           [("", st.preemptions)])
    metric("spec_proposed_tokens_total", "counter", "Speculative decoding: proposed tokens verified.",
           [("", st.spec_proposed_tokens)])
    metric("spec_accepted_tokens_total", "counter", "Speculative decoding: proposed tokens kept.",
           [("", st.spec_accepted_tokens)])
    for name, h, help_ in (("time_to_first_token_seconds", st.time_to_first_token_s,
                            "From arrival to the first token."),
                           ("decode_tokens_per_second", st.decode_tokens_per_s,
                            "Tokens per second of each request after its first.")):
        buckets = [(f'_bucket{{le="{b}"}}', c) for b, c in zip((*h.bounds, "+Inf"), h.cumulative())]
        metric(name, "histogram", help_, buckets + [("_sum", round(h.sum, 6)), ("_count", h.count)])
    return "\n".join(lines) + "\n"
