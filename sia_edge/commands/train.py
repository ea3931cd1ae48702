"""Train a value model (LoRA + Linear(hidden, 1) head) on value data from make_value_data.py.

    sia-edge train data/safety.jsonl --out runs/safety            # backbone: the data's base model
    torchrun --nproc-per-node 4 -m sia_edge train data/*.jsonl --out runs/safety

Rerunning the same command resumes from the newest checkpoint in --out (--restart discards them).
Writes the adapter (peft format), value_head.safetensors, value_meta.json, metrics.jsonl and
training_curve.png into --out. See docs/TRAINING.md.
"""

from __future__ import annotations

from sia_edge import _early_sigint  # noqa: F401  (first: a Ctrl-C while the imports below run exits quietly)

# isort: split
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from sia_edge.cli_common import CliParser, seed_int, thread_count


def main(argv: Sequence[str] | None = None) -> int:
    ap = CliParser(prog="sia-edge train", description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+", help="value-data JSONL file(s)")
    ap.add_argument("--out", required=True, help="output directory (model, checkpoints, metrics, curve)")
    ap.add_argument("--backbone", default=None,
                    help="GGUF file or Hugging Face directory (default: the base model the data was sampled from)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-lr", type=float, default=None, help="learning rate of the head (default: --lr)")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=4, help="rows per forward pass and process")
    ap.add_argument("--grad-accum", type=int, default=4, help="forward passes per optimizer step")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--eval-fraction", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--lora-dropout", type=float, default=0.1)
    ap.add_argument("--lora-targets", default=None,
                    help="comma-separated module names (default: the attention projections, "
                    "q_proj,k_proj,v_proj,o_proj, or qkv_proj,o_proj where q/k/v are one tensor as in Phi-3)")
    ap.add_argument("--layers", type=int, default=None, metavar="N",
                    help="keep only the first N decoder layers of the backbone: a shallower value model "
                    "costs about N/L of a full one per junction (default: all layers)")
    ap.add_argument("--objective", default=None, help="what 'good' meant (default: the reward's name)")
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--threads", type=thread_count, default=None)
    ap.add_argument("--restart", action="store_true", help="discard checkpoints in --out instead of resuming")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():  # before loading torch and the backbone
        ap.error(f"--out {args.out} is a file; training writes a directory there: pass a new or existing directory")
    from sia_edge.train import quiet_library_warnings

    quiet_library_warnings()

    from sia_edge.train.export import default_lora_targets
    from sia_edge.train.model import LORA_TARGETS, LoraSettings, check_backbone_path, is_gguf_file
    from sia_edge.train.trainer import TrainConfig, backbone_for_data, train

    targets = (tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets is not None
               else LORA_TARGETS)
    cfg = TrainConfig(
        data=list(args.data), backbone=str(args.backbone or ""), out_dir=args.out,
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets),
        lr=args.lr, head_lr=args.head_lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps,
        max_length=args.max_length, eval_fraction=args.eval_fraction, eval_every=args.eval_every,
        save_every=args.save_every, seed=args.seed, objective=args.objective, progress=not args.no_progress,
        restart=args.restart, n_threads=args.threads, layers=args.layers,
    )
    cfg.validate()  # bad settings fail before the data is read
    # Training follows the data: the backbone is the model the data was sampled from, and the
    # LoRA targets that model's attention projections, unless told otherwise.
    backbone = check_backbone_path(args.backbone) if args.backbone else backbone_for_data(args.data)
    cfg.backbone = str(backbone)
    if args.lora_targets is None and is_gguf_file(backbone):
        cfg.lora = replace(cfg.lora, targets=default_lora_targets(backbone))
    log = (lambda s: print(s, file=sys.stderr))
    result = train(cfg, log=log)
    if args.json and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(json.dumps({
            "out_dir": str(result.out_dir), "steps": result.steps,
            "loss_before": result.train_loss_before, "loss_after": result.train_loss_after,
            "eval_before": result.eval_before, "eval_after": result.eval_after,
            "reward_mean": result.reward_mean, "reward_std": result.reward_std,
        }, indent=2))
    return 0

