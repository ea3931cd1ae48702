"""The thin layer over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Why not ``llama_cpp.Llama``: the engine needs things its high-level class does not expose —
several sequences in one KV cache (value-model branches), output flags per batch row, switching
embeddings on only for the rows that need hidden states, and views over the raw logits and
hidden-state buffers without copies, and ending the graph before the vocabulary head when only
hidden states are read (``hidden_only``). One model (weights) is shared by any number of
contexts; a context belongs to one thread at a time.

Ownership of llama.cpp's handles is explicit, because a freed handle used again crashes the
process: each handle is freed exactly once, by ``close()`` or by a ``weakref.finalize`` when its
Python object is collected (never by ``__del__``, whose order inside a garbage cycle is
arbitrary). A context holds its model (``LlamaModel.hold``), so weights are never freed under a
context, and every call on a closed handle raises ``LlamaError`` instead of touching freed memory.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp._logger import set_verbose

from sia_edge import _core
from sia_edge.models import resolve_gguf
from sia_edge.value_format import tokenizer_fingerprint

__all__ = ["LlamaContext", "LlamaError", "LlamaModel", "SpecialToken", "StreamDecoder"]

_init_lock = threading.Lock()
_initialised = False


class LlamaError(RuntimeError):
    """llama.cpp refused an operation; the message says which and why."""


def _init_backend() -> None:
    global _initialised
    with _init_lock:
        if not _initialised:
            # llama.cpp logs every tensor it loads; keep errors only unless asked for more.
            set_verbose(os.environ.get("SIA_EDGE_VERBOSE", "") not in ("", "0"))
            llama_cpp.llama_backend_init()
            _initialised = True


# ggml's GGML_MAX_N_THREADS: far more threads than that made llama.cpp hang or crash the process
# (100,000 segfaulted, 5,000 hung creating threads; measured), so it is refused up front.
MAX_THREADS = 512


_tensor_name_address: int | None = None


def _ggml_tensor_name() -> int:
    """Address of ggml_get_name in the ggml library llama.cpp loaded (for ``_core.GraphStop``), or
    0 if it cannot be found: hidden_only contexts then run the whole graph."""
    global _tensor_name_address
    with _init_lock:
        if _tensor_name_address is None:
            from llama_cpp import llama_cpp as bindings
            from llama_cpp._ctypes_extensions import load_shared_library

            address = 0
            # libllama itself exports it when ggml is linked in statically; else the ggml-base
            # library beside it (the directory llama-cpp-python loaded libllama from)
            for lib in (lambda: bindings._lib, lambda: load_shared_library("ggml-base", Path(bindings._base_path))):
                try:
                    address = ctypes.cast(lib().ggml_get_name, ctypes.c_void_p).value or 0
                except (OSError, RuntimeError, AttributeError):
                    continue
                if address:
                    break
            _tensor_name_address = address
        return _tensor_name_address


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def check_threads(n_threads: int | None) -> None:
    """Refuse a thread count llama.cpp cannot run with (None means all cores)."""
    if n_threads is None:
        return
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 1 <= n_threads <= MAX_THREADS:
        raise ValueError(f"threads must be a whole number from 1 to {MAX_THREADS}, got {n_threads!r} "
                         f"(this machine has {default_threads()} cores)")


@dataclass(frozen=True)
class SpecialToken:
    """A token that llama.cpp's tokenizer matches by its text when it parses special tokens."""

    id: int
    text: str
    lstrip: bool  # whitespace before it is dropped
    rstrip: bool  # whitespace after it is dropped


