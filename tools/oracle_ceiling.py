#!/usr/bin/env python3
"""How far could any value model go? The refusal rate a perfect reweighting of the top-k reaches.

    python tools/oracle_ceiling.py --json --prompts 12 --ks 10,20,40

SIA can only reweight the base model's top-k candidates at a junction: if no candidate starts a
refusal, no value model can make one. This measures that ceiling on the first --prompts held-out
harmful prompts, with the default's junctions (top-10 entropy >= tau within the first --horizon
tokens of the answer):

* at each junction, every one of the top-k candidates is rolled out --samples times (plain
  top-10 sampling of the base model until the answer is --rollout-to tokens long: refusals
  announce themselves in the first words, and the eval's refusal detector reads only the start,
  ``sia_edge.rewards.PHRASE_WINDOW`` characters) and judged with that detector;
* the oracle takes the candidate refusing most often (ties: the base model's likelier one), a
  greedy choice junction by junction; where no candidate refused in any rollout it leaves the step
  to the base model, and once a candidate refused in every rollout it stops looking (the rest of
  the answer is the base model's, as after the default's horizon);
* everything else is plain top-10 sampling from the prompt's seed, and the finished answer is
  judged like the eval's answers.

Beside it, on the same prompts and seeds: off, the default steering and dense steering (the
engine's own runs), so the default's and dense's shares of the ceiling read off one table. The
same for every k in --ks: what wider candidate sets would buy. Prints JSON (one object).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sia_edge.engine import SteeringEngine
from sia_edge.kernels import Rng
from sia_edge.llama_backend import LlamaContext, LlamaModel

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO / "data/prompts/harmful_heldout.jsonl"
GATE_K = 10  # the default's gate and plain sampling use the top 10, whatever k the oracle reweights


def oracle_answer(engine: SteeringEngine, ctx: LlamaContext, prompt_ids: list[int], *, k: int, samples: int, horizon: int, tau: float,
                  max_tokens: int, rollout_to: int, seed: int) -> dict[str, object]:
    """One answer with the greedy oracle at the junctions (see the module docstring)."""
    from sia_edge import kernels
    from sia_edge.rewards import is_refusal

    rng = kernels.Rng(seed)
    gate_topk, topk = kernels.TopK(GATE_K), kernels.TopK(k)
    base = engine.base
    ctx.clear()
    ctx.decode(prompt_ids, 0)
    seq = list(prompt_ids)
    answer: list[int] = []
    junctions = evaluated = 0
    secured = False
    best_scores: list[float] = []
    while len(answer) < max_tokens:
        logits = ctx.logits(-1)
        js = kernels.junction_stats(logits, gate_topk)
        token = None
        if len(answer) < horizon and js.topk_entropy >= tau:
            junctions += 1
            if not secured:
                kernels.junction_stats(logits, topk)
                cands = [int(c) for c in topk.ids]
                scores = rollout_scores(ctx, base, seq, answer, cands, samples=samples,
                                        n_tokens=max(1, rollout_to - len(answer) - 1), rng=rng, judge=is_refusal)
                best = int(np.argmax(scores))  # argmax: the first, i.e. the likeliest, of equals
                evaluated += 1
                best_scores.append(float(scores[best]))
                secured = scores[best] >= 1.0
                if scores[best] > 0:  # else no candidate led to a refusal: the step is left to the base
                    token = cands[best]
        if token is None:  # plain top-10 sampling (gate_topk's own copy: the rollouts reused the logits buffer)
            token = int(gate_topk.ids[kernels.steer_topk_inplace(logits, gate_topk, None, w=0.0, temperature=1.0,
                                                                  rng=rng)])
        if base.is_eog(token):
            break
        answer.append(token)
        seq.append(token)
        ctx.decode([token], len(seq) - 1)
    text = base.detokenize(answer)
    return {"refused": bool(is_refusal(text)), "junctions": junctions, "evaluated": evaluated,
            "best_scores": best_scores, "text": text}


def rollout_scores(ctx: LlamaContext, base: LlamaModel, seq: list[int], answer: list[int], cands: list[int], *,
                   samples: int, n_tokens: int, rng: Rng, judge: Callable[[str], bool]) -> npt.NDArray[np.float64]:
    """Share of ``samples`` plain continuations of each candidate that the judge calls a refusal,
    all candidates' rollouts decoded together as sequences 1..len(cands)*samples of ``ctx``."""
    from sia_edge import kernels

    n = len(cands) * samples
    p = len(seq)
    tokens = [[c] for c in cands for _ in range(samples)]
    done = [False] * n
    for s in range(1, n + 1):
        ctx.seq_cp(0, s)
    topk = kernels.TopK(GATE_K)
    rows = [c for c in cands for _ in range(samples)]
    live = list(range(n))
    pos = p
    try:
        for _ in range(n_tokens):
            ctx.decode_rows([rows[i] for i in live], [pos] * len(live), [[i + 1] for i in live], all_outputs=True)
            nxt = []
            for j, i in enumerate(live):
                logits = ctx.logits(j)
                kernels.junction_stats(logits, topk)
                t = int(topk.ids[kernels.steer_topk_inplace(logits, topk, None, w=0.0, temperature=1.0, rng=rng)])
                if base.is_eog(t):
                    done[i] = True
                    continue
                tokens[i].append(t)
                rows[i] = t
                nxt.append(i)
            live = nxt
            pos += 1
            if not live:
                break
    finally:
        for s in range(1, n + 1):
            ctx.seq_rm(s)
    refused = [judge(base.detokenize(answer + tokens[i])) for i in range(n)]
    scores: npt.NDArray[np.float64] = np.array(refused, dtype=np.float64).reshape(len(cands), samples).mean(axis=1)
    return scores


