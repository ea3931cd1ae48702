"""Running an evaluation: every mode on every prompt set (``evaluate``), one answer at a time
(``run_prompt``), with a progress bar."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from sia_edge.cli_common import CliError
from sia_edge.eval.drift import BaseLogprobScorer
from sia_edge.eval.judge import Judge
from sia_edge.eval.metrics import matched_probability, summarise_rows
from sia_edge.eval.modes import EvalMode
from sia_edge.eval.prompt_sets import EvalPrompt, PromptSet
from sia_edge.eval.records import RowResult, finite_or_none, prompt_seed, stats_dict
from sia_edge.eval.resume import ResumedAnswers, check_resumed_steering
from sia_edge.steering import TAU_GATES, SteeringConfig

if TYPE_CHECKING:
    from sia_edge.engine import Calibration, SteeringEngine

__all__ = ["DEFAULT_MAX_TOKENS", "evaluate", "run_prompt"]

DEFAULT_MAX_TOKENS = 128


def run_prompt(engine: SteeringEngine, mode: EvalMode, config: SteeringConfig, item: EvalPrompt, *,
               set_name: str, index: int, seed: int, max_tokens: int, chat: bool = True) -> RowResult:
    """Answer one prompt in one mode: as a chat turn in the model's template, or (``chat`` False)
    continued as plain text. Best-of-N is ``SteeringEngine.sample_best_of_n`` (mean value-model V
    over the response, samples seeded seed + i), which keeps the token ids drift needs."""
    messages: str | list[dict[str, str]] = item.messages() if chat else item.prompt
    p = config.p if config.gate == "random" else None
    tau_gate = config.gate in TAU_GATES  # only these have a tau worth reporting
    if mode.bon == 1:
        gen = engine.generate(messages, max_tokens=max_tokens, config=config, seed=seed)
        with gen:
            for _ in gen:
                pass
        st = gen.stats
        return RowResult(
            set_name, index, item, mode.label, seed, gen.text, list(gen.prompt_tokens), list(gen.tokens),
            n_tokens=len(gen.tokens), steps=st.steps, junctions=st.junctions, value_tokens=st.value_tokens,
            gen_ms=st.total_ms - st.prefill_ms, tau=finite_or_none(st.tau) if tau_gate else None, p=p,
            stats=stats_dict(st),
        )
    t0 = time.perf_counter()
    result = engine.sample_best_of_n(messages, mode.bon, max_tokens=max_tokens, config=config, seed=seed)
    wall_ms = (time.perf_counter() - t0) * 1e3
    samples, best = result.samples, result.best
    st = best.stats
    prefill_ms = sum(s.stats.prefill_ms for s in samples)
    tau = finite_or_none(st.tau) if tau_gate else None
    steps = sum(s.stats.steps for s in samples)
    junctions = sum(s.stats.junctions for s in samples)
    value_tokens = sum(s.stats.value_tokens for s in samples) + result.ranking_value_tokens
    tokens = best.tokens
    stats = {
        "bon": mode.bon, "chosen": result.chosen, "tokens": len(tokens), "sample_tokens": steps,
        "junctions": junctions, "intervention_rate": junctions / steps if steps else 0.0,
        "value_tokens": value_tokens, "ranking_value_tokens": result.ranking_value_tokens, "total_ms": wall_ms,
        "prefill_ms": prefill_ms, "ms_per_token": (wall_ms - prefill_ms) / len(tokens) if tokens else 0.0,
        "stop_reason": st.stop_reason, "tau": tau,
        "samples": [{"score": finite_or_none(s.score), "tokens": s.stats.tokens, "junctions": s.stats.junctions,
                     "stop_reason": s.stats.stop_reason} for s in samples],
    }
    return RowResult(
        set_name, index, item, mode.label, seed, best.text, best.prompt_tokens, tokens, n_tokens=len(tokens),
        steps=steps, junctions=junctions, value_tokens=value_tokens, gen_ms=wall_ms - prefill_ms, tau=tau, p=p,
        stats=stats,
    )


class _Progress:
    """tqdm when it is installed, else one status line on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar: Any = None
        self._desc = ""
        self._last = 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="answer", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self._bar = None

    def describe(self, text: str) -> None:
        self._desc = text
        if self._bar is not None:
            self._bar.set_description(text)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def update(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled:
            now = time.monotonic()
            if now - self._last > 2.0 or self.done == self.total:
                self._last = now
                end = "\n" if self.done == self.total or not sys.stderr.isatty() else ""
                print(f"\r{self._desc}: {self.done}/{self.total} answers", end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def evaluate(
    engine: SteeringEngine,
    sets: Sequence[PromptSet],
    modes: Sequence[EvalMode],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seed: int = 0,
    k: int = 10,
    w: float = 1.0,
    temperature: float = 1.0,
    reward: str = "safety",
    outputs: IO[str] | None = None,
    progress: bool = True,
    by_source: bool = False,
    run: dict[str, Any] | None = None,
    resumed: ResumedAnswers | None = None,
    chat: bool = True,
    calibration: Calibration | None = None,
) -> list[dict[str, Any]]:
    """Run every mode on every set; write answers to ``outputs`` (JSONL) as they come, each with
    ``run`` (the settings, so that ``--resume`` can check them); return the summary entries (one per
    mode and set, in the order of ``modes`` and ``sets``). ``resumed`` holds the answers of an
    earlier run in ``outputs``' file: checked, then counted, not generated or written again. ``chat``
    False continues each prompt as plain text instead of answering it in the chat template.
    ``calibration``: the prompts target ratios are calibrated on (else the engine's built-in ones)."""
    done = resumed.rows if resumed is not None else {}
    judge = Judge(reward)
    missing_value = [m.label for m in modes if m.needs_value_model and engine.value is None]
    if missing_value:
        raise CliError(f"modes {', '.join(missing_value)} need a value model: pass --value-model PATH.gguf")
    drift = BaseLogprobScorer(engine.base, n_ctx=engine.n_ctx, n_threads=engine.n_threads)
    # Modes that copy another mode's measured rate run after all the others.
    order = [m for m in modes if m.match is None] + [m for m in modes if m.match is not None]
    by_label = {m.label: m for m in modes}
    answers: dict[tuple[str, str], list[RowResult]] = {}  # (mode, set) -> its answers, in prompt order
    bar = _Progress(len(modes) * sum(len(s.prompts) for s in sets), progress)
    try:
        # Every tau first: a ratio that cannot be calibrated fails before any mode has run for hours.
        calibrated: dict[str, float] = {}
        for mode in order:
            if mode.target_ratio is not None:
                cfg = mode.config(k=k, w=w, temperature=temperature)
                bar.note(f"{mode.label}: calibrating tau for {mode.target_ratio:.0%} junctions (cached after the first run)")
                calibrated[mode.label] = tau = engine.calibrate_tau(cfg, calibration)
                bar.note(f"{mode.label}: tau = {tau:.3f}")
        if resumed is not None:
            configs = {m.label: m.config(k=k, w=w, temperature=temperature, p=0.0 if m.match else None)
                       for m in modes}
            taus = {m.label: calibrated.get(m.label, configs[m.label].tau) for m in modes}
            check_resumed_steering(done, modes, sets, configs, taus)
            resumed.drop_unfinished_row()
        for mode in order:
            for pset in sets:
                p = None
                if mode.match is not None:
                    p = matched_probability(answers[(mode.match, pset.name)], by_label[mode.match].horizon)
                config = mode.config(k=k, w=w, temperature=temperature, p=p)
                if mode.label in calibrated:  # the tau measured above, on ``calibration``'s prompts if given
                    config = config.with_tau(calibrated[mode.label])
                bar.describe(f"{mode.label} on {pset.name}")
                rows = answers.setdefault((mode.label, pset.name), [])
                for i, item in enumerate(pset.prompts):
                    row = done.get((mode.label, pset.name, i))
                    if row is not None:
                        rows.append(row)
                        bar.update()
                        continue
                    row = run_prompt(engine, mode, config, item, set_name=pset.name, index=i,
                                     seed=prompt_seed(seed, pset.name, i), max_tokens=max_tokens, chat=chat)
                    row.drift = (float(drift.response_logprobs(row.prompt_ids, row.tokens).mean())
                                 if row.tokens else None)
                    judge.score(row)
                    rows.append(row)
                    if outputs is not None:
                        outputs.write(json.dumps(row.as_row(run), ensure_ascii=False) + "\n")
                        outputs.flush()
                    bar.update()
    finally:
        bar.close()
        drift.close()
    results = []
    for mode in modes:
        for pset in sets:
            rows = answers[(mode.label, pset.name)]
            entry = {"mode": mode.label, "family": mode.family, "gate": mode.gate, "bon": mode.bon,
                     "set": pset.name, "kind": pset.kind, **summarise_rows(rows)}
            if by_source:
                groups: dict[str, list[RowResult]] = {}
                for r in rows:
                    groups.setdefault(r.item.source or "", []).append(r)
                entry["by_source"] = {src: summarise_rows(g) for src, g in sorted(groups.items())}
            results.append(entry)
    return results
