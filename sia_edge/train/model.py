"""The PyTorch value model: a causal-LM backbone with LoRA, read at its final-norm hidden states
by a ``Linear(hidden, 1)`` head in fp32.

``V_t = head(h_t)`` where ``h_t`` is the backbone's last hidden state at position t, after the
final norm (what llama.cpp returns as embeddings with pooling ``none``). The vocabulary head of
the causal LM is never run: training only needs the transformer body.

A trained value model is a directory in peft's standard adapter format plus two small files::

    adapter_config.json, adapter_model.safetensors   the LoRA (PeftModel.from_pretrained loads it)
    value_head.safetensors                           head weight [1, hidden] and bias [1], fp32
    value_meta.json                                  reward normalisation, backbone, tokenizer
                                                     fingerprint, training settings (written last)

No pickle anywhere: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sia_edge.train import TrainError
from sia_edge.train.meta import (
    ADAPTER_FILES,
    HEAD_FILE,
    LORA_TARGETS,
    META_FILE,
    STEERING_KEYS,
    LoraSettings,
    ValueMeta,
    check_steering,
)
from sia_edge.value_format import fingerprint_from_gguf, tokenizer_fingerprint

__all__ = [
    "ADAPTER_FILES",
    "HEAD_FILE",
    "LORA_TARGETS",
    "META_FILE",
    "STEERING_KEYS",
    "LoraSettings",
    "ValueMeta",
    "ValueNet",
    "backbone_fingerprint",
    "check_steering",
    "is_gguf_file",
    "load_backbone",
    "load_value_model",
    "save_value_model",
]


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def check_backbone_path(path: str | os.PathLike[str]) -> Path:
    """The backbone path, if it is a GGUF file or a Hugging Face model directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TrainError(f"backbone {p} does not exist")
    if p.is_file() and not is_gguf_file(p):
        raise TrainError(f"backbone {p} is neither a GGUF file nor a Hugging Face model directory")
    if p.is_dir() and not (p / "config.json").is_file():
        raise TrainError(f"backbone directory {p} has no config.json (not a Hugging Face model)")
    return p


def load_backbone(path: str | os.PathLike[str], layers: int | None = None) -> Any:
    """A causal LM in fp32 from a GGUF file (dequantised by transformers' GGUF loader) or a local
    Hugging Face directory. Never downloads.

    ``layers``: keep only the first N decoder layers (the final norm stays). A value model that
    reads the backbone's hidden states after N of its L layers costs about N/L of a full one at
    every junction, and training runs faster by the same factor."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    model: Any
    p = check_backbone_path(path)
    try:
        if p.is_file():
            with tempfile.TemporaryDirectory(prefix="sia-backbone-") as tmp:
                lean = _lean_gguf(p, layers, Path(tmp))
                model = AutoModelForCausalLM.from_pretrained(
                    str(lean.parent), gguf_file=lean.name, dtype=torch.float32, local_files_only=True
                )
            # The GGUF loader leaves a quantization_config behind; the weights are plain fp32 now.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.is_quantized = False
            model.hf_quantizer = None
        else:
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, local_files_only=True)
    except TrainError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TrainError(f"could not load backbone {p}: {exc}") from None
    model.config.use_cache = False
    if p.is_file():
        _apply_rope_freqs(model, p)
    if layers is not None:
        truncate_layers(model, layers)
    return model


# Tokenizer arrays transformers' GGUF loader parses, element by element, twice, and the model
# does not need: for a large vocabulary that takes longer than reading the weights.
_VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                 "tokenizer.ggml.merges", "tokenizer.ggml.precompiled_charsmap")


def _lean_gguf(path: Path, layers: int | None, tmp: Path) -> Path:
    """The GGUF transformers loads the backbone from: ``path``'s first ``layers`` blocks (all of
    them by default) without its vocabulary arrays, the vocabulary size stated instead (the loader
    counts the tokens when the architecture has no vocab_size key). Loading only the blocks a
    value model keeps, and no vocabulary, is what makes a shallow value model of a large model
    load fast."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from sia_edge.gguf_io import GGUFError, read_gguf_kv
    from sia_edge.train.export import copy_gguf

    try:
        kv = read_gguf_kv(path)
    except GGUFError as exc:
        raise TrainError(str(exc)) from None
    arch = str(kv.get("general.architecture", ""))
    n_blocks = kv.get(f"{arch}.block_count")
    if layers is not None and isinstance(n_blocks, int) and not 1 <= layers <= n_blocks:
        raise TrainError(f"--layers must be between 1 and the backbone's {n_blocks} layers, got {layers}")
    tokens = kv.get("tokenizer.ggml.tokens")
    set_keys: dict[str, tuple[object, int]] = {}
    drop: tuple[str, ...] = ()
    mapping: dict[str, Any] = GGUF_CONFIG_MAPPING.get(arch, {})  # type: ignore[assignment]
    if isinstance(tokens, list) and "vocab_size" in mapping:
        drop = _VOCAB_ARRAYS
        if f"{arch}.vocab_size" not in kv:
            set_keys[f"{arch}.vocab_size"] = (len(tokens), 4)  # GGUF type 4: uint32
    return copy_gguf(path, tmp / path.name, layers=layers, drop_keys=drop, set_keys=set_keys)


