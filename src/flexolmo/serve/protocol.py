"""The OpenAI-compatible request bodies this server accepts, and its errors in OpenAI's shape.

Bodies are parsed here rather than by FastAPI so that every bad input is one clear 400 (FastAPI would answer
422 with a list), and fields the server cannot honour (penalties, `logit_bias`, ...) are refused, not ignored.
`stop` (a string or up to 4), `n` (up to `MAX_CHOICES` choices, each a row of the batch) and logprobs are
honoured: `/v1/completions` takes `logprobs: 0..5` (legacy), `/v1/chat/completions` `logprobs: true` with
`top_logprobs: 0..20`.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from flexolmo.serve.access import AccessError
from flexolmo.serve.engine import MAX_TOP_LOGPROBS

# Choices of one request: each is a row of the batch, so `n` is bounded like the batch is.
MAX_CHOICES = 16
MAX_STOPS = 4  # as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # legacy completions' `logprobs`, as OpenAI

# Fields that would change the output and that this server does not implement: (field, its neutral values, why).
# Sent with a neutral value (as clients often do) they are fine; otherwise a 400, never silently ignored.
_REFUSED = (
    ("best_of", (None, 1), "best_of is not supported; ask for n choices instead"),
    ("logit_bias", (None, {}), "logit_bias is not supported"),
    ("presence_penalty", (None, 0, 0.0), "presence_penalty is not supported"),
    ("frequency_penalty", (None, 0, 0.0), "frequency_penalty is not supported"),
    ("top_p", (None, 1, 1.0), "top_p is not supported (sampling is over the whole vocabulary)"),
    ("suffix", (None, ""), "suffix is not supported"),
)


class _Body(BaseModel):
    # OpenAI clients send fields this server has no use for (user, ...): extra ones are accepted, but each one
    # that would change the output is either declared below or refused through `_REFUSED`.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    seed: int | None = None
    stream: bool = False
    experts: list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    stream_options: dict | None = None


class CompletionBody(_Body):
    prompt: str | list[str]
    echo: bool = Field(default=False)
    logprobs: StrictInt | None = None

    @field_validator("logprobs", mode="before")
    @classmethod
    def _false_is_none(cls, value):
        return None if value is False else value  # clients send `false` for "none"; `true` is no count

    def top_logprobs_asked(self) -> int | None:
        """How many alternatives per token the request wants with its logprobs; None for no logprobs."""
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise AccessError(400, f"logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}, got "
                              f"{self.logprobs}")
        return self.logprobs


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None

    def top_logprobs_asked(self) -> int | None:
        """How many alternatives per token the request wants with its logprobs; None for no logprobs."""
        top = self.top_logprobs
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise AccessError(400, f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top}")
        if not self.logprobs:
            if top:
                raise AccessError(400, "top_logprobs needs logprobs: true")
            return None
        return top or 0


def parse_body(raw: bytes, kind: type[_Body]) -> _Body:
    """The request body as `kind`, or a 400 that says what is wrong."""
    try:
        data = json.loads(raw)
    except ValueError as error:
        raise AccessError(400, f"the request body is not valid JSON: {error}") from None
    try:
        body = kind.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise AccessError(400, f"{where}: {first['msg']}") from None
    for name, neutral, why in _REFUSED:
        value = (body.model_extra or {}).get(name)
        if not any(value == ok and type(value) is type(ok) for ok in neutral):
            raise AccessError(400, f"{name}: {why}")
    if getattr(body, "echo", False):
        raise AccessError(400, "echo is not supported")
    body.top_logprobs_asked()  # a bad value is a 400 now, before anything runs
    body.stop = stop_strings(body.stop)
    return body


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """OpenAI's `stop` as a list: one string or up to `MAX_STOPS`, none of them empty."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise AccessError(400, f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}")
    if any(not text for text in stops):
        raise AccessError(400, "stop: a stop string must not be empty")
    return stops


def single_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) != 1:
        raise AccessError(400, "prompt must be one string (batches of prompts are not supported; send requests "
                          "concurrently instead, they are batched together)")
    return prompt[0]


def error_response(status: int, message: str) -> JSONResponse:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 503: "service_unavailable"}
    return JSONResponse({"error": {"message": message, "type": kinds.get(status, "server_error"), "code": status}},
                        status_code=status)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def sse(payload: dict | str) -> bytes:
    """One server-sent event as OpenAI streams them."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()
