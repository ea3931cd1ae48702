"""The ``sia-edge`` command: one entry point whose subcommands are the faces and the tools.

    sia-edge chat | serve | eval | make-data | train | export | bench  [--help]

Each subcommand is the ``main`` of one module (``COMMANDS``); ``python -m sia_edge.chat`` and the
scripts in tools/ run the same functions. The training subcommands need the ``train`` extra
(``pip install "sia-edge[train]"``: torch, peft, transformers) and say so without it.
"""

from __future__ import annotations

from sia_edge import _early_sigint  # noqa: F401  (first: a Ctrl-C while the imports below run exits quietly)

# isort: split
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

# name -> (module with main(argv), one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("sia_edge.chat", "chat with a base model steered by a value model (or one --prompt, --json)"),
    "serve": ("sia_edge.serve", "an OpenAI-compatible HTTP server with steering fields"),
    "eval": ("sia_edge.eval.cli", "compare steering modes on prompt sets: reward, refusals, cost"),
    "make-data": ("sia_edge.commands.make_data", "value-model training data: base-model answers and rewards [train]"),
    "train": ("sia_edge.commands.train", "train a value model (LoRA + value head) [train]"),
    "export": ("sia_edge.commands.export", "a trained value model to a quantised GGUF, with a parity check [train]"),
    "bench": ("sia_edge.commands.bench", "decode cost of every steering mode, side by side, as JSON"),
}


def usage() -> str:
    from sia_edge import __version__

    width = max(map(len, COMMANDS))
    lines = [f"usage: sia-edge COMMAND [--help] [ARGS]   (sia-edge {__version__})", "",
             "Sparse Inference-time Alignment on llama.cpp, on the CPU.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "[train]: needs the training extra, pip install \"sia-edge[train]\"",
              "models and caches: $SIA_EDGE_MODELS, else the per-user cache directory"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from sia_edge.cli_common import run_cli

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "--version":
        from sia_edge import __version__

        print(f"sia-edge {__version__}")
        return 0
    entry = COMMANDS.get(args[0])
    if entry is None:
        print(f"error: unknown command {args[0]!r}; choose one of {', '.join(COMMANDS)} (sia-edge --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(entry[0])
    return run_cli(module.main, args[1:])
