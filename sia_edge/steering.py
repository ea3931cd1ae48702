"""The one definition of steering: every setting, its default, its validation, and its string form.

The faces derive what they show from here: the CLI's steering options (``add_steering_options``
in cli_common), the server's request fields, eval's ``--modes``, the value GGUF's recommended
settings (``sia.steering.*``, for the settings marked ``recommend``) and the chat's settings line.
A new setting is one ``Setting`` row plus its field on ``SteeringConfig``; a new gate is one
``GateKind`` row plus its class in gate.py.

Modes
-----
What the faces call a gate is its *mode*; the SIA entropy gate is ``sparse``:

=============  ==============  ==============================================================
mode           gate            a step is a junction when
=============  ==============  ==============================================================
sparse         entropy         top-k entropy >= tau (SIA; default k 10, tau 1.0, w 1.0, T 1.0)
full-entropy   full-entropy    entropy over the whole vocabulary >= tau
shift          shift           steering would move >= tau of the probability (a value-aware gate)
dense          dense           always (steer every token)
off            off             never (plain top-k sampling in the same loop)
random         random          with probability p, independently of the model
=============  ==============  ==============================================================

The string form
---------------
``MODE[@LEVEL][+head@N][+follow@F][+horizon@N][+bon@N]``, for example ``sparse@25%+horizon@16``:

- ``@LEVEL`` sets the mode's level: a tau for ``sparse``, ``full-entropy`` and ``shift``
  (``sparse@0.8``, ``shift@0.1``), or a target ratio as a percentage (``sparse@25%``: the tau that makes 25% of the tokens of
  unsteered runs junctions); the probability for ``random`` (``random@0.2`` or ``random@20%``).
  ``off`` and ``dense`` take none. Without it, the default applies (tau 1.0).
- ``+head@N``, ``+follow@F``, ``+horizon@N`` and ``+bon@N`` add those settings (table below), each at
  most once, in any order. ``bon@N`` alone means Best-of-N over unsteered samples (``off+bon@N``).

``format_spec`` writes a config in this form and ``parse_spec`` reads it back to an equal one
(``k``, ``w`` and ``temperature`` are not part of it: they are set beside it). Settings that do
not apply to the mode (a tau on ``dense``, a head on ``off``, follow on ``dense``) are not part of
it either: their string is the mode's, and it reads back with them at their defaults. Eval adds one form of
its own, ``random@MODE``: the probability that another listed mode measured.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from decimal import Decimal
from typing import Any

from sia_edge.value_format import HEADS

__all__ = [
    "GATES",
    "GATE_KINDS",
    "MAX_BON",
    "MAX_SEED",
    "MAX_W",
    "MODES",
    "RECOMMENDED",
    "SETTINGS",
    "TAU_GATES",
    "GateKind",
    "Setting",
    "SpecError",
    "SpecParts",
    "SteeringConfig",
    "format_spec",
    "gate_of",
    "horizon_for_gate",
    "level_for_gate",
    "mode_name",
    "parse_spec",
    "parse_spec_parts",
    "recommended_level",
    "recommended_settings",
]

MAX_SEED = 2**64 - 1  # a generation's seed feeds the native sampler's unsigned 64-bit generator
MAX_W = 1e4  # |w| beyond this turns w * V into inf for any value worth steering with
VALUE_HEADS = HEADS  # the value model's two ways of scoring candidates (value_format.py)
MAX_BON = 256  # samples per prompt: a typo like bon@100000000 would otherwise run for ever


# --------------------------------------------------------------------------- gates
@dataclass(frozen=True)
class GateKind:
    """One gate: its name, what the faces call it, and what its ``@LEVEL`` sets."""

    gate: str
    mode: str
    level: str | None  # the SteeringConfig field ``@LEVEL`` sets: "tau", "p" or None
    steers: bool = True
    # what tau is compared with: the top-k or the full entropy the native step reports, or "shift",
    # the probability steering would move (gate.steering_shift: the candidates are scored every step)
    statistic: str = "topk"


GATE_KINDS: dict[str, GateKind] = {k.gate: k for k in (
    GateKind("entropy", "sparse", "tau"),
    GateKind("full-entropy", "full-entropy", "tau", statistic="full"),
    GateKind("shift", "shift", "tau", statistic="shift"),
    GateKind("dense", "dense", None),
    GateKind("off", "off", None, steers=False),
    GateKind("random", "random", "p"),
)}
GATES: tuple[str, ...] = tuple(GATE_KINDS)
MODES: tuple[str, ...] = tuple(k.mode for k in GATE_KINDS.values())
# the gates with a threshold tau on a statistic (so also a target ratio that calibrates it)
TAU_GATES: tuple[str, ...] = tuple(g for g, k in GATE_KINDS.items() if k.level == "tau")
_BY_MODE = {k.mode: k.gate for k in GATE_KINDS.values()}


def gate_of(name: str) -> str:
    """The gate a mode or gate name stands for (``sparse`` -> ``entropy``); unknown names unchanged."""
    return _BY_MODE.get(name, name)


def mode_name(gate: str) -> str:
    """What the faces call a gate (``entropy`` -> ``sparse``)."""
    kind = GATE_KINDS.get(gate)
    return kind.mode if kind is not None else gate


# --------------------------------------------------------------------------- settings
def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Setting:
    """One steering setting: what every face shows of it and how it is checked.

    ``check`` returns None for a valid value or the reason it is not (the text after
    "NAME must be"). ``recommend``: a value GGUF may carry it as ``sia.steering.NAME``.
    ``in_spec``: part of the string form. ``optional``: None is a value (the setting is off).
    ``faces``: where a user sets it by name: ``cli`` (``--NAME``) and ``server`` (a request field);
    ``face_name`` when the faces call it otherwise (the gate is the *mode*)."""

    name: str
    kind: type
    help: str
    metavar: str
    check: Callable[[Any], str | None]
    optional: bool = False
    recommend: bool = False
    in_spec: bool = False
    faces: tuple[str, ...] = ("cli", "server")
    face_name: str = ""

    @property
    def option(self) -> str:
        """The command-line option."""
        return "--" + (self.face_name or self.name).replace("_", "-")

    @property
    def field(self) -> str:
        """The server's request field (the mode is ``sia_mode``: a name OpenAI's API will not take)."""
        return "sia_mode" if self.name == "gate" else self.name

    def parse(self, text: str) -> Any:
        """A command-line value, converted and checked (ValueError says why not)."""
        if self.kind is int:
            try:
                value: Any = int(text)
            except ValueError:
                raise ValueError(f"{self.name} must be {self.check(None)}, got {text!r}") from None
        elif self.kind is float:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{self.name} must be {self.check(None)}, got {text!r}") from None
        else:
            value = text
        self.validate(value)
        return value

    def validate(self, value: Any, *, what: str = "") -> None:
        """ValueError "NAME must be ..., got VALUE" (``what`` goes before NAME) unless valid."""
        if value is None and self.optional:
            return
        why = self.check(value)
        if why is not None and self.name == "gate":  # users know it as the mode
            raise ValueError(f"unknown mode {value!r}; choose one of {', '.join(MODES)}")
        if why is not None:
            raise ValueError(f"{what}{self.name} must be {why}, got {value!r}")


SETTINGS: tuple[Setting, ...] = (
    Setting("gate", str, "when to steer: sparse (SIA: steer where the top-k entropy >= tau), dense (every "
            "token), off (plain top-k sampling); also full-entropy, random, shift (steer where steering would "
            "move >= tau of the probability; scores every token's candidates)", "MODE",
            lambda v: None if isinstance(v, str) and gate_of(v) in GATE_KINDS
            else f"a known mode, one of {', '.join(MODES)}", recommend=True, in_spec=True, face_name="mode"),
    Setting("tau", float, "the gate's threshold: entropy in nats (steer where the gate's entropy >= tau); for "
            "mode shift, a share of probability in [0, 1]", "X",
            lambda v: None if _number(v) else "a finite number", recommend=True, in_spec=True),
    Setting("target_ratio", float, "pick tau so that about this fraction of tokens are junctions (measured once "
            "on unsteered runs, then cached); replaces tau", "R",
            lambda v: None if _number(v) and 0.0 < v < 1.0 else "in (0, 1)",
            optional=True, recommend=True, in_spec=True),
    Setting("p", float, "mode random: the probability of steering each token", "P",
            lambda v: None if _number(v) and 0.0 <= v <= 1.0 else "a probability in [0, 1]", in_spec=True),
    Setting("k", int, "candidates per step", "N",
            lambda v: None if _whole(v) and v >= 1 else "a positive integer"),
    Setting("w", float, "steering strength, in the value model's reward standard deviations", "X",
            lambda v: None if _number(v) and abs(v) <= MAX_W else
            f"a finite number between -{MAX_W:g} and {MAX_W:g} (values are normalised, so a larger weight only "
            "overflows the steered logits)", recommend=True),
    Setting("temperature", float, "sampling temperature, 0 = greedy", "T",
            lambda v: None if _number(v) and v >= 0 else ">= 0 (0 = greedy), and finite"),
    Setting("top_p", float, "nucleus sampling over the (steered) candidates: keep the likeliest whose "
            "probability reaches P (1: all of them)", "P",
            lambda v: None if _number(v) and 0.0 <= v <= 1.0 else "a probability in [0, 1]"),
    Setting("min_p", float, "drop candidates less likely than P times the likeliest (0: none)", "P",
            lambda v: None if _number(v) and 0.0 <= v <= 1.0 else "a share in [0, 1]"),
    Setting("head", int, "also steer the first N tokens of every answer, where it commits to refusing or "
            "complying", "N", lambda v: None if _whole(v) and v >= 0 else "a whole number of tokens >= 0",
            in_spec=True),
    Setting("follow", float, "also steer the token after a junction where steering moved at least F (0-1] of "
            "the probability: keep steering while the value model overrules the base model", "F",
            lambda v: None if _number(v) and 0.0 < v <= 1.0 else "a share of probability mass in (0, 1]",
            optional=True, in_spec=True),
    Setting("horizon", int, "steer only within the first N tokens of every answer, at the same tau (a target "
            "ratio is calibrated on whole answers); afterwards the value model rests and the answer runs at "
            "the base model's speed (0: the whole answer)", "N",
            lambda v: None if _whole(v) and v >= 0 else "a whole number of tokens (0: none)",
            optional=True, recommend=True, in_spec=True),
    Setting("value_head", str, "how the value model scores candidates: scalar (one value-model row per "
            "candidate, SIA's head) or candidate (all candidates from the prefix's one row; the value GGUF must "
            "carry a candidate head)", "HEAD",
            lambda v: None if v in VALUE_HEADS else f"one of {', '.join(VALUE_HEADS)}", recommend=True,
            in_spec=True),
    Setting("bon", int, "Best-of-N: N samples, the one with the highest mean value wins", "N",
            lambda v: None if _whole(v) and 1 <= v <= MAX_BON else f"a whole number from 1 to {MAX_BON}",
            in_spec=True, faces=()),
)
_SETTING = {s.name: s for s in SETTINGS}
RECOMMENDED: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.recommend)


@dataclass(frozen=True)
class SteeringConfig:
    """Every knob of one generation's steering (one row of ``SETTINGS`` per field). Validated
    on construction; ``gate`` may be given as a mode name (``sparse``)."""

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
    bon: int = 1  # Best-of-N samples (SteeringEngine.best_of_n, eval's +bon@N); 1 = one sample
    top_p: float = 1.0  # sampling: the likeliest candidates whose mass reaches top_p (after steering)
    min_p: float = 0.0  # sampling: no candidate below min_p times the likeliest
    value_head: str = "scalar"  # scalar: a branch row per candidate; candidate: the prefix's row only

    def __post_init__(self) -> None:
        for f in fields(self):
            _SETTING[f.name].validate(getattr(self, f.name))
        object.__setattr__(self, "gate", gate_of(self.gate))
        if self.horizon == 0:  # as head 0 is no head: lets a request lift a server's default horizon
            object.__setattr__(self, "horizon", None)
        if self.horizon is not None and self.head > self.horizon:
            raise ValueError(f"head {self.head} steers past horizon {self.horizon}, which ends all steering; "
                             "lower head or raise horizon")
        if self.target_ratio is not None and self.gate not in TAU_GATES:
            raise ValueError("target_ratio applies to the gates with a tau only (sparse, full-entropy, shift)")
        if self.kind.statistic == "shift" and self.tau > 1:
            raise ValueError(f"tau must be at most 1 for mode shift (a share of probability: the steps where "
                             f"steering would move at least that much are steered), got {self.tau:g}")

    @property
    def kind(self) -> GateKind:
        return GATE_KINDS[self.gate]

    @property
    def steers(self) -> bool:
        return self.kind.steers

    @property
    def mode(self) -> str:
        return self.kind.mode

    def with_tau(self, tau: float) -> SteeringConfig:
        return replace(self, tau=float(tau), target_ratio=None)

    @property
    def spec(self) -> str:
        """This config in the string form (``format_spec``)."""
        return format_spec(self)

    def describe(self) -> str:
        """The settings as one line for people (the chat's start line, ``/mode``, ``/tau``)."""
        extra = f", head {self.head}" if self.head else ""
        extra += f", follow {self.follow:g}" if self.follow is not None else ""
        extra += f", horizon {self.horizon}" if self.horizon is not None else ""
        extra += ", candidate head" if self.value_head != "scalar" and self.steers else ""
        sampling = f", top-p {self.top_p:g}" if self.top_p < 1 else ""
        sampling += f", min-p {self.min_p:g}" if self.min_p > 0 else ""
        return (f"mode {self.mode}, tau {self.tau:g}{extra}, k {self.k}, w {self.w:g}, "
                f"temperature {self.temperature:g}{sampling}")

    def as_dict(self) -> dict[str, Any]:
        """The settings under the faces' names (``mode``, not ``gate``), JSON-ready."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "gate"}
        return {"mode": self.mode, **d}

    @classmethod
    def from_spec(cls, text: str, **settings: Any) -> SteeringConfig:
        """``parse_spec``."""
        return parse_spec(text, **settings)

    @classmethod
    def recommended(cls, recommendation: Mapping[str, Any], *, gate: str | None = None,
                    **given: Any) -> SteeringConfig:
        """The config a value model recommends (its ``sia.steering.*``: what it was evaluated
        with), for ``gate``, with the settings ``given`` by the user winning. The one rule every
        face and the Python API use:

        - the gate is ``gate`` if given, else the recommended one, else SIA's entropy gate;
        - ``w`` comes from the recommendation unless given;
        - for the gates with a tau, unless ``tau`` or ``target_ratio`` is given: a recommended tau
          for the gate it was recommended with (the recommended gate, else the top-k entropy
          gate: a tau is on its statistic's scale; a shift tau only at the recommended w and
          head, which it was calibrated for), else a recommended target ratio; mode shift
          with neither is a ValueError (tau 1 would score every token and steer none);
        - ``value_head`` comes from the recommendation unless given;
        - a recommended ``horizon`` belongs to SIA's top-k entropy gate: other gates, and a
          ``head`` longer than it, steer whole answers; a horizon the user gives always stands.
        """
        rec = recommended_settings(recommendation)
        g = gate_of(gate) if gate is not None else rec.get("gate", "entropy")
        kwargs: dict[str, Any] = {**given, "gate": g}
        if "w" in rec:
            kwargs.setdefault("w", rec["w"])
        # a shift tau is calibrated for the w and head it was recommended with: another w or head
        # moves other shares of probability, so the ratio (calibrated for them) serves instead
        paper = cls()  # the settings a recommendation leaves out
        tau_fits = g != "shift" or all(given.get(name, rec.get(name, getattr(paper, name))) ==
                                       rec.get(name, getattr(paper, name)) for name in ("w", "value_head"))
        if g in TAU_GATES and "tau" not in given and "target_ratio" not in given:
            if "tau" in rec and g == rec.get("gate", "entropy") and tau_fits:
                kwargs["tau"] = rec["tau"]
            elif "target_ratio" in rec:
                kwargs["target_ratio"] = rec["target_ratio"]
        if g == "shift" and "tau" not in kwargs and "target_ratio" not in kwargs:
            raise ValueError("mode shift needs a tau (a share of probability in [0, 1], for example 0.5) or a "
                             "target ratio (for example 0.25); the value model recommends none for it at these "
                             "settings")
        if "horizon" not in given:
            kwargs["horizon"] = horizon_for_gate(g, rec.get("horizon"), None, head=given.get("head", 0))
        if "value_head" in rec:
            kwargs.setdefault("value_head", rec["value_head"])
        return cls(**kwargs)


# --------------------------------------------------------------------------- the string form
class SpecError(ValueError):
    """A steering spec that does not parse; the message shows the grammar."""


SPEC_SYNTAX = ("off, sparse[@TAU|@R%], full-entropy[@TAU|@R%], shift[@TAU|@R%], dense, random@P|@R%, bon@N, MODE+bon@N, "
               "MODE+head@N, MODE+follow@F, MODE+horizon@N")
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:e-?\d+)?"  # no "e+": "+" separates the suffixes


@dataclass(frozen=True)
class SpecParts:
    """A parsed string form, before defaults: what it says and nothing more. ``match`` holds the
    ``@MODE`` of ``random@MODE`` (eval only)."""

    gate: str
    tau: float | None = None
    target_ratio: float | None = None
    p: float | None = None
    match: str | None = None
    head: int = 0
    follow: float | None = None
    horizon: int | None = None
    bon: int = 1
    value_head: str | None = None  # "+candidate"

    def config(self, **settings: Any) -> SteeringConfig:
        """The config it stands for, with ``settings`` (k, w, temperature, ...) beside it."""
        if self.match is not None and "p" not in settings:
            raise SpecError(f"random@{self.match} takes its probability from another mode's measured rate")
        given = {k: v for k, v in (("tau", self.tau), ("target_ratio", self.target_ratio), ("p", self.p),
                                   ("value_head", self.value_head)) if v is not None}
        return SteeringConfig(gate=self.gate, head=self.head, follow=self.follow, horizon=self.horizon, bon=self.bon,
                              **{**given, **settings})


def _level(text: str, label: str) -> tuple[float | None, float | None]:
    """``0.8`` -> (value 0.8, None); ``30%`` -> (None, ratio 0.3)."""
    if re.fullmatch(_NUMBER + "%", text):
        ratio = _percent_value(text[:-1])
        if not 0.0 < ratio < 1.0:
            raise SpecError(f"mode {label!r}: a percentage must be strictly between 0% and 100%")
        return None, ratio
    if re.fullmatch("-?" + _NUMBER, text):  # a tau may be negative (every step a junction)
        return float(text), None
    raise SpecError(f"mode {label!r}: expected a number or a percentage after '@', got {text!r}")


def parse_spec_parts(text: str, *, allow_match: bool = False) -> SpecParts:
    """The string form, checked for its grammar (settings are checked when they become a config)."""
    label = text.strip().lower()
    if not label:
        raise SpecError("empty mode (two commas in a row?)")
    base = label
    suffixes: dict[str, str] = {}
    while "+" in base:  # each suffix at most once, in any order
        rest, _, suffix = base.rpartition("+")
        m = re.fullmatch(r"(bon|head|horizon)@(\d+)|(follow)@(" + _NUMBER + ")|(candidate)", suffix)
        if not m or not rest:
            raise SpecError(
                f"mode {label!r}: only '+bon@N', '+head@N', '+horizon@N', '+follow@F' and '+candidate' can follow "
                "a mode (for example sparse+bon@4, sparse@30%+head@3, sparse@1.2+horizon@16, sparse@20%+follow@0.5, "
                "sparse@1+candidate)"
            )
        key, value = ((m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4)) if m.group(3)
                      else ("candidate", ""))
        if key in suffixes:
            form = "+candidate" if key == "candidate" else f"+{key}@{'F' if key == 'follow' else 'N'}"
            raise SpecError(f"mode {label!r}: '{form}' is given twice")
        suffixes[key] = value
        base = rest
    bon, head = int(suffixes.get("bon", 1)), int(suffixes.get("head", 0))
    follow = float(suffixes["follow"]) if "follow" in suffixes else None
    horizon = int(suffixes["horizon"]) if "horizon" in suffixes else None
    if horizon is not None and horizon < 1:
        raise SpecError(f"mode {label!r}: '+horizon@N' takes N >= 1 tokens")
    if horizon is not None and head > horizon:
        raise SpecError(f"mode {label!r}: '+head@{head}' steers past '+horizon@{horizon}', which ends all steering")
    if follow is not None and not 0.0 < follow <= 1.0:
        raise SpecError(f"mode {label!r}: '+follow@F' takes a share of probability mass in (0, 1], got {follow:g}")
    if base.startswith("bon"):
        m = re.fullmatch(r"bon@(\d+)", base)
        if not m:
            raise SpecError(f"mode {label!r}: Best-of-N is written bon@N, for example bon@4")
        if "bon" in suffixes:
            raise SpecError(f"mode {label!r}: '+bon@N' is given twice")
        base, bon = "off", int(m.group(1))
    if not 1 <= bon <= MAX_BON:
        raise SpecError(f"mode {label!r}: Best-of-N takes N from 1 to {MAX_BON}")
    name, at, arg = base.partition("@")
    if at and not arg:
        raise SpecError(f"mode {label!r}: nothing follows '@'; give a setting ({name}@1.2, {name}@30%) or drop the '@'")
    gate = "entropy" if name == "entropy" else gate_of(name)
    kind = GATE_KINDS.get(gate)
    if kind is None:
        raise SpecError(f"unknown mode {label!r}; modes are {SPEC_SYNTAX}")
    if not kind.steers:
        for given, what in ((head, "'+head@N' steers the first tokens"), (horizon is not None,
                            "'+horizon@N' limits steering")):
            if given:
                raise SpecError(f"mode {label!r}: {what}, but '{name}' never steers")
    if follow is not None and kind.level is None:
        raise SpecError(f"mode {label!r}: '+follow@F' steers after a junction, but '{name}' "
                        + ("never steers" if not kind.steers else "steers every token already"))
    value_head = "candidate" if "candidate" in suffixes else None
    if value_head is not None and not kind.steers:
        raise SpecError(f"mode {label!r}: '+candidate' chooses how steering scores candidates, but '{name}' "
                        "never steers")
    parts = SpecParts(gate, head=head, follow=follow, horizon=horizon, bon=bon, value_head=value_head)
    if kind.level is None:
        if arg:
            raise SpecError(f"mode {label!r}: {name} takes no '@' setting")
        return parts
    if kind.level == "tau":
        if not arg and kind.statistic == "shift":  # tau 1 would steer nothing and score every token
            raise SpecError(f"mode {label!r}: shift needs a level: shift@0.5 (a share of probability) or shift@25%")
        if not arg:
            return parts
        tau, ratio = _level(arg, label)
        return replace(parts, tau=tau, target_ratio=ratio)
    if not arg:  # random
        raise SpecError(f"mode {label!r}: random needs a ratio: random@0.2 or random@20%"
                        + (" or random@sparse (the rate a sparse mode measured)" if allow_match else ""))
    if re.fullmatch("-" + _NUMBER + "%?", arg):
        raise SpecError(f"mode {label!r}: a probability must be between 0 and 1")
    if re.fullmatch(_NUMBER + "%?", arg):
        value, ratio = _level(arg, label)
        p = ratio if ratio is not None else value
        assert p is not None
        if not 0.0 <= p <= 1.0:
            raise SpecError(f"mode {label!r}: a probability must be between 0 and 1")
        return replace(parts, p=p)
    if not allow_match:
        raise SpecError(f"mode {label!r}: random takes a probability here (random@0.2 or random@20%)")
    parse_spec_parts(arg, allow_match=True)  # the named mode must at least be valid syntax
    return replace(parts, match=arg)


def parse_spec(text: str, **settings: Any) -> SteeringConfig:
    """The config of a string form, with ``settings`` (k, w, temperature, ...) beside it."""
    try:
        return parse_spec_parts(text).config(**settings)
    except SpecError:
        raise
    except ValueError as exc:
        raise SpecError(f"mode {text.strip()!r}: {exc}") from None


def _number_text(v: float) -> str:
    """The shortest text that reads back as exactly ``v`` (``1`` for 1.0)."""
    text = repr(float(v)).replace("e+", "e")
    return text.removesuffix(".0")


def _percent_text(ratio: float) -> str:
    """``ratio`` as a percentage that ``_percent_value`` reads back as exactly ``ratio``."""
    d = Decimal(repr(ratio)).scaleb(2).normalize()
    text = f"{d:f}" if abs(d.adjusted()) < 12 else str(d).lower()
    return text.replace("e+", "e")


def _percent_value(text: str) -> float:
    """A percentage's fraction, rounded once (so every fraction has a percentage that reads back)."""
    return float(Decimal(text) / 100)


def format_spec(config: SteeringConfig) -> str:
    """``config`` in the string form; ``parse_spec`` reads it back to an equal config."""
    kind = config.kind
    text = kind.mode
    if kind.level == "tau":
        text += f"@{_percent_text(config.target_ratio)}%" if config.target_ratio is not None \
            else f"@{_number_text(config.tau)}"
    elif kind.level == "p":
        text += f"@{_number_text(config.p)}"
    elif kind.gate == "off" and config.bon > 1:
        return f"bon@{config.bon}"
    # settings that do not apply to the mode (a head on off, follow on dense) are not written
    if config.head and kind.steers:
        text += f"+head@{config.head}"
    if config.follow is not None and kind.level is not None:
        text += f"+follow@{_number_text(config.follow)}"
    if config.horizon is not None and kind.steers:
        text += f"+horizon@{config.horizon}"
    if config.value_head != "scalar" and kind.steers:
        text += f"+{config.value_head}"
    if config.bon > 1:
        text += f"+bon@{config.bon}"
    return text


def level_for_gate(config: SteeringConfig, gate: str, recommendation: Mapping[str, Any]) -> dict[str, Any]:
    """The tau and target ratio to switch ``config`` to ``gate`` with (the chat's ``/mode``, a
    server request's ``sia_mode``; ``config`` holds the w and head the switch steers with): kept
    while the tau keeps its scale, else the recommendation's for ``gate`` at that w and head
    (``SteeringConfig.recommended``; ValueError if there is none), as a tau in nats means nothing to the shift gate
    and a share of probability nothing to an entropy. A config's tau is a share of probability
    iff its gate is ``shift`` (the gates without a tau hold one in nats, ready for ``sparse``)."""
    kind = GATE_KINDS.get(gate_of(gate))
    if kind is None or (kind.statistic == "shift") == (config.kind.statistic == "shift"):
        return {}
    return recommended_level(config, gate, recommendation)


def recommended_level(config: SteeringConfig, gate: str, recommendation: Mapping[str, Any]) -> dict[str, Any]:
    """The tau and target ratio ``recommendation`` gives ``gate`` at ``config``'s w and head; a
    gate without a tau gets the entropy gate's tau (the scale it holds one on) and no ratio."""
    kind = GATE_KINDS[gate_of(gate)]
    fresh = SteeringConfig.recommended(recommendation, gate=gate if kind.level == "tau" else "entropy",
                                       w=config.w, value_head=config.value_head)
    return {"tau": fresh.tau, "target_ratio": fresh.target_ratio if kind.level == "tau" else None}


def horizon_for_gate(gate: str, recommended: int | None, current: int | None, head: int = 0) -> int | None:
    """The horizon of ``gate`` (at start, after the chat's ``/mode``, for a server request) given a
    value model's ``recommended`` one: it belongs to SIA's entropy gate, so other gates steer whole
    answers, as does a ``head`` longer than it (the user's head wins). Without a recommendation,
    ``current`` (a horizon the user chose) stands whatever the gate."""
    if recommended is None:
        return current
    return recommended if gate_of(gate) == "entropy" and head <= recommended else None


def recommended_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check a value model's recommended settings (``RECOMMENDED`` names only) as the engine
    would, and return them; JSON's 16.0 for a whole number becomes 16. Raises ValueError."""
    unknown = sorted(set(values) - set(RECOMMENDED))
    if unknown:
        raise ValueError(f"unknown recommended steering setting(s) {', '.join(unknown)}: use {', '.join(RECOMMENDED)}")
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        s = _SETTING[name]
        if s.kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        s.validate(value, what="the recommended ")
        out[name] = value
    if "w" in out and out["w"] <= 0:
        raise ValueError(f"the recommended w must be > 0 (a strength that steers towards value), got {out['w']}")
    if "gate" in out:
        out["gate"] = gate_of(out["gate"])
        kind = GATE_KINDS[out["gate"]]
        if not kind.steers:
            raise ValueError(f"the recommended mode must steer, got {out['gate']!r}")
        if "tau" in out and kind.level != "tau":
            raise ValueError(f"a recommended tau needs a mode that has one; mode {kind.mode} has none")
        if "tau" in out:
            SteeringConfig(gate=out["gate"], tau=out["tau"])  # on its gate's scale (a shift tau is at most 1)
        if kind.statistic == "shift" and "tau" not in out and "target_ratio" not in out:
            raise ValueError("a value model that recommends mode shift must recommend its tau or a target ratio")
    if "horizon" in out and out.get("gate", "entropy") != "entropy":
        raise ValueError("a recommended horizon belongs to the top-k entropy gate (sparse); a value model that "
                         f"recommends mode {mode_name(out['gate'])} cannot recommend one")
    if "tau" in out and "target_ratio" in out and "gate" not in out:
        raise ValueError("a value model recommends a tau or a target ratio, not both: they set the same threshold "
                         "(both only beside a recommended mode: the tau for that mode, the ratio for the others)")
    if out.get("horizon") == 0:
        raise ValueError("the recommended horizon must be a whole number of tokens >= 1, got 0")
    return out
