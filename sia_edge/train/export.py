"""Export a trained value model to GGUF for llama.cpp, quantise it, and check parity.

Steps (``export_value_model``):

1. Load the backbone, the LoRA adapter and the head (``model.load_value_model``).
2. Merge the LoRA into the backbone (``peft``'s ``merge_and_unload``).
3. Write a float32 GGUF of the ``llama`` architecture: hyperparameters from the backbone's config,
   tokenizer metadata copied from the base model's GGUF (so both map ids to the same texts), the
   head and reward normalisation as ``sia.*`` keys (``sia_edge.value_format``). q_proj/k_proj rows
   are permuted back to llama.cpp's rotary layout (transformers' GGUF loader un-permutes them on
   load, as llama.cpp's ``convert_hf_to_gguf.py`` permutes them on conversion).
4. Quantise that file with llama.cpp's own quantiser (``llama_model_quantize``) to each requested
   type (f16, q8_0, q4_k_m). Every output is written beside its destination and renamed into
   place, so a reader never sees a half-written file.

``parity_check`` compares the PyTorch value model with each GGUF in llama.cpp on held sequences:
the max abs error of the normalised V at every position, and at junction-like positions (the
base model's top-k entropy >= tau) whether both rank the base model's top-k candidates alike
(top-1 agreement).
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from sia_edge.train import TrainError
from sia_edge.value_format import (
    ValueFormatError,
    ValueHeadMeta,
    add_value_meta,
    atomic_output,
    commit_output,
    fingerprint_from_gguf,
    read_gguf_kv,
    read_value_meta,
    write_gguf_with_value_meta,
)

__all__ = [
    "QUANT_TYPES",
    "ParityReport",
    "export_value_model",
    "parity_check",
    "quantize_gguf",
    "write_llama_gguf",
]

# name -> llama_ftype (llama.h); resolved from llama_cpp lazily.
QUANT_TYPES: dict[str, str] = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}
DEFAULT_TYPES = ("f16", "q8_0", "q4_k_m")
SUPPORTED_ARCHS = ("llama",)


# ----------------------------------------------------------------------------- GGUF writing
def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row layout (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise TrainError(f"rope type {rope_type!r} is not supported by the exporter (only 'default')")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise TrainError("the backbone config has no rope_theta")
    return float(theta)


def _copy_tokenizer_kv(writer: Any, tokenizer_gguf: Path, vocab_size: int) -> None:
    import gguf

    fields = read_gguf_kv(tokenizer_gguf, with_types=True)
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise TrainError(f"{tokenizer_gguf}: no tokenizer in this GGUF (tokenizer.ggml.tokens missing)")
    n_tokens = len(tokens[0])  # type: ignore[index]
    if n_tokens != vocab_size:
        raise TrainError(
            f"the backbone has a vocabulary of {vocab_size} but the base model {tokenizer_gguf.name} has "
            f"{n_tokens} tokens: train the value model on a backbone with the base model's tokenizer"
        )
    for key, entry in fields.items():
        if key.startswith("tokenizer.") or key == "general.license":
            value, vtype, sub = cast("tuple[Any, int, int | None]", entry)
            writer.add_key_value(key, value, gguf.GGUFValueType(vtype),
                                 sub_type=gguf.GGUFValueType(sub) if sub is not None else None)


def write_llama_gguf(
    state_dict: dict[str, torch.Tensor],
    config: Any,
    tokenizer_gguf: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    head_meta: ValueHeadMeta | None = None,
    name: str = "value model",
    dtype: str = "f32",
) -> Path:
    """Write a llama-architecture GGUF (f32, or f16 matrices) from a transformers state dict.
    Atomic: written beside ``out_path`` and renamed into place."""
    import gguf

    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHS:
        raise TrainError(
            f"the exporter writes llama-architecture backbones only; this one is {arch!r}"
        )
    if dtype not in ("f32", "f16"):
        raise TrainError(f"write_llama_gguf writes f32 or f16, not {dtype!r} (quantise afterwards)")
    n_layer = int(config.num_hidden_layers)
    n_head = int(config.num_attention_heads)
    n_head_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_head)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)

    tensors: list[tuple[str, np.ndarray]] = []
    for key, t in state_dict.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd for the output when output.weight is absent
        gname = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise TrainError(f"no GGUF name for tensor {key!r} (unexpected module in a llama backbone)")
        arr = t.detach().to(torch.float32).cpu().numpy()
        if key.endswith("q_proj.weight"):
            arr = _llama_permute(arr, n_head)
        elif key.endswith("k_proj.weight"):
            arr = _llama_permute(arr, n_head_kv)
        if not np.all(np.isfinite(arr)):
            raise TrainError(f"tensor {key} contains NaN/inf: the merged model is broken")
        if dtype == "f16" and arr.ndim == 2:
            arr = arr.astype(np.float16)
        tensors.append((gname, np.ascontiguousarray(arr)))

    out = Path(out_path)
    tmp = atomic_output(out)
    writer = None
    try:
        writer = gguf.GGUFWriter(str(tmp), arch="llama")
        writer.add_name(name)
        writer.add_type("model")
        writer.add_block_count(n_layer)
        writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_file_type(int(_ftype("f16" if dtype == "f16" else "f32")))
        _copy_tokenizer_kv(writer, Path(tokenizer_gguf), int(config.vocab_size))
        if head_meta is not None:
            add_value_meta(writer, head_meta)
        for gname, arr in tensors:
            writer.add_tensor(gname, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        commit_output(tmp, out)
    finally:
        if writer is not None:
            writer.close()  # idempotent; closes the file if a write failed half-way
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
    """Quantise ``src`` to ``kind`` with llama.cpp's quantiser; atomic write of ``dst``.
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

    def as_dict(self) -> dict[str, Any]:
        return {**self.per_type, "n_positions": self.n_positions, "n_junctions": self.n_junctions}


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


