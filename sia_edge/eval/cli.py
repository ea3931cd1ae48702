"""``python -m sia_edge.eval``'s command line: options, checks made before any model loads, and
the summary it prints and writes."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sia_edge.cli_common import (
    CliError,
    CliParser,
    add_model_options,
    finite_float,
    positive_int,
    seed_int,
)
from sia_edge.eval.modes import DEFAULT_MODES, MODE_SYNTAX, parse_modes
from sia_edge.eval.prompt_sets import PromptSet, load_prompt_set, load_prompt_sets, unlabelled_files
from sia_edge.eval.records import PROG, run_settings
from sia_edge.eval.report import format_table, machine_info, plot_summary
from sia_edge.eval.resume import read_resumable
from sia_edge.eval.runner import DEFAULT_MAX_TOKENS, evaluate
from sia_edge.steering import TAU_GATES, SteeringConfig

if TYPE_CHECKING:
    from sia_edge.engine import SteeringEngine

__all__ = ["EPILOG", "build_parser", "main"]


class _AddPromptFiles(argparse.Action):
    """--prompts / --harmful / --benign FILE...: one ordered list of (path, harmful flag)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        flag = {"--harmful": True, "--benign": False}.get(option_string or "")
        files = list(getattr(namespace, self.dest) or [])
        files.extend((v, flag) for v in values)
        setattr(namespace, self.dest, files)


EPILOG = f"""\
modes (comma list): {MODE_SYNTAX}
  sparse@0.8   entropy gate at tau 0.8 nats      sparse@30%      tau calibrated for 30% junctions
  random@0.2   steer with probability 0.2        random@sparse   probability = sparse's measured rate, per set
  bon@4        best of 4 unsteered samples by mean value V   sparse+bon@4   best of 4 steered samples
  shift@25%+candidate   the value-aware gate: steer where steering would move the most probability
               (scores every token: for a candidate head on the base model's state); with
               --calibration-prompts FILE, 25% is a quarter of the tokens of FILE's continuations

prompt files: .jsonl rows {{"prompt": ..., "harmful": true|false}} or one prompt per line; --harmful
and --benign FILE set the flag of rows that have none (plain-text files need them for the safety
reward). Example, the held-out sets:
  {PROG} --prompts data/prompts/harmful_heldout.jsonl data/prompts/benign_heldout.jsonl \\
      --modes off,sparse,sparse@30%,dense,random@sparse,bon@4,sparse+bon@4 \\
      --outputs runs/heldout.jsonl --json runs/heldout.json --plot runs/heldout.png

An interrupted run continues with the same command plus --resume: the answers already in --outputs
are kept (after a check that they were written with the same settings), the rest are generated.

Exit code 2 on a bad option, a missing or empty prompt file, a mode that does not parse, or a
missing model.
"""


def build_parser() -> CliParser:
    ap = CliParser(prog=PROG, description="Compare steering modes on prompt sets: reward, refusals, "
                   "intervention rate, cost and drift.", epilog=EPILOG,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("prompts")
    for opt, what in (("--prompts", "prompt files (.jsonl or text, one prompt per line)"),
                      ("--harmful", "prompt files whose prompts are harmful"),
                      ("--benign", "prompt files whose prompts are benign")):
        g.add_argument(opt, dest="files", nargs="+", action=_AddPromptFiles, metavar="FILE", help=what)
    g.add_argument("--limit", type=positive_int, metavar="N", help="use the first N prompts of each file")
    g.add_argument("--by-source", action="store_true", help="also summarise each row 'source' separately")
    g.add_argument("--prompt-style", choices=("auto", "chat", "text"), default="auto",
                   help="chat: each prompt is a user turn in the base model's chat template; text: it is "
                        "continued as plain text (base models); auto: the preset's, else chat if the model "
                        "has a template (default: %(default)s)")
    g = ap.add_argument_group("modes and sampling")
    g.add_argument("--modes", default=DEFAULT_MODES, help="comma list of modes (default: %(default)s)")
    g.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help="longest answer in tokens (default: %(default)s)")
    g.add_argument("--seed", type=seed_int, default=0, help="base seed; each prompt gets its own, the same in every mode "
                   "(default: %(default)s)")
    g.add_argument("--calibration-prompts", metavar="FILE",
                   help="calibrate the modes' target ratios (sparse@25%%, shift@25%%) on these prompts, continued "
                        "unsteered for --max-tokens in the run's prompt style, instead of the built-in ones: a "
                        "task's own training prompts, so that 25%% means a quarter of its tokens (none may be "
                        "an evaluated prompt)")
    g.add_argument("--k", type=positive_int, default=10, help="candidates per step (default: %(default)s)")
    g.add_argument("--w", type=finite_float, default=None,
                   help="steering strength (default: the value model's recommendation, else 1.0)")
    g.add_argument("--temperature", type=finite_float, default=1.0, help="sampling temperature (default: %(default)s)")
    g.add_argument("--reward", default=None, help="safety or nontoxicity (built in), or a spec of "
                   "sia_edge.rewards.load_reward: module:function, file.py:function, jsonl:LABELS, hf:DIR "
                   "(default: the preset's, else safety)")
    add_model_options(ap)
    g = ap.add_argument_group("output")
    g.add_argument("--outputs", metavar="FILE.jsonl", help="write every answer (prompt, set, mode, text, stats)")
    g.add_argument("--resume", action="store_true",
                   help="keep the answers already in --outputs (an interrupted run with the same settings) and "
                        "generate only the missing ones")
    g.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the summary as JSON to FILE (or stdout without FILE)")
    g.add_argument("--plot", metavar="FILE.png", help="plot reward and refusal rate against intervention rate "
                   "and ms per token")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap

