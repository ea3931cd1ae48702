"""``python -m sia_edge.serve``: an OpenAI-compatible HTTP server over the steering engine.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``:
server-sent events), ``GET /v1/models``, ``GET /health``, and a chat page at ``GET /`` that shows
where steering acted (sia_edge/web/chat.html). Steering settings are extra request
fields, one per setting of sia_edge/steering.py (``sia_mode``, ``tau``, ``k``, ``w``, ``target_ratio``, ``p``,
``head``, ``follow``, ``horizon``; ``seed`` and ``temperature`` as usual; ``gate``, the former name of
``sia_mode``, is refused), and every response carries the generation's stats under ``"sia"``.
With ``"sia_tokens": true``, streamed token chunks carry ``"sia_token": {"junction", "entropy",
"token_id"}`` (and the candidates, their values and the ``shift`` steering made at a junction).

Generation is blocking native work: it runs on a pool of ``--parallel`` worker threads; further
requests wait their turn (up to ``--max-queue``, then 429 with ``Retry-After``). A client that
disconnects, streaming or not, running or still queued, cancels its generation, and its slot goes to
the next request once the engine has let go of it.

Every field is honoured or refused (docs/EMBEDDING.md, "Every request field"): ``top_p``, ``min_p``
and ``top_k`` over the candidates, ``n`` choices, ``logprobs`` of the distribution each token was
sampled from, ``response_format`` JSON modes and a GBNF ``grammar`` through llama.cpp's grammar
sampler (``sia_edge.grammar``); fields that would change the distribution after the steering step
(penalties, logit_bias), ``echo`` and tools are refused, and so is any field the server does not
know. A ``model`` other than the one served is 404 (``model_not_found``); leaving it out is fine.
``--api-key`` requires a bearer key on /v1; ``--cors-origin`` lets named web origins call it.

Limits (docs/EMBEDDING.md, "Limits and promises"): a request body of at most ``--max-request-bytes``
(default 2 MiB; larger is 413 before it is read), sent as ``Content-Type: application/json`` (else
415); the request's headers and body must arrive within ``--read-timeout`` seconds of its first byte
(default 30; then 408 and the connection is closed), and a connection with no request in progress
is closed after ``--idle-timeout`` seconds (default 15). Every error is in OpenAI's format, and bad
input is a 4xx, never a 500. ``server_config(app)`` gives uvicorn the protocol that applies the timeouts.
"""

from __future__ import annotations

from sia_edge import _early_sigint  # noqa: F401  (first: a Ctrl-C while the imports below run exits quietly)

# isort: split
import asyncio
import functools
import importlib.resources
import ipaddress
import json
import math
import os
import re
import secrets
import signal
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import anyio
import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from sse_starlette import EventSourceResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from sia_edge import __version__
from sia_edge.cli_common import (
    CliParser,
    add_model_options,
    add_steering_options,
    base_model_path,
    build_engine,
    choose_value_model,
    finite_or_none,
    gate_horizon,
    mode_name,
    new_seed,
    recommended_horizon,
    run_cli,
    stats_payload,
    steering_config,
    undecodable_text,
)
from sia_edge.engine import ContextOverflowError, Generation, SteeringEngine, TokenEvent
from sia_edge.grammar import Grammar, GrammarDeadEnd, GrammarError, json_object, json_schema
from sia_edge.steering import GATE_KINDS, MAX_SEED, MODES, SETTINGS, SteeringConfig, gate_of, level_for_gate
from sia_edge.value_format import head_missing

__all__ = [
    "DEFAULT_IDLE_TIMEOUT", "DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_READ_TIMEOUT", "ApiError", "ServerState",
    "create_app", "main", "server_config",
]

PROG = "sia-edge serve"
API_KEY_ENV = "SIA_EDGE_API_KEY"

# Chat requests are text: 2 MiB holds a long conversation many times over what n_ctx tokens can
# take, while parsing and validating that much JSON stays in milliseconds.
DEFAULT_MAX_REQUEST_BYTES = 2 * 1024 * 1024
DEFAULT_READ_TIMEOUT = 30.0  # seconds for a request's headers and body, from its first byte
# Longer than the keep-alive expiry of common clients (httpx and the openai package: 5 s), so
# that they drop a pooled connection before the server does, and never send on a closing one.
DEFAULT_IDLE_TIMEOUT = 15.0
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
MAX_CHOICES = 8  # n: each choice is a whole generation, run one after the other
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat (completions: 5); also at most k here


# --------------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        # Messages and params can quote the request (a field's value, a dict key): a lone
        # surrogate from a JSON escape cannot be encoded as UTF-8 and would turn the 4xx into a
        # 500, and a newline would break the one-line message.
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _printable(text: str) -> str:
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request")
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        return ApiError(400, "the request body must be a JSON object")
    if not loc and first.get("type") == "missing":
        return ApiError(400, "the request body is empty; send a JSON object")
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":  # nothing a client sends is silently ignored
        return ApiError(400, f"{param}: this server does not take this field (docs/EMBEDDING.md lists every field "
                             "it takes and what it does)", param=param, code="unknown_parameter")
    msg = first.get("msg", "invalid value")
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


# --------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    # JSON has no NaN or infinity, but Python's parser reads NaN, Infinity and 1e999: refuse them
    # here, in one message, rather than in whichever setting would choke on them.
    # A field the server does not know is a 400 that names it, as OpenAI's API answers: an app
    # asking for something this server would not do learns it at once.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


# The steering fields of a request: one per setting of sia_edge.steering.SETTINGS that the server
# face shows (the mode as ``sia_mode``), checked by SteeringConfig itself when the request's
# settings are merged over the server's defaults.
STEERING_FIELDS: dict[str, str] = {s.field: s.name for s in SETTINGS if "server" in s.faces}
_SteeringFields: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "_SteeringFields", __base__=_Strict, **{s.field: (s.kind | None, None) for s in SETTINGS if "server" in s.faces})


