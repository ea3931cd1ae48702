"""Shared fixtures: the real SmolLM2 GGUF through the real llama.cpp, and a value model built
from it with a fixed random head (the training pipeline's tests build real heads)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# As dev.sh sets it: the checkout's models/ holds built models and caches (not the per-user cache
# an installed sia-edge uses), also when pytest is run directly. Before sia_edge reads it.
os.environ.setdefault("SIA_EDGE_MODELS", str(Path(__file__).resolve().parent.parent / "models"))

from sia_edge import kernels
from sia_edge.models import default_base_model
from sia_edge.value_format import random_head_value_gguf


@pytest.fixture(scope="session")
def ctrl_c_when() -> Callable[..., tuple[int, str]]:
    """``run(module, args, ready, python_flags=(), **popen)``: start ``python -m MODULE ARGS``,
    press Ctrl-C once a line of its stderr satisfies ``ready``, and return (exit code, the rest of
    its stderr).

    The command runs as a terminal's foreground job would, with Python's own SIGINT handler. When
    the suite itself runs as a background job of a non-interactive shell (``./dev.sh test &``), the
    shell starts it with SIGINT ignored, every child inherits that, and the commands keep an
    inherited SIG_IGN as they should (that is how background jobs stay out of a terminal's Ctrl-C):
    the signal then did nothing, and a run went on past it."""

    def run(module: str, args: list[str], ready: Callable[[str], bool], *, python_flags: tuple[str, ...] = (),
            **popen: Any) -> tuple[int, str]:
        code = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
        proc = subprocess.Popen([sys.executable, *python_flags, "-c", code, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **popen)
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if ready(line):
                    break
            else:
                raise AssertionError(f"{module} ended before the moment to press Ctrl-C (exit {proc.wait()})")
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        return proc.returncode, err

    return run


@pytest.fixture(params=kernels.available_isas())
def isa(request: pytest.FixtureRequest):
    """Each test that takes it runs once per instruction set the build and CPU support."""
    before = kernels.active_isa()
    kernels.force_isa(request.param)
    yield request.param
    kernels.force_isa(before)


@pytest.fixture(scope="session")
def base_model_path() -> Path:
    return default_base_model()


@pytest.fixture(scope="session")
def value_model_path(tmp_path_factory: pytest.TempPathFactory, base_model_path: Path) -> Path:
    """SmolLM2 as its own value backbone, with a fixed head: values vary by candidate and
    position, which is all the engine's tests need."""
    return random_head_value_gguf(base_model_path, tmp_path_factory.mktemp("value") / "value-fixture.gguf")


@pytest.fixture(scope="session")
def recommending_value_model(tmp_path_factory: pytest.TempPathFactory, value_model_path: Path) -> Path:
    """The fixture value model, exported with recommended settings (w 3, 25% junctions)."""
    from dataclasses import replace

    from sia_edge.value_format import read_value_meta, write_gguf_with_value_meta

    dst = tmp_path_factory.mktemp("recommending") / "value-recommending.gguf"
    meta = replace(read_value_meta(value_model_path), steering_w=3.0, steering_target_ratio=0.25)
    write_gguf_with_value_meta(value_model_path, dst, meta)
    return dst


@pytest.fixture(scope="session")
def engine(base_model_path: Path, value_model_path: Path):
    from sia_edge.engine import SteeringEngine

    return SteeringEngine(base_model_path, value_model_path, n_ctx=1024, n_threads=1)


# --------------------------------------------------------------------------- training pipeline
# (tests/test_train_*.py, test_rewards.py, test_export*.py) Loading the tokenizer out of the GGUF
# takes transformers ~15 s, so it is read once per session and saved in the HF format.
@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, base_model_path: Path) -> Path:
    from sia_edge.train.tiny import load_gguf_tokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    load_gguf_tokenizer(base_model_path).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A tiny random llama (hidden 64, 2 layers) with SmolLM2's tokenizer, saved in HF format."""
    from transformers import AutoTokenizer

    from sia_edge.train.tiny import build_tiny_llama

    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir), local_files_only=True)
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tok, seed=0)
