"""The OpenAI-compatible server over real HTTP on loopback, driven by the official ``openai``
client: chat and plain completions with and without streaming, steering fields and stats,
concurrent requests, malformed requests, and a client that disconnects mid-stream."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
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
from sia_edge.serve import ServerState, StopMatcher, create_app

REPO = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Name three fruits."}]


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
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none", lifespan="on"))
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
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
    card = models[0].model_extra or {}
    assert card["sia"]["value_model"] == "value-fixture.gguf"
    assert server.client().models.retrieve("SmolLM2-135M-Instruct.Q4_1").id == models[0].id
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4")


def test_chat_completion_with_steering_fields(server: Server) -> None:
    r = server.client().chat.completions.create(
        model="anything", messages=PROMPT, max_tokens=8, seed=11,
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
        model="m", messages=PROMPT, max_tokens=8, seed=11, extra_body={"sia_mode": "sparse", "tau": 3.0, "head": 3})
    sia = (r.model_extra or {})["sia"]
    assert sia["head"] == 3 and sia["tokens"] >= 3 and sia["junctions"] == 3  # tau 3 > ln 10: only the head

    # follow 1e-9: after the head's last step every step moves some mass, so steering never stops
    chain = server.client().chat.completions.create(
        model="m", messages=PROMPT, max_tokens=8, seed=11,
        extra_body={"sia_mode": "sparse", "tau": 3.0, "head": 1, "follow": 1e-9})
    sia = (chain.model_extra or {})["sia"]
    assert sia["follow"] == 1e-9 and sia["junctions"] == sia["tokens"] + (sia["stop_reason"] == "eos")

    # ... and a horizon ends it: dense within the first 4 tokens only
    window = server.client().chat.completions.create(
        model="m", messages=PROMPT, max_tokens=8, seed=11, extra_body={"sia_mode": "dense", "horizon": 4})
    sia = (window.model_extra or {})["sia"]
    assert sia["horizon"] == 4 and sia["tokens"] > 4 and sia["junctions"] == 4
    whole = server.client().chat.completions.create(  # horizon 0: none (lifts a server's default horizon)
        model="m", messages=PROMPT, max_tokens=8, seed=11, extra_body={"sia_mode": "dense", "horizon": 0})
    sia = (whole.model_extra or {})["sia"]
    assert sia["horizon"] is None and sia["junctions"] == sia["tokens"] + (sia["stop_reason"] == "eos")

    off = server.client().chat.completions.create(model="m", messages=PROMPT, max_tokens=6, seed=1,
                                                  extra_body={"sia_mode": "off"})
    assert (off.model_extra or {})["sia"]["junctions"] == 0


def test_a_recommended_horizon_stays_with_the_entropy_gate(server_engine: SteeringEngine) -> None:
    # The value model recommends a horizon for its entropy gate: a request for dense gets dense
    # (unless it names a horizon), as the chat's --mode dense does; a sparse request keeps it.
    config = SteeringConfig(tau=-1.0, horizon=3)  # tau -1: every step within the horizon is a junction
    with running(create_app(server_engine, config=config, max_tokens=8, recommended_horizon=3)) as srv:
        def sia(**body: Any) -> dict[str, Any]:
            r = srv.client().chat.completions.create(model="m", messages=PROMPT, max_tokens=8, seed=11,
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
        r = srv.client().chat.completions.create(model="m", messages=PROMPT, max_tokens=8, seed=11,
                                                 extra_body={"sia_mode": "sparse"})
        assert (r.model_extra or {})["sia"]["horizon"] == 3


def test_chat_streaming_matches_non_streaming(server: Server) -> None:
    client = server.client()
    kwargs: dict[str, Any] = {"model": "m", "messages": PROMPT, "max_tokens": 8, "seed": 5}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
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


def test_completions_streaming_and_not(server: Server) -> None:
    client = server.client()
    kwargs: dict[str, Any] = {"model": "m", "prompt": "The capital of France is", "max_tokens": 8, "seed": 2}
    whole = client.completions.create(**kwargs)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert (whole.model_extra or {})["sia"]["mode"] == "sparse"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert streamed == whole.choices[0].text


def test_stop_sequences(server: Server) -> None:
    client = server.client()
    kwargs: dict[str, Any] = {"model": "m", "prompt": "Once upon a time", "max_tokens": 12, "seed": 9,
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
        r = client.chat.completions.create(model="m", messages=PROMPT, max_tokens=8, seed=seed)
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
        refused = [_error(r) for r in replies if r.status_code == 429]
        assert all(e["code"] == "queue_full" and "busy" in e["message"] for e in refused)
        assert srv.wait_idle()["waiting"] == 0


def _error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": "hi"}, "messages", "valid list"),
        ({"model": "m"}, "messages", "Field required"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "'system'"),
        ({"messages": PROMPT, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": PROMPT, "temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"messages": PROMPT, "n": 2}, "n", "only n = 1"),
        ({"messages": PROMPT, "sia_mode": "sideways"}, "sia_mode", "unknown gate"),
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
        server.client().chat.completions.create(model="m", messages=PROMPT, n=3)
    assert "n = 1" in str(info.value)
    server.wait_idle()


def test_client_disconnect_frees_the_slot(server: Server) -> None:
    server.wait_idle()
    before = server.health()["cancelled"]
    # Streaming, through the official client: read a few chunks, then close the stream.
    stream = server.client().chat.completions.create(
        model="m", messages=PROMPT, max_tokens=900, seed=1, stream=True, extra_body={"sia_mode": "dense"})
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
    r2 = server.client().chat.completions.create(model="m", messages=PROMPT, max_tokens=4, seed=3)
    assert r2.choices[0].message.content is not None


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
            r = client.chat.completions.create(model="m", messages=PROMPT, seed=1)
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
