"""The value model: a GGUF backbone in llama.cpp plus the head stored in its ``sia.*`` metadata.

At a junction the scorer (1) catches its KV cache up on the tokens decoded since its last use,
in one batch with no outputs (so llama.cpp computes no vocabulary head for them), then (2)
scores the k candidates as k one-token branches of that cache in one batch: sequence 0 holds
the shared prefix, branch j is sequence j + 1, created by ``seq_cp`` (cells shared, not copied,
in a unified cache). The head reads the final-norm hidden state of each branch row. The branch
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
from sia_edge.value_format import ValueFormatError, ValueHeadMeta, read_value_meta

__all__ = ["ValueModel", "ValueScorer"]


class ValueModel:
    """Weights and head of a value model, shared by the scorers of every generation."""

    def __init__(self, path: str | os.PathLike[str], *, n_threads: int | None = None) -> None:
        from sia_edge.models import resolve_gguf

        self.n_threads = n_threads
        self.path = resolve_gguf(path, "value model")
        self.meta: ValueHeadMeta = read_value_meta(self.path)
        self.model = LlamaModel(self.path, what="value model")
        if self.meta.weight.size != self.model.n_embd:
            raise ValueFormatError(
                f"{self.path}: value head has {self.meta.weight.size} weights but the backbone's hidden "
                f"width is {self.model.n_embd}; the head was exported for another backbone"
            )
        self.weight = self.meta.weight
        self.bias = float(self.meta.bias)

    @property
    def name(self) -> str:
        return self.path.name

    def close(self) -> None:
        """Free the weights once no scorer uses them (``LlamaModel.close``)."""
        self.model.close()

    def new_scorer(self, *, n_ctx: int, k_max: int, n_threads: int | None = None) -> ValueScorer:
        return ValueScorer(self, n_ctx=n_ctx, k_max=k_max, n_threads=n_threads or self.n_threads)

    def values_at_positions(self, tokens: Sequence[int], *, n_threads: int | None = None) -> npt.NDArray[np.float32]:
        """Normalised V at every position of one sequence, from a fresh cache (no reuse):
        the reference that cached scoring is tested against, and the export parity check."""
        n = len(tokens)
        if n == 0:
            raise ValueError("values_at_positions needs at least one token")
        ctx = LlamaContext(self.model, n_ctx=n + 8, n_batch=n, n_threads=n_threads or self.n_threads,
                           embeddings=True)
        try:
            ctx.decode(list(tokens), 0)
            return kernels.value_head(ctx.hidden_states(n), self.weight, self.bias).copy()
        finally:
            ctx.close()


class ValueScorer:
    """One generation's value-model context. Not thread-safe: one per generation."""

    def __init__(self, value_model: ValueModel, *, n_ctx: int, k_max: int, n_threads: int | None = None) -> None:
        self.value_model = value_model
        self.k_max = k_max
        # k_max extra cells: the branches live beside the n_ctx cells of the sequence.
        self.ctx = LlamaContext(
            value_model.model, n_ctx=n_ctx + k_max, n_seq_max=k_max + 1, n_batch=max(512, k_max),
            n_threads=n_threads,
        )
        self.cached: list[int] = []  # tokens held by sequence 0
        self._branch_tokens: npt.NDArray[np.int32] | None = None
        self._values = np.zeros(k_max, dtype=np.float32)
        self.tokens_decoded = 0  # value-model tokens, catch-up plus branches
        self.decode_seconds = 0.0

    def close(self) -> None:
        self.ctx.close()

    def reset(self) -> None:
        self.ctx.clear()
        self.cached = []
        self._branch_tokens = None

    def _sync_prefix(self, sequence: Sequence[int]) -> None:
        """Make sequence 0 hold exactly ``sequence``: drop what diverged, decode what is new."""
        self.ctx.set_embeddings(False)  # no outputs: llama.cpp skips the vocabulary head
        kept = self.ctx.decode_from_prefix(self.cached, sequence, output_last=False)
        self.tokens_decoded += len(self.cached) - kept

    def score(self, sequence: Sequence[int], candidates: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
        """Normalised values V(sequence + [c]) for each candidate c (k <= k_max), as float32."""
        k = len(candidates)
        if not 1 <= k <= self.k_max:
            raise ValueError(f"between 1 and {self.k_max} candidates can be scored at once, got {k}")
        if len(sequence) + 1 > self.ctx.n_ctx - self.k_max:
            raise ValueError("the sequence no longer fits in the value model's context")
        t0 = time.perf_counter()
        self._drop_branches()
        self._sync_prefix(sequence)
        p = len(sequence)
        for j in range(k):
            self.ctx.seq_cp(0, j + 1)
        self.ctx.set_embeddings(True)
        self.ctx.decode(candidates, p, seq_ids=list(range(1, k + 1)))
        self.tokens_decoded += k
        out = self._values[:k]
        kernels.value_head(self.ctx.hidden_states(k), self.value_model.weight, self.value_model.bias, out)
        self._branch_tokens = np.array(candidates, dtype=np.int32)
        self.decode_seconds += time.perf_counter() - t0
        return out

    def commit(self, chosen: int) -> None:
        """The candidate at index ``chosen`` was sampled: keep its branch cell as sequence 0."""
        if self._branch_tokens is None:
            raise RuntimeError("commit() without a preceding score()")
        p = len(self.cached)
        self.ctx.seq_cp(chosen + 1, 0, p, p + 1)
        self.cached.append(int(self._branch_tokens[chosen]))
        self._drop_branches()

    def _drop_branches(self) -> None:
        if self._branch_tokens is not None:
            for j in range(len(self._branch_tokens)):
                self.ctx.seq_rm(j + 1)
            self._branch_tokens = None
