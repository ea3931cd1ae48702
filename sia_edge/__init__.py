"""sia-edge: Sparse Inference-time Alignment (SIA) on llama.cpp, on the CPU.

The inference path (kernels, engine, chat, server) imports neither torch nor transformers.
"""

from __future__ import annotations

__version__ = "0.1.0"
