"""The decode loop and its gates on a numpy stand-in for llama.cpp (tests/fake_backend.py): the
unit tier. What the loop does with junctions, horizons, heads, seeds and slots does not depend on
real weights, so it is checked here in milliseconds; tests/test_engine.py checks the same engine
on the real SmolLM2 through the real llama.cpp."""

from __future__ import annotations

import gc
import itertools

import pytest
from fake_backend import EOS, FakeBackend, FakeScorer

from sia_edge.engine import SteeringEngine, TokenIds
from sia_edge.steering import SteeringConfig

PROMPT = "the fake base continues this"


@pytest.fixture
def engine() -> SteeringEngine:
    return SteeringEngine("base.gguf", "value.gguf", n_ctx=512, n_threads=1, backend=FakeBackend())


def run(engine: SteeringEngine, config: SteeringConfig, *, seed: int = 0, max_tokens: int = 40,
        prompt: str | TokenIds = PROMPT):
    gen = engine.generate(prompt, max_tokens=max_tokens, config=config, seed=seed)
    with gen:
        events = list(gen)
    return gen, events


def scorer(engine: SteeringEngine) -> FakeScorer:
    assert engine.value is not None
    scorers = engine.value.scorers  # type: ignore[attr-defined]
    assert len(scorers) == 1
    return scorers[0]


def test_off_never_asks_the_value_model_and_is_reproducible(engine: SteeringEngine) -> None:
    gen, events = run(engine, SteeringConfig(gate="off"), seed=5)
    assert events and not any(e.junction for e in events) and gen.stats.value_tokens == 0
    assert scorer(engine).calls == 0
    again, _ = run(engine, SteeringConfig(gate="off"), seed=5)
    other, _ = run(engine, SteeringConfig(gate="off"), seed=6)
    assert again.tokens == gen.tokens and other.tokens != gen.tokens


def test_dense_steers_every_decision(engine: SteeringEngine) -> None:
    gen, events = run(engine, SteeringConfig(gate="dense", w=2.0))
    assert all(e.junction and len(e.candidates) == 10 and len(e.values) == 10 for e in events)
    assert gen.stats.junctions == gen.stats.steps and gen.stats.intervention_rate == 1.0


def test_value_tokens_are_catch_up_plus_branches(engine: SteeringEngine) -> None:
    gen, _ = run(engine, SteeringConfig(gate="dense", k=4))
    # the first junction catches up on the prompt; every junction decodes its 4 branches, and the
    # sampled branch is kept, so under dense steering no answer token is ever decoded again
    assert gen.stats.value_tokens == len(gen.prompt_tokens) + 4 * gen.stats.junctions


@pytest.mark.parametrize("gate", ["dense", "entropy", "random", "shift"])
def test_a_horizon_ends_every_kind_of_steering(engine: SteeringEngine, gate: str) -> None:
    _, events = run(engine, SteeringConfig(gate=gate, tau=0.0, p=1.0, horizon=5, follow=0.01))
    flags = [e.junction for e in events]
    assert flags[:5] == [True] * 5 and not any(flags[5:])
    if gate == "shift":  # past the horizon nothing is scored
        assert all(e.shift == 0.0 for e in events[5:]) and scorer(engine).calls == 5


def test_a_head_steers_exactly_the_first_tokens(engine: SteeringEngine) -> None:
    _, events = run(engine, SteeringConfig(tau=100.0, head=3))  # the entropy gate alone never fires
    assert [e.junction for e in events][:4] == [True, True, True, False] and not any(e.junction for e in events[3:])


def test_follow_steers_the_token_after_an_overruled_step(engine: SteeringEngine) -> None:
    _, events = run(engine, SteeringConfig(tau=100.0, head=1, follow=0.05, w=50.0), max_tokens=30)
    # a strong w overrules the base model at the head's junction, and every overruled step is followed
    assert events[0].junction and events[0].shift >= 0.05
    for prev, ev in itertools.pairwise(events):
        assert ev.junction == (prev.junction and prev.shift >= 0.05)


