"""The decode engine: sparse junction steering on two KV-cached llama.cpp contexts.

One token's path (see docs/ARCHITECTURE.md):

    base decode -> logits (float32 view, no copy)
      -> kernels.junction_step: top-k, gate statistic, and plain top-k sampling if below the gate
      -> at a junction: ValueScorer.score (catch-up batch + k branch batch + head)
         -> kernels.steer_topk_inplace: z + w*V on the candidates, sample with the generation's RNG
      -> token -> TokenEvent to the caller

Nothing touches the logits after the steering step: no repetition penalty, no other sampler.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from typing_extensions import Self

from sia_edge import kernels
from sia_edge.chat_template import ChatTemplate
from sia_edge.files import atomic_output, commit_output
from sia_edge.gate import JunctionGate, steering_shift, tau_for_ratio
from sia_edge.grammar import Grammar, GrammarState
from sia_edge.llama_backend import (
    LlamaContext,
    LlamaError,
    LlamaModel,
    StreamDecoder,
    check_threads,
    default_threads,
)
from sia_edge.models import default_base_model, models_dir
from sia_edge.steering import MAX_SEED, SteeringConfig
from sia_edge.value_format import HEAD_SCALAR, KEY_VERSION, ValueFormatError, head_missing
from sia_edge.value_scorer import BaseStateScorer, ValueModel, ValueScorer

__all__ = [
    "Backend",
    "BestOfN",
    "Calibration",
    "ContextOverflowError",
    "EngineClosedError",
    "Generation",
    "GenerationStats",
    "LlamaCppBackend",
    "Sample",
    "SteeringEngine",
    "TokenEvent",
    "TokenIds",
    "TokenLogprobs",
    "TokenizerMismatchError",
]

Messages = Sequence[dict[str, str]]
DEFAULT_K_MAX = 32  # the most candidates a step may score: k_max branch cells per context


@dataclass(frozen=True)
class TokenIds:
    """A prompt given as token ids of the base model (no template, no BOS added)."""

    ids: Sequence[int]


class TokenizerMismatchError(ValueError):
    """Base and value model map token ids to different texts: values would be meaningless."""


class ContextOverflowError(ValueError):
    """The prompt does not fit in the context window."""


class EngineClosedError(RuntimeError):
    """The engine was closed: its models and contexts are freed."""


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token, as it is produced."""

    text: str  # the text this token completes (may be "" inside a multi-byte character)
    token_id: int
    junction: bool  # the value model steered this step
    entropy: float  # the top-k entropy, or the full one under the full-entropy gate
    candidates: tuple[int, ...] = ()  # top-k ids at a junction
    values: tuple[float, ...] = ()  # their normalised values V at a junction
    # probability steering moved at a junction (gate.steering_shift); under the shift gate, at every
    # step it scored, what steering moves or would have moved: that gate's statistic
    shift: float = 0.0
    logprobs: TokenLogprobs | None = None  # only when generate(..., logprobs=True)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """What a token was sampled from: the k candidates (best first by the base model), the log
    probability of each under the distribution actually sampled (steered at a junction, with
    temperature, top_p and min_p; -inf for a candidate it could not draw), and under the base
    model's own full-vocabulary softmax (unconstrained: a grammar's masking is not in it; a
    candidate the grammar forbade has -inf). ``chosen`` indexes the sampled token."""

    candidates: tuple[int, ...]
    sampled: tuple[float, ...]
    base: tuple[float, ...]
    chosen: int


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    tokens: int = 0
    junctions: int = 0
    value_tokens: int = 0  # tokens the value model decoded (catch-up + branches)
    prefill_ms: float = 0.0  # prompt decode (also counted in base_decode_ms)
    base_decode_ms: float = 0.0
    value_decode_ms: float = 0.0
    kernel_ms: float = 0.0
    grammar_ms: float = 0.0  # masking the logits to what a grammar allows (0 without one)
    total_ms: float = 0.0
    stop_reason: str = ""  # eos | length | context | cancelled | error
    tau: float = math.nan  # the threshold used (after target_ratio calibration)

    @property
    def steps(self) -> int:
        """Sampling decisions: the tokens, plus the end-of-generation token if one was sampled
        (a decision the gate saw and may have steered, though it adds no text)."""
        return self.tokens + (self.stop_reason == "eos")

    @property
    def intervention_rate(self) -> float:
        """Junctions per sampling decision (1.0 for dense steering, ending in EOS or not)."""
        return self.junctions / self.steps if self.steps else 0.0

    @property
    def ms_per_token(self) -> float:
        """Generation time per new token, excluding the prompt's prefill."""
        return (self.total_ms - self.prefill_ms) / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["intervention_rate"] = self.intervention_rate
        d["ms_per_token"] = self.ms_per_token
        return d


