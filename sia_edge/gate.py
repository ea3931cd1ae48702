"""When to steer, step by step: the gates, composed per generation, and picking tau for a target
steering ratio. Their settings and names are defined once in ``sia_edge.steering``.

The gate statistic of the official SIA code is the entropy (nats) of softmax over the base
model's top-k logits; a step is a junction iff that entropy >= tau (``entropy``, the faces'
``sparse``). The other gates exist for ablations and baselines: ``full-entropy``, ``dense``,
``off`` and ``random`` (the table in sia_edge/steering.py), and ``shift``, a value-aware gate.

``shift`` reads the value model at every step: a step is a junction iff steering would move at
least tau of the probability (``steering_shift``, the total variation distance between the base
and the steered top-k distributions). The entropy gate sees only the base model's doubt; a
confident step towards a candidate the value model scores far below the others is left alone by
it and taken by ``shift``. Scoring every step costs what dense steering costs in value-model
work, so it is for value heads whose scores are nearly free: a base-state candidate head
(docs/TRAINING.md, section 7 and its presets). What it measured: docs/results/gemma3-detox.md.

Every gate is a small object with one interface (``Gate``: ``threshold()`` once per step, in
order, and ``steered(shift)`` after a junction), in the spirit of llama.cpp's sampler chain.
``head``, ``follow`` and ``horizon`` wrap the mode's own gate; ``build_gate`` composes them
(``horizon(head(follow(mode)))``), so a new gate is one class here and one row in steering.py.

``head`` N adds the official code's first-N-positions gate to any steering gate: the first N
tokens of every answer are junctions whatever their statistic (``off`` stays off). An answer's
opening is where it commits to refusing or complying ("I" -> "'m sorry" / "'m happy to"), and the
second and third tokens of such openings often have low entropy, so the entropy gate alone passes
them unsteered. An ablation; what it measured: docs/results/ablations.md ("Steering the opening
too: head@3" and "Following an overruled step, and steering only the opening").

``follow`` F keeps steering while the value model overrules the base model: after a junction where
steering moved at least F of the probability (the total variation distance between the base and
the steered top-k distributions, in [0, 1]), the next token is a junction too. The entropy gate
sees the base model's confidence, and after an overruled step that is confidence in a text it would
not have written: in the held-out harmful answers, sparse steering picks "I" and then passes
"'m" -> " happy" unsteered at low entropy, where dense steering writes "'m" -> " afraid I can't"
(docs/results/ablations.md, "Following an overruled step, and steering only the opening": an
ablation, like ``head``).

``horizon`` N ends steering after the first N tokens of every answer: later steps are never
junctions, whatever their statistic, ``head`` or ``follow`` (0 or None: no horizon). It changes
nothing before that: the entropy gate keeps SIA's junctions, at the same tau (a ``target_ratio``
is calibrated on whole answers, as without a horizon), but only where a safety answer commits
(the default gate, docs/RESULTS.md; how it was chosen: docs/results/ablations.md). It bounds what steering costs per
answer: after the horizon the value model is not used again, so the rest of a long answer runs at
the base model's speed (in a chat, the next turn's first junction catches the value model up on
the unsteered tokens, in one batch).

``target_ratio`` replaces tau: the engine measures the gate statistic on unsteered runs of the
same model and takes its (1 - ratio) quantile, as the paper picks tau offline (the ``head`` steps
count towards the ratio; ``follow`` steps depend on the steering itself, so they come on top).
"""

from __future__ import annotations

import math
import random
from typing import Protocol

import numpy as np

from sia_edge.steering import GATES, MAX_SEED, SteeringConfig

__all__ = [
    "GATES",
    "MAX_SEED",
    "DenseGate",
    "EntropyGate",
    "FollowGate",
    "Gate",
    "HeadGate",
    "HorizonGate",
    "JunctionGate",
    "OffGate",
    "RandomGate",
    "ShiftGate",
    "SteeringConfig",  # defined in sia_edge.steering; importable from here as it always was
    "build_gate",
    "steering_shift",
    "tau_for_ratio",
]


class Gate(Protocol):
    """Per-step junction decisions of one generation: a step is a junction iff its gate
    statistic >= ``threshold()`` (NaN never is; -inf: always, +inf: never)."""

    def threshold(self) -> float:
        """The threshold of the next step (called once per sampling decision, in order)."""
        ...

    def steered(self, shift: float) -> None:
        """A junction moved ``shift`` of the probability (``steering_shift``)."""
        ...


class _Fixed:
    def __init__(self, threshold: float) -> None:
        self._threshold = threshold

    def threshold(self) -> float:
        return self._threshold

    def steered(self, shift: float) -> None:
        pass


class EntropyGate(_Fixed):
    """SIA's gate, on the top-k or the full entropy (which one the native step reports)."""


class ShiftGate(_Fixed):
    """The value-aware gate: tau on the probability steering would move (the engine scores the
    candidates first, then compares ``steering_shift`` with the threshold)."""


class DenseGate(_Fixed):
    def __init__(self) -> None:
        super().__init__(-math.inf)


