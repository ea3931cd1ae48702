"""A value model's llama.cpp context ends its graph at the hidden state (``hidden_only``).

Real models, two families (SmolLM2's llama graph and Gemma 3's): the hidden states and the KV
cache come out exactly as the whole graph's, the vocabulary head is really skipped (the context
counts the decodes it ended early), a context that skips it refuses to hand out logits, and an
architecture where the shortcut would not be exact is caught by the check at load and runs the
whole graph. Speed is measured by tools/bench_junction_cost.py, not here.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from sia_edge import llama_backend
from sia_edge.llama_backend import LlamaContext, LlamaError, LlamaModel
from sia_edge.models import gemma3_base_model
from sia_edge.value_scorer import ValueModel

TOKENS = [1, 504, 3180, 282, 260, 1789, 3070, 314, 2213, 29, 1041, 11, 3894, 17, 901]


def _run(model: LlamaModel, *, hidden_only: bool) -> tuple[list[np.ndarray], LlamaContext]:
    """A prefix, then three branches of it in one batch, then one more token on sequence 0 (which
    reads the cells every earlier decode wrote): the hidden states of each decode."""
    ctx = LlamaContext(model, n_ctx=64, n_seq_max=4, n_threads=1, embeddings=True, hidden_only=hidden_only)
    out = []
    ctx.decode(TOKENS[:10], 0)
    out.append(ctx.hidden_states(10).copy())
    for s in (1, 2, 3):
        ctx.seq_cp(0, s)
    ctx.decode_rows(TOKENS[10:13], [10, 10, 10], [[1], [2], [3]])
    out.append(ctx.hidden_states(3).copy())
    for s in (1, 2, 3):
        ctx.seq_rm(s)
    ctx.decode(TOKENS[10:12], 10)
    out.append(ctx.hidden_states(2).copy())
    return out, ctx


@pytest.fixture(params=["smollm2", "gemma3"], scope="module")
def family_model(request: pytest.FixtureRequest, base_model_path: Path) -> Path:
    return base_model_path if request.param == "smollm2" else gemma3_base_model()


def test_hidden_states_and_cache_are_the_whole_graphs_bit_for_bit(family_model: Path) -> None:
    model = LlamaModel(family_model)
    try:
        whole, ctx_whole = _run(model, hidden_only=False)
        short, ctx_short = _run(model, hidden_only=True)
        assert model.graph_stop_exact is True
        assert ctx_short.hidden_only and not ctx_whole.hidden_only
        assert ctx_short.graph_stop_active and not ctx_whole.graph_stop_active
        # each of the three decodes ended before the vocabulary head (the check ran in its own contexts)
        assert ctx_short.graph_stops == 3 and ctx_whole.graph_stops == 0
        for a, b in zip(whole, short, strict=True):
            assert np.isfinite(a).all() and np.abs(a).sum() > 0
            assert np.array_equal(a, b)
        with pytest.raises(LlamaError, match="hidden states only"):
            ctx_short.logits()
        assert np.isfinite(ctx_whole.logits()).all()  # the whole graph still has them
        ctx_whole.close()
        ctx_short.close()
    finally:
        model.close()


def _renaming_tensor_name(rename: dict[bytes, bytes]) -> tuple[int, object]:
    """A stand-in for ggml_get_name that reports some nodes under another name: an architecture
    whose graph names its nodes differently, seen through the real llama.cpp graph."""
    lib = llama_cpp._ctypes_extensions.load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
    real = lib.ggml_get_name
    real.restype, real.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    kept: dict[bytes, ctypes.Array[ctypes.c_char]] = {}

    @ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
    def name(tensor: int) -> int:
        n = real(tensor)
        n = rename.get(n, n)
        buf = kept.setdefault(n, ctypes.create_string_buffer(n))
        return ctypes.addressof(buf)

    return ctypes.cast(name, ctypes.c_void_p).value or 0, (name, kept)


@pytest.mark.parametrize(("rename", "why"), [
    # the first layer's norm under the hidden state's name: the graph would end 29 layers early
    ({b"attn_norm-0": b"result_norm", b"result_embd_pooled": b"x", b"result_norm": b"x"}, "wrong node"),
    # no node under that name: nothing to end at
    ({b"result_embd_pooled": b"x", b"result_norm": b"x"}, "no node"),
    # a llama.cpp build where ggml_get_name cannot be found: the check never runs
    (None, "no ggml_get_name"),
])
def test_a_graph_where_the_shortcut_is_not_exact_runs_whole(monkeypatch: pytest.MonkeyPatch, base_model_path: Path,
                                                            rename: dict[bytes, bytes] | None, why: str) -> None:
    address, keep = _renaming_tensor_name(rename) if rename is not None else (0, None)
    monkeypatch.setattr(llama_backend, "_ggml_tensor_name", lambda: address)
    model = LlamaModel(base_model_path)
    try:
        short, ctx = _run(model, hidden_only=True)
        assert model.graph_stop_exact is (None if rename is None else False), why
        assert ctx.hidden_only and not ctx.graph_stop_active and ctx.graph_stops == 0  # the graph runs whole
        with pytest.raises(LlamaError, match="hidden states only"):
            ctx.logits()  # the same contract whichever graph runs
        whole, ctx_whole = _run(model, hidden_only=False)
        for a, b in zip(whole, short, strict=True):
            assert np.array_equal(a, b)
        ctx.close()
        ctx_whole.close()
    finally:
        model.close()
    del keep


def test_the_value_models_scorer_ends_its_graph_and_scores_as_the_whole_graph(value_model_path: Path) -> None:
    cands = np.array([260, 282, 314, 504, 1041, 1789, 2213, 3070, 3180, 3894], dtype=np.int32)
    values = {}
    for hidden_only in (True, False):
        vm = ValueModel(value_model_path, n_threads=1)
        vm.hidden_only = hidden_only
        scorer = vm.new_scorer(n_ctx=64, k_max=10)
        try:
            got = [scorer.score(TOKENS[:p], cands).copy() for p in (9, 10, 12)]
            assert scorer.ctx.hidden_only is hidden_only and scorer.ctx.graph_stop_active is hidden_only
            assert (scorer.ctx.graph_stops > 0) is hidden_only
            values[hidden_only] = got
        finally:
            scorer.close()
            vm.close()
    for a, b in zip(values[True], values[False], strict=True):
        assert np.array_equal(a, b) and np.ptp(a) > 0