class Backend(Protocol):
    """Where the engine's models and contexts come from: llama.cpp (``LlamaCppBackend``), or a
    small numpy stand-in that lets the decode loop and the gates be tested without a model
    (tests/fake_backend.py). The objects only need what the engine calls on them."""

    def load_model(self, path: Path, *, what: str) -> LlamaModel: ...

    def new_context(self, model: LlamaModel, *, n_ctx: int, n_threads: int) -> LlamaContext: ...

    def load_value_model(self, path: Path, *, n_threads: int) -> ValueModel: ...


class LlamaCppBackend:
    """The real one: GGUF files in llama.cpp."""

    def load_model(self, path: Path, *, what: str) -> LlamaModel:
        return LlamaModel(path, what=what)

    def new_context(self, model: LlamaModel, *, n_ctx: int, n_threads: int) -> LlamaContext:
        return LlamaContext(model, n_ctx=n_ctx, n_threads=n_threads)

    def load_value_model(self, path: Path, *, n_threads: int) -> ValueModel:
        return ValueModel(path, n_threads=n_threads)


@dataclass
class _Slot:
    """A base context and a value scorer that one generation uses at a time."""

    base: LlamaContext
    scorer: ValueScorer | BaseStateScorer | None
    base_cached: list[int] = field(default_factory=list)

    @property
    def base_hidden(self) -> bool:
        """The value model reads the base model's hidden state: the base context outputs it."""
        return isinstance(self.scorer, BaseStateScorer)

    def close(self) -> None:
        self.base.close()
        if self.scorer is not None:
            self.scorer.close()


