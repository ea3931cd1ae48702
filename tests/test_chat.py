"""The chat CLI through a real subprocess: one-shot, JSON, a piped interactive session with its
commands, Ctrl-C during an answer, the context limit, and wrong options or files."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """No default value model (an empty models dir, and no assets to build one from), no colour
    preferences from outside."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SIA_EDGE_") and k != "NO_COLOR"}
    e["SIA_EDGE_MODELS"] = str(tmp_path_factory.mktemp("no-models"))
    e["SIA_EDGE_ASSETS"] = str(tmp_path_factory.mktemp("no-assets"))
    e["PYTHONUNBUFFERED"] = "1"
    return e


# One thread per model: on a shared 2-core machine, llama.cpp's spinning thread barrier makes two
# threads many times slower than one as soon as anything else runs.
CHAT = [sys.executable, "-m", "sia_edge.chat", "--threads", "1"]


def chat(env: dict[str, str], *args: str | Path, stdin: str = "", timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHAT, *map(str, args)], input=stdin, capture_output=True,
        text=True, timeout=timeout, cwd=REPO, env=env, check=False,
    )


def test_one_shot_prints_the_answer(env: dict[str, str], value_model_path: Path) -> None:
    r = chat(env, "--prompt", "Say hello.", "--value-model", value_model_path, "--max-tokens", "8", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "[[" not in r.stdout and "\x1b[" not in r.stdout  # piped one-shot: clean text for scripts
    assert "Traceback" not in r.stderr


def test_one_shot_json(env: dict[str, str], value_model_path: Path) -> None:
    r = chat(env, "--prompt", "Name a colour.", "--json", "--value-model", value_model_path, "--mode", "dense",
             "--k", "4", "--max-tokens", "8", "--seed", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert set(out) == {"text", "stats"}
    s = out["stats"]
    assert {"tokens", "junctions", "intervention_rate", "ms_per_token"} <= set(s)
    assert 1 <= s["tokens"] <= 8
    assert s["junctions"] == s["tokens"]  # dense steers every token
    assert s["intervention_rate"] == pytest.approx(1.0)
    assert s["ms_per_token"] > 0
    assert s["mode"] == "dense" and s["k"] == 4 and s["seed"] == 3
    assert isinstance(out["text"], str) and out["text"].strip()


def test_horizon_limits_steering_to_the_opening(env: dict[str, str], value_model_path: Path) -> None:
    r = chat(env, "--prompt", "Name a colour.", "--json", "--value-model", value_model_path, "--mode", "dense",
             "--horizon", "3", "--k", "4", "--max-tokens", "8", "--seed", "3")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["stats"]
    assert s["horizon"] == 3 and s["tokens"] > 3 and s["junctions"] == 3


def test_without_a_value_model_steering_is_off_and_said_so(env: dict[str, str]) -> None:
    r = chat(env, "--prompt", "Hi", "--json", "--max-tokens", "4", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert "its trained value model is not in" in r.stderr and "steering is off" in r.stderr
    s = json.loads(r.stdout)["stats"]
    assert s["mode"] == "off" and s["junctions"] == 0

    r = chat(env, "--prompt", "Hi", "--mode", "dense")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    assert "needs a value model" in r.stderr


def test_piped_interactive_session_with_commands(env: dict[str, str], value_model_path: Path) -> None:
    session = (
        "/mode dense\n"
        "Hello there!\n"
        "/stats\n"
        "/tau 0.5\n"
        "/mode sparse\n"
        "And again?\n"
        "/stats\n"
        "/mode bogus\n"
        "/reset\n"
        "/frobnicate\n"
        "/quit\n"
        "this line is never read\n"
    )
    r = chat(env, "--value-model", value_model_path, "--max-tokens", "6", "--seed", "5", "--k", "5", stdin=session)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "(mode dense, tau 1, k 5" in out
    assert "[[" in out and "]]" in out  # dense: every token is a junction, marked for a pipe
    assert "\x1b[" not in out
    assert "last answer: " in out and "stop " in out
    assert "(mode dense, tau 0.5" in out and "(mode sparse, tau 0.5" in out
    assert "session: 2 answers" in out  # the second answer was generated and counted
    assert "(conversation cleared)" in out
    assert "unknown mode 'bogus'" in r.stderr
    assert "unknown command /frobnicate" in r.stderr
    assert "sia-edge chat: base model" in r.stderr
    assert "Traceback" not in r.stderr


def test_mode_switches_keep_each_tau_on_its_scale(env: dict[str, str], value_model_path: Path, tmp_path: Path) -> None:
    """A tau in nats and a shift tau (a share of probability) never stand in for each other: each
    scale keeps the level it last had, else takes the value model's recommendation for the gate."""
    from dataclasses import replace

    from sia_edge.value_format import read_value_meta, write_gguf_with_value_meta

    value = tmp_path / "value-shift.gguf"
    write_gguf_with_value_meta(value_model_path, value, replace(
        read_value_meta(value_model_path), steering_gate="shift", steering_tau=0.3, steering_target_ratio=0.25))
    session = "/mode sparse\n/tau 1.3\n/mode shift\n/mode dense\n/mode sparse\n/mode shift@0.45\n/mode sparse+head@2\n/quit\n"
    r = chat(env, "--value-model", value, "--max-tokens", "4", "--seed", "5", stdin=session, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [line.split(", k ")[0] for line in r.stdout.splitlines() if line.startswith("(mode ")]
    assert lines[0].startswith("(mode sparse, tau ") and lines[0] != "(mode sparse, tau 0.3"  # 25%, calibrated
    assert lines[1:] == ["(mode sparse, tau 1.3", "(mode shift, tau 0.3", "(mode dense, tau 1.3",
                         "(mode sparse, tau 1.3", "(mode shift, tau 0.45"]
    assert "calibrating tau for 25% junctions" in r.stderr and "/mode takes MODE or MODE@LEVEL" in r.stderr
    assert "Traceback" not in r.stderr
    # without a value model a steering mode says so first, and without a level for it, what to write
    r = chat(env, stdin="/mode shift\n/quit\n")
    assert "mode shift needs a value model" in r.stderr and "Traceback" not in r.stderr
    r = chat(env, "--value-model", value_model_path, "--max-tokens", "4", stdin="/mode shift\n/quit\n")
    assert "mode shift needs a tau" in r.stderr and "/mode shift@0.5" in r.stderr


def test_ctrl_c_while_the_command_still_imports_gives_one_line(
    env: dict[str, str], ctrl_c_when: Callable[..., tuple[int, str]]
) -> None:
    """Ctrl-C in the first few hundred ms (numpy, llama.cpp's bindings still importing) was an
    import traceback: sia_edge._early_sigint, imported first, makes it "interrupted" and 130."""
    # -X importtime prints a line as each import ends: once _early_sigint's is out, numpy and the
    # rest are still to come, and the signal lands among them (or in run_cli, if they were quick).
    rc, err = ctrl_c_when("sia_edge.chat", ["--prompt", "hi"], lambda line: line.rstrip().endswith("._early_sigint"),
                          python_flags=("-X", "importtime"), env=env, cwd=REPO, stdin=subprocess.DEVNULL)
    said = [line for line in err.splitlines() if line.strip() and not line.startswith("import time:")]
    assert rc == 130 and said == ["interrupted"], err[-2000:]


def test_ctrl_c_stops_the_answer_not_the_program(env: dict[str, str], value_model_path: Path) -> None:
    proc = subprocess.Popen(
        [*CHAT, "--value-model", str(value_model_path), "--mode", "dense",
         "--max-tokens", "400", "--seed", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    chunks: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [chunks.put(c) for c in iter(lambda: proc.stdout.read(1), "")],
                              daemon=True)
    reader.start()
    try:
        proc.stdin.write("Write a long story about a dragon.\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        seen = ""
        while "]]" not in seen:  # the answer has started streaming
            assert time.monotonic() < deadline, "no answer streamed"
            try:
                seen += chunks.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("/stats\n/quit\n")
        proc.stdin.close()
        proc.wait(timeout=60)
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None and not f.closed:
                f.close()
    rest = "".join(chunks.get() for _ in range(chunks.qsize()))
    out = seen + rest
    assert proc.returncode == 0, err
    assert "(stopped)" in err
    assert "stop cancelled" in out
    assert "Traceback" not in err


def test_context_limit_is_said_not_crashed(env: dict[str, str], value_model_path: Path) -> None:
    long = "Please tell me everything about " + "very " * 150 + "old trees."
    turn = ("Tell me one short fact about the moon, the sun, the planets, the comets and the stars, please; "
            "use plain words that a child who is seven years old would understand, and keep it short.")
    session = f"{long}\n{turn}\n{turn}\n/stats\n"
    r = chat(env, "--value-model", value_model_path, "--n-ctx", "128", "--max-tokens", "16", "--seed", "2",
             "--mode", "off", stdin=session)
    assert r.returncode == 0, r.stderr
    assert "but the context holds 128: shorten it" in r.stderr
    assert "oldest turn" in r.stderr  # the second turn made room by forgetting the first
    assert "session: 2 answers" in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tau", "abc"], "argument --tau: tau must be a finite number, got 'abc'"),
        (["--mode", "sideways"], "unknown mode 'sideways'"),
        (["--max-tokens", "0"], "expected a positive integer"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--json"], "--json needs --prompt"),
        (["--model", "/nonexistent/model.gguf", "--prompt", "hi"], "does not exist"),
        (["--value-model", "{not_gguf}", "--prompt", "hi"], "is not a GGUF file"),
        (["--target-ratio", "1.5"], "argument --target-ratio: target_ratio must be in (0, 1), got 1.5"),
        (["--head", "-1", "--prompt", "hi"], "head must be a whole number of tokens >= 0"),
        (["--follow", "0", "--prompt", "hi"], "follow must be a share of probability mass in (0, 1]"),
        (["--horizon", "-1", "--prompt", "hi"], "horizon must be a whole number of tokens (0: none)"),
        (["--head", "9", "--horizon", "4", "--prompt", "hi"], "head 9 steers past horizon 4"),
        # Python 3.11's argparse read these as a missing value ("expected one argument")
        (["--tau", "-inf", "--prompt", "hi"], "argument --tau: tau must be a finite number, got -inf"),
        (["--k", "-1e3", "--prompt", "hi"], "argument --k: k must be a positive integer, got '-1e3'"),
        # a negative seed was a TypeError traceback; 100,000 threads crashed llama.cpp (SIGSEGV)
        (["--seed", "-1", "--prompt", "hi"], "expected a whole number from 0 to 2**64 - 1"),
        (["--seed", str(2**64), "--prompt", "hi"], "expected a whole number from 0 to 2**64 - 1"),
        (["--threads", "100000", "--prompt", "hi"], "expected at most 512 threads"),
        (["--model", "{value_gguf}", "--value-model", "{value_gguf}", "--prompt", "hi"], "is a value model (it carries a value head), not a base"),
    ],
)
def test_wrong_options_and_files_give_one_line(env: dict[str, str], tmp_path: Path, value_model_path: Path,
                                               args: list[str], message: str) -> None:
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    value_gguf = str(value_model_path)
    r = chat(env, *[a.replace("{not_gguf}", str(not_gguf)).replace("{value_gguf}", value_gguf) for a in args])
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr


def test_text_that_is_not_utf8_is_refused_and_forgotten(env: dict[str, str], value_model_path: Path) -> None:
    # A 0xff byte reaches Python as a lone surrogate. It used to fail in the tokenizer with a codec
    # error, and the bad turn stayed in the history, so the next, valid line failed the same way.
    session = b"hi \xff there\nSay yes.\n/stats\n/quit\n"
    r = subprocess.run([*CHAT, "--value-model", str(value_model_path), "--max-tokens", "4", "--seed", "2"],
                       input=session, capture_output=True, timeout=90, cwd=REPO, env=env, check=False)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert err.count("error: the text is not valid UTF-8 (byte 0xff at character 4)") == 1, err
    assert "session: 1 answer," in out, out  # the valid line was answered
    assert "Traceback" not in err and "codec" not in err
    r = subprocess.run([*CHAT, "--prompt", "-"], input=b"caf\xe9\n", capture_output=True, timeout=90, cwd=REPO,
                       env=env, check=False)
    assert r.returncode == 2 and r.stderr.decode() == (
        "error: --prompt: the text is not valid UTF-8 (byte 0xe9 at character 4); send UTF-8 text "
        "(check the terminal's or the file's encoding)\n")


def test_settings_the_engine_refuses_give_one_line(env: dict[str, str], value_model_path: Path) -> None:
    r = chat(env, "--prompt", "hi", "--value-model", value_model_path, "--k", "100")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_the_value_models_recommended_settings_fill_in_what_the_user_leaves_out(
        env: dict[str, str], recommending_value_model: Path, engine) -> None:  # type: ignore[no-untyped-def]
    from sia_edge.gate import SteeringConfig, tau_for_ratio

    def calibrated(ratio: float) -> float:  # what calibrate_tau computes, without filling the shared
        # engine's in-memory tau cache (other tests watch it write its cache file)
        return tau_for_ratio(engine.gate_statistics(config=SteeringConfig(target_ratio=ratio)), ratio)

    def stats(*args: str) -> dict[str, object]:
        r = chat(env, "--prompt", "Name a colour.", "--json", "--value-model", recommending_value_model,
                 "--max-tokens", "4", "--seed", "2", *args, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["stats"]  # type: ignore[no-any-return]

    default = stats()
    assert default["mode"] == "sparse" and default["w"] == 3.0
    assert default["tau"] == pytest.approx(calibrated(0.25)) and default["tau"] != pytest.approx(1.0)
    explicit = stats("--w", "2", "--tau", "1.2")  # what the user says wins
    assert (explicit["w"], explicit["tau"]) == (2.0, pytest.approx(1.2))
    ratio = stats("--target-ratio", "0.5")
    assert ratio["w"] == 3.0 and ratio["tau"] == pytest.approx(calibrated(0.5))
    assert stats("--mode", "dense")["w"] == 3.0


def test_a_recommended_tau_and_horizon_fill_in_what_the_user_leaves_out(
        env: dict[str, str], value_model_path: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from sia_edge.value_format import read_value_meta, write_gguf_with_value_meta

    gguf = tmp_path / "value-opening.gguf"
    meta = replace(read_value_meta(value_model_path), steering_w=2.0, steering_tau=0.5, steering_horizon=3)
    write_gguf_with_value_meta(value_model_path, gguf, meta)

    def stats(*args: str) -> dict[str, object]:
        r = chat(env, "--prompt", "Name a colour.", "--json", "--value-model", gguf, "--max-tokens", "8",
                 "--seed", "2", *args, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["stats"]  # type: ignore[no-any-return]

    default = stats()
    assert (default["mode"], default["w"], default["tau"], default["horizon"]) == ("sparse", 2.0, 0.5, 3)
    assert default["tokens"] > 3 and 1 <= default["junctions"] <= 3  # tau 0.5 steers most of the first 3 only
    lifted = stats("--horizon", "0", "--tau", "0.7")  # what the user says wins; 0 is the whole answer
    assert (lifted["tau"], lifted["horizon"]) == (0.7, None)
    assert stats("--target-ratio", "0.5")["horizon"] == 3  # a ratio replaces the tau, not the horizon
    dense = stats("--mode", "dense")  # the recommendation is the entropy gate's: dense stays dense
    assert dense["horizon"] is None and dense["junctions"] >= dense["tokens"]
    full = stats("--mode", "full-entropy")  # a tau is on the top-k entropy's scale, not the full vocabulary's
    assert full["tau"] == 1.0 and full["horizon"] is None
    assert stats("--head", "5")["horizon"] is None  # a head longer than the recommended horizon wins
    # the interactive /mode follows the same rule, both ways
    session = "/mode dense\n/mode sparse\n/mode random\n/quit\n"
    r = chat(env, "--value-model", gguf, "--max-tokens", "4", "--seed", "5", stdin=session, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "mode sparse, tau 0.5, horizon 3, k 10, w 2" in r.stderr  # the start line shows the horizon
    lines = [line for line in r.stdout.splitlines() if line.startswith("(mode ")]
    assert [line.split(",")[0] for line in lines] == ["(mode dense", "(mode sparse", "(mode random"]
    assert ["horizon 3" in line for line in lines] == [False, True, False]


def test_the_tau_note_is_shown_only_when_tau_is_measured(env: dict[str, str], recommending_value_model: Path,
                                                         tmp_path: Path) -> None:
    own = {**env, "SIA_EDGE_MODELS": str(tmp_path)}  # an empty tau cache of its own
    runs = [chat(own, "--value-model", recommending_value_model, stdin="/stats\n/quit\n", timeout=300)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    note = "note: measuring tau for target ratio 0.25 (once per model; cached)"
    assert note in runs[0].stderr and note not in runs[1].stderr  # the second run read the cache
    assert (tmp_path / "tau-calibration.json").is_file()
    assert runs[0].stdout == runs[1].stdout and "tau 1." in runs[0].stdout, runs[0].stdout