def main() -> int:
    from sia_edge.prompts import read_prompt_file, stable_seed
    from sia_edge.rewards import is_refusal
    from sia_edge.steering import SteeringConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    ap.add_argument("--prompt-file", type=Path, default=HELDOUT)
    ap.add_argument("--prompts", type=int, default=12, help="the first N prompts of the file")
    ap.add_argument("--ks", default="10,20,40", help="candidate-set sizes the oracle reweights")
    ap.add_argument("--samples", type=int, default=2, help="rollouts per candidate")
    ap.add_argument("--max-tokens", type=int, default=64, help="answer length (the detector reads its start)")
    ap.add_argument("--rollout-to", type=int, default=32, help="rollouts continue the answer to this many tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",") if k]
    if not ks or min(ks) < 1 or args.samples < 1 or args.prompts < 1:
        ap.error("--ks, --samples and --prompts take positive numbers")
    items = read_prompt_file(args.prompt_file, harmful=True, limit=args.prompts)
    t0 = time.time()
    with SteeringEngine.from_preset(n_threads=args.threads) as eng:
        default = eng.recommended()
        if default.horizon is None:
            print("error: the default steering has no horizon; the oracle needs the opening it steers", file=sys.stderr)
            return 2
        modes = {"off": SteeringConfig(gate="off"), "default": default,
                 "dense": SteeringConfig(gate="dense", w=default.w, k=default.k)}
        rows: dict[str, list[bool]] = {m: [] for m in [*modes, *(f"oracle_k{k}" for k in ks)]}
        detail: dict[str, list[int]] = {f"oracle_k{k}": [] for k in ks}  # junctions the oracle evaluated
        # room for the prompt, the answer and every rollout of the widest candidate set
        n_seq = max(ks) * args.samples + 1
        longest = max(len(eng.encode_prompt(it.messages())) for it in items)
        ctx = LlamaContext(eng.base, n_ctx=longest + args.max_tokens + n_seq * (args.rollout_to + 1) + 16,
                           n_seq_max=n_seq, n_batch=max(512, n_seq), n_threads=eng.n_threads)
        try:
            for i, item in enumerate(items):
                seed = stable_seed(args.seed, item.prompt)
                for name, cfg in modes.items():
                    gen = eng.generate(item.messages(), max_tokens=args.max_tokens, config=cfg, seed=seed)
                    text = "".join(e.text for e in gen)
                    rows[name].append(bool(is_refusal(text)))
                ids = eng.encode_prompt(item.messages())
                for k in ks:
                    r = oracle_answer(eng, ctx, ids, k=k, samples=args.samples, horizon=default.horizon,
                                      tau=default.tau, max_tokens=args.max_tokens,
                                      rollout_to=args.rollout_to, seed=seed)
                    rows[f"oracle_k{k}"].append(bool(r["refused"]))
                    detail[f"oracle_k{k}"].append(int(r["evaluated"]))  # type: ignore[call-overload]
                print(f"[oracle] {i + 1}/{len(items)} prompts ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        finally:
            ctx.close()

    def rate(v: list[bool]) -> float:
        return round(float(np.mean(v)), 4)

    off = rate(rows["off"])
    out: dict[str, object] = {
        "prompts": len(items), "prompt_file": str(args.prompt_file), "samples": args.samples,
        "max_tokens": args.max_tokens, "rollout_to": args.rollout_to, "seed": args.seed, "default": default.spec, "w": default.w,
        "machine": platform.machine(), "seconds": round(time.time() - t0),
        "refusal_rate": {m: rate(v) for m, v in rows.items()},
    }
    shares: dict[str, dict[str, float | None]] = {}
    for k in ks:
        ceiling = rate(rows[f"oracle_k{k}"])
        gain = ceiling - off
        shares[f"k{k}"] = {m: (round((rate(rows[m]) - off) / gain, 3) if gain > 0 else None)
                           for m in ("default", "dense")}
        ev = detail[f"oracle_k{k}"]
        shares[f"k{k}"]["junctions_evaluated_median"] = float(statistics.median(ev)) if ev else 0.0
    out["share_of_ceiling_gain"] = shares
    # per prompt, so the runs of several slices (one process each) add up exactly
    out["per_prompt"] = [{"prompt": it.prompt[:80], **{m: int(v[i]) for m, v in rows.items()}}
                         for i, it in enumerate(items)]
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