class SteeringEngine:
    """Loads a base model and (optionally) a value model once; makes ``Generation`` objects.

    Thread-safe: generations running in different threads each borrow their own contexts
    (weights are shared). ``value_model=None`` allows only the ``off`` gate.
    """

    def __init__(
        self,
        base_model: str | Path | None = None,
        value_model: str | Path | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        k_max: int = DEFAULT_K_MAX,
        backend: Backend | None = None,
    ) -> None:
        if not 16 <= n_ctx <= 1 << 20:
            raise ValueError(f"n_ctx must be between 16 and 1048576, got {n_ctx}")
        if not 1 <= k_max <= kernels.MAX_TOP_K:
            raise ValueError(f"k_max must be between 1 and {kernels.MAX_TOP_K}, got {k_max}")
        check_threads(n_threads)
        self.backend: Backend = backend or LlamaCppBackend()
        self.base = self.backend.load_model(Path(base_model) if base_model is not None else default_base_model(),
                                            what="base model")
        if self.base.meta(KEY_VERSION) is not None:  # a value GGUF would "chat" with a cut-down backbone
            raise ValueError(f"{self.base.path.name} is a value model (it carries a value head), not a base model: "
                             "pass it as the value model (--value-model) and a base model as --model")
        self.n_ctx = min(n_ctx, self.base.n_ctx_train) if self.base.n_ctx_train > 0 else n_ctx
        self.n_threads = n_threads or default_threads()
        self.k_max = k_max
        self.value: ValueModel | None = None
        if value_model is not None:
            self.value = self.backend.load_value_model(Path(value_model), n_threads=self.n_threads)
            self._check_tokenizers(self.value)
        # The engine owns every slot it creates (``_slots``), idle ones also in ``_pool``: a
        # generation only borrows one, so collecting a generation can never free its contexts.
        # Reentrant: a dropped generation's loop may be finalised by a garbage collection that
        # starts while this thread holds the lock, and it gives its slot back under the lock.
        self._slots: list[_Slot] = []
        self._pool: list[_Slot] = []
        self._pool_lock = threading.RLock()
        self._chat_template: ChatTemplate | None = None
        self._max_token_bytes: int | None = None
        self._closed = False
        self._tau_cache: dict[tuple[Any, ...], float] = {}
        self._statistics_cache: dict[tuple[Any, ...], list[float]] = {}  # _tau_keys' key without the ratio
        self._calibration_lock = threading.Lock()

    @classmethod
    def from_preset(cls, name: str | None = None, **kwargs: Any) -> SteeringEngine:
        """The engine of a preset (sia_edge/presets.py): its base model and its value model, the
        latter built from its assets on first use. ``kwargs``: n_ctx, n_threads, k_max."""
        from sia_edge.presets import DEFAULT_PRESET, get_preset

        preset = get_preset(name or DEFAULT_PRESET)
        return cls(preset.base_model(), preset.value_model(), **kwargs)

    def recommended(self, *, gate: str | None = None, **given: Any) -> SteeringConfig:
        """The steering the value model recommends (the settings it was evaluated with, stored
        in its GGUF), with ``given`` settings winning: what the chat and the server use by
        default (``SteeringConfig.recommended``). Without a value model: ``off``."""
        if self.value is None:
            return SteeringConfig(gate="off", **{k: v for k, v in given.items() if k in ("k", "temperature")})
        return SteeringConfig.recommended(self.value.meta.recommended_steering(), gate=gate, **given)

    # ----------------------------------------------------------------- setup checks
    def _check_tokenizers(self, value: ValueModel) -> None:
        base_fp = self.base.fingerprint
        if value.model is None:  # it reads the base's hidden state: its head must fit the base
            cand = value.candidate
            assert cand is not None
            if value.meta.tokenizer_fingerprint != base_fp:
                raise TokenizerMismatchError(
                    f"tokenizers differ: base model {self.base.path.name} (fingerprint {base_fp}) and value model "
                    f"{value.path.name} (fingerprint {value.meta.tokenizer_fingerprint}); its head reads the "
                    "base model it was trained on")
            cand.check_shapes(self.base.n_embd, self.base.n_vocab, value.path)
            if value.weight.size != self.base.n_embd:
                raise ValueFormatError(f"{value.path}: its V(s) head has {value.weight.size} weights, the base model "
                                       f"{self.base.path.name} is {self.base.n_embd} wide; it was trained on another base")
            return
        value_fp = value.model.fingerprint
        if base_fp != value_fp:
            raise TokenizerMismatchError(
                f"tokenizers differ: base model {self.base.path.name} ({self.base.n_vocab} tokens, "
                f"fingerprint {base_fp}) and value model {value.path.name} ({value.model.n_vocab} tokens, "
                f"fingerprint {value_fp}); train the value model from a backbone with the base model's tokenizer"
            )

    # ----------------------------------------------------------------- prompts
    def chat_prompt(self, messages: Messages) -> list[int]:
        """Token ids of ``messages`` in the base model's own chat template, ready to generate.
        Message content is text: only the template writes special tokens (``chat_template``)."""
        if self._chat_template is None:
            self._chat_template = ChatTemplate(self.base)
        with self.base.hold():
            return self._chat_template.tokenize(messages)

    def encode_prompt(self, prompt: str | Messages | TokenIds) -> list[int]:
        """Plain text (tokenised with BOS), chat messages (the model's template), or token ids
        (used as they are, checked against the vocabulary). A text far too long for the context
        is refused before it is tokenised (``ContextOverflowError``)."""
        if self._closed:
            raise EngineClosedError("the engine is closed; create a new SteeringEngine")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("the prompt is empty")
            self._check_text_size(len(prompt.encode("utf-8", "surrogatepass")))
            with self.base.hold():
                return self.base.tokenize(prompt, add_special=True, parse_special=False)
        if isinstance(prompt, TokenIds):
            ids = [int(t) for t in prompt.ids]
            if not ids:
                raise ValueError("the prompt is empty")
            bad = [t for t in ids if not 0 <= t < self.base.n_vocab]
            if bad:
                raise ValueError(f"token ids outside the vocabulary [0, {self.base.n_vocab}): {bad[:5]}")
            return ids
        self._check_text_size(sum(len(str(m.get("content", "")).encode("utf-8", "surrogatepass"))
                                  for m in prompt if isinstance(m, dict)))
        return self.chat_prompt(prompt)

    def _check_text_size(self, n_bytes: int) -> None:
        """Refuse, without tokenising it, a text that cannot fit: no token stands for more bytes
        than the longest token text, so at least n_bytes / that many tokens would be needed (with
        a margin of 4 for normalisers that shorten text before tokenising, as NFKC can)."""
        if n_bytes <= self.n_ctx:  # fits whatever the vocabulary: skip computing the bound
            return
        if self._max_token_bytes is None:
            self._max_token_bytes = 4 * self.base.max_token_bytes
        if n_bytes > self.n_ctx * self._max_token_bytes:
            raise ContextOverflowError(
                f"the prompt has {n_bytes} bytes, far more than the {self.n_ctx} tokens the context holds; "
                "shorten it or raise n_ctx"
            )

    def top_candidates(self, prompt: str | Messages | TokenIds, k: int = 10) -> list[int]:
        """The base model's k most likely next tokens after ``prompt`` (sorted, ties by id)."""
        ids = self.encode_prompt(prompt)
        if len(ids) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx}")
        slot = self._acquire()
        try:
            slot.base.clear()
            slot.base_cached = []
            slot.base.set_embeddings(False)  # logits only (a slot may have last served a base-state head)
            slot.base.decode(ids, 0)
            topk = kernels.TopK(k)
            kernels.junction_stats(slot.base.logits(-1), topk)
            return [int(t) for t in topk.ids]
        finally:
            slot.base.clear()
            self._release(slot)

    # ----------------------------------------------------------------- generation
    def generate(
        self,
        prompt: str | Messages | TokenIds,
        *,
        max_tokens: int = 256,
        config: SteeringConfig | None = None,
        seed: int = 0,
        logprobs: bool = False,
        grammar: Grammar | None = None,
    ) -> Generation:
        """Start a generation; iterate the result for ``TokenEvent``s. ``prompt`` is plain text
        (completion) or a list of chat messages (the model's chat template is applied). Without
        ``config``, the value model's recommendation (``recommended()``), as the chat uses it.
        ``logprobs``: each event carries what its token was sampled from (``TokenLogprobs``).
        ``grammar``: only text it allows is generated (``sia_edge.grammar``: the tokens it forbids
        are masked before the gate and the value model see the step); ValueError if it does not
        parse."""
        config = config or self.recommended()
        if self._closed:
            raise EngineClosedError("the engine is closed; create a new SteeringEngine")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be a whole number from 0 to 2**64 - 1, got {seed!r}")
        if config.k > min(self.k_max, self.base.n_vocab):
            raise ValueError(f"k = {config.k} exceeds the engine's k_max {self.k_max} or the vocabulary")
        if config.steers and self.value is None:
            raise ValueError(f"gate {config.gate!r} needs a value model; load one or use gate 'off'")
        if config.steers:
            assert self.value is not None
            if config.value_head not in self.value.heads:
                raise ValueError(head_missing(self.value.name, config.value_head, self.value.heads))
        if config.target_ratio is not None:
            config = config.with_tau(self.calibrate_tau(config))
        tokens = self.encode_prompt(prompt)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}; shorten it or "
                "raise n_ctx"
            )
        constraint = grammar.start(self.base, config.k) if grammar is not None else None
        return Generation(self, tokens, max_tokens=max_tokens, config=config, seed=seed, logprobs=logprobs,
                          grammar=constraint)

    def complete(self, prompt: str | Messages | TokenIds, **kwargs: Any) -> tuple[str, GenerationStats]:
        """Run a generation to the end and return its text and stats."""
        gen = self.generate(prompt, **kwargs)
        with gen:
            for _ in gen:
                pass
        return gen.text, gen.stats

    def _acquire(self) -> _Slot:
        with self._pool_lock:
            if self._closed:
                raise EngineClosedError("the engine is closed; create a new SteeringEngine")
            if self._pool:
                return self._pool.pop()
        base = self.backend.new_context(self.base, n_ctx=self.n_ctx, n_threads=self.n_threads)
        scorer = None
        try:
            if self.value is not None:
                scorer = self.value.new_scorer(n_ctx=self.n_ctx, k_max=self.k_max, n_threads=self.n_threads,
                                               base=base)
        except BaseException:
            base.close()
            raise
        slot = _Slot(base=base, scorer=scorer)
        with self._pool_lock:
            self._slots.append(slot)
        return slot

    def _release(self, slot: _Slot) -> None:
        with self._pool_lock:
            if not self._closed:
                self._pool.append(slot)
                return
            self._slots.remove(slot)
        slot.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Free the contexts and models (idempotent). Generations still running finish first and
        free theirs when they end; starting a new one raises ``EngineClosedError``."""
        with self._pool_lock:
            if self._closed:
                return
            self._closed = True
            idle, self._pool = self._pool, []
            for slot in idle:
                self._slots.remove(slot)
        for slot in idle:
            slot.close()
        self.base.close()  # deferred by llama_backend until running generations' contexts are freed
        if self.value is not None:
            self.value.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- tau calibration
    CALIBRATION_PROMPTS = (
        "Write a short story about a lighthouse keeper.",
        "Explain how vaccines train the immune system.",
        "Give me three tips for learning a new language.",
        "What is the difference between weather and climate?",
        "Write a polite email declining a meeting invitation.",
        "How do I make a simple tomato sauce?",
        "Summarise the causes of the French Revolution.",
        "Describe a good morning routine for a student.",
    )
    CALIBRATION_PREFIXES = (
        "The lighthouse keeper climbed the stairs and",
        "Vaccines train the immune system by",
        "The best way to learn a new language is",
        "Weather and climate differ because",
        "Thank you for the invitation to the meeting, but",
        "To make a simple tomato sauce, first",
        "The French Revolution began when",
        "Every morning before class, the student",
    )

    def gate_statistics(
        self, prompts: Sequence[str | Messages] | None = None, *, config: SteeringConfig | None = None,
        max_tokens: int = 96, seed: int = 0,
    ) -> list[float]:
        """The gate statistic at every step of unsteered runs of the base model (``off``; for the
        shift gate, scored but never steered); the first ``config.head`` steps of each run are
        +inf (junctions whatever tau is). Without
        ``prompts``: the calibration requests as chat turns, or, for a base model without a chat
        template, the calibration prefixes continued as text."""
        cfg = config or SteeringConfig()
        off = SteeringConfig(gate="off", k=cfg.k, temperature=cfg.temperature)
        score_only = cfg.kind.statistic == "shift"
        if score_only:  # its statistic needs the candidates scored: its gate, told to steer none
            off = SteeringConfig(gate=cfg.gate, tau=1.0, k=cfg.k, w=cfg.w, temperature=cfg.temperature,
                                 value_head=cfg.value_head)
        on_full = cfg.gate == "full-entropy"
        stats: list[float] = []
        if prompts is None:
            prompts = ([[{"role": "user", "content": q}] for q in self.CALIBRATION_PROMPTS] if self.base.chat_template
                       else list(self.CALIBRATION_PREFIXES))
        for i, p in enumerate(prompts):
            gen = self.generate(p, max_tokens=max_tokens, config=off, seed=seed + i)
            gen._state.score_only = score_only
            with gen:
                run = [ev.shift if score_only else ev.entropy for ev in gen]
            if on_full:
                run = list(gen.full_entropies[: len(run)])
            run[: cfg.head] = [math.inf] * min(cfg.head, len(run))
            stats.extend(run)
        return stats

    def _tau_keys(self, config: SteeringConfig, on: Calibration | None = None) -> tuple[tuple[Any, ...], str]:
        assert config.target_ratio is not None
        key: tuple[Any, ...] = (config.gate, config.k, config.temperature, config.target_ratio, config.head)
        if on is not None:  # the built-in prompts' key is as it always was: caches stay valid
            key += (on.digest, on.max_tokens)
        if config.kind.statistic == "shift":  # its statistic is the value model's too, and w's
            if self.value is None:
                raise ValueError("mode shift scores candidates with the value model: load one to calibrate it")
            key += (config.w, config.value_head, self.value.identity)
        return key, f"{self.base.fingerprint}|{self.base.path.name}|{key}"

    def cached_tau(self, config: SteeringConfig, on: Calibration | None = None) -> float | None:
        """The tau for ``config.target_ratio`` if it is already known (in memory or in the cache
        file in models/), else None: ``calibrate_tau`` would then measure it, which takes seconds."""
        key, disk_key = self._tau_keys(config, on)
        if key in self._tau_cache:
            return self._tau_cache[key]
        stored = _read_tau_file(models_dir() / "tau-calibration.json").get(disk_key)
        if isinstance(stored, (int, float)) and math.isfinite(stored):
            self._tau_cache[key] = float(stored)
            return self._tau_cache[key]
        return None

    def calibrate_tau(self, config: SteeringConfig, on: Calibration | None = None) -> float:
        """tau giving ``config.target_ratio`` junctions on unsteered runs; cached per model. A
        ``horizon`` plays no part: it only ends steering, with the tau the ratio gives whole answers.
        ``on``: calibrate on these prompts (a task's own) instead of the built-in ones."""
        key, disk_key = self._tau_keys(config, on)
        if key in self._tau_cache:
            return self._tau_cache[key]
        # One calibration at a time: concurrent requests for the same uncached ratio wait for the
        # first one's answer instead of each running the unsteered calibration generations.
        with self._calibration_lock:
            cached = self.cached_tau(config, on)
            if cached is not None:
                return cached
            assert config.target_ratio is not None
            # one set of unsteered runs serves every ratio of the same gate (eval calibrates several)
            stats_key = key[:3] + key[4:]
            stats = self._statistics_cache.get(stats_key)
            if stats is None:
                stats = (self.gate_statistics(config=config) if on is None else
                         self.gate_statistics(list(on.prompts), config=config, max_tokens=on.max_tokens))
                self._statistics_cache[stats_key] = stats
            tau = tau_for_ratio(stats, config.target_ratio)
            self._tau_cache[key] = tau
            _store_tau(models_dir() / "tau-calibration.json", disk_key, tau)
            return tau

    # ----------------------------------------------------------------- best-of-N
    def best_of_n(
        self,
        prompt: str | Messages,
        n: int,
        *,
        max_tokens: int = 256,
        config: SteeringConfig | None = None,
        seed: int = 0,
        reward: Callable[[str, str], float] | None = None,
    ) -> tuple[str, list[tuple[str, float, GenerationStats]]]:
        """N samples (steered per ``config``), the best chosen by ``reward(prompt_text, response)``
        or, without one, by the value model's mean V over the response tokens (what it was trained
        to predict). Returns (best text, [(text, score, stats)] for all N); ``sample_best_of_n``
        returns the token ids too."""
        result = self.sample_best_of_n(prompt, n, max_tokens=max_tokens, config=config, seed=seed, reward=reward)
        return result.best.text, [(s.text, s.score, s.stats) for s in result.samples]

    def sample_best_of_n(
        self,
        prompt: str | Messages,
        n: int,
        *,
        max_tokens: int = 256,
        config: SteeringConfig | None = None,
        seed: int = 0,
        reward: Callable[[str, str], float] | None = None,
    ) -> BestOfN:
        """Best-of-N, the one implementation: N samples seeded ``seed + i``, each scored, the
        first of the best wins (``best_of_n`` for the arguments)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if reward is None and self.value is None:
            raise ValueError("best-of-N needs a reward function or a value model to rank the samples")
        if reward is None and self.value is not None and HEAD_SCALAR not in self.value.heads:
            raise ValueError(f"best-of-N ranks samples by the scalar head's V at every position: "
                             f"{head_missing(self.value.name, HEAD_SCALAR, self.value.heads)}, or pass a reward function")
        prompt_ids = self.encode_prompt(prompt)
        prompt_text = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))
        samples = []
        ranking_tokens = 0
        for i in range(n):
            gen = self.generate(prompt, max_tokens=max_tokens, config=config, seed=(seed + i) & MAX_SEED)
            with gen:
                for _ in gen:
                    pass
            tokens = list(gen.tokens)
            if reward is not None:
                score = float(reward(prompt_text, gen.text))
            elif tokens:
                assert self.value is not None
                v = self.value.values_at_positions(prompt_ids + tokens, n_threads=self.n_threads)
                ranking_tokens += len(prompt_ids) + len(tokens)
                score = float(v[len(prompt_ids):].mean())
            else:
                score = -math.inf
            samples.append(Sample(gen.text, list(gen.prompt_tokens), tokens, score, gen.stats))
        best = max(range(n), key=lambda j: samples[j].score)  # the first of equals
        return BestOfN(samples, best, ranking_tokens)


@dataclass(frozen=True)
class Sample:
    """One sample of a Best-of-N."""

    text: str
    prompt_tokens: list[int]
    tokens: list[int]
    score: float
    stats: GenerationStats


@dataclass(frozen=True)
class BestOfN:
    """All N samples, which one won, and the value-model tokens spent ranking them."""

    samples: list[Sample]
    chosen: int
    ranking_value_tokens: int

    @property
    def best(self) -> Sample:
        return self.samples[self.chosen]


@dataclass(frozen=True)
class Calibration:
    """Prompts to calibrate a target ratio on, instead of the built-in ones: a task's own (its
    training prompts), so that a ratio means that share of *its* tokens. Each is continued for
    ``max_tokens`` unsteered. ``digest`` names them in the tau cache."""

    prompts: tuple[str | Messages, ...]
    max_tokens: int = 96

    @property
    def digest(self) -> str:
        text = json.dumps([p if isinstance(p, str) else list(p) for p in self.prompts], sort_keys=True)
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


_TAU_FILE_LOCK = threading.Lock()  # engines of one process share the file's read-modify-write


def _read_tau_file(path: Path) -> dict[str, Any]:
    """The tau cache, or {} if it is missing or unreadable (it is only a cache: recalibrating is safe)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_tau(path: Path, key: str, tau: float) -> None:
    """Add one entry; the file is replaced atomically (a unique temporary file, then a rename), so
    a reader never sees half of it. Failing to write only costs a recalibration next time."""
    with _TAU_FILE_LOCK:
        data = _read_tau_file(path)
        data[key] = tau
        with contextlib.suppress(OSError):
            tmp = atomic_output(path)
            try:
                tmp.write_text(json.dumps(data, indent=1))
                commit_output(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)


