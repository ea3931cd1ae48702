"""The OpenAI-compatible server over real HTTP on loopback, driven by the official ``openai``
client: chat and plain completions with and without streaming, steering fields and stats,
concurrent requests, malformed requests, a client that disconnects mid-stream or while queued,
and the limits (body size, Content-Type, model id, read and idle timeouts, 429's Retry-After).
Hostile clients at scale: tests/test_abuse_server.py."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from sia_edge.engine import SteeringEngine
from sia_edge.gate import SteeringConfig
from sia_edge.serve import DEFAULT_MAX_REQUEST_BYTES, ServerState, StopMatcher, create_app, server_config

REPO = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Name three fruits."}]
MODEL = "SmolLM2-135M-Instruct.Q4_1"  # the id the server serves: the base model file's name


@dataclass
class Server:
    url: str
    state: ServerState
    openai_client: openai.OpenAI

    def client(self) -> openai.OpenAI:
        return self.openai_client

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def wait_idle(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if h["active"] == 0 and h["waiting"] == 0:
                return h
            assert time.monotonic() < deadline, f"server still busy: {h}"
            time.sleep(0.05)


@contextlib.contextmanager
def running(app: Any) -> Iterator[Server]:
    """``app`` served by uvicorn on a free loopback port in a background thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(server_config(app, log_level="warning"))  # as python -m sia_edge.serve does
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    try:
        yield Server(url, app.state.sia, client)
    finally:
        client.close()
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def server_engine(base_model_path: Path, value_model_path: Path) -> SteeringEngine:
    # One thread per generation: with --parallel 2 on two cores, two llama.cpp threads each would
    # fight over the cores (its thread barrier spins) and run many times slower.
    return SteeringEngine(base_model_path, value_model_path, n_ctx=1024, n_threads=1)


@pytest.fixture(scope="module")
def server(server_engine: SteeringEngine) -> Iterator[Server]:
    with running(create_app(server_engine, parallel=2, max_tokens=16)) as s:
        yield s


def test_models(server: Server) -> None:
    models = server.client().models.list().data
    assert [m.id for m in models] == [MODEL]
    card = models[0].model_extra or {}
    assert card["sia"]["value_model"] == "value-fixture.gguf"
    assert server.client().models.retrieve("SmolLM2-135M-Instruct.Q4_1").id == models[0].id
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4")


def test_chat_completion_with_steering_fields(server: Server) -> None:
    r = server.client().chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=8, seed=11,
        extra_body={"sia_mode": "dense", "k": 4, "w": 2.0},
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and 1 <= r.usage.completion_tokens <= 8
    sia = (r.model_extra or {})["sia"]
    assert sia["mode"] == "dense" and sia["k"] == 4 and sia["w"] == 2.0 and sia["seed"] == 11
    assert sia["junctions"] == sia["tokens"] == r.usage.completion_tokens
    assert sia["intervention_rate"] == pytest.approx(1.0)


def test_head_field_steers_the_first_tokens(server: Server) -> None:
    r = server.client().chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=8, seed=11, extra_body={"sia_mode": "sparse", "tau": 3.0, "head": 3})
    sia = (r.model_extra or {})["sia"]
    assert sia["head"] == 3 and sia["tokens"] >= 3 and sia["junctions"] == 3  # tau 3 > ln 10: only the head

    # follow 1e-9: after the head's last step every step moves some mass, so steering never stops
    chain = server.client().chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=8, seed=11,
        extra_body={"sia_mode": "sparse", "tau": 3.0, "head": 1, "follow": 1e-9})
    sia = (chain.model_extra or {})["sia"]
    assert sia["follow"] == 1e-9 and sia["junctions"] == sia["tokens"] + (sia["stop_reason"] == "eos")

    # ... and a horizon ends it: dense within the first 4 tokens only
    window = server.client().chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=8, seed=11, extra_body={"sia_mode": "dense", "horizon": 4})
    sia = (window.model_extra or {})["sia"]
    assert sia["horizon"] == 4 and sia["tokens"] > 4 and sia["junctions"] == 4
    whole = server.client().chat.completions.create(  # horizon 0: none (lifts a server's default horizon)
        model=MODEL, messages=PROMPT, max_tokens=8, seed=11, extra_body={"sia_mode": "dense", "horizon": 0})
    sia = (whole.model_extra or {})["sia"]
    assert sia["horizon"] is None and sia["junctions"] == sia["tokens"] + (sia["stop_reason"] == "eos")

    off = server.client().chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=6, seed=1,
                                                  extra_body={"sia_mode": "off"})
    assert (off.model_extra or {})["sia"]["junctions"] == 0