class _GenerationRequest(_SteeringFields):  # type: ignore[misc,valid-type]
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)  # independent choices, choice i with seed + i
    stop: str | list[str] | None = None
    top_k: int | None = Field(default=None, ge=1)  # llama.cpp's name for k, the candidates per step
    user: str | None = None  # accepted, recorded nowhere
    response_format: ResponseFormat | None = None  # json_object / json_schema: decoding constrained by a grammar
    grammar: str | None = None  # extension, as llama.cpp's server: GBNF the answer must match
    sia_tokens: bool = False  # streamed chunks carry each token's steering (junction, entropy, values)
    gate: Any = None  # the former name of sia_mode: refused with a pointer to it
    # OpenAI and llama.cpp fields sia-edge refuses when they would change anything
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # accepted; chat templates have no place for a participant's name


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    tools: list[Any] | None = None
    top_logprobs: int | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None


def _message_text(m: ChatMessage, i: int) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages.{i}.content: only text parts are supported, got type "
                                f"{part.get('type')!r}", param=f"messages.{i}.content")
        parts.append(part["text"])
    return "".join(parts)


def _refuse_unsupported(req: _GenerationRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not supported: nothing may rewrite the logits after the "
                                "steering step", param=name)
    if req.repeat_penalty is not None and req.repeat_penalty != 1.0:
        raise ApiError(400, "repeat_penalty is not supported (1.0 only): nothing may rewrite the logits after "
                            "the steering step", param="repeat_penalty")
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported: nothing may rewrite the logits after the "
                            "steering step", param="logit_bias")
    if isinstance(req, ChatCompletionRequest) and req.tools:
        raise ApiError(400, "tools are not supported", param="tools")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if req.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")


def _culprit(config: SteeringConfig, changes: dict[str, Any], message: str) -> str | None:
    """The request's setting that SteeringConfig refused: the first that fails on its own, else
    (a combination, such as a head past the horizon) the one its message starts with."""
    for name, value in changes.items():
        try:
            replace(config, **{name: value})
        except ValueError:
            return name
    first_word = message.split(" ", 1)[0]
    return first_word if first_word in changes else None


def _stops(req: _GenerationRequest) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise ApiError(400, "stop: at most 4 stop sequences", param="stop")
    return [s for s in stops if s]


def _grammar(req: _GenerationRequest) -> tuple[Grammar | None, str | None]:
    """The grammar the answer must match (``response_format`` JSON modes, or GBNF ``grammar``),
    and the field that asked for it."""
    rf = req.response_format
    structured = rf is not None and rf.type != "text"
    if req.grammar is not None and structured:
        raise ApiError(400, "grammar and a JSON response_format both constrain the answer: send one",
                       param="grammar", code="invalid_value")
    if req.grammar is not None:
        return Grammar(req.grammar, "grammar"), "grammar"
    if rf is None or rf.type == "text":
        return None, None
    if rf.type == "json_object":
        return json_object(), "response_format"
    schema = (rf.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise ApiError(400, "response_format.json_schema.schema: a JSON schema object is required "
                            "({\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}})",
                       param="response_format.json_schema.schema", code="invalid_value")
    try:
        return json_schema(schema), "response_format"
    except ValueError as exc:
        raise ApiError(400, f"response_format: {exc}", param="response_format", code="invalid_value") from None


def _top_logprobs(req: _GenerationRequest) -> int | None:
    """How many alternatives each token's logprobs list (None: no logprobs), as OpenAI's two
    endpoints ask for them: chat ``logprobs: true`` with ``top_logprobs`` 0-20, completions
    ``logprobs`` 0-5."""
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs is not None and not isinstance(req.logprobs, bool):
            raise ApiError(400, "logprobs: true or false in a chat request (top_logprobs says how many "
                                "alternatives)", param="logprobs", code="invalid_value")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS}, got {req.top_logprobs}",
                           param="top_logprobs", code="invalid_value")
        return (req.top_logprobs or 0) if req.logprobs else None
    if req.logprobs is None or req.logprobs is False:
        return None
    if isinstance(req.logprobs, bool) or not 0 <= req.logprobs <= 5:
        raise ApiError(400, f"logprobs: a number of alternatives from 0 to 5, got {req.logprobs!r}",
                       param="logprobs", code="invalid_value")
    return int(req.logprobs)


