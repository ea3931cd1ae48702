#!/usr/bin/env python3
"""What one junction costs against one base decode step, and what that allows.

    python tools/bench_junction_cost.py --json

Times, on the same machine in one run (medians over --reps):
  base_step_ms   one single-token decode of the base model with its logits (what `plain` pays)
  catchup_ms     the value model's catch-up: a batch of n tokens with no output rows, for the
                 batch sizes a gate at each --ratios produces (about 1 / ratio tokens)
  branch_ms      the k one-token branches in one batch with hidden states (embeddings on: the whole
                 graph computes the vocabulary head on these rows too)
  candidate_row_ms  a candidate-head junction: one token decoded with its hidden state out (the
                 vocabulary head once); against catchup_ms["1"], the same token with no output, it
                 shows what that head costs at each depth
  hidden_only    the same two on the graph ended at the hidden state (what the value model's
                 context runs: no vocabulary head)
  junction_ms    a whole junction after catch-ups of 0-8 tokens: two decodes or one (fused), on
                 the whole graph and hidden only
for every value model given (default: the base backbone with a random head, as the issue's decode
benchmark uses, re-quantised to each --quant type, plus the default trained value model if
installed). From these it predicts, per intervention ratio r,
  sparse / plain = (B + catchup(1/r) * r + r * branch) / B      dense / plain = (B + branch) / B
(dense commits the sampled branch, so it never catches up), and says whether the issue's goals
"sparse <= 1.5x plain at 15-30%" and "dense >= 2.5x sparse" can hold together for that model.
tools/bench_decode.py measures the real modes; this one explains them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np
import numpy.typing as npt

from sia_edge.llama_backend import LlamaContext, LlamaModel
from sia_edge.models import ModelNotFoundError, default_base_model, default_value_model
from sia_edge.value_format import random_head_value_gguf

FUSED_CATCHUPS = (0, 1, 2, 4, 8)  # catch-up lengths the fused decode is timed at
QUANT_TYPES = {
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
}


def requantise(src: Path, dst: Path, ftype: int) -> Path:
    """The same weights in another llama.cpp type (from an already quantised file: fine for timing,
    not for quality, which is why the export pipeline quantises from f16 instead)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantise {src.name} to {dst.name}")
    return dst


def median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1e3, 3)


def time_base_step(path: Path, prefix: list[int], reps: int, threads: int | None) -> float:
    ctx = LlamaContext(LlamaModel(path, what="base model"), n_ctx=len(prefix) + 16, n_threads=threads)
    try:
        ctx.decode(prefix, 0)
        times = []
        for _ in range(reps):
            ctx.seq_rm(0, len(prefix), -1)
            t0 = time.perf_counter()
            ctx.decode([prefix[-1]], len(prefix))
            ctx.logits()
            times.append(time.perf_counter() - t0)
        return median_ms(times)
    finally:
        ctx.close()


