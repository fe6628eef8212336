"""The HTTP API of ``slimtune serve``: OpenAI's shapes on FastAPI, Prometheus metrics.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``),
``POST /v1/outcomes``, ``GET /v1/models``, ``GET /healthz``, ``GET /metrics``. The
request's ``model`` is ``base``, a store version id, a tag or a split's name; every
response names the version that served it (``slimtune.delta`` in the body,
``x-slimtune-delta`` in the headers) and, for a split, the arm. Errors have OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``, and an HTTP status.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Finished, Job, UnknownModel
from .traffic import RequestLog, Split


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str = ""):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class Message(BaseModel):
    role: str
    content: str


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    user: str | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    stop: str | list[str] | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
        return tuple(stops)


class CompletionRequest(_Sampling):
    prompt: str


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class Outcome(BaseModel):
    id: str  # the response's id
    # e.g. 1 for a good answer, 0 for a bad one (true/false are read so); finite
    value: float = Field(allow_inf_nan=False)


class Metrics:
    """Prometheus counters and histograms per served version (one registry per app)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "slimtune_requests",
            "Requests answered, by version served and outcome",
            ["delta", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "slimtune_request_errors",
            "Requests refused or failed, by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "slimtune_request_latency_seconds",
            "Time from request to last token, by version served",
            ["delta"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.tokens = Counter(
            "slimtune_generated_tokens",
            "Completion tokens generated, by version served",
            ["delta"],
            registry=self.registry,
        )
        self.speed = Gauge(
            "slimtune_tokens_per_second",
            "Completion tokens per second of the last batch, by version served",
            ["delta"],
            registry=self.registry,
        )

        self.batches = Counter(
            "slimtune_batches",
            "Batches generated: mixed (rows of several versions in one forward) or single",
            ["kind"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "slimtune_batch_size",
            "Requests per generated batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )

    def batch(self, kind: str, size: int) -> None:
        self.batches.labels(kind).inc()
        self.batch_size.observe(size)

    def finished(self, done: Finished, started: float) -> None:
        self.requests.labels(done.delta, "ok").inc()
        self.latency.labels(done.delta).observe(time.perf_counter() - started)
        self.tokens.labels(done.delta).inc(done.completion_tokens)
        if done.seconds > 0:
            self.speed.labels(done.delta).set(done.completion_tokens / done.seconds)


def create_app(
    engine: Engine,
    *,
    default_max_tokens: int = 128,
    splits: dict[str, Split] | None = None,
    log: RequestLog | None = None,
) -> FastAPI:
    """The app over ``engine``; ``splits`` by name (a request for that name gets one of its
    arms; they take precedence over the store's, which are read per request); ``log``
    records every request and the outcomes posted back."""
    app = FastAPI(title="slimtune serve", version="1")
    metrics = Metrics()
    splits = dict(splits or {})
    app.state.engine, app.state.metrics, app.state.log = engine, metrics, log
    engine.on_batch = metrics.batch

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        metrics.errors.labels(str(e.status)).inc()
        return _error(e.status, e.message, e.param, e.code or None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        metrics.errors.labels("400").inc()
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", None, "invalid_json")
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", where)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        metrics.errors.labels("500").inc()
        return _error(500, f"{type(e).__name__}: {e}", None, "internal_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        metrics.errors.labels(str(e.status_code)).inc()
        return _error(e.status_code, str(e.detail))

    @app.get("/healthz")
    async def healthz():
        if not engine.alive:  # the worker that owns the model has stopped
            return JSONResponse({"status": "down"}, status_code=503)
        return {"status": "ok", "serving": engine.serving}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def all_splits() -> dict[str, Split]:
        return {**await run_in_threadpool(engine.splits), **splits}

    @app.get("/v1/models")
    async def models() -> dict:
        live = await all_splits()
        data = [
            {
                "id": m["id"],
                "object": "model",
                "created": 0,
                "owned_by": "slimtune",
                "slimtune": {"serves": m["serves"]},
            }
            for m in await run_in_threadpool(engine.models)
            if m["id"] not in live  # a split's name serves the split
        ]
        data += [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "slimtune",
                "slimtune": {"split": {arm: share for arm, share in split.arms}},
            }
            for name, split in live.items()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/outcomes")
    async def outcomes(body: Outcome) -> dict:
        if log is None:
            raise ApiError(400, "this server keeps no log of requests: start it with --log")
        answered = log.answered(body.id)
        if answered is None:
            raise ApiError(
                404,
                f"no recent request with id {body.id!r} (use the id of the response)",
                param="id",
            )
        await run_in_threadpool(log.outcome, body.id, body.value)
        return {"id": body.id, "delta": answered["delta"], "arm": answered.get("arm")}

    def record(job: Job, response_id: str, started: float, done: Finished | None) -> None:
        if log is None:
            return
        log.request(
            {
                "id": response_id,
                "model": job.split or job.model,
                "split": job.split,
                "arm": job.model if job.split else None,
                "user": job.user,
                "delta": done.delta if done else (job.target.version if job.target else None),
                "status": "ok" if done else "error",
                "finish_reason": done.finish_reason if done else None,
                "prompt_tokens": len(job.prompt_ids),
                "completion_tokens": done.completion_tokens if done else 0,
                "latency_s": round(time.perf_counter() - started, 6),
            }
        )

    async def _job(body: _Sampling, prompt_ids: list[int]) -> Job:
        param = "messages" if isinstance(body, ChatRequest) else "prompt"
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param=param)
        stops = body.stops()
        split = splits.get(body.model) or (await all_splits()).get(body.model)
        model = split.choose(body.user) if split else body.model
        try:  # a store read: off the event loop
            await run_in_threadpool(engine.resolve, model)
        except UnknownModel as e:
            what = f"model {body.model!r}" + (f" (split arm {model!r})" if split else "")
            raise ApiError(404, f"{what}: {e}", param="model", code="model_not_found") from None
        max_tokens = body.max_tokens or default_max_tokens
        if len(prompt_ids) + max_tokens > engine.context:
            raise ApiError(
                400,
                f"the prompt is {len(prompt_ids)} tokens and max_tokens {max_tokens}: more "
                f"than the model's context of {engine.context} tokens",
                param=param,
                code="context_length_exceeded",
            )
        return Job(
            model=model,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=stops,
            user=body.user,
            split=split.name if split else None,
        )

    async def _answer(job: Job, chat: bool, stream: bool):
        started = time.perf_counter()
        events = engine.submit(job)
        kind = "chat.completion" if chat else "text_completion"
        response_id = ("chatcmpl-" if chat else "cmpl-") + job.id
        base = {"id": response_id, "model": job.split or job.model}

        def served(version: str | None) -> dict:
            out: dict[str, Any] = {"delta": version}
            if job.split:
                out.update(split=job.split, arm=job.model)
            return out

        def headers(version: str | None) -> dict[str, str]:
            h = {"x-slimtune-delta": version or ""}
            if job.split:
                h["x-slimtune-arm"] = job.model
            return h

        def choice(text: str | None, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "finish_reason": finish}
            key = "delta" if delta else "message"
            msg = {"role": "assistant", "content": text} if text is not None else {}
            return {"index": 0, key: msg, "finish_reason": finish}

        def errored() -> None:  # counted and logged once, streamed or not
            metrics.requests.labels(job.target.version if job.target else "?", "error").inc()
            record(job, response_id, started, None)

        def failed(value: tuple[int, str]) -> ApiError:
            status, message = value
            errored()
            if status == 404:
                return ApiError(404, message, param="model", code="model_not_found")
            return ApiError(status, message, code="generation_failed")

        if not stream:
            answered = False
            try:
                while True:
                    kind_, value = await events.get()
                    if kind_ == "error":
                        raise failed(value)
                    if kind_ == "done":
                        answered = True
                        break
            finally:  # the client went away (this coroutine cancelled): stop its rows
                job.cancelled = not answered
            done: Finished = value
            metrics.finished(done, started)
            record(job, response_id, started, done)
            body = {
                **base,
                "object": kind,
                "created": int(job.created),
                "choices": [choice(done.text, done.finish_reason, False)],
                "usage": {
                    "prompt_tokens": done.prompt_tokens,
                    "completion_tokens": done.completion_tokens,
                    "total_tokens": done.prompt_tokens + done.completion_tokens,
                },
                "slimtune": served(done.delta),
            }
            return JSONResponse(body, headers=headers(done.delta))

        try:
            first = await events.get()  # the version is known once the job's batch starts
        except BaseException:
            job.cancelled = True
            raise
        if first[0] == "error":  # nothing sent yet: an HTTP error, not a stream
            raise failed(first[1])

        async def sse() -> AsyncIterator[str]:
            finished = False
            try:
                async for text in _events(first):
                    yield text
                finished = True
            finally:
                job.cancelled = not finished

        async def _events(event) -> AsyncIterator[str]:
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            while True:
                kind_, value = event
                if kind_ == "error":
                    errored()
                    err = {"error": {"message": value[1], "type": "server_error"}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                if kind_ == "delta":
                    chunk = {
                        **base,
                        "object": chunk_kind,
                        "created": int(job.created),
                        "choices": [choice(value, None, True)],
                        "slimtune": served(job.target.version if job.target else None),
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
                if kind_ == "done":
                    metrics.finished(value, started)
                    record(job, response_id, started, value)
                    chunk = {
                        **base,
                        "object": chunk_kind,
                        "created": int(job.created),
                        "choices": [choice(None, value.finish_reason, True)],
                        "slimtune": served(value.delta),
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                    break
                event = await events.get()

        return StreamingResponse(
            sse(),
            media_type="text/event-stream",
            headers=headers(job.target.version if job.target else None),
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        ids = list(engine.tokenizer(body.prompt, add_special_tokens=True)["input_ids"])
        return await _answer(await _job(body, ids), chat=False, stream=body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        tok = engine.tokenizer
        messages: list[dict[str, Any]] = [m.model_dump() for m in body.messages]
        if getattr(tok, "chat_template", None):
            try:  # a template that refuses the turns (Gemma's: roles must alternate)
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:
                raise ApiError(400, f"messages: {e}", param="messages") from e
        else:  # a tokenizer without a template: the turns as plain lines
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        return await _answer(await _job(body, ids), chat=True, stream=body.stream)

    return app
