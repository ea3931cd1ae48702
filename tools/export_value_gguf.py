#!/usr/bin/env python3
"""``sia-edge export`` as a script (sia_edge/commands/export.py holds it)."""

from sia_edge import _early_sigint  # noqa: F401  (first: a Ctrl-C while the imports below run exits quietly)

# isort: split
import sys

from sia_edge.cli_common import run_cli
from sia_edge.commands.export import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
