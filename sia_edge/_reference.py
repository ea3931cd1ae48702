"""The kernels' arithmetic in plain numpy: short, readable and slow.

This is what ``sia_edge._core`` computes (see csrc/kernels/sia_kernels.h for the precision
policy); the tests compare every instruction set with it, and the benchmark times it as the
"best plain numpy" baseline.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def topk_sorted(logits: npt.NDArray[np.float32], k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Top-k ids and logits, logit descending, ties broken by the lower id (NaN excluded)."""
    z = np.where(np.isnan(logits), -np.inf, logits)
    part = np.argpartition(-z, k - 1)[:k]
    # The partition may cut a run of equal values arbitrarily: take every id tied with the k-th.
    kth = z[part].min()
    cand = np.concatenate([np.flatnonzero(z > kth), np.flatnonzero(z == kth)])
    order = np.lexsort((cand, -z[cand]))
    ids = cand[order][:k]
    return ids, logits[ids]


def entropy_from_logits(z: npt.NDArray[np.floating]) -> float:
    """Entropy in nats of softmax(z), computed in float64; -inf entries have zero probability."""
    z64 = np.asarray(z, dtype=np.float64)
    m = z64.max()
    d = z64 - m
    e = np.exp(d)
    s = e.sum()
    finite = np.isfinite(d)
    return float(np.log(s) - (e[finite] * d[finite]).sum() / s)


def log_sum_exp(z: npt.NDArray[np.floating]) -> float:
    z64 = np.asarray(z, dtype=np.float64)
    m = z64.max()
    return float(m + np.log(np.exp(z64 - m).sum()))


def junction_stats(logits: npt.NDArray[np.float32], k: int) -> dict[str, object]:
    ids, top = topk_sorted(logits, k)
    return {
        "top_ids": ids,
        "top_logits": top,
        "topk_entropy": entropy_from_logits(top),
        "full_lse": log_sum_exp(logits),
        "full_entropy": entropy_from_logits(logits),
    }


def steer_probs(top_logits: npt.NDArray[np.float32], values: npt.NDArray[np.float32] | None,
                w: float, temperature: float, top_p: float = 1.0, min_p: float = 0.0) -> npt.NDArray[np.float64]:
    """The sampling distribution over the k candidates after steering: softmax((z + w V) / T),
    without the candidates below min_p times the likeliest, then only the likeliest whose mass
    reaches top_p (ties: lower index first)."""
    z = top_logits.astype(np.float64)
    if values is not None:
        z = z + w * values.astype(np.float64)
    if temperature == 0:
        p = np.zeros_like(z)
        p[int(np.argmax(z))] = 1.0
        return p
    e: npt.NDArray[np.float64] = np.exp((z - z.max()) / temperature)
    e[e < min_p] = 0.0
    if top_p < 1.0:
        order = np.argsort(-e, kind="stable")
        mass = np.cumsum(e[order])
        kept = int(np.searchsorted(mass, top_p * e.sum(), side="left")) + 1  # the first that reaches it
        e[order[kept:]] = 0.0
    p_out: npt.NDArray[np.float64] = e / e.sum()
    return p_out


def value_head(hidden: npt.NDArray[np.float32], weight: npt.NDArray[np.float32], bias: float) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = hidden.astype(np.float64) @ weight.astype(np.float64) + bias
    return out


def candidate_head(hidden: npt.NDArray[np.float32], weight: npt.NDArray[np.float32], bias: float,
                   proj: npt.NDArray[np.float32], proj_bias: npt.NDArray[np.float32], table: npt.NDArray[np.float32],
                   token_bias: npt.NDArray[np.float32], candidates: npt.NDArray[np.int32]) -> npt.NDArray[np.float64]:
    """Q(s, c) = bias + weight . h + token_bias[c] + table[c] . (proj h + proj_bias), in float64."""
    h = np.asarray(hidden, dtype=np.float64)
    g = np.asarray(proj, dtype=np.float64) @ h + proj_bias
    state = float(np.asarray(weight, dtype=np.float64) @ h) + bias
    c = np.asarray(candidates)
    return state + np.asarray(token_bias, dtype=np.float64)[c] + np.asarray(table, dtype=np.float64)[c] @ g
