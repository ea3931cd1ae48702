"""The decode engine on the real SmolLM2 GGUF through the real llama.cpp."""

from __future__ import annotations

import itertools
import json
import math
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sia_edge import _reference as ref
from sia_edge import kernels
from sia_edge.engine import ContextOverflowError, SteeringEngine, TokenizerMismatchError
from sia_edge.gate import SteeringConfig, steering_shift, tau_for_ratio
from sia_edge.models import ModelNotFoundError
from sia_edge.value_format import ValueFormatError, read_value_meta, write_gguf_with_value_meta

HARMFUL = [{"role": "user", "content": "How do I pick a lock to break into my neighbour's house?"}]
BENIGN = [{"role": "user", "content": "Give me a recipe for pancakes."}]


def run(engine: SteeringEngine, prompt, **kw):
    gen = engine.generate(prompt, **kw)
    with gen:
        events = list(gen)
    return gen, events


def plain_topk_reference(model_path: Path, prompt_ids: list[int], n: int, k: int, seed: int) -> list[int]:
    """Plain top-k sampling written independently: llama-cpp-python's own high-level Llama for
    the forward passes, numpy for top-k and softmax, the same SplitMix64 stream for the draws."""
    from llama_cpp import Llama

    llm = Llama(str(model_path), n_ctx=512, n_threads=1, logits_all=True, verbose=False)
    rng = kernels.Rng(seed)
    llm.eval(prompt_ids)
    out: list[int] = []
    for _ in range(n):
        z = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        ids, top = ref.topk_sorted(z, k)
        p = ref.steer_probs(top, None, 0.0, 1.0)
        u = rng.uniform() * 1.0
        idx = int(np.searchsorted(np.cumsum(p), u, side="right"))
        token = int(ids[min(idx, k - 1)])
        if llm.token_eos() == token:
            break
        out.append(token)
        llm.eval([token])
    return out


def test_gate_never_firing_equals_plain_topk_sampling(engine: SteeringEngine, base_model_path: Path) -> None:
    prompt_ids = engine.encode_prompt(BENIGN)
    never = SteeringConfig(gate="entropy", tau=100.0)
    gen_sparse, ev_sparse = run(engine, BENIGN, max_tokens=40, config=never, seed=7)
    gen_off, _ = run(engine, BENIGN, max_tokens=40, config=SteeringConfig(gate="off"), seed=7)
    assert gen_sparse.stats.junctions == 0
    assert not any(e.junction for e in ev_sparse)
    assert gen_sparse.tokens == gen_off.tokens
    assert gen_sparse.tokens == plain_topk_reference(base_model_path, prompt_ids, 40, 10, seed=7)


def test_cached_values_equal_fresh_recomputation(engine: SteeringEngine) -> None:
    """Dense steering over a long generation: the values the cached branches gave equal V of each
    candidate's full sequence recomputed from scratch in one batch, at several points.

    Tolerance: llama.cpp's quantised matmuls round differently for a 1-token batch than for a
    multi-token one (decoding the same 30 tokens one at a time instead of in one batch moved V by
    up to 0.063 with a V standard deviation of 1.56, measured on this fixture), and the cache mixes
    both shapes. So the bound is relative to the spread of V: max 12%, mean 3% of its std.
    """
    assert engine.value is not None
    gen, events = run(engine, BENIGN, max_tokens=120, config=SteeringConfig(gate="dense"), seed=3)
    assert len(events) >= 60 and all(e.junction for e in events)
    prompt = engine.encode_prompt(BENIGN)
    errors = []
    for step in (0, 1, 17, 59, len(events) - 1):
        prefix = prompt + gen.tokens[:step]
        ev = events[step]
        for cand, v_cached in zip(ev.candidates[:4], ev.values[:4], strict=True):
            v_fresh = engine.value.values_at_positions([*prefix, cand])[-1]
            errors.append(abs(float(v_fresh) - v_cached))
    scale = float(np.std([v for e in events for v in e.values]))
    assert scale > 0.5
    assert errors[0] == pytest.approx(0.0, abs=1e-5)  # the first junction sees one prompt batch in both
    assert max(errors) <= 0.12 * scale, (max(errors), scale)
    assert float(np.mean(errors)) <= 0.03 * scale, (np.mean(errors), scale)


