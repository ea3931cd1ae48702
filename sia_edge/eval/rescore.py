"""Re-judge saved answers with the current refusal detector and safety reward, without generating.

    python tools/rescore_answers.py runs/heldout/answers.jsonl runs/heldout/answers_rest.jsonl
    python tools/rescore_answers.py runs/*/answers.jsonl --json --out runs/rescored.jsonl
    python tools/rescore_answers.py runs/heldout/answers*.jsonl runs/wsweep/w3_answers.jsonl \
        --rename sparse@1.7=sparse@30% --gain off,dense

Reads the JSONL that ``python -m sia_edge.eval --outputs`` writes, recomputes each answer's
``refused`` (``sia_edge.rewards.is_refusal``) and, for answers scored by the built-in safety
reward (they carry a ``toxicity``), its ``reward`` from the stored toxicity. Prints, per mode and
prompt kind (harmful / benign) pooled over all the files, the refusal rate and mean reward before
and after, with standard errors and how many answers changed. ``--out`` writes the rescored rows.
Answers scored by a custom ``--reward`` keep their reward; only ``refused`` is recomputed.

``--gain OFF,DENSE`` adds issue 6's measure: for every other mode, its share of DENSE's gain in
harmful refusal rate over OFF, (r_mode - r_off) / (r_dense - r_off), on the harmful prompts all
three answered (paired by prompt set and text), with a 95% interval from a paired bootstrap over
those prompts: a prompt's three verdicts are resampled together (with several seeds, all of them). Resamples in which dense gains
nothing have no share; if more than 2.5% of them are such, no interval is given. With ``--json``
the output is then ``{"modes": [...], "gain": [...]}``. ``--rename OLD=NEW`` pools a mode that two
runs labelled differently (a tau calibrated in one run and passed as a number to the next); the
``--out`` rows carry the new name.

``--paired A,B`` (repeatable) compares two modes prompt by prompt: over the harmful prompts both
answered, the mean difference A - B in refusal (points) and in reward, each with its paired standard
error (the standard deviation of the per-prompt differences over sqrt(n)). "Measurably better"
in docs/RESULTS.md means a difference above twice that error. Two runs that used the same mode
name (two value models, say) pair after one is written out with ``--rename ... --out``.

Answers pair by prompt set, prompt text and seed, so runs with different ``--seed`` pool: a
prompt's answers under each seed count once each in the rates, the bootstrap resamples prompts
with all their seeds together, and ``--paired`` averages each prompt's differences over its seeds
before taking the standard error over prompts. Answers without a seed pair by prompt alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sia_edge.cli_common import CliError, CliParser
from sia_edge.eval import metrics
from sia_edge.eval.records import sampling_decisions
from sia_edge.files import atomic_output, commit_output

__all__ = [
    "format_gain",
    "format_paired",
    "format_table",
    "gain_shares",
    "main",
    "paired_difference",
    "read_answers",
    "rescore",
    "summarise",
]

REQUIRED = ("mode", "text", "harmful", "refused", "reward")


def read_answers(path: Path) -> list[dict[str, Any]]:
    """The rows of one eval outputs file, or an error naming the file, line and problem."""
    from sia_edge.prompts import iter_jsonl

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
    from sia_edge.rewards import is_refusal, safety_reward

    new = dict(row, old_refused=row["refused"], old_reward=row["reward"])
    new["refused"] = is_refusal(row["text"])
    tox = row.get("toxicity")
    if tox is not None and row["harmful"] is not None:
        new["reward"] = safety_reward(row.get("prompt", ""), row["text"], bool(row["harmful"]), tox=float(tox))
    return new


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (mode, kind), in the order the modes first appear."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        kind = {True: "harmful", False: "benign"}.get(r["harmful"], "unlabelled")
        groups.setdefault((str(r["mode"]), kind), []).append(r)
    out = []
    for (mode, kind), g in groups.items():
        before, before_se = metrics.rate_with_se([float(r["old_refused"]) for r in g])
        after, after_se = metrics.rate_with_se([float(r["refused"]) for r in g])
        rewards_before = [float(r["old_reward"]) for r in g if r["old_reward"] is not None]
        rewards_after = [float(r["reward"]) for r in g if r["reward"] is not None]
        entry: dict[str, Any] = {
            "mode": mode, "kind": kind, "n": len(g),
            "refusal_rate_before": before, "refusal_rate_before_se": before_se,
            "refusal_rate": after, "refusal_rate_se": after_se,
            "changed": sum(r["refused"] != r["old_refused"] for r in g),
        }
        if rewards_before and rewards_after:
            entry["mean_reward_before"], _ = metrics.mean_with_se(rewards_before)
            entry["mean_reward"], entry["mean_reward_se"] = metrics.mean_with_se(rewards_after)
        out.append(entry)
    return out


Answer = tuple[str, str, Any]  # (set, prompt, seed): modes pair on it; the same prompt under another seed pools


def _prompt_of(answer: Answer) -> tuple[str, str]:
    """The unit a bootstrap or a standard error resamples: the prompt, with all its seeds."""
    return answer[0], answer[1]


def _harmful_answers(rows: Sequence[dict[str, Any]]) -> dict[str, dict[Answer, dict[str, Any]]]:
    """mode -> (set, prompt, seed) -> answer row, over the harmful answers; a prompt answered twice
    in one mode with the same seed is an error (two runs of the same prompts, which do not pair)."""
    out: dict[str, dict[Answer, dict[str, Any]]] = {}
    for r in rows:
        if r["harmful"] is not True:
            continue
        if not isinstance(r.get("prompt"), str):
            raise CliError(f"mode {r['mode']}: an answer row without its prompt cannot be paired for --gain; "
                           "pass the --outputs file of sia_edge.eval")
        key = (str(r.get("set", "")), r["prompt"], r.get("seed"))
        by_prompt = out.setdefault(str(r["mode"]), {})
        if key in by_prompt:
            raise CliError(f"mode {r['mode']} answers the prompt {key[1][:60]!r} twice with the same seed; pass "
                           "the files of runs over disjoint prompts or with different --seed (or --rename one "
                           "run's mode)")
        by_prompt[key] = r
    return out


def _intervention(rows: Sequence[dict[str, Any]]) -> float | None:
    """Junctions per sampling decision, pooled as the eval pools them (None without stats)."""
    stats: list[dict[str, Any]] = [r.get("stats") or {} for r in rows]
    if not all("junctions" in st and "tokens" in st for st in stats):
        return None
    # Best-of-N rows count the junctions of all N samples, and their sampling decisions as sample_tokens
    steps = sum(int(st.get("sample_tokens", sampling_decisions(int(st["tokens"]), st.get("stop_reason"))))
                for st in stats)
    return sum(int(st["junctions"]) for st in stats) / steps if steps else None


def gain_shares(rows: Sequence[dict[str, Any]], off: str, dense: str) -> list[dict[str, Any]]:
    """Each other mode's share of ``dense``'s refusal gain over ``off`` (see the module docstring)."""
    verdicts = _harmful_answers(rows)
    for name in (off, dense):
        if name not in verdicts:
            raise CliError(f"--gain: no harmful answers of mode {name!r}; the modes are "
                           f"{', '.join(verdicts) or '(none)'}")
    rng = np.random.default_rng(metrics.BOOTSTRAP_SEED)  # one generator for all modes, in their order
    out = []
    for mode, answers in verdicts.items():
        if mode in (off, dense):
            continue
        prompts = [p for p in answers if p in verdicts[off] and p in verdicts[dense]]
        entry: dict[str, Any] = {"mode": mode, "n": len(prompts), "share": None, "share_ci95": None,
                                 "intervention_rate": _intervention([answers[p] for p in prompts])}
        out.append(entry)
        if not prompts:
            continue
        table = np.array([[verdicts[off][p]["refused"], answers[p]["refused"], verdicts[dense][p]["refused"]]
                          for p in prompts], dtype=np.float64)
        gain = metrics.share_of_gain([_prompt_of(p) for p in prompts], table, rng)
        entry["prompts"] = gain.units
        entry.update(refusal_off=gain.baseline, refusal=gain.mode, refusal_dense=gain.full)
        if gain.share is None:
            continue  # dense gained nothing: no share to speak of
        entry["share"] = gain.share
        entry["resamples_without_gain"] = gain.resamples_without_gain
        if gain.ci95 is not None:
            entry["share_ci95"] = list(gain.ci95)
    return out


def paired_difference(rows: Sequence[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """Mode ``a`` minus mode ``b`` over the harmful answers both gave to the same prompt and seed,
    averaged per prompt first (see the module docstring)."""
    verdicts = _harmful_answers(rows)
    for name in (a, b):
        if name not in verdicts:
            raise CliError(f"--paired: no harmful answers of mode {name!r}; the modes are "
                           f"{', '.join(verdicts) or '(none)'}")
    pairs = [p for p in verdicts[a] if p in verdicts[b]]
    entry: dict[str, Any] = {"a": a, "b": b, "n": len(pairs)}
    measures = ("refused", "reward")
    diffs = np.array([[float(verdicts[a][p][k]) - float(verdicts[b][p][k]) for k in measures]
                      for p in pairs], dtype=np.float64).reshape(len(pairs), len(measures))
    entry["prompts"], per_measure = metrics.paired_differences([_prompt_of(p) for p in pairs], diffs)
    for key, (mean, se) in zip(measures, per_measure, strict=True):
        entry[f"{key}_diff"], entry[f"{key}_diff_se"] = mean, se
    return entry
def format_paired(entries: Sequence[dict[str, Any]]) -> str:
    head = f"{'A - B over the harmful prompts both answered':<60} {'n':>4}  {'refusal (points)':>16}  {'reward':>14}"
    lines = [head, "-" * len(head)]
    for e in entries:
        refusal, reward = _format_diff(e, "refused", 100), _format_diff(e, "reward", 1)
        lines.append(f"{e['a'] + ' - ' + e['b']:<60} {e['n']:>4}  {refusal:>16}  {reward:>14}")
    return "\n".join(lines)


def _format_diff(entry: dict[str, Any], key: str, scale: float) -> str:
    mean, se = entry[f"{key}_diff"], entry[f"{key}_diff_se"]
    if mean is None:
        return "-"
    return f"{mean * scale:+.2f}" + ("" if se is None else f" ± {se * scale:.2f}")


def format_gain(entries: Sequence[dict[str, Any]], off: str, dense: str) -> str:
    head = (f"{'mode':<22} {'n':>4}  {'interv.':>7}  {'refusal':>7}  "
            f"share of {dense}'s gain over {off} [95% bootstrap interval]")
    lines = [head, "-" * len(head)]
    for e in entries:
        share = "-" if e["share"] is None else f"{e['share']:.0%}"
        if e["share_ci95"] is not None:
            share += f" [{e['share_ci95'][0]:.0%}, {e['share_ci95'][1]:.0%}]"
        elif e["share"] is not None:
            share += " [no interval: dense gains nothing in too many resamples]"
        refusal = f"{e['refusal']:.1%}" if "refusal" in e else "-"
        interv = "-" if e["intervention_rate"] is None else f"{e['intervention_rate']:.1%}"
        lines.append(f"{e['mode']:<22} {e['n']:>4}  {interv:>7}  {refusal:>7}  {share}")
    return "\n".join(lines)


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
    ap = CliParser(prog="rescore_answers.py", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("answers", nargs="+", type=Path, help="the --outputs JSONL file(s) of sia_edge.eval")
    ap.add_argument("--out", type=Path, help="write the rescored rows (with old_refused, old_reward) here")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    ap.add_argument("--gain", metavar="OFF,DENSE",
                    help="also give each other mode's share of DENSE's harmful refusal gain over OFF, with a "
                         "paired bootstrap 95%% interval (for example --gain off,dense)")
    ap.add_argument("--paired", action="append", default=[], metavar="A,B",
                    help="also give mode A minus mode B in refusal and reward over the harmful prompts both "
                         "answered, with paired standard errors; repeatable")
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                    help="read mode OLD as NEW (pools one mode that two runs labelled differently); repeatable")
    args = ap.parse_args(argv)
    gain_modes: tuple[str, str] | None = None
    if args.gain is not None:
        parts = [m.strip().lower() for m in args.gain.split(",")]
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise CliError(f"--gain takes two different modes, OFF,DENSE (for example off,dense), got {args.gain!r}")
        gain_modes = (parts[0], parts[1])
    pairs: list[tuple[str, str]] = []
    for item in args.paired:
        parts = [m.strip().lower() for m in item.split(",")]
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise CliError(f"--paired takes two different modes, A,B (for example sparse,random@sparse), got {item!r}")
        pairs.append((parts[0], parts[1]))
    renames: dict[str, str] = {}
    for item in args.rename:
        old, eq, new = item.partition("=")
        if not eq or not old.strip() or not new.strip():
            raise CliError(f"--rename takes OLD=NEW (for example sparse@1.7=sparse@30%), got {item!r}")
        renames[old.strip().lower()] = new.strip().lower()
    if args.out is not None and args.out.is_dir():
        raise CliError(f"--out: {args.out} is a directory; give a file name")
    if args.out is not None and any(args.out.resolve() == p.resolve() for p in args.answers):
        raise CliError(f"--out: {args.out} is one of the inputs; write the rescored rows to a new file")
    rows = [rescore(r) for path in args.answers for r in read_answers(path)]
    unknown = sorted(set(renames) - {str(r["mode"]) for r in rows})
    if unknown:
        raise CliError(f"--rename: no answers of mode {unknown[0]!r} in the files")
    for r in rows:
        r["mode"] = renames.get(str(r["mode"]), r["mode"])
    gains = gain_shares(rows, *gain_modes) if gain_modes is not None else None  # its errors before --out
    paired = [paired_difference(rows, a, b) for a, b in pairs]
    if args.out is not None:
        tmp = atomic_output(args.out)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        commit_output(tmp, args.out)
    entries = summarise(rows)
    if args.json:
        out: Any = entries
        if gains is not None or paired:
            out = {"modes": entries, **({"gain": gains} if gains is not None else {}), **({"paired": paired} if paired else {})}
        print(json.dumps(out, indent=1))
    else:
        print(format_table(entries))
        if gains is not None and gain_modes is not None:
            print()
            print(format_gain(gains, *gain_modes))
        if paired:
            print()
            print(format_paired(paired))
    return 0
