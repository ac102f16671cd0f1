"""The OpenAI-compatible HTTP API over one engine: /v1/models, /v1/completions, /v1/chat/completions, /health,
/metrics and the chat page at /.

Threads: the engine steps on its own thread and hands each output to `_Bridge`, which wakes the event loop
once per batch of outputs (not once per token: one self-pipe write per engine step however many streams).
A request is a `Job`: its prompts submitted to the engine, its outputs read from an asyncio queue. When the
client goes away (`http.disconnect`), the job cancels its engine requests and their slots are free at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from kiln.config.stages import ServeConfig
from kiln.infer.engine import Output, QueueFull
from kiln.serve.loader import Served
from kiln.serve.metrics import Metrics
from kiln.serve.protocol import ApiError, GenRequest, Limits, bad, chat_request, completion_request
from kiln.serve.responses import (Choice, TokenText, chat_body, chat_chunk, chat_logprobs, completion_body,
                                  completion_chunk, completion_logprobs, echo_logprobs, new_id, usage_chunk)

BAD_JSON = ("We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
            "library correctly. The API expects a JSON payload, but what was sent was not valid JSON.)")


class _Bridge:
    """Engine-thread outputs into asyncio queues on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, int, Output]] = []
        self._lock = threading.Lock()
        self._pending = False

    def sink(self, queue: asyncio.Queue, prompt: int):
        def on_output(o: Output) -> None:      # on the engine's thread
            with self._lock:
                self._items.append((queue, prompt, o))
                if self._pending:
                    return
                self._pending = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:                # the loop is closed: the server is shutting down
                pass
        return on_output

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._pending = self._items, [], False
        for queue, prompt, o in items:
            queue.put_nowait((prompt, o))


class Job:
    """One API request's engine work: every prompt with n samples; outputs keyed by choice index."""

    def __init__(self, state: _State, gen: GenRequest):
        self.state, self.gen = state, gen
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles = []
        self.remaining = len(gen.prompts) * gen.params.n
        self.start = time.monotonic()
        self.first_token: float | None = None
        self._last: dict[int, float] = {}
        self.completion_tokens = 0
        self.endpoint, self.closed = "", False

    def submit(self) -> None:
        engine = self.state.served.engine
        adapter = self.state.served.adapter_of(self.gen.model)   # a name check_model accepted
        try:
            for i, ids in enumerate(self.gen.prompts):
                self.handles.append(engine.submit(ids, self.gen.params, self.state.bridge.sink(self.queue, i),
                                                  adapter=adapter))
        except QueueFull as e:
            self.cancel()
            raise ApiError(503, f"The server is overloaded: {e}. Retry shortly.", "server_error",
                           code="overloaded") from None
        except ValueError as e:
            self.cancel()
            raise bad(str(e)) from None
        self.state.metrics.prompt_tokens.inc(sum(len(p) for p in self.gen.prompts))

    @property
    def done(self) -> bool:
        return self.remaining == 0

    async def outputs(self) -> list[tuple[int, Output]]:
        """At least one (choice index, output); every other one already here too (a backlog is sent at once)."""
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        now, n, m = time.monotonic(), self.gen.params.n, self.state.metrics
        out = []
        for prompt, o in items:
            index = prompt * n + o.index
            if o.token_ids:
                if self.first_token is None:
                    self.first_token = now
                    m.ttft.observe(now - self.start)
                elif index in self._last:
                    m.itl.observe(now - self._last[index])
                self._last[index] = now
                self.completion_tokens += len(o.token_ids)
                m.generation_tokens.inc(len(o.token_ids))
            self.remaining -= o.finish_reason is not None
            out.append((index, o))
        if self.done:
            m.duration.observe(now - self.start)
        return out

    def prompt_logprobs(self) -> list:
        return [h.prompt_logprobs for h in self.handles]

    def cancel(self) -> None:
        for h in self.handles:
            if h.unfinished:
                self.state.served.engine.cancel(h)

    def close(self, status: str | None = None) -> None:
        """Cancel what is still running and count the request once, however it ended (status "": the error
        handler counts it)."""
        self.cancel()
        if not self.closed:
            self.closed = True
            self.state.metrics.active.dec()
            if status != "":
                self.state.metrics.requests.labels(self.endpoint, status or ("200" if self.done else "499")).inc()


