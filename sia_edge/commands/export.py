"""Export a trained value model to GGUF for llama.cpp, quantised (f16, q8_0, q4_k_m), and check
that llama.cpp computes the same values as PyTorch.

    sia-edge export runs/safety --out models/value-smollm2-safety --check
        -> models/value-smollm2-safety-f16.gguf, -q8_0.gguf, -q4_k_m.gguf
    sia-edge export --self-check --json      # the whole pipeline on a tiny random llama

The value GGUF is the backbone's GGUF with the merged LoRA weights, its first --layers blocks and
the value head: any architecture both llama.cpp and transformers' GGUF loader run.

--check compares on held sequences (the eval split of the training data, or --check-data):
max abs error of the normalised V at every position, and top-1 agreement of the candidate
ranking at junctions (base model's top-k entropy >= --tau), per quantisation type.
"""

from __future__ import annotations

from sia_edge import _early_sigint  # noqa: F401  (first: a Ctrl-C while the imports below run exits quietly)

# isort: split
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sia_edge.cli_common import CliParser, finite_float, positive_int, thread_count


def _check_sequences(model_dir: Path, check_data: str | None, n: int) -> list[tuple[list[int], list[int]]]:
    from sia_edge.train import TrainError
    from sia_edge.train.data import read_value_rows, split_rows
    from sia_edge.train.model import META_FILE, ValueMeta

    if check_data:
        rows = read_value_rows([check_data])
    else:
        meta = ValueMeta.from_file(model_dir / META_FILE)
        files = [f for f in meta.training.get("data", []) if Path(f).is_file()]
        if not files:
            raise TrainError("the training data is gone: pass --check-data DATA.jsonl for the parity check")
        train_rows, held = split_rows(read_value_rows(files), float(meta.training.get("eval_fraction", 0.1)),
                                      int(meta.training.get("seed", 0)))
        rows = held + train_rows  # held-out rows first
    max_len = 512
    return [(r.prompt_ids, r.response_ids[: max(1, max_len - len(r.prompt_ids))]) for r in rows[:n]]


def main(argv: Sequence[str] | None = None) -> int:
    ap = CliParser(prog="sia-edge export", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", nargs="?", help="trained value model directory (train_value.py --out)")
    ap.add_argument("--out", help="output prefix: PREFIX-f16.gguf, PREFIX-q8_0.gguf, ...")
    ap.add_argument("--base", default=None,
                    help="base model GGUF (default: the one the training data was sampled from)")
    ap.add_argument("--backbone", default=None, help="backbone path, if it moved since training")
    ap.add_argument("--types", default="f16,q8_0,q4_k_m", help="comma-separated: f32, f16, q8_0, q4_k_m")
    ap.add_argument("--check", action="store_true", help="parity check PyTorch vs llama.cpp per type")
    ap.add_argument("--check-data", default=None, help="value-data JSONL for --check (default: training data)")
    ap.add_argument("--check-rows", type=positive_int, default=8)
    ap.add_argument("--k", type=positive_int, default=10, help="candidates per junction (base model's top-k)")
    ap.add_argument("--tau", type=finite_float, default=1.0, help="junction threshold on top-k entropy (nats)")
    ap.add_argument("--junctions-per-row", type=positive_int, default=4)
    ap.add_argument("--self-check", action="store_true",
                    help="train, export and check a tiny random llama in a temporary folder")
    ap.add_argument("--steps", type=positive_int, default=40, help="training steps of --self-check")
    ap.add_argument("--keep", default=None, help="--self-check: keep its files in this directory")
    ap.add_argument("--steering-w", type=float, default=None, metavar="W",
                    help="recommend this steering strength in the GGUF (the chat and server use it when no "
                    "--w is given; default: value_meta.json's 'steering', if any)")
    ap.add_argument("--steering-target-ratio", type=float, default=None, metavar="R",
                    help="recommend this junction budget in (0, 1), used when no --tau or --target-ratio is given")
    ap.add_argument("--steering-tau", type=float, default=None, metavar="T",
                    help="recommend this threshold instead of a junction budget (replaces the recommended target "
                    "ratio): the entropy gate's in nats, or with --steering-gate shift a share of probability")
    ap.add_argument("--steering-gate", default=None, metavar="MODE",
                    help="recommend this mode (sparse, shift, ...), with --steering-tau as its threshold; a "
                    "--steering-tau without it is the entropy gate's and drops a recommended mode")
    ap.add_argument("--steering-horizon", type=int, default=None, metavar="N",
                    help="recommend steering only within the first N tokens of an answer (0: drop the recommendation)")
    ap.add_argument("--threads", type=thread_count, default=None)
    ap.add_argument("--json", action="store_true", help="print the parity report as JSON on stdout")
    args = ap.parse_args(argv)
    from sia_edge.kernels import MAX_TOP_K

    if args.k > MAX_TOP_K:
        ap.error(f"--k must be at most {MAX_TOP_K}, got {args.k}")
    from sia_edge.train import quiet_library_warnings

    quiet_library_warnings()
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    log = (lambda s: print(s, file=sys.stderr))

    if args.self_check:
        from sia_edge.train.selfcheck import self_check

        checked = self_check(base_gguf=args.base, work_dir=args.keep, steps=args.steps, types=types,
                             n_threads=args.threads, log=log)
        if not args.keep:
            checked.pop("files", None)
        print(json.dumps(checked, indent=2) if args.json else _table(checked))
        return 0

    if not args.model_dir or not args.out:
        ap.error("give a value model directory and --out PREFIX (or --self-check)")
    from sia_edge.train import TrainError

    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():  # before importing torch: a typo should fail fast
        what = "is a file, not a directory" if model_dir.exists() else "does not exist"
        raise TrainError(f"value model directory {model_dir} {what}; pass train_value.py's --out directory")
    from sia_edge.train.export import export_value_model

    steering = None
    given = {k: v for k, v in (("w", args.steering_w), ("target_ratio", args.steering_target_ratio),
                               ("tau", args.steering_tau), ("horizon", args.steering_horizon),
                               ("gate", args.steering_gate)) if v is not None}
    if given:
        from sia_edge.train.meta import merge_steering
        from sia_edge.train.model import META_FILE, ValueMeta

        steering = merge_steering(ValueMeta.from_file(model_dir / META_FILE).steering, given)
    sequences = _check_sequences(model_dir, args.check_data, args.check_rows) if args.check else None
    paths, report = export_value_model(
        model_dir, args.out, base_gguf=args.base, backbone=args.backbone, types=types,
        check_sequences=sequences, check_k=args.k, check_tau=args.tau, check_per_sequence=args.junctions_per_row,
        n_threads=args.threads, steering=steering, log=log,
    )
    for t, p in paths.items():
        log(f"{t}: {p}")
    if report is not None:
        d = report.as_dict()
        print(json.dumps(d, indent=2) if args.json else _table(d))
    return 0


def _table(report: dict[str, object]) -> str:
    lines = [f"{'type':8} {'max_abs_err':>12} {'top1_agreement':>15}"]
    for t, v in report.items():
        if isinstance(v, dict) and "max_abs_err" in v:
            lines.append(f"{t:8} {v['max_abs_err']:12.5f} {v['top1_agreement']:15.3f}")
    lines += [f"{k}: {v}" for k, v in report.items() if not isinstance(v, dict)]
    return "\n".join(lines)

