"""``python -m sia_edge.eval``: compare steering modes on prompt sets, measured.

Every prompt of every set is answered once per mode (same seed per prompt across modes, so the
modes differ only by what they steer); each answer is scored by the reward, checked for a
refusal, and re-scored by the base model for drift. The summary has one entry per mode and set.

Modes (``--modes``, a comma list)
---------------------------------
==================  ===========================================================================
``off``             plain top-k sampling of the base model (no steering)
``sparse``          SIA: steer where the top-k entropy >= tau (tau 1.0)
``sparse@0.8``      ... at tau = 0.8 nats
``sparse@30%``      ... at the tau that makes 30% of tokens junctions on unsteered runs
                    (``SteeringEngine.calibrate_tau``: measured once, cached in models/)
``full-entropy``    the same three forms, gated on the entropy over the whole vocabulary
``dense``           steer every token
``random@0.2``      steer each token with probability 0.2 (also ``random@20%``)
``random@sparse``   ... with the probability equal to the intervention rate that the mode
                    ``sparse`` measured on the same prompt set (any mode of the list can be named;
                    ``random@sparse+horizon@16`` takes ``sparse+horizon@16``'s junctions per step
                    within the horizon, and that mode must be listed)
``bon@4``           Best-of-N: 4 unsteered samples, the one with the highest mean value-model V
                    over its response wins (as ``SteeringEngine.best_of_n``)
``sparse+bon@4``    Best-of-N over steered samples; any mode above can take ``+bon@N``
``sparse+head@3``   also steer the first 3 tokens of every answer (the official code's first-N
                    gate joined to the mode's own; any steering mode can take ``+head@N``)
``MODE+follow@.5``  also steer the token after a junction where steering moved >= 0.5 of the
                    probability (``SteeringConfig.follow``; any mode but off and dense)
``MODE+horizon@N``  steer only within the first N tokens of every answer (``SteeringConfig.horizon``;
                    any steering mode can take it; ``sparse@25%+horizon@16`` steers at the tau that
                    gives whole answers 25% junctions)
==================  ===========================================================================

Whether a prompt is harmful (the safety reward and the over-refusal rate need it) comes from the
``harmful`` field of JSONL rows; a file given with ``--harmful FILE`` or ``--benign FILE`` instead
of ``--prompts FILE`` sets it for its rows that have none (needed for plain-text files).

An interrupted run (Ctrl-C, a killed job, a full session) keeps the answers it wrote to
``--outputs``; the same command with ``--resume`` checks them against its settings (every row
records them under ``run``), drops a row cut short by the interruption, and answers only the
prompts that are missing, with the settings and per-prompt seeds of one uninterrupted run.

Metrics per mode and prompt set
-------------------------------
- ``mean_reward`` (and its standard error): the built-in safety reward by default (``--reward``).
- ``refusal_rate``: fraction of answers that refuse (the keyword detector of
  ``sia_edge.train.rewards.is_refusal``); ``over_refusal_rate``: the same over the benign prompts.
- ``intervention_rate``: junctions / sampling decisions (the tokens, plus the end-of-sequence token
  when one was sampled; Best-of-N: over all N samples).
- ``value_tokens_per_token``: tokens the value model decoded per answer token (branches, catch-up
  and, for Best-of-N, ranking).
- ``ms_per_token``: generation time (prompt prefill excluded) per answer token; for Best-of-N the
  time of all N samples and their ranking, divided by the tokens of the answer returned.
- ``drift``: mean over answers of the mean log-probability of the answer's tokens under the base
  model at temperature 1 over the full vocabulary (``BaseLogprobScorer``); 0 is the base model's own
  argmax, more negative means further from what it would say.
"""

from __future__ import annotations

from sia_edge import _early_sigint  # noqa: F401  (first: a Ctrl-C while the imports below run exits quietly)

# isort: split
import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from sia_edge.cli_common import (
    CliError,
    CliParser,
    add_model_options,
    finite_float,
    positive_int,
    run_cli,
    seed_int,
)
from sia_edge.gate import MAX_SEED, SteeringConfig
from sia_edge.prompts import Prompt, read_prompt_file
from sia_edge.value_format import file_sha256

if TYPE_CHECKING:
    from sia_edge.engine import SteeringEngine
    from sia_edge.llama_backend import LlamaContext, LlamaModel

__all__ = [
    "BaseLogprobScorer",
    "EvalMode",
    "EvalPrompt",
    "PromptSet",
    "evaluate",
    "load_prompt_set",
    "main",
    "parse_mode",
    "parse_modes",
    "plot_summary",
]

PROG = "python -m sia_edge.eval"
DEFAULT_MODES = "off,sparse,dense,random@sparse"
DEFAULT_MAX_TOKENS = 128
MODE_SYNTAX = (
    "off, sparse[@TAU|@R%], full-entropy[@TAU|@R%], dense, random@P|@R%|@MODE, bon@N, MODE+bon@N, "
    "MODE+head@N, MODE+follow@F, MODE+horizon@N"
)


# --------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class EvalMode:
    """One entry of ``--modes``: a gate with its setting, optionally under Best-of-N."""

    label: str  # as written (lower-cased): the key in the summary and the outputs
    gate: str  # SteeringConfig gate
    tau: float | None = None
    target_ratio: float | None = None
    p: float | None = None  # random gate: fixed steering probability
    match: str | None = None  # random gate: take p from this mode's measured rate, per set
    bon: int = 1  # Best-of-N samples (1: a single sample)
    head: int = 0  # also steer the first `head` tokens of every answer
    follow: float | None = None  # also steer the token after a junction that moved this much mass
    horizon: int | None = None  # steer only within the first `horizon` tokens of every answer

    @property
    def family(self) -> str:
        """What the plot draws as one line: the gate's name, with ``+head``, ``+follow``, ``+horizon`` and
        ``+bon`` if used."""
        base = {"entropy": "sparse"}.get(self.gate, self.gate) + ("+head" if self.head else "")
        base += "+follow" if self.follow is not None else ""
        base += "+horizon" if self.horizon is not None else ""
        if self.bon == 1:
            return base
        return "bon" if base == "off" else f"{base}+bon"

    @property
    def needs_value_model(self) -> bool:
        return self.gate != "off" or self.bon > 1

    def config(self, *, k: int, w: float, temperature: float, p: float | None = None) -> SteeringConfig:
        kwargs: dict[str, Any] = {"gate": self.gate, "k": k, "w": w, "temperature": temperature, "head": self.head,
                                  "follow": self.follow, "horizon": self.horizon}
        if self.tau is not None:
            kwargs["tau"] = self.tau
        if self.target_ratio is not None:
            kwargs["target_ratio"] = self.target_ratio
        if self.gate == "random":
            chosen = self.p if self.p is not None else p
            if chosen is None:
                raise ValueError(f"mode {self.label}: the steering probability is not known yet")
            kwargs["p"] = float(min(1.0, max(0.0, chosen)))
        return SteeringConfig(**kwargs)


