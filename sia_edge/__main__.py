"""``python -m sia_edge``: the ``sia-edge`` command (sia_edge/commands)."""

from sia_edge import _early_sigint  # noqa: F401  (first: a Ctrl-C while the imports below run exits quietly)

# isort: split
import sys

from sia_edge.commands import main

sys.exit(main())
