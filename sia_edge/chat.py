"""``python -m sia_edge.chat``: talk to a steered model in the terminal, or answer one prompt.

Interactive by default; ``--prompt TEXT`` answers once (``--json`` for scripts). Junction tokens,
where the value model steered, are highlighted: in colour on a terminal, as ``[[token]]`` when
the output is piped (``--highlight`` chooses).
"""

from __future__ import annotations

from sia_edge import _early_sigint  # noqa: F401  (first: a Ctrl-C while the imports below run exits quietly)

# isort: split
import argparse
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import IO, Any, TextIO

from sia_edge.cli_common import (
    CliError,
    CliParser,
    ValueModelChoice,
    add_model_options,
    add_steering_options,
    base_model_path,
    build_engine,
    choose_value_model,
    gate_horizon,
    new_seed,
    recommended_horizon,
    run_cli,
    stats_payload,
    steering_config,
    undecodable_text,
)
from sia_edge.steering import (
    GATE_KINDS,
    MAX_SEED,
    MODES,
    SpecParts,
    SteeringConfig,
    gate_of,
    parse_spec_parts,
    recommended_level,
)

__all__ = ["ChatSession", "Highlighter", "main"]

PROG = "sia-edge chat"
COMMANDS_HELP = """\
commands:
  /stats               steering statistics of the last answer and of the session
  /tau X               set the threshold (nats for sparse: steer where entropy >= X; a share of
                       probability for shift)
  /mode off|sparse|dense   switch steering (also full-entropy, random, shift; a level may
                       follow: /mode shift@0.5, /mode sparse@25%)
  /reset               forget the conversation
  /help                this list
  /quit                leave (also Ctrl-D; Ctrl-C stops an answer)"""

EPILOG = f"""\
{COMMANDS_HELP}

junction tokens (where the value model steered) are shown in colour on a terminal and as
[[token]] when the output is not a terminal; --highlight chooses, NO_COLOR turns colour off.
Notices go to stderr, answers to stdout. Exit code 2 on a wrong option, a missing or invalid
model file, or a prompt that does not fit the context.
"""


# --------------------------------------------------------------------------- highlighting
@dataclass(frozen=True)
class Highlighter:
    """How junction tokens are marked: ``color`` (ANSI), ``brackets`` ([[token]]) or ``none``."""

    style: str = "brackets"
    COLOR_ON = "\x1b[1;33m"
    COLOR_OFF = "\x1b[0m"

    def junction(self, text: str) -> str:
        if not text or self.style == "none":
            return text
        if self.style == "color":
            return f"{self.COLOR_ON}{text}{self.COLOR_OFF}"
        return f"[[{text}]]"

    @classmethod
    def for_stream(cls, choice: str, stream: IO[str], *, piped_default: str) -> Highlighter:
        """``auto``: colour on a terminal (brackets if NO_COLOR is set), ``piped_default`` otherwise."""
        if choice != "auto":
            return cls(choice)
        if getattr(stream, "isatty", lambda: False)():
            return cls("brackets" if os.environ.get("NO_COLOR") else "color")
        return cls(piped_default)


# --------------------------------------------------------------------------- Ctrl-C
@contextmanager
def _interrupt_cancels(gen: Any) -> Iterator[None]:
    """While an answer streams, Ctrl-C cancels it (after the current token); a second Ctrl-C
    interrupts at once. Outside an answer Ctrl-C keeps its usual meaning."""
    if not _in_main_thread():
        yield
        return
    pressed = [0]

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        pressed[0] += 1
        if pressed[0] > 1:
            raise KeyboardInterrupt
        gen.cancel()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------- the session
@dataclass
class _Totals:
    answers: int = 0
    tokens: int = 0
    junctions: int = 0
    total_ms: float = 0.0