# --------------------------------------------------------------------------- stop sequences
class StopMatcher:
    """Cuts streamed text at the first stop sequence, holding back any tail that could be the
    start of one so that no part of a stop sequence is ever sent."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        if self.hit:
            return ""
        buf = self.buffer + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self.buffer = True, ""
            return buf[:cut]
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self.buffer = buf[len(buf) - hold:]
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self.buffer = ("" if self.hit else self.buffer), ""
        return out


# --------------------------------------------------------------------------- running generations
@dataclass
class ServerState:
    """The engine, the request defaults, and the slots generations run in."""

    engine: SteeringEngine
    config: SteeringConfig
    max_tokens: int = 512
    seed: int | None = None
    parallel: int = 1
    max_queue: int = 64
    model_id: str = ""
    recommended_horizon: int | None = None  # the value model's, for the entropy gate (cli_common.gate_horizon)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    read_timeout: float = DEFAULT_READ_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    created: int = field(default_factory=lambda: int(time.time()))
    active: int = 0
    waiting: int = 0  # requests with a generation that wait for a slot
    starting: int = 0  # requests being validated and tokenised: they count against the queue too
    peak_active: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    _slots: asyncio.Semaphore | None = None
    _executor: ThreadPoolExecutor | None = None
    _held: deque[float] = field(default_factory=lambda: deque(maxlen=16))  # seconds recent generations held a slot

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        for name in ("read_timeout", "idle_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not self.model_id:
            self.model_id = self.engine.base.path.stem

    def note_slot_time(self, seconds: float) -> None:
        self._held.append(seconds)

    def retry_after(self) -> int:
        """Seconds until the queue likely has room: a slot frees, on average, every mean slot time
        divided by the slots; at least 1, and at most 60 so that clients keep trying."""
        if not self._held:
            return 1
        mean = sum(self._held) / len(self._held)
        return max(1, min(60, math.ceil(mean / self.parallel)))

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.parallel)
        return self._slots

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.parallel, thread_name_prefix="sia-generate")
        return self._executor

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok", "model": self.model_id, "version": __version__,
            "value_model": self.engine.value.name if self.engine.value is not None else None,
            "parallel": self.parallel, "active": self.active, "waiting": self.waiting + self.starting,
            "peak_active": self.peak_active, "completed": self.completed, "cancelled": self.cancelled,
            "failed": self.failed,
        }


@dataclass
class _Job:
    """A generation from the moment it joins the queue (``state.waiting``) until its request is
    counted as completed, cancelled or failed, which happens exactly once (``settled``)."""

    generation: Generation
    config: SteeringConfig
    seed: int
    stops: list[str]
    top_logprobs: int | None = None  # alternatives per token in the logprobs (None: no logprobs)
    index: int = 0  # the choice it answers (n > 1)
    settled: bool = False
    queued: bool = True  # still counted in state.waiting

    def leave_queue(self, state: ServerState) -> None:
        if self.queued:
            self.queued = False
            state.waiting -= 1

    def abandon(self, state: ServerState) -> None:
        """The client left before the generation got a slot: it never runs."""
        self.leave_queue(state)
        if not self.settled:
            self.settled = True
            self.generation.cancel()
            self.generation.close()
            state.cancelled += 1


class _End:
    pass


@dataclass(frozen=True)
class _Failed:
    error: BaseException


def _drain(gen: Generation, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[object]) -> None:
    """Worker thread: run the generation, handing each event to the event loop."""

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down): stop generating
            gen.cancel()

    try:
        with gen:
            for ev in gen:
                put(ev)
    except BaseException as exc:  # noqa: BLE001 -- handed to the request that owns the generation
        put(_Failed(exc))
    else:
        put(_End())


async def _events(state: ServerState, job: _Job) -> AsyncGenerator[TokenEvent, None]:
    """The generation's events, run in a worker slot. Leaving early (client gone, stop sequence)
    cancels the generation and waits until its contexts are back in the pool before the slot
    is handed on; leaving while still queued counts as cancelled too."""
    gen = job.generation
    if job.settled:
        return
    try:
        await state.slots.acquire()
    except BaseException:
        job.abandon(state)
        raise
    job.leave_queue(state)
    job.settled = True
    held_from = time.monotonic()
    state.active += 1
    state.peak_active = max(state.peak_active, state.active)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    worker: asyncio.Future[None] | None = None
    try:
        worker = loop.run_in_executor(state.executor, _drain, gen, loop, queue)
        while True:
            item = await queue.get()
            if isinstance(item, _End):
                break
            if isinstance(item, _Failed):
                raise item.error
            assert isinstance(item, TokenEvent)
            yield item
    finally:
        gen.cancel()
        try:
            if worker is not None:
                with anyio.CancelScope(shield=True):  # even when this request is being cancelled
                    await worker
        finally:
            # Even if a second, native asyncio cancellation cut the wait short: a slot that is
            # never released would shrink the server for good.
            state.active -= 1
            state.note_slot_time(time.monotonic() - held_from)
            if gen.stats.stop_reason == "cancelled":
                state.cancelled += 1
            elif gen.stats.stop_reason == "error" or worker is None:
                state.failed += 1
            else:
                state.completed += 1
            state.slots.release()


class _StreamResponse(EventSourceResponse):
    """Server-sent events for a request's jobs. A client that hangs up before the stream's first
    step (its generator then never runs), or before a later choice ran, still takes those jobs
    out of the queue, counted as cancelled."""

    def __init__(self, jobs: list[_Job], state: ServerState, content: AsyncIterator[dict[str, str]],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.jobs, self.sia_state = jobs, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for job in self.jobs:
                job.abandon(self.sia_state)


def _generation_error(exc: BaseException) -> ApiError:
    """An error a running generation raised, in OpenAI's format: a grammar that cannot be
    continued is the request's (400), anything else the server's."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, GrammarDeadEnd):
        return ApiError(400, str(exc), param="grammar", code="invalid_value")
    return ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error")


def _finish_reason(gen: Generation, stopped: bool) -> str:
    if stopped:
        return "stop"
    return {"length": "length", "context": "length"}.get(gen.stats.stop_reason, "stop")


def _sia(job: _Job, stopped: bool) -> dict[str, Any]:
    d = stats_payload(job.generation.stats, job.config, job.seed)
    if stopped:
        d["stop_reason"] = "stop"
    return d