def _apply_rope_freqs(model: Any, gguf_path: Path) -> None:
    """Give the model the per-dimension RoPE frequency factors of the GGUF's ``rope_freqs``
    tensor, which llama.cpp's converter writes for llama3 RoPE scaling (Llama 3.1 and later) and
    llama.cpp divides every rotary frequency by. transformers' GGUF loader does not read it: the
    model it builds would rotate with the unscaled frequencies, and a value model trained on it
    would compute other values in llama.cpp."""
    from sia_edge.gguf_io import read_gguf_tensor_infos
    from sia_edge.train.export import read_gguf_tensor

    infos = read_gguf_tensor_infos(gguf_path)
    if "rope_freqs.weight" not in infos:
        return
    params = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    if (params.get("rope_type") or params.get("type") or "default") != "default":
        return  # the loader reconstructed the scaling itself
    factors = torch.from_numpy(read_gguf_tensor(gguf_path, infos["rope_freqs.weight"]).reshape(-1).copy())
    found = False
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor) and inv_freq.numel() == factors.numel():
            module.inv_freq = inv_freq / factors.to(inv_freq.dtype)
            if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
                module.original_inv_freq = module.inv_freq.clone()
            found = True
    if not found:
        raise TrainError(f"{gguf_path.name} has RoPE frequency factors (rope_freqs) of {factors.numel()} dimensions, "
                         f"but {type(model).__name__} has no rotary embedding of that size to apply them to")


def truncate_layers(model: Any, layers: int) -> None:
    """Keep the first ``layers`` decoder layers of a causal LM, in place, config included."""
    body = transformer_body(model)
    stack = getattr(body, "layers", None)
    if not isinstance(stack, nn.ModuleList):
        raise TrainError(f"{type(model).__name__} has no decoder layer list to shorten; drop --layers")
    total = len(stack)
    if not 1 <= layers <= total:
        raise TrainError(f"--layers must be between 1 and the backbone's {total} layers, got {layers}")
    body.layers = nn.ModuleList(list(stack)[:layers])
    model.config.num_hidden_layers = layers
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list):
        model.config.layer_types = layer_types[:layers]


def backbone_fingerprint(path: str | os.PathLike[str]) -> str:
    """Tokenizer fingerprint of a backbone: from the GGUF metadata, or the HF directory's tokenizer."""
    p = check_backbone_path(path)
    if p.is_file():
        return fingerprint_from_gguf(p)
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TrainError(
            f"backbone directory {p} has no usable tokenizer ({exc}); save the base model's tokenizer into it"
        ) from None
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(f"{p / 'config.json'}: unreadable ({exc})") from None
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return hf_tokenizer_fingerprint(tok, int(vocab) if isinstance(vocab, int) else None)


def hf_tokenizer_fingerprint(tok: Any, vocab_size: int | None = None) -> str:
    """The fingerprint of a Hugging Face tokenizer as the GGUF of its model has it. A model whose
    embedding has more rows than its tokenizer has tokens (Qwen: 151,936 rows, 151,665 tokens)
    gets them named ``[PAD<id>]`` in the GGUF by llama.cpp's converter, as do ids the tokenizer
    skips; ``vocab_size`` (the model's rows) pads the token list the same way."""
    n = max(len(tok), vocab_size or 0)
    texts = tok.convert_ids_to_tokens(list(range(n)))
    return tokenizer_fingerprint(t if t is not None else f"[PAD{i}]" for i, t in enumerate(texts))


def transformer_body(causal_lm: Any) -> Any:
    """The decoder stack of a causal LM (``model.model`` for llama), without the vocabulary head."""
    base = causal_lm
    get_base = getattr(base, "get_base_model", None)  # peft wrapper -> the wrapped model
    if callable(get_base):
        base = get_base()
    prefix = getattr(base, "base_model_prefix", "model")
    body = getattr(base, prefix, None)
    if body is None:
        raise TrainError(f"{type(base).__name__} has no transformer body at .{prefix}")
    return body