def test_the_entropy_gate_fires_where_the_statistic_reaches_tau(engine: SteeringEngine) -> None:
    _, events = run(engine, SteeringConfig(tau=1.5), max_tokens=60)
    assert any(e.junction for e in events) and not all(e.junction for e in events)
    assert all(e.junction == (e.entropy >= 1.5) for e in events)


def test_the_shift_gate_steers_where_steering_would_move_tau(engine: SteeringEngine) -> None:
    gen, events = run(engine, SteeringConfig(gate="shift", tau=0.2, w=2.0), max_tokens=60)
    assert any(e.junction for e in events) and not all(e.junction for e in events)
    # every step is scored; its statistic is the shift steering makes, or would have made
    assert scorer(engine).calls == gen.stats.steps
    assert all(e.junction == (e.shift >= 0.2) for e in events)
    assert all(len(e.values) == 10 for e in events if e.junction)
    assert all(0 < e.shift < 0.2 and not e.values and not e.candidates for e in events if not e.junction)
    # its calibration scores the unsteered run of the same seed: the same shifts up to the first junction
    first = next(i for i, e in enumerate(events) if e.junction)
    stats = engine.gate_statistics([PROMPT], config=SteeringConfig(gate="shift", tau=0.2, w=2.0), max_tokens=60)
    assert [e.shift for e in events[: first + 1]] == stats[: first + 1]


def test_the_shift_gate_at_its_extremes_is_off_and_dense(engine: SteeringEngine) -> None:
    """Where it steers nothing it samples exactly as off does (scoring draws nothing from the
    sampler's stream); at 0 it steers exactly as dense does."""
    off, _ = run(engine, SteeringConfig(gate="off"), seed=3)
    never, events = run(engine, SteeringConfig(gate="shift", tau=0.5, w=1e-6), seed=3)  # w too weak to move 0.5
    assert never.tokens == off.tokens and never.stats.junctions == 0 and scorer(engine).calls == never.stats.steps
    assert all(0.0 < e.shift < 0.5 for e in events)
    dense, _ = run(engine, SteeringConfig(gate="dense", w=2.0), seed=3)
    always, _ = run(engine, SteeringConfig(gate="shift", tau=0.0, w=2.0), seed=3)
    assert always.tokens == dense.tokens != off.tokens and always.stats.junctions == always.stats.steps