class LlamaModel:
    """A GGUF loaded into llama.cpp: weights, vocabulary, chat template, tokenizer fingerprint."""

    def __init__(self, path: str | os.PathLike[str], *, what: str = "model") -> None:
        _init_backend()
        self.path = resolve_gguf(path, what)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        ptr = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not ptr:
            raise LlamaError(
                f"{what}: llama.cpp could not load {self.path} (unsupported architecture, truncated "
                "file or wrong tensor count; run with SIA_EDGE_VERBOSE=1 to see its log)"
            )
        self._handle = _Handle(ptr)
        self._vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(ptr))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(ptr))
        self.name = self.meta("general.name") or self.path.stem
        self._fingerprint: str | None = None
        # Whether ending the graph at the hidden state leaves hidden states and KV cache exactly
        # as the whole graph does, for this architecture (``_check_graph_stop``).
        self.graph_stop_exact: bool | None = None
        self._special_tokens: list[SpecialToken] | None = None
        # One scratch buffer per thread: token_to_piece runs without the GIL, so a buffer shared
        # by parallel generations would hand one thread the bytes another just wrote.
        self._piece_scratch = threading.local()
        # Ownership (see the module docstring): the weights are freed once, by close() when no
        # context uses them any more, or when this object is collected. Not at interpreter exit:
        # a daemon thread may still be decoding then, and the OS reclaims the memory anyway.
        # Reentrant: a context's finaliser may run inside close() when a garbage collection
        # happens to start there, and it takes this lock too.
        self._lock = threading.RLock()
        self._holders = 0  # open contexts and hold() blocks: close() waits for them to end
        self._close_requested = False
        self._free = weakref.finalize(self, _free_handle, self._handle, llama_cpp.llama_model_free)
        self._free.atexit = False

    @property
    def ptr(self) -> Any:
        """llama.cpp's model, or None once freed."""
        return self._handle.ptr

    @property
    def closed(self) -> bool:
        return self.ptr is None

    def close(self) -> None:
        """Free the weights now, or as soon as the last context over them is closed and the last
        ``hold()`` block has ended: closing a model never frees weights something still uses."""
        with self._lock:
            self._close_requested = True
            self._free_if_unused()

    def _free_if_unused(self) -> None:  # with self._lock held
        if self._close_requested and self._holders == 0 and self.ptr is not None:
            self._free()

    def _acquire(self) -> None:
        with self._lock:
            if self.ptr is None or self._close_requested:
                raise LlamaError(f"{self.path.name} is closed: load the model again to use it")
            self._holders += 1

    def _release(self) -> None:
        with self._lock:
            self._holders -= 1
            self._free_if_unused()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the weights and vocabulary alive for the block, even if another thread closes
        the model meanwhile (tokenising a prompt while an engine is being closed)."""
        self._acquire()
        try:
            yield
        finally:
            self._release()

    def _live(self) -> Any:
        ptr = self.ptr
        if ptr is None:
            raise LlamaError(f"{self.path.name} is closed")
        return ptr

    @property
    def vocab(self) -> Any:
        """llama.cpp's vocabulary of this model (owned by the weights: valid while they are)."""
        self._live()
        return self._vocab

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self._live(), key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self._live(), key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    @property
    def chat_template(self) -> str | None:
        t = llama_cpp.llama_model_chat_template(self._live(), None)
        return t.decode("utf-8") if t else None

    @property
    def fingerprint(self) -> str:
        """``value_format.tokenizer_fingerprint`` of this model's vocabulary (computed once)."""
        if self._fingerprint is None:
            get, vocab = llama_cpp.llama_vocab_get_text, self.vocab
            with self.hold():
                self._fingerprint = tokenizer_fingerprint(get(vocab, i) for i in range(self.n_vocab))
        return self._fingerprint

    @property
    def bos(self) -> int:
        """The beginning-of-sequence token, or -1."""
        return int(llama_cpp.llama_vocab_bos(self.vocab))

    @property
    def eos(self) -> int:
        """The end-of-sequence token, or -1."""
        return int(llama_cpp.llama_vocab_eos(self.vocab))

    @property
    def add_bos(self) -> bool:
        """Whether tokenising with special tokens starts with BOS."""
        return bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))

    @property
    def add_eos(self) -> bool:
        """Whether tokenising with special tokens ends with EOS."""
        return bool(llama_cpp.llama_vocab_get_add_eos(self.vocab))

    @property
    def special_tokens(self) -> list[SpecialToken]:
        """Control, user-defined and unknown tokens, longest text first: the ones llama.cpp's
        tokenizer matches by text when it parses special tokens (computed once)."""
        if self._special_tokens is None:
            get_attr, get_text, vocab = llama_cpp.llama_vocab_get_attr, llama_cpp.llama_vocab_get_text, self.vocab
            matched = (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
                       | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN)
            found = []
            with self.hold():
                for i in range(self.n_vocab):
                    attr = int(get_attr(vocab, i))
                    if attr & matched:
                        text = get_text(vocab, i).decode("utf-8", "replace")
                        if text:
                            found.append(SpecialToken(i, text, bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP),
                                                      bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP)))
            found.sort(key=lambda t: -len(t.text.encode()))
            self._special_tokens = found
        return self._special_tokens

    @property
    def max_token_bytes(self) -> int:
        """An upper bound on the bytes of text one token stands for: the longest token text (a
        token's text spells its bytes with at least as many bytes, e.g. "▁" for a space)."""
        get, vocab = llama_cpp.llama_vocab_get_text, self.vocab
        with self.hold():
            return max(1, max(len(get(vocab, i) or b"") for i in range(self.n_vocab)))

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        return str(llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace"))

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens rendered as empty)."""
        buf = getattr(self._piece_scratch, "buf", None)
        if buf is None:
            buf = self._piece_scratch.buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, big, len(big), 0, False)
            return big.raw[:n]
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")


class StreamDecoder:
    """Token bytes -> text pieces, holding back incomplete UTF-8 sequences across tokens."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token: int) -> str:
        return self._dec.decode(self.model.piece(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


@dataclass
class _Batch:
    raw: llama_cpp.llama_batch
    capacity: int
    n_seq_max: int
    token: npt.NDArray[np.int32]
    pos: npt.NDArray[np.int32]
    n_seq_id: npt.NDArray[np.int32]
    logits: npt.NDArray[np.int8]


class LlamaContext:
    """One llama.cpp context (KV cache + compute buffers) over a shared ``LlamaModel``."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int,
        n_seq_max: int = 1,
        n_batch: int = 512,
        n_threads: int | None = None,
        embeddings: bool = False,
        hidden_only: bool = False,
        _probe: bool = False,
    ) -> None:
        """``hidden_only``: the context is read for hidden states only (a value model). Each decode
        then ends at the final-norm hidden state and skips the vocabulary head, the n_vocab x n_embd
        product per output row (docs/results/cost.md, "Hidden states without the vocabulary head");
        ``logits()`` refuses. Before the first such context of a model, ``_check_graph_stop`` checks
        that the hidden states and the KV cache come out exactly as the whole graph's; if not, or
        if ggml_get_name cannot be found, the context runs the whole graph. ``_probe``: the check's
        own context, ended at the hidden state unchecked."""
        check_threads(n_threads)
        self.model = model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = params.n_threads_batch = n_threads or default_threads()
        params.embeddings = embeddings
        # One cache shared by all sequences: seq_cp then shares cells instead of copying them.
        params.kv_unified = True
        # llama.cpp's CPU flash attention moved SmolLM2's logits by up to 1.3 against the plain
        # path (measured); llama-cpp-python's Llama also disables it. Exactness wins here.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self._hidden_only = hidden_only
        # Released by the finaliser below, after llama_free: llama.cpp holds its state's address.
        self._graph_stop: Any = None
        tensor_name = _ggml_tensor_name() if hidden_only else 0
        if tensor_name and not _probe and model.graph_stop_exact is None:
            _check_graph_stop(model, n_threads)
        if tensor_name and (_probe or model.graph_stop_exact):
            self._graph_stop = _core.GraphStop(tensor_name)
        if self._graph_stop is not None:
            params.cb_eval = llama_cpp.ggml_backend_sched_eval_callback(_core.GraphStop.callback)
            params.cb_eval_user_data = self._graph_stop.user_data
        model._acquire()  # the weights outlive this context, whoever closes the model meanwhile
        ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ptr:
            model._release()
            if self._graph_stop is not None:
                self._graph_stop.release()
            raise LlamaError(f"llama.cpp could not create a context of {n_ctx} tokens for {model.path.name} (out of memory?)")
        self._handle = _Handle(ptr)
        self.n_ctx = int(llama_cpp.llama_n_ctx(ptr))
        self.n_seq_max = n_seq_max
        self.memory = llama_cpp.llama_get_memory(ptr)
        self._embeddings = embeddings
        self._batch = self._make_batch(n_batch, n_seq_max)
        self.n_batch = n_batch
        # Freed exactly once, by close() or when this object is collected, whatever the order in
        # which a garbage cycle's objects are finalised: the callback holds the model, so the
        # weights cannot go first, and it voids the handle, so a cycle member finalised after it
        # (a generator's cleanup) gets LlamaError instead of freed memory. Not at interpreter exit
        # (a daemon thread may be decoding).
        self._free = weakref.finalize(self, _free_context, self._handle, self._batch.raw, model, self._graph_stop)
        self._free.atexit = False

    @property
    def hidden_only(self) -> bool:
        return self._hidden_only

    @property
    def graph_stop_active(self) -> bool:
        """Whether this context's decodes end at the hidden state (``hidden_only`` and the model passed the check)."""
        return self._graph_stop is not None

    @property
    def graph_stops(self) -> int:
        """Decodes this context ended before the vocabulary head (0 unless ``graph_stop_active``)."""
        return int(self._graph_stop.stops) if self._graph_stop is not None else 0

    def _make_batch(self, capacity: int, n_seq_max: int) -> _Batch:
        raw = llama_cpp.llama_batch_init(capacity, 0, n_seq_max)
        view = np.ctypeslib.as_array
        return _Batch(
            raw=raw, capacity=capacity, n_seq_max=n_seq_max,
            token=view(raw.token, shape=(capacity,)),
            pos=view(raw.pos, shape=(capacity,)),
            n_seq_id=view(raw.n_seq_id, shape=(capacity,)),
            logits=view(raw.logits, shape=(capacity,)),
        )

    @property
    def ptr(self) -> Any:
        """llama.cpp's context, or None once freed."""
        handle = getattr(self, "_handle", None)
        return handle.ptr if handle is not None else None

    @property
    def closed(self) -> bool:
        return self.ptr is None

    def close(self) -> None:
        """Free the context now (idempotent). Any later call on it raises ``LlamaError``."""
        if self.ptr is not None:
            self._free()

    def _live(self) -> Any:
        ptr = self.ptr
        if ptr is None:
            raise LlamaError(f"this llama.cpp context over {self.model.path.name} is closed")
        return ptr

    def set_embeddings(self, on: bool) -> None:
        """With embeddings on, llama.cpp outputs every row of a batch (and, unless the graph ends at
        the hidden state, computes the vocabulary head for it): switch them on only for batches
        whose rows all need hidden states."""
        if on != self._embeddings:
            llama_cpp.llama_set_embeddings(self._live(), on)
            self._embeddings = on

    def decode(
        self,
        tokens: list[int] | npt.NDArray[np.int32],
        start_pos: int | npt.NDArray[np.int32],
        *,
        seq_ids: list[int] | None = None,
        output_last: bool = True,
    ) -> None:
        """Decode tokens at consecutive positions from ``start_pos`` in sequence 0 — or, with
        ``seq_ids``, token i alone in sequence seq_ids[i] at position start_pos (branches).
        Long inputs are split into batches of ``n_batch``; only the last row is an output."""
        n = len(tokens)
        if n == 0:
            return
        ctx = self._live()
        b = self._batch
        if seq_ids is not None and n > b.capacity:
            raise LlamaError(f"{n} branches exceed the batch capacity {b.capacity}")
        for off in range(0, n, b.capacity):
            m = min(b.capacity, n - off)
            b.token[:m] = tokens[off:off + m]
            if seq_ids is None:
                b.pos[:m] = np.arange(int(start_pos) + off, int(start_pos) + off + m, dtype=np.int32)
                sids = [0] * m
            else:
                b.pos[:m] = start_pos
                sids = seq_ids
            b.n_seq_id[:m] = 1
            for i in range(m):
                b.raw.seq_id[i][0] = sids[i]
            b.logits[:m] = 0
            if self._embeddings:
                b.logits[:m] = 1
            elif output_last and off + m == n:
                b.logits[m - 1] = 1
            b.raw.n_tokens = m
            _check_decode(llama_cpp.llama_decode(ctx, b.raw))

    def decode_rows(
        self,
        tokens: Sequence[int] | npt.NDArray[np.int32],
        positions: Sequence[int] | npt.NDArray[np.int32],
        seq_ids: Sequence[Sequence[int]],
        *,
        all_outputs: bool = False,
    ) -> None:
        """Decode one batch of rows, row i at ``positions[i]`` in every sequence of ``seq_ids[i]``
        (a row shared by several sequences is one KV cell they all see). In embeddings mode every
        row is an output; otherwise the last, or every row with ``all_outputs`` (``logits(i)``)."""
        n = len(tokens)
        ctx = self._live()
        b = self._batch
        if not 0 < n <= b.capacity:
            raise LlamaError(f"{n} rows do not fit one batch of {b.capacity}")
        b.token[:n] = tokens
        b.pos[:n] = positions
        for i, sids in enumerate(seq_ids):
            if not 0 < len(sids) <= b.n_seq_max:
                raise LlamaError(f"row {i} names {len(sids)} sequences; a row holds 1 to {b.n_seq_max}")
            b.n_seq_id[i] = len(sids)
            for j, s in enumerate(sids):
                b.raw.seq_id[i][j] = s
        b.logits[:n] = 1 if self._embeddings or all_outputs else 0
        b.logits[n - 1] = 1
        b.raw.n_tokens = n
        _check_decode(llama_cpp.llama_decode(ctx, b.raw))

    def keep_common_prefix(self, cached: list[int], tokens: Sequence[int], *, min_new: int = 0) -> int:
        """Drop from sequence 0 (which holds ``cached``, updated in place) what differs from
        ``tokens``, keeping at least ``min_new`` tokens of ``tokens`` to decode. Returns the kept length."""
        n = min(len(cached), len(tokens) - min_new)
        common = 0
        if n > 0 and cached[:n] == list(tokens[:n]):
            common = n
        else:
            while common < n and cached[common] == tokens[common]:
                common += 1
        self.seq_rm(0, common, -1)
        del cached[common:]
        return common

    def decode_from_prefix(self, cached: list[int], tokens: Sequence[int], *, min_new: int = 0,
                           output_last: bool = True) -> int:
        """Make sequence 0, which holds ``cached``, hold ``tokens``: keep the longest common
        prefix (leaving at least ``min_new`` tokens to decode: 1 when the last row's logits are
        needed), drop what diverged, decode the rest. ``cached`` is updated in place (emptied
        first, so a failed decode never leaves it claiming cells it lost). Returns the tokens kept."""
        common = self.keep_common_prefix(cached, tokens, min_new=min_new)
        kept = list(cached)
        cached.clear()
        self.decode(list(tokens[common:]), common, output_last=output_last)
        cached.extend(kept)
        cached.extend(tokens[common:])
        return common

    def logits(self, i: int = -1) -> npt.NDArray[np.float32]:
        """Writable float32 view (no copy) of the logits of output row i (-1: the last)."""
        if self.hidden_only:
            raise LlamaError("this context reads hidden states only (hidden_only): it computes no logits")
        ptr = llama_cpp.llama_get_logits_ith(self._live(), i)
        if not ptr:
            raise LlamaError("llama.cpp has no logits for this row (it was not marked as an output)")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def last_hidden_state(self) -> npt.NDArray[np.float32]:
        """(n_embd,) view of the final-norm hidden state of the last batch's last output row."""
        ptr = llama_cpp.llama_get_embeddings_ith(self._live(), -1)
        if not ptr:
            raise LlamaError("llama.cpp has no hidden state for the last row: the context was not in embeddings mode")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,))

    def hidden_states(self, n_rows: int) -> npt.NDArray[np.float32]:
        """(n_rows, n_embd) view of the final-norm hidden states of the last batch's outputs."""
        ptr = llama_cpp.llama_get_embeddings(self._live())
        if not ptr:
            raise LlamaError("llama.cpp has no hidden states: the context was not in embeddings mode")
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.model.n_embd))

    # KV-cache bookkeeping (positions are [p0, p1); -1 means open-ended).
    # The memory handle belongs to the context: _live() first, so a closed one raises instead.
    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        self._live()
        llama_cpp.llama_memory_seq_rm(self.memory, seq, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self._live()
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def clear(self) -> None:
        self._live()
        llama_cpp.llama_memory_clear(self.memory, True)


def _check_graph_stop(model: LlamaModel, n_threads: int | None) -> None:
    """Once per model (``LlamaModel.graph_stop_exact``): decode a few ordinary tokens, all but the
    last, then the last (which reads the KV cells the first decode wrote), in a context ended at
    the hidden state and in one running the whole graph, of the same shape; keep the shortcut only
    if both give the same hidden states, bit for bit. So it also shows that nothing the cache needs
    comes after the hidden state in this architecture's graph. Two contexts, because a graph ended
    too early hands out whatever its output buffer last held, which in one context could be the
    reference's own result; rows that are not finite or not distinct fail the check."""
    with model._lock:
        if model.graph_stop_exact is not None:
            return
        tokens = model.tokenize("The quick brown fox jumps over the lazy dog", add_special=False)[:4]
        if len(tokens) < 2 or len(set(tokens)) < len(tokens):
            model.graph_stop_exact = False
            return
        n = len(tokens)
        runs = []
        for probe in (False, True):
            ctx = LlamaContext(model, n_ctx=16, n_batch=8, n_threads=n_threads, embeddings=True,
                               hidden_only=probe, _probe=probe)
            try:
                ctx.decode(tokens[:-1], 0)
                first = ctx.hidden_states(n - 1).copy()
                ctx.decode(tokens[-1:], n - 1)
                rows = np.vstack([first, ctx.last_hidden_state()])
                runs.append((rows, ctx.graph_stops))
            finally:
                ctx.close()
        (whole, _), (short, stops) = runs
        model.graph_stop_exact = bool(
            stops == 2 and np.isfinite(whole).all() and len({r.tobytes() for r in whole}) == n
            and np.array_equal(whole, short))


def _check_decode(rc: int) -> None:
    if rc != 0:
        raise LlamaError(
            f"llama_decode failed with code {rc} "
            + ("(no free KV-cache slot: the context is full)" if rc == 1 else "(see SIA_EDGE_VERBOSE=1)")
        )


class _Handle:
    """A llama.cpp pointer that its finaliser voids: whoever still holds the Python object after
    the finaliser ran (another member of the same garbage cycle) sees None, not freed memory."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: Any) -> None:
        self.ptr = ptr


def _free_handle(handle: _Handle, free: Any) -> None:
    ptr, handle.ptr = handle.ptr, None
    if ptr is not None:
        free(ptr)


def _free_context(handle: _Handle, batch: llama_cpp.llama_batch, model: LlamaModel, graph_stop: Any) -> None:
    """A context's finaliser: its batch and context first, then its ``GraphStop`` (whose state the
    context read until llama_free), then its hold on the weights."""
    ptr, handle.ptr = handle.ptr, None
    llama_cpp.llama_batch_free(batch)
    if ptr is not None:
        llama_cpp.llama_free(ptr)
    if graph_stop is not None:
        graph_stop.release()
    model._release()