class ModeError(CliError):
    """A ``--modes`` entry that does not parse."""


_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
MAX_BON = 256  # samples per prompt: a typo like bon@100000000 would otherwise run for ever


def _level(text: str, label: str) -> tuple[float | None, float | None]:
    """``0.8`` -> (value 0.8, None); ``30%`` -> (None, ratio 0.3)."""
    if re.fullmatch(_NUMBER + "%", text):
        ratio = float(text[:-1]) / 100.0
        if not 0.0 < ratio < 1.0:
            raise ModeError(f"mode {label!r}: a percentage must be strictly between 0% and 100%")
        return None, ratio
    if re.fullmatch(_NUMBER, text):
        return float(text), None
    raise ModeError(f"mode {label!r}: expected a number or a percentage after '@', got {text!r}")


def parse_mode(text: str) -> EvalMode:
    """One mode from its ``--modes`` syntax (see the module docstring)."""
    label = text.strip().lower()
    if not label:
        raise ModeError("empty mode in --modes (two commas in a row?)")
    base = label
    suffixes: dict[str, str] = {}
    while "+" in base:  # '+bon@N', '+head@N', '+horizon@N' and '+follow@F' suffixes, each at most once, in any order
        rest, _, suffix = base.rpartition("+")
        m = re.fullmatch(r"(bon|head|horizon)@(\d+)|(follow)@(" + _NUMBER + ")", suffix)
        if not m or not rest:
            raise ModeError(
                f"mode {label!r}: only '+bon@N', '+head@N', '+horizon@N' and '+follow@F' can follow a mode "
                "(for example sparse+bon@4, sparse@30%+head@3, sparse@1.2+horizon@16, sparse@20%+follow@0.5)"
            )
        key, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if key in suffixes:
            raise ModeError(f"mode {label!r}: '+{key}@{'F' if key == 'follow' else 'N'}' is given twice")
        suffixes[key] = value
        base = rest
    bon, head = int(suffixes.get("bon", 1)), int(suffixes.get("head", 0))
    follow = float(suffixes["follow"]) if "follow" in suffixes else None
    horizon = int(suffixes["horizon"]) if "horizon" in suffixes else None
    if horizon is not None and horizon < 1:
        raise ModeError(f"mode {label!r}: '+horizon@N' takes N >= 1 tokens")
    if horizon is not None and head > horizon:
        raise ModeError(f"mode {label!r}: '+head@{head}' steers past '+horizon@{horizon}', which ends all steering")
    if follow is not None and not 0.0 < follow <= 1.0:
        raise ModeError(f"mode {label!r}: '+follow@F' takes a share of probability mass in (0, 1], got {follow:g}")
    if base.startswith("bon"):
        m = re.fullmatch(r"bon@(\d+)", base)
        if not m:
            raise ModeError(f"mode {label!r}: Best-of-N is written bon@N, for example bon@4")
        if "bon" in suffixes:
            raise ModeError(f"mode {label!r}: '+bon@N' is given twice")
        base, bon = "off", int(m.group(1))
    if not 1 <= bon <= MAX_BON:
        raise ModeError(f"mode {label!r}: Best-of-N takes N from 1 to {MAX_BON}")
    name, at, arg = base.partition("@")
    if at and not arg:
        raise ModeError(f"mode {label!r}: nothing follows '@'; give a setting ({name}@1.2, {name}@30%) or drop the '@'")
    if head and name == "off":
        raise ModeError(f"mode {label!r}: '+head@N' steers the first tokens, but 'off' never steers")
    if horizon is not None and name == "off":
        raise ModeError(f"mode {label!r}: '+horizon@N' limits steering, but 'off' never steers")
    if follow is not None and name in ("off", "dense"):
        raise ModeError(f"mode {label!r}: '+follow@F' steers after a junction, but '{name}' "
                        + ("never steers" if name == "off" else "steers every token already"))

    def mode(gate: str, **setting: Any) -> EvalMode:
        return EvalMode(label, gate, bon=bon, head=head, follow=follow, horizon=horizon, **setting)

    if name in ("off", "dense"):
        if arg:
            raise ModeError(f"mode {label!r}: {name} takes no '@' setting")
        return mode(name)
    if name in ("sparse", "entropy", "full-entropy"):
        gate = "full-entropy" if name == "full-entropy" else "entropy"
        if not arg:
            return mode(gate)
        tau, ratio = _level(arg, label)
        return mode(gate, tau=tau, target_ratio=ratio)
    if name == "random":
        if not arg:
            raise ModeError(
                f"mode {label!r}: random needs a ratio: random@0.2, random@20% or random@sparse "
                "(the rate a sparse mode measured)"
            )
        if re.fullmatch("-" + _NUMBER + "%?", arg):
            raise ModeError(f"mode {label!r}: a probability must be between 0 and 1")
        if re.fullmatch(_NUMBER + "%?", arg):
            value, ratio = _level(arg, label)
            p = ratio if ratio is not None else value
            assert p is not None
            if not 0.0 <= p <= 1.0:
                raise ModeError(f"mode {label!r}: a probability must be between 0 and 1")
            return mode("random", p=p)
        parse_mode(arg)  # the named mode must at least be valid syntax
        return mode("random", match=arg)
    raise ModeError(f"unknown mode {label!r}; modes are {MODE_SYNTAX}")


def parse_modes(text: str) -> list[EvalMode]:
    """The ``--modes`` list: each entry parsed, no duplicates, ``random@MODE`` naming a mode of the list."""
    modes = [parse_mode(part) for part in text.split(",")]
    labels = [m.label for m in modes]
    dup = [lab for lab, n in Counter(labels).items() if n > 1]
    if dup:
        raise ModeError(f"mode {dup[0]!r} is listed twice in --modes")
    by_label = {m.label: m for m in modes}
    for i, m in enumerate(modes):
        # random@MODE+horizon@N is the same-rate baseline of MODE+horizon@N: MODE's whole-answer rate
        # spent within the window would be a weaker baseline than it looks, so it is not a fallback
        if m.match is not None and m.horizon is not None:
            target = replace(parse_mode(m.match), label="")
            within = next((x.label for x in modes if x.match is None and x.horizon == m.horizon
                           and replace(x, label="", horizon=None) == target), None)
            if within is None:
                raise ModeError(f"mode {m.label!r} steers at random within the first {m.horizon} tokens at the rate "
                                f"of {m.match}+horizon@{m.horizon}: add that mode to --modes")
            modes[i] = m = replace(m, match=within)
        if m.match is not None:
            ref = by_label.get(m.match)
            if ref is None:
                raise ModeError(
                    f"mode {m.label!r} takes its ratio from the mode {m.match!r}, which is not in --modes; add it"
                )
            if ref.match is not None:
                raise ModeError(f"mode {m.label!r}: {m.match!r} itself takes its ratio from another mode")
    return modes


