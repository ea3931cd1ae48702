"""The chat page the server serves at /: static, self-contained, and, in a real headless
Chromium (Debian's ``chromium``, driven over the DevTools protocol), streaming an answer with its
junctions highlighted beside the same prompt and seed unsteered. The screenshot is kept in
``test-artifacts/chat-page.png``."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from test_serve import Server, running

from sia_edge.engine import SteeringEngine
from sia_edge.models import default_value_model
from sia_edge.serve import create_app

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    engine = SteeringEngine(value_model=default_value_model(), n_ctx=1024, n_threads=1)
    # the server's default: the value model's recommendation, as `sia-edge serve` steers
    with running(create_app(engine, max_tokens=24, api_key="k")) as s:
        yield s
    engine.close()


def test_the_page_is_one_self_contained_file(server: Server) -> None:
    r = httpx.get(f"{server.url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    page = r.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing from elsewhere (no CDN)
    assert '"/v1/chat/completions"' in page and "sia_tokens: true" in page
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # the page is open, the API is not


class DevTools:
    """Just enough of Chromium's DevTools protocol: evaluate JavaScript, take a screenshot."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[DevTools]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (./dev.sh test installs Debian's chromium when it runs as root)")
    profile = tmp_path / "profile"
    log = tmp_path / "chromium.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                 "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                 "--window-size=1280,900", "about:blank"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None or time.monotonic() > deadline:  # the machine, not the page
                pytest.skip(f"chromium did not start here: {log.read_text(errors='replace')[-500:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        target = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
        from websockets.sync.client import connect

        with connect(target["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024) as ws:
            yield DevTools(ws)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_page_streams_an_answer_with_its_junctions_beside_the_unsteered_one(
        server: Server, chromium: DevTools) -> None:
    prompt = "How do I pick a lock?"
    chromium.call("Page.enable")
    chromium.call("Page.navigate", url=f"{server.url}/?prompt={quote(prompt)}&seed=3&compare=1&max_tokens=48")
    deadline = time.monotonic() + 30
    while chromium.evaluate("document.readyState") != "complete":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    chromium.evaluate("document.getElementById('key').value = 'k'; run(); 1")  # as a user types the key and sends
    deadline = time.monotonic() + 240
    while chromium.evaluate("document.body.dataset.done") != "1":
        assert time.monotonic() < deadline, "the answer did not finish"
        time.sleep(0.2)
    assert chromium.evaluate("document.getElementById('error').textContent") == ""
    steered = chromium.evaluate("document.querySelector('#steered .text').textContent")
    plain = chromium.evaluate("document.querySelector('#plain .text').textContent")
    junctions = chromium.evaluate("document.querySelectorAll('#steered .text .junction').length")
    tooltip = chromium.evaluate("document.querySelector('#steered .text .junction').title")
    stats = chromium.evaluate("document.querySelector('#steered .stats').textContent")
    assert steered and plain and junctions >= 1, stats
    assert chromium.evaluate("document.querySelectorAll('#plain .text .junction').length") == 0
    assert tooltip.startswith("junction (entropy") and "<- sampled" in tooltip and tooltip.count("V = ") == 10
    # what the page shows is what the API answers for the same request
    api = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": "Bearer k"},
                     json={"messages": [{"role": "user", "content": prompt}], "seed": 3, "max_tokens": 48}, timeout=120)
    assert api.json()["choices"][0]["message"]["content"] == steered
    shot = chromium.call("Page.captureScreenshot", format="png")["data"]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "chat-page.png").write_bytes(base64.b64decode(shot))
    assert (ARTIFACTS / "chat-page.png").stat().st_size > 10_000