@dataclass
class ChatSession:
    """A multi-turn conversation over one engine: history, settings, and the commands."""

    engine: Any
    config: SteeringConfig
    max_tokens: int
    value_model: bool
    seed: int | None = None
    system: str | None = None
    completion: bool = False  # the base model has no chat template: each line is a plain prompt
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    highlight: Highlighter = field(default_factory=Highlighter)
    history: list[dict[str, str]] = field(default_factory=list)
    last: Any = None  # GenerationStats of the last answer
    last_seed: int | None = None
    totals: _Totals = field(default_factory=_Totals)
    turn: int = 0
    recommended_horizon: int | None = None  # the value model's, for the entropy gate (cli_common.gate_horizon)
    levels: dict[bool, dict[str, Any]] = field(default_factory=dict)  # the last level per scale (shift?), for /mode

    def __post_init__(self) -> None:
        self._remember(self.config)  # the level the session started with (--tau, or the recommendation)

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    # ------------------------------------------------------------- commands
    def command(self, line: str) -> bool:
        """Run one ``/command``; False means leave."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            print(COMMANDS_HELP, file=self.out, flush=True)
        elif name == "stats":
            print(self.stats_text(), file=self.out, flush=True)
        elif name == "reset":
            self.history.clear()
            print("(conversation cleared)", file=self.out, flush=True)
        elif name == "tau":
            self._set(arg, "tau")
        elif name == "mode":
            self._set(arg, "mode")
        else:
            self.note(f"unknown command /{name}; /help lists them")
        return True

    def _set(self, arg: str, what: str) -> None:
        try:
            if what == "tau":
                try:
                    tau = float(arg)
                except ValueError:
                    raise ValueError(f"/tau needs a number, got {arg!r}") from None
                new = replace(self.config, tau=tau, target_ratio=None)
                self._remember(new)
            else:
                new = self._switched(arg)
            if new.target_ratio is not None and new.steers:  # measured once, as at start, then cached
                self.note(f"(calibrating tau for {new.target_ratio:.0%} junctions)")
                new = new.with_tau(self.engine.calibrate_tau(new))
        except ValueError as exc:
            self.note(f"error: {exc}")
            return
        self.config = new
        print(f"({self.settings_text()})", file=self.out, flush=True)

    def _switched(self, arg: str) -> SteeringConfig:
        """The config after ``/mode MODE[@LEVEL]``. Without a level, the gate takes the level its
        scale last had in this session (a tau in nats for the entropy gates, which dense, off and
        random hold too; a share of probability for shift), else the value model's recommendation."""
        if not arg:
            raise ValueError(f"/mode needs one of {', '.join(MODES)} (a level may follow: shift@0.5, sparse@25%)")
        name = arg.strip().lower()  # a bare mode takes its level below; the string form needs one for shift
        parts = SpecParts(gate_of(name)) if gate_of(name) in GATE_KINDS else parse_spec_parts(arg)
        if (parts.head or parts.follow is not None or parts.horizon is not None or parts.bon != 1
                or parts.value_head is not None):
            raise ValueError("/mode takes MODE or MODE@LEVEL (for example shift@0.5 or sparse@25%); the other settings "
                             "are command-line options")
        kind = GATE_KINDS[parts.gate]
        if kind.steers and not self.value_model:
            raise ValueError(f"mode {kind.mode} needs a value model; restart with --value-model PATH.gguf")
        if self.config.kind.level == "tau":  # remembered for a switch back to its scale
            self._remember(self.config)
        scale = kind.statistic == "shift"
        level: dict[str, Any]
        if parts.tau is not None or parts.target_ratio is not None:
            level = {"tau": self.config.tau if parts.tau is None else parts.tau, "target_ratio": parts.target_ratio}
        elif scale in self.levels:
            level = dict(self.levels[scale])
        else:
            rec = self.engine.value.meta.recommended_steering() if self.engine.value is not None else {}
            try:
                level = recommended_level(self.config, parts.gate, rec)
            except ValueError as exc:
                raise ValueError(f"{exc}: write /mode {kind.mode}@0.5 or /mode {kind.mode}@25%") from None
        if kind.level != "tau":
            level["target_ratio"] = None
        return replace(self.config, gate=parts.gate, **level,
                       horizon=gate_horizon(parts.gate, self.recommended_horizon, self.config.horizon,
                                            head=self.config.head))

    def _remember(self, config: SteeringConfig) -> None:
        self.levels[config.kind.statistic == "shift"] = {"tau": config.tau, "target_ratio": config.target_ratio}

    def settings_text(self) -> str:
        return settings_text(self.config)

    def stats_text(self) -> str:
        lines = [f"settings: {self.settings_text()}"]
        if self.last is None:
            lines.append("no answer yet")
        else:
            s = self.last
            lines.append(
                f"last answer: {s.tokens} tokens, {s.junctions} junctions ({s.intervention_rate:.1%}), "
                f"{s.ms_per_token:.1f} ms/token, stop {s.stop_reason}, seed {self.last_seed}"
            )
            t = self.totals
            rate = t.junctions / t.tokens if t.tokens else 0.0
            ms = t.total_ms / t.tokens if t.tokens else 0.0
            lines.append(
                f"session: {t.answers} answer{'s' if t.answers != 1 else ''}, {t.tokens} tokens, {t.junctions} junctions ({rate:.1%}), "
                f"{ms:.1f} ms/token"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------- answering
    def _prompt(self, text: str) -> str | list[dict[str, str]] | None:
        """What to generate from: the history fitted into the context, or None if it cannot fit."""
        if self.completion:
            return text
        self.history.append({"role": "user", "content": text})
        system = [{"role": "system", "content": self.system}] if self.system else []
        n_ctx = self.engine.n_ctx
        reserve = min(self.max_tokens, n_ctx // 4)
        dropped = 0
        while True:
            n = len(self.engine.chat_prompt(system + self.history))
            if n + reserve <= n_ctx or len(self.history) == 1:
                break
            del self.history[:2]  # the oldest user turn and its answer
            dropped += 1
        if dropped:
            self.note(f"(the context holds {n_ctx} tokens: forgot the {dropped} oldest "
                      f"turn{'s' if dropped > 1 else ''} to make room)")
        if n >= n_ctx:
            self.history.pop()
            self.note(f"(your message is {n} tokens but the context holds {n_ctx}: shorten it)")
            return None
        return system + self.history

    def ask(self, text: str) -> Any:
        """Stream one answer to ``out``; returns its stats (None if nothing was generated)."""
        prompt = self._prompt(text)
        if prompt is None:
            return None
        seed = (self.seed + self.turn) & MAX_SEED if self.seed is not None else new_seed()
        self.turn += 1
        try:
            gen = self.engine.generate(prompt, max_tokens=self.max_tokens, config=self.config, seed=seed)
        except ValueError:
            if not self.completion:
                self.history.pop()
            raise
        streamed: list[str] = []
        interrupted = False
        try:
            with gen, _interrupt_cancels(gen):
                for ev in gen:
                    piece = self.highlight.junction(ev.text) if ev.junction else ev.text
                    streamed.append(ev.text)
                    self.out.write(piece)
                    self.out.flush()
        except KeyboardInterrupt:
            interrupted = True
        tail = gen.text[len("".join(streamed)):]  # bytes the stream decoder held back at the end
        self.out.write(tail + "\n")
        self.out.flush()
        st = gen.stats
        if interrupted or st.stop_reason == "cancelled":
            self.note("(stopped)")
        elif st.stop_reason == "context":
            self.note(f"(the answer reached the end of the {self.engine.n_ctx}-token context; older turns "
                      "will be forgotten to make room, or /reset)")
        elif st.stop_reason == "length":
            self.note(f"(stopped at --max-tokens {self.max_tokens})")
        if not self.completion:
            if gen.text.strip():
                self.history.append({"role": "assistant", "content": gen.text})
            else:
                self.history.pop()  # nothing was said: forget the question too
        self.last, self.last_seed = st, seed
        self.totals.answers += 1
        self.totals.tokens += st.tokens
        self.totals.junctions += st.junctions
        self.totals.total_ms += st.total_ms
        return st

    # ------------------------------------------------------------- the loop
    def repl(self, stdin: TextIO) -> int:
        interactive = stdin.isatty()
        while True:
            try:
                line = input("> ") if interactive and stdin is sys.stdin else stdin.readline()
            except EOFError:
                line = ""
            except KeyboardInterrupt:
                print(file=self.out)
                return 0
            if not line:
                if interactive:
                    print(file=self.out)
                return 0  # end of input
            line = line.strip()
            if not line:
                continue
            problem = undecodable_text(line)
            if problem:  # before anything joins the history: one bad line must not spoil the next
                self.note(f"error: {problem}")
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            try:
                self.ask(line)
            except ValueError as exc:  # e.g. a plain-text prompt longer than the context
                self.note(f"error: {exc}")


# --------------------------------------------------------------------------- main
def build_parser() -> CliParser:
    p = CliParser(
        prog=PROG,
        description="Chat with a base model steered by a value model (Sparse Inference-time Alignment).\n"
                    "Interactive unless --prompt is given.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prompt", metavar="TEXT", help="answer this one prompt and exit ('-' reads it from stdin)")
    p.add_argument("--json", action="store_true",
                   help='with --prompt: print one JSON object {"text": ..., "stats": {"tokens", "junctions", '
                        '"intervention_rate", "ms_per_token", ...}}')
    p.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")
    p.add_argument("--completion", action="store_true",
                   help="use the text as a plain prompt, without the chat template (base models)")
    p.add_argument("--highlight", choices=("auto", "color", "brackets", "none"), default="auto",
                   help="how to mark junction tokens: auto = colour on a terminal; when piped, [[token]] "
                        "in the interactive chat and nothing with --prompt (default: %(default)s)")
    add_model_options(p)
    add_steering_options(p, max_tokens=512)
    return p


def settings_text(c: SteeringConfig) -> str:
    """The steering settings as the chat shows them (at start, after /mode and /tau)."""
    return c.describe()


def _describe(engine: Any, choice: ValueModelChoice, config: SteeringConfig) -> str:
    value = engine.value.name if engine.value is not None else "none"
    return f"base model {engine.base.path.name}, value model {value}; {settings_text(config)}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json and args.prompt is None:
        raise CliError("--json needs --prompt")
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    if prompt is not None and not prompt.strip():
        raise CliError("the prompt is empty")
    for option, text in (("--prompt", prompt), ("--system", args.system)):
        problem = undecodable_text(text) if text is not None else None
        if problem:  # before loading: an interactive chat would otherwise fail every turn
            raise CliError(f"{option}: {problem}")
    base = base_model_path(args.model, args.preset)
    choice = choose_value_model(args.value_model, base, needed=args.mode != "off", preset=args.preset)
    config = steering_config(args, choice)  # wrong settings fail before loading
    if choice.notice:
        print(f"note: {choice.notice}", file=sys.stderr, flush=True)
    engine = build_engine(args, base, choice)
    if config.target_ratio is not None:
        if prompt is None and engine.cached_tau(config) is None:
            print(f"note: measuring tau for target ratio {config.target_ratio:g} (once per model; cached)",
                  file=sys.stderr, flush=True)
        config = config.with_tau(engine.calibrate_tau(config))
    completion = args.completion or (args.preset is not None and args.preset.prompt_style == "text")
    if not completion and not engine.base.chat_template:
        completion = True
        print(f"note: {engine.base.path.name} has no chat template; each prompt is completed as plain text",
              file=sys.stderr, flush=True)

    if prompt is not None:
        return _one_shot(engine, config, prompt, args, completion)

    session = ChatSession(
        engine, config, max_tokens=args.max_tokens, value_model=choice.available, seed=args.seed,
        system=args.system, completion=completion, recommended_horizon=recommended_horizon(args, choice),
        highlight=Highlighter.for_stream(args.highlight, sys.stdout, piped_default="brackets"),
    )
    interactive = sys.stdin.isatty()
    print(f"sia-edge chat: {_describe(engine, choice, config)}", file=sys.stderr, flush=True)
    if interactive:
        print("type a message, /help for commands, Ctrl-C stops an answer, /quit or Ctrl-D leaves",
              file=sys.stderr, flush=True)
    return session.repl(sys.stdin)


def _one_shot(engine: Any, config: SteeringConfig, prompt: str, args: argparse.Namespace, completion: bool) -> int:
    seed = args.seed if args.seed is not None else new_seed()
    messages: str | list[dict[str, str]]
    if completion:
        messages = prompt
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
    gen = engine.generate(messages, max_tokens=args.max_tokens, config=config, seed=seed)
    if args.json:
        with gen, _interrupt_cancels(gen):
            for _ in gen:
                pass
        payload: dict[str, Any] = {"text": gen.text, "stats": stats_payload(gen.stats, config, seed)}
        print(json.dumps(payload, ensure_ascii=False), flush=True)
        return 0
    highlight = Highlighter.for_stream(args.highlight, sys.stdout, piped_default="none")
    streamed = 0
    with gen, _interrupt_cancels(gen):
        for ev in gen:
            streamed += len(ev.text)
            sys.stdout.write(highlight.junction(ev.text) if ev.junction else ev.text)
            sys.stdout.flush()
    sys.stdout.write(gen.text[streamed:] + "\n")
    sys.stdout.flush()
    if gen.stats.stop_reason == "cancelled":
        print("(stopped)", file=sys.stderr)
    return 0


def _entry() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(_entry())
