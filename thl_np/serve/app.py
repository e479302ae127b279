"""The HTTP side of ``thl-np serve``: an ASGI app (starlette) speaking the OpenAI API, plus sessions.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``,
``GET /v1/sessions`` (ids), ``GET/PUT/DELETE /v1/sessions/{id}`` (export, import, delete a session file).
Errors are OpenAI-style JSON objects (``{"error": {"message", "type", "param", "code"}}``) with 400 for a bad
field, 401 for a missing or wrong API key, 404 for an unknown route, model or session, 409 for a session
that is busy, 413 for a body too large, 429 when the queue is full, 503 while the model loads or the
server shuts down. The model loads in the background at start-up, so /health answers at once.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import InputError, StateError
from .engine import EngineClosed, Job, QueueFull, Request
from .sessions import check_session_id
from .text import CHAT_STOP, ROLES, chat_prompt


@dataclass
class Limits:
    max_body: int = 1 << 20           # bytes of a JSON request body
    max_prompt: int = 100_000         # tokens (bytes) of a prompt
    max_tokens: int = 4096            # the largest max_tokens a request may ask for
    default_max_tokens: int = 16      # OpenAI's default for completions
    stream_interval: float = 0.005    # seconds between two text chunks of a stream, at least (0: no wait)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "server_error")


def error_response(status: int, message: str, param=None, kind=None) -> JSONResponse:
    err = APIError(status, message, param, kind)
    return JSONResponse({"error": {"message": message, "type": err.kind, "param": param, "code": None}},
                        status_code=status)


class Server:
    """What the routes share: the model (once loaded), the engine, the limits and the API key."""

    def __init__(self, load, model_id: str, limits: Limits | None = None, api_key: str | None = None,
                 announce=None):
        self._load = load                 # () -> (model, tokenizer, engine); runs on a background thread
        self._announce = announce or (lambda line: None)  # one line when loaded, or why not
        self.model_id = model_id
        self.limits = limits or Limits()
        self.api_key = api_key
        self.model = self.tokenizer = self.engine = None
        self.load_error = None
        self.started = time.time()
        self._loader = None

    def start_loading(self) -> None:
        def run():
            try:
                self.model, self.tokenizer, self.engine = self._load()
            except Exception as exc:  # reported by /health and every route, as one line
                self.load_error = f"{type(exc).__name__}: {exc}"
                self._announce(f"the model failed to load: {exc} (every request gets 503)")
            else:
                self._announce("ready")
        self._loader = threading.Thread(target=run, name="thl-np-load", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.engine is not None

    def shutdown(self) -> None:
        if self._loader is not None:
            self._loader.join()
        if self.engine is not None:
            self.engine.close()

    def ready(self):
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}")
        if self.engine is None:
            raise APIError(503, "the model is loading: retry in a few seconds")
        return self.engine


# ---------------------------------------------------------------------------------------------- fields
def _field(body: dict, name: str, kind, default=None, lo=None, hi=None, allow_none=True):
    value = body.get(name, default)
    if value is None:
        if allow_none:
            return default
        raise APIError(400, f"'{name}' is required", name)
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        raise APIError(400, f"'{name}' must be {names.get(kind, kind)}, got {json.dumps(value)[:40]}", name)
    if kind is float and not np.isfinite(value):
        raise APIError(400, f"'{name}' must be finite", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise APIError(400, f"'{name}' = {value} is outside [{lo}, {hi}]", name)
    return value


def _sampling(body: dict, limits: Limits, default_stop=()) -> dict:
    n = _field(body, "n", int, 1)
    if n != 1:
        raise APIError(400, "'n' must be 1: this server returns one choice per request", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _field({name: max_tokens}, name, int, limits.default_max_tokens, 1, limits.max_tokens)
    top_p = _field(body, "top_p", float, None, 0.0, 1.0)
    if top_p is not None and top_p <= 0:
        raise APIError(400, "'top_p' must be in (0, 1]", "top_p")
    stop = body.get("stop")
    if stop is None:
        stop = list(default_stop)
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    seed = _field(body, "seed", int, None, 0, 2**63 - 1)
    session = body.get("session")
    if session is not None:
        try:
            check_session_id(session)
        except InputError as exc:
            raise APIError(400, str(exc), "session") from None
    return dict(max_tokens=max_tokens, temperature=_field(body, "temperature", float, 1.0, 0.0, 2.0),
                top_k=_field(body, "top_k", int, None, 1, None), top_p=top_p, stop=stop, seed=seed,
                session=session)


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _field(body, "stream", bool, False)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    return stream, bool(opts.get("include_usage", False))


def _prompt_text(body: dict) -> str:
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string (one prompt per request)", "prompt")
    return prompt


def _messages(body: dict) -> list[tuple[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", "messages")
        out.append((role, content))
    return out


# ---------------------------------------------------------------------------------------------- routes
async def _read_body(request: HTTPRequest, limit: int, what: str = "the request body") -> bytes:
    """The body, refused with 413 once it is (or declares to be) over ``limit`` bytes: never read whole first."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"{what} is {int(declared):,} bytes, the limit is {limit:,}")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"{what} is over the limit of {limit:,} bytes")
    return bytes(data)


