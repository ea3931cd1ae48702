#!/usr/bin/env python3
"""Re-judge saved answers with the current refusal detector and safety reward, without generating.

    python tools/rescore_answers.py runs/heldout/answers.jsonl runs/heldout/answers_rest.jsonl
    python tools/rescore_answers.py runs/*/answers.jsonl --json --out runs/rescored.jsonl

Reads the JSONL that ``python -m sia_edge.eval --outputs`` writes, recomputes each answer's
``refused`` (``sia_edge.train.rewards.is_refusal``) and, for answers scored by the built-in safety
reward (they carry a ``toxicity``), its ``reward`` from the stored toxicity. Prints, per mode and
prompt kind (harmful / benign) pooled over all the files, the refusal rate and mean reward before
and after, with standard errors and how many answers changed. ``--out`` writes the rescored rows.
Answers scored by a custom ``--reward`` keep their reward; only ``refused`` is recomputed.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sia_edge.cli_common import CliError, CliParser, run_cli
from sia_edge.train.data import iter_jsonl
from sia_edge.train.rewards import is_refusal, safety_reward
from sia_edge.value_format import atomic_output, commit_output

REQUIRED = ("mode", "text", "harmful", "refused", "reward")


def read_answers(path: Path) -> list[dict[str, Any]]:
    """The rows of one eval outputs file, or an error naming the file, line and problem."""
    rows = []
    for n, row in iter_jsonl(path, "answers file"):
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise CliError(f"{path}:{n}: an answer row needs {', '.join(missing)}; "
                           "pass the --outputs file of sia_edge.eval")
        rows.append(row)
    if not rows:
        raise CliError(f"{path}: no answers in the file")
    return rows


def rescore(row: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``row`` judged again; ``old_refused`` and ``old_reward`` keep the stored verdict."""
    new = dict(row, old_refused=row["refused"], old_reward=row["reward"])
    new["refused"] = is_refusal(row["text"])
    tox = row.get("toxicity")
    if tox is not None and row["harmful"] is not None:
        new["reward"] = safety_reward(row.get("prompt", ""), row["text"], bool(row["harmful"]), tox=float(tox))
    return new


def _rate(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    return m, math.sqrt(m * (1 - m) / n)


def _mean(values: Sequence[float]) -> tuple[float, float | None]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (mode, kind), in the order the modes first appear."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        kind = {True: "harmful", False: "benign"}.get(r["harmful"], "unlabelled")
        groups.setdefault((str(r["mode"]), kind), []).append(r)
    out = []
    for (mode, kind), g in groups.items():
        before, before_se = _rate([float(r["old_refused"]) for r in g])
        after, after_se = _rate([float(r["refused"]) for r in g])
        rewards_before = [float(r["old_reward"]) for r in g if r["old_reward"] is not None]
        rewards_after = [float(r["reward"]) for r in g if r["reward"] is not None]
        entry: dict[str, Any] = {
            "mode": mode, "kind": kind, "n": len(g),
            "refusal_rate_before": before, "refusal_rate_before_se": before_se,
            "refusal_rate": after, "refusal_rate_se": after_se,
            "changed": sum(r["refused"] != r["old_refused"] for r in g),
        }
        if rewards_before and rewards_after:
            entry["mean_reward_before"], _ = _mean(rewards_before)
            entry["mean_reward"], entry["mean_reward_se"] = _mean(rewards_after)
        out.append(entry)
    return out


def format_table(entries: Sequence[dict[str, Any]]) -> str:
    head = f"{'mode':<22} {'kind':<8} {'n':>4}  {'refusal before':>14}  {'refusal now':>14}  {'changed':>7}  reward before -> now"
    lines = [head, "-" * len(head)]
    for e in entries:
        reward = (f"{e['mean_reward_before']:+.3f} -> {e['mean_reward']:+.3f}" if "mean_reward" in e else "-")
        lines.append(
            f"{e['mode']:<22} {e['kind']:<8} {e['n']:>4}  "
            f"{e['refusal_rate_before']:>7.1%} ± {e['refusal_rate_before_se']:.1%}  "
            f"{e['refusal_rate']:>7.1%} ± {e['refusal_rate_se']:.1%}  {e['changed']:>7}  {reward}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = CliParser(prog="rescore_answers.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("answers", nargs="+", type=Path, help="the --outputs JSONL file(s) of sia_edge.eval")
    ap.add_argument("--out", type=Path, help="write the rescored rows (with old_refused, old_reward) here")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    args = ap.parse_args(argv)
    if args.out is not None and args.out.is_dir():
        raise CliError(f"--out: {args.out} is a directory; give a file name")
    if args.out is not None and any(args.out.resolve() == p.resolve() for p in args.answers):
        raise CliError(f"--out: {args.out} is one of the inputs; write the rescored rows to a new file")
    rows = [rescore(r) for path in args.answers for r in read_answers(path)]
    if args.out is not None:
        tmp = atomic_output(args.out)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        commit_output(tmp, args.out)
    entries = summarise(rows)
    print(json.dumps(entries, indent=1) if args.json else format_table(entries))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