def _usage(jobs: list[_Job]) -> dict[str, int]:
    """The prompt once (every choice answers the same prompt) and every choice's tokens."""
    p = jobs[0].generation.stats.prompt_tokens
    c = sum(job.generation.stats.tokens for job in jobs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sia_token(ev: TokenEvent, engine: SteeringEngine) -> dict[str, Any]:
    """A streamed token's steering (``sia_tokens``): whether it was a junction, the gate's
    entropy, and at a junction the candidates (ids and texts), their values and the probability
    steering moved; mode shift reports that share at every step it scored (its gate statistic)."""
    d: dict[str, Any] = {"junction": ev.junction, "entropy": finite_or_none(ev.entropy), "token_id": ev.token_id}
    if ev.junction or ev.shift:
        d["shift"] = finite_or_none(ev.shift)
    if ev.junction:
        d["candidates"], d["values"] = list(ev.candidates), [finite_or_none(v) for v in ev.values]
        d["candidate_texts"] = [engine.base.piece(c).decode("utf-8", "replace") for c in ev.candidates]
    return d


@functools.cache
def chat_page() -> str:
    """The chat page served at / (sia_edge/web/chat.html: static HTML and JavaScript)."""
    return (importlib.resources.files("sia_edge") / "web" / "chat.html").read_text(encoding="utf-8")


# The page's own script and styles are inline; it talks to this server only.
_PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
                "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# JSON has no -inf: a candidate that top_p or min_p cut (probability 0) is given OpenAI's own
# stand-in for an impossible token.
IMPOSSIBLE_LOGPROB = -9999.0


def _logprob(x: float) -> float:
    return x if math.isfinite(x) else IMPOSSIBLE_LOGPROB


class _Logprobs:
    """One choice's logprobs in OpenAI's format for its endpoint: each token's log probability
    under the distribution it was actually sampled from (steered at a junction, after
    temperature, top_p and min_p), its ``top`` likeliest alternatives under that distribution,
    and, as ``sia_base_logprob``, its log probability under the base model alone."""

    def __init__(self, engine: SteeringEngine, chat: bool, top: int) -> None:
        self.engine, self.chat, self.top = engine, chat, top
        self.content: list[dict[str, Any]] = []
        self.columns: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                              "text_offset": [], "sia_base_token_logprobs": []}
        self.offset = 0

    def _piece(self, token: int) -> tuple[str, list[int]]:
        raw = self.engine.base.piece(token)
        return raw.decode("utf-8", "replace"), list(raw)

    def add(self, ev: TokenEvent) -> dict[str, Any]:
        """Record one token; returns its logprobs alone (a streamed chunk's)."""
        lp = ev.logprobs
        assert lp is not None
        order = sorted(range(len(lp.candidates)), key=lambda i: -lp.sampled[i])[: self.top]
        text, raw = self._piece(ev.token_id)
        chosen, base = _logprob(lp.sampled[lp.chosen]), _logprob(lp.base[lp.chosen])
        if self.chat:
            alternatives = []
            for i in order:
                t, b = self._piece(lp.candidates[i])
                alternatives.append({"token": t, "logprob": _logprob(lp.sampled[i]), "bytes": b})
            entry = {"token": text, "logprob": chosen, "bytes": raw, "top_logprobs": alternatives,
                     "sia_base_logprob": base}
            self.content.append(entry)
            return {"content": [entry], "refusal": None}
        tops: dict[str, float] = {}
        for i in order:
            tops.setdefault(self._piece(lp.candidates[i])[0], _logprob(lp.sampled[i]))
        one: dict[str, list[Any]] = {"tokens": [text], "token_logprobs": [chosen], "top_logprobs": [tops],
                                     "text_offset": [self.offset], "sia_base_token_logprobs": [base]}
        for key, values in one.items():
            self.columns[key].extend(values)
        self.offset += len(ev.text)
        return one

    def result(self) -> dict[str, Any]:
        return {"content": self.content, "refusal": None} if self.chat else dict(self.columns)


# --------------------------------------------------------------------------- limits
class _RequestBody:
    """Raw ASGI middleware: reads each request's body before the app sees it, and refuses one
    larger than ``max_bytes`` (413, and the connection is closed) as soon as that is known: from
    Content-Length before reading anything, else by counting the bytes of a chunked body, so that
    a huge body is never parsed nor held. A generation request must say its body is JSON."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, declared: int | None) -> ApiError:
        size = f"{declared} bytes (Content-Length), more than" if declared is not None else "larger than"
        return ApiError(413, f"the request body is {size} this server's limit of {self.max_bytes} bytes; "
                             "send less, or start the server with a larger --max-request-bytes",
                        code="request_too_large", headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "").lstrip("0")
        # h11 has already checked that it is digits; int() of thousands of them would raise
        if declared.isdigit() and (len(declared) > 20 or int(declared) > self.max_bytes):
            await self._too_large(int(declared)).response()(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._too_large(None).response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        if scope["method"] == "POST" and _route_path(scope) in GENERATION_PATHS:
            problem = _content_type_problem(headers.get("content-type"))
            if problem:
                await ApiError(415, problem, code="unsupported_media_type").response()(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # then what the connection says next: a disconnect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _route_path(scope: Scope) -> str:
    """The request's path within this app: without the ``root_path`` a mount or a proxy prefix
    adds (Starlette keeps it in ``path``), so that checks by path hold wherever the app is mounted."""
    path, root = str(scope["path"]), str(scope.get("root_path", ""))
    return path[len(root):] if root and path.startswith(root) else path


class _ApiKey:
    """Raw ASGI middleware: /v1 requests need ``Authorization: Bearer KEY`` (401 in OpenAI's
    format without it); /health stays open for monitors."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = _route_path(scope) if scope["type"] == "http" else ""
        if route == "/v1" or route.startswith("/v1/"):
            given = Headers(scope=scope).get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.key):
                what = "no API key" if not given else "an incorrect API key"
                error = ApiError(401, f"the request has {what}: send 'Authorization: Bearer KEY' with this "
                                      "server's key (--api-key)", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _content_type_problem(value: str | None) -> str | None:
    """Why a generation request's Content-Type is refused, or None. A missing one is refused
    too: a web page can post a body without a type, or as text/plain or a form, to a local
    server without asking (no CORS preflight), and a server without --api-key has no other guard."""
    fix = "send the body as JSON with that header (curl: -H 'Content-Type: application/json')"
    if not value:
        return f"Content-Type must be application/json and the request has none; {fix}"
    media = value.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return None
    return f"Content-Type must be application/json, not {value.split(';', 1)[0].strip()!r}; {fix}"


class _TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the timeouts it lacks. uvicorn only closes a connection
    that stays idle after a response; one that never sends a request, or sends it a byte at a
    time (slowloris), would keep its socket for good. Here a connection with no request in
    progress is closed after ``idle_timeout`` (uvicorn's keep-alive timer, also armed when the
    connection opens), and a request whose headers and body have not all arrived
    ``read_timeout`` seconds after its first byte gets 408 and the connection is closed."""

    read_timeout: ClassVar[float] = DEFAULT_READ_TIMEOUT
    idle_timeout: ClassVar[float] = DEFAULT_IDLE_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.idle_timeout  # type: ignore[assignment]  # uvicorn types it int
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # the request is in (or the connection failed)
            self._stop_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """What h11 cannot parse (request line, headers, framing) gets a 400 in OpenAI's format too."""
        self._close_with(400, "Bad Request", ApiError(
            400, "the request is not valid HTTP/1.1: a malformed request line, header or Content-Length, or "
                 "headers too long", code="invalid_http"))

    def _close_with(self, status: int, reason: str, error: ApiError) -> None:
        """Answer ``error`` and close the connection; the app, if it was reading the body, sees a
        disconnect. Mid-response (after an early 413) nothing more can be said: just close."""
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            body = json.dumps(error.body()).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (status, reason.encode(), len(body), body))
        self.transport.close()

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        self._close_with(408, "Request Timeout", ApiError(
            408, f"the request did not arrive in time: its headers and body must arrive within "
                 f"{self.read_timeout:g} s of its first byte", code="request_timeout"))