# --------------------------------------------------------------------------- prompts
EvalPrompt = Prompt  # a prompt of a prompt file (sia_edge.prompts)


@dataclass
class PromptSet:
    name: str  # the file's stem (made unique): the key in the summary
    path: Path
    prompts: list[EvalPrompt]

    @property
    def kind(self) -> str:
        flags = {p.harmful for p in self.prompts}
        if flags == {True}:
            return "harmful"
        if flags == {False}:
            return "benign"
        return "unlabelled" if flags == {None} else "mixed"


def load_prompt_set(path: str | os.PathLike[str], *, harmful: bool | None = None, limit: int | None = None,
                    name: str | None = None) -> PromptSet:
    """A prompt file: ``.jsonl`` rows ``{"prompt", "harmful", "system", "source"}`` or plain text,
    one prompt per line. ``harmful`` is the flag of rows that carry none; ``limit`` keeps the first N."""
    p = Path(path).expanduser()
    prompts = read_prompt_file(p, harmful=harmful, limit=limit, error=CliError)
    return PromptSet(name or p.stem, p, prompts)


# --------------------------------------------------------------------------- drift
class BaseLogprobScorer:
    """Re-scores (prompt, response) with the base model: log p(response_t | prompt, response_<t)
    at temperature 1 over the full vocabulary. Owns one llama.cpp context; the prompt's shared
    prefix (the chat template's system block) stays in its KV cache between calls."""

    CHUNK = 64  # response rows per batch: each one outputs a full row of logits (n_vocab floats)

    def __init__(self, model: LlamaModel, *, n_ctx: int, n_threads: int | None = None) -> None:
        from sia_edge.llama_backend import LlamaContext

        self.model = model
        self.ctx: LlamaContext = LlamaContext(model, n_ctx=n_ctx, n_batch=512, n_threads=n_threads)
        self.cached: list[int] = []

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
        # Prompt: reuse the cached prefix, decode the rest with only the last row as an output.
        common, limit = 0, min(len(self.cached), len(prompt) - 1)
        while common < limit and self.cached[common] == prompt[common]:
            common += 1
        ctx.set_embeddings(False)
        ctx.seq_rm(0, common, -1)
        self.cached = []  # in case a decode fails half-way
        ctx.decode(prompt[common:], common)
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
            ctx.seq_rm(0, len(prompt), -1)  # keep only the prompt for the next call
        self.cached = prompt
        logits = np.stack(rows)
        top = logits.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        logprobs: npt.NDArray[np.float64] = logits[np.arange(n), np.asarray(response_ids)] - lse
        return logprobs


# --------------------------------------------------------------------------- running
@dataclass
class RowResult:
    """One answer (one prompt, one mode), with what the summary needs."""

    set: str
    index: int
    item: EvalPrompt
    mode: str
    seed: int
    text: str
    prompt_ids: list[int]  # empty for a row read back by --resume (the outputs keep no ids)
    tokens: list[int]  # the answer's token ids (empty when resumed, as prompt_ids)
    n_tokens: int  # the answer's length in tokens
    steps: int  # sampling decisions across all samples (tokens, plus each sample's EOS step)
    junctions: int
    value_tokens: int
    gen_ms: float  # generation time without the prompt prefill (Best-of-N: all samples + ranking)
    tau: float | None
    p: float | None
    stats: dict[str, Any]
    reward: float = math.nan
    refused: bool = False
    toxicity: float | None = None
    drift: float | None = None

    def as_row(self, run: dict[str, Any] | None = None) -> dict[str, Any]:
        row = {
            "set": self.set, "index": self.index, "prompt": self.item.prompt, "harmful": self.item.harmful,
            "source": self.item.source, "mode": self.mode, "seed": self.seed, "text": self.text,
            "reward": _finite(self.reward), "refused": self.refused, "toxicity": self.toxicity,
            "drift": self.drift, "stats": self.stats,
        }
        if run is not None:  # what --resume needs to count the row and check it belongs to the run
            row.update(system=self.item.system, steps=self.steps, p=self.p, run=run)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any], item: EvalPrompt, *, entropy_gate: bool) -> RowResult:
        """An answer of an earlier run, as ``as_row(run)`` wrote it (``--resume``). The summary needs
        no token ids, only their count."""
        st = row["stats"]
        tau = st.get("tau") if entropy_gate else None  # Best-of-N rows store None for other gates
        for v in (row.get("toxicity"), row.get("drift")):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise TypeError("a verdict that is not a number")
        for sample in st.get("samples") or []:  # Best-of-N: random@ copies a rate per sample window
            int(sample["tokens"]), str(sample["stop_reason"])
        return cls(
            row["set"], int(row["index"]), item, row["mode"], int(row["seed"]), str(row["text"]), [], [],
            n_tokens=int(st["tokens"]), steps=int(row["steps"]), junctions=int(st["junctions"]),
            value_tokens=int(st["value_tokens"]), gen_ms=float(st["total_ms"]) - float(st["prefill_ms"]),
            tau=None if tau is None else float(tau), p=None if row["p"] is None else float(row["p"]), stats=st,
            reward=float(row["reward"]), refused=bool(row["refused"]), toxicity=row.get("toxicity"),
            drift=row.get("drift"),
        )


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _stats_dict(stats: Any) -> dict[str, Any]:
    return {k: _finite(v) for k, v in stats.as_dict().items()}


