"""An OpenAI-compatible HTTP server: `create_app(llama)` is an ASGI app (FastAPI) over an `EngineThread`.

Endpoints: POST /v1/chat/completions and /v1/completions (streaming as server-sent events, ending
with `data: [DONE]`), GET /v1/models, /health and /metrics (Prometheus text). This file holds only
the protocol: the pydantic request models, the response and chunk formats, errors as OpenAI's
`{"error": {"message", "type", "param", "code"}}` bodies. Generation, batching and the request
checks are the engine's (llama_jax/engine.py, the one `Llama.generate` runs too).

Run it with `llama-jax serve`, or `uvicorn.run(create_app(llama_jax.load(path)))`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from llama_jax.engine import Engine, EngineThread, NotRunning, Output, QueueFull, Request

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


class ChatMessage(_Model):
    role: str
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


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
    logprobs: bool | int | None = None
    return_token_ids: bool = False

    def check_supported(self) -> None:
        if self.n != 1:
            raise _BadRequest("n: only n=1 is supported", "n")
        if self.logprobs:
            raise _BadRequest("logprobs: not supported", "logprobs")


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise _BadRequest("tools: not supported", "tools")
        if not self.messages:
            raise _BadRequest("messages: must be a non-empty list", "messages")


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name, bad in (("echo", self.echo), ("best_of", self.best_of not in (None, 1)), ("suffix", self.suffix)):
            if bad:
                raise _BadRequest(f"{name}: not supported", name)

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
           code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "error"), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# The engine's checks speak Llama.generate's names; a client knows OpenAI's.
_PARAMS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "stop": "stop",
           "stop_token_ids": "stop", "message": "messages"}


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
    carry `Authorization: Bearer <api_key>` (else 401); /health stays open. model_name: the id /v1/models lists and
    responses carry (requests may name any model: there is one)."""
    if api_key is not None and not api_key:
        raise ValueError("api_key: must not be empty")
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

    def failed(http: HTTPRequest, status: int, message: str, param: str | None = None, *,
               retry: bool = False, code: str | None = None) -> JSONResponse:
        """An error response (the log line of a request that did not run); `retry` adds Retry-After."""
        http_errors[status] = http_errors.get(status, 0) + 1
        log.info("%s %d %s", http.url.path, status, message)
        return _error(status, message, param, {"Retry-After": str(RETRY_AFTER_S)} if retry else None, code)

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
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llama-jax", "max_model_len": sched.max_seq_len}]}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(_prometheus(sched, http_errors), media_type="text/plain; version=0.0.4")

    async def generate(http: HTTPRequest, body: _Generation, prompt, *, chat: bool):
        """The shared path: check, submit, then stream chunks or gather one response."""
        prompt_field = "messages" if chat else "prompt"
        max_tokens_field = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if chat and body.max_completion_tokens is not None else body.max_tokens
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stop_ids = [s for s in stop if isinstance(s, int)] + list(body.stop_token_ids or [])
        try:
            body.check_supported()
            if chat:
                prompt = llama.chat_prompt(prompt)
            request = sched.make_request(
                prompt, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                top_k=None if body.top_k in (0, -1) else body.top_k,  # vLLM's "off"
                seed=secrets.randbits(32) if body.seed is None else body.seed,
                stop_token_ids=stop_ids, stop=[s for s in stop if isinstance(s, str)], ignore_eos=body.ignore_eos)
        except _BadRequest as e:
            return failed(http, 400, str(e), e.param)
        except ValueError as e:
            e = _from_check(e, prompt_field, max_tokens_field)
            return failed(http, 400, str(e), e.param)
        try:
            job = _Job(sched, request)
        except QueueFull as e:
            return failed(http, 429, f"server busy: {e}; retry later", retry=True)
        except NotRunning as e:
            return failed(http, 503, str(e), retry=True)
        fmt = _Format(chat, model_name, request, body)
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
    """OpenAI's response and chunk bodies, for chat ("chat.completion") or text ("text_completion")."""

    def __init__(self, chat: bool, model: str, request: Request, body: _Generation):
        self.chat, self.model, self.request, self.token_ids = chat, model, request, body.return_token_ids
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, last: Output) -> dict:
        return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                "total_tokens": last.prompt_tokens + last.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": last.cached_tokens}}

    def response(self, outs: list[Output]) -> dict:
        text = "".join(o.text for o in outs)
        last = outs[-1]
        choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = self._base("chat.completion" if self.chat else "text_completion")
        if self.token_ids:
            choice["token_ids"] = [t for o in outs for t in o.token_ids]
            body["prompt_token_ids"] = list(self.request.prompt)
        return {**body, "choices": [choice], "usage": self.usage(last)}

    def chunk(self, text: str | None, token_ids=(), finish_reason=None, *, role=False, usage=None,
              choices=True) -> str:
        body = self._base("chat.completion.chunk" if self.chat else "text_completion")
        if choices:
            choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
            if self.chat:
                choice["delta"] = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
            else:
                choice["text"] = text or ""
            if self.token_ids:
                choice["token_ids"] = list(token_ids)
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
    last chunk with no choices (OpenAI's format); otherwise in the chunk with the finish_reason."""
    last = None
    try:
        if fmt.chat:
            yield fmt.chunk("", role=True)
        async for out in job.outputs(http):
            if out.finish_reason is not None:
                last = out
                break
            if out.text or (fmt.token_ids and out.token_ids):
                yield fmt.chunk(out.text, out.token_ids)
        if last is None:  # the client left
            return
        if last.finish_reason in ("error", "cancelled"):
            err = {"message": last.error or "generation stopped: the server is shutting down",
                   "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': err})}\n\n"
        else:
            if last.text or (fmt.token_ids and last.token_ids):
                yield fmt.chunk(last.text, last.token_ids)
            usage = fmt.usage(last)
            yield fmt.chunk(None if fmt.chat else "", finish_reason=last.finish_reason,
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