def test_a_recommended_horizon_stays_with_the_entropy_gate(server_engine: SteeringEngine) -> None:
    # The value model recommends a horizon for its entropy gate: a request for dense gets dense
    # (unless it names a horizon), as the chat's --mode dense does; a sparse request keeps it.
    config = SteeringConfig(tau=-1.0, horizon=3)  # tau -1: every step within the horizon is a junction
    with running(create_app(server_engine, config=config, max_tokens=8, recommended_horizon=3)) as srv:
        def sia(**body: Any) -> dict[str, Any]:
            r = srv.client().chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=8, seed=11,
                                                     extra_body=body)
            return (r.model_extra or {})["sia"]  # type: ignore[no-any-return]

        assert sia()["horizon"] == 3 and sia()["junctions"] == 3
        assert sia(sia_mode="sparse")["horizon"] == 3
        dense = sia(sia_mode="dense")
        assert dense["horizon"] is None and dense["junctions"] == dense["tokens"] + (dense["stop_reason"] == "eos")
        assert sia(sia_mode="dense", horizon=2)["junctions"] == 2
        longer_head = sia(head=5)  # the user's head wins over the recommended horizon
        assert longer_head["horizon"] is None and longer_head["junctions"] >= 5
    # started with dense (so without the horizon), a sparse request gets it back
    with running(create_app(server_engine, config=SteeringConfig(gate="dense", tau=-1.0), max_tokens=8,
                            recommended_horizon=3)) as srv:
        r = srv.client().chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=8, seed=11,
                                                 extra_body={"sia_mode": "sparse"})
        assert (r.model_extra or {})["sia"]["horizon"] == 3


def test_switching_to_the_shift_gate_takes_a_tau_on_its_scale(base_model_path: Path, value_model_path: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tau in nats means nothing to the shift gate (a share of probability) and back: a request
    that switches between them without a tau gets the value model's recommendation for its gate."""
    from dataclasses import replace

    from sia_edge.value_format import read_value_meta, write_gguf_with_value_meta

    monkeypatch.setenv("SIA_EDGE_MODELS", str(tmp_path))  # the sparse ratio calibrates here
    value = tmp_path / "value-shift.gguf"
    write_gguf_with_value_meta(value_model_path, value, replace(
        read_value_meta(value_model_path), steering_gate="shift", steering_tau=0.25, steering_target_ratio=0.3))
    with SteeringEngine(base_model_path, value, n_ctx=512, n_threads=1) as engine:
        assert engine.recommended().gate == "shift" and engine.recommended().tau == 0.25
        assert engine.recommended(gate="sparse").target_ratio == pytest.approx(0.3)  # the tau is the shift gate's
        for start, ask, want_tau in ((SteeringConfig(tau=1.5), "shift", 0.25),
                                     (SteeringConfig(tau=1.5), "full-entropy", 1.5),
                                     (SteeringConfig(gate="shift", tau=0.25), "sparse",
                                      engine.calibrate_tau(engine.recommended(gate="sparse")))):
            with running(create_app(engine, config=start, max_tokens=4)) as srv:
                r = srv.client().chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4, seed=3,
                                                         extra_body={"sia_mode": ask})
                sia = (r.model_extra or {})["sia"]
                assert sia["mode"] == ask and sia["tau"] == pytest.approx(want_tau), (start.gate, ask)


def test_chat_streaming_matches_non_streaming(server: Server) -> None:
    client = server.client()
    kwargs: dict[str, Any] = {"model": MODEL, "messages": PROMPT, "max_tokens": 8, "seed": 5}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"sia_tokens": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    sia = (finals[0].model_extra or {})["sia"]
    assert sia["tokens"] == (whole.model_extra or {})["sia"]["tokens"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == sia["tokens"]
    token_chunks = [c for c in chunks if (c.model_extra or {}).get("sia_token")]
    assert token_chunks and all(isinstance(c.model_extra["sia_token"]["junction"], bool) for c in token_chunks)
    junctions = [c.model_extra["sia_token"] for c in token_chunks if c.model_extra["sia_token"]["junction"]]
    assert junctions and all(len(j["candidates"]) == len(j["values"]) == 10 for j in junctions)
    plain = list(client.chat.completions.create(**kwargs, stream=True))  # opt-in: not without sia_tokens
    assert not any((c.model_extra or {}).get("sia_token") for c in plain)


def test_completions_streaming_and_not(server: Server) -> None:
    client = server.client()
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "seed": 2}
    whole = client.completions.create(**kwargs)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert (whole.model_extra or {})["sia"]["mode"] == "sparse"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert streamed == whole.choices[0].text