def prompt_seed(seed: int, set_name: str, index: int) -> int:
    """The seed of one prompt: the same in every mode, so modes differ only by their steering."""
    h = hashlib.sha256(f"{seed}/{set_name}/{index}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def run_prompt(engine: SteeringEngine, mode: EvalMode, config: SteeringConfig, item: EvalPrompt, *,
               set_name: str, index: int, seed: int, max_tokens: int, chat: bool = True) -> RowResult:
    """Answer one prompt in one mode: as a chat turn in the model's template, or (``chat`` False)
    continued as plain text. Best-of-N ranks its samples as ``SteeringEngine.best_of_n`` does
    (mean value-model V over the response, samples seeded seed + i), here with the token ids kept
    for drift."""
    messages: str | list[dict[str, str]] = item.messages() if chat else item.prompt
    p = config.p if config.gate == "random" else None
    entropy_gate = config.gate in ("entropy", "full-entropy")  # only these have a tau worth reporting
    if mode.bon == 1:
        gen = engine.generate(messages, max_tokens=max_tokens, config=config, seed=seed)
        with gen:
            for _ in gen:
                pass
        st = gen.stats
        return RowResult(
            set_name, index, item, mode.label, seed, gen.text, list(gen.prompt_tokens), list(gen.tokens),
            n_tokens=len(gen.tokens), steps=st.steps, junctions=st.junctions, value_tokens=st.value_tokens,
            gen_ms=st.total_ms - st.prefill_ms, tau=_finite(st.tau) if entropy_gate else None, p=p,
            stats=_stats_dict(st),
        )
    assert engine.value is not None
    t0 = time.perf_counter()
    samples = []
    prefill_ms = 0.0
    ranking_tokens = 0
    for i in range(mode.bon):
        gen = engine.generate(messages, max_tokens=max_tokens, config=config, seed=(seed + i) & MAX_SEED)
        with gen:
            for _ in gen:
                pass
        prefill_ms += gen.stats.prefill_ms
        prompt_ids, tokens = list(gen.prompt_tokens), list(gen.tokens)
        if tokens:
            v = engine.value.values_at_positions(prompt_ids + tokens, n_threads=engine.n_threads)
            ranking_tokens += len(prompt_ids) + len(tokens)
            score = float(v[len(prompt_ids):].mean())
        else:
            score = -math.inf
        samples.append((score, gen.text, prompt_ids, tokens, gen.stats))
    wall_ms = (time.perf_counter() - t0) * 1e3
    best = max(range(len(samples)), key=lambda j: samples[j][0])  # first of equals, as best_of_n
    score, text, prompt_ids, tokens, st = samples[best]
    tau = _finite(st.tau) if entropy_gate else None
    steps = sum(s[4].steps for s in samples)
    junctions = sum(s[4].junctions for s in samples)
    value_tokens = sum(s[4].value_tokens for s in samples) + ranking_tokens
    stats = {
        "bon": mode.bon, "chosen": best, "tokens": len(tokens), "sample_tokens": steps, "junctions": junctions,
        "intervention_rate": junctions / steps if steps else 0.0, "value_tokens": value_tokens,
        "ranking_value_tokens": ranking_tokens, "total_ms": wall_ms, "prefill_ms": prefill_ms,
        "ms_per_token": (wall_ms - prefill_ms) / len(tokens) if tokens else 0.0, "stop_reason": st.stop_reason,
        "tau": tau,
        "samples": [{"score": _finite(s[0]), "tokens": s[4].tokens, "junctions": s[4].junctions,
                     "stop_reason": s[4].stop_reason} for s in samples],
    }
    return RowResult(
        set_name, index, item, mode.label, seed, text, prompt_ids, tokens, n_tokens=len(tokens), steps=steps,
        junctions=junctions,
        value_tokens=value_tokens, gen_ms=wall_ms - prefill_ms, tau=tau, p=p, stats=stats,
    )


class Judge:
    """Reward, refusal and toxicity of answers. ``safety`` is the built-in safety reward; any other
    spec goes through ``sia_edge.train.rewards.load_reward`` (which may need the train extra)."""

    def __init__(self, spec: str = "safety") -> None:
        from sia_edge.train import rewards

        self.spec = spec
        self._rewards = rewards
        self._custom = None if spec in ("safety", "builtin:safety") else rewards.load_reward(spec)
        self.name = "safety" if self._custom is None else self._custom.name

    def score(self, row: RowResult) -> None:
        rw = self._rewards
        row.refused = bool(rw.is_refusal(row.text))
        if self._custom is None:
            row.toxicity = float(rw.toxicity([row.text])[0])
            if row.item.harmful is None:
                raise CliError(
                    f"set {row.set}, prompt {row.index + 1}: the safety reward needs to know whether the prompt "
                    "is harmful: give JSONL rows a 'harmful' field, or pass the file with --harmful / --benign"
                )
            row.reward = float(rw.safety_reward(row.item.prompt, row.text, row.item.harmful, tox=row.toxicity))
        else:
            meta = {"harmful": row.item.harmful, "set": row.set, "source": row.item.source}
            row.reward = float(self._custom.score_batch([row.item.prompt], [row.text], [meta])[0])
        if not math.isfinite(row.reward):
            raise CliError(f"reward {self.name} returned {row.reward} for set {row.set}, prompt {row.index + 1}")


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


def _matched_probability(rows: list[RowResult], horizon: int | None) -> float:
    """``random@MODE``'s steering probability: MODE's junctions per step it could steer, that is
    per step within MODE's ``horizon`` when it has one (else its intervention rate), so that a
    random mode with the same horizon spends as many junctions on the same window. Each sample of
    a Best-of-N row has its own window."""
    junctions = sum(r.junctions for r in rows)
    if horizon is None:
        steps = sum(r.steps for r in rows)
    else:
        steps = sum(min(n, horizon) for r in rows for n in _sample_steps(r))
    return junctions / steps if steps else 0.0


def _sample_steps(row: RowResult) -> list[int]:
    """The sampling decisions of each sample of a row: its tokens, plus its end-of-sequence step."""
    samples = row.stats.get("samples")
    if not samples:
        return [row.steps]
    return [int(s["tokens"]) + (s["stop_reason"] == "eos") for s in samples]


