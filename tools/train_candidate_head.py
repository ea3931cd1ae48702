#!/usr/bin/env python3
"""Train a value model's candidate head from its scalar head (sia_edge/train/candidate.py).

    python tools/train_candidate_head.py collect --out runs/candidate/states.npz
    python tools/train_candidate_head.py fit --states runs/candidate/states.npz \\
        --asset sia_edge/assets/value-smollm2-safety/candidate_head.safetensors

``collect`` answers the training prompts (never the held-out ones) within the steering horizon
and records, at every step, the base model's top-k, the scalar head's values and the value
model's hidden state. ``fit`` fits the head, prints how closely it steers like the scalar head
on held-out training prompts (JSON), and writes the head as a preset asset (``--asset``) and/or
into a copy of the value GGUF (``--out-gguf``). Every write is atomic.

A shallower student (docs/TRAINING.md, "A shallower student"): ``student`` cuts a preset's value
model to its first N layers (assets and GGUF); ``collect --student GGUF`` records its hidden states
beside the teacher's; ``fit --hidden hidden_student0 --value-model GGUF --student-assets DIR``
fits its candidate head and its own V(s) on them and writes both into its assets, recommending
the candidate head.
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
    part, parts = args.part
    numbers = list(range(len(prompts)))[part::parts]
    prompts = prompts[part::parts]
    with SteeringEngine(args.model, args.value_model, n_threads=args.threads) as eng:
        chat = args.prompt_style == "chat" or (args.prompt_style == "auto" and bool(eng.base.chat_template))
        if chat and not eng.base.chat_template:
            raise SystemExit(f"error: {eng.base.path.name} has no chat template; pass --prompt-style text "
                             "(its prompts are text to continue)")

        def progress(i: int, n: int) -> None:
            if i % 25 == 0 or i == n:
                print(f"[collect] {i}/{n} prompts", file=sys.stderr, flush=True)

        n = collect_states(eng, prompts, args.out, k=args.k, horizon=args.horizon, w=args.w, seed=args.seed,
                           students=args.student, numbers=numbers, chat=chat, progress=progress)
    print(json.dumps({"states": n, "prompts": len(prompts), "out": str(args.out)}))
    return 0


def fit(args: argparse.Namespace) -> int:
    import dataclasses

    from sia_edge.train.candidate import (
        fit_candidate_head,
        install_student_heads,
        load_states,
        save_head_asset,
        token_embeddings,
    )
    from sia_edge.value_format import read_value_meta, write_gguf_with_value_meta

    try:
        states, info = load_states(*args.states)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    w = info.get("w", 3.0)
    assert isinstance(w, (int, float))
    student = args.hidden != "hidden"
    if args.hidden not in states:
        raise SystemExit(f"error: the states hold no {args.hidden!r} (they hold "
                         f"{', '.join(k for k in states if k.startswith('hidden'))})")
    if student:
        import re

        names = info.get("students") or []
        if re.fullmatch(r"hidden_student\d+", args.hidden) is None:
            raise SystemExit(f"error: --hidden takes hidden or hidden_studentI, got {args.hidden!r}")
        i = int(args.hidden.removeprefix("hidden_student"))
        assert isinstance(names, list)
        if names[i] != args.value_model.name:
            raise SystemExit(f"error: {args.hidden} are the hidden states of {names[i]}; pass it as --value-model "
                             f"(got {args.value_model.name})")
        states = {**states, "hidden": states[args.hidden]}
    elif args.student_assets:
        raise SystemExit("error: --student-assets takes the heads fitted on a student's hidden states "
                         "(--hidden hidden_studentI)")
    meta = read_value_meta(args.value_model)
    result = fit_candidate_head(states, head_weight=meta.weight, head_bias=meta.bias,
                                embeddings=token_embeddings(args.value_model), rank=args.rank, epochs=args.epochs, lr=args.lr,
                                w=float(w), seed=args.seed, fit_state_value=student,
                                log=lambda m: print(f"[fit] {m}", file=sys.stderr, flush=True))
    meta = dataclasses.replace(meta, candidate=result.head)
    if result.state_head is not None:
        meta = dataclasses.replace(meta, weight=result.state_head[0], bias=result.state_head[1])
    if args.student_assets:
        install_student_heads(args.student_assets, result)
    if args.asset:
        save_head_asset(result.factors or result.head, args.asset, report=result.report)
    if args.out_gguf:
        write_gguf_with_value_meta(args.value_model, args.out_gguf, meta)
    print(json.dumps({"report": result.report, "asset": str(args.asset or ""), "gguf": str(args.out_gguf or "")}))
    return 0


def student(args: argparse.Namespace) -> int:
    from sia_edge.presets import get_preset
    from sia_edge.train.candidate import make_student_assets
    from sia_edge.train.merge import build_value_gguf

    teacher = get_preset(args.preset)
    folder = make_student_assets(teacher.assets_dir, args.out_assets, args.layers)
    if args.layers == 0:  # the base model itself records its states: a copy of it with value keys
        import dataclasses

        from sia_edge.value_format import read_value_meta, write_gguf_with_value_meta

        meta = read_value_meta(teacher.value_model())
        write_gguf_with_value_meta(teacher.base_model(), args.out_gguf,
                                   dataclasses.replace(meta, candidate=None, steering_value_head=None))
        out = args.out_gguf
    else:
        out = build_value_gguf(folder, args.out_gguf, backbone=teacher.base_model(), n_threads=args.threads,
                               log=lambda m: print(f"[student] {m}", file=sys.stderr, flush=True))
    print(json.dumps({"assets": str(folder), "gguf": str(out), "layers": args.layers}))
    return 0


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part takes I/N, e.g. 0/2; got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--part I/N needs 0 <= I < N; got {text!r}")
    return i, n


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
    c.add_argument("--part", type=_part, default=(0, 1), metavar="I/N",
                   help="only every N-th prompt from the I-th (0-based): N processes collect at once; "
                        "fit takes their files together")
    c.add_argument("--student", type=Path, action="append", default=[],
                   help="also record the hidden states of this value GGUF (a shallower copy, say); repeatable")
    c.add_argument("--prompt-style", choices=("auto", "chat", "text"), default="auto",
                   help="chat: each prompt is a user turn; text: text the base model continues; auto "
                        "(default): chat if the base model has a chat template")
    c.add_argument("--threads", type=int, default=None)
    s = sub.add_parser("student", help="cut a preset's value model to its first N layers (assets and GGUF)")
    s.add_argument("--preset", default="smollm2-safety", help="the teacher (default: %(default)s)")
    s.add_argument("--layers", type=int, required=True,
                   help="decoder layers the student keeps; 0: none, its heads read the base model's own hidden state")
    s.add_argument("--out-assets", type=Path, required=True, help="the student's assets folder")
    s.add_argument("--out-gguf", type=Path, required=True,
                   help="its value GGUF (q8_0; with --layers 0 a copy of the base model), for collect --student")
    s.add_argument("--threads", type=int, default=None)
    f = sub.add_parser("fit", help="fit the head and write it")
    f.add_argument("--states", type=Path, nargs="+", required=True, help="one or more files of collect")
    f.add_argument("--hidden", default="hidden",
                   help="which recorded hidden state the head reads: hidden (the value model's) or "
                        "hidden_studentI (collect's I-th --student; write the head into that GGUF)")
    f.add_argument("--value-model", type=Path, default=None)
    f.add_argument("--rank", type=int, default=32)
    f.add_argument("--epochs", type=int, default=12)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--asset", type=Path, default=None, help="write the head as a preset asset (.safetensors)")
    f.add_argument("--out-gguf", type=Path, default=None, help="write a copy of the value GGUF with the head")
    f.add_argument("--student-assets", type=Path, default=None,
                   help="a student's assets folder (student): write the heads fitted on its hidden states there")
    args = ap.parse_args()
    if getattr(args, "value_model", "") is None:
        args.value_model = default_value_model()
    if args.command == "collect":
        return collect(args)
    if args.command == "student":
        return student(args)
    return fit(args)


if __name__ == "__main__":
    sys.exit(main())