def server_config(app: FastAPI, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's settings for an app from ``create_app``: its timeouts (``read_timeout``,
    ``idle_timeout``) applied by the protocol that enforces them. ``kwargs`` go to
    ``uvicorn.Config`` (``log_level``, ...). Serve it with ``uvicorn.Server(config)``."""
    state: ServerState = app.state.sia

    class Protocol(_TimedH11Protocol):
        read_timeout = state.read_timeout
        idle_timeout = state.idle_timeout

    kwargs.setdefault("ws", "none")
    kwargs.setdefault("lifespan", "on")
    return uvicorn.Config(app, http=Protocol, **kwargs)


# --------------------------------------------------------------------------- the app
def create_app(
    engine: SteeringEngine,
    *,
    config: SteeringConfig | None = None,
    max_tokens: int = 512,
    seed: int | None = None,
    parallel: int = 1,
    max_queue: int = 64,
    model_id: str | None = None,
    recommended_horizon: int | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
) -> FastAPI:
    """The FastAPI app serving ``engine``. ``config`` is the default steering of requests; its
    ``target_ratio``, if any, must already be resolved to a tau. ``recommended_horizon``: the
    value model's horizon for its entropy gate (``cli_common.recommended_horizon``): a request for
    another gate that names no horizon steers the whole answer, as the chat's ``--mode`` and
    ``/mode`` do, and one for the entropy gate gets it back. ``max_request_bytes`` bounds request
    bodies (the app enforces it); ``read_timeout`` and ``idle_timeout`` are the connection's,
    applied by the server that ``server_config(app)`` configures. ``api_key``: requests to /v1
    need ``Authorization: Bearer KEY`` (401 otherwise). ``cors_origins``: the web origins whose
    pages may call the API from a browser (CORS; none by default)."""
    if config is None:
        config = engine.recommended()  # what the value model was evaluated with, as generate() does
        if config.target_ratio is not None:
            config = config.with_tau(engine.calibrate_tau(config))
    if config.target_ratio is not None:
        raise ValueError("resolve the default config's target_ratio to a tau first (engine.calibrate_tau)")
    state = ServerState(engine, config, max_tokens=max_tokens, seed=seed, parallel=parallel,
                        max_queue=max_queue, model_id=model_id or "", recommended_horizon=recommended_horizon,
                        max_request_bytes=max_request_bytes, read_timeout=read_timeout,
                        idle_timeout=idle_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.shutdown()

    app = FastAPI(title="sia-edge", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sia = state
    # The last added is the outermost: CORS answers preflights and labels every response, the
    # key is checked before a body is read, the body is bounded before the app parses it.
    app.add_middleware(_RequestBody, max_bytes=max_request_bytes)
    if api_key is not None:
        app.add_middleware(_ApiKey, key=api_key)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's words for whatever json.loads raised other than a syntax error
            return ApiError(400, "the request body could not be read as JSON: it must be UTF-8, nested less "
                                 "than a thousand levels deep, with numbers of fewer than 4300 digits",
                            code="invalid_json").response()
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return state.health()

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(chat_page(), headers={"Content-Security-Policy": _PAGE_POLICY})

    def model_card() -> dict[str, Any]:
        return {
            "id": state.model_id, "object": "model", "created": state.created, "owned_by": "sia-edge",
            "sia": {
                "base_model": engine.base.path.name,
                "value_model": engine.value.name if engine.value is not None else None,
                "n_ctx": engine.n_ctx,
                "defaults": {"mode": mode_name(config.gate), "tau": config.tau, "k": config.k, "w": config.w,
                             "temperature": config.temperature, "head": config.head, "follow": config.follow,
                             "horizon": config.horizon, "value_head": config.value_head, "max_tokens": max_tokens},
            },
        }

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != state.model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves "
                                f"{state.model_id!r}", type="not_found_error", param="model",
                           code="model_not_found")
        return model_card()

    async def start(req: _GenerationRequest, prompt: str | list[dict[str, str]]) -> list[_Job]:
        """The request's generations (one per choice), checked and queued, or an ApiError."""
        if req.model is not None and req.model != state.model_id:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{state.model_id!r} (GET /v1/models), or leave model out",
                           type="not_found_error", param="model", code="model_not_found")
        _refuse_unsupported(req)
        if req.n > state.parallel + state.max_queue:
            raise ApiError(400, f"n: {req.n} choices can never fit this server's {state.parallel} slots and queue of "
                                f"{state.max_queue}; ask for fewer", param="n", code="invalid_value")
        # Checked and counted with no await in between, so a burst of requests cannot all pass
        # the check before any of them is counted: room is --parallel slots plus --max-queue.
        if state.active + state.waiting + state.starting + req.n - 1 >= state.parallel + state.max_queue:
            wait = state.retry_after()
            raise ApiError(429, f"the server is busy: {state.active} generations running and "
                                f"{state.waiting + state.starting} waiting; retry in {wait} s", type="server_busy",
                           code="queue_full", headers={"Retry-After": str(wait)})
        state.starting += req.n
        try:
            jobs = await _prepare(req, prompt)
        finally:
            state.starting -= req.n
        state.waiting += len(jobs)  # in the same step: counted without a gap until _events takes them out
        return jobs

    async def _prepare(req: _GenerationRequest, prompt: str | list[dict[str, str]]) -> list[_Job]:
        texts = [("prompt", prompt)] if isinstance(prompt, str) else [
            (f"messages.{i}.content", m["content"]) for i, m in enumerate(prompt)]
        for field_name, text in texts:
            problem = undecodable_text(text)
            if problem:
                raise ApiError(400, f"{field_name}: {problem}", param=field_name, code="invalid_value")
        stops = _stops(req)
        if req.gate is not None:
            raise ApiError(400, f"gate: the field is called sia_mode ({', '.join(MODES)})",
                           param="gate", code="invalid_value")
        changes: dict[str, Any] = {}
        for field_name, setting in STEERING_FIELDS.items():
            if getattr(req, field_name) is not None:
                changes[setting] = getattr(req, field_name)
        if req.top_k is not None:
            if changes.get("k", req.top_k) != req.top_k:
                raise ApiError(400, f"top_k {req.top_k} and k {changes['k']} differ: they name one setting, the "
                                    "candidates per step; send one of them", param="top_k", code="invalid_value")
            changes["k"] = req.top_k
        asked_ratio = changes.get("target_ratio")
        if "gate" in changes and "tau" not in changes and asked_ratio is None and engine.value is not None:
            # switching between an entropy gate and shift: a tau on the new gate's scale, for the
            # request's w and head (a ratio the value model recommends for it is calibrated once)
            try:
                steering = replace(state.config, **{k: v for k, v in changes.items() if k in ("w", "value_head")})
            except ValueError:
                steering = None  # a bad w or head: the replace below names it
            if steering is not None:
                try:
                    changes.update(level_for_gate(steering, changes["gate"], engine.value.meta.recommended_steering()))
                except ValueError as exc:
                    raise ApiError(400, f"sia_mode {changes['gate']}: {exc}; send tau", param="sia_mode",
                                   code="invalid_value") from None
        ratio = changes.get("target_ratio")
        if ratio is not None:
            # Each new (ratio, k, temperature, head; for shift also w and head) measures tau on
            # unsteered runs (seconds, one at a time) and is cached for good: whole percentages at
            # the server's own settings bound what clients can make the server calibrate.
            if asked_ratio is not None and isinstance(ratio, (int, float)) and 0 < ratio < 1 and \
                    abs(ratio * 100 - round(ratio * 100)) > 1e-9:
                raise ApiError(400, f"target_ratio: this server calibrates whole percentages (0.01 to 0.99), "
                                    f"got {ratio}", param="target_ratio", code="invalid_value")
            kind = GATE_KINDS.get(gate_of(str(changes.get("gate", state.config.gate))))
            held = ("k", "temperature", "head") + (("w", "value_head") if kind and kind.statistic == "shift" else ())
            for name in held:
                if name in changes and changes[name] != getattr(state.config, name):
                    if asked_ratio is None:
                        raise ApiError(400, f"sia_mode {changes['gate']}: switching to it calibrates the value model's "
                                            f"recommended target ratio at the server's {name} "
                                            f"({getattr(state.config, name)}); send tau to change {name}",
                                       param="sia_mode", code="invalid_value")
                    raise ApiError(400, f"target_ratio: a request that sets a target ratio keeps the server's {name} "
                                        f"({getattr(state.config, name)}); send tau instead to change {name}",
                                   param="target_ratio", code="invalid_value")
        if state.recommended_horizon is not None and "horizon" not in changes:
            changes["horizon"] = gate_horizon(changes.get("gate", state.config.gate), state.recommended_horizon,
                                              state.config.horizon, head=changes.get("head", state.config.head))
        try:
            cfg = replace(state.config, **changes)
        except ValueError as exc:
            param = _culprit(state.config, changes, str(exc))
            if param == "gate":  # as the request names it
                param = "sia_mode"
            raise ApiError(400, str(exc), param=param, code="invalid_value") from None
        if cfg.steers and engine.value is None:
            raise ApiError(400, f"mode {mode_name(cfg.gate)} needs a value model, and this server has none "
                                "(start it with --value-model PATH.gguf)", param="sia_mode")
        if cfg.steers and engine.value is not None and cfg.value_head not in engine.value.heads:
            raise ApiError(400, head_missing(engine.value.name, cfg.value_head, engine.value.heads),
                           param="value_head", code="invalid_value")
        top = _top_logprobs(req)
        if top is not None and top > cfg.k:
            raise ApiError(400, f"{'top_logprobs' if isinstance(req, ChatCompletionRequest) else 'logprobs'}: only the "
                                f"k = {cfg.k} candidates of each step have probabilities here; ask for at most {cfg.k} "
                                "alternatives, or raise k", param="top_logprobs" if isinstance(req, ChatCompletionRequest)
                           else "logprobs", code="invalid_value")
        seed = req.seed if req.seed is not None else state.seed if state.seed is not None else new_seed()
        n_tokens = req.max_completion_tokens or req.max_tokens or state.max_tokens
        grammar, grammar_field = _grammar(req)

        def generations() -> list[Generation]:
            # choice i samples with seed + i: independent draws, each reproducible on its own
            return [engine.generate(prompt, max_tokens=n_tokens, config=cfg, seed=(seed + i) % (MAX_SEED + 1),
                                    logprobs=top is not None, grammar=grammar) for i in range(req.n)]

        try:
            # Tokenising is quick, but a target_ratio may first measure tau (slow, then cached).
            gens = await anyio.to_thread.run_sync(generations)
        except ContextOverflowError as exc:
            raise ApiError(400, str(exc), param="messages" if isinstance(prompt, list) else "prompt",
                           code="context_length_exceeded") from None
        except GrammarError as exc:  # the request's grammar (parsed off the event loop, with the prompt)
            field_name = grammar_field or "grammar"
            raise ApiError(400, str(exc) if str(exc).startswith(field_name) else f"{field_name}: {exc}",
                           param=field_name, code="invalid_value") from None
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_value") from None
        return [_Job(gen, cfg.with_tau(gen.config.tau) if cfg.target_ratio is not None else cfg,
                     (seed + i) % (MAX_SEED + 1), stops, top, i) for i, gen in enumerate(gens)]

    async def stream(jobs: list[_Job], make_chunk: Any, chat: bool, include_usage: bool,
                     sia_tokens: bool) -> AsyncIterator[dict[str, str]]:
        """SSE events: for each choice in turn, one chunk per token and a final chunk with its
        finish_reason and stats; then an optional usage chunk, then [DONE]."""
        try:
            for job in jobs:
                matcher = StopMatcher(job.stops)
                gen = job.generation
                logprobs = None if job.top_logprobs is None else _Logprobs(engine, chat, job.top_logprobs)
                first = True
                raw = 0  # characters of gen.text the events carried
                async with aclosing(_events(state, job)) as events:
                    async for ev in events:
                        raw += len(ev.text)
                        text = matcher.push(ev.text)
                        token_logprobs = logprobs.add(ev) if logprobs is not None else None
                        if text or first or token_logprobs is not None:
                            chunk = make_chunk(job.index, text, None, first, token_logprobs)
                            if sia_tokens:
                                chunk["sia_token"] = _sia_token(ev, engine)
                            yield {"data": json.dumps(chunk)}
                            first = False
                        if matcher.hit:
                            break
                if gen.stats.stop_reason == "cancelled" and not matcher.hit:
                    return  # cancelled (the server stopping): the remaining choices never run
                tail = "" if matcher.hit else matcher.push(gen.text[raw:]) + matcher.flush()
                if tail or first:
                    yield {"data": json.dumps(make_chunk(job.index, tail, None, first, None))}
                final = make_chunk(job.index, None, _finish_reason(gen, matcher.hit), False, None)
                final["sia"] = _sia(job, matcher.hit)
                yield {"data": json.dumps(final)}
            if include_usage:
                usage = make_chunk(0, None, None, False, None)
                usage["choices"] = []
                usage["usage"] = _usage(jobs)
                yield {"data": json.dumps(usage)}
            yield {"data": "[DONE]"}
        except Exception as exc:  # noqa: BLE001 -- after the headers, errors go in the stream, as OpenAI's do
            yield {"data": json.dumps(_generation_error(exc).body())}

    async def collect(job: _Job, request: Request, chat: bool) -> tuple[str, bool, dict[str, Any] | None, bool]:
        """Run to the end; a client that hangs up cancels the generation. Returns the text,
        whether a stop sequence ended it, its logprobs (None unless asked for), and whether the
        client left."""
        gen = job.generation
        matcher = StopMatcher(job.stops)
        logprobs = None if job.top_logprobs is None else _Logprobs(engine, chat, job.top_logprobs)
        parts: list[str] = []
        raw = 0

        async def run() -> None:
            nonlocal raw
            async with aclosing(_events(state, job)) as events:
                async for ev in events:
                    raw += len(ev.text)
                    parts.append(matcher.push(ev.text))
                    if logprobs is not None:
                        logprobs.add(ev)
                    if matcher.hit:
                        break

        runner = asyncio.ensure_future(run())
        left = False

        async def watch_disconnect() -> None:
            nonlocal left
            while (await request.receive())["type"] != "http.disconnect":
                pass
            left = True
            gen.cancel()
            if job.queued:  # leave the queue now, not when a slot frees (it would prefill for nothing)
                runner.cancel()

        watcher = asyncio.ensure_future(watch_disconnect())
        try:
            await runner
        except asyncio.CancelledError:
            if not left:
                raise
        finally:
            watcher.cancel()
            if not runner.done():
                runner.cancel()
            job.abandon(state)  # if it never got as far as the queue's wait (a no-op once it ran)
        if not matcher.hit:
            parts.append(matcher.push(gen.text[raw:]) + matcher.flush())
        return "".join(parts), matcher.hit, None if logprobs is None else logprobs.result(), left

    async def run_all(jobs: list[_Job], request: Request, kind: str, cid: str, created: int) -> dict[str, Any]:
        """Every choice in turn (the client leaving cancels the rest), as one response."""
        choices = []
        try:
            for job in jobs:
                try:
                    text, stopped, logprobs, left = await collect(job, request, kind == "chat")
                except GrammarDeadEnd as exc:
                    raise _generation_error(exc) from None
                if left:
                    break
                finish = _finish_reason(job.generation, stopped)
                if kind == "chat":
                    choice = {"index": job.index, "message": {"role": "assistant", "content": text},
                              "finish_reason": finish, "logprobs": logprobs}
                else:
                    choice = {"index": job.index, "text": text, "finish_reason": finish, "logprobs": logprobs}
                choice["sia"] = _sia(job, stopped)
                choices.append(choice)
        finally:
            for job in jobs:
                job.abandon(state)  # choices that never ran (a no-op for those that did)
        return {"id": cid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": created, "model": state.model_id, "choices": choices,
                "usage": _usage(jobs), "sia": choices[0]["sia"] if choices else None}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        if not req.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        if not engine.base.chat_template:
            raise ApiError(400, f"{engine.base.path.name} has no chat template; use /v1/completions")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m, i)}
                    for i, m in enumerate(req.messages)]
        jobs = await start(req, messages)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        if req.stream:
            def chunk(index: int, text: str | None, finish: str | None, first: bool,
                      logprobs: dict[str, Any] | None) -> dict[str, Any]:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                        "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _StreamResponse(jobs, state, stream(jobs, chunk, True, include_usage, req.sia_tokens), ping=15)

        return await run_all(jobs, request, "chat", cid, created)

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise ApiError(400, "prompt: give one string (token-id prompts and batches are not supported)",
                               param="prompt")
            prompt = prompt[0]
        assert isinstance(prompt, str)
        jobs = await start(req, prompt)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        if req.stream:
            def chunk(index: int, text: str | None, finish: str | None, first: bool,
                      logprobs: dict[str, Any] | None) -> dict[str, Any]:
                return {"id": cid, "object": "text_completion", "created": created, "model": state.model_id,
                        "choices": [{"index": index, "text": text or "", "finish_reason": finish,
                                     "logprobs": logprobs}]}

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _StreamResponse(jobs, state, stream(jobs, chunk, False, include_usage, req.sia_tokens), ping=15)

        return await run_all(jobs, request, "completion", cid, created)

    return app