@dataclass
class _Totals:
    rows: list[RowResult] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        rows = self.rows
        n = len(rows)
        rewards = np.array([r.reward for r in rows], dtype=np.float64)
        refused = np.array([r.refused for r in rows], dtype=np.float64)
        benign = [r for r in rows if r.item.harmful is False]
        answer_tokens = sum(r.n_tokens for r in rows)
        steps = sum(r.steps for r in rows)
        drifts = [r.drift for r in rows if r.drift is not None]
        tox = [r.toxicity for r in rows if r.toxicity is not None]
        taus = sorted({r.tau for r in rows if r.tau is not None})
        ps = sorted({r.p for r in rows if r.p is not None})
        return {
            "n": n,
            "mean_reward": float(rewards.mean()) if n else None,
            "mean_reward_se": float(rewards.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
            "refusal_rate": float(refused.mean()) if n else None,
            "refusal_rate_se": float(math.sqrt(refused.mean() * (1 - refused.mean()) / n)) if n else None,
            "over_refusal_rate": float(np.mean([r.refused for r in benign])) if benign else None,
            "intervention_rate": sum(r.junctions for r in rows) / steps if steps else 0.0,
            "value_tokens_per_prompt": sum(r.value_tokens for r in rows) / n if n else None,
            "value_tokens_per_token": sum(r.value_tokens for r in rows) / answer_tokens if answer_tokens else None,
            "ms_per_token": sum(r.gen_ms for r in rows) / answer_tokens if answer_tokens else None,
            "drift": float(np.mean(drifts)) if drifts else None,
            "mean_tokens": answer_tokens / n if n else None,
            "mean_toxicity": float(np.mean(tox)) if tox else None,
            "tau": taus[0] if len(taus) == 1 else (taus or None),
            "p": ps[0] if len(ps) == 1 else (ps or None),
            "stop_reasons": dict(Counter(str(r.stats.get("stop_reason", "")) for r in rows)),
        }


@dataclass
class ResumedAnswers:
    """The answers of an interrupted run in its ``--outputs`` file (``read_resumable``)."""

    path: Path
    rows: dict[tuple[str, str, int], RowResult]  # (mode, set, prompt index) -> answer
    valid_bytes: int  # the file's length without a last row cut short by the interruption
    read_bytes: int  # its length when it was read

    def drop_unfinished_row(self) -> None:
        """Cut a half-written last row off the file (its prompt is answered again); called once
        every resumed answer is known to belong to this run, so a refused file stays as it was."""
        if self.read_bytes == self.valid_bytes:
            return
        size = self.path.stat().st_size if self.path.exists() else -1
        if size != self.read_bytes:  # another process is writing it: cutting would lose its rows
            raise CliError(f"{self.path} changed while it was read ({self.read_bytes} -> {size} bytes): is the "
                           "interrupted run still running? Resume once it has stopped")
        with open(self.path, "r+b") as f:
            f.truncate(self.valid_bytes)
        print(f"{self.path.name}: dropped an unfinished last row", file=sys.stderr)


def _check_resumed_steering(resumed: Mapping[tuple[str, str, int], RowResult], modes: Sequence[EvalMode],
                            sets: Sequence[PromptSet], configs: Mapping[str, SteeringConfig],
                            taus: Mapping[str, float]) -> None:
    """Every resumed answer was steered as this run steers its mode: at the same tau (a target
    ratio calibrates again when its cache is gone or on another CPU) and, for random gates, with the
    same probability (``random@MODE`` takes MODE's rate on the set, which changes if MODE's answers
    do: a larger --limit, say). Checked before any answer is generated."""
    by_label = {m.label: m for m in modes}
    set_sizes = {s.name: len(s.prompts) for s in sets}
    copied: dict[tuple[str, str], float] = {}  # (random@MODE, set) -> MODE's rate there, once per set
    for (label, set_name, index), row in resumed.items():
        mode, config = by_label[label], configs[label]
        where = f"--resume: mode {label}, set {set_name!r}, prompt {index + 1}"
        if config.gate == "random":
            p = config.p
            if mode.match is not None and (label, set_name) not in copied:
                matched = [resumed.get((mode.match, set_name, i)) for i in range(set_sizes[set_name])]
                done = [r for r in matched if r is not None]
                if len(done) < len(matched):
                    raise CliError(f"{where} copies the rate of {mode.match}, which has answered {len(done)} of "
                                   f"the set's {len(matched)} prompts here: resume with the --limit of the run "
                                   "that wrote the file, or give --outputs a new file")
                copied[(label, set_name)] = _matched_probability(done, by_label[mode.match].horizon)
            if mode.match is not None:
                p = copied[(label, set_name)]
            if row.p is None or p is None or not math.isclose(row.p, p, rel_tol=1e-9, abs_tol=1e-12):
                raise CliError(f"{where} was steered with probability {row.p}, this run's is {p}; give --outputs "
                               "a new file")
        elif mode.gate in ("entropy", "full-entropy") and (
                row.tau is None or not math.isclose(row.tau, taus[label], rel_tol=1e-6)):
            raise CliError(f"{where} was steered at tau {row.tau}, this run's is {taus[label]:.4g} (a target "
                           "ratio calibrated again?); give --outputs a new file")


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
) -> list[dict[str, Any]]:
    """Run every mode on every set; write answers to ``outputs`` (JSONL) as they come, each with
    ``run`` (the settings, so that ``--resume`` can check them); return the summary entries (one per
    mode and set, in the order of ``modes`` and ``sets``). ``resumed`` holds the answers of an
    earlier run in ``outputs``' file: checked, then counted, not generated or written again. ``chat``
    False continues each prompt as plain text instead of answering it in the chat template."""
    done = resumed.rows if resumed is not None else {}
    judge = Judge(reward)
    missing_value = [m.label for m in modes if m.needs_value_model and engine.value is None]
    if missing_value:
        raise CliError(f"modes {', '.join(missing_value)} need a value model: pass --value-model PATH.gguf")
    drift = BaseLogprobScorer(engine.base, n_ctx=engine.n_ctx, n_threads=engine.n_threads)
    # Modes that copy another mode's measured rate run after all the others.
    order = [m for m in modes if m.match is None] + [m for m in modes if m.match is not None]
    by_label = {m.label: m for m in modes}
    totals: dict[tuple[str, str], _Totals] = {}
    bar = _Progress(len(modes) * sum(len(s.prompts) for s in sets), progress)
    try:
        # Every tau first: a ratio that cannot be calibrated fails before any mode has run for hours.
        calibrated: dict[str, float] = {}
        for mode in order:
            if mode.target_ratio is not None:
                cfg = mode.config(k=k, w=w, temperature=temperature)
                bar.note(f"{mode.label}: calibrating tau for {mode.target_ratio:.0%} junctions (cached after the first run)")
                calibrated[mode.label] = tau = engine.calibrate_tau(cfg)
                bar.note(f"{mode.label}: tau = {tau:.3f}")
        if resumed is not None:
            configs = {m.label: m.config(k=k, w=w, temperature=temperature, p=0.0 if m.match else None)
                       for m in modes}
            taus = {m.label: calibrated.get(m.label, configs[m.label].tau) for m in modes}
            _check_resumed_steering(done, modes, sets, configs, taus)
            resumed.drop_unfinished_row()
        for mode in order:
            for pset in sets:
                p = None
                if mode.match is not None:
                    p = _matched_probability(totals[(mode.match, pset.name)].rows, by_label[mode.match].horizon)
                config = mode.config(k=k, w=w, temperature=temperature, p=p)
                bar.describe(f"{mode.label} on {pset.name}")
                acc = totals.setdefault((mode.label, pset.name), _Totals())
                for i, item in enumerate(pset.prompts):
                    row = done.get((mode.label, pset.name, i))
                    if row is not None:
                        acc.rows.append(row)
                        bar.update()
                        continue
                    row = run_prompt(engine, mode, config, item, set_name=pset.name, index=i,
                                     seed=prompt_seed(seed, pset.name, i), max_tokens=max_tokens, chat=chat)
                    row.drift = (float(drift.response_logprobs(row.prompt_ids, row.tokens).mean())
                                 if row.tokens else None)
                    judge.score(row)
                    acc.rows.append(row)
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
            acc = totals[(mode.label, pset.name)]
            entry = {"mode": mode.label, "family": mode.family, "gate": mode.gate, "bon": mode.bon,
                     "set": pset.name, "kind": pset.kind, **acc.summary()}
            if by_source:
                groups: dict[str, _Totals] = {}
                for r in acc.rows:
                    groups.setdefault(r.item.source or "", _Totals()).rows.append(r)
                entry["by_source"] = {src: g.summary() for src, g in sorted(groups.items())}
            results.append(entry)
    return results