class Generation:
    """A running generation: iterate it for ``TokenEvent``s; ``cancel()`` from any thread.

    Its contexts return to the engine's pool when it ends, when ``close()`` is called, or when
    it is dropped half-way (the loop holds no reference back to this object, so dropping it
    ends the loop at once). ``with gen:`` makes the moment explicit. One thread iterates it at a
    time; another thread's ``close()`` cancels it.
    """

    def __init__(self, engine: SteeringEngine, prompt_tokens: list[int], *, max_tokens: int,
                 config: SteeringConfig, seed: int, logprobs: bool = False,
                 grammar: GrammarState | None = None) -> None:
        self.engine = engine
        self._state = _RunState(prompt_tokens, max_tokens, config, seed,
                                GenerationStats(prompt_tokens=len(prompt_tokens), tau=config.tau), logprobs=logprobs,
                                grammar=grammar)
        self._iter: Generator[TokenEvent, None, None] | None = None
        self._closed_before_start = False
        self._busy = threading.Lock()  # held while a thread is inside next()

    # What the loop writes, readable while it runs and after it ends.
    @property
    def config(self) -> SteeringConfig:
        return self._state.config

    @property
    def seed(self) -> int:
        return self._state.seed

    @property
    def prompt_tokens(self) -> list[int]:
        return self._state.prompt_tokens

    @property
    def max_tokens(self) -> int:
        return self._state.max_tokens

    @property
    def tokens(self) -> list[int]:
        return self._state.tokens

    @property
    def stats(self) -> GenerationStats:
        return self._state.stats

    @property
    def full_entropies(self) -> list[float]:
        return self._state.full_entropies

    @property
    def text(self) -> str:
        return "".join(self._state.text)

    def cancel(self) -> None:
        """Stop after the current token (thread-safe)."""
        self._state.cancel.set()

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> TokenEvent:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this generation is already being iterated in another thread; iterate it "
                               "from one thread (cancel() is the call that is safe from any thread)")
        try:
            if self._iter is None:
                if self._closed_before_start:
                    raise StopIteration
                self._iter = _run(self.engine, self._state)
            return next(self._iter)
        finally:
            self._busy.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the generation and give its contexts back (idempotent). From a thread other than
        the one iterating, it cancels: the loop ends after the current token."""
        if self._iter is None:  # never started: it never will (a worker may be about to start it)
            self._closed_before_start = True
            self._state.stats.stop_reason = self._state.stats.stop_reason or "cancelled"
            if self._state.grammar is not None:
                self._state.grammar.close()
            return
        if not self._busy.acquire(blocking=False):
            self.cancel()
            return
        try:
            self._iter.close()  # runs the loop's finally: the slot goes back to the pool
        finally:
            self._busy.release()


@dataclass
class _RunState:
    """One generation's settings and what its loop has produced (shared by ``Generation`` and
    the loop, which must not reference the ``Generation`` itself: see its docstring)."""

    prompt_tokens: list[int]
    max_tokens: int
    config: SteeringConfig
    seed: int
    stats: GenerationStats
    tokens: list[int] = field(default_factory=list)
    full_entropies: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    logprobs: bool = False  # report each token's TokenLogprobs
    grammar: GrammarState | None = None  # masks each step's logits to what the grammar allows (owned)
    score_only: bool = False  # the shift gate scores every step and steers none (its calibration)


def _prefill(slot: _Slot, prompt: list[int], *, hidden: bool) -> None:
    """Decode the prompt, reusing the slot's cached prefix (multi-turn chat). The last prompt
    token is always decoded alone: llama.cpp's quantised matmuls round a one-token batch
    differently from a row of a longer one, so computing it in the prompt's batch on a fresh
    cache but alone on a reused one gave the same seed different answers. ``hidden``: a
    base-state value head steers this generation, so from the last prompt token on (one token a
    decode) the base context puts out each token's hidden state with its logits."""
    ctx, cached = slot.base, slot.base_cached
    ctx.set_embeddings(False)  # no outputs for the prompt's body: in embeddings mode every row is one
    ctx.decode_from_prefix(cached, prompt[:-1], min_new=0, output_last=False)
    ctx.set_embeddings(hidden)
    ctx.decode([prompt[-1]], len(prompt) - 1)
    cached.append(prompt[-1])


