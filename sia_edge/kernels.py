"""Typed wrappers over the native kernels in :mod:`sia_edge._core`.

The kernels work in place on llama.cpp's buffers and never copy behind the caller's back: a
wrong dtype, a read-only buffer, unexpected strides or a length that does not match raise a
``TypeError`` or ``ValueError`` that names the problem. ``_reference.py`` holds the same
arithmetic in plain numpy, which is what the tests compare every ISA against.

NaN and infinity policy (tested): NaN or +inf anywhere in the logits raises
:class:`NonFiniteLogitsError` (a ``ValueError``); -inf entries are valid masked tokens with zero
probability, and logits that are all -inf raise the same error.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from sia_edge import _core

if TYPE_CHECKING:
    from sia_edge.value_format import CandidateHeadMeta

__all__ = [
    "JunctionStats",
    "NonFiniteLogitsError",
    "Rng",
    "TopK",
    "active_isa",
    "available_isas",
    "candidate_head",
    "force_isa",
    "junction_stats",
    "junction_step",
    "steer_topk_inplace",
    "value_head",
]

Rng = _core.Rng
MAX_TOP_K = 1024


# Both live in the extension: the per-token call checks and builds its result natively (a
# Python dataclass and check cost more than the kernel itself at a 49k vocabulary).
# NonFiniteLogitsError is a ValueError: the model produced NaN or +inf logits (or only -inf),
# and the step cannot be sampled. JunctionStats has topk_entropy (SIA's gate statistic, nats
# over softmax of the top-k logits), full_lse and full_entropy (over the whole vocabulary).
NonFiniteLogitsError = _core.NonFiniteLogitsError
JunctionStats = _core.JunctionStats


class TopK:
    """Reusable output buffers for the top-k candidates of one step (no allocation per token)."""

    __slots__ = ("ids", "k", "logits")

    def __init__(self, k: int) -> None:
        if not 1 <= k <= MAX_TOP_K:
            raise ValueError(f"k must be between 1 and {MAX_TOP_K}, got {k}")
        self.k = k
        self.ids = np.zeros(k, dtype=np.int32)
        self.logits = np.zeros(k, dtype=np.float32)


def available_isas() -> list[str]:
    """Instruction sets this build and CPU support, best last (always includes ``scalar``)."""
    return list(_core.available_isas())


def active_isa() -> str:
    return str(_core.active_isa())


def force_isa(name: str) -> None:
    """Use one implementation for every kernel from now on (tests and benchmarks)."""
    try:
        _core.force_isa(name)
    except ValueError as exc:  # std::invalid_argument arrives as ValueError
        raise ValueError(str(exc)) from None


def junction_stats(logits: npt.NDArray[np.float32], topk: TopK) -> JunctionStats:
    """Fill ``topk`` with the k largest logits (descending, ties by lower id) and return the stats."""
    return _core.junction_stats(logits, topk.k, topk.ids, topk.logits)


def junction_step(
    logits: npt.NDArray[np.float32],
    topk: TopK,
    *,
    threshold: float,
    gate_on_full_entropy: bool,
    temperature: float,
    rng: _core.Rng,
    top_p: float = 1.0,
    min_p: float = 0.0,
    probs_out: npt.NDArray[np.float64] | None = None,
) -> tuple[int, JunctionStats]:
    """Stats, then plain top-k sampling in the same native call when the gate statistic is below
    ``threshold`` (``top_p``, ``min_p``: see ``steer_topk_inplace``; the distribution it sampled
    from into ``probs_out``, if given). Returns (index into ``topk`` or -1 at a junction, stats)."""
    return _core.junction_step(logits, topk.k, gate_on_full_entropy, threshold, temperature, rng, topk.ids,
                               topk.logits, top_p, min_p, probs_out)


def steer_topk_inplace(
    logits: npt.NDArray[np.float32],
    topk: TopK,
    values: npt.NDArray[np.float32] | None,
    *,
    w: float,
    temperature: float,
    rng: _core.Rng,
    probs_out: npt.NDArray[np.float64] | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> int:
    """Shift the candidates' logits by ``w * values`` in ``logits`` and sample one of them from
    softmax(z' / temperature), truncated: ``min_p`` drops candidates less likely than ``min_p``
    times the likeliest, ``top_p`` keeps the smallest set of the likeliest whose mass reaches it.

    Returns the index of the chosen candidate in ``topk`` (its token is ``topk.ids[i]``).
    ``values=None`` samples plainly from the top-k and leaves ``logits`` untouched. ``probs_out``
    (k float64) receives the distribution sampled from.
    """
    if not math.isfinite(w):
        raise ValueError(f"w must be finite, got {w}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if values is not None and not np.all(np.isfinite(values)):
        raise ValueError("values contain NaN or infinity: the value model's output is broken")
    if not (0.0 <= top_p <= 1.0 and 0.0 <= min_p <= 1.0):
        raise ValueError(f"top_p and min_p must be in [0, 1], got {top_p} and {min_p}")
    return int(_core.steer_topk_inplace(logits, topk.ids, topk.logits, values, w, temperature, rng, probs_out,
                                        top_p, min_p))


def value_head(
    hidden: npt.NDArray[np.float32], weight: npt.NDArray[np.float32], bias: float,
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """``hidden @ weight + bias`` for n rows of width d (rows contiguous, any row stride)."""
    if out is None:
        out = np.empty(hidden.shape[0], dtype=np.float32)
    _core.value_head(hidden, weight, float(bias), out)
    return out


def candidate_head(
    hidden: npt.NDArray[np.float32], head: CandidateHeadMeta, candidates: npt.NDArray[np.int32],
    weight: npt.NDArray[np.float32], bias: float, out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """Q(s, c) for each candidate id from the prefix's hidden state (width d): the scalar head
    ``weight``/``bias`` on it plus the candidate head's term (sia_edge/value_format.py).
    A non-finite hidden state or an id outside the head's vocabulary raises ``ValueError``."""
    if out is None:
        out = np.empty(len(candidates), dtype=np.float32)
    _core.candidate_head(hidden, weight, float(bias), head.proj, head.proj_bias, head.table, head.token_bias,
                         candidates, out)
    return out
