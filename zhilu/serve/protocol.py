"""The OpenAI API's request and error shapes, validated (pydantic), with zhilu's limits."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zhilu.serve.engine import SamplingParams


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 0  # 0: the model's context
    max_tokens: int = 0  # per choice; 0: the model's context
    max_n: int = 8
    max_request_bytes: int = 1 << 20
    max_queue: int = 256  # sequences waiting; more is 429


class APIError(Exception):
    """An error the client sees as ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=False)

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", "stop")
        return tuple(stops)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)


def parse(body: bytes, kind: type[BaseModel]) -> Any:
    """The request ``body`` as ``kind``; a 400 APIError naming the first bad field."""
    import json

    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param) from None


def sampling(req: _Sampling, max_tokens: int | None, prompt_len: int, context: int, limits: Limits) -> SamplingParams:
    """The engine's sampling parameters for one prompt of ``prompt_len`` tokens, checked against the limits."""
    longest_prompt = min(limits.max_prompt_tokens or context - 1, context - 1)
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", "prompt")
    if prompt_len > longest_prompt:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model takes at most {longest_prompt}",
                       "prompt", "context_length_exceeded")
    room = context - prompt_len
    if max_tokens is None:
        max_tokens = min(16, room) if isinstance(req, CompletionRequest) else room
    cap = min(limits.max_tokens or context, room)
    if max_tokens > cap:
        raise APIError(400, f"max_tokens is {max_tokens}, but at most {cap} fit (prompt of {prompt_len} tokens, "
                            f"context of {context}, limit {limits.max_tokens or context})", "max_tokens",
                       "context_length_exceeded")
    if req.n > limits.max_n:
        raise APIError(400, f"n is {req.n}; at most {limits.max_n}", "n")
    return SamplingParams(max_tokens, req.temperature, req.top_p, req.seed, req.stops())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
