"""The value model: a GGUF backbone in llama.cpp plus the head stored in its ``sia.*`` metadata.

At a junction the scorer (1) catches its KV cache up on the tokens decoded since its last use
and (2) scores the k candidates as k one-token branches of that cache: sequence 0 holds the
shared prefix, branch j is sequence j + 1, created by ``seq_cp`` (cells shared, not copied, in a
unified cache). A short catch-up and the branches are one ``llama_decode`` (the catch-up rows
belong to every sequence); a long one is a batch of its own with no outputs. The head reads the
final-norm hidden state of each branch row, and the context ends llama.cpp's graph there
(``LlamaContext(hidden_only=True)``, once the model passed its check): no vocabulary head is
computed for any row. The branch
of the token that was finally sampled is kept as part of sequence 0 (``commit``), so it is
never decoded twice; the others are dropped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from sia_edge import kernels
from sia_edge.llama_backend import LlamaContext, LlamaModel
from sia_edge.value_format import (
    HEAD_CANDIDATE,
    HEAD_SCALAR,
    HEADS,
    CandidateHeadMeta,
    ValueFormatError,
    ValueHeadMeta,
    head_missing,
    read_value_meta,
)

__all__ = ["FUSE_MAX_CATCHUP", "BaseStateScorer", "ValueModel", "ValueScorer"]

# Catch-ups up to this many tokens share the branches' llama_decode (docs/results/cost.md, "fused").
FUSE_MAX_CATCHUP = 8


class ValueModel:
    """Weights and head of a value model, shared by the scorers of every generation.

    One that reads the base model's hidden state (``meta.reads_base``) has no weights here:
    ``model`` is None and its scorers read the base context (``BaseStateScorer``)."""

    def __init__(self, path: str | os.PathLike[str], *, n_threads: int | None = None) -> None:
        from sia_edge.models import resolve_gguf

        self.n_threads = n_threads
        self.path = resolve_gguf(path, "value model")
        self._stat = self.path.stat()  # the file loaded (``identity``)
        self.meta: ValueHeadMeta = read_value_meta(self.path)
        self.weight = self.meta.weight
        self.bias = float(self.meta.bias)
        self.candidate: CandidateHeadMeta | None = self.meta.candidate
        self.model: LlamaModel | None = None
        # Scorers end the value model's graph at the hidden state (``LlamaContext(hidden_only=True)``);
        # False runs llama.cpp's whole graph, vocabulary head included (for comparisons).
        self.hidden_only = True
        if self.meta.reads_base:
            return  # the engine checks the head's shapes against the base model
        self.model = LlamaModel(self.path, what="value model")
        if self.meta.weight.size != self.model.n_embd:
            raise ValueFormatError(
                f"{self.path}: value head has {self.meta.weight.size} weights but the backbone's hidden "
                f"width is {self.model.n_embd}; the head was exported for another backbone"
            )
        if self.candidate is not None:
            self.candidate.check_shapes(self.model.n_embd, self.model.n_vocab, self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def identity(self) -> str:
        """The file as a cache key for what its values decide (the shift gate's tau): its name,
        size and modification time when it was loaded, so a rebuilt value model is calibrated again."""
        return f"{self.name}|{self._stat.st_size}|{self._stat.st_mtime_ns}"

    @property
    def reads_base(self) -> bool:
        return self.meta.reads_base

    @property
    def heads(self) -> tuple[str, ...]:
        return self.meta.heads

    def close(self) -> None:
        """Free the weights once no scorer uses them (``LlamaModel.close``)."""
        if self.model is not None:
            self.model.close()

    def new_scorer(self, *, n_ctx: int, k_max: int, n_threads: int | None = None, head: str | None = None,
                   base: LlamaContext | None = None) -> ValueScorer | BaseStateScorer:
        """A scorer for one generation. One that reads the base model's state needs ``base``,
        the generation's base context, in embeddings mode for the rows it decodes one by one."""
        if self.reads_base:
            if base is None:
                raise ValueError(f"{self.name} reads the base model's hidden state: its scorer needs the base context")
            return BaseStateScorer(self, base, k_max=k_max)
        return ValueScorer(self, n_ctx=n_ctx, k_max=k_max, n_threads=n_threads or self.n_threads,
                           head=head or HEAD_SCALAR)

    def values_at_positions(self, tokens: Sequence[int], *, n_threads: int | None = None) -> npt.NDArray[np.float32]:
        """Normalised V at every position of one sequence, from a fresh cache (no reuse):
        the reference that cached scoring is tested against, and the export parity check."""
        n = len(tokens)
        if n == 0:
            raise ValueError("values_at_positions needs at least one token")
        if self.model is None:
            raise ValueFormatError(head_missing(self.name, HEAD_SCALAR, self.heads))
        ctx = LlamaContext(self.model, n_ctx=n + 8, n_batch=n, n_threads=n_threads or self.n_threads,
                           embeddings=True, hidden_only=True)
        try:
            ctx.decode(list(tokens), 0)
            return kernels.value_head(ctx.hidden_states(n), self.weight, self.bias).copy()
        finally:
            ctx.close()


class ValueScorer:
    """One generation's value-model context. Not thread-safe: one per generation."""

    def __init__(self, value_model: ValueModel, *, n_ctx: int, k_max: int, n_threads: int | None = None,
                 head: str = HEAD_SCALAR) -> None:
        self.value_model = value_model
        self.k_max = k_max
        assert value_model.model is not None, "a value model without layers scores with BaseStateScorer"
        # k_max extra cells: the branches live beside the n_ctx cells of the sequence.
        self.ctx = LlamaContext(
            value_model.model, n_ctx=n_ctx + k_max, n_seq_max=k_max + 1, n_batch=max(512, k_max),
            n_threads=n_threads, hidden_only=value_model.hidden_only,
        )
        self.cached: list[int] = []  # tokens held by sequence 0
        self._branch_tokens: npt.NDArray[np.int32] | None = None
        self._values = np.zeros(k_max, dtype=np.float32)
        d = value_model.model.n_embd
        self._branch_hidden = np.zeros((k_max, d), dtype=np.float32)
        self._prefix_hidden = np.zeros(d, dtype=np.float32)
        self._prefix_hidden_valid = False  # _prefix_hidden belongs to the last token of `cached`
        self.want_prefix_hidden = False  # True: the scalar head too keeps prefix_hidden known (the
        # candidate head's training data needs it at every state)
        self._no_rows = np.zeros((0, d), dtype=np.float32)
        self.head = HEAD_SCALAR
        self.use_head(head)
        self.tokens_decoded = 0  # value-model tokens, catch-up plus branches
        self.decode_seconds = 0.0

    def close(self) -> None:
        self.ctx.close()

    def use_head(self, head: str) -> None:
        """Score with the scalar or the candidate head from now on (the cache stays valid)."""
        if head not in HEADS:
            raise ValueError(f"value head must be one of {HEADS}, got {head!r}")
        if head == HEAD_CANDIDATE and self.value_model.candidate is None:
            raise ValueFormatError(head_missing(self.value_model.name, head, self.value_model.heads))
        self._drop_branches()
        self.head = head

    def reset(self) -> None:
        self.ctx.clear()
        self.cached = []
        self._branch_tokens = None
        self._prefix_hidden_valid = False

    @property
    def prefix_hidden(self) -> npt.NDArray[np.float32] | None:
        """Final-norm hidden state of the last token of the sequence last scored (what the
        candidate head reads), or None if no batch output it."""
        return self._prefix_hidden if self._prefix_hidden_valid else None

    def _catch_up(self, sequence: Sequence[int], k: int,
                  candidates: Sequence[int] | npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
        """Bring sequence 0 to ``sequence`` and decode the k candidate branches after it (none
        for k = 0: the candidate head), returning the hidden states of the branch rows.

        A short catch-up and the branches are one ``llama_decode``: the catch-up rows belong to
        sequence 0 and every branch, each branch row to its own sequence. In embeddings mode the
        catch-up rows are outputs too, so a long catch-up, the prompt above all, is a batch of its
        own with no outputs, decoded as a fresh context would (docs/results/cost.md, "fused"); only
        its last row is an output when the prefix's hidden state is needed (the candidate head,
        ``want_prefix_hidden``), which ``prefix_hidden`` then holds."""
        p, n_before = len(sequence), len(self.cached)
        # the last token is decoded again if its hidden state is needed and unknown (after a reset)
        was_valid = self._prefix_hidden_valid
        redo_last = (self.want_prefix_hidden or k == 0) and not (was_valid and n_before <= p)
        common = self.ctx.keep_common_prefix(self.cached, sequence, min_new=min(1, p) if redo_last else 0)
        self._prefix_hidden_valid = was_valid and common == n_before == p  # else the tail sets it
        new = [int(t) for t in sequence[common:]]
        if len(new) <= FUSE_MAX_CATCHUP:
            head, tail = [], new
        elif k and not self.want_prefix_hidden:
            head, tail = new, []  # one batch, as a fresh context would decode it (the prompt)
        else:
            head, tail = new[:-1], new[-1:]
        if head:
            self.ctx.set_embeddings(False)  # no outputs: llama.cpp skips the vocabulary head
            self.ctx.decode(head, common, output_last=False)
            self.cached.extend(head)
        for j in range(k):  # the cached cells now also belong to branch j + 1
            self.ctx.seq_cp(0, j + 1)
        if tail or k:
            self.ctx.set_embeddings(True)
            every = list(range(k + 1))
            self.ctx.decode_rows(tail + [int(c) for c in candidates], [*range(p - len(tail), p)] + [p] * k,
                                 [every] * len(tail) + [[j + 1] for j in range(k)])
            self.cached.extend(tail)
        self.tokens_decoded += len(new) + k
        if tail:
            self._prefix_hidden[:] = self.ctx.hidden_states(len(tail) + k)[len(tail) - 1]
            self._prefix_hidden_valid = True
        return self.ctx.hidden_states(len(tail) + k)[len(tail):] if k else self._no_rows

    def hidden_of(self, sequence: Sequence[int]) -> npt.NDArray[np.float32]:
        """The final-norm hidden state of ``sequence``'s last token (the cache caught up on it,
        no candidates scored): what a candidate head reads."""
        if not sequence:
            raise ValueError("hidden_of needs at least one token")
        self._drop_branches()
        self._catch_up(sequence, 0, ())  # no candidates: the last token's row is always an output
        assert self._prefix_hidden_valid
        return self._prefix_hidden

    def score(self, sequence: Sequence[int], candidates: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
        """Normalised values of each candidate c (k <= k_max) after ``sequence``, as float32:
        V(sequence + [c]) with the scalar head, Q(sequence, c) with the candidate head."""
        k = len(candidates)
        if not 1 <= k <= self.k_max:
            raise ValueError(f"between 1 and {self.k_max} candidates can be scored at once, got {k}")
        if len(sequence) + 1 > self.ctx.n_ctx - self.k_max:
            raise ValueError("the sequence no longer fits in the value model's context")
        t0 = time.perf_counter()
        self._drop_branches()
        out = self._values[:k]
        vm = self.value_model
        if self.head == HEAD_CANDIDATE:
            assert vm.candidate is not None
            self._catch_up(sequence, 0, ())
            if not self._prefix_hidden_valid:
                raise ValueError("the candidate head needs at least one token before the candidates")
            kernels.candidate_head(self._prefix_hidden, vm.candidate, np.asarray(candidates, dtype=np.int32),
                                   vm.weight, vm.bias, out)
        else:
            hidden = self._catch_up(sequence, k, candidates)
            kernels.value_head(hidden, vm.weight, vm.bias, out)
            self._branch_hidden[:k] = hidden
            self._branch_tokens = np.array(candidates, dtype=np.int32)
        self.decode_seconds += time.perf_counter() - t0
        return out

    def commit(self, chosen: int) -> None:
        """The candidate at index ``chosen`` was sampled. Scalar head: keep its branch cell as
        sequence 0 (it is never decoded twice). Candidate head: nothing was decoded for it; the
        next catch-up decodes it."""
        if self.head == HEAD_CANDIDATE:
            return
        if self._branch_tokens is None:
            raise RuntimeError("commit() without a preceding score()")
        p = len(self.cached)
        self.ctx.seq_cp(chosen + 1, 0, p, p + 1)
        self.cached.append(int(self._branch_tokens[chosen]))
        self._prefix_hidden[:] = self._branch_hidden[chosen]
        self._prefix_hidden_valid = True
        self._drop_branches()

    def _drop_branches(self) -> None:
        if self._branch_tokens is not None:
            for j in range(len(self._branch_tokens)):
                self.ctx.seq_rm(j + 1)
            self._branch_tokens = None


class BaseStateScorer:
    """The scorer of a value model with no layers of its own (``ValueModel.reads_base``): at a
    junction the candidate head reads the base model's final-norm hidden state of the sequence's
    last token, which the base context (in embeddings mode) output with its logits. Nothing is
    decoded for the value model: a junction costs the head alone. Same interface as
    ``ValueScorer``; the engine keeps the base context's last output row the sequence's last
    token whenever it scores."""

    def __init__(self, value_model: ValueModel, base: LlamaContext, *, k_max: int) -> None:
        assert value_model.candidate is not None
        self.value_model = value_model
        self.base = base
        self.k_max = k_max
        self.head = HEAD_CANDIDATE
        self.tokens_decoded = 0  # value-model tokens: none, ever
        self.decode_seconds = 0.0
        self._values = np.zeros(k_max, dtype=np.float32)
        self._hidden: npt.NDArray[np.float32] | None = None

    def close(self) -> None:
        """Nothing of its own to free: the base context belongs to the engine's slot."""

    def use_head(self, head: str) -> None:
        if head not in HEADS:
            raise ValueError(f"value head must be one of {HEADS}, got {head!r}")
        if head != HEAD_CANDIDATE:
            raise ValueFormatError(head_missing(self.value_model.name, head, self.value_model.heads))

    def reset(self) -> None:
        self._hidden = None

    def score(self, sequence: Sequence[int], candidates: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
        k = len(candidates)
        if not 1 <= k <= self.k_max:
            raise ValueError(f"between 1 and {self.k_max} candidates can be scored at once, got {k}")
        if not sequence:
            raise ValueError("the candidate head needs at least one token before the candidates")
        t0 = time.perf_counter()
        vm = self.value_model
        assert vm.candidate is not None
        self._hidden = self.base.last_hidden_state()
        out = self._values[:k]
        kernels.candidate_head(self._hidden, vm.candidate, np.asarray(candidates, dtype=np.int32), vm.weight,
                               vm.bias, out)
        self.decode_seconds += time.perf_counter() - t0
        return out

    def commit(self, chosen: int) -> None:
        """Nothing to keep: the base context decodes the sampled token."""
