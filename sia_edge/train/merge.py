"""A value GGUF from a trained value model's files, without torch.

The LoRA is merged into the backbone GGUF's own tensors with numpy, as peft merges it
(``W + scale * B @ A``, ``scale = alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA), and the result is
written and quantised by the same GGUF copy as the PyTorch export (``sia_edge.train.export``:
every other key and tensor as the backbone holds it). This is how presets' value models are built
on first use (``sia_edge.presets``), so an inference-only install (no torch, peft or
transformers) can build them. A freshly trained model goes through the PyTorch export instead,
which also checks parity against PyTorch; tests/test_merge.py checks that both give one model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sia_edge.gguf_io import GGUFError
from sia_edge.train import TrainError
from sia_edge.train.meta import (
    ADAPTER_FILES,
    HEAD_FILE,
    META_FILE,
    ValueMeta,
    value_gguf_name,
)
from sia_edge.value_format import ValueFormatError, fingerprint_from_gguf

__all__ = ["QK_PERMUTED_ARCHITECTURES", "build_value_gguf", "merged_tensors"]

# Architectures whose q/k rows llama.cpp's converter permutes for its rotary layout
# (convert_hf_to_gguf.py LlamaModel.permute) and transformers' GGUF loader permutes back on load
# (LlamaTensorProcessor): a LoRA trained on the loaded model has its q/k deltas in the unpermuted
# layout. tests/test_merge.py checks this set against transformers' own table.
QK_PERMUTED_ARCHITECTURES = frozenset({"llama"})

_PREFIX = "base_model.model."  # peft's name for the wrapped model in adapter_model.safetensors


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainError(f"{path}: unreadable ({exc}); the value model's files are damaged: reinstall them") from None
    return {name: np.asarray(t, dtype=np.float32) for name, t in tensors.items()}


def _lora_scale(config: Mapping[str, Any], path: Path) -> float:
    """peft's LoRA scaling, for the adapters this merge supports (one rank and alpha for every module)."""
    unsupported = [name for name in ("use_dora", "fan_in_fan_out") if config.get(name)]
    unsupported += [name for name in ("rank_pattern", "alpha_pattern") if config.get(name)]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise TrainError(f"{path}: a {config.get('peft_type')} adapter with {', '.join(unsupported) or 'that type'} "
                         "is not supported by the torch-free build; export it with tools/export_value_gguf.py")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not (isinstance(r, int) and r > 0 and isinstance(alpha, (int, float)) and alpha > 0):
        raise TrainError(f"{path}: needs a positive integer r and a positive lora_alpha, has r={r!r}, lora_alpha={alpha!r}")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def _lora_pairs(tensors: Mapping[str, np.ndarray], path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module name (as the backbone names it) -> (A [r, in], B [out, r])."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if m is None:
            raise TrainError(f"{path}: tensor {name} is not a LoRA A or B weight; export this adapter with "
                             "tools/export_value_gguf.py")
        pairs.setdefault(m.group(1).removeprefix(_PREFIX), {})[m.group(2)] = t
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise TrainError(f"{path}: module {module} has only lora_{''.join(ab)}; the adapter is incomplete")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise TrainError(f"{path}: {module} has LoRA shapes A {a.shape}, B {b.shape}, which do not multiply")
        out[module] = (a, b)
    return out


def merged_tensors(model_dir: str | os.PathLike[str], source: str | os.PathLike[str],
                   progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """The LoRA of ``model_dir`` merged into the GGUF ``source`` (the backbone it was trained on):
    GGUF tensor name -> merged weight in llama.cpp's layout, float32."""
    import gguf

    from sia_edge.train.export import _gguf_arch, _llama_permute, _per_layer, gguf_header, read_gguf_tensor

    model_dir, source = Path(model_dir), Path(source)
    config_path = model_dir / ADAPTER_FILES[0]
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainError(f"{config_path}: unreadable ({exc})") from None
    scale = _lora_scale(config, config_path)
    pairs = _lora_pairs(_load_safetensors(model_dir / ADAPTER_FILES[1]), model_dir / ADAPTER_FILES[1])
    kv, infos = gguf_header(source)
    arch = str(kv.get("general.architecture", ""))
    arch_id = _gguf_arch(arch)
    if arch_id is None:
        raise TrainError(f"{source.name}: architecture {arch!r} is not one gguf's tensor maps know")
    n_blocks = int(kv.get(f"{arch}.block_count", 0))  # type: ignore[call-overload]
    tmap = gguf.get_tensor_name_map(arch_id, max(n_blocks, 1))
    out: dict[str, np.ndarray] = {}
    for i, (module, (a, b)) in enumerate(sorted(pairs.items())):
        gname = tmap.get_name(module + ".weight", try_suffixes=(".weight",))
        info = infos.get(gname) if gname else None
        if gname is None or info is None:
            raise TrainError(f"{source.name} has no tensor for the LoRA-trained module {module}: the value model "
                             "was trained on another model")
        delta = scale * (b @ a)
        m = re.fullmatch(r"blk\.(\d+)\.attn_([qk])\.weight", gname)
        if m and arch in QK_PERMUTED_ARCHITECTURES:
            key = "head_count" if m.group(2) == "q" else "head_count_kv"
            n_head = kv.get(f"{arch}.attention.{key}", kv.get(f"{arch}.attention.head_count"))
            delta = _llama_permute(delta, _per_layer(n_head, int(m.group(1))))
        if delta.shape != info.shape:
            raise TrainError(f"{gname}: the LoRA delta has shape {delta.shape}, {source.name} holds {info.shape}; "
                             "the value model was trained on another model")
        out[gname] = np.ascontiguousarray(read_gguf_tensor(source, info) + delta, dtype=np.float32)
        if progress is not None:
            progress(i + 1, len(pairs))
    return out


def build_value_gguf(model_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                     backbone: str | os.PathLike[str], quant: str = "q8_0", n_threads: int | None = None,
                     log: Callable[[str], None] = lambda s: None,
                     progress: Callable[[int, int], None] | None = None) -> Path:
    """The value GGUF of the trained value model in ``model_dir`` (adapter, head, metadata),
    merged into ``backbone`` (the GGUF it was trained on) and quantised to ``quant``; for one
    that reads the base model's hidden state (``layers`` 0: heads only), its keys alone
    (``write_head_only_gguf``). Atomic: an interrupted build leaves no ``out_path``."""
    from sia_edge.files import atomic_output
    from sia_edge.train.export import quantize_gguf, write_value_gguf

    model_dir, backbone, out = Path(model_dir), Path(backbone), Path(out_path)
    meta = ValueMeta.from_file(model_dir / META_FILE)
    for name in (HEAD_FILE,) if meta.reads_base else (*ADAPTER_FILES, HEAD_FILE):
        if not (model_dir / name).is_file():
            raise TrainError(f"{model_dir}: {name} missing; not a complete value model")
    try:
        fp = fingerprint_from_gguf(backbone)
    except (ValueFormatError, GGUFError) as exc:
        raise TrainError(str(exc)) from None
    if fp != meta.tokenizer_fingerprint:
        raise TrainError(f"{backbone} has a different tokenizer (fingerprint {fp}) from the one the value model was "
                         f"trained with ({meta.tokenizer_fingerprint}): pass the GGUF it was trained on")
    head = _load_safetensors(model_dir / HEAD_FILE)
    if "weight" not in head or "bias" not in head or head["weight"].size != meta.hidden_size:
        raise TrainError(f"{model_dir / HEAD_FILE}: needs a weight of {meta.hidden_size} values and a bias")
    from sia_edge.train.candidate import candidate_asset_of

    try:
        head_meta = meta.head_meta(head["weight"].reshape(-1), float(head["bias"].reshape(-1)[0]),
                                   candidate=candidate_asset_of(model_dir, backbone))
    except ValueFormatError as exc:
        raise TrainError(f"{model_dir}: {exc}") from None
    if meta.reads_base:
        from sia_edge.value_format import write_head_only_gguf

        log("writing the value GGUF (heads only: it reads the base model's hidden state)")
        if progress is not None:
            progress(1, 1)
        return write_head_only_gguf(out, head_meta, name=value_gguf_name(meta, backbone))
    log(f"merging the LoRA into {backbone.name}")
    replacements = merged_tensors(model_dir, backbone, progress)
    tmp_full = atomic_output(out.with_name(out.name + ".merged"))
    try:
        log(f"writing the value GGUF ({len(replacements)} merged tensors)")
        write_value_gguf(backbone, tmp_full, replacements, layers=meta.layers, head_meta=head_meta,
                         name=value_gguf_name(meta, backbone))
        del replacements
        log(f"quantising to {quant}")
        quantize_gguf(tmp_full, out, quant, n_threads=n_threads)
    finally:
        tmp_full.unlink(missing_ok=True)
    return out