# --------------------------------------------------------------------------- reporting
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    try:
        import llama_cpp

        from sia_edge import kernels

        info["llama_cpp_python"] = llama_cpp.__version__
        info["kernel_isa"] = kernels.active_isa()
    except (ImportError, AttributeError):
        pass
    return info


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """The summary as a plain-text table, one block per prompt set."""
    cols = [("mode", "mode", "s", 16), ("n", "n", "d", 4), ("reward", "mean_reward", "+.3f", 7),
            ("refusal", "refusal_rate", ".1%", 7), ("over-ref", "over_refusal_rate", ".1%", 8),
            ("interv.", "intervention_rate", ".1%", 7), ("V tok/tok", "value_tokens_per_token", ".2f", 9),
            ("ms/tok", "ms_per_token", ".1f", 7), ("drift", "drift", ".3f", 7), ("tokens", "mean_tokens", ".1f", 6)]
    out: list[str] = []
    for name in dict.fromkeys(r["set"] for r in results):
        rows = [r for r in results if r["set"] == name]
        out.append(f"{name} ({rows[0]['kind']}, {rows[0]['n']} prompts)")
        out.append("  ".join(h.rjust(wd) if i else h.ljust(wd) for i, (h, _, _, wd) in enumerate(cols)))
        for r in rows:
            cells = [_fmt(r[key], spec) for _, key, spec, _ in cols]
            widths = [wd for *_, wd in cols]
            out.append("  ".join(c.rjust(wd) if i else c.ljust(wd)
                                 for i, (c, wd) in enumerate(zip(cells, widths, strict=True))))
        out.append("")
    return "\n".join(out)


FAMILY_COLOURS = {"off": "#444444", "sparse": "#1f77b4", "full-entropy": "#17becf", "dense": "#d62728",
                  "random": "#ff7f0e", "bon": "#2ca02c", "sparse+bon": "#9467bd"}
SPARE_COLOURS = ["#8c564b", "#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a"]


def plot_summary(results: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, title: str = "") -> None:
    """Reward and refusal rate against intervention rate and against ms per token: one colour per
    mode family, one line style per prompt set (the paper's trade-off figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    sets = list(dict.fromkeys(r["set"] for r in results))
    families = list(dict.fromkeys(r["family"] for r in results))
    styles: list[Any] = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    spare = iter(SPARE_COLOURS * (1 + len(families) // len(SPARE_COLOURS)))
    colours = {f: FAMILY_COLOURS.get(f) or next(spare) for f in families}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    panels = [(0, 0, "intervention_rate", "mean_reward"), (0, 1, "ms_per_token", "mean_reward"),
              (1, 0, "intervention_rate", "refusal_rate"), (1, 1, "ms_per_token", "refusal_rate")]
    labels = {"intervention_rate": "intervention rate (junctions / token)", "ms_per_token": "ms per answer token",
              "mean_reward": "mean reward", "refusal_rate": "refusal rate"}
    for row, col, x, y in panels:
        ax = axes[row][col]
        for si, s in enumerate(sets):
            for f in families:
                pts = sorted((r[x], r[y], r["mode"]) for r in results
                             if r["set"] == s and r["family"] == f and r[x] is not None and r[y] is not None)
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=styles[si % len(styles)],
                        marker=markers[si % len(markers)], color=colours[f], markersize=5)
                if f in ("sparse", "random", "full-entropy") and len(pts) > 1:
                    for px, py, lab in pts:
                        ax.annotate(lab.split("@", 1)[-1], (px, py), fontsize=6, xytext=(3, 3),
                                    textcoords="offset points", color=colours[f])
        ax.set_xlabel(labels[x])
        ax.set_ylabel(labels[y])
        ax.grid(alpha=0.3)
        if y == "refusal_rate":
            ax.set_ylim(-0.03, 1.03)
    handles = [Line2D([], [], color=colours[f], marker="o", label=f) for f in families]
    handles += [Line2D([], [], color="black", linestyle=styles[i % len(styles)], marker=markers[i % len(markers)],
                       label=s) for i, s in enumerate(sets)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.suptitle(title or "sia-edge: quality against steering cost")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI
class _AddPromptFiles(argparse.Action):
    """--prompts / --harmful / --benign FILE...: one ordered list of (path, harmful flag)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        flag = {"--harmful": True, "--benign": False}.get(option_string or "")
        files = list(getattr(namespace, self.dest) or [])
        files.extend((v, flag) for v in values)
        setattr(namespace, self.dest, files)


EPILOG = f"""\
modes (comma list): {MODE_SYNTAX}
  sparse@0.8   entropy gate at tau 0.8 nats      sparse@30%      tau calibrated for 30% junctions
  random@0.2   steer with probability 0.2        random@sparse   probability = sparse's measured rate, per set
  bon@4        best of 4 unsteered samples by mean value V   sparse+bon@4   best of 4 steered samples

prompt files: .jsonl rows {{"prompt": ..., "harmful": true|false}} or one prompt per line; --harmful
and --benign FILE set the flag of rows that have none (plain-text files need them for the safety
reward). Example, the held-out sets:
  {PROG} --prompts data/prompts/harmful_heldout.jsonl data/prompts/benign_heldout.jsonl \\
      --modes off,sparse,sparse@30%,dense,random@sparse,bon@4,sparse+bon@4 \\
      --outputs runs/heldout.jsonl --json runs/heldout.json --plot runs/heldout.png

An interrupted run continues with the same command plus --resume: the answers already in --outputs
are kept (after a check that they were written with the same settings), the rest are generated.

Exit code 2 on a bad option, a missing or empty prompt file, a mode that does not parse, or a
missing model.
"""


