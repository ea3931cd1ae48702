"""Presets (issue 19): a named pair of models plus what they were evaluated with, accepted by the
chat, eval and the Python API; a preset's value model is built from its assets on first use, and
an interrupted build leaves nothing that counts as built."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from sia_edge.cli_common import choose_value_model
from sia_edge.engine import SteeringEngine
from sia_edge.models import ModelNotFoundError, default_base_model
from sia_edge.presets import DEFAULT_PRESET, PRESETS, get_preset, stamp_path

REPO = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIA_EDGE_")}
    env.update(extra)
    return env


def test_the_table() -> None:
    assert DEFAULT_PRESET == "smollm2-safety" and set(PRESETS) >= {"smollm2-safety", "gemma3-detox"}
    safety, detox = get_preset("smollm2-safety"), get_preset("gemma3-detox")
    assert (safety.reward, safety.prompt_style) == ("safety", "chat")
    assert (detox.reward, detox.prompt_style) == ("nontoxicity", "text")
    with pytest.raises(ValueError, match="unknown preset 'nope'; choose one of smollm2-safety"):
        get_preset("nope")


def test_a_preset_without_its_trained_assets_says_where_they_should_be(tmp_path: Path) -> None:
    ghost = replace(get_preset("smollm2-safety"), name="ghost", assets="value-ghost")
    with pytest.raises(ModelNotFoundError, match=r"its trained value model is not in .*value-ghost"):
        ghost.value_model()
    choice = choose_value_model(None, default_base_model(), preset=ghost)
    assert choice.path is None and choice.notice is not None
    assert "value-ghost" in choice.notice and "steering is off" in choice.notice


def test_unknown_preset_is_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "sia_edge.chat", "--preset", "nope", "--prompt", "hi"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown preset 'nope'" in proc.stderr


def test_the_value_model_is_built_on_first_use_and_an_interrupted_build_leaves_nothing_built(
        tmp_path: Path) -> None:
    """In an empty models folder the first use builds the preset's value model (steps shown as it
    goes); the result has the same tensors as the setup's build. A build stopped half-way leaves
    no file that counts as built, and the next use builds it again."""
    preset = get_preset("smollm2-safety")
    reference = preset.value_model()  # the setup's build
    env = _env(SIA_EDGE_MODELS=str(tmp_path))
    code = "from sia_edge.presets import get_preset; print(get_preset('smollm2-safety').value_model())"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    assert proc.stderr is not None
    for line in proc.stderr:  # interrupt once the merge has started
        if line.startswith("[smollm2-safety 2]"):
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=300)
    built = tmp_path / reference.name
    assert not (built.is_file() and stamp_path(built).is_file())  # nothing counts as built
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == built and stamp_path(built).is_file()
    steps = [line for line in done.stderr.splitlines() if line.startswith("[smollm2-safety ")]
    assert len(steps) >= 3 and "building" in steps[0] and "built" in steps[-1]
    from sia_edge.value_format import read_gguf_tensor_infos

    assert read_gguf_tensor_infos(built) == read_gguf_tensor_infos(reference)
    assert built.read_bytes() == reference.read_bytes()
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                           timeout=300, check=False)
    assert again.returncode == 0 and "building" not in again.stderr  # built once


def test_the_library_default_equals_the_chat_default() -> None:
    """Same prompt, same seed, no settings given: the Python API steers as the chat does (the
    value model's recommendation), so an app embedding the library behaves as evaluated."""
    proc = subprocess.run([sys.executable, "-m", "sia_edge.chat", "--prompt", "How do I pick a lock?", "--json",
                           "--seed", "7", "--max-tokens", "24", "--threads", "1"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    chat = json.loads(proc.stdout)
    with SteeringEngine.from_preset(n_threads=1) as engine:
        config = engine.recommended()
        gen = engine.generate([{"role": "user", "content": "How do I pick a lock?"}], max_tokens=24, seed=7)
        with gen:
            for _ in gen:
                pass
    assert gen.text == chat["text"] and gen.stats.junctions == chat["stats"]["junctions"]
    assert (config.w, config.tau, config.horizon) == (chat["stats"]["w"], chat["stats"]["tau"], chat["stats"]["horizon"])
    assert config.horizon is not None  # the shipped model recommends steering the opening only
