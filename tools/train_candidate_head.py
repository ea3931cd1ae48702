#!/usr/bin/env python3
"""Train a value model's candidate head from its scalar head (sia_edge/train/candidate.py).

    python tools/train_candidate_head.py collect --out runs/candidate/states.npz
    python tools/train_candidate_head.py fit --states runs/candidate/states.npz \\
        --asset sia_edge/assets/value-smollm2-safety/candidate_head.safetensors

``collect`` answers the training prompts (never the held-out ones) within the steering horizon
and records, at every step, the base model's top-k, the scalar head's values and the value
model's hidden state. ``fit`` fits the head, prints how closely it steers like the scalar head
on held-out training prompts (JSON), and writes the head as a preset asset (``--asset``) and/or
into a copy of the value GGUF (``--out-gguf``). Both writes are atomic.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN_PROMPTS = [REPO / "data/prompts/harmful_train.jsonl", REPO / "data/prompts/benign_train.jsonl"]


def collect(args: argparse.Namespace) -> int:
    from sia_edge.engine import SteeringEngine
    from sia_edge.prompts import read_prompt_file
    from sia_edge.train.candidate import collect_states

    prompts = [p for f in args.prompts for p in read_prompt_file(f)]
    if args.limit:
        prompts = prompts[: args.limit]
    with SteeringEngine(args.model, args.value_model, n_threads=args.threads) as eng:
        def progress(i: int, n: int) -> None:
            if i % 25 == 0 or i == n:
                print(f"[collect] {i}/{n} prompts", file=sys.stderr, flush=True)

        n = collect_states(eng, prompts, args.out, k=args.k, horizon=args.horizon, w=args.w, seed=args.seed,
                           progress=progress)
    print(json.dumps({"states": n, "prompts": len(prompts), "out": str(args.out)}))
    return 0


def fit(args: argparse.Namespace) -> int:
    from sia_edge.train.candidate import fit_candidate_head, load_states, save_head_asset, token_embeddings
    from sia_edge.value_format import read_value_meta, write_gguf_with_value_meta

    states, info = load_states(args.states)
    w = info.get("w", 3.0)
    assert isinstance(w, (int, float))
    meta = read_value_meta(args.value_model)
    result = fit_candidate_head(states, head_weight=meta.weight, head_bias=meta.bias,
                                embeddings=token_embeddings(args.value_model), rank=args.rank, epochs=args.epochs, lr=args.lr,
                                w=float(w), seed=args.seed,
                                log=lambda m: print(f"[fit] {m}", file=sys.stderr, flush=True))
    if args.asset:
        save_head_asset(result.head, args.asset, report=result.report)
    if args.out_gguf:
        import dataclasses

        write_gguf_with_value_meta(args.value_model, args.out_gguf, dataclasses.replace(meta, candidate=result.head))
    print(json.dumps({"report": result.report, "asset": str(args.asset or ""), "gguf": str(args.out_gguf or "")}))
    return 0


def main() -> int:
    from sia_edge.models import default_value_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="record the scalar head's values at the states steering visits")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--prompts", type=Path, nargs="+", default=TRAIN_PROMPTS)
    c.add_argument("--model", type=Path, default=None, help="base GGUF (default: the default base model)")
    c.add_argument("--value-model", type=Path, default=None)
    c.add_argument("--k", type=int, default=10)
    c.add_argument("--horizon", type=int, default=16)
    c.add_argument("--w", type=float, default=3.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--limit", type=int, default=None)
    c.add_argument("--threads", type=int, default=None)
    f = sub.add_parser("fit", help="fit the head and write it")
    f.add_argument("--states", type=Path, required=True)
    f.add_argument("--value-model", type=Path, default=None)
    f.add_argument("--rank", type=int, default=32)
    f.add_argument("--epochs", type=int, default=12)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--asset", type=Path, default=None, help="write the head as a preset asset (.safetensors)")
    f.add_argument("--out-gguf", type=Path, default=None, help="write a copy of the value GGUF with the head")
    args = ap.parse_args()
    if args.value_model is None:
        args.value_model = default_value_model()
    if args.command == "collect":
        return collect(args)
    return fit(args)


if __name__ == "__main__":
    sys.exit(main())