def test_value_scale_is_meaningful(engine: SteeringEngine) -> None:
    _, events = run(engine, HARMFUL, max_tokens=8, config=SteeringConfig(gate="dense"), seed=1)
    spread = max(max(e.values) - min(e.values) for e in events)
    assert spread > 0.05  # the fixture head tells candidates apart: the tolerance above is tight


def test_same_seed_same_output_and_seed_matters(engine: SteeringEngine) -> None:
    cfg = SteeringConfig(tau=0.8)
    a, _ = run(engine, HARMFUL, max_tokens=30, config=cfg, seed=11)
    b, _ = run(engine, HARMFUL, max_tokens=30, config=cfg, seed=11)
    c, _ = run(engine, HARMFUL, max_tokens=30, config=cfg, seed=12)
    assert a.tokens == b.tokens and a.stats.junctions == b.stats.junctions
    assert a.stats.junctions > 0
    assert a.tokens != c.tokens


def test_threads_match_sequential_runs(engine: SteeringEngine) -> None:
    jobs = [(HARMFUL, 21), (BENIGN, 22), (HARMFUL, 23)]
    cfg = SteeringConfig(tau=0.9)
    sequential = []
    for p, s in jobs:
        gen, _ = run(engine, p, max_tokens=24, config=cfg, seed=s)
        sequential.append((gen.tokens, gen.text))
    results: dict[int, list[int]] = {}
    texts: dict[int, str] = {}

    def worker(i: int) -> None:
        p, s = jobs[i]
        gen, _ = run(engine, p, max_tokens=24, config=cfg, seed=s)
        results[i], texts[i] = gen.tokens, gen.text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(jobs))] == [tokens for tokens, _ in sequential]
    assert [texts[i] for i in range(len(jobs))] == [text for _, text in sequential]


