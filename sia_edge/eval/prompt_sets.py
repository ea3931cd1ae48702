"""Eval's prompt sets: one prompt file each (``sia_edge.prompts``), named for the summary."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sia_edge.cli_common import CliError
from sia_edge.prompts import Prompt, read_prompt_file

__all__ = ["EvalPrompt", "PromptSet", "load_prompt_set", "load_prompt_sets", "unlabelled_files"]

EvalPrompt = Prompt  # a prompt of a prompt file (sia_edge.prompts)


@dataclass
class PromptSet:
    name: str  # the file's stem (made unique): the key in the summary
    path: Path
    prompts: list[EvalPrompt]

    @property
    def kind(self) -> str:
        flags = {p.harmful for p in self.prompts}
        if flags == {True}:
            return "harmful"
        if flags == {False}:
            return "benign"
        return "unlabelled" if flags == {None} else "mixed"


def load_prompt_set(path: str | os.PathLike[str], *, harmful: bool | None = None, limit: int | None = None,
                    name: str | None = None) -> PromptSet:
    """A prompt file: ``.jsonl`` rows ``{"prompt", "harmful", "system", "source"}`` or plain text,
    one prompt per line. ``harmful`` is the flag of rows that carry none; ``limit`` keeps the first N."""
    p = Path(path).expanduser()
    prompts = read_prompt_file(p, harmful=harmful, limit=limit, error=CliError)
    return PromptSet(name or p.stem, p, prompts)


def load_prompt_sets(files: Sequence[tuple[str, bool | None]], limit: int | None) -> list[PromptSet]:
    """The sets of ``--prompts``/``--harmful``/``--benign``, in order; a second file with the same
    stem is named ``stem-2`` (the names key the summary)."""
    sets: list[PromptSet] = []
    used: Counter[str] = Counter()
    for path, flag in files:
        pset = load_prompt_set(path, harmful=flag, limit=limit)
        used[pset.name] += 1
        if used[pset.name] > 1:
            pset.name = f"{pset.name}-{used[pset.name]}"
        sets.append(pset)
    return sets


def unlabelled_files(sets: Sequence[PromptSet]) -> list[str]:
    """The files with a prompt whose harmful flag is unknown (the safety reward needs it)."""
    return [str(s.path) for s in sets if any(p.harmful is None for p in s.prompts)]
