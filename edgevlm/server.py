"""`edgevlm serve`: an OpenAI-compatible HTTP server over a pipeline (pip install 'edgevlm[serve]').

    POST /v1/chat/completions   image_url parts (data URLs; local paths under --allow-dir), stream, max_tokens
                                (each stage's output, thinking included), temperature, seed, response_format
                                (json_schema, json_object); the Extract->Think intermediates in the `edgevlm`
                                field of the response
    GET  /v1/models, /health, /metrics (Prometheus text)

Requests go through an edgevlm.runner.Runner: the models answer one at a time (two when pipelined), a full
queue is a 503, and a client that goes away cancels its request, streamed or not. A malformed, oversized or
unauthorised request is a 4xx with a JSON error; nothing answers with a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from edgevlm.errors import EdgeVLMError, ImageError, InputTooLongError, UsageError
from edgevlm.prompts import THINK_BUDGET
from edgevlm.results import Result
from edgevlm.runner import QueueFullError, Runner

MAX_BODY_BYTES = 20_000_000  # a 4K PNG as a data URL is ~15 MB
MAX_TOKENS = 4096  # the most `max_tokens` a client may ask for
DISCONNECT_POLL_S = 0.25  # how often a plain (not streamed) request looks for its client having gone
CLIENT_GONE = 499  # the status counted for a request whose client went away before its answer (nginx's)
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # seconds, for the stage latency histograms


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass
class Limits:
    max_body_bytes: int = MAX_BODY_BYTES
    max_tokens: int = MAX_TOKENS
    allow_dir: Path | None = None  # image_url may name a file under this folder; else data URLs only


@dataclass
class Metrics:
    """What /metrics reports, in Prometheus' text format."""

    requests: Counter = field(default_factory=Counter)  # by status code
    stage_seconds: dict = field(default_factory=lambda: defaultdict(lambda: [0] * (len(BUCKETS) + 1)))
    stage_sum: Counter = field(default_factory=Counter)
    tokens: int = 0
    decode_seconds: float = 0.0
    vision_cache: Counter = field(default_factory=Counter)  # hit / miss

    def observe(self, result: Result) -> None:
        for name, stage in result.stages.items():
            seconds = stage.timings.total_ms / 1e3
            counts = self.stage_seconds[name]
            counts[next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))] += 1
            self.stage_sum[name] += seconds
            self.tokens += stage.new_tokens
            self.decode_seconds += stage.timings.decode_ms / 1e3
            if "vision_cache" in stage.memory:
                self.vision_cache[stage.memory["vision_cache"]] += 1

    def text(self, queue_depth: int) -> str:
        lines = ["# TYPE edgevlm_requests_total counter"]
        lines += [f'edgevlm_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
        lines += ["# TYPE edgevlm_queue_depth gauge", f"edgevlm_queue_depth {queue_depth}",
                  "# TYPE edgevlm_stage_seconds histogram"]
        for name, counts in sorted(self.stage_seconds.items()):
            total = 0
            for bound, n in zip([*BUCKETS, "+Inf"], counts, strict=True):
                total += n
                lines.append(f'edgevlm_stage_seconds_bucket{{stage="{name}",le="{bound}"}} {total}')
            lines += [f'edgevlm_stage_seconds_sum{{stage="{name}"}} {self.stage_sum[name]:.6f}',
                      f'edgevlm_stage_seconds_count{{stage="{name}"}} {total}']
        rate = self.tokens / self.decode_seconds if self.decode_seconds else 0.0
        lines += ["# TYPE edgevlm_decode_tokens_per_second gauge", f"edgevlm_decode_tokens_per_second {rate:.3f}",
                  "# TYPE edgevlm_vision_cache_total counter"]
        lines += [f'edgevlm_vision_cache_total{{outcome="{k}"}} {n}' for k, n in sorted(self.vision_cache.items())]
        return "\n".join(lines) + "\n"


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _image(url: str, limits: Limits):
    """The image bytes of an image_url: a base64 data URL, or a path under the allowed folder."""
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise HttpError(400, "image_url: a data URL must be base64-encoded")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise HttpError(400, "image_url: the data URL is not valid base64") from None
    if limits.allow_dir is None:
        raise HttpError(400, "image_url: only data URLs are accepted (the server allows no local folder)")
    root = limits.allow_dir.resolve()
    path = (root / url.removeprefix("file://")).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise HttpError(400, f"image_url: {url!r} is not a file in the allowed folder")
    return str(path)


def parse_chat(body, limits: Limits) -> tuple[object, str, dict, bool]:
    """(image, question, pipeline options, stream) of a chat completion request, or an HttpError."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise HttpError(400, "the body must be a JSON object with a non-empty `messages` list")
    user = next((m for m in reversed(body["messages"]) if isinstance(m, dict) and m.get("role") == "user"), None)
    if user is None:
        raise HttpError(400, "`messages` has no user message")
    content = user.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise HttpError(400, "a user message's content must be a string or a list of parts")
    texts = [p.get("text") for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    urls = [p.get("image_url") for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
    if len(urls) != 1:
        raise HttpError(400, f"the user message must hold exactly one image_url part, got {len(urls)}")
    url = urls[0].get("url") if isinstance(urls[0], dict) else urls[0]
    if not isinstance(url, str) or not all(isinstance(t, str) for t in texts) or not texts:
        raise HttpError(400, "the user message needs text parts and an image_url with a `url` string")
    options = {key: body[name] for name, key in (("temperature", "temperature"), ("seed", "seed"),
                                                  ("max_tokens", "max_new_tokens")) if body.get(name) is not None}
    tokens = options.get("max_new_tokens")
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        if tokens > limits.max_tokens:
            raise HttpError(400, f"max_tokens is {tokens}; this server allows {limits.max_tokens}")
        if tokens >= 1:  # it bounds each stage's output, the reasoner's thinking included
            options["think_budget"] = min(tokens, THINK_BUDGET)
    options.update(_response_format(body.get("response_format")))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HttpError(400, "`stream` must be true or false")
    return _image(url, limits), "\n".join(texts), options, stream


def _response_format(fmt) -> dict:
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return {}
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"schema": {"type": "object"}}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        schema = fmt["json_schema"].get("schema")
        if isinstance(schema, dict):
            return {"schema": schema}
    raise HttpError(400, "response_format must be text, json_object, or json_schema with a `schema` object")


def completion(result: Result, model: str, request_id: str) -> dict:
    """The chat.completion object of a Result, its Extract->Think intermediates under `edgevlm`."""
    last = next(reversed(result.stages.values()), None)
    finish = "stop" if last is None or last.stop_reason == "eos" else "length"
    prompt = sum(s.prompt_tokens for s in result.stages.values())
    generated = sum(s.new_tokens for s in result.stages.values())
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated},
            "edgevlm": _intermediates(result)}


def _intermediates(result: Result) -> dict:
    out = result.to_dict()
    return {k: out[k] for k in ("answer_json", "instruction", "extraction", "reasoning", "response", "cut",
                                "timings", "tokens", "notes")}


def create_app(runner: Runner, *, model: str, api_key: str | None = None, limits: Limits | None = None) -> Starlette:
    limits = limits or Limits()
    metrics = Metrics()

    async def chat(http: HttpRequest) -> Response:
        status = 500
        try:
            _authorise(http, api_key)
            body = await _body(http, limits)
            image, question, options, stream = parse_chat(body, limits)
            request = runner.submit(image, question, **options)
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            if stream:
                status = 200
                return StreamingResponse(_sse(request, model, request_id, metrics), media_type="text/event-stream")
            result = await _result(http, request)
            if result is None:
                status = CLIENT_GONE
                return Response(status_code=CLIENT_GONE)
            metrics.observe(result)
            status = 200
            return JSONResponse(completion(result, model, request_id))
        except HttpError as e:
            status = e.status
            return _error(e.status, e.message, e.kind)
        except QueueFullError as e:
            status = 503
            return _error(503, str(e), "overloaded")
        except (UsageError, ImageError, InputTooLongError) as e:
            status = 400
            return _error(400, str(e))
        except EdgeVLMError as e:
            return _error(500, str(e), "server_error")
        finally:
            metrics.requests[status] += 1

    async def models(http: HttpRequest) -> Response:
        try:
            _authorise(http, api_key)
        except HttpError as e:
            return _error(e.status, e.message, e.kind)
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "edgevlm"}]})

    async def health(http: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "queue_depth": runner.waiting})

    async def prometheus(http: HttpRequest) -> Response:
        return PlainTextResponse(metrics.text(runner.waiting), media_type="text/plain; version=0.0.4")

    async def unhandled(http: HttpRequest, exc: Exception) -> Response:
        return _error(500, "internal error", "server_error")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/models", models), Route("/health", health), Route("/metrics", prometheus)],
                     exception_handlers={Exception: unhandled})


def _authorise(http: HttpRequest, api_key: str | None) -> None:
    if api_key is None:
        return
    given = http.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise HttpError(401, "a valid API key is needed (Authorization: Bearer KEY)", "authentication_error")


async def _body(http: HttpRequest, limits: Limits):
    declared = http.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
        raise HttpError(413, f"the body is over {limits.max_body_bytes} bytes")
    data = bytearray()
    async for chunk in http.stream():
        data += chunk
        if len(data) > limits.max_body_bytes:
            raise HttpError(413, f"the body is over {limits.max_body_bytes} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise HttpError(400, "the body is not valid JSON") from None


async def _result(http: HttpRequest, request):
    """The request's Result, or None when the client went away first: the request is then cancelled (dropped if
    waiting, else stopped at its next token), so the models move on."""
    waiting = asyncio.wrap_future(request.future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if done:
            return waiting.result()
        if await http.is_disconnected():
            request.cancel()
            return None


async def _sse(request, model: str, request_id: str, metrics: Metrics):
    """Server-sent events: the last stage's tokens as `reasoning_content` deltas while it thinks, the answer
    as the `content` delta (so the streamed content is the same answer a plain request gets), the final chunk
    (finish_reason and the intermediates), then [DONE]. A client that goes away cancels the request."""
    def chunk(delta: dict, finish=None, extra=None) -> str:
        body = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **(extra or {})}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant"})
        async for event in request.aevents():
            if event.kind == "token" and event.stage in ("think", "direct"):
                yield chunk({"reasoning_content": event.text})
            elif event.kind == "done":
                metrics.observe(event.result)
                done = completion(event.result, model, request_id)
                yield chunk({"content": event.result.answer})
                yield chunk({}, done["choices"][0]["finish_reason"], {"edgevlm": done["edgevlm"]})
        try:
            await request
        except Exception as e:  # noqa: BLE001 - the stream has begun: the error goes in an event
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        request.cancel()