class ValueNet(nn.Module):
    """Backbone (possibly LoRA-wrapped) + fp32 value head: ``forward`` returns V at every position."""

    def __init__(self, backbone: Any, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1, dtype=torch.float32)
        # Zero head: V starts at 0, the mean of the normalised rewards, so the first loss is the
        # reward variance and training can only improve on the constant predictor.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm hidden states every head reads (float32)."""
        body = transformer_body(self.backbone)
        out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden: torch.Tensor = out.last_hidden_state  # after the final norm
        return hidden.float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        values: torch.Tensor = self.head(self.hidden_states(input_ids, attention_mask)).squeeze(-1)
        return values


def add_lora(backbone: Any, lora: LoraSettings) -> Any:
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in backbone.named_modules()}
    missing = [t for t in lora.targets if t not in names]
    if missing:
        raise TrainError(f"the backbone has no modules named {missing}; set LoRA targets that exist")
    cfg = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
        bias="none",
    )
    return get_peft_model(backbone, cfg)


def response_mean(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean of V_t over the response positions of each row: what is regressed on the reward."""
    m = response_mask.to(values.dtype)
    mean: torch.Tensor = (values * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    return mean


def _atomic_replace_files(src_dir: Path, dst_dir: Path, names: Sequence[str]) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        with open(src_dir / name, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(src_dir / name, dst_dir / name)


def save_value_model(out_dir: str | os.PathLike[str], net: ValueNet, meta: ValueMeta,
                     extra_files: dict[str, bytes] | None = None) -> None:
    """Write the adapter, head and metadata into ``out_dir``. Each file is replaced atomically and
    ``value_meta.json`` goes last, so a directory with it is always complete."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out))
    try:
        backbone: Any = net.backbone
        if not hasattr(backbone, "save_pretrained") or not hasattr(backbone, "peft_config"):
            raise TrainError("only LoRA-wrapped backbones can be saved as an adapter")
        # embeddings are frozen: nothing to save of them (and no base config.json lookup)
        backbone.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        head = {
            "weight": net.head.weight.detach().float().cpu().contiguous(),
            "bias": net.head.bias.detach().float().cpu().contiguous(),
        }
        save_file(head, str(tmp / HEAD_FILE))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / META_FILE).write_text(meta.to_json())
        names = [*ADAPTER_FILES, HEAD_FILE, *(extra_files or {})]
        _atomic_replace_files(tmp, out, names)
        _atomic_replace_files(tmp, out, [META_FILE])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_head(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    path = model_dir / HEAD_FILE
    if not path.is_file():
        raise TrainError(f"{model_dir}: {HEAD_FILE} missing; the training run did not finish")
    t = load_file(str(path))
    if "weight" not in t or "bias" not in t:
        raise TrainError(f"{path}: needs 'weight' and 'bias' tensors")
    return t["weight"].float(), t["bias"].float()


def resolve_backbone(meta: ValueMeta, override: str | os.PathLike[str] | None) -> Path:
    if override is not None:
        return Path(override).expanduser()
    p = Path(meta.backbone).expanduser()
    if meta.backbone == "default" or not p.exists():
        if meta.training.get("backbone_is_default"):
            from sia_edge.models import default_base_model

            return default_base_model()
        raise TrainError(f"the value model's backbone {p} is gone; pass --backbone PATH")
    return p


def load_value_model(model_dir: str | os.PathLike[str], backbone: str | os.PathLike[str] | None = None,
                     ) -> tuple[ValueNet, ValueMeta]:
    """A trained value model (LoRA unmerged, eval mode) and its metadata."""
    from peft import PeftModel

    d = Path(model_dir).expanduser()
    if not d.is_dir():
        raise TrainError(f"value model directory {d} does not exist")
    meta = ValueMeta.from_file(d / META_FILE)
    for name in ADAPTER_FILES:
        if not (d / name).is_file():
            raise TrainError(f"{d}: {name} missing; not a complete value model")
    weight, bias = load_head(d)
    bpath = resolve_backbone(meta, backbone)
    fp = backbone_fingerprint(bpath)
    if fp != meta.tokenizer_fingerprint:
        raise TrainError(
            f"backbone {bpath} has a different tokenizer (fingerprint {fp}) than the one the value model "
            f"was trained with ({meta.tokenizer_fingerprint})"
        )
    base = load_backbone(bpath, meta.layers)
    peft_model = PeftModel.from_pretrained(base, str(d), is_trainable=False)
    net = ValueNet(peft_model, meta.hidden_size)
    if tuple(weight.shape) != (1, meta.hidden_size):
        raise TrainError(f"{d}: head weight has shape {tuple(weight.shape)}, expected (1, {meta.hidden_size})")
    with torch.no_grad():
        net.head.weight.copy_(weight)
        net.head.bias.copy_(bias.reshape(1))
    net.eval()
    return net, meta
