"""``python -m sia_edge.eval`` (the package imported first: its ``_early_sigint`` import comes before any other)."""

from __future__ import annotations

import sys

from sia_edge.cli_common import run_cli
from sia_edge.eval.cli import main

sys.exit(run_cli(main))
