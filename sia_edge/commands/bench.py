"""Decode cost of every steering mode, side by side in one run, on SmolLM2-135M-Instruct.

    sia-edge bench --json

Modes (per prompt, all modes run back to back so machine noise hits them alike):
  plain   llama.cpp's own sampler chain (top-k 10, temperature 1, dist) on the same context
          type: the floor, no steering.
  naive   SIA written the obvious way, like the authors' code: a numpy logits processor on
          llama-cpp-python's Llama.create_completion that scores each junction's k candidates by
          re-running the value model on every candidate's full sequence (no KV cache). Run in
          dense mode; its cost grows with length, so it is timed on --naive-prompts prompts x
          --naive-tokens tokens, which understates it against 128-token runs.
  off / sparse (tau) / dense   this engine.
  sparse_ratio   the entropy gate at the tau that --target-ratio calibrates (0: left out).
  head           --head N: only the first N tokens of each answer steered (the official code's
                 first-N gate; tau above ln k, so the entropy gate never fires), left out at 0.
  horizon        --horizon N: the entropy gate at --horizon-tau within the first N tokens of each
                 answer only (SteeringConfig.horizon), left out at 0.
  candidate      the horizon mode (else sparse_ratio, else sparse) scoring with the value model's
                 candidate head (one value-model row per junction, no branch rows), and
  dense_candidate  dense steering with it; both only when the value GGUF carries one.
  shift_candidate  --shift-tau X: the value-aware gate (mode shift: steer where steering would
                 move >= X of the probability) with the candidate head, which scores every token
                 (left out at 0).
  candidate:NAME / dense_candidate:NAME / shift_candidate:NAME   the same with the value model
                 NAME of --also-value-model (a shallower one, say), in the same run.
  MODE:whole_graph   --whole-graph: each scalar-head mode again with the value model running
                 llama.cpp's whole graph, vocabulary head included (what the value model's context
                 skipped before it ended at the hidden state), in the same run.
Prompts: --prompt-file FILE (one per line, or JSONL with a "prompt" field) instead of the 8 built-in
open-ended ones, to time the prompts an evaluation is about (its first --prompts of them).
Value model: --value-model, or the base backbone with random heads (same cost as trained ones).
ms_per_token excludes the prompt's prefill; figures are medians over prompts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from sia_edge import kernels
from sia_edge.engine import SteeringEngine
from sia_edge.llama_backend import LlamaContext
from sia_edge.models import default_base_model
from sia_edge.prompts import Prompt, read_prompt_file
from sia_edge.steering import SteeringConfig
from sia_edge.value_format import random_head_value_gguf

PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a car engine works.",
    "Describe the history of the Roman Empire.",
    "Write a detailed guide to planting a vegetable garden.",
    "Tell me everything you know about the ocean.",
    "Write a letter to a friend describing your summer holiday.",
    "Explain how computers store and process information.",
    "Describe a day in the life of a medieval blacksmith.",
]


def plain_run(engine: SteeringEngine, prompt_ids: list[int], n: int, k: int, seed: int) -> tuple[float, int]:
    """llama.cpp's sampler chain on our context: per-token ms after prefill, tokens."""
    import llama_cpp

    ctx = LlamaContext(engine.base, n_ctx=engine.n_ctx, n_threads=engine.n_threads)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for s in (llama_cpp.llama_sampler_init_top_k(k), llama_cpp.llama_sampler_init_temp(1.0),
              llama_cpp.llama_sampler_init_dist(seed)):
        llama_cpp.llama_sampler_chain_add(chain, s)
    try:
        ctx.decode(prompt_ids, 0)
        pos, count = len(prompt_ids), 0
        t0 = time.perf_counter()
        while count < n:
            tok = llama_cpp.llama_sampler_sample(chain, ctx.ptr, -1)
            if engine.base.is_eog(tok):
                break
            ctx.decode([tok], pos)
            pos += 1
            count += 1
        return (time.perf_counter() - t0) * 1e3 / max(count, 1), count
    finally:
        llama_cpp.llama_sampler_free(chain)
        ctx.close()


