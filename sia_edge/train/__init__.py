"""The PyTorch side of sia-edge: value-model data, rewards, LoRA training and GGUF export.

Imported only when training: torch, transformers and peft live here (and in ``tools/``), never
on the inference path. The pieces, in pipeline order:

=====================  ==================================================================
module                 what it does
=====================  ==================================================================
``data``               prompt files, sampling the base model, the value-data JSONL
``rewards``            pluggable rewards and the built-in offline safety reward
``model``              backbone (GGUF or HF dir) + LoRA + Linear(hidden, 1) value head
``trainer``            AdamW training with eval, checkpoints, resume, DDP, curve PNG
``export``             merge, GGUF writing, llama.cpp quantisation, parity check
``tiny``               tiny random models of seven families for self-checks and tests
=====================  ==================================================================
"""

from __future__ import annotations

__all__ = ["TrainError", "quiet_library_warnings"]


class TrainError(ValueError):
    """An expected failure of the training pipeline (bad input, missing file, mismatch).

    The message says what is wrong and how to fix it; the CLIs print it as one line."""


def quiet_library_warnings() -> None:
    """Hide the deprecation notices torch, transformers and peft print about their own internals
    (meant for their developers, noise in our CLIs' output)."""
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|transformers|peft)(\.|$)")