def time_value(path: Path, prefix: list[int], k: int, batch_sizes: list[int], reps: int,
               threads: int | None) -> dict[str, object]:
    model = LlamaModel(path, what="value model")
    n_ctx = len(prefix) + max(batch_sizes) + k + 8

    def context(hidden_only: bool) -> LlamaContext:
        ctx = LlamaContext(model, n_ctx=n_ctx, n_seq_max=k + 1, n_batch=512, n_threads=threads,
                           hidden_only=hidden_only)
        ctx.decode(prefix, 0, output_last=False)
        return ctx

    whole, short = context(False), context(True)
    try:
        if not short.graph_stop_active:
            raise RuntimeError(f"{path.name}: llama.cpp's graph cannot be ended at the hidden state for this model "
                               "(the check at load failed); there is nothing to compare")
        p = len(prefix)
        # Correctness first: the k branches are k different continuations of the cached prefix,
        # and the graph ended at the hidden state gives the whole graph's hidden states.
        branch_hidden = []
        for ctx in (whole, short):
            for j in range(k):
                ctx.seq_cp(0, j + 1)
            ctx.set_embeddings(True)
            ctx.decode(prefix[:k], p, seq_ids=list(range(1, k + 1)))
            branch_hidden.append(ctx.hidden_states(k).copy())
            for j in range(k):
                ctx.seq_rm(j + 1)
        hidden = branch_hidden[0]
        if not np.isfinite(hidden).all() or len({row.tobytes() for row in hidden}) != len(set(prefix[:k])):
            raise RuntimeError(f"{path.name}: branch hidden states are not finite or not one per candidate")
        if not np.array_equal(hidden, branch_hidden[1]):
            raise RuntimeError(f"{path.name}: the hidden-only graph changed the branch hidden states")
        sizes = sorted({1, *batch_sizes})
        catchup: dict[int, list[float]] = {n: [] for n in sizes}
        branch: dict[str, list[float]] = {"whole": [], "hidden_only": []}
        row: dict[str, list[float]] = {"whole": [], "hidden_only": []}
        for _ in range(reps):
            for n in sizes:
                whole.set_embeddings(False)
                t0 = time.perf_counter()
                whole.decode(prefix[:n], p, output_last=False)
                catchup[n].append(time.perf_counter() - t0)
                whole.seq_rm(0, p, -1)
            for name, ctx in (("whole", whole), ("hidden_only", short)):
                for j in range(k):
                    ctx.seq_cp(0, j + 1)
                ctx.set_embeddings(True)
                t0 = time.perf_counter()
                ctx.decode(prefix[:k], p, seq_ids=list(range(1, k + 1)))
                ctx.hidden_states(k)
                branch[name].append(time.perf_counter() - t0)
                for j in range(k):
                    ctx.seq_rm(j + 1)
                t0 = time.perf_counter()
                ctx.decode(prefix[:1], p)  # embeddings on: its one row is an output
                ctx.hidden_states(1)
                row[name].append(time.perf_counter() - t0)
                ctx.seq_rm(0, p, -1)
        junction = time_fused(whole, short, prefix, k, reps)
        return {"layers": int(llama_cpp.llama_model_n_layer(model.ptr)),
                "catchup_ms": {str(n): median_ms(t) for n, t in catchup.items()},
                "branch_ms": median_ms(branch["whole"]), "candidate_row_ms": median_ms(row["whole"]),
                "hidden_only": {"branch_ms": median_ms(branch["hidden_only"]),
                                "candidate_row_ms": median_ms(row["hidden_only"]),
                                "branch_saving": round(1 - median_ms(branch["hidden_only"])
                                                       / median_ms(branch["whole"]), 3)},
                "junction_ms": junction}
    finally:
        whole.close()
        short.close()


def time_fused(whole: LlamaContext, short: LlamaContext, prefix: list[int], k: int,
               reps: int) -> dict[str, dict[str, float]]:
    """A whole scalar-head junction after a catch-up of n tokens: the catch-up batch then the
    branch batch (`separate`), against one batch holding both (`fused`, what ValueScorer does for
    n <= FUSE_MAX_CATCHUP), each on the whole graph and on the graph ended at the hidden state
    (`hidden_only`, the value model's context). `fused_saving` and `fused_saving_hidden_only`
    compare one decode with two on each graph; `saving` compares what ValueScorer runs (fused,
    hidden only) with two decodes of the whole graph (the junction before either change). Checks first that all four give the same branch hidden states."""
    p = len(prefix) - max(FUSED_CATCHUPS) - 1
    cands = prefix[:k]

    def separate(ctx: LlamaContext, n: int) -> npt.NDArray[np.float32]:
        ctx.set_embeddings(False)
        ctx.decode(prefix[p:p + n], p, output_last=False)
        for j in range(k):
            ctx.seq_cp(0, j + 1)
        ctx.set_embeddings(True)
        ctx.decode(cands, p + n, seq_ids=list(range(1, k + 1)))
        return ctx.hidden_states(k)

    def fused(ctx: LlamaContext, n: int) -> npt.NDArray[np.float32]:
        for j in range(k):
            ctx.seq_cp(0, j + 1)
        ctx.set_embeddings(True)
        every = list(range(k + 1))
        ctx.decode_rows(prefix[p:p + n] + cands, [*range(p, p + n)] + [p + n] * k,
                        [every] * n + [[j + 1] for j in range(k)])
        return ctx.hidden_states(n + k)[n:]

    def undo(ctx: LlamaContext) -> None:
        for j in range(k + 1):
            ctx.seq_rm(j, p, -1)
        for j in range(k):
            ctx.seq_rm(j + 1)

    variants = {"separate": (separate, whole), "fused": (fused, whole),
                "separate_hidden_only": (separate, short), "fused_hidden_only": (fused, short)}
    for ctx in (whole, short):
        ctx.seq_rm(0, p, -1)
    for n in FUSED_CATCHUPS:
        got = {}
        for name, (fn, ctx) in variants.items():
            got[name] = fn(ctx, n).copy()
            undo(ctx)
        for name, h in got.items():
            if not np.allclose(got["separate"], h, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"{name} and separate junctions disagree after a catch-up of {n}: "
                                   f"max |dh| {float(np.abs(got['separate'] - h).max())}")
    out: dict[str, dict[str, float]] = {}
    for n in FUSED_CATCHUPS:
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(reps):
            for name, (fn, ctx) in variants.items():
                t0 = time.perf_counter()
                fn(ctx, n)
                times[name].append(time.perf_counter() - t0)
                undo(ctx)
        ms = {name: median_ms(t) for name, t in times.items()}
        out[str(n)] = {**ms, "fused_saving": round(1 - ms["fused"] / ms["separate"], 3),
                       "fused_saving_hidden_only": round(1 - ms["fused_hidden_only"] / ms["separate_hidden_only"], 3),
                       "saving": round(1 - ms["fused_hidden_only"] / ms["separate"], 3)}
    return out


