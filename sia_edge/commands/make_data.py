"""Sample responses from a base GGUF for a file of prompts, score them with a reward, and write
value-model training data (JSONL). Resumable: rerun the same command after an interrupt.

    sia-edge make-data prompts.jsonl --out data/safety.jsonl --reward safety --samples-per-prompt 4

Prompts: a .jsonl file of {"prompt": ..., "harmful": true|false, "system": ...} rows, or a text
file with one prompt per line (then --harmful or --benign says which they are, for the safety
reward). Rewards: safety (built in), module:function, path/to/file.py:function, jsonl:LABELS,
hf:REWARD_MODEL_DIR. See docs/TRAINING.md.
"""

from __future__ import annotations

from sia_edge import _early_sigint  # noqa: F401  (first: a Ctrl-C while the imports below run exits quietly)

# isort: split
import sys
from collections.abc import Sequence

from sia_edge.cli_common import CliParser, finite_float, positive_int, seed_int, thread_count


def main(argv: Sequence[str] | None = None) -> int:
    ap = CliParser(prog="sia-edge make-data", description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts", help="prompt file (.jsonl rows with 'prompt' and 'harmful', or .txt lines)")
    ap.add_argument("--out", required=True, help="output JSONL (appended to; existing rows are skipped)")
    ap.add_argument("--model", default=None, help="base model GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--reward", default="safety", help="safety | module:function | file.py:function | "
                    "jsonl:LABELS | hf:DIR (default: safety)")
    ap.add_argument("--samples-per-prompt", type=positive_int, default=1)
    ap.add_argument("--max-tokens", type=positive_int, default=256)
    ap.add_argument("--k", type=positive_int, default=10, help="top-k of the sampler (as the engine's gate 'off')")
    ap.add_argument("--temperature", type=finite_float, default=1.0)
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--n-ctx", type=positive_int, default=2048)
    ap.add_argument("--threads", type=thread_count, default=None)
    flag = ap.add_mutually_exclusive_group()
    flag.add_argument("--harmful", dest="harmful", action="store_const", const=True, default=None,
                      help="every prompt without a 'harmful' field is harmful")
    flag.add_argument("--benign", dest="harmful", action="store_const", const=False,
                      help="every prompt without a 'harmful' field is benign")
    ap.add_argument("--explore-first", action="store_true",
                    help="draw the first response token uniformly from the top-k (see docs/TRAINING.md)")
    ap.add_argument("--openings", metavar="FILE", default=None,
                    help="text file of forced openings, one per line: every response starts with one of them "
                    "and the base model continues it (off-policy data, e.g. data/openings/refusals.txt; "
                    "see docs/TRAINING.md)")
    ap.add_argument("--steer", metavar="MODE", default=None,
                    help="sample from a steered policy instead of the base model's own: an eval mode "
                    "(sparse@25%%, sparse@1.7, dense, random@0.3; see python -m sia_edge.eval --help) with "
                    "--value-model and --w (policy-iteration data; see docs/TRAINING.md)")
    ap.add_argument("--value-model", metavar="PATH.gguf", default=None,
                    help="the value model that --steer steers with (default: the default value model)")
    ap.add_argument("--w", type=finite_float, default=1.0, help="steering strength of --steer (default: %(default)s)")
    ap.add_argument("--prompt-style", choices=("auto", "chat", "text"), default="auto",
                    help="chat: each prompt is a user turn in the base model's chat template; text: it is "
                         "continued as plain text (base models, text prefixes); auto: chat if the model has a "
                         "template (default: %(default)s)")
    ap.add_argument("--overwrite", action="store_true", help="start the output file afresh")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from sia_edge.train import quiet_library_warnings

    quiet_library_warnings()
    from sia_edge.kernels import MAX_TOP_K

    if args.k > MAX_TOP_K:
        ap.error(f"--k must be at most {MAX_TOP_K}, got {args.k}")
    if args.steer is None and (args.value_model is not None or args.w != 1.0):
        ap.error("--value-model and --w only apply with --steer MODE")

    from sia_edge.models import default_base_model, default_value_model, resolve_gguf
    from sia_edge.rewards import load_reward
    from sia_edge.train.data import (
        SteeredPolicy,
        engine_sampler,
        generate_value_data,
        read_openings,
        read_prompts,
    )

    prompts = read_prompts(args.prompts, harmful=args.harmful)
    openings = read_openings(args.openings) if args.openings else []
    reward = load_reward(args.reward)
    steer = None
    if args.steer is not None:
        value = (resolve_gguf(args.value_model, "value model (--value-model)") if args.value_model
                 else default_value_model())
        steer = SteeredPolicy(args.steer, value, w=args.w)
    from sia_edge.gguf_io import read_gguf_kv

    base_path = resolve_gguf(args.model, "base model (--model)") if args.model else default_base_model()
    has_template = bool(read_gguf_kv(base_path).get("tokenizer.chat_template"))
    style = args.prompt_style if args.prompt_style != "auto" else "chat" if has_template else "text"
    if style == "chat" and not has_template:
        ap.error(f"{base_path.name} has no chat template: use --prompt-style text")
    sample, base_name, fingerprint, policy = engine_sampler(
        args.model, max_tokens=args.max_tokens, k=args.k, temperature=args.temperature, n_ctx=args.n_ctx,
        n_threads=args.threads, explore_first=args.explore_first, openings=openings, steer=steer,
    )
    try:
        n = generate_value_data(
            prompts, args.out, sample=sample, reward=reward, base_model=base_name, base_fingerprint=fingerprint,
            samples_per_prompt=args.samples_per_prompt, seed=args.seed, overwrite=args.overwrite,
            progress=not args.no_progress, explore_first=args.explore_first, openings=openings,
            policy=policy, prompt_style=style, base_path=base_path,
        )
    except KeyboardInterrupt:
        print(f"\nthe rows so far are in {args.out}; rerun the same command to resume", file=sys.stderr)
        raise
    print(f"wrote {n} new rows to {args.out}", file=sys.stderr)
    return 0

