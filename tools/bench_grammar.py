#!/usr/bin/env python3
"""What a JSON-schema request costs per token, against the same request unconstrained, side by
side in one run, on SmolLM2-135M-Instruct and the default value model.

    python tools/bench_grammar.py --json [--prompts 6] [--tokens 48] [--threads 1]

For each prompt and each mode (off, and the value model's recommended steering), the
unconstrained and the constrained answer run back to back, so machine noise hits them alike.
Correctness first: every constrained answer that finished must parse as JSON and match the
schema's required keys and enum, else the script exits 1. ms_per_token excludes the prefill;
figures are medians over prompts; grammar_ms_per_token is the masking alone.
"""

from __future__ import annotations

from sia_edge import _early_sigint  # noqa: F401  (first: a Ctrl-C while the imports below run exits quietly)

# isort: split
import argparse
import json
import statistics
import sys
from collections.abc import Sequence

from sia_edge.cli_common import run_cli
from sia_edge.engine import SteeringEngine
from sia_edge.grammar import json_schema
from sia_edge.models import default_value_model
from sia_edge.steering import SteeringConfig

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"}, "mood": {"type": "string", "enum": ["happy", "sad", "calm"]},
                         "age": {"type": "integer"}},
          "required": ["name", "mood", "age"], "additionalProperties": False}
PROMPTS = ["Describe a person as JSON.", "Invent a character for a story, as JSON.", "Who is your best friend? JSON.",
           "Describe a cat as if it were a person, in JSON.", "Make up a neighbour, as JSON.",
           "Describe a teacher in JSON.", "Describe a sailor in JSON.", "Describe a baker in JSON."]


def check(text: str) -> None:
    answer = json.loads(text)
    if set(answer) != {"name", "mood", "age"} or answer["mood"] not in ("happy", "sad", "calm") \
            or not isinstance(answer["age"], int):
        raise ValueError(f"the answer does not match the schema: {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_grammar.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    engine = SteeringEngine(value_model=default_value_model(), n_threads=args.threads)
    grammar = json_schema(SCHEMA)
    modes = {"off": SteeringConfig(gate="off"), "recommended": engine.recommended()}
    rows: dict[str, dict[str, list[float]]] = {f"{m}{s}": {"ms_per_token": [], "grammar_ms_per_token": []}
                                               for m in modes for s in ("", "+json_schema")}
    finished = 0
    for i, prompt in enumerate(PROMPTS[: args.prompts]):
        messages = [{"role": "user", "content": prompt}]
        for name, config in modes.items():
            for suffix, g in (("", None), ("+json_schema", grammar)):
                text, st = engine.complete(messages, max_tokens=args.tokens, config=config, seed=i, grammar=g)
                if g is not None and st.stop_reason == "eos":
                    check(text)
                    finished += 1
                per = max(st.tokens, 1)
                rows[name + suffix]["ms_per_token"].append((st.total_ms - st.prefill_ms) / per)
                rows[name + suffix]["grammar_ms_per_token"].append(st.grammar_ms / per)
    report: dict[str, object] = {
        "prompts": args.prompts, "max_tokens": args.tokens, "threads": args.threads,
        "constrained_answers_finished_and_valid": finished,
        "modes": {name: {k: round(statistics.median(v), 3) for k, v in r.items()} for name, r in rows.items()},
    }
    medians = report["modes"]
    assert isinstance(medians, dict)
    report["ratios"] = {f"{m}+json_schema_over_{m}": round(medians[f"{m}+json_schema"]["ms_per_token"]
                                                          / medians[m]["ms_per_token"], 3) for m in modes}
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