def _prepare_output(path: str | None, what: str) -> None:
    """Create the output's directory now, so a bad path fails before hours of generation."""
    if path is None or path == "-":
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise CliError(f"{what}: {p} is a directory; give a file name")
    if what == "--plot":
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if p.suffix.lower().lstrip(".") not in formats:
            raise CliError(f"--plot: {p.name} is not an image file name; end it with one of "
                           f"{', '.join('.' + f for f in sorted(formats))} (for example results.png)")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"{what}: cannot create the directory {p.parent} ({exc.strerror})") from None


def _check_prompts_fit(engine: SteeringEngine, sets: Sequence[PromptSet], *, chat: bool = True) -> None:
    """Every prompt fits the context: found before the run, not after hours of it."""
    for s in sets:
        for i, item in enumerate(s.prompts):
            try:
                n = len(engine.encode_prompt(item.messages() if chat else item.prompt))
            except ValueError as exc:  # ContextOverflowError: far too long to tokenise at all
                raise CliError(f"{s.path}: prompt {i + 1}: {exc}") from None
            if n >= engine.n_ctx:
                how = "with the chat template" if chat else "as plain text"
                raise CliError(f"{s.path}: prompt {i + 1} has {n} tokens {how}, but the context "
                               f"holds {engine.n_ctx}; shorten it, drop it, or raise --n-ctx")