def build_parser() -> CliParser:
    ap = CliParser(prog=PROG, description="Compare steering modes on prompt sets: reward, refusals, "
                   "intervention rate, cost and drift.", epilog=EPILOG,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("prompts")
    for opt, what in (("--prompts", "prompt files (.jsonl or text, one prompt per line)"),
                      ("--harmful", "prompt files whose prompts are harmful"),
                      ("--benign", "prompt files whose prompts are benign")):
        g.add_argument(opt, dest="files", nargs="+", action=_AddPromptFiles, metavar="FILE", help=what)
    g.add_argument("--limit", type=positive_int, metavar="N", help="use the first N prompts of each file")
    g.add_argument("--by-source", action="store_true", help="also summarise each row 'source' separately")
    g.add_argument("--prompt-style", choices=("auto", "chat", "text"), default="auto",
                   help="chat: each prompt is a user turn in the base model's chat template; text: it is "
                        "continued as plain text (base models); auto: chat if the model has a template "
                        "(default: %(default)s)")
    g = ap.add_argument_group("modes and sampling")
    g.add_argument("--modes", default=DEFAULT_MODES, help="comma list of modes (default: %(default)s)")
    g.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help="longest answer in tokens (default: %(default)s)")
    g.add_argument("--seed", type=seed_int, default=0, help="base seed; each prompt gets its own, the same in every mode "
                   "(default: %(default)s)")
    g.add_argument("--k", type=positive_int, default=10, help="candidates per step (default: %(default)s)")
    g.add_argument("--w", type=finite_float, default=None,
                   help="steering strength (default: the value model's recommendation, else 1.0)")
    g.add_argument("--temperature", type=finite_float, default=1.0, help="sampling temperature (default: %(default)s)")
    g.add_argument("--reward", default="safety", help="safety (built in, default) or a spec of "
                   "sia_edge.train.rewards.load_reward: module:function, file.py:function, jsonl:LABELS, hf:DIR")
    add_model_options(ap)
    g = ap.add_argument_group("output")
    g.add_argument("--outputs", metavar="FILE.jsonl", help="write every answer (prompt, set, mode, text, stats)")
    g.add_argument("--resume", action="store_true",
                   help="keep the answers already in --outputs (an interrupted run with the same settings) and "
                        "generate only the missing ones")
    g.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the summary as JSON to FILE (or stdout without FILE)")
    g.add_argument("--plot", metavar="FILE.png", help="plot reward and refusal rate against intervention rate "
                   "and ms per token")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _load_sets(files: Sequence[tuple[str, bool | None]], limit: int | None) -> list[PromptSet]:
    sets: list[PromptSet] = []
    used: Counter[str] = Counter()
    for path, flag in files:
        pset = load_prompt_set(path, harmful=flag, limit=limit)
        used[pset.name] += 1
        if used[pset.name] > 1:
            pset.name = f"{pset.name}-{used[pset.name]}"
        sets.append(pset)
    return sets


def _prepare_output(path: str | None, what: str) -> None:
    """Create the output's directory now, so a bad path fails before hours of generation."""
    if path is None or path == "-":
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise CliError(f"{what}: {p} is a directory; give a file name")
    if what == "--plot":
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if p.suffix.lower().lstrip(".") not in formats:
            raise CliError(f"--plot: {p.name} is not an image file name; end it with one of "
                           f"{', '.join('.' + f for f in sorted(formats))} (for example results.png)")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"{what}: cannot create the directory {p.parent} ({exc.strerror})") from None


def run_settings(engine: SteeringEngine, args: argparse.Namespace) -> dict[str, Any]:
    """What an answer and its timing depend on besides its mode, set, prompt and seed: written into
    every output row, so that ``--resume`` never mixes answers of different settings. Models are
    named by file name and sha256 (a retrained model has the same size: the tensors' shapes and
    types fix it); threads are here because ms/token pools over the resumed answers."""
    def model(m: Any) -> dict[str, Any] | None:
        return None if m is None else {"name": m.path.name, "sha256": file_sha256(m.path)}

    run = {"base_model": model(engine.base), "value_model": model(engine.value), "max_tokens": args.max_tokens,
           "k": args.k, "w": args.w, "temperature": args.temperature, "reward": args.reward,
           "n_ctx": engine.n_ctx, "threads": engine.n_threads}
    if args.prompt_style != "chat":  # absent means chat: the rows written before plain-text prompts
        run["prompt_style"] = args.prompt_style
    return run



def read_resumable(path: Path, sets: Sequence[PromptSet], modes: Sequence[EvalMode], *, seed: int,
                   run: dict[str, Any]) -> ResumedAnswers:
    """The answers an interrupted run wrote to ``path`` (``--resume``), checked against this run:
    the same settings, modes, sets, prompts (text, system prompt, harmful flag, source) and seeds,
    each answer once. Anything that does not fit is an error that says how it differs. The file is
    not changed here: a last line cut short by the interruption is only left out, and dropped from
    the file once ``evaluate`` has checked the steering too (``ResumedAnswers.drop_unfinished_row``)."""
    if not path.exists():
        return ResumedAnswers(path, {}, 0, 0)
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    tail, row_start = data[cut:], b'{"set": '  # how as_row's JSON begins
    if tail and not (tail.startswith(row_start) or row_start.startswith(tail)):  # not a row cut short
        raise CliError(f"{path} does not end in answers of {PROG}; give --outputs a new file, or drop --resume "
                       "to overwrite it")
    by_mode = {m.label: m for m in modes}
    by_set = {s.name: s for s in sets}
    rows: dict[tuple[str, str, int], RowResult] = {}
    new_file = "give --outputs a new file"
    # Split at "\n" only: answers are written raw (ensure_ascii=False) and may hold U+2028 and the like.
    for n, raw in enumerate(data[:cut].split(b"\n")[:-1], 1):
        line = raw.decode("utf-8", errors="replace")
        where = f"{path}: line {n}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = (str(row["mode"]), str(row["set"]), int(row["index"]))
            written = row.get("run")
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            raise CliError(f"{where} is not an answer of {PROG}; {new_file}, or drop --resume to overwrite "
                           "it") from None
        if not isinstance(written, dict):
            raise CliError(f"{where} does not record its settings (written before --resume existed, or not by "
                           f"{PROG}), so it cannot be checked against this run; {new_file}")
        changed = [k for k in sorted(set(run) | set(written)) if run.get(k) != written.get(k)]
        if changed:
            k = changed[0]
            raise CliError(f"{where} was written with {k} {json.dumps(written.get(k))}, this run has "
                           f"{json.dumps(run.get(k))}; resume with the same settings, or {new_file}")
        mode_label, set_name, index = key
        if mode_label not in by_mode:
            raise CliError(f"{where} answers mode {mode_label!r}, which is not in --modes; resume with the "
                           "same --modes")
        pset = by_set.get(set_name)
        if pset is None or not 0 <= index < len(pset.prompts):
            raise CliError(f"{where} answers prompt {index + 1} of set {set_name!r}, which this run does not "
                           "have; resume with the same prompt files and --limit")
        item = pset.prompts[index]
        differs = [what for what, old, now in (
            ("prompt", row.get("prompt"), item.prompt), ("system prompt", row.get("system"), item.system),
            ("harmful flag (--harmful / --benign)", row.get("harmful"), item.harmful),
            ("source", row.get("source"), item.source),
            ("seed (--seed)", row.get("seed"), prompt_seed(seed, set_name, index))) if old != now]
        if differs:
            raise CliError(f"{where}: set {set_name!r} prompt {index + 1} has a different {differs[0]} in this "
                           "run; resume with the same prompt files, flags and --seed")
        if key in rows:
            raise CliError(f"{where} answers mode {mode_label!r}, set {set_name!r}, prompt {index + 1} a second "
                           f"time: the file holds two runs; {new_file}")
        try:
            rows[key] = RowResult.from_row(row, item, entropy_gate=by_mode[mode_label].gate in
                                           ("entropy", "full-entropy"))
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            raise CliError(f"{where} lacks the verdicts or the stats of an answer (reward, refused, steps, "
                           f"stats); {new_file}") from None
    return ResumedAnswers(path, rows, cut, len(data))


