"""``--resume``: the answers an interrupted run wrote to ``--outputs``, checked against this run
(settings, modes, prompts, seeds, and the steering of each answer) before they are counted."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sia_edge.cli_common import CliError
from sia_edge.eval.metrics import matched_probability
from sia_edge.eval.modes import EvalMode
from sia_edge.eval.prompt_sets import PromptSet
from sia_edge.eval.records import PROG, ROW_START, RowResult, prompt_seed
from sia_edge.steering import TAU_GATES, SteeringConfig

__all__ = ["ResumedAnswers", "check_resumed_steering", "read_resumable"]


@dataclass
class ResumedAnswers:
    """The answers of an interrupted run in its ``--outputs`` file (``read_resumable``)."""

    path: Path
    rows: dict[tuple[str, str, int], RowResult]  # (mode, set, prompt index) -> answer
    valid_bytes: int  # the file's length without a last row cut short by the interruption
    read_bytes: int  # its length when it was read

    def drop_unfinished_row(self) -> None:
        """Cut a half-written last row off the file (its prompt is answered again); called once
        every resumed answer is known to belong to this run, so a refused file stays as it was."""
        if self.read_bytes == self.valid_bytes:
            return
        size = self.path.stat().st_size if self.path.exists() else -1
        if size != self.read_bytes:  # another process is writing it: cutting would lose its rows
            raise CliError(f"{self.path} changed while it was read ({self.read_bytes} -> {size} bytes): is the "
                           "interrupted run still running? Resume once it has stopped")
        with open(self.path, "r+b") as f:
            f.truncate(self.valid_bytes)
        print(f"{self.path.name}: dropped an unfinished last row", file=sys.stderr)


def read_resumable(path: Path, sets: Sequence[PromptSet], modes: Sequence[EvalMode], *, seed: int,
                   run: dict[str, Any]) -> ResumedAnswers:
    """The answers an interrupted run wrote to ``path`` (``--resume``), checked against this run:
    the same settings, modes, sets, prompts (text, system prompt, harmful flag, source) and seeds,
    each answer once. Anything that does not fit is an error that says how it differs. The file is
    not changed here: a last line cut short by the interruption is only left out, and dropped from
    the file once ``evaluate`` has checked the steering too (``ResumedAnswers.drop_unfinished_row``)."""
    if not path.exists():
        return ResumedAnswers(path, {}, 0, 0)
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    if tail and not (tail.startswith(ROW_START) or ROW_START.startswith(tail)):  # not a row cut short
        raise CliError(f"{path} does not end in answers of {PROG}; give --outputs a new file, or drop --resume "
                       "to overwrite it")
    by_mode = {m.label: m for m in modes}
    by_set = {s.name: s for s in sets}
    rows: dict[tuple[str, str, int], RowResult] = {}
    new_file = "give --outputs a new file"
    # Split at "\n" only: answers are written raw (ensure_ascii=False) and may hold U+2028 and the like.
    for n, raw in enumerate(data[:cut].split(b"\n")[:-1], 1):
        line = raw.decode("utf-8", errors="replace")
        where = f"{path}: line {n}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = (str(row["mode"]), str(row["set"]), int(row["index"]))
            written = row.get("run")
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            raise CliError(f"{where} is not an answer of {PROG}; {new_file}, or drop --resume to overwrite "
                           "it") from None
        if not isinstance(written, dict):
            raise CliError(f"{where} does not record its settings (written before --resume existed, or not by "
                           f"{PROG}), so it cannot be checked against this run; {new_file}")
        changed = [k for k in sorted(set(run) | set(written)) if run.get(k) != written.get(k)]
        if changed:
            k = changed[0]
            raise CliError(f"{where} was written with {k} {json.dumps(written.get(k))}, this run has "
                           f"{json.dumps(run.get(k))}; resume with the same settings, or {new_file}")
        mode_label, set_name, index = key
        if mode_label not in by_mode:
            raise CliError(f"{where} answers mode {mode_label!r}, which is not in --modes; resume with the "
                           "same --modes")
        pset = by_set.get(set_name)
        if pset is None or not 0 <= index < len(pset.prompts):
            raise CliError(f"{where} answers prompt {index + 1} of set {set_name!r}, which this run does not "
                           "have; resume with the same prompt files and --limit")
        item = pset.prompts[index]
        differs = [what for what, old, now in (
            ("prompt", row.get("prompt"), item.prompt), ("system prompt", row.get("system"), item.system),
            ("harmful flag (--harmful / --benign)", row.get("harmful"), item.harmful),
            ("source", row.get("source"), item.source),
            ("seed (--seed)", row.get("seed"), prompt_seed(seed, set_name, index))) if old != now]
        if differs:
            raise CliError(f"{where}: set {set_name!r} prompt {index + 1} has a different {differs[0]} in this "
                           "run; resume with the same prompt files, flags and --seed")
        if key in rows:
            raise CliError(f"{where} answers mode {mode_label!r}, set {set_name!r}, prompt {index + 1} a second "
                           f"time: the file holds two runs; {new_file}")
        try:
            rows[key] = RowResult.from_row(row, item, tau_gate=by_mode[mode_label].gate in TAU_GATES)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            raise CliError(f"{where} lacks the verdicts or the stats of an answer (reward, refused, steps, "
                           f"stats); {new_file}") from None
    return ResumedAnswers(path, rows, cut, len(data))


def check_resumed_steering(resumed: Mapping[tuple[str, str, int], RowResult], modes: Sequence[EvalMode],
                           sets: Sequence[PromptSet], configs: Mapping[str, SteeringConfig],
                           taus: Mapping[str, float]) -> None:
    """Every resumed answer was steered as this run steers its mode: at the same tau (a target
    ratio calibrates again when its cache is gone or on another CPU) and, for random gates, with the
    same probability (``random@MODE`` takes MODE's rate on the set, which changes if MODE's answers
    do: a larger --limit, say). Checked before any answer is generated."""
    by_label = {m.label: m for m in modes}
    set_sizes = {s.name: len(s.prompts) for s in sets}
    copied: dict[tuple[str, str], float] = {}  # (random@MODE, set) -> MODE's rate there, once per set
    for (label, set_name, index), row in resumed.items():
        mode, config = by_label[label], configs[label]
        where = f"--resume: mode {label}, set {set_name!r}, prompt {index + 1}"
        if config.gate == "random":
            p = config.p
            if mode.match is not None and (label, set_name) not in copied:
                matched = [resumed.get((mode.match, set_name, i)) for i in range(set_sizes[set_name])]
                done = [r for r in matched if r is not None]
                if len(done) < len(matched):
                    raise CliError(f"{where} copies the rate of {mode.match}, which has answered {len(done)} of "
                                   f"the set's {len(matched)} prompts here: resume with the --limit of the run "
                                   "that wrote the file, or give --outputs a new file")
                copied[(label, set_name)] = matched_probability(done, by_label[mode.match].horizon)
            if mode.match is not None:
                p = copied[(label, set_name)]
            if row.p is None or p is None or not math.isclose(row.p, p, rel_tol=1e-9, abs_tol=1e-12):
                raise CliError(f"{where} was steered with probability {row.p}, this run's is {p}; give --outputs "
                               "a new file")
        elif mode.gate in TAU_GATES and (
                row.tau is None or not math.isclose(row.tau, taus[label], rel_tol=1e-6)):
            raise CliError(f"{where} was steered at tau {row.tau}, this run's is {taus[label]:.4g} (a target "
                           "ratio calibrated again?); give --outputs a new file")
