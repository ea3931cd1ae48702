"""Ctrl-C while a command is still starting: one line and exit code 130, not an import traceback.

The commands (``sia-edge``, ``python -m sia_edge.chat``, ``.eval``, ``.serve`` and the scripts in tools/) spend
their first few hundred milliseconds importing numpy, llama.cpp's bindings or FastAPI, before
``cli_common.run_cli`` is reached to turn a KeyboardInterrupt into "interrupted". Each of them
imports this module first; importing it installs a SIGINT handler that ends the process at once
(nothing has been written yet, so there is nothing to clean up), and ``run_cli`` replaces it with
its own when it starts.

Only a command's own ``__main__`` installs it: a desktop app that imports ``sia_edge.chat`` from its
own entry point keeps its signal handling. An inherited SIG_IGN (a background job of a
non-interactive shell) is kept, as Python itself keeps it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

TOOLS_DIR = Path(__file__).resolve().parent.parent / "tools"


def exit_interrupted(signum: int, frame: FrameType | None) -> None:
    os.write(2, b"\ninterrupted\n")
    os._exit(130)  # mid-import: no state to unwind, and unwinding is what prints the traceback


def _main_is_a_command() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:  # python -m sia_edge.X
        return str(spec.name).startswith("sia_edge.")
    path = getattr(main, "__file__", None)  # python tools/X.py, or the installed sia-edge command
    return path is not None and (Path(path).resolve().parent == TOOLS_DIR or Path(path).name == "sia-edge")


if (
    threading.current_thread() is threading.main_thread()
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    and _main_is_a_command()
):
    signal.signal(signal.SIGINT, exit_interrupted)