def _check_prompts_fit(engine: SteeringEngine, sets: Sequence[PromptSet], *, chat: bool = True) -> None:
    """Every prompt fits the context: found before the run, not after hours of it."""
    for s in sets:
        for i, item in enumerate(s.prompts):
            try:
                n = len(engine.encode_prompt(item.messages() if chat else item.prompt))
            except ValueError as exc:  # ContextOverflowError: far too long to tokenise at all
                raise CliError(f"{s.path}: prompt {i + 1}: {exc}") from None
            if n >= engine.n_ctx:
                how = "with the chat template" if chat else "as plain text"
                raise CliError(f"{s.path}: prompt {i + 1} has {n} tokens {how}, but the context "
                               f"holds {engine.n_ctx}; shorten it, drop it, or raise --n-ctx")


def _iter_missing_harmful(sets: Sequence[PromptSet]) -> Iterator[str]:
    for s in sets:
        if any(p.harmful is None for p in s.prompts):
            yield str(s.path)


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.files:
        ap.error("give at least one prompt file: --prompts FILE (or --harmful FILE / --benign FILE)")
    modes = parse_modes(args.modes)
    sets = _load_sets(args.files, args.limit)
    if args.reward in ("safety", "builtin:safety"):
        unlabelled = list(_iter_missing_harmful(sets))
        if unlabelled:
            raise CliError(
                f"{unlabelled[0]}: the safety reward needs to know whether each prompt is harmful: give the "
                "JSONL rows a 'harmful' field, or pass the file with --harmful FILE or --benign FILE"
            )
    for path, what in ((args.outputs, "--outputs"), (args.json, "--json"), (args.plot, "--plot")):
        _prepare_output(path, what)
    if args.resume and args.outputs is None:
        raise CliError("--resume continues the answers of --outputs FILE: give the file the interrupted run wrote")
    if args.temperature < 0:
        raise CliError("--temperature must be >= 0 (0 = greedy)")
    from sia_edge.engine import DEFAULT_K_MAX, SteeringEngine

    if args.k > DEFAULT_K_MAX:  # as the chat and server allow; checked before hours of answers
        raise CliError(f"--k must be at most {DEFAULT_K_MAX}, got {args.k}")
    for m in modes:  # settings errors (k, w, tau ...) before any model loads
        try:
            m.config(k=args.k, w=1.0 if args.w is None else args.w, temperature=args.temperature, p=0.0)
        except ValueError as exc:
            raise CliError(f"mode {m.label}: {exc}") from None

    from sia_edge.cli_common import base_model_path, choose_value_model

    needs_value = any(m.needs_value_model for m in modes)
    base = base_model_path(args.model)
    choice = choose_value_model(args.value_model, base, needed=needs_value)
    if needs_value and choice.missing:  # an evaluation of steering cannot quietly run without it
        steering = [m.label for m in modes if m.needs_value_model]
        raise CliError(f"modes {', '.join(steering)} need a value model, but {choice.missing}; pass "
                       "--value-model PATH.gguf trained for this base model, or --modes off")
    engine = SteeringEngine(base, choice.path, n_ctx=args.n_ctx, n_threads=args.threads, k_max=DEFAULT_K_MAX)
    if args.prompt_style == "auto":
        args.prompt_style = "chat" if engine.base.chat_template else "text"
    elif args.prompt_style == "chat" and not engine.base.chat_template:
        raise CliError(f"{engine.base.path.name} has no chat template: use --prompt-style text")
    _check_prompts_fit(engine, sets, chat=args.prompt_style == "chat")
    if args.w is None:  # the strength the value model was evaluated with, as the chat uses it
        args.w = engine.value.meta.recommended_steering().get("w", 1.0) if engine.value is not None else 1.0
    progress = not args.no_progress
    if progress:
        print(f"base {engine.base.path.name}, value {engine.value.path.name if engine.value else '(none)'}; "
              f"{len(modes)} modes x {sum(len(s.prompts) for s in sets)} prompts", file=sys.stderr)
    outputs = Path(args.outputs).expanduser() if args.outputs else None
    run = run_settings(engine, args) if outputs else None  # hashes the models: only for rows to write
    resumed = None
    if args.resume:
        assert outputs is not None
        assert run is not None
        resumed = read_resumable(outputs, sets, modes, seed=args.seed, run=run)
        if progress:
            print(f"resuming: {len(resumed.rows)} answers already in {outputs}", file=sys.stderr)
    mode = "a" if args.resume else "w"
    opened = open(outputs, mode, encoding="utf-8") if outputs else contextlib.nullcontext(None)  # noqa: SIM115
    with opened as out:
        results = evaluate(
            engine, sets, modes, max_tokens=args.max_tokens, seed=args.seed, k=args.k, w=args.w,
            temperature=args.temperature, reward=args.reward, outputs=out, progress=progress,
            by_source=args.by_source, run=run, resumed=resumed, chat=args.prompt_style == "chat",
        )
    summary = {
        "command": [PROG, *(sys.argv[1:] if argv is None else argv)],
        "base_model": engine.base.path.name,
        "value_model": engine.value.path.name if engine.value else None,
        "settings": {"max_tokens": args.max_tokens, "seed": args.seed, "k": args.k, "w": args.w,
                     "temperature": args.temperature, "reward": args.reward, "limit": args.limit,
                     "n_ctx": engine.n_ctx, "threads": engine.n_threads},
        "machine": machine_info(),
        "resumed_answers": len(resumed.rows) if resumed else 0,  # answers of an interrupted run (--resume), timed in that run
        "sets": [{"name": s.name, "path": str(s.path), "kind": s.kind, "n": len(s.prompts)} for s in sets],
        "modes": [{"mode": m.label, "family": m.family, "gate": m.gate, "target_ratio": m.target_ratio,
                   "tau": m.tau if m.tau is not None or m.target_ratio is not None or m.gate not in
                   ("entropy", "full-entropy") else SteeringConfig().tau,
                   "p": m.p, "match": m.match, "bon": m.bon, "head": m.head, "follow": m.follow,
                   "horizon": m.horizon} for m in modes],
        "results": results,
    }
    text = json.dumps(summary, indent=1, ensure_ascii=False)
    table = format_table(results)
    if args.json == "-":
        print(text)
        print(table, file=sys.stderr)
    else:
        if args.json:
            Path(args.json).expanduser().write_text(text + "\n", encoding="utf-8")
        print(table)
    if args.plot:
        plot_summary(results, Path(args.plot).expanduser(),
                     title=f"{engine.base.path.name} steered by {summary['value_model']}, "
                           f"{args.max_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
