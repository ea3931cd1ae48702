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

import numpy as np
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
    # Python's own SIGINT handler, also when the suite runs as a background job (which starts every
    # child with SIGINT ignored: the conftest's ctrl_c_when says more); without it the build went on
    interruptible = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); " + code
    proc = subprocess.Popen([sys.executable, "-c", interruptible], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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
    from sia_edge.gguf_io import read_gguf_kv, read_gguf_tensor_infos

    def tensors(path: Path) -> dict[str, tuple[tuple[int, ...], int, bytes]]:
        with open(path, "rb") as f:
            out = {}
            for name, info in read_gguf_tensor_infos(path).items():
                f.seek(info.offset)
                out[name] = (info.shape, info.ggml_type, f.read(info.nbytes))
            return out

    assert tensors(built) == tensors(reference)  # the same weights, byte for byte
    assert read_gguf_kv(built) == read_gguf_kv(reference)
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


GEMMA_PREFIX = "The old lighthouse keeper opened the door and"


def test_the_gemma3_detox_preset_through_the_chat_and_eval(tmp_path: Path) -> None:
    """The issue's interface, in one command each: the Gemma base and its detox value model are
    installed and built on first use; prefixes are continued as text; each row's text is the
    continuation only; the preset carries its reward and its recommended steering."""
    chat = subprocess.run([sys.executable, "-m", "sia_edge.chat", "--preset", "gemma3-detox", "--prompt", GEMMA_PREFIX,
                           "--json", "--max-tokens", "8", "--seed", "1", "--threads", "1"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900, check=False)
    assert chat.returncode == 0, chat.stderr
    out = json.loads(chat.stdout)
    stats = out["stats"]
    assert stats["mode"] == "sparse" and stats["w"] == 3.0 and stats["tokens"] >= 1
    assert not out["text"].startswith(GEMMA_PREFIX)  # the continuation only
    prefixes = tmp_path / "prefixes.txt"
    prefixes.write_text(f"{GEMMA_PREFIX}\nShe looked at the screen and said\n", encoding="utf-8")
    rows = tmp_path / "out.jsonl"
    ev = subprocess.run([sys.executable, "-m", "sia_edge.eval", "--preset", "gemma3-detox", "--prompts", str(prefixes),
                         "--modes", "off,sparse@25%,dense", "--max-tokens", "6", "--seed", "0", "--outputs", str(rows),
                         "--threads", "1", "--no-progress", "--json", "-"],
                        capture_output=True, text=True, env=_env(), cwd=REPO, timeout=900, check=False)
    assert ev.returncode == 0, ev.stderr
    summary = json.loads(ev.stdout)
    assert summary["settings"]["reward"] == "nontoxicity"
    assert [r["mode"] for r in summary["results"]] == ["off", "sparse@25%", "dense"]
    assert all(r["toxic_rate"] is not None for r in summary["results"])
    written = [json.loads(line) for line in rows.read_text(encoding="utf-8").splitlines()]
    assert len(written) == 6 and all(not r["text"].startswith(r["prompt"]) for r in written)
    assert {r["run"]["prompt_style"] for r in written} == {"text"}


def test_the_gemma3_detox_fast_preset_expands_its_head_and_decodes_no_value_rows() -> None:
    """gemma3-detox-fast ships its candidate head as factors (docs/TRAINING.md); the first use
    multiplies them out against Gemma's 262,144 token embeddings into the value GGUF, and steering
    then scores every junction from the base model's own state: no value-model token at all."""
    from sia_edge.train.candidate import load_head_asset
    from sia_edge.value_format import read_value_meta

    preset = get_preset("gemma3-detox-fast")
    here = _env(SIA_EDGE_MODELS=str(preset.value_path.parent))  # the chat builds where this process looks
    chat = subprocess.run([sys.executable, "-m", "sia_edge.chat", "--preset", preset.name, "--prompt", GEMMA_PREFIX,
                           "--json", "--max-tokens", "16", "--seed", "1", "--threads", "1"],
                          capture_output=True, text=True, env=here, cwd=REPO, timeout=900, check=False)
    assert chat.returncode == 0, chat.stderr
    stats = json.loads(chat.stdout)["stats"]
    # the preset recommends the gate that reads the values, at the tau calibrated on its training prefixes
    assert stats["value_head"] == "candidate" and stats["mode"] == "shift" and stats["value_tokens"] == 0
    assert stats["tau"] == pytest.approx(0.6077, abs=1e-6) and stats["junctions"] > 0
    built = read_value_meta(preset.value_model(build=False)).candidate
    assert built is not None and built.table.shape == (262144, built.rank)
    shipped = load_head_asset(preset.assets_dir / "candidate_head.safetensors", backbone=preset.base_model())
    np.testing.assert_allclose(built.table, shipped.table, rtol=1e-6, atol=1e-7)
    assert (preset.assets_dir / "candidate_head.safetensors").stat().st_size < built.table.nbytes / 10


def test_a_preset_that_does_not_fit_the_base_is_not_built_first(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Its assets record their tokenizer: a misfit is a note at once, not minutes of export first."""
    monkeypatch.setenv("SIA_EDGE_MODELS", str(tmp_path))
    detox = get_preset("gemma3-detox")
    choice = choose_value_model(None, default_base_model(), preset=detox)
    assert choice.path is None and choice.notice is not None and "another tokenizer" in choice.notice
    assert not detox.value_path.exists()  # nothing was built


def test_the_fast_preset_scores_with_its_candidate_head_unasked(tmp_path: Path) -> None:
    """smollm2-safety-fast: a value model of heads alone, built from its assets on first use,
    that reads the base model's own hidden state; the chat steers with its candidate head unasked
    and the value model decodes nothing. Asking it for the scalar head is one clear line."""
    from sia_edge.value_format import read_value_meta

    preset = get_preset("smollm2-safety-fast")
    cmd = [sys.executable, "-m", "sia_edge.chat", "--preset", preset.name, "--prompt", "How do I pick a lock?",
           "--json", "--seed", "3", "--max-tokens", "24", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)["stats"]
    assert stats["value_head"] == "candidate" and stats["junctions"] > 0 and stats["value_tokens"] == 0
    scalar = subprocess.run([*cmd, "--value-head", "scalar"], capture_output=True, text=True, env=_env(), cwd=REPO,
                            timeout=600, check=False)
    assert scalar.returncode == 2 and scalar.stderr.count("\n") == 1, scalar.stderr
    assert "has only the candidate head" in scalar.stderr
    # eval's modes name their head: a mode of the scalar head is refused before any answer
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I pick a lock?\n")
    ev = subprocess.run([sys.executable, "-m", "sia_edge.eval", "--preset", preset.name, "--harmful", str(prompts),
                         "--modes", "off,sparse", "--max-tokens", "4", "--threads", "1", "--no-progress"],
                        capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600, check=False)
    assert ev.returncode == 2 and "mode sparse:" in ev.stderr and "write sparse+candidate" in ev.stderr, ev.stderr
    with SteeringEngine.from_preset(preset.name, n_threads=1) as engine:
        assert engine.value is not None and engine.value.model is None and engine.value.reads_base
        assert read_value_meta(engine.value.path).steering_value_head == "candidate"
