"""The one definition of a value-model GGUF: metadata keys, reading and writing.

A value model is an ordinary GGUF of a causal LM backbone that llama.cpp loads as it is (same
architecture and tokenizer as the base model), plus our own keys under the ``sia.`` namespace,
which llama.cpp's loader ignores:

==========================  ===========  =====================================================
key                         type         meaning
==========================  ===========  =====================================================
sia.format_version          uint32       ``FORMAT_VERSION``
sia.head.weight             float32[d]   value head weight, d = the backbone's hidden width
sia.head.bias               float32      value head bias
sia.head.hidden_state       string       which hidden state the head reads: ``final_norm``
                                         (the final-norm output, what llama.cpp returns as
                                         embeddings with pooling ``none``), or
                                         ``base_final_norm``: the *base model's* own final-norm
                                         state, which the base computes anyway; such a value
                                         model has no layers of its own (a file of these keys
                                         only, ``write_head_only_gguf``) and only the
                                         candidate head
sia.reward.mean             float32      reward normalisation: the head predicts
sia.reward.std              float32      (R - mean) / std; raw reward = V * std + mean
sia.tokenizer.fingerprint   string       ``tokenizer_fingerprint`` of the training tokenizer
sia.base_model              string       name of the base model the values were trained for
sia.objective               string       free text: what "good" meant (reward name)
sia.steering.w              float32      optional: the steering strength the model was
                                         evaluated with; the chat and server use it when no
                                         ``--w`` is given
sia.steering.target_ratio   float32      optional: likewise the junction budget (fraction of
                                         steered tokens), used when neither ``--tau`` nor
                                         ``--target-ratio`` is given
sia.steering.tau            float32      optional, instead of target_ratio: likewise the
                                         threshold itself (for sia.steering.gate, else the
                                         top-k entropy gate; both only beside a gate)
sia.steering.horizon        uint32       optional: likewise steer only within the first N
                                         tokens of an answer (entropy gates, no ``--horizon``)
sia.steering.value_head     string       optional: likewise the head that scores candidates
                                         (``scalar`` or ``candidate``; no ``--value-head``)
sia.steering.gate           string       optional: likewise the mode (``entropy``, ``shift``,
                                         ...; no ``--mode``)
sia.candidate.rank          uint32       optional candidate head (below): its rank r
sia.candidate.proj          float32[r*d] A, row-major (r rows of width d)
sia.candidate.proj_bias     float32[r]   a
sia.candidate.table         float32[n*r] U, one row of r per token of the n-token vocabulary
sia.candidate.token_bias    float32[n]   b
==========================  ===========  =====================================================

The candidate head scores every candidate c after a prefix s from the one hidden state h_s of
the prefix's last token: Q(s, c) = V(s) + b[c] + U[c] . (A h_s + a), with V(s) the scalar head
on h_s. It estimates what the scalar head computes on s + c without decoding a row for c
(docs/ARCHITECTURE.md, "Two heads").

The engine steers with the normalised value V (so ``w`` is in units of reward standard
deviations). Both the export tool and the engine use this module and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sia_edge.files import atomic_output, commit_output
from sia_edge.gguf_io import GGUFError, gguf_writer, read_gguf_kv

__all__ = [
    "FORMAT_VERSION",
    "HEADS",
    "HEAD_CANDIDATE",
    "HEAD_SCALAR",
    "HIDDEN_STATES",
    "HIDDEN_STATE_BASE",
    "HIDDEN_STATE_FINAL_NORM",
    "CandidateHeadMeta",
    "ValueFormatError",
    "ValueHeadMeta",
    "add_value_meta",
    "check_recommended_steering",
    "fingerprint_from_gguf",
    "head_missing",
    "random_head_value_gguf",
    "read_value_meta",
    "tokenizer_fingerprint",
    "write_gguf_with_value_meta",
    "write_head_only_gguf",
]

FORMAT_VERSION = 1
HIDDEN_STATE_FINAL_NORM = "final_norm"
HIDDEN_STATE_BASE = "base_final_norm"
HIDDEN_STATES = (HIDDEN_STATE_FINAL_NORM, HIDDEN_STATE_BASE)

KEY_VERSION = "sia.format_version"
KEY_HEAD_WEIGHT = "sia.head.weight"
KEY_HEAD_BIAS = "sia.head.bias"
KEY_HIDDEN_STATE = "sia.head.hidden_state"
KEY_REWARD_MEAN = "sia.reward.mean"
KEY_REWARD_STD = "sia.reward.std"
KEY_TOKENIZER_FP = "sia.tokenizer.fingerprint"
KEY_BASE_MODEL = "sia.base_model"
KEY_OBJECTIVE = "sia.objective"
KEY_STEERING_W = "sia.steering.w"
KEY_STEERING_TARGET_RATIO = "sia.steering.target_ratio"
KEY_STEERING_TAU = "sia.steering.tau"
KEY_STEERING_HORIZON = "sia.steering.horizon"
KEY_STEERING_VALUE_HEAD = "sia.steering.value_head"
KEY_STEERING_GATE = "sia.steering.gate"
KEY_CAND_RANK = "sia.candidate.rank"
KEY_CAND_PROJ = "sia.candidate.proj"
KEY_CAND_PROJ_BIAS = "sia.candidate.proj_bias"
KEY_CAND_TABLE = "sia.candidate.table"
KEY_CAND_TOKEN_BIAS = "sia.candidate.token_bias"

HEAD_ONLY_ARCH = "sia-head"  # general.architecture of a value GGUF with no layers (write_head_only_gguf)
HEAD_SCALAR = "scalar"
HEAD_CANDIDATE = "candidate"
HEADS = (HEAD_SCALAR, HEAD_CANDIDATE)


class ValueFormatError(GGUFError):
    """A file is not a usable value-model GGUF; the message says what is missing and how to fix it."""


@dataclass(frozen=True, eq=False)
class CandidateHeadMeta:
    """Q(s, c) = V(s) + token_bias[c] + table[c] . (proj h_s + proj_bias): see the module docstring."""

    proj: npt.NDArray[np.float32]  # (r, d)
    proj_bias: npt.NDArray[np.float32]  # (r,)
    table: npt.NDArray[np.float32]  # (n_vocab, r)
    token_bias: npt.NDArray[np.float32]  # (n_vocab,)

    def __post_init__(self) -> None:
        for name in ("proj", "proj_bias", "table", "token_bias"):
            a = np.ascontiguousarray(getattr(self, name), dtype=np.float32)
            if not np.all(np.isfinite(a)):
                raise ValueFormatError(f"candidate head {name} contains NaN/inf: the training run diverged")
            object.__setattr__(self, name, a)
        r = self.proj.shape[0] if self.proj.ndim == 2 else -1
        if (r < 1 or self.proj_bias.shape != (r,) or self.table.ndim != 2 or self.table.shape[1] != r
                or self.token_bias.shape != (self.table.shape[0],)):
            raise ValueFormatError(
                f"candidate head shapes do not fit together: proj {self.proj.shape}, proj_bias "
                f"{self.proj_bias.shape}, table {self.table.shape}, token_bias {self.token_bias.shape}")

    @property
    def rank(self) -> int:
        return int(self.proj.shape[0])

    def check_shapes(self, n_embd: int, n_vocab: int, path: object) -> None:
        if self.proj.shape[1] != n_embd or self.table.shape[0] != n_vocab:
            raise ValueFormatError(
                f"{path}: the candidate head was made for width {self.proj.shape[1]} and {self.table.shape[0]} "
                f"tokens, the backbone has {n_embd} and {n_vocab}; it was exported for another backbone")


@dataclass(frozen=True)
class ValueHeadMeta:
    weight: npt.NDArray[np.float32]
    bias: float
    reward_mean: float = 0.0
    reward_std: float = 1.0
    tokenizer_fingerprint: str = ""
    base_model: str = ""
    objective: str = ""
    hidden_state: str = HIDDEN_STATE_FINAL_NORM
    extra: dict[str, str] = field(default_factory=dict)
    # The settings this model was evaluated with (None: the paper's defaults apply).
    steering_w: float | None = None
    steering_target_ratio: float | None = None
    steering_tau: float | None = None
    steering_horizon: int | None = None
    steering_value_head: str | None = None
    steering_gate: str | None = None
    candidate: CandidateHeadMeta | None = None

    def __post_init__(self) -> None:
        w = np.ascontiguousarray(self.weight, dtype=np.float32)
        object.__setattr__(self, "weight", w)
        if w.ndim != 1 or w.size == 0:
            raise ValueFormatError(f"value head weight must be a non-empty vector, got shape {w.shape}")
        if not np.all(np.isfinite(w)) or not np.isfinite(self.bias):
            raise ValueFormatError("value head weight or bias contains NaN/inf: the training run diverged")
        if not (np.isfinite(self.reward_std) and self.reward_std > 0):
            raise ValueFormatError(f"reward std must be finite and > 0, got {self.reward_std}")
        check_recommended_steering(self.steering_w, self.steering_target_ratio, self.steering_tau,
                                   self.steering_horizon, self.steering_value_head, self.steering_gate)
        if self.steering_value_head == HEAD_CANDIDATE and self.candidate is None:
            raise ValueFormatError("the value model recommends the candidate head but carries none "
                                   "(sia.candidate.* keys); re-export it with its candidate head")
        if self.hidden_state not in HIDDEN_STATES:
            raise ValueFormatError(
                f"unsupported hidden state {self.hidden_state!r}; this version reads "
                f"{' or '.join(map(repr, HIDDEN_STATES))}: upgrade sia-edge"
            )
        if self.reads_base and self.candidate is None:
            raise ValueFormatError("a value model that reads the base model's hidden state scores with a "
                                   "candidate head, and this one carries none; re-export it with one")
        if self.reads_base and self.steering_value_head == HEAD_SCALAR:
            raise ValueFormatError("a value model that reads the base model's hidden state has no scalar head "
                                   "to recommend")

    @property
    def reads_base(self) -> bool:
        """No layers of its own: the head reads the base model's final-norm hidden state."""
        return self.hidden_state == HIDDEN_STATE_BASE

    @property
    def heads(self) -> tuple[str, ...]:
        """The heads it can score with: the scalar head needs layers of its own to decode
        branches in, the candidate head needs its arrays."""
        own = () if self.reads_base else (HEAD_SCALAR,)
        return own + ((HEAD_CANDIDATE,) if self.candidate is not None else ())

    def recommended_steering(self) -> dict[str, float | str]:
        """The recommended settings this model carries (``w``, ``target_ratio`` or ``tau``,
        ``horizon``, ``value_head``, ``gate``), those it has."""
        pairs = (("w", self.steering_w), ("target_ratio", self.steering_target_ratio), ("tau", self.steering_tau),
                 ("horizon", self.steering_horizon), ("value_head", self.steering_value_head),
                 ("gate", self.steering_gate))
        return {k: v for k, v in pairs if v is not None}


