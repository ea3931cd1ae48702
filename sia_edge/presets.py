"""Presets: a named pair of models plus what they were evaluated with.

=================  ====================================  =============================================
preset             base model                            value model (built from sia_edge/assets/ on first use)
=================  ====================================  =============================================
smollm2-safety     SmolLM2-135M-Instruct (chat), Q4_1     safety: refuse harmful requests, answer benign
                                                         ones; all 30 of SmolLM2's layers
smollm2-safety-    the same                              the same objective with no layers of its own:
fast                                                     a candidate head on the base model's hidden
                                                         state, learnt from smollm2-safety's values; a
                                                         junction decodes nothing
gemma3-detox       Gemma-3-270M base (no chat template),  non-toxic continuations of text; a backbone
                   Q4_K_M                                 shallower than the base (weak-to-strong)
gemma3-detox-      the same                              the same objective with no layers of its own:
fast                                                     a candidate head on the base model's hidden
                                                         state, learnt from gemma3-detox's values;
                                                         steers with the shift gate, which reads them
=================  ====================================  =============================================

The steering settings a preset was evaluated with live in its value GGUF (``sia.steering.*``);
its judge (the eval reward) and prompt style (chat turns or text to continue) live here. The
chat, the server, eval (``--preset NAME``) and the Python API (``SteeringEngine.from_preset``)
all read them from this one table. Where the numbers come from: docs/RESULTS.md (smollm2-safety)
and docs/results/gemma3-detox.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sia_edge.models import (
    ModelNotFoundError,
    check_cache_dir,
    default_base_model,
    gemma3_base_model,
    models_dir,
)

__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset", "assets_digest", "build_value_model", "get_preset", "stamp_path"]


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    base_model: Callable[[], Path]  # finds (or assembles) the base GGUF; ModelNotFoundError says how to get it
    assets: str  # folder under sia_edge/assets/: the trained adapter, head and metadata
    reward: str  # what eval judges answers with (sia_edge.rewards.load_reward)
    prompt_style: str  # "chat": requests in the chat template; "text": prefixes continued as text

    @property
    def assets_dir(self) -> Path:
        return assets_root() / self.assets

    @property
    def value_path(self) -> Path:
        """Where the preset's value GGUF is built (q8_0, as evaluated)."""
        return models_dir() / f"{self.assets}-q8_0.gguf"

    def is_built(self) -> bool:
        stamp = stamp_path(self.value_path)
        return (self.value_path.is_file() and stamp.is_file()
                and stamp.read_text().strip() == assets_digest(self.assets_dir))

    def fits(self, base: Path) -> bool:
        """Whether the value model (built or not) was trained on ``base``'s tokenizer, from the
        fingerprint its assets record; True when they record none or are missing."""
        meta = self.assets_dir / "value_meta.json"
        try:
            recorded = json.loads(meta.read_text(encoding="utf-8")).get("tokenizer_fingerprint")
        except (OSError, ValueError, AttributeError):
            return True  # value_model() will say what is wrong with the assets
        if not recorded:
            return True
        from sia_edge.value_format import fingerprint_from_gguf

        return bool(recorded == fingerprint_from_gguf(base))

    def value_model(self, *, build: bool = True) -> Path:
        """The value GGUF, built from the preset's assets first if it is missing or older than them."""
        if self.is_built():
            return self.value_path
        if not (self.assets_dir / "value_meta.json").is_file():
            raise ModelNotFoundError(f"preset {self.name}: its trained value model is not in {self.assets_dir} "
                                     "(see docs/TRAINING.md for how to train it)")
        if not build:
            raise ModelNotFoundError(f"preset {self.name}: the value model {self.value_path} has not been built "
                                     "from its assets yet: its first use builds it (SteeringEngine.from_preset, sia-edge chat --preset)")
        return build_value_model(self)


def assets_root() -> Path:
    """Where presets' trained artefacts are: ``$SIA_EDGE_ASSETS``, else ``sia_edge/assets/`` (package
    data: they install with the package)."""
    return Path(os.environ.get("SIA_EDGE_ASSETS") or Path(__file__).resolve().parent / "assets")


def assets_digest(folder: Path) -> str:
    """What a preset's shipped artefacts are: a GGUF built from other assets is out of date."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def stamp_path(target: Path) -> Path:
    """The digest of the assets a value GGUF was built from, beside it."""
    return target.with_name(target.name + ".assets-sha256")


def build_value_model(preset: Preset, *, log: Callable[[str], None] | None = None) -> Path:
    """Merge the preset's adapter into its base model and write the q8_0 value GGUF, with numpy
    (``sia_edge.train.merge``: no torch needed). Atomic: a killed build leaves no file that counts
    as built (the GGUF is renamed into place, and the digest stamp is written after it)."""
    from sia_edge.train import TrainError
    from sia_edge.train.merge import build_value_gguf

    say = log or _progress(preset)
    target = preset.value_path
    check_cache_dir(target.parent)
    say(f"building {target.name} from {preset.assets_dir} (once)")
    try:
        build_value_gguf(preset.assets_dir, target, backbone=preset.base_model(), log=say,
                         progress=_bar(preset) if log is None else None)
    except TrainError as exc:
        raise ModelNotFoundError(f"preset {preset.name}: its value model could not be built: {exc}") from None
    stamp = stamp_path(target)
    tmp = stamp.with_name(stamp.name + ".tmp")
    tmp.write_text(assets_digest(preset.assets_dir) + "\n")
    os.replace(tmp, stamp)
    say(f"built {target}")
    return target


def _progress(preset: Preset) -> Callable[[str], None]:
    """Build steps as lines on stderr, numbered, so a first use that takes a while shows it moving."""
    step = [0]

    def say(text: str) -> None:
        step[0] += 1
        print(f"[{preset.name} {step[0]}] {text}", file=sys.stderr, flush=True)

    return say


def _bar(preset: Preset) -> Callable[[int, int], None]:
    """A progress bar on stderr for the merge (redrawn in place on a terminal, one line at the end
    otherwise)."""
    tty = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        if tty:
            filled = 30 * done // total
            print(f"\r[{preset.name}] [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} tensors",
                  end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == total:
            print(f"[{preset.name}] merged {total} tensors", file=sys.stderr, flush=True)

    return show


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("smollm2-safety", "SmolLM2-135M-Instruct steered to refuse harmful requests", default_base_model,
           "value-smollm2-safety", "safety", "chat"),
    Preset("smollm2-safety-fast", "SmolLM2-135M-Instruct steered to refuse harmful requests by a candidate head on "
           "its own hidden state (no value-model forward)", default_base_model, "value-smollm2-safety-fast", "safety",
           "chat"),
    Preset("gemma3-detox", "Gemma-3-270M (base) steered away from toxic continuations by a shallower value model",
           gemma3_base_model, "value-gemma3-detox", "nontoxicity", "text"),
    Preset("gemma3-detox-fast", "Gemma-3-270M (base) steered away from toxic continuations by a candidate head on "
           "its own hidden state (no value-model forward)", gemma3_base_model, "value-gemma3-detox-fast",
           "nontoxicity", "text"),
)}
DEFAULT_PRESET = "smollm2-safety"


def get_preset(name: str) -> Preset:
    preset = PRESETS.get(name)
    if preset is None:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return preset
