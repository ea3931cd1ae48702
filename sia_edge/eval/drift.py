"""Drift: how far an answer is from what the base model itself would say (``BaseLogprobScorer``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from sia_edge.llama_backend import LlamaContext, LlamaModel

__all__ = ["BaseLogprobScorer"]


class BaseLogprobScorer:
    """Re-scores (prompt, response) with the base model: log p(response_t | prompt, response_<t)
    at temperature 1 over the full vocabulary. Owns one llama.cpp context; the prompt's shared
    prefix (the chat template's system block) stays in its KV cache between calls."""

    CHUNK = 64  # response rows per batch: each one outputs a full row of logits (n_vocab floats)

    def __init__(self, model: LlamaModel, *, n_ctx: int, n_threads: int | None = None) -> None:
        from sia_edge.llama_backend import LlamaContext

        self.model = model
        self.ctx: LlamaContext = LlamaContext(model, n_ctx=n_ctx, n_batch=512, n_threads=n_threads)
        self.cached: list[int] = []  # the tokens sequence 0 of the KV cache holds: the last prompt

    def close(self) -> None:
        self.ctx.close()

    def response_logprobs(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> npt.NDArray[np.float64]:
        """One log-probability per response token (empty for an empty response)."""
        n = len(response_ids)
        if n == 0:
            return np.zeros(0)
        if not prompt_ids:
            raise ValueError("drift needs a non-empty prompt (its last row predicts the first response token)")
        if len(prompt_ids) + n > self.ctx.n_ctx:
            raise ValueError(f"prompt + response ({len(prompt_ids) + n} tokens) exceed the context {self.ctx.n_ctx}")
        ctx, prompt = self.ctx, list(prompt_ids)
        # Prompt: reuse the cached prefix, decode the rest with only the last row as an output
        # (at least one token is decoded again, so that its row predicts the first response token).
        ctx.set_embeddings(False)
        ctx.decode_from_prefix(self.cached, prompt, min_new=1)
        rows = [np.array(ctx.logits(-1), dtype=np.float64)]
        # Response: every row an output (embeddings mode outputs all rows, logits included).
        if n > 1:
            ctx.set_embeddings(True)
            body = list(response_ids[:-1])
            for off in range(0, len(body), self.CHUNK):
                chunk = body[off:off + self.CHUNK]
                ctx.decode(chunk, len(prompt) + off)
                rows.extend(np.array(ctx.logits(i), dtype=np.float64) for i in range(len(chunk)))
            ctx.set_embeddings(False)
            # Keep only the prompt for the next call. Should a response decode fail half-way, its
            # cells lie past the cached prompt, and the next decode_from_prefix drops them.
            ctx.seq_rm(0, len(prompt), -1)
        logits = np.stack(rows)
        top = logits.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        logprobs: npt.NDArray[np.float64] = logits[np.arange(n), np.asarray(response_ids)] - lse
        return logprobs
