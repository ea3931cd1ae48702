#!/usr/bin/env python3
"""Per-token junction kernel against the best plain numpy and the memory floor.

    python tools/bench_kernels.py --json

Checks first that the native kernel and numpy agree on every vocabulary size, then times each
(median over --reps repetitions on the same warm buffer) and prints one JSON object:
{"isa": ..., "results": [{"vocab", "k", "numpy_ms", "core_ms", "floor_ms", "speedup", ...}]}.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from collections.abc import Callable

import numpy as np

from sia_edge import kernels as K


class NumpyJunction:
    """The fastest plain-numpy way we know to get top-k, top-k entropy and log-sum-exp:
    argpartition (no full sort), float32 exp into a preallocated scratch buffer."""

    def __init__(self, n: int, k: int) -> None:
        self.k = k
        self.scratch = np.empty(n, dtype=np.float32)

    def __call__(self, z: np.ndarray) -> tuple[np.ndarray, float, float]:
        k = self.k
        part = np.argpartition(z, -k)[-k:]
        top = z[part]
        order = np.lexsort((part, -top))
        ids, top = part[order], top[order].astype(np.float64)
        m = float(z.max())
        np.subtract(z, np.float32(m), out=self.scratch)
        np.exp(self.scratch, out=self.scratch)
        lse = m + float(np.log(np.add.reduce(self.scratch, dtype=np.float64)))
        d = top - top[0]
        e = np.exp(d)
        s = e.sum()
        h = float(np.log(s) - (e * d).sum() / s)
        return ids, h, lse


def median_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(min(20, reps)):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def step_share(path: str, k: int, n_tokens: int, threads: int | None) -> dict[str, object] | None:
    """Decode ``n_tokens`` greedily on a real model and time, at every step and on that step's
    own logits buffer, one llama.cpp decode, the native gate call and the numpy equivalent.
    Reports medians and the gate's share of a step (the issue's "under 1% of a step")."""
    from pathlib import Path

    from sia_edge.llama_backend import LlamaContext, LlamaModel

    model = LlamaModel(path, what="model")
    ctx = LlamaContext(model, n_ctx=n_tokens + 64, n_threads=threads)
    try:
        ids = model.tokenize("The history of the printing press begins")
        ctx.decode(ids, 0)
        topk = K.TopK(k)
        numpy_fn = NumpyJunction(model.n_vocab, k)
        decode_ms, core_ms, numpy_ms = [], [], []
        pos = len(ids)
        for _ in range(n_tokens):
            z = ctx.logits()
            t0 = time.perf_counter()
            K.junction_stats(z, topk)
            t1 = time.perf_counter()
            np_ids, _, _ = numpy_fn(z)
            t2 = time.perf_counter()
            if not np.array_equal(np_ids, topk.ids):
                print(f"MISMATCH on {Path(path).name}: core and numpy top-k disagree", file=sys.stderr)
                return None
            core_ms.append((t1 - t0) * 1e3)
            numpy_ms.append((t2 - t1) * 1e3)
            t0 = time.perf_counter()
            ctx.decode([int(topk.ids[0])], pos)
            decode_ms.append((time.perf_counter() - t0) * 1e3)
            pos += 1
    finally:
        ctx.close()
    step, core, nump = (float(np.median(x)) for x in (decode_ms, core_ms, numpy_ms))
    return {"model": Path(path).name, "vocab": model.n_vocab, "tokens": n_tokens,
            "decode_ms": round(step, 3), "core_ms": round(core, 4), "numpy_ms": round(nump, 4),
            "core_share_of_step": round(core / step, 5), "numpy_share_of_step": round(nump / step, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 262144])
    ap.add_argument("--isa", choices=K.available_isas(), help="force one instruction set")
    ap.add_argument("--step-models", nargs="*", default=None, metavar="GGUF",
                    help="also measure the gate's share of a real decode step on these models "
                         "(default: the default base model; pass none to skip)")
    ap.add_argument("--step-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads for --step-models")
    args = ap.parse_args()
    if args.isa:
        K.force_isa(args.isa)

    results = []
    for n in args.vocab:
        # Logits shaped like a language model's: a few large, a long normal tail.
        z = (np.random.default_rng(n).standard_normal(n) * 2.5).astype(np.float32)
        z[np.random.default_rng(1).choice(n, 20, replace=False)] += 8.0
        topk = K.TopK(args.k)
        numpy_fn = NumpyJunction(n, args.k)

        stats = K.junction_stats(z, topk)
        ids, h, lse = numpy_fn(z)
        if not (np.array_equal(ids, topk.ids) and abs(h - stats.topk_entropy) < 1e-6
                and abs(lse - stats.full_lse) < 1e-4):
            print(f"MISMATCH at vocab {n}: core and numpy disagree", file=sys.stderr)
            return 1

        core_ms = median_ms(functools.partial(K.junction_stats, z, topk), args.reps)
        numpy_ms = median_ms(functools.partial(numpy_fn, z), args.reps)
        floor_ms = median_ms(functools.partial(np.add.reduce, z), args.reps)
        results.append({
            "vocab": n, "k": args.k,
            "numpy_ms": round(numpy_ms, 4), "core_ms": round(core_ms, 4), "floor_ms": round(floor_ms, 4),
            "speedup_vs_numpy": round(numpy_ms / core_ms, 1), "core_over_floor": round(core_ms / floor_ms, 2),
        })

    step_models = args.step_models
    if step_models is None:
        from sia_edge.models import default_base_model

        step_models = [str(default_base_model())]
    steps = []
    for path in step_models:
        row = step_share(path, args.k, args.step_tokens, args.threads)
        if row is None:
            return 1
        steps.append(row)

    report = {"isa": K.active_isa(), "machine": f"{platform.machine()} {platform.processor()}".strip(),
              "reps": args.reps, "results": results, "steps": steps}
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
