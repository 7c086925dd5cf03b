"""The OpenAI wire format: request bodies (validated), errors, responses and stream chunks.

Only this module knows the JSON shapes; the engine sees ``Sampling`` and plain prompts. Unknown
fields are accepted and ignored (clients send many); fields the server cannot honour are refused
with a 400 naming them rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


# -- requests ----------------------------------------------------------------------------------


class _Common(BaseModel):
    """Fields both endpoints share (OpenAI's names, ranges and defaults)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def refuse_unsupported(self) -> None:
        if (self.n or 1) != 1:
            raise unsupported("n", "only one choice per request (n=1)")
        if self.logprobs:
            raise unsupported("logprobs", "log probabilities are not returned")
        for p in ("presence_penalty", "frequency_penalty"):
            if getattr(self, p):
                raise unsupported(p, "penalties are not applied; send 0 or leave it out")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ApiError(400, "stop: at most 4 sequences", param="stop")
        if any(s == "" for s in self.stops):
            raise ApiError(400, "stop: an empty stop sequence", param="stop")

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The content as one string (a list of parts: its text parts joined)."""
        if isinstance(self.content, list):
            if any(p.get("type") != "text" for p in self.content):
                raise unsupported("messages", "only text content parts")
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise unsupported("tools", "tool calls are not supported")

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def plain_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise unsupported("echo", "the prompt is not echoed")
        if self.suffix:
            raise unsupported("suffix", "insertion is not supported")

    @property
    def limit(self) -> int | None:
        return self.max_tokens

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request (a batch of prompts is refused)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise unsupported("prompt", "one prompt per request")
            p = p[0]
        if isinstance(p, list) and not p:
            raise ApiError(400, "prompt: empty", param="prompt")
        return p


# -- what the engine is given -------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """Generation settings of one request. temperature 0: greedy (argmax at every step)."""

    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @classmethod
    def of(cls, req: _Common) -> "Sampling":
        return cls(max_tokens=req.limit, temperature=1.0 if req.temperature is None else req.temperature,
                   top_p=1.0 if req.top_p is None else req.top_p, stop=req.stops, seed=req.seed)


# -- responses ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens resumed from the store instead of prefilled

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class Reply:
    """The response (or chunks) of one request: ids, object names and choice shapes per endpoint."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, usage: Usage | None) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage.to_json()
        return out

    def full(self, text: str, finish_reason: str, usage: Usage) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            return self._envelope("chat.completion", [choice], usage)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], usage)

    def chunk(self, text: str | None = None, finish_reason: str | None = None, *, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice], None)
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], None)

    def usage_chunk(self, usage: Usage) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage)