def head_missing(name: str, head: str, heads: tuple[str, ...]) -> str:
    """The one message for asking a value model for a head it lacks."""
    why = ("it reads the base model's hidden state, and the scalar head needs layers of its own"
           if head == HEAD_SCALAR else "it carries no sia.candidate.* arrays")
    return (f"value_head {head!r}: {name} has only the {' and '.join(heads)} head ({why}); use value_head "
            f"{heads[0]!r} or a value model with a {head} head (docs/TRAINING.md)")


def check_recommended_steering(w: float | None, target_ratio: float | None, tau: float | None = None,
                               horizon: int | None = None, value_head: str | None = None,
                               gate: str | None = None) -> None:
    """The recommended settings a value GGUF may carry must be ones the engine accepts (checked
    by ``sia_edge.steering``, the one definition of every setting)."""
    from sia_edge.steering import recommended_settings

    try:
        recommended_settings({"w": w, "target_ratio": target_ratio, "tau": tau, "horizon": horizon,
                              "value_head": value_head, "gate": gate})
    except ValueError as exc:
        raise ValueFormatError(str(exc)) from None


def tokenizer_fingerprint(tokens: Iterable[str | bytes]) -> str:
    """sha256 over the token texts in id order: equal iff two tokenizers map ids to the same texts.

    Token texts are what GGUF stores in ``tokenizer.ggml.tokens``, what llama.cpp returns from
    ``llama_vocab_get_text`` and what a Hugging Face tokenizer returns from
    ``convert_ids_to_tokens``, so all three sides compute the same fingerprint.
    """
    h = hashlib.sha256()
    n = 0
    for tok in tokens:
        h.update(tok.encode("utf-8", "surrogatepass") if isinstance(tok, str) else tok)
        h.update(b"\x00")
        n += 1
    return f"v1-{n}-{h.hexdigest()[:32]}"


