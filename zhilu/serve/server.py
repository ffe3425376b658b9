"""The HTTP side of ``zhilu serve``: OpenAI's completions and chat completions, models, health, metrics.

    zhilu serve runs/tiny --port 8000
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "tiny", "prompt": "def main", "max_tokens": 32, "temperature": 0}'

Every response names the checkpoint step that produced it (``system_fingerprint``
``step-N`` and the header ``x-zhilu-checkpoint-step``). Errors have OpenAI's body; a request
never gets a 500 for bad input, and the server answers the next one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from zhilu.serve.engine import Engine, Event, Sequence
from zhilu.serve.protocol import APIError, ChatRequest, CompletionRequest, Limits, new_id, now, parse, sampling


@dataclass
class ServedModel:
    name: str  # the id clients send as "model"
    engine: Engine
    context: int  # tokens of context
    tokenizer: Any  # TextTokenizer | None
    chat_template: Any = None  # a function messages -> prompt text, where the model has a chat template


class Metrics:
    """Prometheus metrics of the server, in its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("zhilu_serve_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("zhilu_serve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("zhilu_serve_generation_tokens", "Tokens generated", registry=r)
        buckets = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("zhilu_serve_time_to_first_token_seconds", "Time from request to its first token",
                              buckets=buckets, registry=r)
        self.tpot = Histogram("zhilu_serve_time_per_output_token_seconds", "Time per output token after the "
                              "first", buckets=buckets, registry=r)
        self.queue = Gauge("zhilu_serve_queue_length", "Sequences waiting for a slot", registry=r)
        self.batch = Gauge("zhilu_serve_batch_size", "Sequences in the running batch", registry=r)
        self.step = Gauge("zhilu_serve_checkpoint_step", "Checkpoint step new requests are served from", registry=r)

    def on_step(self, batch: int, waiting: int) -> None:
        self.batch.set(batch)
        self.queue.set(waiting)

    def done(self, seq: Sequence, submitted: float) -> None:
        self.generation_tokens.inc(len(seq.tokens))
        if seq.first_token is not None:
            self.ttft.observe(seq.first_token - submitted)
            if len(seq.tokens) > 1:
                self.tpot.observe((time.perf_counter() - seq.first_token) / (len(seq.tokens) - 1))


def create_app(served: ServedModel, limits: Limits, api_key: str | None = None,
               metrics: Metrics | None = None) -> FastAPI:
    """The ASGI application serving ``served``."""
    app = FastAPI(title="zhilu serve", docs_url=None, redoc_url=None, openapi_url=None)
    m = metrics or Metrics()
    m.step.set(served.engine.version.step)
    app.state.metrics = m

    def error(e: APIError, endpoint: str) -> JSONResponse:
        m.requests.labels(endpoint, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code),
                     "other")

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if api_key is not None and request.url.path != "/healthz":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(APIError(401, "a valid API key is needed: Authorization: Bearer KEY", None,
                                      "invalid_api_key"), request.url.path)
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limits.max_request_bytes):
            return error(APIError(413, f"the request body is over {limits.max_request_bytes} bytes", None,
                                  "request_too_large"), request.url.path)
        return await call_next(request)

    async def body_of(request: Request) -> bytes:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_request_bytes:
                raise APIError(413, f"the request body is over {limits.max_request_bytes} bytes", None,
                               "request_too_large")
        return body

    def model_card() -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": now(), "owned_by": "zhilu",
                "checkpoint_step": served.engine.version.step, "max_model_len": served.context}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "checkpoint_step": served.engine.version.step}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        m.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        if name != served.name:
            return error(APIError(404, f"the model {name!r} does not exist; valid: {served.name}", "model",
                                  "model_not_found"), "/v1/models")
        return JSONResponse(model_card())

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            req = parse(await body_of(request), CompletionRequest)
            return await _generate(req, _prompts(req), "text_completion", "/v1/completions")
        except APIError as e:
            return error(e, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            req = parse(await body_of(request), ChatRequest)
            if served.chat_template is None:
                raise APIError(400, f"{served.name} has no chat template; valid: /v1/completions", "messages")
            text = served.chat_template([msg.model_dump() for msg in req.messages])
            return await _generate(req, [served.tokenizer.encode(text)], "chat.completion", "/v1/chat/completions")
        except APIError as e:
            return error(e, "/v1/chat/completions")

    def _prompts(req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        texts = [p] if isinstance(p, str) else p if p and isinstance(p[0], str) else None
        if texts is not None:
            if served.tokenizer is None:
                raise APIError(400, f"{served.name} has no tokenizer (it was trained on token ids); valid: the "
                                    "prompt as a list of token ids", "prompt")
            return [served.tokenizer.encode(t) for t in texts]
        ids = [p] if not p or isinstance(p[0], int) else p
        vocab = getattr(served.engine.version.model, "cfg", None)
        top = vocab.vocab_size if vocab is not None else None
        for row in ids:
            if top is not None and any(not 0 <= i < top for i in row):
                raise APIError(400, f"token ids must be in [0, {top})", "prompt")
        return ids  # type: ignore[return-value]

    async def _generate(req: Any, prompts: list[list[int]], kind: str, endpoint: str) -> Response:
        if req.model != served.name:
            raise APIError(404, f"the model {req.model!r} does not exist; valid: {served.name}", "model",
                           "model_not_found")
        if getattr(req, "logprobs", None) is not None or getattr(req, "echo", False) or \
                (getattr(req, "best_of", None) or 1) > 1:
            raise APIError(400, "logprobs, echo and best_of are not supported", "logprobs")
        limit = getattr(req, "max_completion_tokens", None) or req.max_tokens
        params = [sampling(req, limit, len(p), served.context, limits) for p in prompts]
        if served.engine.queued() + len(prompts) * req.n > limits.max_queue:
            raise APIError(429, f"the queue is full ({limits.max_queue} waiting); retry later", None,
                           "queue_full")
        loop = asyncio.get_running_loop()
        submitted = time.perf_counter()
        queues: list[asyncio.Queue[Event]] = []
        seqs: list[Sequence] = []
        engine = served.engine
        version = engine.version  # every choice of the request on the same weights
        for p, sp in zip(prompts, params):
            for j in range(req.n):
                q: asyncio.Queue[Event] = asyncio.Queue()
                queues.append(q)
                seqs.append(engine.submit(p, sp, lambda e, q=q: loop.call_soon_threadsafe(q.put_nowait, e),
                                          index=j, version=version))
        m.prompt_tokens.inc(sum(len(p) for p in prompts))
        rid = new_id("cmpl" if kind == "text_completion" else "chatcmpl")
        head = {"id": rid, "created": now(), "model": served.name, "system_fingerprint": f"step-{version.step}"}
        headers = {"x-zhilu-checkpoint-step": str(version.step)}
        def usage() -> dict[str, int]:
            prompt, completion = sum(len(p) for p in prompts), sum(len(s.tokens) for s in seqs)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        if not req.stream:
            texts, reasons, ids = [""] * len(seqs), [None] * len(seqs), [[] for _ in seqs]
            for i, q in enumerate(queues):
                while reasons[i] is None:
                    e = await q.get()
                    if e.error:
                        raise APIError(500, e.error)
                    texts[i] += e.text
                    ids[i] += e.token_ids
                    reasons[i] = e.finish_reason
                m.done(seqs[i], submitted)
            choices = [_choice(kind, i, texts[i], reasons[i], ids[i]) for i in range(len(seqs))]
            m.requests.labels(endpoint, "200").inc()
            return JSONResponse({**head, "object": kind, "choices": choices, "usage": usage()},
                                headers=headers)

        async def events() -> AsyncIterator[str]:
            chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
            pending: dict[asyncio.Future[Event], int] = {}
            try:
                if kind != "text_completion":
                    for i in range(len(seqs)):
                        yield _sse({**head, "object": chunk_kind, "choices": [
                            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
                pending.update({asyncio.ensure_future(q.get()): i for i, q in enumerate(queues)})
                while pending:
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for fut in done:
                        i = pending.pop(fut)
                        e = fut.result()
                        if e.error:
                            yield _sse({"error": APIError(500, e.error).body()["error"]})
                            yield "data: [DONE]\n\n"
                            return
                        if e.text or e.finish_reason:
                            yield _sse({**head, "object": chunk_kind,
                                        "choices": [_delta(kind, i, e.text, e.finish_reason, e.token_ids)]})
                        if e.finish_reason is None:
                            pending[asyncio.ensure_future(queues[i].get())] = i
                        else:
                            m.done(seqs[i], submitted)
                if req.include_usage():
                    yield _sse({**head, "object": chunk_kind, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
                m.requests.labels(endpoint, "200").inc()
            finally:  # the stream is done, or its client has gone
                for fut in pending:
                    fut.cancel()
                for s in seqs:
                    engine.cancel(s)

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app


def _choice(kind: str, index: int, text: str, reason: str | None, ids: list[int]) -> dict[str, Any]:
    if kind == "text_completion":
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": None, "token_ids": ids}
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
            "logprobs": None}


def _delta(kind: str, index: int, text: str, reason: str | None, ids: list[int]) -> dict[str, Any]:
    if kind == "text_completion":
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
    return {"index": index, "delta": {"content": text} if text else {}, "finish_reason": reason, "logprobs": None}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"