async def _read_json(request: HTTPRequest, limit: int) -> dict:
    data = await _read_body(request, limit)
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _check_model(server: Server, body: dict) -> None:
    model = body.get("model")
    if model is not None and model != server.model_id:
        raise APIError(404, f"the model '{model}' does not exist: this server serves '{server.model_id}'",
                       "model", "not_found_error")


def _encode(server: Server, text: str, has_session: bool) -> np.ndarray:
    ids = server.tokenizer.encode(text)
    if len(ids) > server.limits.max_prompt:
        raise APIError(400, f"the prompt is {len(ids):,} tokens, the limit is {server.limits.max_prompt:,}",
                       "prompt", "invalid_request_error")
    if len(ids) == 0 and not has_session:
        eos = server.tokenizer.eos_id
        if eos is None or eos >= server.model.config.vocab_size:
            raise APIError(400, "the prompt is empty and the model has no eos token to start from", "prompt")
        ids = np.array([eos], dtype=np.int64)  # a new document, as `thl-np generate ""`
    return ids


async def completions(request: HTTPRequest):
    return await _generate(request, chat=False)


async def chat_completions(request: HTTPRequest):
    return await _generate(request, chat=True)


async def _generate(request: HTTPRequest, chat: bool):
    server: Server = request.app.state.server
    engine = server.ready()
    body = await _read_json(request, server.limits.max_body)
    _check_model(server, body)
    params = _sampling(body, server.limits, default_stop=(CHAT_STOP,) if chat else ())
    stream, include_usage = _stream_flags(body)
    sid = params["session"]
    if chat:
        header, text = chat_prompt(_messages(body), continued=sid is not None)
        ids = _encode(server, text, sid is not None)
        points = (len(server.tokenizer.encode(header)),) if header else ()
    else:
        ids = _encode(server, _prompt_text(body), sid is not None)
        points = ()
    events: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    relay = getattr(request.app.state, "relay", None)
    if relay is None or relay.loop is not loop:
        relay = request.app.state.relay = _Relay(loop)

    def emit(kind, payload):  # on the worker thread
        if not relay.post(events, (kind, payload)):  # the event loop has closed (shutdown): nobody listens
            job.cancel()

    job = Job(Request(prompt_ids=ids, cache_points=points, **params), emit)
    try:
        engine.submit(job)
    except QueueFull as exc:
        raise APIError(429, str(exc)) from None
    except EngineClosed as exc:
        raise APIError(503, str(exc)) from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    shape = _Shape(rid, created, server.model_id, chat)
    if stream:
        return StreamingResponse(_sse(job, events, shape, include_usage, server.limits.stream_interval),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    pieces, getter = [], None
    try:
        while True:
            # one pending get, never cancelled on a timeout (a cancelled get could lose the event it took)
            getter = getter or asyncio.ensure_future(events.get())
            finished, _ = await asyncio.wait({getter}, timeout=0.5)
            if not finished:
                if await request.is_disconnected():
                    job.cancel()  # the worker drops the row at its next step
                    return Response(status_code=499)
                continue
            kind, payload = getter.result()
            getter = None
            if kind == "text":
                pieces.append(payload)
            else:
                break
    except asyncio.CancelledError:
        job.cancel()
        raise
    finally:
        if getter is not None:
            getter.cancel()
    if kind == "error":
        raise _engine_error(payload)
    if kind == "cancelled":
        raise APIError(503, "the request was cancelled: the server is shutting down")
    return JSONResponse(shape.whole("".join(pieces), payload))


class _Relay:
    """Hands the worker's events to the event loop's queues. Waking the loop from another thread costs a
    system call (``call_soon_threadsafe``), as much as the rest of a token's work on the worker: events
    posted while a wake-up is pending ride on it, so a step of 8 rows wakes the loop once, not 8 times."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list = []
        self._armed = False                  # a delivery is scheduled and has not yet taken the items
        self._closed = False

    def post(self, queue: asyncio.Queue, item) -> bool:
        """Queue ``item`` for ``queue`` (any thread); False when the loop has closed."""
        with self._lock:
            if self._closed:
                return False
            self._items.append((queue, item))
            wake, self._armed = not self._armed, True
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:
                self._closed = True
                return False
        return True

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._armed = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


def _engine_error(exc) -> APIError:
    if isinstance(exc, InputError):
        return APIError(400, str(exc))
    if isinstance(exc, StateError):
        return APIError(500, f"the session could not be read: {exc}", "session", "server_error")
    return APIError(500, f"{type(exc).__name__}: {exc}", None, "server_error")


class _Shape:
    """The OpenAI response and chunk objects of one request."""

    def __init__(self, rid, created, model, chat):
        self.rid, self.created, self.model, self.chat = rid, created, model, chat
        self.first = True

    def _base(self, obj):
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    @staticmethod
    def usage(info) -> dict:
        p, c = info["prompt_tokens"], info["completion_tokens"]
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": info["cached_tokens"]}}

    def whole(self, text, info) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": info["finish_reason"], "logprobs": None}
            out = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": text, "finish_reason": info["finish_reason"], "logprobs": None}
            out = self._base("text_completion")
        out.update(choices=[choice], usage=self.usage(info))
        if "session" in info:
            out["session"] = info["session"]
        return out

    def chunk(self, text=None, info=None) -> dict:
        finish = info["finish_reason"] if info else None
        if self.chat:
            delta = {}
            if self.first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            out = self._base("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            out = self._base("text_completion")
        self.first = False
        out["choices"] = [choice]
        if info is not None:
            out["usage"] = self.usage(info)
            if "session" in info:
                out["session"] = info["session"]
        return out


def _sse_line(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(job: Job, events: asyncio.Queue, shape: _Shape, include_usage: bool, interval: float = 0.0):
    """The stream: text chunks at most one per ``interval`` seconds (the first at once), a last chunk with
    finish_reason and usage (plus, when stream_options.include_usage asks, OpenAI's separate usage chunk with
    no choices), then [DONE]. A client that goes away cancels the job: the worker drops its row at the next
    step.

    Why an interval: a byte-level model makes a stream's tokens every fraction of a millisecond, and each
    chunk costs the event loop (which holds the GIL the worker needs) more than a token costs the worker:
    a chunk per token made 8 streams serve fewer tokens a second than the worker could step. Waiting a few
    milliseconds, invisible to a reader, sends those tokens as one chunk."""
    done = False
    loop = asyncio.get_running_loop()
    sent = -math.inf
    try:
        while True:
            kind, payload = await events.get()
            if kind == "text":
                wait = sent + interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # the tokens made meanwhile queue up: they join this chunk
                # the pieces that arrived meanwhile go out as one chunk: a client that reads slower than the
                # worker generates (or a loop serving many streams) gets fewer, larger chunks
                text = [payload]
                while not events.empty():
                    kind, payload = events.get_nowait()
                    if kind != "text":
                        break
                    text.append(payload)
                yield _sse_line(shape.chunk("".join(text)))
                sent = loop.time()
                if kind == "text":
                    continue
            done = True
            if kind == "done":
                yield _sse_line(shape.chunk(None, payload))
                if include_usage:
                    usage_chunk = shape._base(shape.chunk(None, payload)["object"])
                    usage_chunk.update(choices=[], usage=shape.usage(payload))
                    yield _sse_line(usage_chunk)
            else:
                err = _engine_error(payload) if kind == "error" else APIError(503, "the request was cancelled")
                yield _sse_line({"error": {"message": err.message, "type": err.kind, "param": err.param,
                                           "code": None}})
            yield "data: [DONE]\n\n"
            return
    finally:
        if not done:
            job.cancel()


async def models(request: HTTPRequest):
    server: Server = request.app.state.server
    return JSONResponse({"object": "list", "data": [
        {"id": server.model_id, "object": "model", "created": int(server.started), "owned_by": "thl-np"}]})


async def health(request: HTTPRequest):
    server: Server = request.app.state.server
    if server.load_error is not None:
        return JSONResponse({"status": "error", "error": server.load_error}, status_code=503)
    engine = server.engine
    if engine is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({
        "status": "ok", "model": server.model_id, "queued_or_running": engine.load(), "running": engine.running(),
        "max_queue": engine.max_queue, "max_batch": engine.max_batch, "steps": engine.steps,
        "rows_stepped": engine.rows, "sessions_in_memory": engine.sessions.in_memory(),
        "prefix_cache_entries": len(engine.prefix), "prefix_cache_hits": engine.prefix.hits})


def _session_id(request: HTTPRequest) -> str:
    try:
        return check_session_id(request.path_params["sid"])
    except InputError as exc:
        raise APIError(400, str(exc), "session") from None


async def session_list(request: HTTPRequest):
    engine = request.app.state.server.ready()
    return JSONResponse({"object": "list", "data": [{"id": s} for s in engine.sessions.ids()]})


async def session_get(request: HTTPRequest):
    engine = request.app.state.server.ready()
    sid = _session_id(request)
    try:
        data = await asyncio.to_thread(engine.sessions.export, sid)
    except StateError as exc:
        raise APIError(500, str(exc), "session", "server_error") from None
    if data is None:
        raise APIError(404, f"no session '{sid}'", "session")
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{sid}.session.npz"'})


async def session_put(request: HTTPRequest):
    server: Server = request.app.state.server
    engine = server.ready()
    sid = _session_id(request)
    limit = 2 * engine.model.init_state(1).nbytes + (64 << 10)
    data = await _read_body(request, limit, "the session file")
    if engine.session_busy(sid):
        raise APIError(409, f"session '{sid}' has a request running: import it when that one ends", "session")
    try:
        s = await asyncio.to_thread(engine.sessions.import_bytes, sid, data)
    except StateError as exc:
        raise APIError(400, str(exc), "session") from None
    return JSONResponse({"id": sid, "object": "session", "requests": s.requests, "tokens": s.tokens})


async def session_delete(request: HTTPRequest):
    engine = request.app.state.server.ready()
    sid = _session_id(request)
    if engine.session_busy(sid):
        raise APIError(409, f"session '{sid}' has a request running", "session")
    if not engine.sessions.delete(sid):
        raise APIError(404, f"no session '{sid}'", "session")
    return JSONResponse({"id": sid, "object": "session", "deleted": True})


# ---------------------------------------------------------------------------------------------- the app
class _Auth:
    """Bearer API key on every route but /health; a constant-time comparison."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                response = error_response(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                          kind="authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _api_error(request, exc: APIError):
    return error_response(exc.status, exc.message, exc.param, exc.kind)


async def _http_error(request, exc: HTTPException):
    messages = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                          kind="not_found_error" if exc.status_code == 404 else "invalid_request_error")


async def _server_error(request, exc: Exception):
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")


def create_app(server: Server):
    """The ASGI app for ``server``: loading starts with the app's lifespan, the engine closes with it."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start_loading()
        try:
            yield
        finally:
            await asyncio.to_thread(server.shutdown)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/sessions", session_list, methods=["GET"]),
        Route("/v1/sessions/{sid}", session_get, methods=["GET"]),
        Route("/v1/sessions/{sid}", session_put, methods=["PUT"]),
        Route("/v1/sessions/{sid}", session_delete, methods=["DELETE"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.server = server
    return _Auth(app, server.api_key)


def default_model_id(model_dir: str | None) -> str:
    from ..io.folder import DEFAULT_MODEL_DIR

    if model_dir is None or os.path.abspath(model_dir) == os.path.abspath(DEFAULT_MODEL_DIR):
        return "default"
    return os.path.basename(os.path.normpath(model_dir)) or "model"