def _reader(path: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
    import gguf  # pure Python + numpy; imported lazily to keep `import sia_edge` fast

    p = Path(path)
    if not p.is_file():
        raise ValueFormatError(f"{p}: no such file")
    try:
        return gguf.GGUFReader(str(p), "r")
    except (OSError, ValueError, KeyError, IndexError, struct.error) as exc:
        raise ValueFormatError(f"{p}: not a readable GGUF file: truncated or not a GGUF ({exc}); re-export or "
                               "re-download it") from None


def _field_value(reader, key: str):  # type: ignore[no-untyped-def]
    if isinstance(reader, dict):  # from read_gguf_kv
        return reader.get(key)
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def fingerprint_from_gguf(path: str | os.PathLike[str]) -> str:
    """Tokenizer fingerprint of any GGUF, from its ``tokenizer.ggml.tokens`` metadata."""
    reader = read_gguf_kv(path)
    tokens = _field_value(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueFormatError(f"{path}: the GGUF has no tokenizer (tokenizer.ggml.tokens missing)")
    return tokenizer_fingerprint(tokens)


def read_value_meta(path: str | os.PathLike[str]) -> ValueHeadMeta:
    """Read the ``sia.*`` metadata of a value-model GGUF, or explain why it is not one."""
    reader = read_gguf_kv(path, numpy_arrays=True)
    version = _field_value(reader, KEY_VERSION)
    if version is None:
        raise ValueFormatError(
            f"{path}: this GGUF has no sia-edge value head (key {KEY_VERSION} missing). It is probably "
            "a plain model: export a value model with tools/export_value_gguf.py"
        )
    if int(version) > FORMAT_VERSION:
        raise ValueFormatError(
            f"{path}: value format version {int(version)} is newer than this sia-edge ({FORMAT_VERSION}); upgrade"
        )
    weight = _field_value(reader, KEY_HEAD_WEIGHT)
    bias = _field_value(reader, KEY_HEAD_BIAS)
    if weight is None or bias is None:
        raise ValueFormatError(f"{path}: {KEY_HEAD_WEIGHT} or {KEY_HEAD_BIAS} missing; re-export the value model")
    try:
        return _head_meta(reader, weight, bias)
    except ValueFormatError as exc:
        raise ValueFormatError(f"{path}: {exc}") from None


def _head_meta(reader: dict[str, object], weight: object, bias: object) -> ValueHeadMeta:
    def opt(key: str, default: object) -> object:
        v = _field_value(reader, key)
        return default if v is None else v

    return ValueHeadMeta(
        weight=np.asarray(weight, dtype=np.float32),
        bias=float(bias),  # type: ignore[arg-type]
        reward_mean=float(opt(KEY_REWARD_MEAN, 0.0)),  # type: ignore[arg-type]
        reward_std=float(opt(KEY_REWARD_STD, 1.0)),  # type: ignore[arg-type]
        tokenizer_fingerprint=str(opt(KEY_TOKENIZER_FP, "")),
        base_model=str(opt(KEY_BASE_MODEL, "")),
        objective=str(opt(KEY_OBJECTIVE, "")),
        hidden_state=str(opt(KEY_HIDDEN_STATE, HIDDEN_STATE_FINAL_NORM)),
        steering_w=_optional_float(_field_value(reader, KEY_STEERING_W)),
        steering_target_ratio=_optional_float(_field_value(reader, KEY_STEERING_TARGET_RATIO)),
        steering_tau=_optional_float(_field_value(reader, KEY_STEERING_TAU)),
        steering_horizon=_optional_int(_field_value(reader, KEY_STEERING_HORIZON), KEY_STEERING_HORIZON),
        steering_value_head=_optional_str(_field_value(reader, KEY_STEERING_VALUE_HEAD)),
        steering_gate=_optional_str(_field_value(reader, KEY_STEERING_GATE)),
        candidate=_candidate_meta(reader, len(np.asarray(weight))),
    )


def _candidate_meta(reader: dict[str, object], d: int) -> CandidateHeadMeta | None:
    rank = _optional_int(_field_value(reader, KEY_CAND_RANK), KEY_CAND_RANK)
    if rank is None:
        return None
    parts = {k: _field_value(reader, k) for k in (KEY_CAND_PROJ, KEY_CAND_PROJ_BIAS, KEY_CAND_TABLE,
                                                   KEY_CAND_TOKEN_BIAS)}
    missing = [k for k, v in parts.items() if v is None]
    if missing or rank < 1:
        raise ValueFormatError(f"candidate head incomplete ({', '.join(missing) or 'rank 0'}); re-export it")
    proj = np.asarray(parts[KEY_CAND_PROJ], dtype=np.float32)
    table = np.asarray(parts[KEY_CAND_TABLE], dtype=np.float32)
    if proj.size != rank * d or table.size % rank:
        raise ValueFormatError(f"candidate head arrays do not match rank {rank} and width {d}; re-export it")
    return CandidateHeadMeta(proj=proj.reshape(rank, d), proj_bias=np.asarray(parts[KEY_CAND_PROJ_BIAS]),
                             table=table.reshape(-1, rank), token_bias=np.asarray(parts[KEY_CAND_TOKEN_BIAS]))


def _optional_str(v: object) -> str | None:
    return None if v is None else str(v)


def _optional_float(v: object) -> float | None:
    return None if v is None else float(v)  # type: ignore[arg-type]


def _optional_int(v: object, key: str) -> int | None:
    """A whole number stored under ``key`` (any GGUF integer type), or None if absent."""
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ValueFormatError(f"{key} must be a whole number, got {v!r}; re-export the value model")
    return int(v)


def add_value_meta(writer, meta: ValueHeadMeta) -> None:  # type: ignore[no-untyped-def]
    """Add the ``sia.*`` keys to a ``gguf.GGUFWriter`` before its header is written."""
    writer.add_uint32(KEY_VERSION, FORMAT_VERSION)
    writer.add_array(KEY_HEAD_WEIGHT, [float(x) for x in meta.weight])
    writer.add_float32(KEY_HEAD_BIAS, float(meta.bias))
    writer.add_string(KEY_HIDDEN_STATE, meta.hidden_state)
    writer.add_float32(KEY_REWARD_MEAN, float(meta.reward_mean))
    writer.add_float32(KEY_REWARD_STD, float(meta.reward_std))
    writer.add_string(KEY_TOKENIZER_FP, meta.tokenizer_fingerprint)
    writer.add_string(KEY_BASE_MODEL, meta.base_model)
    writer.add_string(KEY_OBJECTIVE, meta.objective)
    if meta.steering_w is not None:
        writer.add_float32(KEY_STEERING_W, float(meta.steering_w))
    if meta.steering_target_ratio is not None:
        writer.add_float32(KEY_STEERING_TARGET_RATIO, float(meta.steering_target_ratio))
    if meta.steering_tau is not None:
        writer.add_float32(KEY_STEERING_TAU, float(meta.steering_tau))
    if meta.steering_horizon is not None:
        writer.add_uint32(KEY_STEERING_HORIZON, int(meta.steering_horizon))
    if meta.steering_value_head is not None:
        writer.add_string(KEY_STEERING_VALUE_HEAD, meta.steering_value_head)
    if meta.steering_gate is not None:
        writer.add_string(KEY_STEERING_GATE, meta.steering_gate)
    if meta.candidate is not None:
        c = meta.candidate
        writer.add_uint32(KEY_CAND_RANK, c.rank)
        for key, arr in ((KEY_CAND_PROJ, c.proj), (KEY_CAND_PROJ_BIAS, c.proj_bias), (KEY_CAND_TABLE, c.table),
                         (KEY_CAND_TOKEN_BIAS, c.token_bias)):
            writer.add_array(key, np.asarray(arr, dtype=np.float32).ravel())


def write_gguf_with_value_meta(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], meta: ValueHeadMeta | None,
    overrides: dict[str, object] | None = None,
) -> None:
    """Copy GGUF ``src`` (any architecture and quantisation) to ``dst`` with the value metadata
    added (existing ``sia.*`` keys replaced; ``meta=None`` writes none). ``overrides`` replaces
    the contents of existing keys, keeping their types. The write is atomic."""
    import gguf

    reader = _reader(src)
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise ValueFormatError(f"{src}: general.architecture missing; not a model GGUF")
    arch = str(arch_field.contents())
    tmp = atomic_output(dst)
    writer = None
    try:
        writer = gguf_writer(tmp, arch, endianess=reader.endianess)
        alignment = reader.fields.get("general.alignment")
        if alignment is not None:
            writer.data_alignment = int(alignment.contents())
        for f in reader.fields.values():
            if f.name.startswith("GGUF.") or f.name.startswith("sia.") or f.name == "general.architecture":
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = overrides[f.name] if overrides and f.name in overrides else f.contents()
            writer.add_key_value(f.name, value, vtype, sub_type=sub)
        if meta is not None:
            add_value_meta(writer, meta)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(t.data)
        writer.close()
        commit_output(tmp, dst)
    finally:
        if writer is not None:
            writer.close()  # idempotent; closes the file if a write failed half-way
        if tmp.exists():
            tmp.unlink()


def write_head_only_gguf(dst: str | os.PathLike[str], meta: ValueHeadMeta, *, name: str = "") -> Path:
    """A value model with no layers of its own (``meta.reads_base``): a GGUF of its ``sia.*``
    keys and no tensors, which llama.cpp never loads (the engine reads the base model's hidden
    state instead). Atomic."""

    if not meta.reads_base:
        raise ValueFormatError("only a value model that reads the base model's hidden state has no layers; "
                               f"this one reads {meta.hidden_state!r}")
    out = Path(dst)
    tmp = atomic_output(out)
    writer = None
    try:
        writer = gguf_writer(tmp, HEAD_ONLY_ARCH)
        writer.add_name(name or f"sia-edge value head ({meta.objective or 'custom'}) for {meta.base_model or 'its base'}")
        add_value_meta(writer, meta)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        commit_output(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return out


def random_head_value_gguf(base: str | os.PathLike[str], dst: str | os.PathLike[str], *, seed: int = 1234,
                           candidate_rank: int = 0) -> Path:
    """A value GGUF made of ``base`` plus a random head (weights N(0, 1/d)): values that vary by
    candidate and position but mean nothing. For tests and benchmarks, which need the cost and
    the plumbing of a value model, not its judgement. ``candidate_rank`` > 0 adds a random
    candidate head of that rank."""
    reader = _reader(base)
    arch = str(_field_value(reader, "general.architecture"))
    width = _field_value(reader, f"{arch}.embedding_length")
    if width is None:
        raise ValueFormatError(f"{base}: {arch}.embedding_length missing")
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal(int(width)) / np.sqrt(float(width))).astype(np.float32)
    candidate = None
    if candidate_rank > 0:
        tokens = _field_value(reader, "tokenizer.ggml.tokens")
        n_vocab, r, d = len(tokens), candidate_rank, int(width)
        f32 = np.float32
        candidate = CandidateHeadMeta(proj=(rng.standard_normal((r, d)) / np.sqrt(d)).astype(f32),
                                      proj_bias=np.zeros(r, dtype=f32),
                                      table=(rng.standard_normal((n_vocab, r)) / np.sqrt(r)).astype(f32),
                                      token_bias=(0.1 * rng.standard_normal(n_vocab)).astype(f32))
    meta = ValueHeadMeta(weight=weight, bias=0.1, tokenizer_fingerprint=fingerprint_from_gguf(base),
                         base_model=Path(base).stem, objective=f"random head (seed {seed}): no alignment",
                         candidate=candidate)
    write_gguf_with_value_meta(base, dst, meta)
    return Path(dst)