def _calibration_set(path: str | None, sets: Sequence[PromptSet]) -> PromptSet | None:
    """The ``--calibration-prompts`` file, refused if it shares a prompt with the evaluated sets:
    a tau calibrated on the prompts it is judged on is tuned on them."""
    if path is None:
        return None
    calib = load_prompt_set(path, harmful=False)
    evaluated = {item.prompt for s in sets for item in s.prompts}
    shared = [item.prompt for item in calib.prompts if item.prompt in evaluated]
    if shared:
        raise CliError(f"--calibration-prompts {path}: {len(shared)} of its prompts are also evaluated (the first: "
                       f"{shared[0][:60]!r}); calibrate on prompts kept apart from the evaluation, such as the "
                       "training prompts")
    return calib


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.files:
        ap.error("give at least one prompt file: --prompts FILE (or --harmful FILE / --benign FILE)")
    modes = parse_modes(args.modes)
    sets = load_prompt_sets(args.files, args.limit)
    calibration_set = _calibration_set(args.calibration_prompts, sets)
    if calibration_set is not None and not any(m.target_ratio is not None for m in modes):
        raise CliError("--calibration-prompts calibrates target ratios, and no mode has one: write the modes with "
                       "a percentage (sparse@25%, shift@25%)")
    if args.reward is None:  # what the preset was evaluated with
        args.reward = args.preset.reward if args.preset is not None else "safety"
    if args.reward in ("safety", "builtin:safety"):
        unlabelled = unlabelled_files(sets)
        if unlabelled:
            raise CliError(
                f"{unlabelled[0]}: the safety reward needs to know whether each prompt is harmful: give the "
                "JSONL rows a 'harmful' field, or pass the file with --harmful FILE or --benign FILE"
            )
    for path, what in ((args.outputs, "--outputs"), (args.json, "--json"), (args.plot, "--plot")):
        _prepare_output(path, what)
    if args.resume and args.outputs is None:
        raise CliError("--resume continues the answers of --outputs FILE: give the file the interrupted run wrote")
    if args.temperature < 0:
        raise CliError("--temperature must be >= 0 (0 = greedy)")
    from sia_edge.engine import DEFAULT_K_MAX, SteeringEngine

    if args.k > DEFAULT_K_MAX:  # as the chat and server allow; checked before hours of answers
        raise CliError(f"--k must be at most {DEFAULT_K_MAX}, got {args.k}")
    for m in modes:  # settings errors (k, w, tau ...) before any model loads
        try:
            m.config(k=args.k, w=1.0 if args.w is None else args.w, temperature=args.temperature, p=0.0)
        except ValueError as exc:
            raise CliError(f"mode {m.label}: {exc}") from None

    from sia_edge.cli_common import base_model_path, choose_value_model

    needs_value = any(m.needs_value_model for m in modes)
    base = base_model_path(args.model, args.preset)
    choice = choose_value_model(args.value_model, base, needed=needs_value, preset=args.preset)
    if needs_value and choice.missing:  # an evaluation of steering cannot quietly run without it
        steering_modes = [m.label for m in modes if m.needs_value_model]
        raise CliError(f"modes {', '.join(steering_modes)} need a value model, but {choice.missing}; pass "
                       "--value-model PATH.gguf trained for this base model, or --modes off")
    engine = SteeringEngine(base, choice.path, n_ctx=args.n_ctx, n_threads=args.threads, k_max=DEFAULT_K_MAX)
    if args.prompt_style == "auto" and args.preset is not None:
        args.prompt_style = args.preset.prompt_style
    if args.prompt_style == "auto":
        args.prompt_style = "chat" if engine.base.chat_template else "text"
    elif args.prompt_style == "chat" and not engine.base.chat_template:
        raise CliError(f"{engine.base.path.name} has no chat template: use --prompt-style text")
    chat = args.prompt_style == "chat"
    _check_prompts_fit(engine, sets, chat=chat)
    calibration = None
    if calibration_set is not None:
        from sia_edge.engine import Calibration

        _check_prompts_fit(engine, [calibration_set], chat=chat)
        calibration = Calibration(tuple(item.messages() if chat else item.prompt for item in calibration_set.prompts),
                                  max_tokens=args.max_tokens)
    for m in modes:  # a head the value model lacks, before any answer (a mode names its head: +candidate)
        head = m.value_head or "scalar"
        if m.needs_value_model and engine.value is not None and head not in engine.value.heads:
            from sia_edge.value_format import head_missing

            hint = f"; write {m.label}+candidate" if head == "scalar" else ""
            raise CliError(f"mode {m.label}: {head_missing(engine.value.name, head, engine.value.heads)}{hint}")
    if args.w is None:  # the strength the value model was evaluated with, as the chat uses it
        args.w = engine.value.meta.recommended_steering().get("w", 1.0) if engine.value is not None else 1.0
    progress = not args.no_progress
    if progress:
        print(f"base {engine.base.path.name}, value {engine.value.path.name if engine.value else '(none)'}; "
              f"{len(modes)} modes x {sum(len(s.prompts) for s in sets)} prompts", file=sys.stderr)
    outputs = Path(args.outputs).expanduser() if args.outputs else None
    run = run_settings(engine, args) if outputs else None  # hashes the models: only for rows to write
    resumed = None
    if args.resume:
        assert outputs is not None
        assert run is not None
        resumed = read_resumable(outputs, sets, modes, seed=args.seed, run=run)
        if progress:
            print(f"resuming: {len(resumed.rows)} answers already in {outputs}", file=sys.stderr)
    mode = "a" if args.resume else "w"
    opened = open(outputs, mode, encoding="utf-8") if outputs else contextlib.nullcontext(None)  # noqa: SIM115
    with opened as out:
        results = evaluate(
            engine, sets, modes, max_tokens=args.max_tokens, seed=args.seed, k=args.k, w=args.w,
            temperature=args.temperature, reward=args.reward, outputs=out, progress=progress,
            by_source=args.by_source, run=run, resumed=resumed, chat=chat, calibration=calibration,
        )
    summary = {
        "command": [PROG, *(sys.argv[1:] if argv is None else argv)],
        "base_model": engine.base.path.name,
        "value_model": engine.value.path.name if engine.value else None,
        "settings": {"max_tokens": args.max_tokens, "seed": args.seed, "k": args.k, "w": args.w,
                     "temperature": args.temperature, "reward": args.reward, "limit": args.limit,
                     "calibration_prompts": args.calibration_prompts,
                     "n_ctx": engine.n_ctx, "threads": engine.n_threads},
        "machine": machine_info(),
        "resumed_answers": len(resumed.rows) if resumed else 0,  # answers of an interrupted run (--resume), timed in that run
        "sets": [{"name": s.name, "path": str(s.path), "kind": s.kind, "n": len(s.prompts)} for s in sets],
        "modes": [{"mode": m.label, "family": m.family, "gate": m.gate, "target_ratio": m.target_ratio,
                   "tau": m.tau if m.tau is not None or m.target_ratio is not None or m.gate not in
                   TAU_GATES else SteeringConfig().tau,
                   "p": m.p, "match": m.match, "bon": m.bon, "head": m.head, "follow": m.follow,
                   "horizon": m.horizon} for m in modes],
        "results": results,
    }
    text = json.dumps(summary, indent=1, ensure_ascii=False)
    table = format_table(results)
    if args.json == "-":
        print(text)
        print(table, file=sys.stderr)
    else:
        if args.json:
            Path(args.json).expanduser().write_text(text + "\n", encoding="utf-8")
        print(table)
    if args.plot:
        plot_summary(results, Path(args.plot).expanduser(),
                     title=f"{engine.base.path.name} steered by {summary['value_model']}, "
                           f"{args.max_tokens} tokens")
    return 0