def predict(base_ms: float, value: dict[str, object], ratios: list[float]) -> dict[str, object]:
    branch = float(value["branch_ms"])  # type: ignore[arg-type]
    catchup = value["catchup_ms"]
    assert isinstance(catchup, dict)
    dense = (base_ms + branch) / base_ms
    rows = {}
    for r in ratios:
        n = max(1, round(1 / r))
        sparse = (base_ms + r * (float(catchup[str(n)]) + branch)) / base_ms
        rows[str(r)] = {"sparse_x_plain": round(sparse, 3), "dense_x_sparse": round(dense / sparse, 3),
                        "both_goals": sparse <= 1.5 and dense / sparse >= 2.5}
    return {"dense_x_plain": round(dense, 3), "by_ratio": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    ap.add_argument("--model", type=Path, default=None, help="base GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--value-models", type=Path, nargs="*", default=None,
                    help="value GGUFs (default: the base backbone with a random head, as is and re-quantised "
                         "to each --quant type, and the default value model if installed)")
    ap.add_argument("--quant", default="q4_0,q8_0", help="re-quantisations of the random-head backbone")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--ratios", default="0.15,0.2,0.3", help="intervention ratios to predict")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    if not all(0 < r <= 1 for r in ratios):
        ap.error("--ratios must lie in (0, 1]")
    quants = [q for q in args.quant.split(",") if q]
    unknown = [q for q in quants if q not in QUANT_TYPES]
    if unknown:
        ap.error(f"unknown --quant {unknown}; choose from {sorted(QUANT_TYPES)}")
    batch_sizes = sorted({max(1, round(1 / r)) for r in ratios})

    base = args.model or default_base_model()
    base_model = LlamaModel(base, what="base model")
    prefix = base_model.tokenize("The history of the printing press begins in the fifteenth century, when " * 6)
    prefix = prefix[:120]
    with tempfile.TemporaryDirectory() as tmp:
        values: list[tuple[str, Path]] = []
        if args.value_models is None:
            fixture = random_head_value_gguf(base, Path(tmp) / "value-random-head.gguf")
            values.append((f"random head, {base.name} as is", fixture))
            for q in quants:
                values.append((f"random head, {q}",
                               requantise(fixture, Path(tmp) / f"value-random-head-{q}.gguf", QUANT_TYPES[q])))
            with contextlib.suppress(ModelNotFoundError):  # not built here: nothing to compare
                values.append(("default value model", default_value_model()))
        else:
            values = [(p.name, p) for p in args.value_models]
        base_ms = time_base_step(base, prefix, args.reps * 4, args.threads)
        rows = []
        for name, path in values:
            v = time_value(path, prefix, args.k, batch_sizes, args.reps, args.threads)
            rows.append({"value_model": name, "file_mb": round(path.stat().st_size / 2**20, 1), **v,
                         "branch_x_base_step": round(float(v["branch_ms"]) / base_ms, 2),  # type: ignore[arg-type]
                         **predict(base_ms, v, ratios)})
    report = {"model": base.name, "machine": platform.machine(), "k": args.k, "base_step_ms": base_ms,
              "value_models": rows}
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
