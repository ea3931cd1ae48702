"""SIALogitsProcessor inside llama-cpp-python's own create_completion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from llama_cpp import Llama, LogitsProcessorList

from sia_edge.processor import SIALogitsProcessor
from sia_edge.value_scorer import ValueModel

PROMPT = "Q: What is the capital of France?\nA:"


@pytest.fixture(scope="module")
def llm(base_model_path: Path) -> Llama:
    return Llama(str(base_model_path), n_ctx=256, n_threads=1, seed=0, verbose=False)


def complete(llm: Llama, proc: SIALogitsProcessor | None, kwargs: dict, seed: int = 3) -> str:
    llm.reset()
    out = llm.create_completion(PROMPT, max_tokens=12, seed=seed,
                                logits_processor=LogitsProcessorList([proc]) if proc else None, **kwargs)
    return str(out["choices"][0]["text"])


def test_never_firing_processor_changes_nothing(llm: Llama, value_model_path: Path) -> None:
    proc = SIALogitsProcessor(llm, value_model_path, tau=100.0)
    kwargs = proc.sampling_kwargs()
    assert complete(llm, proc, kwargs) == complete(llm, None, kwargs)
    assert proc.steps > 0
    assert proc.junctions == 0


def test_dense_processor_steers_every_step(llm: Llama, value_model_path: Path) -> None:
    value = ValueModel(value_model_path)
    proc = SIALogitsProcessor(llm, value, gate="dense", w=1000.0)
    steered = complete(llm, proc, proc.sampling_kwargs())
    assert proc.junctions == proc.steps > 0
    # With w = 1000 sampling is the value model's argmax over the top-k at every step: the same
    # text whatever the seed.
    proc2 = SIALogitsProcessor(llm, value, gate="dense", w=1000.0)
    assert complete(llm, proc2, proc2.sampling_kwargs(), seed=99) == steered


def test_processor_writes_only_candidates(llm: Llama, value_model_path: Path) -> None:
    proc = SIALogitsProcessor(llm, value_model_path, gate="dense", w=0.5)
    scores = np.random.default_rng(0).standard_normal(llm.n_vocab()).astype(np.float32)
    before = scores.copy()
    ids = np.array(llm.tokenize(PROMPT.encode()), dtype=np.intc)
    out = proc(ids, scores)
    top = proc.topk.ids
    assert np.isneginf(np.delete(out, top)).all()
    values = proc.value.values_at_positions([*ids.tolist(), int(top[0])])[-1]
    assert out[top[0]] == pytest.approx(before[top[0]] + 0.5 * values, abs=0.1)
