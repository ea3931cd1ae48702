"""Tiny randomly initialised causal LMs with real tokenizers, for self-checks and tests: the whole
pipeline runs on them in seconds, nothing is downloaded.

``build_tiny_model`` writes a Hugging Face directory of one of ``TINY_ARCHS`` (llama with default
or llama3 RoPE, mistral, qwen2, qwen3, gemma3, phi3); llama.cpp's own converter
(``export.hf_to_gguf``) turns it into the GGUF a value model is trained from and exported with.
The tokenizer is either a Hugging Face tokenizer (by default SmolLM2's, read from its GGUF, so the
token ids match that base model) or a SentencePiece model (``build_spm_tokenizer``), which the
converter writes as an SPM vocabulary as it does for Gemma and Phi-3.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from sia_edge.train import TrainError

__all__ = [
    "TINY_ARCHS",
    "TINY_DEFAULTS",
    "build_spm_tokenizer",
    "build_tiny_llama",
    "build_tiny_model",
    "load_gguf_tokenizer",
]

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

# What each tiny architecture changes from TINY_DEFAULTS, beside its config class. Where a GGUF
# does not carry a setting, transformers' GGUF loader assumes the value the family's real models
# use, so the tiny models use it too (Qwen3: head_dim 128; Gemma 3: head_dim 256, which is also
# its attention scale's query_pre_attn_scalar).
TINY_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    # llama3 RoPE scaling with a short original context, so that the rescaled low frequencies
    # turn by a visible angle within a test's few dozen positions
    "llama3": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"head_dim": 128}),  # per-head q/k norms
    "gemma3": ("Gemma3TextConfig", {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256,
                                    "query_pre_attn_scalar": 256, "sliding_window": 512}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False, "sliding_window": None,
                            "original_max_position_embeddings": 512}),  # fused qkv_proj and gate_up_proj
}


def load_gguf_tokenizer(gguf_path: str | os.PathLike[str]) -> Any:
    """The Hugging Face tokenizer stored in a GGUF (transformers' GGUF loader, offline)."""
    from transformers import AutoTokenizer

    p = Path(gguf_path)
    try:
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise TrainError(f"could not read the tokenizer of {p}: {exc}") from None


def build_spm_tokenizer(out_dir: str | os.PathLike[str], texts: Iterable[str], *, vocab_size: int = 384,
                        control_symbols: Sequence[str] = ("<|endoftext|>", "<|end|>")) -> Path:
    """Train a small SentencePiece model (BPE, byte fallback, as Gemma's) on ``texts``; returns
    the ``tokenizer.model`` it wrote. Ids: 0 unk, 1 bos, 2 eos, 3 pad, then ``control_symbols``
    (by default Phi-3's end tokens, which llama.cpp's vocabulary loader looks up by text in any
    model named phi3)."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=3, control_symbols=list(control_symbols),
        num_threads=1, minloglevel=2, hard_vocab_limit=False,
    )
    corpus.unlink()
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    return out / "tokenizer.model"


def _spm_size(path: Path) -> int:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    return int(sp.vocab_size())


def build_tiny_model(arch: str, out_dir: str | os.PathLike[str], tokenizer: Any, *, seed: int = 0,
                     vocab_size: int | None = None, **overrides: Any) -> Path:
    """Save a random causal LM of ``arch`` (one of ``TINY_ARCHS``) and its tokenizer into ``out_dir``.

    ``tokenizer``: a Hugging Face tokenizer (saved with the model) or the path of a SentencePiece
    ``tokenizer.model`` (copied). ``vocab_size`` pads the embedding beyond the tokenizer, as Qwen's
    checkpoints do (llama.cpp's converter then names the extra ids ``[PAD<id>]``)."""
    import transformers

    if arch not in TINY_ARCHS:
        raise TrainError(f"no tiny model of architecture {arch!r}; choose from {', '.join(TINY_ARCHS)}")
    class_name, arch_cfg = TINY_ARCHS[arch]
    config_class = getattr(transformers, class_name)
    if isinstance(tokenizer, (str, os.PathLike)):
        spm_path = Path(tokenizer)
        n_tokens, bos, eos, pad = _spm_size(spm_path), 1, 2, 3
    else:
        spm_path = None
        n_tokens = len(tokenizer)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    cfg: dict[str, Any] = {**TINY_DEFAULTS, **arch_cfg, **overrides}
    config = config_class(vocab_size=vocab_size or n_tokens, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                          **cfg)
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        # A slightly larger init than the default 0.02 so the random model's hidden states and
        # logits vary with the tokens (a flat random model makes a poor parity test). Norm
        # weights stay as initialised (Gemma's are offsets from 1, the others 1).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2:
                    p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
                elif name.endswith(".bias"):
                    p.normal_(0.0, 0.08)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if spm_path is None:
        tokenizer.save_pretrained(str(out))
    else:
        shutil.copyfile(spm_path, out / "tokenizer.model")
    return out


def build_tiny_llama(out_dir: str | os.PathLike[str], tokenizer: Any, *, seed: int = 0,
                     **overrides: Any) -> Path:
    """Save a random ``LlamaForCausalLM`` (safetensors) and ``tokenizer`` into ``out_dir``."""
    return build_tiny_model("llama", out_dir, tokenizer, seed=seed, **overrides)


def random_value_model(backbone: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                       targets: Sequence[str] | None = None, layers: int | None = None, seed: int = 0,
                       lora_std: float = 0.05, base_model: str | None = None) -> Path:
    """A value model as training leaves it (``train_value.py --out``), with random weights instead
    of trained ones: a LoRA whose B is not zero (so merging changes every targeted weight) and a
    head of unit scale. For tests of the export: everything it writes is what the real pipeline
    writes, without the training steps."""
    from dataclasses import asdict

    from sia_edge.train.export import default_lora_targets
    from sia_edge.train.model import (
        LoraSettings,
        ValueMeta,
        ValueNet,
        add_lora,
        backbone_fingerprint,
        is_gguf_file,
        load_backbone,
        save_value_model,
    )

    path = Path(backbone)
    lora = LoraSettings(targets=tuple(targets) if targets else
                        (default_lora_targets(path) if is_gguf_file(path) else LoraSettings().targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_backbone(path, layers)
        for p in model.parameters():
            p.requires_grad_(False)
        net = ValueNet(add_lora(model, lora), int(model.config.hidden_size))
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, lora_std)
            net.head.weight.normal_(0.0, float(model.config.hidden_size) ** -0.5)
            net.head.bias.fill_(0.1)
    meta = ValueMeta(
        backbone=str(path.resolve()), tokenizer_fingerprint=backbone_fingerprint(path),
        hidden_size=int(model.config.hidden_size), reward_name="random", base_model=base_model or path.name,
        lora=asdict(lora), layers=layers,
        training={"base_gguf": str(path.resolve()) if is_gguf_file(path) else None, "seed": seed},
    )
    save_value_model(out_dir, net, meta)
    return Path(out_dir)