def test_detokenizing_from_many_threads_gives_each_its_own_bytes(engine: SteeringEngine) -> None:
    # llama.cpp's token_to_piece runs without the GIL: a buffer shared between threads would
    # hand one thread another's bytes (seen as "*Orange" served as "* range" by the server).
    model = engine.base
    ids = list(range(200, 2200))
    expected = [model.piece(t) for t in ids]
    got: dict[int, list[list[bytes]]] = {}

    def worker(i: int) -> None:
        got[i] = [[model.piece(t) for t in ids] for _ in range(3)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(rounds == expected for i in range(4) for rounds in got[i])


def test_steering_changes_the_distribution(engine: SteeringEngine) -> None:
    """With a large w the sampled candidate at a junction is the value model's favourite."""
    cfg = SteeringConfig(gate="dense", w=1000.0)
    _, events = run(engine, HARMFUL, max_tokens=12, config=cfg, seed=5)
    for e in events:
        assert e.token_id == e.candidates[int(np.argmax(e.values))]


def test_stats_are_consistent(engine: SteeringEngine) -> None:
    gen, events = run(engine, HARMFUL, max_tokens=32, config=SteeringConfig(), seed=2)
    st = gen.stats
    assert st.tokens == len(events) == len(gen.tokens)
    assert st.junctions == sum(e.junction for e in events)
    assert st.intervention_rate == pytest.approx(st.junctions / st.tokens)
    assert st.value_tokens >= st.junctions * 10  # k branches per junction, plus catch-up
    assert st.stop_reason in ("eos", "length")
    assert gen.text == "".join(e.text for e in events) or st.stop_reason == "length"
    assert all(e.entropy <= math.log(10) + 1e-9 for e in events)
    assert st.total_ms >= st.base_decode_ms


def test_cancel_mid_stream(engine: SteeringEngine) -> None:
    gen = engine.generate(BENIGN, max_tokens=200, config=SteeringConfig(gate="off"), seed=0)
    with gen:
        for i, _ in enumerate(gen):
            if i == 4:
                gen.cancel()
    assert gen.stats.stop_reason == "cancelled"
    assert gen.stats.tokens == 5


def test_abandoned_iteration_returns_contexts(engine: SteeringEngine) -> None:
    gen = engine.generate(BENIGN, max_tokens=50, config=SteeringConfig(), seed=0)
    it = iter(gen)
    next(it)
    gen.close()
    again, _ = run(engine, BENIGN, max_tokens=10, config=SteeringConfig(), seed=0)
    assert again.stats.tokens > 0


def test_context_limit_stops_cleanly(base_model_path: Path, value_model_path: Path) -> None:
    small = SteeringEngine(base_model_path, value_model_path, n_ctx=64, n_threads=1)
    gen, _ = run(small, "Once upon a time", max_tokens=500, config=SteeringConfig(gate="dense"), seed=0)
    assert gen.stats.stop_reason in ("context", "eos")
    if gen.stats.stop_reason == "context":
        assert gen.stats.prompt_tokens + gen.stats.tokens == 64
    with pytest.raises(ContextOverflowError, match=r"prompt has .* tokens but the context holds 64"):
        small.generate("word " * 200)


def test_multi_turn_reuses_the_cache(engine: SteeringEngine) -> None:
    gen, _ = run(engine, BENIGN, max_tokens=10, config=SteeringConfig(gate="off"), seed=0)
    turn2 = [*BENIGN, {"role": "assistant", "content": gen.text}, {"role": "user", "content": "And waffles?"}]
    again, _ = run(engine, turn2, max_tokens=10, config=SteeringConfig(gate="off"), seed=0)
    fresh_engine_result = run(engine, turn2, max_tokens=10, config=SteeringConfig(gate="off"), seed=0)[0]
    assert again.tokens == fresh_engine_result.tokens


# ------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gate": "nope"}, "unknown mode .nope.; choose one of sparse"),
        ({"k": 0}, "k must be a positive integer"),
        ({"tau": math.inf}, "tau must be a finite number"),
        ({"tau": math.nan}, "tau must be a finite number"),
        ({"head": -1}, "head must be a whole number"),
        ({"head": 1.5}, "head must be a whole number"),
        ({"horizon": -1}, r"horizon must be a whole number of tokens \(0: none\), got -1"),
        ({"horizon": 2.0}, "horizon must be a whole number of tokens"),
        ({"horizon": True}, "horizon must be a whole number of tokens"),
        ({"head": 5, "horizon": 4}, "head 5 steers past horizon 4, which ends all steering; lower head or raise horizon"),
        ({"follow": 0.0}, r"follow must be a share of probability mass in \(0, 1\]"),
        ({"follow": 1.5}, "follow must be a share"),
        ({"follow": math.nan}, "follow must be a share"),
        ({"follow": True}, "follow must be a share"),
        ({"w": math.nan}, "w must be a finite number"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"target_ratio": 1.5}, "target_ratio must be in"),
        ({"gate": "dense", "target_ratio": 0.2}, "gates with a tau only"),
    ],
)
def test_bad_steering_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SteeringConfig(**kwargs)


def test_k_larger_than_engine_allows(engine: SteeringEngine) -> None:
    with pytest.raises(ValueError, match="exceeds the engine's k_max"):
        engine.generate(BENIGN, config=SteeringConfig(k=100_000))


def test_empty_prompt(engine: SteeringEngine) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.generate("   ")
    with pytest.raises(ValueError, match="messages is empty"):
        engine.generate([])


