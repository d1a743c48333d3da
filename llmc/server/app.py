"""`llmc serve`: an OpenAI-compatible ASGI app (Starlette) over one loaded artifact.

Requests become step events on the continuous batcher (runtime/batcher.py), which runs the model
on its own thread; each request's events cross into the event loop through an asyncio queue. A
request that fails answers with OpenAI's error object; nothing a client sends stops the server.
A client that leaves (a stream's send fails, or a waiting client disconnects) is cancelled and
its rows freed."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator

from llmc.errors import ContextLengthError, LlmcError
from llmc.runtime import Generator
from llmc.runtime.batcher import Batcher, Closed, QueueFull
from llmc.runtime.generator import StepEvent, _config
from llmc.server.metrics import Metrics
from llmc.server.protocol import APIError, Completion, chunk, parse, response, usage_chunk

log = logging.getLogger("llmc.serve")
MAX_BODY = 4 * 2**20  # bytes of a request body
RETRY_AFTER = 1  # seconds, when the queue is full
TEXT_MARKER = "\u0000llmc-text\u0000"  # stands for a chunk's text in its encoded template


class Service:
    """What the routes share: the generator, its batcher, the served name and the metrics."""

    def __init__(self, generator: Generator, name: str, **batcher_options):
        self.gen, self.name = generator, name
        self.batcher = Batcher(generator, **batcher_options)
        self.metrics = Metrics(self.batcher)
        self.draining = False
        self.started = int(time.time())
        # events from the batcher's thread wait here; one call into the event loop delivers all
        # of a step's (not one wake-up per request and token)
        self._inbox: list[tuple[asyncio.Queue, object]] = []
        self._inbox_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _deliver(self, queue: asyncio.Queue, event) -> None:
        """On the batcher's thread: hand an event to its request's queue in the event loop."""
        with self._inbox_lock:
            self._inbox.append((queue, event))
            if len(self._inbox) > 1:  # a delivery is scheduled already
                return
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._inbox_lock:
            items, self._inbox = self._inbox, []
        for queue, event in items:
            queue.put_nowait(event)

    # -- a request's life --------------------------------------------------------------------
    def encode(self, c: Completion) -> list[int]:
        try:
            if c.chat:
                return self.gen.encode(c.messages)
            if isinstance(c.prompt, list):
                vocab = self.gen.model.vocab_size
                if max(c.prompt) >= vocab:
                    raise APIError(400, f"token ids must be below {vocab}.", param="prompt")
                return self.gen.encode(c.prompt)
            return self.gen.encode(c.prompt)
        except ContextLengthError as exc:
            raise APIError(400, str(exc), "messages" if c.chat else "prompt",
                           "context_length_exceeded") from exc  # fmt: skip
        except LlmcError as exc:
            raise APIError(400, str(exc), "messages" if c.chat else "prompt") from exc
        except Exception as exc:  # a chat template that raises on these messages
            raise APIError(400, f"the chat template cannot render these messages: {exc}",
                           "messages") from exc  # fmt: skip

    def submit(self, c: Completion, ids: list[int]):
        """Queue the request -> (batcher request, asyncio queue of its events)."""
        if self.draining:  # a kept-alive connection asking after SIGTERM
            raise APIError(503, "the server is shutting down; send the request elsewhere.",
                           code="shutting_down")  # fmt: skip
        room = self.gen.model.max_context - len(ids)
        if c.max_tokens is not None and c.max_tokens > room:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens and max_tokens {c.max_tokens}, but the model's "
                f"context is {self.gen.model.max_context}; lower max_tokens to at most {room}.",
                "max_tokens",
                "context_length_exceeded",
            )
        try:
            config = _config(
                # the API's defaults: a chat runs to the end of the context, a completion 16
                max_new_tokens=c.max_tokens or (room if c.chat else min(16, room)),
                stop=c.stop,
                ignore_eos=c.ignore_eos,
                temperature=c.temperature,
                top_p=c.top_p,
                top_k=c.top_k,
                repetition_penalty=c.repetition_penalty,
                seed=c.seed,
            )
        except LlmcError as exc:  # a combination of options sampling cannot take
            raise APIError(400, str(exc)) from exc
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            request = self.batcher.submit(ids, config, functools.partial(self._deliver, queue))
        except QueueFull as exc:
            raise APIError(429, str(exc), code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER)}) from exc  # fmt: skip
        except Closed as exc:
            raise APIError(503, str(exc), code="shutting_down") from exc
        self.metrics.prompt_tokens.inc(len(ids))
        return request, queue

    async def events(self, request, queue, arrived: float) -> AsyncIterator[StepEvent]:
        """The request's events as they come, timed for the metrics; cancelled if the caller
        stops listening before the last one."""
        last, finished = None, False
        try:
            while not finished:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise APIError(500, f"generation failed: {event}", code="generation_failed")
                now = time.perf_counter()
                if last is None:
                    self.metrics.ttft.observe(now - arrived)
                else:
                    self.metrics.itl.observe(now - last)
                last, finished = now, event.finish_reason is not None
                if finished:
                    self.metrics.completion_tokens.inc(event.usage.completion_tokens)
                    self.metrics.duration.observe(now - arrived)
                yield event
        finally:
            if not finished:
                self.batcher.cancel(request)
                self.metrics.cancelled.inc()


async def _body(request) -> object:
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
        raise APIError(413, f"the request body must be at most {MAX_BODY} bytes.")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise APIError(413, f"the request body must be at most {MAX_BODY} bytes.")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}.") from exc


def create_app(service: Service, shutdown_timeout: float = 30.0):
    """The Starlette app of one Service."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    def error(exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    async def completions(request, chat: bool):
        arrived = time.perf_counter()
        endpoint = "chat" if chat else "completions"
        try:
            c = parse(await _body(request), chat)
            if c.model != service.name:
                raise APIError(404, f"the model '{c.model}' is not served here; this server "
                               f"serves '{service.name}'.", "model", "model_not_found")  # fmt: skip
            ids = service.encode(c)
            handle, queue = service.submit(c, ids)
        except APIError as exc:
            service.metrics.requests.inc(endpoint=endpoint, status=exc.status)
            return error(exc)
        events = service.events(handle, queue, arrived)
        if c.stream:
            service.metrics.requests.inc(endpoint=endpoint, status=200)
            return StreamingResponse(_sse(c, events), media_type="text/event-stream")
        text: list[str] = []

        async def collect():
            async for event in events:
                text.append(event.text)
            return event

        task, watcher = asyncio.create_task(collect()), asyncio.create_task(_watch(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():  # the client left: stop generating for it
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                service.metrics.requests.inc(endpoint=endpoint, status=499)
        if task.cancelled():
            return PlainTextResponse("client closed the request", 499)
        try:
            event = task.result()
        except APIError as exc:
            service.metrics.requests.inc(endpoint=endpoint, status=exc.status)
            return error(exc)
        service.metrics.requests.inc(endpoint=endpoint, status=200)
        tokens = (event.usage.prompt_tokens, event.usage.completion_tokens)
        return JSONResponse(response(c, "".join(text), event.finish_reason, tokens))

    async def chat(request):
        return await completions(request, chat=True)

    async def text(request):
        return await completions(request, chat=False)

    async def models(request):
        entry = {"id": service.name, "object": "model", "created": service.started,
                 "owned_by": "llmc", "max_model_len": service.gen.model.max_context}  # fmt: skip
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(request):
        if service.draining:
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics(request):
        return PlainTextResponse(
            service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def http_error(request, exc: HTTPException):
        message = {404: f"there is no route {request.url.path}.",
                   405: f"{request.method} is not allowed on {request.url.path}."}  # fmt: skip
        return error(APIError(exc.status_code, message.get(exc.status_code, str(exc.detail))))

    async def server_error(request, exc: Exception):
        log.exception("request failed")
        return error(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.draining = True
        await asyncio.to_thread(service.batcher.close, shutdown_timeout)

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", text, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {HTTPException: http_error, Exception: server_error}
    return Starlette(
        routes=routes,
        exception_handlers=handlers,
        lifespan=lifespan,
        middleware=[Middleware(ReplicaHeader)],
    )


class ReplicaHeader:
    """ASGI middleware: every response says which server process answered it
    (`X-LLMC-Replica: host:pid`), so that requests spread over replicas can be told apart."""

    def __init__(self, app):
        self.app = app
        self.value = f"{socket.gethostname()}:{os.getpid()}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-llmc-replica", self.value)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_tagged)


async def _watch(request) -> None:
    """Returns when the client disconnects."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


async def _sse(c: Completion, events) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, then `data: [DONE]`."""

    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    # a text chunk is the same JSON each time but for its text: encoded once, around a marker
    marker = json.dumps(TEXT_MARKER)
    head, tail = data(chunk(c, TEXT_MARKER)).split(marker)
    if c.chat:
        yield data(chunk(c, None, first=True))
    try:
        async for event in events:
            if event.text:
                yield head + json.dumps(event.text, ensure_ascii=False) + tail
            if event.finish_reason:
                yield data(chunk(c, None, event.finish_reason))
                if c.include_usage:
                    u = event.usage
                    yield data(usage_chunk(c, (u.prompt_tokens, u.completion_tokens)))
    except APIError as exc:  # mid-stream: the status is sent already; the error goes as data
        yield data(exc.body())
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"