class _State:
    def __init__(self, served: Served, cfg: ServeConfig):
        self.served, self.cfg = served, cfg
        self.metrics = Metrics(served.engine)
        self.tt = TokenText(served.tokenizer)
        self.limits = Limits(served.max_len, min(cfg.max_tokens_limit or served.max_len, served.max_len),
                             served.engine.max_slots)
        self.bridge: _Bridge | None = None


class EventStream(StreamingResponse):
    """Server-sent events that stop as soon as the client disconnects (starlette's own skips listening for
    `http.disconnect` under ASGI 2.4 servers and notices only at its next write), then close their job."""

    def __init__(self, content, job: Job, **kw):
        super().__init__(content, **kw)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stream, watch):
                t.cancel()
            await asyncio.gather(stream, watch, return_exceptions=True)   # a write to a closed socket: gone
            await self.body_iterator.aclose()
            self.job.close()


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def build_app(served: Served, cfg: ServeConfig) -> FastAPI:
    state = _State(served, cfg)

    @asynccontextmanager
    async def lifespan(app):
        state.bridge = _Bridge(asyncio.get_running_loop())
        if not served.engine.alive:
            served.engine.start()
        yield
        served.engine.stop()

    app = FastAPI(title="kiln serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kiln = state
    _errors(app, state)

    @app.get("/health")
    async def health():
        if not served.engine.alive:
            raise ApiError(503, "The engine is not running.", "server_error", code="engine_down")
        return {"status": "ok", "model": served.name, "active_slots": served.engine.active_slots,
                "waiting": served.engine.waiting}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("kiln.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(request: Request):
        _auth(request, served)
        return {"object": "list", "data": [_model_card(served, name) for name in served.names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _auth(request, served)
        if model_id not in served.names:
            raise ApiError(404, f"The model `{model_id}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        return _model_card(served, model_id)

    for path, parse in (("/v1/completions", completion_request), ("/v1/chat/completions", chat_request)):
        app.add_api_route(path, _endpoint(state, path, parse), methods=["POST"])

    return app


def _endpoint(state: _State, path: str, parse):
    async def generate(request: Request):
        _auth(request, state.served)
        body = await _read_json(request, state.cfg.max_request_bytes)
        gen = parse(body, state.served.tokenizer, state.limits, state.served.names)
        return await _answer(state, request, gen, path)
    return generate


def _model_card(served: Served, name: str) -> dict:
    """A model of /v1/models; a LoRA adapter's names its base as `parent` (and `root`), as vLLM's do."""
    card = {"id": name, "object": "model", "created": 0, "owned_by": "kiln", "max_model_len": served.max_len}
    if name != served.name:
        card.update(root=served.name, parent=served.name)
    return card


def _auth(request: Request, served: Served) -> None:
    if served.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise ApiError(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                       "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", code="missing_api_key")
    if not hmac.compare_digest(key.strip().encode(), served.api_key.encode()):
        shown = key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else "***"
        raise ApiError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")


async def _read_json(request: Request, limit: int):
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"The request body has {int(length)} bytes; this server accepts at most {limit} "
                       "(serve.max_request_bytes).", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"The request body exceeds {limit} bytes (serve.max_request_bytes).",
                           code="request_too_large")
    try:
        return json.loads(body)
    except ValueError:
        raise bad(BAD_JSON) from None


async def _answer(state: _State, request: Request, gen: GenRequest, endpoint: str):
    job = Job(state, gen)
    job.submit()
    job.endpoint = endpoint
    state.metrics.active.inc()
    if gen.stream:
        return EventStream(_stream(state, job), job, media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watch = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        choices = [Choice(i) for i in range(job.remaining)]
        while not job.done:
            for index, o in await job.outputs():
                choices[index].add(o)
        errors = [c.text for c in choices if c.finish_reason == "error"]
        if errors:
            raise ApiError(500, f"The engine failed: {errors[0]}", "server_error", code="engine_error")
        if any(c.finish_reason == "abort" for c in choices):   # the client is gone: nobody reads this
            return Response(status_code=499)
        rid = new_id("chatcmpl" if gen.chat else "cmpl")
        name, tt = gen.model, state.tt
        body = chat_body(gen, rid, name, tt, choices) if gen.chat else \
            completion_body(gen, rid, name, tt, choices, job.prompt_logprobs())
        return JSONResponse(body)
    except ApiError:
        job.close("")
        raise
    finally:
        watch.cancel()
        job.close()


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    # The body is read already, so the next message uvicorn gives is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _stream(state: _State, job: Job) -> AsyncIterator[str]:
    gen, tt, name = job.gen, state.tt, job.gen.model
    rid = new_id("chatcmpl" if gen.chat else "cmpl")
    started: set[int] = set()
    status = "200"
    try:
        while not job.done:
            for index, o in _coalesce(await job.outputs()):
                if o.finish_reason == "error":
                    status = "500"
                    yield _sse(ApiError(500, f"The engine failed: {o.text}", "server_error",
                                        code="engine_error").body())
                    continue
                if o.finish_reason == "abort":
                    continue
                if gen.chat:
                    for chunk in _chat_chunks(rid, name, tt, gen, index, o, started):
                        yield _sse(chunk)
                else:
                    for chunk in _completion_chunks(rid, name, tt, job, index, o, started):
                        yield _sse(chunk)
        if gen.include_usage:
            completion = 0 if gen.discard_output else job.completion_tokens
            yield _sse(usage_chunk(rid, name, gen.chat, sum(len(p) for p in gen.prompts), completion))
        yield "data: [DONE]\n\n"
    finally:
        job.close(status if job.done else "499")


def _coalesce(items: list[tuple[int, Output]]) -> list[tuple[int, Output]]:
    """Outputs of one choice that arrived together, as one (so a backlog is one event, not one per token)."""
    merged: dict[int, Output] = {}
    for index, o in items:
        m = merged.get(index)
        if m is None:
            merged[index] = Output(o.index, list(o.token_ids), o.text, list(o.logprobs), o.finish_reason)
        else:
            m.token_ids += o.token_ids
            m.text += o.text
            m.logprobs += o.logprobs
            m.finish_reason = o.finish_reason or m.finish_reason
    return list(merged.items())


def _chat_chunks(rid, name, tt, gen: GenRequest, index: int, o: Output, started: set[int]):
    if index not in started:
        started.add(index)
        yield chat_chunk(rid, name, index, {"role": "assistant", "content": ""}, None, None)
    if o.text or (o.token_ids and gen.params.logprobs is not None):   # a cut character waits for the next token
        lps = chat_logprobs(tt, o.logprobs) if gen.params.logprobs is not None else None
        yield chat_chunk(rid, name, index, {"content": o.text}, lps, None)
    if o.finish_reason:
        yield chat_chunk(rid, name, index, {}, None, o.finish_reason)


def _completion_chunks(rid, name, tt, job: Job, index: int, o: Output, started: set[int]):
    gen = job.gen
    want = gen.params.logprobs is not None
    if index not in started:
        started.add(index)
        if gen.echo:
            ids = gen.prompts[index // gen.params.n]
            lps = echo_logprobs(tt, ids, job.handles[index // gen.params.n].prompt_logprobs) if want else None
            yield completion_chunk(rid, name, index, gen.prompt_text(index // gen.params.n, tt.tok), lps, None)
    if gen.discard_output:
        if o.finish_reason:
            yield completion_chunk(rid, name, index, "", None, "length")
        return
    if o.text or (o.token_ids and want) or o.finish_reason:
        lps = completion_logprobs(tt, o.logprobs, 0) if want else None
        yield completion_chunk(rid, name, index, o.text, lps, o.finish_reason)


def _errors(app: FastAPI, state: _State) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        state.metrics.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = f"Invalid URL ({request.method} {request.url.path})" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return JSONResponse(ApiError(500, f"The server had an error: {type(e).__name__}: {e}", "server_error").body(),
                            status_code=500)
