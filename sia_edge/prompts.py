"""Prompt files, read the same way by the evaluation (``sia_edge.eval``) and by value-data
generation (``tools/make_value_data.py``), and UTF-8 text inputs in general.

A prompt file is ``.jsonl`` (or ``.ndjson``) with one ``{"prompt", "harmful", "system", "source"}``
object per line (only ``prompt`` is required), or plain text with one prompt per line. Every
problem is a ``ValueError`` that names the file, the line and the fix; nothing here needs torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Prompt", "PromptFileError", "iter_jsonl", "read_prompt_file", "read_text_lines", "stable_seed"]


def stable_seed(*parts: object) -> int:
    """A 31-bit seed fixed by ``parts`` alone (not by what ran before it): per-prompt and
    per-sample seeds, so that a resumed run draws what an uninterrupted one would have."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


class PromptFileError(ValueError):
    """A prompt or text file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Prompt:
    prompt: str
    harmful: bool | None = None  # what the safety reward needs to know; None: not said
    system: str | None = None
    source: str | None = None  # where the prompt came from (summaries split by it)

    def messages(self) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return [*msgs, {"role": "user", "content": self.prompt}]


def read_text_lines(path: Path, what: str, *, error: type[Exception] = PromptFileError) -> list[str]:
    """The lines of a UTF-8 text input, or ``error`` naming the file and the problem (missing, a
    directory, not UTF-8) instead of a bare codec or OS error."""
    if path.is_dir():
        raise error(f"{what} {path} is a directory; pass the file inside it")
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise error(f"{path}:{line}: {what} is not UTF-8 text (byte {exc.object[exc.start]:#04x}); "
                    "save it as UTF-8") from None
    return io.StringIO(text).readlines()  # split at "\n" only, as reading the file line by line does


def iter_jsonl(path: Path, what: str = "data file", *,
               error: type[Exception] = PromptFileError) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-empty line of a JSONL file; ``error`` names the file and
    line of a problem (the caller's own error type: training raises TrainError)."""
    for n, line in enumerate(read_text_lines(path, what, error=error), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise error(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise error(f"{path}:{n}: each row must be a JSON object")
        yield n, row


def read_prompt_file(path: str | os.PathLike[str], *, harmful: bool | None = None, limit: int | None = None,
                     error: type[Exception] = PromptFileError) -> list[Prompt]:
    """The prompts of a file (see the module docstring). ``harmful`` is the flag of prompts that
    carry none; ``limit`` keeps the first N."""
    p = Path(path).expanduser()
    is_jsonl = p.suffix.lower() in (".jsonl", ".ndjson")
    prompts: list[Prompt] = []
    for n, line in enumerate(read_text_lines(p, "prompt file", error=error), 1):
        if limit is not None and len(prompts) >= limit:
            break
        if not line.strip():
            continue
        if not is_jsonl:
            prompts.append(Prompt(line.strip(), harmful))
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise error(f"{p}:{n}: not a JSON object ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise error(f"{p}:{n}: each JSONL row needs a non-empty string 'prompt'")
        flag = row.get("harmful", harmful)
        if flag is not None and not isinstance(flag, bool):
            raise error(f"{p}:{n}: 'harmful' must be true or false, got {flag!r}")
        system, source = row.get("system"), row.get("source")
        prompts.append(Prompt(row["prompt"], flag, system if isinstance(system, str) else None,
                              source if isinstance(source, str) else None))
    if not prompts:
        raise error(f"prompt file {p} has no prompts")
    return prompts