def test_stop_sequences(server: Server) -> None:
    client = server.client()
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "seed": 9,
                              "extra_body": {"sia_mode": "off"}}
    full = client.completions.create(**kwargs).choices[0].text
    assert len(full) > 6
    stop = full[3:6]
    expected = full[: full.find(stop)]
    cut = client.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stop=stop, stream=True)
                       if c.choices)
    assert streamed == expected


@pytest.mark.parametrize(
    ("stops", "pieces", "expected", "hit"),
    [
        (["END"], ["ab", "cE", "N", "Dxyz"], "abc", True),
        (["END"], ["ab", "cE", "N", "x"], "abcENx", False),
        (["\n\n", "##"], ["one\n", "two#", "#"], "one\ntwo", True),
        ([], ["a", "b"], "ab", False),
    ],
)
def test_stop_matcher(stops: list[str], pieces: list[str], expected: str, hit: bool) -> None:
    m = StopMatcher(stops)
    out = "".join(m.push(p) for p in pieces) + m.flush()
    assert (out, m.hit) == (expected, hit)


def test_concurrent_requests_are_safe(server: Server) -> None:
    client = server.client()

    def ask(seed: int) -> str:
        r = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=8, seed=seed)
        return r.choices[0].message.content or ""

    alone = ask(21)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, [21, 22, 21, 23]))
    assert results[0] == results[2] == alone  # no state leaks between parallel generations
    h = server.wait_idle()
    assert 1 <= h["peak_active"] <= 2  # --parallel 2: the other requests waited their turn


def test_a_burst_beyond_the_queue_gets_429(server_engine: SteeringEngine) -> None:
    with running(create_app(server_engine, parallel=1, max_queue=1, max_tokens=8)) as srv:
        body = {"messages": PROMPT, "max_tokens": 4, "seed": 1}
        # A stream left unread holds the only slot while the burst arrives (counting on: the base
        # model does not stop, and finish_reason "length" below shows that it held it throughout).
        held_body = {"prompt": "1, 2, 3, 4, 5, 6, 7,", "max_tokens": 150, "stream": True, "seed": 1,
                     "sia_mode": "off"}
        with httpx.stream("POST", f"{srv.url}/v1/completions", timeout=120, json=held_body) as held:
            assert held.status_code == 200
            lines = held.iter_lines()
            next(lines)
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                replies = list(pool.map(
                    lambda _: httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120), range(4)))
            chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        codes = sorted(r.status_code for r in replies)
        assert codes == [200, 429, 429, 429], codes  # room: one slot (held) plus a queue of one
        refused = [r for r in replies if r.status_code == 429]
        assert all(_error(r)["code"] == "queue_full" and "busy" in _error(r)["message"] for r in refused)
        # Retry-After: whole seconds, and the message says the same
        waits = [r.headers.get("retry-after", "") for r in refused]
        assert all(w.isdigit() and 1 <= int(w) <= 60 for w in waits), waits
        assert all(f"retry in {w} s" in _error(r)["message"] for w, r in zip(waits, refused, strict=True))
        assert srv.wait_idle()["waiting"] == 0


def test_retry_after_follows_how_long_generations_hold_a_slot(server_engine: SteeringEngine) -> None:
    state = ServerState(server_engine, SteeringConfig(), parallel=2)
    assert state.retry_after() == 1  # nothing measured yet: try again soon
    for seconds in (9.0, 11.0):
        state.note_slot_time(seconds)
    assert state.retry_after() == 5  # a slot frees every 10 s / 2 slots on average
    state.note_slot_time(1000.0)
    assert state.retry_after() == 60  # capped, so that clients keep trying


