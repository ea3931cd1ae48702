"""Shared fixtures: the real SmolLM2 GGUF through the real llama.cpp, and a value model built
from it with a fixed random head (the training pipeline's tests build real heads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sia_edge.models import default_base_model
from sia_edge.value_format import random_head_value_gguf


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