def _token_logprobs(topk: kernels.TopK, probs: np.ndarray, full_lse: float, chosen: int) -> TokenLogprobs:
    with np.errstate(divide="ignore"):  # a candidate top_p or min_p cut has probability 0: -inf
        sampled = np.log(probs)
    base = topk.logits.astype(np.float64) - full_lse
    return TokenLogprobs(tuple(int(i) for i in topk.ids), tuple(float(x) for x in sampled),
                         tuple(float(x) for x in base), int(chosen))


def _run(eng: SteeringEngine, state: _RunState) -> Generator[TokenEvent, None, None]:
    """The decode loop of one generation (docs/ARCHITECTURE.md, "One token, end to end")."""
    cfg, st = state.config, state.stats
    grammar = state.grammar
    slot = eng._acquire()
    base, scorer = slot.base, slot.scorer
    if scorer is not None and cfg.steers:
        scorer.use_head(cfg.value_head)
    gate = JunctionGate(cfg, state.seed)
    rng = kernels.Rng(state.seed)
    topk = kernels.TopK(cfg.k)
    # the distribution each token is sampled from, written by the sampling kernels when asked for
    probs = np.empty(cfg.k, dtype=np.float64) if state.logprobs else None
    decoder = StreamDecoder(eng.base)
    sequence = list(state.prompt_tokens)
    value_tokens0 = scorer.tokens_decoded if scorer else 0
    value_s0 = scorer.decode_seconds if scorer else 0.0
    perf = time.perf_counter
    t_start = perf()
    try:
        t0 = perf()
        _prefill(slot, state.prompt_tokens, hidden=slot.base_hidden and cfg.steers)
        n_decoded = len(sequence)  # tokens of `sequence` in the base KV cache
        st.prefill_ms = (perf() - t0) * 1e3
        st.base_decode_ms += st.prefill_ms
        while True:
            if state.cancel.is_set():
                st.stop_reason = "cancelled"
                break
            if st.tokens >= state.max_tokens:
                st.stop_reason = "length"
                break
            if len(sequence) >= eng.n_ctx:
                st.stop_reason = "context"
                break
            logits = base.logits(-1)
            base_lse = None
            if grammar is not None:
                t0 = perf()
                if probs is not None:  # the base model's own normaliser, before the grammar masks
                    top = float(logits.max())
                    base_lse = top + math.log(float(np.exp(logits - top).sum()))
                grammar.mask(logits)
                st.grammar_ms += (perf() - t0) * 1e3
            threshold = gate.threshold()
            # the shift gate decides after scoring: the native step only ranks the candidates then
            scored = gate.on_shift and threshold < math.inf
            t0 = perf()
            chosen, js = kernels.junction_step(
                logits, topk, threshold=-math.inf if scored else threshold,
                gate_on_full_entropy=gate.on_full_entropy, temperature=cfg.temperature, rng=rng, top_p=cfg.top_p,
                min_p=cfg.min_p, probs_out=probs,
            )
            t_kernel = perf() - t0
            junction = chosen < 0
            stat = js.full_entropy if gate.on_full_entropy else js.topk_entropy
            values: tuple[float, ...] = ()
            shift = 0.0
            if junction:
                assert scorer is not None
                v = scorer.score(sequence, topk.ids)
                # numpy on k values: outside kernel_ms, which times the native steps
                shift = steering_shift(topk.logits, v, cfg.w, cfg.temperature)  # topk.logits: the base's
                if scored:
                    junction = shift >= threshold and not state.score_only
                t0 = perf()
                chosen = kernels.steer_topk_inplace(  # values None: plain top-k sampling, as junction_step's
                    logits, topk, v if junction else None, w=cfg.w, temperature=cfg.temperature, rng=rng,
                    probs_out=probs, top_p=cfg.top_p, min_p=cfg.min_p,
                )
                t_kernel += perf() - t0
                scorer.commit(chosen)
                if junction:
                    gate.steered(shift)
                    st.junctions += 1
                    values = tuple(float(x) for x in v)
            st.kernel_ms += t_kernel * 1e3
            token = int(topk.ids[chosen])
            state.full_entropies.append(js.full_entropy)
            if eng.base.is_eog(token):
                st.stop_reason = "eos"
                break
            if grammar is not None:
                grammar.accept(token)
            sequence.append(token)
            state.tokens.append(token)
            st.tokens += 1
            piece = decoder.push(token)
            state.text.append(piece)
            yield TokenEvent(piece, token, junction, stat,
                             tuple(int(i) for i in topk.ids) if junction else (), values, shift,
                             None if probs is None else _token_logprobs(
                                 topk, probs, js.full_lse if base_lse is None else base_lse, chosen))
            if len(sequence) >= eng.n_ctx:
                continue  # the loop head reports "context" without decoding past the window
            t0 = perf()
            base.decode([token], len(sequence) - 1)
            n_decoded = len(sequence)
            st.base_decode_ms += (perf() - t0) * 1e3
        tail = decoder.flush()
        if tail:
            state.text.append(tail)
        slot.base_cached = sequence[:n_decoded]
    except BaseException as exc:
        # GeneratorExit: closed, or dropped half-way, by its owner
        st.stop_reason = st.stop_reason or ("cancelled" if isinstance(exc, GeneratorExit) else "error")
        slot.base_cached = []
        # LlamaError: the contexts were freed already, when this generation was garbage-collected
        # together with its engine (their finalisers run before a generator's cleanup)
        with contextlib.suppress(LlamaError):
            base.clear()
            if scorer is not None:
                scorer.reset()
        raise
    finally:
        if grammar is not None:
            grammar.close()
        st.total_ms = (perf() - t_start) * 1e3
        if scorer is not None:
            st.value_tokens = scorer.tokens_decoded - value_tokens0
            st.value_decode_ms = (scorer.decode_seconds - value_s0) * 1e3
        eng._release(slot)
