#!/usr/bin/env python3
"""Toxic continuations per mode from saved eval answers, and each mode's share of dense steering's
reduction of them, with paired intervals (the gemma3-detox goals, docs/results/gemma3-detox.md).

    python tools/toxicity_report.py runs/detox/eval-s0.jsonl runs/detox/eval-s1.jsonl \\
        --gain off,dense --paired sparse@25%,random@sparse@25% [--json]

An answer is toxic when the offline classifier stored in its row (``toxicity``) is at least 0.5
(``sia_edge.eval.metrics.TOXIC``). Answers pair by prompt set, prompt and seed; runs with other
seeds pool, and the bootstrap and the paired standard errors resample prompts with all their
seeds together (``sia_edge.eval.metrics``, the statistics eval and rescore_answers use).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sia_edge.cli_common import CliError, run_cli
from sia_edge.eval import metrics
from sia_edge.prompts import iter_jsonl

Key = tuple[str, str, int]  # (set, prompt, seed)


def _two(text: str, what: str) -> tuple[str, str]:
    parts = [p.strip().lower() for p in text.split(",")]
    if len(parts) != 2 or parts[0] == parts[1] or not all(parts):
        raise CliError(f"{what} takes two different modes, A,B, got {text!r}")
    return parts[0], parts[1]


def read_answers(paths: Sequence[Path]) -> dict[str, dict[Key, bool]]:
    """mode -> (set, prompt, seed) -> toxic?"""
    out: dict[str, dict[Key, bool]] = {}
    for path in paths:
        for n, row in iter_jsonl(path, "answers file"):
            tox = row.get("toxicity")
            if not isinstance(tox, (int, float)):
                raise CliError(f"{path}:{n}: the answer has no toxicity score (eval judges it with the safety or "
                               "nontoxicity reward)")
            key = (str(row.get("set")), str(row.get("prompt")), int(row.get("seed", 0)))
            answers = out.setdefault(str(row["mode"]), {})
            if key in answers:
                raise CliError(f"{path}:{n}: mode {row['mode']} answers this prompt and seed twice")
            answers[key] = float(tox) >= metrics.TOXIC
    return out


def _need(answers: dict[str, dict[Key, bool]], *modes: str) -> None:
    for m in modes:
        if m not in answers:
            raise CliError(f"no answers of mode {m!r}; the modes are {', '.join(answers)}")


def report(answers: dict[str, dict[Key, bool]], gain: tuple[str, str] | None,
           paired: Sequence[tuple[str, str]]) -> dict[str, Any]:
    result: dict[str, Any] = {"modes": []}
    for mode, verdicts in answers.items():
        rate, se = metrics.rate_with_se(list(verdicts.values()))
        result["modes"].append({"mode": mode, "answers": len(verdicts), "toxic_rate": rate, "toxic_rate_se": se})
    if gain is not None:
        off, dense = gain
        _need(answers, off, dense)
        rng = np.random.default_rng(0)
        result["gain"] = []
        for mode, verdicts in answers.items():
            if mode in gain:
                continue
            keys = sorted(set(answers[off]) & set(verdicts) & set(answers[dense]))
            # non-toxic flags, so that "more" is better as in share_of_gain's refusal gains
            table = np.array([[1 - answers[off][k], 1 - verdicts[k], 1 - answers[dense][k]] for k in keys],
                             dtype=np.float64)
            share = metrics.share_of_gain([k[:2] for k in keys], table, rng)
            result["gain"].append({"mode": mode, "prompts": share.units, "share": share.share,
                                   "share_ci95": list(share.ci95) if share.ci95 else None})
    result["paired"] = []
    for a, b in paired:
        _need(answers, a, b)
        keys = sorted(set(answers[a]) & set(answers[b]))
        diffs = np.array([[answers[a][k] - answers[b][k]] for k in keys], dtype=np.float64)
        n, ((mean, se),) = metrics.paired_differences([k[:2] for k in keys], diffs)
        result["paired"].append({"a": a, "b": b, "prompts": n, "toxic_points": 100 * mean if mean is not None else None,
                                 "toxic_points_se": 100 * se if se is not None else None})
    return result


def format_report(r: dict[str, Any]) -> str:
    lines = [f"{'mode':28} {'answers':>7}  toxic (± se)"]
    lines += [f"{m['mode']:28} {m['answers']:7d}  {m['toxic_rate']:.1%} ± {m['toxic_rate_se'] * 100:.1f}"
              for m in r["modes"]]
    for g in r.get("gain", []):
        ci = f" [{g['share_ci95'][0]:.0%}, {g['share_ci95'][1]:.0%}]" if g["share_ci95"] else ""
        share = "n/a" if g["share"] is None else f"{g['share']:.0%}{ci}"
        lines.append(f"share of dense's reduction, {g['mode']}: {share} ({g['prompts']} prompts)")
    for p in r["paired"]:
        lines.append(f"{p['a']} - {p['b']}: {p['toxic_points']:+.1f} ± {p['toxic_points_se']:.1f} points "
                     f"({p['prompts']} prompts)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("answers", nargs="+", type=Path, help="the --outputs JSONL file(s) of sia_edge.eval")
    ap.add_argument("--gain", metavar="OFF,DENSE", help="each other mode's share of DENSE's reduction over OFF")
    ap.add_argument("--paired", action="append", default=[], metavar="A,B",
                    help="mode A minus mode B in toxic continuations, paired; repeatable")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    gain = _two(args.gain, "--gain") if args.gain else None
    paired = [_two(p, "--paired") for p in args.paired]
    r = report(read_answers(args.answers), gain, paired)
    print(json.dumps(r, indent=1) if args.json else format_report(r))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