class NaiveSIAProcessor:
    """The obvious numpy implementation: no cache, every candidate's full sequence re-run."""

    def __init__(self, value_path: Path, k: int, tau: float, w: float, n_ctx: int) -> None:
        import llama_cpp
        from llama_cpp import Llama

        from sia_edge.value_format import read_value_meta

        meta = read_value_meta(value_path)
        self.w_head, self.b_head = meta.weight.astype(np.float64), float(meta.bias)
        self.value = Llama(str(value_path), n_ctx=n_ctx, n_batch=n_ctx, embedding=True, verbose=False,
                           n_threads=2)
        self.llama_cpp = llama_cpp
        self.k, self.tau, self.w = k, tau, w
        self.junctions = 0

    def hidden_last(self, tokens: list[int]) -> np.ndarray:
        self.value.reset()  # n_tokens = 0: eval() then drops every cached cell and starts over
        self.value.eval(tokens)
        ptr = self.llama_cpp.llama_get_embeddings_ith(self.value.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.value.n_embd(),)).astype(np.float64)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        z = np.array(scores, dtype=np.float64)
        top = np.argpartition(z, -self.k)[-self.k:]
        zt = z[top]
        p = np.exp(zt - zt.max())
        p /= p.sum()
        entropy = float(-(p * np.log(p + 1e-30)).sum())
        if entropy < self.tau:
            return scores
        self.junctions += 1
        prefix = input_ids.tolist()
        values = np.array([self.hidden_last([*prefix, int(c)]) @ self.w_head + self.b_head for c in top])
        out = np.full_like(scores, -np.inf)
        out[top] = zt + self.w * values
        return out