def test_missing_and_non_gguf_files(tmp_path: Path, base_model_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        SteeringEngine(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        SteeringEngine(junk)
    with pytest.raises(ModelNotFoundError, match="is a directory"):
        SteeringEngine(base_model_path, tmp_path)


def test_value_gguf_without_metadata(base_model_path: Path) -> None:
    with pytest.raises(ValueFormatError, match="no sia-edge value head"):
        SteeringEngine(base_model_path, base_model_path)


@pytest.mark.parametrize("threads", [0, -1, 513, 100_000])
def test_thread_counts_llama_cpp_cannot_run_are_refused(base_model_path: Path, threads: int) -> None:
    # 100,000 threads segfaulted llama.cpp and 5,000 hung it: refused before any model loads
    with pytest.raises(ValueError, match=f"threads must be a whole number from 1 to 512, got {threads}"):
        SteeringEngine(base_model_path, n_threads=threads)


def test_seeds_outside_the_generators_range_are_refused(engine: SteeringEngine) -> None:
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match="seed must be a whole number from 0 to 2\\*\\*64 - 1"):
            engine.generate(BENIGN, max_tokens=2, seed=seed)
    with engine.generate(BENIGN, max_tokens=2, seed=2**64 - 1) as gen:  # the largest one works
        assert len(list(gen)) == 2


def test_tokenizer_mismatch_is_refused(tmp_path: Path, base_model_path: Path, value_model_path: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(value_model_path))
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    tokens[1000] = tokens[1000] + "_x"  # one token text differs: ids no longer mean the same
    other = tmp_path / "other-tokenizer.gguf"
    write_gguf_with_value_meta(value_model_path, other, read_value_meta(value_model_path),
                               overrides={"tokenizer.ggml.tokens": tokens})
    with pytest.raises(TokenizerMismatchError, match=r"tokenizers differ: base model .* value model other-tokenizer"):
        SteeringEngine(base_model_path, other)


def test_steering_without_value_model(base_model_path: Path) -> None:
    plain = SteeringEngine(base_model_path, None, n_ctx=256)
    with pytest.raises(ValueError, match="needs a value model"):
        plain.generate(BENIGN, config=SteeringConfig())
    text, stats = plain.complete(BENIGN, max_tokens=5, config=SteeringConfig(gate="off"))
    assert stats.tokens >= 1 and text


def test_random_gate_and_target_ratio(engine: SteeringEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIA_EDGE_MODELS", str(tmp_path))
    gen, _ = run(engine, BENIGN, max_tokens=60, config=SteeringConfig(gate="random", p=0.5), seed=4)
    assert 0.2 < gen.stats.intervention_rate < 0.8
    stats = engine.gate_statistics(max_tokens=48)
    cfg = SteeringConfig(target_ratio=0.25)
    tau = engine.calibrate_tau(cfg)
    frac = float(np.mean(np.asarray(stats) >= tau))
    assert 0.2 <= frac <= 0.3
    assert (tmp_path / "tau-calibration.json").exists()


def test_dense_intervention_rate_is_one_when_the_answer_ends_in_eos(engine: SteeringEngine) -> None:
    # The EOS step is sampled (and steered) but adds no token: it counts as a decision, so the
    # rate of dense steering is 1, not (tokens + 1) / tokens.
    prompt = [{"role": "user", "content": "Reply with one word: yes or no?"}]
    runs = (run(engine, prompt, max_tokens=30, config=SteeringConfig(gate="dense"), seed=s)[0] for s in range(8))
    gen = next((g for g in runs if g.stats.stop_reason == "eos"), None)
    assert gen is not None, "no answer of eight ended in EOS within 30 tokens"
    assert gen.stats.junctions == gen.stats.tokens + 1 == gen.stats.steps
    assert gen.stats.intervention_rate == 1.0


def test_head_steers_exactly_the_first_tokens(engine: SteeringEngine) -> None:
    never = SteeringConfig(tau=3.0)  # above ln 10: the entropy gate alone never fires
    gen, events = run(engine, HARMFUL, max_tokens=12, config=replace(never, head=4), seed=5)
    assert [ev.junction for ev in events] == [True] * 4 + [False] * (len(events) - 4)
    assert all(len(ev.values) == never.k for ev in events[:4])
    plain, _ = run(engine, HARMFUL, max_tokens=12, config=never, seed=5)
    assert plain.stats.junctions == 0 and gen.stats.junctions == 4
    off, _ = run(engine, HARMFUL, max_tokens=12, config=SteeringConfig(gate="off", head=4), seed=5)
    assert off.stats.junctions == 0  # 'off' stays off
    # with the entropy gate on too: the head's steps, then the entropy gate's own rule
    _, ev_e = run(engine, HARMFUL, max_tokens=12, config=SteeringConfig(tau=1.2, head=2), seed=5)
    assert ev_e[0].junction and ev_e[1].junction
    assert [ev.junction for ev in ev_e[2:]] == [ev.entropy >= 1.2 for ev in ev_e[2:]]


def test_steering_shift_is_the_probability_mass_steering_moved() -> None:
    z = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
    v = np.array([0.0, -1.0, 1.0, 0.5], dtype=np.float32)
    for w, temperature in ((0.5, 1.0), (3.0, 1.0), (3.0, 0.7), (3.0, 2.0)):
        moved = ref.steer_probs(z, v, w, temperature) - ref.steer_probs(z, None, w, temperature)
        assert steering_shift(z, v, w, temperature) == pytest.approx(0.5 * np.abs(moved).sum(), rel=1e-12)
    assert steering_shift(z, v, 0.0, 1.0) == 0.0
    p_third = ref.steer_probs(z, None, 0.0, 1.0)[2]
    assert steering_shift(z, v, 60.0, 1.0) == pytest.approx(1.0 - p_third, abs=1e-9)  # all mass to the third
    assert steering_shift(z, v, 0.5, 0.0) == 0.0  # greedy: 2 - 0 vs 1 + 0.5 (the argmax stays)
    assert steering_shift(z, v, 3.0, 0.0) == 1.0  # greedy: the third candidate (0 + 3) now wins
    # broken values are one clear error (the shift gate decides on this before anything samples)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="value model's output is broken"):
            steering_shift(z, np.array([0.0, bad, 1.0, 0.5], dtype=np.float32), 3.0, 1.0)


@pytest.mark.parametrize("temperature", [1e-30, 1e-300, 5e-324])
def test_steering_shift_at_a_vanishing_temperature_is_the_greedy_limit(temperature: float) -> None:
    """A temperature the server accepts (> 0, finite) but so small that (z - max) / T leaves the
    float range: the answer is greedy's, with no overflow warning (pyproject makes warnings errors;
    the server answered such a request with a 500 before)."""
    z = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
    v = np.array([0.0, -1.0, 1.0, 0.5], dtype=np.float32)
    assert steering_shift(z, v, 3.0, temperature) == steering_shift(z, v, 3.0, 0.0) == 1.0
    assert steering_shift(z, v, 0.5, temperature) == steering_shift(z, v, 0.5, 0.0) == 0.0


def test_follow_steers_the_token_after_an_overruled_step(engine: SteeringEngine) -> None:
    tau, follow = 1.2, 0.3
    _, ev = run(engine, HARMFUL, max_tokens=24, config=SteeringConfig(tau=tau, follow=follow), seed=5)
    rule = [ev[0].entropy >= tau] + [e.entropy >= tau or (before.junction and before.shift >= follow)
                                     for before, e in itertools.pairwise(ev)]
    assert [e.junction for e in ev] == rule
    assert any(e.junction and e.entropy < tau for e in ev), "follow never fired: pick another seed"
    assert all(0.0 < e.shift < 1.0 if e.junction else e.shift == 0.0 for e in ev)
    _, ev_plain = run(engine, HARMFUL, max_tokens=24, config=SteeringConfig(tau=tau), seed=5)
    first_follow = next(i for i, e in enumerate(ev) if e.junction and e.entropy < tau)
    assert [e.token_id for e in ev_plain[: first_follow + 1]] == [e.token_id for e in ev[: first_follow + 1]]
    # At T > 0 steering never moves all of the mass, so follow 1 changes nothing ...
    _, ev_one = run(engine, HARMFUL, max_tokens=24, config=SteeringConfig(tau=tau, follow=1.0), seed=5)
    assert [e.token_id for e in ev_one] == [e.token_id for e in ev_plain]
    # ... and a tiny follow keeps steering from the first junction on (here the head's step).
    never = SteeringConfig(tau=3.0)  # above ln 10: the entropy gate alone never fires
    _, ev_chain = run(engine, HARMFUL, max_tokens=12, config=replace(never, head=1, follow=1e-9), seed=5)
    assert all(e.junction for e in ev_chain)


def test_horizon_ends_every_kind_of_steering_after_the_first_tokens(engine: SteeringEngine) -> None:
    # dense inside a 5-token horizon steers exactly those 5 steps and then never again
    gen, events = run(engine, HARMFUL, max_tokens=12, config=SteeringConfig(gate="dense", horizon=5), seed=5)
    assert len(events) > 5 and [ev.junction for ev in events] == [True] * 5 + [False] * (len(events) - 5)
    assert gen.stats.junctions == 5
    # the entropy gate keeps its own rule inside the horizon: the same junctions as without one
    tau = 1.2
    _, ev_h = run(engine, HARMFUL, max_tokens=16, config=SteeringConfig(tau=tau, horizon=6), seed=5)
    _, ev_all = run(engine, HARMFUL, max_tokens=16, config=SteeringConfig(tau=tau), seed=5)
    assert [e.junction for e in ev_h[:6]] == [e.entropy >= tau for e in ev_h[:6]]
    assert [e.token_id for e in ev_h[:6]] == [e.token_id for e in ev_all[:6]]  # identical up to the horizon
    assert any(e.entropy >= tau for e in ev_h[6:]), "no high-entropy step after the horizon: pick another seed"
    assert not any(e.junction for e in ev_h[6:])
    # the value model is not used after the horizon: a longer answer costs it nothing more
    short, _ = run(engine, HARMFUL, max_tokens=6, config=SteeringConfig(gate="dense", horizon=3), seed=5)
    long, _ = run(engine, HARMFUL, max_tokens=16, config=SteeringConfig(gate="dense", horizon=3), seed=5)
    assert long.stats.tokens == 16 and short.stats.value_tokens == long.stats.value_tokens > 0
    # follow stops at the horizon too, and 'off' stays off
    never = SteeringConfig(tau=3.0)
    _, ev_f = run(engine, HARMFUL, max_tokens=12, config=replace(never, head=1, follow=1e-9, horizon=4), seed=5)
    assert [e.junction for e in ev_f] == [True] * 4 + [False] * (len(ev_f) - 4)
    off, _ = run(engine, HARMFUL, max_tokens=12, config=SteeringConfig(gate="off", horizon=4), seed=5)
    assert off.stats.junctions == 0


def test_a_horizon_keeps_the_tau_of_whole_answers(engine: SteeringEngine, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A horizon only ends steering: a target ratio gives the tau it gives whole answers (one
    # calibration, one cache entry), so the CLI, when its value model recommends a ratio, and the
    # server, which resolves it at start, steer the same junctions within the same horizon.
    monkeypatch.setenv("SIA_EDGE_MODELS", str(tmp_path))
    within, plain = SteeringConfig(target_ratio=0.3, horizon=6), SteeringConfig(target_ratio=0.3)
    assert engine._tau_keys(within) == engine._tau_keys(plain)
    tau = engine.calibrate_tau(within)
    assert tau == engine.calibrate_tau(plain)
    gen = engine.generate(HARMFUL, max_tokens=16, config=within, seed=5)
    with gen:
        events = list(gen)
    assert gen.config.tau == tau and gen.config.horizon == 6
    assert [e.junction for e in events] == [i < 6 and e.entropy >= tau for i, e in enumerate(events)]
    assert SteeringConfig(horizon=0).horizon is None  # 0 is no horizon, as head 0 is no head


def test_target_ratio_counts_the_head(engine: SteeringEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIA_EDGE_MODELS", str(tmp_path))
    prompts = [HARMFUL, BENIGN]
    stats = engine.gate_statistics(prompts, config=SteeringConfig(head=3), max_tokens=20)
    assert stats[:3] == [math.inf] * 3 and math.isinf(stats[20]) and all(math.isfinite(x) for x in stats[3:20])
    tau = tau_for_ratio(stats, 0.25)
    assert 0.25 <= float(np.mean(np.asarray(stats) >= tau)) <= 0.3
    with pytest.raises(ValueError, match=r"head steers 15% of the calibration tokens by itself.*lower head"):
        tau_for_ratio(stats, 0.1)  # the head alone is 15% of these steps: no tau gives 10%
    head_tau = engine.calibrate_tau(SteeringConfig(target_ratio=0.3, head=3))
    plain_tau = engine.calibrate_tau(SteeringConfig(target_ratio=0.3))
    assert head_tau > plain_tau  # the forced head steps leave fewer junctions to the entropy gate


def test_a_head_beyond_the_target_ratio_is_refused_and_not_cached(
    engine: SteeringEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # head 600 makes every calibration step a junction: it used to cache tau = Infinity (not JSON)
    # and then fail with "tau must be a finite number", a setting the user never gave.
    monkeypatch.setenv("SIA_EDGE_MODELS", str(tmp_path))
    monkeypatch.setattr(engine, "CALIBRATION_PROMPTS", ("Name a colour.",))
    with pytest.raises(ValueError, match=r"head steers 100% .*target_ratio 0\.25 allows; lower head"):
        engine.generate(HARMFUL, max_tokens=4, config=SteeringConfig(target_ratio=0.25, head=600))
    assert not (tmp_path / "tau-calibration.json").exists()
    assert all(key[-1] != 600 for key in engine._tau_cache)


def test_tau_cache_survives_corruption_and_concurrent_calibration(
    engine: SteeringEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIA_EDGE_MODELS", str(tmp_path))
    cache = tmp_path / "tau-calibration.json"
    cache.write_text('{"half a file": 1.')  # as an interrupted writer of an older version left it
    calls = []
    real = engine.gate_statistics

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, max_tokens=16)

    monkeypatch.setattr(engine, "gate_statistics", counted)
    monkeypatch.setattr(engine, "_statistics_cache", {})  # runs an earlier test's calibration left in memory
    cfg = SteeringConfig(target_ratio=0.37)
    taus: list[float] = []
    threads = [threading.Thread(target=lambda: taus.append(engine.calibrate_tau(cfg))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(taus)) == 1 and len(taus) == 3  # one calibration, shared
    stored = json.loads(cache.read_text())
    assert list(stored.values()) == [taus[0]]
    assert not [p for p in tmp_path.iterdir() if p.name != cache.name]  # no temporary file left


def test_best_of_n(engine: SteeringEngine) -> None:
    best, all_ = engine.best_of_n(BENIGN, 3, max_tokens=12, config=SteeringConfig(), seed=0,
                                  reward=lambda _p, r: float(len(r)))
    assert len(all_) == 3 and best == max(all_, key=lambda r: r[1])[0]
    best_v, all_v = engine.best_of_n(BENIGN, 2, max_tokens=8, seed=0)
    assert all(np.isfinite(s) for _, s, _ in all_v) and best_v in [t for t, _, _ in all_v]


def test_token_id_prompts_and_top_candidates(engine: SteeringEngine) -> None:
    from sia_edge.engine import TokenIds

    ids = engine.encode_prompt(BENIGN)
    by_ids, _ = run(engine, TokenIds(ids), max_tokens=6, config=SteeringConfig(gate="off"), seed=9)
    by_msgs, _ = run(engine, BENIGN, max_tokens=6, config=SteeringConfig(gate="off"), seed=9)
    assert by_ids.tokens == by_msgs.tokens
    greedy, _ = run(engine, TokenIds(ids), max_tokens=1, config=SteeringConfig(gate="off", temperature=0.0))
    top = engine.top_candidates(TokenIds(ids), k=5)
    assert len(top) == 5 and top[0] == greedy.tokens[0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate(TokenIds([1, 10**9]))


@pytest.mark.parametrize(("temperature", "top_p", "min_p"), [(1.0, 1.0, 0.0), (0.7, 0.8, 0.05), (0.0, 1.0, 0.0)])
def test_logprobs_are_the_distribution_each_token_was_sampled_from(
        engine: SteeringEngine, temperature: float, top_p: float, min_p: float) -> None:
    cfg = SteeringConfig(tau=1.0, w=2.0, temperature=temperature, top_p=top_p, min_p=min_p)
    _, plain = run(engine, HARMFUL, max_tokens=16, config=cfg, seed=11)
    _, events = run(engine, HARMFUL, max_tokens=16, config=cfg, seed=11, logprobs=True)
    assert [e.token_id for e in events] == [e.token_id for e in plain]  # reporting changes nothing
    assert any(e.junction for e in events) and not all(e.junction for e in events)
    for e in events:
        lp = e.logprobs
        assert lp is not None and lp.candidates[lp.chosen] == e.token_id
        sampled = np.exp(np.array(lp.sampled))
        assert sampled.sum() == pytest.approx(1.0, abs=1e-9) and sampled[lp.chosen] > 0
        base = np.array(lp.base)
        assert np.all(base <= 0) and np.exp(base).sum() <= 1 + 1e-9  # the full vocabulary's softmax
        # base logprobs are the logits shifted by one constant: the sampling rule recomputed from them
        logits = base.astype(np.float32)
        values = np.array(e.values, dtype=np.float32) if e.junction else None
        want = ref.steer_probs(logits, values, cfg.w, temperature, top_p=top_p, min_p=min_p)
        np.testing.assert_allclose(sampled, want, rtol=1e-4, atol=1e-7)
    _, silent = run(engine, HARMFUL, max_tokens=4, config=cfg, seed=11)
    assert all(e.logprobs is None for e in silent)


def test_a_grammar_masks_every_step_and_a_junction_never_picks_a_forbidden_token(engine: SteeringEngine) -> None:
    from sia_edge.grammar import Grammar

    g = Grammar('root ::= ("yes" | "no" | "maybe") "."')
    for gate in ("off", "dense"):
        for seed in range(3):
            _, events = run(engine, HARMFUL, max_tokens=12, config=SteeringConfig(gate=gate, w=3.0), seed=seed,
                            logprobs=True, grammar=g)
            text = "".join(e.text for e in events)
            assert text in ("yes.", "no.", "maybe."), (gate, text)
            for e in events:
                assert e.logprobs is not None
                # whatever the value model says, a forbidden candidate had no probability
                allowed = [i for i, lp in enumerate(e.logprobs.base) if math.isfinite(lp)]
                assert e.logprobs.chosen in allowed
                assert all(math.isinf(e.logprobs.sampled[i]) for i in range(len(e.logprobs.base)) if i not in allowed)
                assert e.junction == (gate == "dense")
    with pytest.raises(ValueError, match="could not parse the grammar"):
        engine.generate(HARMFUL, grammar=Grammar("root ::= ("))
    # without a grammar the same seed answers freely: the grammar is what constrained it
    _, free = run(engine, HARMFUL, max_tokens=12, config=SteeringConfig(gate="off"), seed=0)
    assert "".join(e.text for e in free) not in ("yes.", "no.", "maybe.")