def test_a_shift_ratio_is_calibrated_on_scored_unsteered_runs(engine: SteeringEngine, tmp_path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIA_EDGE_MODELS", str(tmp_path))
    config = SteeringConfig(gate="shift", target_ratio=0.3, w=2.0)
    tau = engine.calibrate_tau(config)
    assert 0.0 < tau <= 1.0
    stats = engine.gate_statistics(config=config)
    assert abs(sum(s >= tau for s in stats) / len(stats) - 0.3) < 0.05
    # the statistic depends on w (and on the value model): another w is another calibration
    stronger = SteeringConfig(gate="shift", target_ratio=0.3, w=8.0)
    assert engine.cached_tau(stronger) is None and engine.calibrate_tau(stronger) > tau


def test_a_target_ratio_can_be_calibrated_on_the_tasks_own_prompts(engine: SteeringEngine, tmp_path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from sia_edge.engine import Calibration
    from sia_edge.gate import tau_for_ratio

    monkeypatch.setenv("SIA_EDGE_MODELS", str(tmp_path))
    config = SteeringConfig(target_ratio=0.3)
    task = Calibration(("the task begins", "another task prefix", "a third"), max_tokens=12)
    tau = engine.calibrate_tau(config, task)
    assert tau == tau_for_ratio(engine.gate_statistics(list(task.prompts), config=config, max_tokens=12), 0.3)
    # cached under those prompts (and their length): not the built-in prompts' tau, nor other prompts'
    assert engine.cached_tau(config, task) == tau and engine.cached_tau(config) is None
    assert engine.cached_tau(config, Calibration(task.prompts[:2], max_tokens=12)) is None
    assert engine.cached_tau(config, Calibration(task.prompts, max_tokens=13)) is None
    # another ratio on the same prompts reuses their unsteered runs (eval calibrates several at once)
    calls = []
    real = engine.gate_statistics
    monkeypatch.setattr(engine, "gate_statistics", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    other = engine.calibrate_tau(SteeringConfig(target_ratio=0.6), task)
    assert not calls and other <= tau


def test_a_target_ratio_is_calibrated_on_text_prefixes_when_there_is_no_chat_template(
        engine: SteeringEngine, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIA_EDGE_MODELS", str(tmp_path))
    config = SteeringConfig(target_ratio=0.3)
    tau = engine.calibrate_tau(config)
    gens = [run(engine, config.with_tau(tau), seed=s, max_tokens=60, prompt=p)[0]
            for s, p in enumerate(engine.CALIBRATION_PREFIXES)]
    rate = sum(g.stats.junctions for g in gens) / sum(g.stats.steps for g in gens)
    assert 0.1 < rate < 0.5  # steered runs drift from the unsteered ones the ratio was measured on
    assert engine.cached_tau(config) == tau and (tmp_path / "tau-calibration.json").is_file()


def test_stop_reasons(engine: SteeringEngine) -> None:
    gen, _ = run(engine, SteeringConfig(gate="off"), max_tokens=3)
    assert gen.stats.stop_reason == "length" and gen.stats.tokens == 3
    small = SteeringEngine("b.gguf", None, n_ctx=40, n_threads=1, backend=FakeBackend())
    gen, _ = run(small, SteeringConfig(gate="off"), max_tokens=100)
    assert gen.stats.stop_reason in ("context", "eos") and len(gen.prompt_tokens) + gen.stats.tokens <= 40
    ends = [run(engine, SteeringConfig(gate="off"), seed=s, max_tokens=400)[0] for s in range(20)]
    assert any(g.stats.stop_reason == "eos" and EOS not in g.tokens for g in ends)


def test_cancel_and_dropping_a_generation_give_the_slot_back(engine: SteeringEngine) -> None:
    gen = engine.generate(PROMPT, max_tokens=50, config=SteeringConfig(gate="dense"), seed=1)
    next(gen)
    gen.cancel()
    assert list(gen) == [] and gen.stats.stop_reason == "cancelled"
    dropped = engine.generate(PROMPT, max_tokens=50, seed=2)
    next(dropped)
    del dropped
    gc.collect()
    assert len(engine._pool) == len(engine._slots) == 1


def test_a_second_turn_reuses_the_cached_prompt(engine: SteeringEngine) -> None:
    first, _ = run(engine, SteeringConfig(gate="off"), max_tokens=5)
    ctx = engine._slots[0].base
    decoded = ctx.decoded  # type: ignore[attr-defined]
    longer = TokenIds([*first.prompt_tokens, *first.tokens, 7, 8])
    run(engine, SteeringConfig(gate="off"), max_tokens=2, prompt=longer)
    assert ctx.decoded - decoded <= 2 + 2 + 1  # the new tokens and the answer, not the prompt again


def test_best_of_n_picks_the_sample_with_the_highest_mean_value(engine: SteeringEngine) -> None:
    result = engine.sample_best_of_n(PROMPT, 4, max_tokens=8, config=SteeringConfig(gate="off"), seed=3)
    assert [s.score for s in result.samples][result.chosen] == max(s.score for s in result.samples)
    assert result.ranking_value_tokens == sum(len(s.prompt_tokens) + len(s.tokens) for s in result.samples if s.tokens)
    text, all_samples = engine.best_of_n(PROMPT, 4, max_tokens=8, config=SteeringConfig(gate="off"), seed=3)
    assert text == result.best.text and [t for t, _, _ in all_samples] == [s.text for s in result.samples]


def test_a_generation_closed_before_it_starts_never_starts(engine: SteeringEngine) -> None:
    gen = engine.generate(PROMPT, max_tokens=20, config=SteeringConfig(gate="off"), seed=1)
    gen.close()  # the UI stopped it before the worker thread began iterating
    assert list(gen) == [] and gen.stats.stop_reason == "cancelled" and gen.stats.tokens == 0
    assert not engine._slots  # no context was even taken
