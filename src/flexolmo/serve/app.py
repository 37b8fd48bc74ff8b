"""The HTTP face of a `ModelServer`: OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`, with
server-sent-event streaming, plus `/health` and `/metrics`.

Every error is OpenAI's error object with one clear message; the server stays up. A client that disconnects
mid-stream has its request dropped from the batch at the next step; the others go on. On SIGTERM uvicorn
stops accepting connections and waits for the requests in flight, then the scheduler stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from flexolmo.serve.access import AccessError
from flexolmo.serve.engine import Token
from flexolmo.serve.logprobs import ChoiceLogprobs
from flexolmo.serve.protocol import (
    ChatBody,
    CompletionBody,
    error_response,
    new_id,
    now,
    parse_body,
    single_prompt,
    sse,
)
from flexolmo.serve.server import Job, ModelServer
from flexolmo.serve.text import TextStream

# OpenAI's defaults: 16 tokens for a completion; a chat answer may fill the context.
COMPLETION_DEFAULT_TOKENS = 16


def _api_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def _choice(chat: bool, index: int, text: str, reason: str | None, stream: bool, logprobs: dict | None) -> dict:
    if not chat:
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}
    if stream:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": reason}


class _Handler:
    """One completion or chat request, from its body to its response."""

    def __init__(self, server: ModelServer, chat: bool):
        self.server = server
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.object = ("chat.completion" if chat else "text_completion")
        self.streams: list[TextStream] = []  # one per choice
        self.logprobs: list[ChoiceLogprobs] | None = None  # one per choice, when the request asked for them

    async def start(self, request: Request) -> tuple[Job, bool]:
        """Check the request and submit its choices; `self.streams` follow each choice's text."""
        server = self.server
        allowed = server.allowed(_api_key(request))
        body = parse_body(await request.body(), ChatBody if self.chat else CompletionBody)
        if body.model != server.model_id:
            raise AccessError(404, f"model '{body.model}' does not exist; this server serves '{server.model_id}'")
        mask, active = server.mask(allowed, body.experts)
        if self.chat:
            ids = server.encode(None, [message.model_dump() for message in body.messages])
            asked = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
            default = server.context
        else:
            ids = server.encode(single_prompt(body.prompt), None)
            asked, default = body.max_tokens, COMPLETION_DEFAULT_TOKENS
        max_tokens = server.max_tokens(len(ids), asked, default)
        stops = server.stop_strings(body.stop)
        tokenizer = server.loaded.tokenizer
        self.streams = [TextStream(tokenizer, stops) for _ in range(body.n)]
        top = body.top_logprobs_asked()
        if top is not None:
            self.logprobs = [ChoiceLogprobs(tokenizer, self.chat) for _ in range(body.n)]
        job = server.start(ids, mask, active, max_tokens, body.temperature, body.seed, body.n, stops, top)
        return job, body.stream

    def _push(self, index: int, token: Token) -> str:
        """Add a choice's token; the text it settles (possibly none yet)."""
        stream = self.streams[index]
        if self.logprobs is not None:
            self.logprobs[index].add(token, stream.length)
        return stream.push(token.id)

    def _logprobs(self, index: int) -> dict | None:
        """The choice's logprob entries not handed out yet, or None when the request asked for none."""
        return None if self.logprobs is None else self.logprobs[index].take()

    def _chunk(self, choice: dict, usage: dict | None = None) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = {"id": self.id, "object": kind, "created": now(), "model": self.server.model_id,
                 "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    async def stream(self, job: Job) -> AsyncIterator[bytes]:
        """Each choice's deltas as they come, tagged with its index; the usage rides on the last choice's end."""
        if self.chat:
            for index in range(len(self.streams)):
                yield sse(self._chunk({"index": index, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}))
        running = len(self.streams)
        async for index, kind, value in job.events():
            if kind == "token":
                delta = self._push(index, value)
                if delta:
                    yield sse(self._chunk(_choice(self.chat, index, delta, None, True, self._logprobs(index))))
            elif kind == "done":
                running -= 1
                usage = self.server.usage(job) if running == 0 else None
                rest = self.streams[index].finish()
                yield sse(self._chunk(_choice(self.chat, index, rest, value, True, self._logprobs(index)), usage))
            else:
                yield sse({"error": {"message": value, "type": "server_error", "code": 503}})
        yield sse("[DONE]")

    async def complete(self, job: Job) -> Response:
        reasons: list[str | None] = [None] * len(self.streams)
        async for index, kind, value in job.events():
            if kind == "token":
                self._push(index, value)
            elif kind == "error":
                return error_response(503, value)
            else:
                reasons[index] = value
        for stream in self.streams:
            stream.finish()
        choices = [_choice(self.chat, index, stream.text, reason, False, self._logprobs(index))
                   for index, (stream, reason) in enumerate(zip(self.streams, reasons))]
        return JSONResponse({"id": self.id, "object": self.object, "created": now(), "model": self.server.model_id,
                             "choices": choices, "usage": self.server.usage(job)})


def _generation_routes(app: FastAPI, server: ModelServer) -> None:
    """`/v1/completions` and `/v1/chat/completions`, streamed or not; each answer counted in the metrics."""

    async def generate(request: Request, chat: bool) -> Response:
        handler = _Handler(server, chat)
        endpoint = request.url.path
        try:
            job, stream = await handler.start(request)
        except AccessError as error:
            server.metrics.requests.labels(endpoint, str(error.status)).inc()
            return error_response(error.status, str(error))
        server.metrics.requests.labels(endpoint, "200").inc()
        if stream:
            return StreamingResponse(handler.stream(job), media_type="text/event-stream")
        return await handler.complete(job)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)


def _information_routes(app: FastAPI, server: ModelServer) -> None:
    """`/v1/models` (the experts the caller's key may use), `/health` and `/metrics`."""

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            allowed = server.allowed(_api_key(request))
        except AccessError as error:
            return error_response(error.status, str(error))
        active = server.active_state()
        usable = [name for name, on in zip(server.expert_names, active.mask) if on and name in allowed]
        entry = {"id": server.model_id, "object": "model", "created": now(), "owned_by": "flexolmo",
                 "experts": [name for name in server.expert_names if name in allowed], "active_experts": usable}
        return JSONResponse({"object": "list", "data": [entry]})

    @app.get("/health")
    async def health() -> Response:
        active = server.active_state()
        return JSONResponse({"status": "failed_closed" if active.failed_closed else "ok", "model": server.model_id,
                             "experts": server.expert_names, "router_bias": server.loaded.biased_experts,
                             "active_set": ({**active.as_dict(), "source": server.follower.source}
                                            if server.follower else None),
                             "running": server.scheduler.running, "waiting": server.scheduler.waiting})

    @app.get("/metrics")
    async def metrics() -> Response:
        active = server.active_state()
        server.metrics.running.set(server.scheduler.running)
        server.metrics.waiting.set(server.scheduler.waiting)
        server.metrics.active_set_version.set(active.version or 0)
        server.metrics.failed_closed.set(1 if active.failed_closed else 0)
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")


def create_app(server: ModelServer) -> FastAPI:
    """The OpenAI-compatible app over `server`, which starts and stops with it."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.startup()
        yield
        server.shutdown()

    app = FastAPI(title="flexolmo serve", lifespan=lifespan)
    _generation_routes(app, server)
    _information_routes(app, server)
    return app