def _error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": "hi"}, "messages", "valid list"),
        ({"model": MODEL}, "messages", "Field required"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "'system'"),
        ({"messages": PROMPT, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": PROMPT, "temperature": -1}, "temperature", "temperature must be >= 0"),
        ({"messages": PROMPT, "n": 9}, "n", "less than or equal to 8"),
        ({"messages": PROMPT, "n": 0}, "n", "greater than or equal to 1"),
        ({"messages": PROMPT, "top_p": 1.5}, "top_p", "top_p must be a probability in [0, 1]"),
        ({"messages": PROMPT, "min_p": -0.1}, "min_p", "min_p must be a share in [0, 1]"),
        ({"messages": PROMPT, "top_k": 5, "k": 6}, "top_k", "name one setting"),
        ({"messages": PROMPT, "repeat_penalty": 1.1}, "repeat_penalty", "rewrite the logits"),
        ({"messages": PROMPT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema.schema", "a JSON schema object is required"),
        ({"messages": PROMPT, "response_format": {"type": "xml"}}, "response_format.type", "'json_schema'"),
        ({"messages": PROMPT, "top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
        ({"messages": PROMPT, "logprobs": True, "top_logprobs": 11}, "top_logprobs", "at most 10"),
        ({"messages": PROMPT, "logprobs": 3}, "logprobs", "true or false"),
        ({"messages": PROMPT, "min_tokens": 3}, "min_tokens", "does not take this field"),
        ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "x"}]}, "messages.0.tool_call_id",
         "does not take this field"),
        ({"messages": PROMPT, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x",
         "does not take this field"),
        ({"messages": PROMPT, "sia_mode": "sideways"}, "sia_mode", "'sideways'"),
        ({"messages": PROMPT, "sia_mode": "sparse", "w": 1e9}, "w", "w must be"),  # not the mode's fault
        ({"messages": PROMPT, "sia_mode": "shift"}, "sia_mode", "mode shift needs a tau"),
        ({"messages": PROMPT, "sia_mode": "shift", "tau": 1.5}, "tau", "at most 1"),
        ({"messages": PROMPT, "gate": "sideways"}, "gate", "the field is called sia_mode"),
        ({"messages": PROMPT, "target_ratio": 0.255}, "target_ratio", "whole percentages"),
        ({"messages": PROMPT, "tau": "high"}, "tau", "valid number"),
        ({"messages": PROMPT, "target_ratio": 2}, "target_ratio", "target_ratio must be in (0, 1)"),
        ({"messages": PROMPT, "head": -2}, "head", "head must be a whole number of tokens >= 0"),
        ({"messages": PROMPT, "follow": 1.5}, "follow", "follow must be a share of probability mass in (0, 1]"),
        ({"messages": PROMPT, "horizon": -1}, "horizon", "horizon must be a whole number of tokens (0: none)"),
        ({"messages": PROMPT, "frequency_penalty": 0.5}, "frequency_penalty", "rewrite the logits"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages.0.content", "only text parts"),
        # these two were HTTP 500 with a traceback in the log (the native generator takes a uint64)
        ({"messages": PROMPT, "seed": -1}, "seed", "greater than or equal to 0"),
        ({"messages": PROMPT, "seed": 2**70}, "seed", "less than or equal to 18446744073709551615"),
    ],
)
def test_malformed_chat_requests(server: Server, body: dict[str, Any], param: str, words: str) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    err = _error(r)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert words in err["message"]


def test_other_malformed_requests(server: Server) -> None:
    url = server.url
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in _error(r)["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json=[1, 2], timeout=30)
    assert r.status_code == 400 and _error(r)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3]}, timeout=30)
    assert r.status_code == 400 and _error(r)["param"] == "prompt"
    # a JSON-escaped lone surrogate (bytes that were not UTF-8): was the tokenizer's codec error
    r = httpx.post(f"{url}/v1/chat/completions", timeout=30, headers={"content-type": "application/json"},
                   content=b'{"messages": [{"role": "user", "content": "hi \\udcff there"}]}')
    assert r.status_code == 400 and _error(r)["param"] == "messages.0.content"
    assert "not valid UTF-8 (byte 0xff at character 4)" in _error(r)["message"]
    long = [{"role": "user", "content": "word " * 3000}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": long}, timeout=30)
    assert r.status_code == 400 and _error(r)["code"] == "context_length_exceeded"
    r = httpx.get(f"{url}/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and _error(r)["type"] == "not_found_error"
    r = httpx.get(f"{url}/v1/chat/completions", timeout=30)
    assert r.status_code == 405 and _error(r)
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=MODEL, messages=PROMPT, extra_body={"best_of": 3})
    assert "best_of: this server does not take this field" in str(info.value)
    server.wait_idle()


def test_client_disconnect_frees_the_slot(server: Server) -> None:
    server.wait_idle()
    before = server.health()["cancelled"]
    # Streaming, through the official client: read a few chunks, then close the stream.
    stream = server.client().chat.completions.create(
        model=MODEL, messages=PROMPT, max_tokens=900, seed=1, stream=True, extra_body={"sia_mode": "dense"})
    for i, chunk in enumerate(stream):
        assert chunk.choices[0].finish_reason is None  # still answering
        if i == 2:
            break
    stream.close()  # hang up mid-answer
    h = server.wait_idle(timeout=30)  # the 900-token dense answer would take minutes
    assert h["cancelled"] == before + 1  # cancelled, not completed

    # Not streaming: a client that gives up waiting.
    body = {"messages": PROMPT, "max_tokens": 900, "sia_mode": "dense", "seed": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=1.5)
    h = server.wait_idle(timeout=30)
    assert h["cancelled"] == before + 2

    # The slots are usable again.
    r2 = server.client().chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4, seed=3)
    assert r2.choices[0].message.content is not None


