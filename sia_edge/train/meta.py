"""What a trained value model carries besides tensors (``value_meta.json``), and the files it
is made of. No torch: building a value GGUF from shipped adapter assets (``sia_edge.train.merge``)
reads these on an inference-only install."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sia_edge.train import TrainError
from sia_edge.value_format import (
    HIDDEN_STATE_BASE,
    HIDDEN_STATE_FINAL_NORM,
    CandidateHeadMeta,
    ValueHeadMeta,
    check_recommended_steering,
)

__all__ = ["ADAPTER_FILES", "CANDIDATE_FILE", "HEAD_FILE", "META_FILE", "STEERING_KEYS", "LoraSettings", "ValueMeta", "check_steering",
           "merge_steering", "value_gguf_name"]

META_FILE = "value_meta.json"
HEAD_FILE = "value_head.safetensors"
CANDIDATE_FILE = "candidate_head.safetensors"  # optional: the candidate head (train/candidate.py)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
META_VERSION = 1
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.targets:
            raise TrainError(f"bad LoRA settings {self}: need r >= 1, alpha > 0, 0 <= dropout < 1, targets")


@dataclass
class ValueMeta:
    """Everything besides tensors that a trained value model carries (``value_meta.json``)."""

    backbone: str  # GGUF file or HF directory the LoRA was trained on
    tokenizer_fingerprint: str
    hidden_size: int
    reward_mean: float = 0.0
    reward_std: float = 1.0
    reward_name: str = ""
    base_model: str = ""  # the base model the values were trained for (from the data)
    lora: dict[str, Any] = field(default_factory=dict)
    layers: int | None = None  # decoder layers kept from the backbone (None: all of them; 0: none, it
    # reads the base model's own hidden state: no adapter, only heads)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # Recommended steering settings (STEERING_KEYS), written into the GGUF as sia.steering.*
    steering: dict[str, Any] = field(default_factory=dict)
    version: int = META_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> ValueMeta:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise TrainError(f"{path.parent}: not a trained value model ({META_FILE} missing)") from None
        except (OSError, ValueError) as exc:
            raise TrainError(f"{path}: unreadable ({exc})") from None
        if not isinstance(raw, dict) or raw.get("version", 0) > META_VERSION:
            raise TrainError(f"{path}: unsupported value-model metadata (version {raw.get('version')!r})")
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise TrainError(f"{path}: incomplete value-model metadata ({exc})") from None

    @property
    def reads_base(self) -> bool:
        return self.layers == 0

    def head_meta(self, weight: Any, bias: float, objective: str | None = None,
                  steering: dict[str, Any] | None = None, candidate: CandidateHeadMeta | None = None) -> ValueHeadMeta:
        """The ``sia.*`` GGUF metadata for this model (the engine's one definition); ``steering``
        replaces the recommended settings of ``value_meta.json``."""
        chosen = check_steering(self.steering if steering is None else steering)
        return ValueHeadMeta(
            weight=weight, bias=bias, reward_mean=self.reward_mean, reward_std=self.reward_std,
            tokenizer_fingerprint=self.tokenizer_fingerprint, base_model=self.base_model,
            objective=objective if objective is not None else self.reward_name,
            steering_w=chosen.get("w"), steering_target_ratio=chosen.get("target_ratio"),
            steering_tau=chosen.get("tau"), steering_horizon=chosen.get("horizon"),
            steering_value_head=chosen.get("value_head"), steering_gate=chosen.get("gate"), candidate=candidate,
            hidden_state=HIDDEN_STATE_BASE if self.reads_base else HIDDEN_STATE_FINAL_NORM,
        )


STEERING_KEYS = ("w", "target_ratio", "tau", "horizon", "value_head", "gate")


def merge_steering(recorded: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``value_meta.json``'s recommended steering with the export's ``--steering-*`` options
    ``given`` winning, each threshold kept on its mode's scale: a tau without a mode is the entropy
    gate's (a recorded mode goes); a new mode without a tau drops the old mode's tau; a target
    ratio replaces the entropy gate's tau, but stands beside another mode's (it serves the other
    modes). ``horizon`` 0 drops the recommendation. Checked when the GGUF is written."""
    from sia_edge.steering import gate_of

    steering = dict(recorded)
    if "tau" in given and "gate" not in given:
        steering.pop("gate", None)
    if "gate" in given and "tau" not in given and \
            gate_of(str(steering.get("gate", "entropy"))) != gate_of(str(given["gate"])):
        steering.pop("tau", None)
    steering.update(given)
    gate = gate_of(str(steering.get("gate", "entropy")))
    if "tau" in given and "target_ratio" not in given and gate == "entropy":
        steering.pop("target_ratio", None)
    if "target_ratio" in given and "tau" not in given and gate == "entropy":
        steering.pop("tau", None)
    if steering.get("horizon") == 0:
        del steering["horizon"]
    return steering


def check_steering(steering: dict[str, Any]) -> dict[str, Any]:
    """Recommended steering settings (``w``, ``target_ratio`` or ``tau``, ``horizon``,
    ``value_head``, ``gate``) that the engine accepts, or an error."""
    unknown = sorted(set(steering) - set(STEERING_KEYS))
    if unknown:
        raise TrainError(f"unknown recommended steering setting(s) {', '.join(unknown)}: use {', '.join(STEERING_KEYS)}")
    horizon = steering.get("horizon")
    if isinstance(horizon, float) and horizon.is_integer():  # JSON may spell 16 as 16.0
        steering = {**steering, "horizon": int(horizon)}
    check_recommended_steering(steering.get("w"), steering.get("target_ratio"), steering.get("tau"),
                               steering.get("horizon"), steering.get("value_head"), steering.get("gate"))
    return steering


def value_gguf_name(meta: ValueMeta, base: Path) -> str:
    """The general.name of a value GGUF (what llama.cpp prints when it loads it)."""
    return f"sia-edge value model ({meta.reward_name or 'custom'}) for {meta.base_model or base.stem}"