def naive_run(llm: Any, proc: NaiveSIAProcessor, prompt_ids: list[int], n: int, seed: int) -> tuple[float, int]:
    from llama_cpp import LogitsProcessorList

    llm.reset()
    stream = llm.create_completion(prompt_ids, max_tokens=n, stream=True, seed=seed, top_k=proc.k, top_p=1.0,
                                   min_p=0.0, typical_p=1.0, temperature=1.0, repeat_penalty=1.0,
                                   logits_processor=LogitsProcessorList([proc]))
    t_first, count = None, 0
    for _ in stream:
        count += 1
        if t_first is None:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    if count < 2 or t_first is None:
        return float("nan"), count
    return (t_end - t_first) * 1e3 / (count - 1), count


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sia-edge bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--value-model", type=Path, default=None)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--target-ratio", type=float, default=0.2,
                    help="also run mode sparse_ratio: tau calibrated for this fraction of junctions (0: skip)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--w", type=float, default=1.0, help="steering strength of every steered mode (default: 1)")
    ap.add_argument("--naive-prompts", type=int, default=2)
    ap.add_argument("--naive-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--head", type=int, default=0, help="add a mode that steers only the first N tokens")
    ap.add_argument("--horizon", type=int, default=0,
                    help="add a mode: the entropy gate at --horizon-tau within the first N tokens only")
    ap.add_argument("--horizon-tau", type=float, default=1.0)
    ap.add_argument("--shift-tau", type=float, default=0.0,
                    help="also time mode shift at this tau with the candidate head (0: skip)")
    ap.add_argument("--prompt-file", type=Path, default=None, help="time these prompts instead of the built-in ones")
    ap.add_argument("--also-value-model", type=Path, action="append", default=[], metavar="GGUF",
                    help="time this value model's candidate head too, in the same run (modes candidate:NAME and "
                         "dense_candidate:NAME, NAME its file name); repeatable")
    ap.add_argument("--whole-graph", action="store_true",
                    help="also time each scalar-head mode with the value model's whole graph (modes MODE:whole_graph)")
    args = ap.parse_args(argv)
    try:
        items = read_prompt_file(args.prompt_file) if args.prompt_file else [Prompt(p) for p in PROMPTS]
        if not items:
            raise ValueError(f"{args.prompt_file} holds no prompt")
        if args.horizon < 0 or args.head < 0:
            raise ValueError("--head and --horizon take a number of tokens (0: leave the mode out)")
        if args.horizon > 0:
            SteeringConfig(tau=args.horizon_tau, k=args.k, horizon=args.horizon)  # checked before any model loads
        if not 0 <= args.shift_tau <= 1:
            raise ValueError(f"--shift-tau takes a share of probability in (0, 1] (0: leave the mode out), "
                             f"got {args.shift_tau}")
        # checked before any model loads, with --w
        shift_mode = SteeringConfig(gate="shift", tau=args.shift_tau, k=args.k, w=args.w, value_head="candidate")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    base = args.model or default_base_model()
    with tempfile.TemporaryDirectory() as tmp:
        value = args.value_model or random_head_value_gguf(base, Path(tmp) / "value-random-head.gguf",
                                                              candidate_rank=32)
        engine = SteeringEngine(base, value, n_ctx=1024, n_threads=args.threads)
        if engine.value is not None and "scalar" not in engine.value.heads:
            print(f"bench_decode: {Path(value).name} has no scalar head to time the sparse and dense modes with; pass "
                  "a value model with layers as --value-model and this one as --also-value-model", file=sys.stderr)
            return 2
        # Chat turns for a chat model, the text itself for a base model without a template.
        prompts: list[str | list[dict[str, str]]] = [p.messages() if engine.base.chat_template else p.prompt
                                                     for p in items]
        modes = {
            "off": SteeringConfig(gate="off", k=args.k),
            "sparse": SteeringConfig(gate="entropy", tau=args.tau, k=args.k, w=args.w),
            "dense": SteeringConfig(gate="dense", k=args.k, w=args.w),
        }
        if args.target_ratio > 0:
            modes["sparse_ratio"] = SteeringConfig(gate="entropy", k=args.k, w=args.w, target_ratio=args.target_ratio)
        if args.head > 0:  # tau 10 > ln k for any k the kernels take: only the head's steps steer
            modes["head"] = SteeringConfig(gate="entropy", tau=10.0, k=args.k, w=args.w, head=args.head)
        if args.horizon > 0:
            modes["horizon"] = SteeringConfig(gate="entropy", tau=args.horizon_tau, k=args.k, w=args.w,
                                              horizon=args.horizon)
        if engine.value is not None and engine.value.candidate is not None:
            # the candidate head at the horizon gate if one is timed, else at the target ratio's or the
            # sparse one, and dense
            gate_mode = _candidate_gate(modes)
            modes["candidate"] = replace(gate_mode, value_head="candidate")
            modes["dense_candidate"] = replace(modes["dense"], value_head="candidate")
            if args.shift_tau > 0:
                modes["shift_candidate"] = shift_mode
        if args.shift_tau > 0 and not args.also_value_model and "shift_candidate" not in modes:
            print(f"bench_decode: --shift-tau times the shift gate with a candidate head, and {Path(value).name} has "
                  "none; pass a value model with one (--value-model or --also-value-model)", file=sys.stderr)
            return 2
        # other value models over the same base, timed prompt by prompt beside the first one
        others: dict[str, tuple[SteeringEngine, SteeringConfig]] = {}
        for path in args.also_value_model:
            try:
                other = SteeringEngine(base, path, n_ctx=1024, n_threads=args.threads)
            except (OSError, ValueError) as exc:
                print(f"bench_decode: --also-value-model {path}: {exc}", file=sys.stderr)
                return 2
            if other.value is None or other.value.candidate is None:
                print(f"bench_decode: --also-value-model {path} has no candidate head", file=sys.stderr)
                return 2
            gate_mode = _candidate_gate(modes)
            others[f"candidate:{path.name}"] = (other, replace(gate_mode, value_head="candidate"))
            others[f"dense_candidate:{path.name}"] = (other, replace(modes["dense"], value_head="candidate"))
            if args.shift_tau > 0:
                others[f"shift_candidate:{path.name}"] = (other, shift_mode)
        if args.whole_graph and engine.value is not None:
            whole = SteeringEngine(base, value, n_ctx=1024, n_threads=args.threads)
            assert whole.value is not None
            whole.value.hidden_only = False
            for name in SCALAR_MODES:
                if name in modes:
                    others[f"{name}:whole_graph"] = (whole, modes[name])
        rows: dict[str, list[dict[str, float]]] = {m: [] for m in ["plain", "naive", *modes, *others]}
        naive_llm = naive_proc = None
        if args.naive_prompts > 0:
            from llama_cpp import Llama

            naive_llm = Llama(str(base), n_ctx=1024, n_threads=engine.n_threads, verbose=False)
            naive_proc = NaiveSIAProcessor(Path(value), args.k, 0.0, 1.0, 1024)
        # Correctness first: the engine's off mode is plain top-k sampling (tested token for token
        # in tests/test_engine.py); here check that dense steering changes nothing it must not.
        msgs = prompts[0]
        a = engine.complete(msgs, max_tokens=16, config=modes["dense"], seed=0)
        b = engine.complete(msgs, max_tokens=16, config=modes["dense"], seed=0)
        if a[0] != b[0] or a[1].junctions != a[1].steps:  # dense steers every decision, EOS included
            print("engine is not deterministic or dense did not steer every token", file=sys.stderr)
            return 1

        too_long = [i for i, m in enumerate(prompts[: args.prompts])
                    if len(engine.encode_prompt(m)) + args.tokens > engine.n_ctx]
        if too_long:
            print(f"bench_decode: prompt {too_long[0] + 1} and {args.tokens} new tokens do not fit the {engine.n_ctx}-token "
                  "context; use shorter prompts or fewer --tokens", file=sys.stderr)
            return 2
        for i, msgs in enumerate(prompts[: args.prompts]):
            ids = engine.encode_prompt(msgs)
            ms, n = plain_run(engine, ids, args.tokens, args.k, seed=i)
            rows["plain"].append({"ms_per_token": ms, "tokens": n})
            jobs = [(name, engine, cfg) for name, cfg in modes.items()]
            jobs += [(name, eng, cfg) for name, (eng, cfg) in others.items()]
            for name, eng, cfg in jobs:
                gen = eng.generate(msgs, max_tokens=args.tokens, config=cfg, seed=i)
                with gen:
                    for _ in gen:
                        pass
                st = gen.stats
                rows[name].append({"ms_per_token": st.ms_per_token, "tokens": st.tokens,
                                   "intervention_rate": st.intervention_rate,
                                   "value_tokens_per_token": st.value_tokens / max(st.tokens, 1),
                                   "kernel_ms_per_token": st.kernel_ms / max(st.tokens, 1)})
            if naive_llm is not None and naive_proc is not None and i < args.naive_prompts:
                ms, n = naive_run(naive_llm, naive_proc, ids, args.naive_tokens, seed=i)
                rows["naive"].append({"ms_per_token": ms, "tokens": n})

    def med(name: str, key: str) -> float:
        vals = [r[key] for r in rows[name] if key in r and np.isfinite(r[key])]
        return round(statistics.median(vals), 3) if vals else float("nan")

    report: dict[str, object] = {
        "model": Path(base).name, "value_model": Path(value).name if args.value_model else "base + random head",
        "isa": kernels.active_isa(), "machine": f"{platform.machine()}, {engine.n_threads} threads",
        "prompts": args.prompts, "max_tokens": args.tokens, "k": args.k, "w": args.w, "tau": args.tau,
        "sparse_ratio_target": args.target_ratio, "head": args.head,
        "candidate_gate": _candidate_gate_name(modes), "shift_tau": args.shift_tau or None,
        "horizon": args.horizon, "horizon_tau": args.horizon_tau if args.horizon else None,
        "prompt_file": str(args.prompt_file) if args.prompt_file else None, "prompts_timed": min(args.prompts, len(prompts)),
        "modes": {},
    }
    modes_out: dict[str, dict[str, float]] = {}
    for name, runs in rows.items():
        if not runs:
            continue
        entry: dict[str, Any] = {"ms_per_token": med(name, "ms_per_token"), "tokens": int(sum(r["tokens"] for r in runs))}
        if name in modes or name in others:
            entry.update(intervention_rate=med(name, "intervention_rate"),
                         value_tokens=med(name, "value_tokens_per_token"),
                         kernel_ms_per_token=med(name, "kernel_ms_per_token"))
        if name == "naive":
            entry.update(prompts=args.naive_prompts, max_tokens=args.naive_tokens, gate="dense")
        modes_out[name] = entry
    plain = modes_out["plain"]["ms_per_token"]
    ratios = {f"{m}_over_plain": round(v["ms_per_token"] / plain, 3) for m, v in modes_out.items() if m != "plain"}
    if "naive" in modes_out:
        ratios["naive_over_dense"] = round(modes_out["naive"]["ms_per_token"] / modes_out["dense"]["ms_per_token"], 2)
    ratios["dense_over_sparse"] = round(modes_out["dense"]["ms_per_token"] / modes_out["sparse"]["ms_per_token"], 2)
    for name in ("sparse_ratio", "head", "horizon"):  # issue 6's time goal: a sparse mode's share of dense's time
        if name in modes_out:
            ratios[f"{name}_over_dense"] = round(modes_out[name]["ms_per_token"] / modes_out["dense"]["ms_per_token"], 3)
    report["modes"] = modes_out
    report["ratios"] = ratios
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


SCALAR_MODES = ("sparse", "sparse_ratio", "head", "horizon", "dense")  # modes that score with the scalar head


def _candidate_gate_name(modes: dict[str, SteeringConfig]) -> str:
    """The mode whose gate a candidate head is timed at: horizon if timed, else the target ratio's
    (sparse_ratio), else the plain sparse one."""
    return next((name for name in ("horizon", "sparse_ratio") if name in modes), "sparse")


def _candidate_gate(modes: dict[str, SteeringConfig]) -> SteeringConfig:
    return modes[_candidate_gate_name(modes)]