# --------------------------------------------------------------------------- limits (issue 17)
def _port(srv: Server) -> int:
    return int(srv.url.rsplit(":", 1)[1])


def _until(what: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.05)


def _raw_request(port: int, path: str, body: bytes, content_type: str = "application/json") -> socket.socket:
    """A request written by hand on a new connection, left for the caller to read or drop."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"POST %s HTTP/1.1\r\nhost: test\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
              % (path.encode(), content_type.encode(), len(body), body))
    return s


def trickle(port: int, data: bytes, *, every: float, give_up: float, first: bytes = b"") -> tuple[bytes, float]:
    """Send ``first``, then ``data`` a byte at a time, ``every`` seconds apart (slowloris), until
    the server closes the connection; returns what it answered and when it closed (seconds).
    After ``data`` the connection just waits. Fails if it is still open after ``give_up`` seconds."""
    start = time.monotonic()
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(first)
        i = 0
        while time.monotonic() - start < give_up:
            readable, _, _ = select.select([s], [], [], every)
            if readable:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    return got, time.monotonic() - start
                got += chunk
            elif i < len(data):
                try:
                    s.send(data[i:i + 1])
                except (BrokenPipeError, ConnectionResetError):
                    return got, time.monotonic() - start
                i += 1
    raise AssertionError(f"the connection was still open after {give_up} s ({i} of {len(data)} bytes sent)")


def test_a_body_over_the_limit_is_refused_before_it_is_read(server: Server) -> None:
    limit = server.state.max_request_bytes
    assert limit == DEFAULT_MAX_REQUEST_BYTES == 2 * 1024 * 1024
    body = json.dumps({"prompt": "a " * (limit // 2 + 1000), "max_tokens": 1}).encode()
    url = f"{server.url}/v1/completions"
    # Declared: the answer comes as soon as the headers are in. Only the head and a first piece of
    # the body are sent, since the server closes without reading the rest, and a client still
    # writing may see that close as a reset instead of the 413 (TCP resets unread data).
    with socket.create_connection(("127.0.0.1", _port(server)), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(body), body[:65536]))
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()  # the rest is never read
    err = json.loads(payload)["error"]
    assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
    assert err["message"].startswith(f"the request body is {len(body)} bytes (Content-Length), more than this "
                                     f"server's limit of {limit} bytes; ")
    assert "--max-request-bytes" in err["message"]

    # chunked: no Content-Length, so the server counts while reading and stops at the limit
    pieces = (body[i:i + 65536] for i in range(0, len(body), 65536))
    chunked = httpx.post(url, content=pieces, headers={"content-type": "application/json"}, timeout=60)
    assert chunked.status_code == 413
    assert _error(chunked)["message"].startswith(f"the request body is larger than this server's limit of {limit}")
    assert server.health()["status"] == "ok"


def test_the_body_limit_is_configurable(server_engine: SteeringEngine) -> None:
    with running(create_app(server_engine, max_tokens=1, max_request_bytes=600)) as srv:
        body = json.dumps({"messages": PROMPT, "max_tokens": 1})
        for size, status in ((600, 200), (601, 413)):
            r = httpx.post(f"{srv.url}/v1/chat/completions", content=body.ljust(size).encode(), timeout=60,
                           headers={"content-type": "application/json"})
            assert r.status_code == status, (size, r.text)
        assert "limit of 600 bytes" in _error(r)["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_over_long_prompt_within_the_limit_is_a_400(server: Server, path: str) -> None:
    text = "word " * 300_000  # 1.5 MB: within the body limit, and far over n_ctx tokens
    body = {"prompt": text} if path == "/v1/completions" else {"messages": [{"role": "user", "content": text}]}
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code == 400
    err = _error(r)
    assert err["code"] == "context_length_exceeded" and err["param"] == ("prompt" if "prompt" in body else "messages")
    assert "1024" in err["message"]  # names the context size
    server.wait_idle()


def test_generation_requests_must_say_they_are_json(server: Server) -> None:
    url = f"{server.url}/v1/completions"
    body = json.dumps({"prompt": "Hello", "max_tokens": 1}).encode()
    # With no type, or a form's or text's (what curl -d sends, and what a web page may send to a
    # local server without asking), the body is refused whatever it holds.
    none = httpx.post(url, content=body, timeout=30)
    assert none.status_code == 415
    assert _error(none)["message"].startswith("Content-Type must be application/json and the request has none; ")
    assert "-H 'Content-Type: application/json'" in _error(none)["message"]
    assert _error(none)["code"] == "unsupported_media_type"
    form = httpx.post(url, data={"prompt": "Hello"}, timeout=30)
    assert form.status_code == 415
    assert "not 'application/x-www-form-urlencoded'" in _error(form)["message"]
    text = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=30,
                      headers={"content-type": "text/plain;charset=UTF-8"})
    assert text.status_code == 415 and "not 'text/plain'" in _error(text)["message"]
    ok = httpx.post(url, content=body, timeout=60, headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200  # GETs have no body to type


def test_a_model_this_server_does_not_serve_is_404(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(model="gpt-4", messages=PROMPT, max_tokens=1)
    assert (info.value.code, info.value.param) == ("model_not_found", "model")
    listed = httpx.get(f"{server.url}/v1/models/gpt-4", timeout=30)
    assert listed.status_code == 404
    for path, body in (("/v1/chat/completions", {"messages": PROMPT}), ("/v1/completions", {"prompt": "Hi"})):
        for stream in (False, True):
            r = httpx.post(f"{server.url}{path}", json={**body, "model": "gpt-4", "max_tokens": 1, "stream": stream},
                           timeout=60)
            assert r.status_code == 404, r.text
            err = _error(r)
            assert (err["type"], err["code"], err["param"]) == ("not_found_error", "model_not_found", "model")
            assert (err["type"], err["code"]) == (_error(listed)["type"], _error(listed)["code"])
            assert "'gpt-4' does not exist" in err["message"] and repr(MODEL) in err["message"]
        # no model: the one served
        r = httpx.post(f"{server.url}{path}", json={**body, "max_tokens": 1}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == MODEL
    server.wait_idle()


def test_clients_that_leave_while_queued_are_cancelled_at_once(server_engine: SteeringEngine) -> None:
    with running(create_app(server_engine, parallel=1, max_tokens=4)) as srv:
        # A dense 900-token answer (minutes) holds the only slot throughout.
        hold = {"messages": PROMPT, "max_tokens": 900, "stream": True, "seed": 1, "sia_mode": "dense"}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=hold, timeout=120) as held:
            assert held.status_code == 200
            held_lines = held.iter_lines()  # kept: dropping a half-read iterator closes the connection
            next(held_lines)
            cancelled = srv.health()["cancelled"]
            queued = json.dumps({"messages": PROMPT, "max_tokens": 4, "seed": 2}).encode()

            # streaming: the stream's headers arrive at once, then it waits for the slot
            with httpx.stream("POST", f"{srv.url}/v1/chat/completions", timeout=120,
                              json={"messages": PROMPT, "max_tokens": 4, "stream": True}) as waiting:
                assert waiting.status_code == 200
                _until(lambda: srv.health()["waiting"] == 1)
            _until(lambda: srv.health()["waiting"] == 0 and srv.health()["cancelled"] == cancelled + 1, 30)

            # not streaming: a client that gives up leaves the queue, not only once a slot frees
            s = _raw_request(_port(srv), "/v1/chat/completions", queued)
            _until(lambda: srv.health()["waiting"] == 1)
            s.close()
            _until(lambda: srv.health()["waiting"] == 0 and srv.health()["cancelled"] == cancelled + 2, 30)
            h = srv.health()
            assert h["active"] == 1 and h["completed"] == 0  # the holder still runs; neither queued one did
        h = srv.wait_idle()
        assert h["cancelled"] == cancelled + 3 and h["completed"] == 0


def test_idle_and_slow_connections_are_closed(server_engine: SteeringEngine) -> None:
    with running(create_app(server_engine, max_tokens=4, read_timeout=1.0, idle_timeout=1.0)) as srv:
        port = _port(srv)
        # a connection that never sends anything
        got, _ = trickle(port, b"", every=0.1, give_up=20)
        assert got == b""
        # headers sent a byte at a time (slowloris)
        head = b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n" * 10
        got, _ = trickle(port, head, every=0.05, give_up=20)
        assert got.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), got
        error = json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_timeout"
        assert "within 1 s of its first byte" in error["message"]
        # the headers at once, the body a byte at a time
        body = json.dumps({"prompt": "x" * 200}).encode()
        head = (b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n" % len(body))
        got, _ = trickle(port, body, first=head, every=0.05, give_up=20)
        assert got.startswith(b"HTTP/1.1 408 "), got
        assert srv.wait_idle()["active"] == 0

        # A request that arrived in time is never cut, however long its answer takes, and a
        # kept-alive connection serves the next request.
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 4,
                                                                "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: {")
                time.sleep(1.5)  # longer than both timeouts
                assert [x for x in lines if x.startswith("data: ")][-1] == "data: [DONE]"
            assert client.get("/health").json()["status"] == "ok"


def test_the_guides_client_example_runs(server: Server, tmp_path: Path) -> None:
    """docs/EMBEDDING.md's OpenAI-client example, against this server (a few tokens)."""
    guide = (REPO / "docs" / "EMBEDDING.md").read_text()
    code = re.search(r"```python\n(from openai import OpenAI\n.*?)```", guide, re.DOTALL)
    assert code is not None
    script = tmp_path / "client_example.py"
    script.write_text(code.group(1).replace("http://127.0.0.1:8080", server.url)
                      .replace("max_tokens=128", "max_tokens=6"))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert 0 <= float(r.stdout.split()[-1]) <= 1, r.stdout  # the stats' intervention rate
    server.wait_idle()


