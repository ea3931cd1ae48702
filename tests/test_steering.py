"""The steering spec and the gates, alone: no model, no llama.cpp (the unit tier).

One definition of every setting (sia_edge/steering.py) must be what every face shows, its string
form must read back to the same config, and the composed gates must decide step by step exactly
as the single if-chain they replaced did.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sia_edge import steering
from sia_edge.chat import build_parser as chat_parser
from sia_edge.gate import JunctionGate, build_gate
from sia_edge.steering import (
    GATE_KINDS,
    MAX_W,
    RECOMMENDED,
    SETTINGS,
    SpecError,
    SteeringConfig,
    format_spec,
    level_for_gate,
    parse_spec,
    recommended_settings,
)


@st.composite
def configs(draw: st.DrawFn) -> SteeringConfig:
    gate = draw(st.sampled_from(list(GATE_KINDS)))
    kw: dict = {"gate": gate, "k": draw(st.integers(1, 64)),
                "w": draw(st.floats(-MAX_W, MAX_W, allow_nan=False)),
                "temperature": draw(st.floats(0, 10, allow_nan=False)), "bon": draw(st.integers(1, 8))}
    kind = GATE_KINDS[gate]
    if kind.level == "tau":
        if draw(st.booleans()):
            kw["target_ratio"] = draw(st.floats(0, 1, exclude_min=True, exclude_max=True))
        else:
            kw["tau"] = draw(st.floats(-1e6, 1.0 if kind.statistic == "shift" else 1e6, allow_nan=False))
    if kind.level == "p":
        kw["p"] = draw(st.floats(0, 1))
    if kind.steers:
        horizon = draw(st.none() | st.integers(1, 64))
        kw["horizon"] = horizon
        kw["head"] = draw(st.integers(0, horizon if horizon is not None else 64))
    if kind.level is not None:
        kw["follow"] = draw(st.none() | st.floats(0, 1, exclude_min=True))
    return SteeringConfig(**kw)


@settings(max_examples=300, deadline=None)
@given(configs())
def test_the_string_form_reads_back_to_the_same_config(config: SteeringConfig) -> None:
    text = format_spec(config)
    assert parse_spec(text, k=config.k, w=config.w, temperature=config.temperature) == config
    assert parse_spec(text.upper(), k=config.k, w=config.w, temperature=config.temperature) == config
    assert config.spec == text


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(GATE_KINDS)), st.floats(-10, 10), st.floats(0, 1), st.integers(0, 8),
       st.none() | st.floats(0, 1, exclude_min=True), st.none() | st.integers(8, 16))
def test_every_config_has_a_string_form_that_parses(gate: str, tau: float, p: float, head: int,
                                                   follow: float | None, horizon: int | None) -> None:
    """Also configs with settings that do not apply to their mode: those are left out."""
    if GATE_KINDS[gate].statistic == "shift":
        tau = min(tau, 1.0)  # a share of probability
    config = SteeringConfig(gate=gate, tau=tau, p=p, head=head, follow=follow, horizon=horizon)
    back = parse_spec(format_spec(config))
    assert back.gate == config.gate and back.spec == config.spec


@pytest.mark.parametrize(("text", "expected"), [
    ("sparse@25%+horizon@16", SteeringConfig(target_ratio=0.25, horizon=16)),
    ("sparse", SteeringConfig()),
    ("entropy@0.8", SteeringConfig(tau=0.8)),
    ("random@20%", SteeringConfig(gate="random", p=0.2)),
    ("bon@4", SteeringConfig(gate="off", bon=4)),
    ("dense+head@3+bon@2", SteeringConfig(gate="dense", head=3, bon=2)),
    ("sparse+follow@.5+head@2", SteeringConfig(follow=0.5, head=2)),
    ("shift@25%+candidate", SteeringConfig(gate="shift", target_ratio=0.25, value_head="candidate")),
    ("shift@0.6+horizon@8", SteeringConfig(gate="shift", tau=0.6, horizon=8)),
])
def test_spec_examples(text: str, expected: SteeringConfig) -> None:
    assert parse_spec(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("random@sparse", "random takes a probability here"),
    ("sparse@1+horizon@4+head@5", "steers past"),
    ("warp", "unknown mode"),
    ("off+head@2", "never steers"),
])
def test_bad_specs(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(text)


def test_every_setting_is_one_field_and_every_field_one_setting() -> None:
    assert [s.name for s in SETTINGS] == [f.name for f in dataclasses.fields(SteeringConfig)] or \
        {s.name for s in SETTINGS} == {f.name for f in dataclasses.fields(SteeringConfig)}
    for s in SETTINGS:
        default = getattr(SteeringConfig(), s.name)
        s.validate(default)  # the defaults pass their own checks


def test_the_cli_options_are_the_settings() -> None:
    parser = chat_parser()
    options = {opt for action in parser._actions for opt in action.option_strings}
    for s in SETTINGS:
        assert (s.option in options) == ("cli" in s.faces), s.name
    args = parser.parse_args(["--mode", "dense", "--tau", "0.5", "--horizon", "8", "--p", "0.3"])
    assert (args.mode, args.tau, args.horizon, args.p) == ("dense", 0.5, 8, 0.3)
    for bad in (["--k", "0"], ["--follow", "2"], ["--w", "1e9"], ["--mode", "warp"], ["--horizon", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_recommended_settings_are_checked_as_the_engine_would() -> None:
    assert set(RECOMMENDED) == {"gate", "tau", "target_ratio", "w", "horizon", "value_head"}
    assert recommended_settings({"w": 3.0, "tau": 1.0, "horizon": 16.0}) == {"w": 3.0, "tau": 1.0, "horizon": 16}
    for bad, message in (({"beta": 1}, "unknown recommended"), ({"tau": 1.0, "target_ratio": 0.2}, "not both"),
                         ({"w": -1.0}, "must be > 0"), ({"horizon": 0}, ">= 1"), ({"tau": math.nan}, "finite"),
                         ({"value_head": "both"}, "scalar, candidate"), ({"gate": "off"}, "must steer"),
                         ({"gate": "warp"}, "unknown mode"), ({"gate": "shift", "tau": 1.5}, "at most 1"),
                         ({"gate": "dense", "tau": 0.7}, "mode dense has none")):
        with pytest.raises(ValueError, match=message):
            recommended_settings(bad)


def test_a_recommended_gate_takes_the_recommended_tau_and_the_others_the_ratio() -> None:
    rec = {"gate": "shift", "tau": 0.6, "target_ratio": 0.25, "w": 3.0, "value_head": "candidate"}
    assert recommended_settings(rec)["gate"] == "shift"
    assert recommended_settings({"gate": "sparse"}) == {"gate": "entropy"}
    c = SteeringConfig.recommended(rec)
    assert (c.gate, c.tau, c.target_ratio, c.w, c.value_head) == ("shift", 0.6, None, 3.0, "candidate")
    sparse = SteeringConfig.recommended(rec, gate="sparse")
    assert (sparse.gate, sparse.target_ratio) == ("entropy", 0.25)
    assert SteeringConfig.recommended(rec, gate="shift", tau=0.7).tau == 0.7  # the user's tau wins
    # a shift tau was calibrated at the recommended w and head: at another w the ratio serves
    other_w = SteeringConfig.recommended(rec, w=6.0)
    assert (other_w.gate, other_w.tau, other_w.target_ratio) == ("shift", SteeringConfig().tau, 0.25)
    # without a recommended gate a tau is the top-k entropy gate's, as it always was; shift then has
    # no level, and tau 1 would score every token and steer none: an error that says what to give
    assert SteeringConfig.recommended({"tau": 1.2}).tau == 1.2
    with pytest.raises(ValueError, match="mode shift needs a tau"):
        SteeringConfig.recommended({"tau": 1.2}, gate="shift")
    assert SteeringConfig.recommended({"tau": 1.2}, gate="shift", tau=0.3).tau == 0.3
    with pytest.raises(ValueError, match="at most 1"):
        SteeringConfig(gate="shift", tau=1.5)
    with pytest.raises(ValueError, match="cannot recommend one"):
        recommended_settings({"gate": "shift", "tau": 0.5, "horizon": 16})


def test_export_options_keep_each_recommended_tau_on_its_modes_scale() -> None:
    from sia_edge.train.meta import merge_steering

    fast = {"w": 3.0, "gate": "shift", "tau": 0.6, "target_ratio": 0.25, "value_head": "candidate"}
    # a tau without a mode is the entropy gate's: the recorded mode and the ratio beside it go
    assert merge_steering(fast, {"tau": 1.2}) == {"w": 3.0, "tau": 1.2, "value_head": "candidate"}
    # a ratio stands beside another mode's tau, and replaces the entropy gate's
    assert merge_steering(fast, {"target_ratio": 0.2})["tau"] == 0.6
    assert merge_steering({"tau": 1.0, "horizon": 16}, {"target_ratio": 0.3, "horizon": 0}) == {"target_ratio": 0.3}
    # a new mode without a tau drops the old mode's, on another scale; the check then says what is missing
    moved = merge_steering({"w": 3.0, "tau": 1.0}, {"gate": "shift"})
    assert moved == {"w": 3.0, "gate": "shift"}
    with pytest.raises(ValueError, match="must recommend its tau or a target ratio"):
        recommended_settings(moved)
    assert merge_steering({"w": 3.0, "tau": 1.0}, {"gate": "sparse"})["tau"] == 1.0  # the same mode


def test_switching_gates_keeps_a_tau_only_on_its_scale() -> None:
    rec = {"gate": "shift", "tau": 0.6, "target_ratio": 0.25}
    shift = SteeringConfig(gate="shift", tau=0.6)
    assert level_for_gate(shift, "sparse", rec) == {"tau": SteeringConfig().tau, "target_ratio": 0.25}
    assert level_for_gate(shift, "shift", rec) == {}
    sparse = SteeringConfig(tau=1.99)
    assert level_for_gate(sparse, "full-entropy", rec) == {}  # both in nats
    assert level_for_gate(sparse, "shift", rec) == {"tau": 0.6, "target_ratio": None}
    # a gate without a tau holds one in nats: from shift, dense takes the entropy gate's level
    to_dense = level_for_gate(shift, "dense", rec)
    assert to_dense == {"tau": SteeringConfig().tau, "target_ratio": None}
    assert level_for_gate(dataclasses.replace(shift, gate="dense", **to_dense), "sparse", rec) == {}


def test_describe_and_as_dict_use_the_faces_names() -> None:
    c = SteeringConfig(w=3.0, horizon=16)
    assert c.describe() == "mode sparse, tau 1, horizon 16, k 10, w 3, temperature 1"
    d = c.as_dict()
    assert d["mode"] == "sparse" and "gate" not in d and d["horizon"] == 16


# --------------------------------------------------------------------------- the gates
class _OldJunctionGate:
    """The single if-chain the composed gates replaced, kept as the oracle of their behaviour."""

    def __init__(self, config: SteeringConfig, seed: int) -> None:
        self.config = config
        self._fixed = {"entropy": config.tau, "full-entropy": config.tau, "shift": config.tau, "dense": -math.inf,
                       "off": math.inf}.get(config.gate)
        self._coin = random.Random(seed ^ 0x5EED_6A7E)
        self._head_left = config.head if config.steers else 0
        self._follow_next = False
        self._horizon_left = config.horizon if config.horizon is not None else math.inf

    def steered(self, shift: float) -> None:
        self._follow_next = self.config.follow is not None and shift >= self.config.follow

    def threshold(self) -> float:
        if self._horizon_left <= 0:
            return math.inf
        self._horizon_left -= 1
        if self._head_left > 0:
            self._head_left -= 1
            return -math.inf
        if self._follow_next:
            self._follow_next = False
            return -math.inf
        if self._fixed is not None:
            return self._fixed
        return -math.inf if self._coin.random() < self.config.p else math.inf


@settings(max_examples=200, deadline=None)
@given(configs(), st.integers(0, 2**64 - 1), st.lists(st.floats(0, 3), min_size=1, max_size=80),
       st.lists(st.floats(0, 1), min_size=80, max_size=80))
def test_composed_gates_decide_as_the_if_chain_did(config: SteeringConfig, seed: int, stats: list[float],
                                                   shifts: list[float]) -> None:
    config = dataclasses.replace(config, target_ratio=None)
    new, old = JunctionGate(config, seed), _OldJunctionGate(config, seed)
    for stat, shift in zip(stats, shifts, strict=False):
        t_new, t_old = new.threshold(), old.threshold()
        assert t_new == t_old
        if stat >= t_new:  # a junction: report how much it moved
            new.steered(shift)
            old.steered(shift)
    assert new.on_full_entropy == (config.gate == "full-entropy") and new.on_shift == (config.gate == "shift")


def test_a_gate_needs_tau_resolved_first() -> None:
    with pytest.raises(ValueError, match="resolve target_ratio"):
        build_gate(SteeringConfig(target_ratio=0.2), 0)


def test_the_modes_table_in_the_docstring_lists_every_gate() -> None:
    doc = steering.__doc__ or ""
    for kind in GATE_KINDS.values():
        assert f"\n{kind.mode}" in doc and kind.gate in doc
