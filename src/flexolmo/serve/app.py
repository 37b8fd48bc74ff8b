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

# OpenAI's defaults: 16 tokens for a completion; a chat answer may fill the context.
COMPLETION_DEFAULT_TOKENS = 16


def _api_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


class _Decoder:
    """The completion's text so far, handed out as deltas; a token that ends inside a multi-byte character is
    held back until the character is complete."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        return self._delta(final=False)

    def finish(self) -> str:
        """What is still held back, as the end of the completion decodes it (possibly a replacement char)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return ""
        delta, self.text = text[len(self.text):], text
        return delta


def _choice(chat: bool, text: str, reason: str | None, stream: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    if stream:
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": reason}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}


class _Handler:
    """One completion or chat request, from its body to its response."""

    def __init__(self, server: ModelServer, chat: bool):
        self.server = server
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.object = ("chat.completion" if chat else "text_completion")

    async def start(self, request: Request) -> tuple[Job, bool]:
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
        return server.start(ids, mask, active, max_tokens, body.temperature, body.seed), body.stream

    def _chunk(self, choice: dict, usage: dict | None = None) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = {"id": self.id, "object": kind, "created": now(), "model": self.server.model_id,
                 "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    async def stream(self, job: Job) -> AsyncIterator[bytes]:
        decoder = _Decoder(self.server.loaded.tokenizer)
        if self.chat:
            yield sse(self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None}))
        async for kind, value in job.events():
            if kind == "token":
                delta = decoder.push(value)
                if delta:
                    yield sse(self._chunk(_choice(self.chat, delta, None, True)))
            elif kind == "done":
                yield sse(self._chunk(_choice(self.chat, decoder.finish(), value, True), self.server.usage(job)))
            else:
                yield sse({"error": {"message": value, "type": "server_error", "code": 503}})
        yield sse("[DONE]")

    async def complete(self, job: Job) -> Response:
        decoder = _Decoder(self.server.loaded.tokenizer)
        async for kind, value in job.events():
            if kind == "token":
                decoder.push(value)
            elif kind == "error":
                return error_response(503, value)
            else:
                reason = value
        decoder.finish()
        return JSONResponse({"id": self.id, "object": self.object, "created": now(), "model": self.server.model_id,
                             "choices": [_choice(self.chat, decoder.text, reason, False)],
                             "usage": self.server.usage(job)})


def create_app(server: ModelServer) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.startup()
        yield
        server.shutdown()

    app = FastAPI(title="flexolmo serve", lifespan=lifespan)

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
                             "experts": server.expert_names,
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

    return app
