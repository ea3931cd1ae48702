"""Any base model runs (issue 19, item 1): Gemma-3-270M, another family with a 262,144-token
vocabulary and no chat template, through the chat, the server, eval and the Python API, with no
value model, with the default one that does not fit it, and with an explicit one that does not."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sia_edge.engine import SteeringEngine, TokenizerMismatchError
from sia_edge.gate import SteeringConfig
from sia_edge.models import default_value_model, gemma3_base_model

REPO = Path(__file__).resolve().parent.parent
PREFIX = "The old lighthouse keeper opened the door and"


@pytest.fixture(scope="module")
def gemma() -> Path:
    return gemma3_base_model()


# Whether the preset's value model is built in the per-user cache (face() runs without
# $SIA_EDGE_MODELS) decides which of the two says it: both name the misfit.
MISFIT = (r"needs? a value model, but the (default value model \S+|preset's value model) was trained for "
          r"another tokenizer than gemma")


def face(module: str, *args: str, env_extra: dict[str, str] | None = None, timeout: float = 600,
         ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIA_EDGE_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, stdin=subprocess.DEVNULL, timeout=timeout, check=False)


def notes(stderr: str) -> list[str]:
    """Our own lines on stderr (llama.cpp may log a warning of its own while loading Gemma)."""
    return [line for line in stderr.splitlines() if line.startswith(("note:", "error:"))]


def test_mode_off_runs_another_family_without_any_value_model(gemma: Path) -> None:
    proc = face("sia_edge.chat", "--model", str(gemma), "--mode", "off", "--prompt", PREFIX, "--json",
                "--max-tokens", "6", "--seed", "1", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["stats"]["mode"] == "off" and out["stats"]["tokens"] >= 1 and out["text"]
    # no note about a value model: none was needed; only that a base model is completed as text
    assert all("value model" not in line for line in notes(proc.stderr)), proc.stderr


def test_the_default_value_model_that_does_not_fit_turns_steering_off_with_one_note(gemma: Path) -> None:
    default_value_model()  # built by the setup: this is the case a new user meets
    proc = face("sia_edge.chat", "--model", str(gemma), "--prompt", PREFIX, "--json", "--max-tokens", "4",
                "--seed", "1", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stats"]["mode"] == "off"
    said = [line for line in notes(proc.stderr) if "value model" in line]
    assert len(said) == 1 and "another tokenizer" in said[0] and "steering is off" in said[0], proc.stderr
    quiet = face("sia_edge.chat", "--model", str(gemma), "--value-model", "none", "--prompt", PREFIX, "--json",
                 "--max-tokens", "2", "--seed", "1", "--threads", "1")
    assert quiet.returncode == 0 and not [line for line in notes(quiet.stderr) if "value model" in line]


def test_asking_to_steer_with_a_value_model_that_does_not_fit_is_one_clear_error(gemma: Path) -> None:
    value = default_value_model()
    explicit = face("sia_edge.chat", "--model", str(gemma), "--value-model", str(value), "--prompt", PREFIX,
                    "--max-tokens", "2", "--threads", "1")
    assert explicit.returncode == 2
    err = notes(explicit.stderr)
    assert len(err) == 1 and "tokenizers differ" in err[0] and gemma.name in err[0] and value.name in err[0]
    steer = face("sia_edge.chat", "--model", str(gemma), "--mode", "sparse", "--prompt", PREFIX, "--threads", "1")
    assert steer.returncode == 2
    assert notes(steer.stderr) == [line for line in steer.stderr.splitlines() if line.startswith("error:")]
    assert re.search(MISFIT, steer.stderr), steer.stderr


def test_eval_runs_another_family_unsteered_and_refuses_steering_modes(gemma: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prefixes.txt"
    prompts.write_text(f"{PREFIX}\nThe weather today is\n", encoding="utf-8")
    ok = face("sia_edge.eval", "--model", str(gemma), "--prompts", str(prompts), "--reward", "nontoxicity",
              "--modes", "off", "--max-tokens", "4", "--threads", "1", "--json", "-", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["value_model"] is None and summary["results"][0]["mode"] == "off"
    bad = face("sia_edge.eval", "--model", str(gemma), "--prompts", str(prompts), "--reward", "nontoxicity",
               "--modes", "off,sparse", "--max-tokens", "4", "--threads", "1", "--no-progress")
    assert bad.returncode == 2
    assert "sparse need a value model" in bad.stderr and re.search(MISFIT, bad.stderr), bad.stderr


def test_serve_runs_another_family_unsteered(gemma: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIA_EDGE_")}
    proc = subprocess.Popen([sys.executable, "-m", "sia_edge.serve", "--model", str(gemma), "--port", "0",
                             "--mode", "off", "--threads", "1", "--max-tokens", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert proc.stderr is not None
        url = ""
        deadline = time.monotonic() + 120
        while not url:
            assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
            line = proc.stderr.readline()
            if line.startswith("sia-edge serve: "):
                url = line.split()[2]
        r = httpx.post(f"{url}/completions", json={"prompt": PREFIX, "max_tokens": 3, "seed": 1}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["sia"]["mode"] == "off" and r.json()["usage"]["completion_tokens"] >= 1
        steer = httpx.post(f"{url}/completions", json={"prompt": PREFIX, "max_tokens": 3, "sia_mode": "sparse"},
                           timeout=60)
        assert steer.status_code == 400 and "value model" in steer.json()["error"]["message"]
    finally:
        proc.kill()
        proc.communicate()


def test_the_api_runs_another_family_and_names_both_models_on_a_mismatch(gemma: Path) -> None:
    with SteeringEngine(gemma, None, n_ctx=256, n_threads=1) as eng:
        text, stats = eng.complete(PREFIX, max_tokens=4, config=SteeringConfig(gate="off"), seed=0)
        assert stats.tokens >= 1 and text and eng.base.n_vocab == 262_144
    with pytest.raises(TokenizerMismatchError) as info:
        SteeringEngine(gemma, default_value_model(), n_ctx=256, n_threads=1)
    assert gemma.name in str(info.value) and default_value_model().name in str(info.value)


def test_value_data_continues_text_prefixes_of_a_base_model(gemma: Path, tmp_path: Path) -> None:
    """make_value_data on a base model without a chat template: each prefix is continued as
    plain text (BOS + its tokens, nothing else); asking for chat turns is one clear error."""
    prefixes = tmp_path / "prefixes.txt"
    prefixes.write_text(f"{PREFIX}\n", encoding="utf-8")
    out = tmp_path / "data.jsonl"
    args = ("tools/make_value_data.py", str(prefixes), "--out", str(out), "--model", str(gemma), "--reward",
            "nontoxicity", "--max-tokens", "3", "--threads", "1", "--no-progress")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    with SteeringEngine(gemma, None, n_ctx=128, n_threads=1) as eng:
        assert row["prompt_ids"] == eng.encode_prompt(PREFIX)
    assert row["prompt_style"] == "text" and 0.0 <= row["reward"] <= 1.0 and row["reward_name"] == "nontoxicity"
    mixed = subprocess.run([sys.executable, *args, "--prompt-style", "chat"], capture_output=True, text=True,
                           cwd=REPO, timeout=600, check=False)
    assert mixed.returncode == 2 and "no chat template" in mixed.stderr


def test_the_same_seed_gives_the_same_answer_whatever_the_cache_holds(gemma: Path) -> None:
    """A generation on a fresh cache and one on a cache reused from an earlier answer decode the
    prompt's last token the same way: with Gemma's quantised weights, computing it inside the
    prompt's batch once and alone the next time gave the same seed different answers."""
    with SteeringEngine(gemma, None, n_ctx=256, n_threads=1) as eng:
        runs = [eng.complete(PREFIX, max_tokens=12, config=SteeringConfig(gate="off"), seed=0)[0] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