class OffGate(_Fixed):
    def __init__(self) -> None:
        super().__init__(math.inf)


class RandomGate:
    """Steer with probability p, independently of the model. Its coin has a stream of its own,
    so it does not shift the sampling RNG."""

    def __init__(self, p: float, seed: int) -> None:
        self.p = p
        self._coin = random.Random(seed ^ 0x5EED_6A7E)

    def threshold(self) -> float:
        return -math.inf if self._coin.random() < self.p else math.inf

    def steered(self, shift: float) -> None:
        pass


class HeadGate:
    """The first ``n`` steps are junctions whatever their statistic (the official code's
    first-N-positions gate, joined to the mode's own)."""

    def __init__(self, inner: Gate, n: int) -> None:
        self.inner, self._left = inner, n

    def threshold(self) -> float:
        if self._left > 0:
            self._left -= 1
            return -math.inf
        return self.inner.threshold()

    def steered(self, shift: float) -> None:
        self.inner.steered(shift)


class FollowGate:
    """After a junction that moved at least ``share`` of the probability, the next step is a
    junction too: keep steering while the value model overrules the base model."""

    def __init__(self, inner: Gate, share: float) -> None:
        self.inner, self.share, self._next = inner, share, False

    def threshold(self) -> float:
        if self._next:
            self._next = False
            return -math.inf
        return self.inner.threshold()

    def steered(self, shift: float) -> None:
        self._next = shift >= self.share
        self.inner.steered(shift)


class HorizonGate:
    """No junction after the first ``n`` steps, whatever the gates inside would say."""

    def __init__(self, inner: Gate, n: int) -> None:
        self.inner, self._left = inner, n

    def threshold(self) -> float:
        if self._left <= 0:
            return math.inf
        self._left -= 1
        return self.inner.threshold()

    def steered(self, shift: float) -> None:
        self.inner.steered(shift)


def build_gate(config: SteeringConfig, seed: int) -> Gate:
    """The gate of one generation: the mode's own, wrapped by follow, head and horizon."""
    if config.target_ratio is not None:
        raise ValueError("resolve target_ratio to a tau first (SteeringEngine does it)")
    gate: Gate
    if config.gate == "random":
        gate = RandomGate(config.p, seed)
    elif config.gate == "dense":
        gate = DenseGate()
    elif config.gate == "off":
        return OffGate()  # never steers: head, follow and horizon have nothing to add
    elif config.kind.statistic == "shift":
        gate = ShiftGate(config.tau)
    else:
        gate = EntropyGate(config.tau)
    if config.follow is not None:
        gate = FollowGate(gate, config.follow)
    if config.head:
        gate = HeadGate(gate, config.head)
    if config.horizon is not None:
        gate = HorizonGate(gate, config.horizon)
    return gate


class JunctionGate:
    """A config's gate for one generation (``build_gate``), and which statistic it reads: an
    entropy the native step reports, or (``on_shift``) the shift of the scored candidates."""

    def __init__(self, config: SteeringConfig, seed: int) -> None:
        self.config = config
        self.on_full_entropy = config.kind.statistic == "full"
        self.on_shift = config.kind.statistic == "shift"
        self._gate = build_gate(config, seed)
        self.threshold = self._gate.threshold
        self.steered = self._gate.steered


def steering_shift(base_logits: np.ndarray, values: np.ndarray, w: float, temperature: float) -> float:
    """How much probability steering moved at a junction: the total variation distance between
    softmax(z / T) and softmax((z + w V) / T) over the k candidates (0 = none, 1 = all of it).
    Greedy decoding (T = 0) moved all of it iff the top candidate changed."""
    z = np.asarray(base_logits, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("values contain NaN or infinity: the value model's output is broken")
    steered = z + w * v
    # The sampler reads T as a float32: a T that rounds to 0 there is greedy here too.
    if np.float32(temperature) == 0:
        return float(np.argmax(z) != np.argmax(steered))
    # A tiny T sends (z - max) / T past the float range: -inf, whose exp is the exact limit 0.
    with np.errstate(over="ignore"):
        p, q = np.exp((z - z.max()) / temperature), np.exp((steered - steered.max()) / temperature)
    return 0.5 * float(np.abs(p / p.sum() - q / q.sum()).sum())


def tau_for_ratio(statistics: list[float] | np.ndarray, ratio: float) -> float:
    """The tau that makes ``ratio`` of the given gate statistics junctions (statistic >= tau).
    +inf marks a step that is a junction whatever tau is (a ``head`` step); if those alone reach
    the ratio, no tau can meet it, and that is an error that says so."""
    values = np.asarray(statistics, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise ValueError("no gate statistics to calibrate on")
    tau = float(np.quantile(values, 1.0 - ratio, method="higher"))
    if math.isinf(tau):
        head_share = float(np.mean(np.isinf(values)))
        raise ValueError(
            f"head steers {head_share:.0%} of the calibration tokens by itself, more than target_ratio "
            f"{ratio:g} allows; lower head or raise target_ratio"
        )
    return tau
