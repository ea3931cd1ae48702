"""When to steer: gate policies, their settings, and picking tau for a target steering ratio.

The gate statistic of the official SIA code is the entropy (nats) of softmax over the base
model's top-k logits; a step is a junction iff that entropy >= tau. The other gates exist for
ablations and baselines:

=============  ==============================================================================
gate           a step is a junction when
=============  ==============================================================================
entropy        top-k entropy >= tau (SIA; default k 10, tau 1.0, w 1.0, T 1.0)
full-entropy   entropy over the whole vocabulary >= tau
dense          always (steer every token)
off            never (plain top-k sampling in the same loop)
random         with probability p, independently of the model (same-ratio baseline)
=============  ==============================================================================

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
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["GATES", "JunctionGate", "SteeringConfig", "steering_shift", "tau_for_ratio"]

GATES: tuple[str, ...] = ("entropy", "full-entropy", "dense", "off", "random")
MODE_ALIASES = {"sparse": "entropy"}  # what the CLI and server call the default gate
MAX_SEED = 2**64 - 1
MAX_W = 1e4  # |w| beyond this turns w * V into inf for any value worth steering with  # a generation's seed feeds the native sampler's unsigned 64-bit generator


@dataclass(frozen=True)
class SteeringConfig:
    """Every knob of one generation's steering. Validated on construction."""

    gate: str = "entropy"
    k: int = 10
    tau: float = 1.0
    w: float = 1.0
    temperature: float = 1.0
    p: float = 0.2  # random gate: steering probability
    target_ratio: float | None = None  # entropy gates: pick tau for this fraction of junctions
    head: int = 0  # also steer the first `head` tokens of every answer
    follow: float | None = None  # steer the next token after a junction that moved >= this much mass
    horizon: int | None = None  # no junction after the first `horizon` tokens of an answer (0 = None)

    def __post_init__(self) -> None:
        gate = MODE_ALIASES.get(self.gate, self.gate)
        object.__setattr__(self, "gate", gate)
        if gate not in GATES:
            raise ValueError(f"unknown gate {self.gate!r}; choose one of {', '.join(GATES)} (or 'sparse')")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        for name in ("tau", "w", "temperature", "p"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if abs(self.w) > MAX_W:
            raise ValueError(f"w must be between -{MAX_W:g} and {MAX_W:g}, got {self.w!r}: values are normalised, "
                             "so a weight that large only overflows the steered logits")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")
        if isinstance(self.head, bool) or not isinstance(self.head, int) or self.head < 0:
            raise ValueError(f"head must be a whole number of tokens >= 0, got {self.head!r}")
        if self.horizon is not None:
            if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 0:
                raise ValueError(f"horizon must be a whole number of tokens (0: none), got {self.horizon!r}")
            if self.horizon == 0:  # as head 0 is no head: lets a request lift a server's default horizon
                object.__setattr__(self, "horizon", None)
        if self.horizon is not None and self.head > self.horizon:
            raise ValueError(f"head {self.head} steers past horizon {self.horizon}, which ends all steering; "
                             "lower head or raise horizon")
        if self.follow is not None and (
            isinstance(self.follow, bool) or not isinstance(self.follow, (int, float)) or not 0.0 < self.follow <= 1.0
        ):
            raise ValueError(f"follow must be a share of probability mass in (0, 1], got {self.follow!r}")
        if self.target_ratio is not None:
            if not (isinstance(self.target_ratio, (int, float)) and 0.0 < self.target_ratio < 1.0):
                raise ValueError(f"target_ratio must be in (0, 1), got {self.target_ratio!r}")
            if gate not in ("entropy", "full-entropy"):
                raise ValueError("target_ratio applies to the entropy gates only")

    @property
    def steers(self) -> bool:
        return self.gate != "off"

    def with_tau(self, tau: float) -> SteeringConfig:
        return replace(self, tau=float(tau), target_ratio=None)


class JunctionGate:
    """Turns a config into the per-step threshold the native step compares the statistic to:
    a step is a junction iff statistic >= threshold (NaN never is)."""

    def __init__(self, config: SteeringConfig, seed: int) -> None:
        if config.target_ratio is not None:
            raise ValueError("resolve target_ratio to a tau first (SteeringEngine does it)")
        self.config = config
        self.on_full_entropy = config.gate == "full-entropy"
        self._fixed: float | None = {
            "entropy": config.tau,
            "full-entropy": config.tau,
            "dense": -math.inf,
            "off": math.inf,
        }.get(config.gate)
        # The random gate has its own stream, so it does not shift the sampling RNG.
        self._coin = random.Random(seed ^ 0x5EED_6A7E)
        self._head_left = config.head if config.steers else 0  # 'off' never steers
        self._follow_next = False
        self._horizon_left = config.horizon if config.horizon is not None else math.inf

    def steered(self, shift: float) -> None:
        """Report a junction's ``steering_shift``: with ``follow``, a large one makes the next step a junction."""
        self._follow_next = self.config.follow is not None and shift >= self.config.follow

    def threshold(self) -> float:
        """The threshold of the next step (call once per generated token, in order)."""
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


def steering_shift(base_logits: np.ndarray, values: np.ndarray, w: float, temperature: float) -> float:
    """How much probability steering moved at a junction: the total variation distance between
    softmax(z / T) and softmax((z + w V) / T) over the k candidates (0 = none, 1 = all of it).
    Greedy decoding (T = 0) moved all of it iff the top candidate changed."""
    z = np.asarray(base_logits, dtype=np.float64)
    steered = z + w * np.asarray(values, dtype=np.float64)
    if temperature == 0:
        return float(np.argmax(z) != np.argmax(steered))
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
