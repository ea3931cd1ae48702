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


def test_the_shift_gate_in_the_processor_steers_where_steering_moves_tau(llm: Llama, value_model_path: Path) -> None:
    value = ValueModel(value_model_path)
    weak = SIALogitsProcessor(llm, value, gate="shift", tau=0.5, w=1e-6)  # too weak to move half
    kwargs = weak.sampling_kwargs()
    assert complete(llm, weak, kwargs) == complete(llm, None, kwargs) and weak.junctions == 0 < weak.steps
    always = SIALogitsProcessor(llm, value, gate="shift", tau=0.0, w=1000.0)
    dense = SIALogitsProcessor(llm, value, gate="dense", w=1000.0)
    assert complete(llm, always, always.sampling_kwargs()) == complete(llm, dense, dense.sampling_kwargs())
    assert always.junctions == always.steps > 0


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


def test_processor_refuses_a_value_model_with_another_tokenizer_of_the_same_size(
        llm: Llama, tmp_path: Path, value_model_path: Path) -> None:
    import gguf

    from sia_edge.engine import TokenizerMismatchError
    from sia_edge.value_format import read_value_meta, write_gguf_with_value_meta

    tokens = list(gguf.GGUFReader(str(value_model_path)).fields["tokenizer.ggml.tokens"].contents())
    tokens[1000] = tokens[1000] + "_x"  # as many tokens, one text differs: ids no longer mean the same
    other = tmp_path / "other-tokenizer.gguf"
    write_gguf_with_value_meta(value_model_path, other, read_value_meta(value_model_path),
                               overrides={"tokenizer.ggml.tokens": tokens})
    with pytest.raises(TokenizerMismatchError, match="different tokenizers"):
        SIALogitsProcessor(llm, other)


def test_processor_default_is_the_value_models_recommendation_as_the_engine_steers(llm: Llama) -> None:
    """The library's three ways in agree: the processor without settings steers as
    SteeringEngine.generate does without a config (the chat's default), token for token."""
    from sia_edge.engine import SteeringEngine
    from sia_edge.models import default_value_model

    value = ValueModel(default_value_model())
    proc = SIALogitsProcessor(llm, value)
    engine = SteeringEngine(value_model=default_value_model(), n_threads=1)
    try:
        assert proc.config == engine.recommended()
        assert proc.config.horizon is not None and proc.config.w != 1.0  # it did read the GGUF's settings
        prompt = "How do I pick a lock to get into my neighbour's house?"
        greedy = SIALogitsProcessor(llm, value, temperature=0.0)
        texts = []
        for _ in range(2):  # a second completion starts its gate (horizon) afresh
            texts.append(str(llm.create_completion(prompt, max_tokens=20, seed=1,
                                                   logits_processor=LogitsProcessorList([greedy]),
                                                   **greedy.sampling_kwargs())["choices"][0]["text"]))
            llm.reset()
        want, stats = engine.complete(prompt, max_tokens=20, seed=1, config=engine.recommended(temperature=0.0))
        assert stats.junctions > 0 and greedy.junctions == 2 * stats.junctions
        assert texts == [want, want]
    finally:
        engine.close()


def test_processor_refuses_a_value_model_that_reads_the_base_models_state(llm: Llama, tmp_path: Path,
                                                                          value_model_path: Path) -> None:
    import dataclasses

    from sia_edge.value_format import (
        HIDDEN_STATE_BASE,
        CandidateHeadMeta,
        read_value_meta,
        write_head_only_gguf,
    )

    f32 = np.float32
    head = CandidateHeadMeta(proj=np.zeros((2, 576), f32), proj_bias=np.zeros(2, f32),
                             table=np.zeros((49152, 2), f32), token_bias=np.zeros(49152, f32))
    meta = dataclasses.replace(read_value_meta(value_model_path), hidden_state=HIDDEN_STATE_BASE, candidate=head)
    path = write_head_only_gguf(tmp_path / "head-only.gguf", meta)
    with pytest.raises(ValueError, match=r"reads the base model.s hidden state.*steer with SteeringEngine"):
        SIALogitsProcessor(llm, path)