def test_serve_cli(tmp_path: Path, base_model_path: Path, value_model_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIA_EDGE_")}
    env["SIA_EDGE_MODELS"] = str(tmp_path)
    cmd = [sys.executable, "-m", "sia_edge.serve"]
    bad = subprocess.run([*cmd, "--parallel", "0"], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=60, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    bad = subprocess.run([*cmd, "--port", "0", "--value-model", str(tmp_path / "missing.gguf")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and bad.stderr.count("\n") == 1

    proc = subprocess.Popen([*cmd, "--port", "0", "--value-model", str(value_model_path), "--max-tokens", "4",
                             "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert proc.stderr is not None
        url = ""
        deadline = time.monotonic() + 60
        while not url:
            assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
            line = proc.stderr.readline()
            if line.startswith("sia-edge serve: "):
                url = line.split()[2]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as client:
            r = client.chat.completions.create(model=MODEL, messages=PROMPT, seed=1)
        assert r.usage is not None and r.usage.completion_tokens <= 4
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, 130 as for any interrupted command
        assert proc.wait(timeout=30) == 130
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    json.dumps(r.model_extra)  # the stats are plain JSON


def test_without_a_value_model_steering_is_refused(base_model_path: Path) -> None:
    from fastapi.testclient import TestClient

    engine = SteeringEngine(base_model_path, None, n_ctx=256, n_threads=1)
    with TestClient(create_app(engine, max_tokens=2)) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["sia"]["value_model"] is None and card["sia"]["defaults"]["mode"] == "off"
        r = client.post("/v1/chat/completions", json={"messages": PROMPT, "sia_mode": "dense"})
        assert r.status_code == 400
        assert "needs a value model" in _error(r)["message"] and _error(r)["param"] == "sia_mode"
        r = client.post("/v1/chat/completions", json={"messages": PROMPT, "seed": 1})
        assert r.status_code == 200 and r.json()["sia"]["mode"] == "off" and r.json()["sia"]["junctions"] == 0
