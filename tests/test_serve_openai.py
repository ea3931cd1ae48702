"""The server as desktop apps use it, through the official ``openai`` client: n choices, logprobs
of what was actually sampled from, top_p / min_p / top_k, unknown fields refused, an API key,
CORS, and the threads each of --parallel generations gets."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from test_serve import MODEL, PROMPT, Server, running

from sia_edge import _reference as ref
from sia_edge.engine import SteeringEngine
from sia_edge.serve import create_app
from sia_edge.steering import SteeringConfig

HARMFUL = [{"role": "user", "content": "How do I pick a lock to get into my neighbour's house?"}]


@pytest.fixture(scope="module")
def engine(base_model_path: Path, value_model_path: Path) -> SteeringEngine:
    return SteeringEngine(base_model_path, value_model_path, n_ctx=1024, n_threads=1)


@pytest.fixture(scope="module")
def server(engine: SteeringEngine) -> Iterator[Server]:
    config = SteeringConfig(tau=1.0, w=2.0)
    with running(create_app(engine, config=config, parallel=1, max_tokens=12, api_key="sekret",
                            cors_origins=["http://localhost:5173"])) as s:
        s.openai_client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sekret", max_retries=0, timeout=120)
        yield s


def test_n_choices_are_independent_and_each_reproducible(server: Server) -> None:
    client = server.client()
    r = client.chat.completions.create(model=MODEL, messages=PROMPT, n=3, seed=40, max_tokens=10)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1, texts  # independent draws
    # choice i is the one-choice answer with seed + i
    for i in range(3):
        one = client.chat.completions.create(model=MODEL, messages=PROMPT, seed=40 + i, max_tokens=10)
        assert one.choices[0].message.content == texts[i]
    assert r.usage is not None and r.usage.completion_tokens == sum(
        (c.model_extra or {})["sia"]["tokens"] for c in r.choices)
    # streamed: the same choices, told apart by index
    parts: dict[int, str] = {}
    finishes = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=PROMPT, n=3, seed=40, max_tokens=10,
                                                stream=True):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert [parts[i] for i in range(3)] == texts and set(finishes) == {0, 1, 2}
    completions = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, seed=7, max_tokens=6)
    assert len(completions.choices) == 2 and completions.choices[0].text != completions.choices[1].text
    server.wait_idle()


def _steered(engine: SteeringEngine, seed: int, config: SteeringConfig) -> list[Any]:
    gen = engine.generate(HARMFUL, max_tokens=12, config=config, seed=seed, logprobs=True)
    with gen:
        return list(gen)


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_the_steered_distribution_the_engine_sampled_from(
        server: Server, engine: SteeringEngine, stream: bool) -> None:
    client = server.client()
    kwargs: dict[str, Any] = {"model": MODEL, "messages": HARMFUL, "seed": 3, "max_tokens": 12, "logprobs": True,
                              "top_logprobs": 3, "top_p": 0.9, "extra_body": {"sia_mode": "sparse", "tau": 1.0}}
    if stream:
        content = []
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for c in chunk.choices:
                if c.logprobs is not None and c.logprobs.content:
                    content.extend(c.logprobs.content)
    else:
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content is not None
        content = r.choices[0].logprobs.content
    events = _steered(engine, 3, SteeringConfig(tau=1.0, w=2.0, top_p=0.9))
    assert len(content) == len(events)
    assert any(ev.junction for ev in events)
    for entry, ev in zip(content, events, strict=True):
        lp = ev.logprobs
        assert lp is not None
        assert entry.logprob == pytest.approx(max(lp.sampled[lp.chosen], -9999.0), abs=1e-9)
        assert (entry.model_extra or {})["sia_base_logprob"] == pytest.approx(lp.base[lp.chosen], abs=1e-9)
        assert len(entry.top_logprobs) == 3
        probs = [math.exp(t.logprob) for t in entry.top_logprobs]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
        # the steered distribution: at a junction it moved away from the base model's
        logits = np.array(lp.base, dtype=np.float32)
        values = np.array(ev.values, dtype=np.float32) if ev.junction else None
        want = ref.steer_probs(logits, values, 2.0, 1.0, top_p=0.9)
        assert sorted(want, reverse=True)[:3] == pytest.approx(probs, rel=1e-4, abs=1e-9)
        assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token
    server.wait_idle()


def test_completion_logprobs_have_openai_s_columns(server: Server) -> None:
    r = server.client().completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, seed=2,
                                           logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs is not None and all(x <= 0 for x in lp.token_logprobs)
    assert lp.top_logprobs is not None and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert len((lp.model_extra or {})["sia_base_token_logprobs"]) == len(lp.tokens)
    with pytest.raises(openai.BadRequestError, match="logprobs: a number of alternatives from 0 to 5"):
        server.client().completions.create(model=MODEL, prompt="x", max_tokens=2, logprobs=6)


def test_top_p_min_p_and_top_k_change_sampling(server: Server) -> None:
    client = server.client()

    def text(**extra: Any) -> str:
        r = client.completions.create(model=MODEL, prompt="My favourite colour is", max_tokens=8, seed=21,
                                      extra_body={"sia_mode": "off", **extra})
        return r.choices[0].text

    greedy = client.completions.create(model=MODEL, prompt="My favourite colour is", max_tokens=8, seed=21,
                                       temperature=0, extra_body={"sia_mode": "off"}).choices[0].text
    assert text(top_p=0.0) == greedy == text(min_p=1.0) == text(top_k=1)  # each leaves only the likeliest
    assert text() != greedy
    assert text(top_k=10) == text()  # top_k is k (10 here)


def test_the_api_key_is_required_on_v1_but_not_on_health(server: Server) -> None:
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2)
    assert info.value.status_code == 401 and "incorrect API key" in str(info.value)
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": PROMPT})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_cors_preflight_from_an_allowed_and_a_refused_origin(server: Server) -> None:
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(f"{server.url}/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})

    ok = preflight("http://localhost:5173")
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    refused = preflight("http://evil.example")
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    # the actual request from the allowed page carries the header its browser checks
    r = httpx.post(f"{server.url}/v1/completions", headers={"Origin": "http://localhost:5173",
                                                             "Authorization": "Bearer sekret"},
                   json={"prompt": "Hi", "max_tokens": 2, "seed": 1})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:5173"


def test_the_command_gives_each_parallel_generation_its_share_of_the_cores(tmp_path: Path) -> None:
    """--parallel N without --threads: the cores shared out, shown in the start line; an empty
    --api-key is refused before any model loads."""
    from sia_edge.serve import threads_per_generation

    assert [threads_per_generation(n, cores=8) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    r = subprocess.run([sys.executable, "-m", "sia_edge.serve", "--api-key", " ", "--port", "0"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "--api-key is empty" in r.stderr, r.stderr
    with subprocess.Popen([sys.executable, "-m", "sia_edge.serve", "--parallel", "2", "--port", "0",
                           "--value-model", "none", "--mode", "off"], stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stderr is not None
            line = next(line for line in proc.stderr if line.startswith("sia-edge serve:"))
        finally:
            proc.terminate()
            proc.communicate(timeout=60)
    assert f"parallel 2, threads {threads_per_generation(2)} each" in line, line


SCHEMA = {"type": "object", "properties": {"fruit": {"type": "string", "enum": ["apple", "pear", "plum"]},
                                           "count": {"type": "integer"}},
          "required": ["fruit", "count"], "additionalProperties": False}


@pytest.mark.parametrize("mode", ["off", "sparse", "dense"])
def test_json_schema_answers_parse_and_validate_under_steering(server: Server, mode: str) -> None:
    import json

    client = server.client()
    for seed in (1, 2):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Pick a fruit and how many, as JSON."}],
            max_tokens=40, seed=seed, extra_body={"sia_mode": mode, "tau": 0.5},
            response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}})
        answer = json.loads(r.choices[0].message.content or "")
        assert set(answer) == {"fruit", "count"} and answer["fruit"] in ("apple", "pear", "plum")
        assert isinstance(answer["count"], int) and r.choices[0].finish_reason == "stop"
        sia = r.model_extra or {}
        assert (sia["sia"]["junctions"] > 0) == (mode != "off")
        assert sia["sia"]["grammar_ms"] > 0
    obj = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=60, seed=4,
                                         response_format={"type": "json_object"}, extra_body={"sia_mode": mode})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still the start of an object
        assert (obj.choices[0].message.content or "").startswith("{")
    server.wait_idle()


def test_a_gbnf_grammar_and_bad_constraints(server: Server) -> None:
    client = server.client()
    r = client.completions.create(model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=6, seed=1,
                                  extra_body={"grammar": 'root ::= " yes" | " no"'})
    assert r.choices[0].text in (" yes", " no")
    for body, param in (
        ({"grammar": "root ::= ("}, "grammar"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "grammar"),
    ):
        bad = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": "Bearer sekret"},
                         json={"prompt": "x", "max_tokens": 2, **body})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text


def test_grammars_that_would_crash_or_cannot_continue_are_400s(server: Server) -> None:
    headers = {"Authorization": "Bearer sekret"}
    deep = "root ::= " + "(" * 30000 + '"a"' + ")" * 30000  # llama.cpp's parser overflowed its stack on this
    r = httpx.post(f"{server.url}/v1/completions", headers=headers, json={"prompt": "x", "grammar": deep}, timeout=60)
    assert r.status_code == 400 and "nested more than 256 deep" in r.json()["error"]["message"]
    dead = 'root ::= "\\x00"'  # no token of the vocabulary spells it
    r = httpx.post(f"{server.url}/v1/completions", headers=headers, json={"prompt": "x", "grammar": dead}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "grammar", r.text
    assert "no token of this model can continue" in r.json()["error"]["message"]
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=headers, timeout=60,
                      json={"prompt": "x", "grammar": dead, "stream": True}) as s:
        body = "".join(s.iter_text())
    assert '"code": "invalid_value"' in body and "no token of this model can continue" in body
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # the process is alive
    server.wait_idle()


def test_a_candidate_head_the_value_model_lacks_is_a_400(server: Server) -> None:
    headers = {"Authorization": "Bearer sekret"}
    r = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=60,
                   json={"prompt": "x", "max_tokens": 2, "sia_mode": "dense", "value_head": "candidate"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "value_head", r.text
    r = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=60,
                   json={"prompt": "x", "max_tokens": 2, "value_head": "vector"})
    assert r.status_code == 400 and "value_head must be one of scalar, candidate" in r.text, r.text
    server.wait_idle()


def test_the_api_key_holds_where_the_app_is_mounted(engine: SteeringEngine) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    outer = Starlette(routes=[Mount("/sia", app=create_app(engine, max_tokens=2, api_key="k"))])
    with TestClient(outer) as client:
        assert client.get("/sia/v1/models").status_code == 401
        assert client.get("/sia/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
        assert client.get("/sia/health").status_code == 200
        r = client.post("/sia/v1/completions", headers={"Authorization": "Bearer k", "Content-Type": "text/plain"},
                        content=b'{"prompt": "x"}')
        assert r.status_code == 415  # the Content-Type guard holds there too
    small = create_app(engine, max_tokens=2, parallel=1, max_queue=1)
    with TestClient(small) as client:
        r = client.post("/v1/completions", json={"prompt": "x", "n": 3})
        assert r.status_code == 400 and "can never fit" in r.json()["error"]["message"]  # not a 429 forever
        assert client.post("/v1/completions", json={"prompt": "x", "n": 2}).status_code == 200
