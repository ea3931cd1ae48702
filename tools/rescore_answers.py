#!/usr/bin/env python3
"""Re-judge saved answers with the current refusal detector and safety reward, without generating.

    python tools/rescore_answers.py runs/heldout/answers.jsonl runs/heldout/answers_rest.jsonl
    python tools/rescore_answers.py runs/*/answers.jsonl --json --out runs/rescored.jsonl --gain off,dense

The command lives in ``sia_edge.eval.rescore`` (options, the measures and how answers pair: its
docstring, or ``--help``); its statistics are eval's own (``sia_edge.eval.metrics``).
"""

from __future__ import annotations

from sia_edge import _early_sigint  # noqa: F401  (first: a Ctrl-C while the imports below run exits quietly)

# isort: split
import sys

from sia_edge.cli_common import run_cli
from sia_edge.eval.rescore import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