@torch.no_grad()
def torch_reference(
    net: torch.nn.Module,
    sequences: Sequence[tuple[list[int], list[int]]],
    junctions: Sequence[tuple[int, int, np.ndarray]],
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """V at every position of each sequence, and V of each junction's candidates, in PyTorch."""
    net.eval()
    full = []
    for prompt, response in sequences:
        seq = torch.tensor([list(prompt) + list(response)], dtype=torch.long)
        full.append(net(seq).squeeze(0).double().numpy())
    cand = []
    for si, p, cands in junctions:
        prompt, response = sequences[si]
        prefix = (list(prompt) + list(response))[:p]
        batch = torch.tensor([[*prefix, int(c)] for c in cands], dtype=torch.long)
        cand.append(net(batch)[:, -1].double().numpy())
    return full, cand


def parity_check(
    reference: tuple[list[np.ndarray], list[np.ndarray]],
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
    step) for the candidate ranking at junctions."""
    from sia_edge.value_scorer import ValueModel

    full_ref, cand_ref = reference
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
        agree = 0
        for si, js in by_seq.items():
            prompt, response = sequences[si]
            seq = list(prompt) + list(response)
            k_max = max(len(junctions[j][2]) for j in js)
            scorer = vm.new_scorer(n_ctx=len(seq) + 8, k_max=k_max, n_threads=n_threads)
            try:
                for j in sorted(js, key=lambda j: junctions[j][1]):
                    _, p, ids = junctions[j]
                    got = np.array(scorer.score(seq[:p], np.asarray(ids, dtype=np.int32)), dtype=np.float64)
                    agree += int(np.argmax(got) == np.argmax(cand_ref[j]))
            finally:
                scorer.close()
        per_type[kind] = {
            "max_abs_err": err,
            "top1_agreement": agree / len(junctions) if junctions else math.nan,
        }
    n_pos = sum(len(p) + len(r) for p, r in sequences)
    return ParityReport(per_type, n_pos, len(junctions))


# ----------------------------------------------------------------------------- the whole export
def output_paths(out_prefix: str | os.PathLike[str], types: Sequence[str]) -> dict[str, Path]:
    prefix = str(out_prefix).removesuffix(".gguf")
    return {t: Path(f"{prefix}-{t}.gguf") for t in types}


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
    steering: dict[str, float] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[dict[str, Path], ParityReport | None]:
    """Merge, write and quantise a trained value model; optionally check parity. Returns the
    GGUF paths per type and the parity report (None without ``check_sequences``). ``steering``
    (``w``, ``target_ratio`` or ``tau``, ``horizon``) replaces the recommended settings of ``value_meta.json``."""
    from sia_edge.models import default_base_model
    from sia_edge.train.model import check_steering, load_value_model

    for t in types:
        if t not in QUANT_TYPES:
            raise TrainError(f"unknown quantisation type {t!r}; choose from {', '.join(QUANT_TYPES)}")
    if not types:
        raise TrainError("no output types given")
    if steering is not None:  # before the slow part: a bad setting should fail fast
        check_steering(steering)
    model_dir = Path(model_dir)
    log(f"loading value model from {model_dir}")
    net, meta = load_value_model(model_dir, backbone)
    if base_gguf is not None:
        base = Path(base_gguf)
    else:
        recorded = meta.training.get("base_gguf")
        if recorded and Path(recorded).is_file():
            base = Path(recorded)
        elif not recorded or meta.training.get("backbone_is_default"):
            base = default_base_model()  # e.g. shipped artefacts trained on another machine
        else:
            raise TrainError(f"the base model the value model was trained on ({recorded}) is gone; pass --base")
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

    log("merging the LoRA into the backbone")
    peft_model: Any = net.backbone
    merged = peft_model.merge_and_unload()
    head_meta = meta.head_meta(net.head.weight.detach().reshape(-1).numpy(), float(net.head.bias.item()),
                               steering=steering)
    paths = output_paths(out_prefix, types)
    f32_path = paths.get("f32") or output_paths(out_prefix, ["f32"])["f32"]
    keep_f32 = "f32" in paths
    tmp_f32 = f32_path if keep_f32 else atomic_output(f32_path)
    try:
        log(f"writing {f32_path.name if keep_f32 else 'f32 intermediate'}")
        write_llama_gguf(merged.state_dict(), merged.config, base, tmp_f32, head_meta=head_meta,
                         name=f"sia-edge value model ({meta.reward_name or 'custom'}) for {meta.base_model or base.stem}")
        del merged, net
        for t, dst in paths.items():
            if t == "f32":
                continue
            log(f"quantising to {t}: {dst}")
            quantize_gguf(tmp_f32, dst, t, n_threads=n_threads)
    finally:
        if not keep_f32 and tmp_f32.exists():
            tmp_f32.unlink()

    report = None
    if check_sequences and reference is not None:
        report = parity_check(reference, paths, check_sequences, junctions, n_threads=n_threads,
                              progress=lambda t: log(f"parity: {t} in llama.cpp"))
    return paths, report
