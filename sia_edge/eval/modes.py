"""Eval's ``--modes``: the steering spec's string form (``sia_edge.steering``), plus eval's own
``random@MODE``. The modes table for users is the package docstring (``sia_edge/eval/__init__.py``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from sia_edge import steering
from sia_edge.cli_common import CliError
from sia_edge.steering import GATE_KINDS, SpecError, SpecParts, SteeringConfig, mode_name, parse_spec_parts

__all__ = ["DEFAULT_MODES", "MAX_BON", "MODE_SYNTAX", "EvalMode", "ModeError", "parse_mode", "parse_modes"]

DEFAULT_MODES = "off,sparse,dense,random@sparse"
MODE_SYNTAX = steering.SPEC_SYNTAX.replace("random@P|@R%", "random@P|@R%|@MODE")
MAX_BON = steering.MAX_BON


@dataclass(frozen=True)
class EvalMode:
    """One entry of ``--modes``: the steering spec's string form (``sia_edge.steering``), plus
    eval's ``random@MODE`` (``match``: take p from that mode's measured rate, per set)."""

    label: str  # as written (lower-cased): the key in the summary and the outputs
    gate: str  # SteeringConfig gate
    tau: float | None = None
    target_ratio: float | None = None
    p: float | None = None  # random gate: fixed steering probability
    match: str | None = None  # random gate: take p from this mode's measured rate, per set
    bon: int = 1  # Best-of-N samples (1: a single sample)
    head: int = 0  # also steer the first `head` tokens of every answer
    follow: float | None = None  # also steer the token after a junction that moved this much mass
    horizon: int | None = None  # steer only within the first `horizon` tokens of every answer
    value_head: str | None = None  # "candidate": the value model's candidate head (None: the scalar one)

    @property
    def parts(self) -> SpecParts:
        return SpecParts(self.gate, tau=self.tau, target_ratio=self.target_ratio, p=self.p, match=self.match,
                         head=self.head, follow=self.follow, horizon=self.horizon, bon=self.bon,
                         value_head=self.value_head)

    @property
    def family(self) -> str:
        """What the plot draws as one line: the mode's name, with ``+head``, ``+follow``, ``+horizon`` and
        ``+bon`` if used."""
        base = mode_name(self.gate) + ("+head" if self.head else "")
        base += "+follow" if self.follow is not None else ""
        base += "+horizon" if self.horizon is not None else ""
        base += "+candidate" if self.value_head == "candidate" else ""
        if self.bon == 1:
            return base
        return "bon" if base == "off" else f"{base}+bon"

    @property
    def needs_value_model(self) -> bool:
        return GATE_KINDS[self.gate].steers or self.bon > 1

    def config(self, *, k: int, w: float, temperature: float, p: float | None = None) -> SteeringConfig:
        settings: dict[str, Any] = {"k": k, "w": w, "temperature": temperature}
        if self.gate == "random":
            chosen = self.p if self.p is not None else p
            if chosen is None:
                raise ValueError(f"mode {self.label}: the steering probability is not known yet")
            settings["p"] = float(min(1.0, max(0.0, chosen)))
        return self.parts.config(**settings)


class ModeError(CliError):
    """A ``--modes`` entry that does not parse."""


def parse_mode(text: str) -> EvalMode:
    """One mode from its ``--modes`` syntax (the string form of sia_edge/steering.py, plus ``random@MODE``)."""
    try:
        parts = parse_spec_parts(text, allow_match=True)
    except SpecError as exc:
        message = str(exc).replace("empty mode", "empty mode in --modes", 1)
        raise ModeError(message) from None
    return EvalMode(text.strip().lower(), parts.gate, tau=parts.tau, target_ratio=parts.target_ratio, p=parts.p,
                    match=parts.match, bon=parts.bon, head=parts.head, follow=parts.follow, horizon=parts.horizon,
                    value_head=parts.value_head)


def parse_modes(text: str) -> list[EvalMode]:
    """The ``--modes`` list: each entry parsed, no duplicates, ``random@MODE`` naming a mode of the list."""
    modes = [parse_mode(part) for part in text.split(",")]
    labels = [m.label for m in modes]
    dup = [lab for lab, n in Counter(labels).items() if n > 1]
    if dup:
        raise ModeError(f"mode {dup[0]!r} is listed twice in --modes")
    by_label = {m.label: m for m in modes}
    for i, m in enumerate(modes):
        # random@MODE+horizon@N is the same-rate baseline of MODE+horizon@N: MODE's whole-answer rate
        # spent within the window would be a weaker baseline than it looks, so it is not a fallback.
        # Likewise random@MODE+candidate takes the rate of MODE+candidate, steered by the same head.
        if m.match is not None and (m.horizon is not None or m.value_head is not None):
            target = replace(parse_mode(m.match), label="")
            within = next((x.label for x in modes if x.match is None and x.horizon == m.horizon
                           and x.value_head == m.value_head
                           and replace(x, label="", horizon=None, value_head=None) == target), None)
            if within is None:
                suffix = (f"+horizon@{m.horizon}" if m.horizon is not None else "") + (
                    f"+{m.value_head}" if m.value_head is not None else "")
                what = (f"within the first {m.horizon} tokens " if m.horizon is not None else "") + (
                    f"with the {m.value_head} head " if m.value_head is not None else "")
                raise ModeError(f"mode {m.label!r} steers at random {what}at the rate of {m.match}{suffix}: add "
                                "that mode to --modes")
            modes[i] = m = replace(m, match=within)
        if m.match is not None:
            ref = by_label.get(m.match)
            if ref is None:
                raise ModeError(
                    f"mode {m.label!r} takes its ratio from the mode {m.match!r}, which is not in --modes; add it"
                )
            if ref.match is not None:
                raise ModeError(f"mode {m.label!r}: {m.match!r} itself takes its ratio from another mode")
    return modes