# --------------------------------------------------------------------------- main
def build_parser() -> CliParser:
    p = CliParser(
        prog=PROG,
        description="An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models) "
                    "for a base model steered by a value model. Steering options below are the defaults "
                    "of requests, which can override them with extra fields (sia_mode, tau, k, w, "
                    "target_ratio, p, head, follow, horizon, seed, temperature). "
                    "Limits: request bodies of at most --max-request-bytes (413), sent as application/json "
                    "(415); a request's headers and body within --read-timeout seconds of its first byte "
                    "(408, then the connection is closed); connections without a request in progress "
                    "closed after --idle-timeout seconds; beyond --parallel running and --max-queue "
                    "waiting, 429 with Retry-After. Errors are in OpenAI's format; bad input is a 4xx, "
                    "never a 500; a client that disconnects frees its place at once.",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; there is no authentication, so think "
                        "twice before binding anything but loopback)")
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="generations that run at once; the rest wait (default: %(default)s). Without --threads, "
                        "each gets the cores divided by N: more threads than cores makes llama.cpp many times "
                        "slower")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--cors-origin", metavar="ORIGIN", action="append", default=[],
                   help="let web pages from ORIGIN (e.g. http://localhost:5173) call the API from a browser; "
                        "repeatable (default: none)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="waiting requests before new ones get 429 (default: %(default)s)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                   help="largest request body; a larger one gets 413 before it is read (default: %(default)s, 2 MiB)")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT, metavar="SECONDS",
                   help="time a client has to send a request's headers and body, from its first byte; then "
                        "408 and the connection is closed (default: %(default)g)")
    p.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT, metavar="SECONDS",
                   help="a connection with no request in progress is closed after this long "
                        "(default: %(default)g)")
    p.add_argument("--model-name", metavar="ID",
                   help="model id reported by /v1/models, and the one requests may name (default: the base "
                        "file's name)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    add_model_options(p)
    add_steering_options(p, max_tokens=512)
    return p


def threads_per_generation(parallel: int, cores: int | None = None) -> int:
    """llama.cpp threads for each of ``parallel`` generations when --threads is not given: the
    cores shared out, at least 1. More threads than cores make llama.cpp's spinning thread
    barrier many times slower (README)."""
    return max(1, (cores if cores is not None else os.cpu_count() or 1) // parallel)


def main(argv: Sequence[str] | None = None) -> int:
    from sia_edge.cli_common import CliError

    args = build_parser().parse_args(argv)
    if args.parallel < 1:
        raise CliError("--parallel must be at least 1")
    if args.max_queue < 0:
        raise CliError("--max-queue must be >= 0")
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_request_bytes < 1:
        raise CliError(f"--max-request-bytes must be at least 1, got {args.max_request_bytes}")
    for option in ("read_timeout", "idle_timeout"):
        value = getattr(args, option)
        if not (math.isfinite(value) and value > 0):
            raise CliError(f"--{option.replace('_', '-')} must be a positive number of seconds, got {value:g}")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    # Bind first: a port in use is one clear line, before minutes of model loading.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    sock.listen(128)  # clients that connect while the models load wait in the backlog
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise CliError("--api-key is empty: give a key, or leave the option out for no authentication")
    if args.threads is None:
        args.threads = threads_per_generation(args.parallel)
    base = base_model_path(args.model, args.preset)
    choice = choose_value_model(args.value_model, base, needed=args.mode != "off", preset=args.preset)
    config = steering_config(args, choice)  # wrong settings fail before loading
    if choice.notice:
        print(f"note: {choice.notice}", file=sys.stderr, flush=True)
    engine = build_engine(args, base, choice)
    if config.target_ratio is not None:
        if engine.cached_tau(config) is None:
            print(f"note: measuring tau for target ratio {config.target_ratio:g} (once per model; cached)",
                  file=sys.stderr, flush=True)
        config = config.with_tau(engine.calibrate_tau(config))
    app = create_app(engine, config=config, max_tokens=args.max_tokens, seed=args.seed,
                     parallel=args.parallel, max_queue=args.max_queue, model_id=args.model_name,
                     recommended_horizon=recommended_horizon(args, choice),
                     max_request_bytes=args.max_request_bytes, read_timeout=args.read_timeout,
                     idle_timeout=args.idle_timeout, api_key=api_key, cors_origins=args.cors_origin)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not loopback and api_key is None:
        print(f"warning: listening on {host}, reachable from other machines, without authentication "
              "(--api-key)", file=sys.stderr, flush=True)
    value = engine.value.name if engine.value is not None else "none"
    print(f"sia-edge serve: http://{shown}:{port}/v1 (model {app.state.sia.model_id}, value model {value}, "
          f"mode {mode_name(config.gate)}, parallel {args.parallel}, threads {args.threads} each); Ctrl-C stops",
          file=sys.stderr, flush=True)
    class Server(uvicorn.Server):
        """uvicorn's server, remembering whether Ctrl-C stopped it."""

        interrupted = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGINT:
                self.interrupted = True
            super().handle_exit(sig, frame)

    server = Server(server_config(app, log_level=args.log_level))
    server.run(sockets=[sock])
    if server.interrupted:
        # uvicorn re-raises the captured Ctrl-C inside asyncio.run, where it can be lost in a race
        # with the loop's shutdown (exit 0 under load, measured): report it ourselves.
        raise KeyboardInterrupt
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
