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
import json
import math
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from typing_extensions import Self

from sia_edge import kernels
from sia_edge.gate import MAX_SEED, JunctionGate, SteeringConfig, steering_shift, tau_for_ratio
from sia_edge.llama_backend import LlamaContext, LlamaModel, StreamDecoder, check_threads, default_threads
from sia_edge.models import default_base_model, models_dir
from sia_edge.value_format import KEY_VERSION, atomic_output, commit_output
from sia_edge.value_scorer import ValueModel, ValueScorer

__all__ = [
    "ContextOverflowError",
    "Generation",
    "GenerationStats",
    "SteeringEngine",
    "TokenEvent",
    "TokenIds",
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


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token, as it is produced."""

    text: str  # the text this token completes (may be "" inside a multi-byte character)
    token_id: int
    junction: bool  # the value model steered this step
    entropy: float  # the gate statistic (top-k or full entropy, per the gate)
    candidates: tuple[int, ...] = ()  # top-k ids at a junction
    values: tuple[float, ...] = ()  # their normalised values V at a junction
    shift: float = 0.0  # probability mass steering moved at a junction (gate.steering_shift)


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


@dataclass
class _Slot:
    """A base context and a value scorer that one generation uses at a time."""

    base: LlamaContext
    scorer: ValueScorer | None
    base_cached: list[int] = field(default_factory=list)


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
    ) -> None:
        if not 16 <= n_ctx <= 1 << 20:
            raise ValueError(f"n_ctx must be between 16 and 1048576, got {n_ctx}")
        if not 1 <= k_max <= kernels.MAX_TOP_K:
            raise ValueError(f"k_max must be between 1 and {kernels.MAX_TOP_K}, got {k_max}")
        check_threads(n_threads)
        self.base = LlamaModel(base_model if base_model is not None else default_base_model(), what="base model")
        if self.base.meta(KEY_VERSION) is not None:  # a value GGUF would "chat" with a cut-down backbone
            raise ValueError(f"{self.base.path.name} is a value model (it carries a value head), not a base model: "
                             "pass it as the value model (--value-model) and a base model as --model")
        self.n_ctx = min(n_ctx, self.base.n_ctx_train) if self.base.n_ctx_train > 0 else n_ctx
        self.n_threads = n_threads or default_threads()
        self.k_max = k_max
        self.value: ValueModel | None = None
        if value_model is not None:
            self.value = ValueModel(value_model, n_threads=self.n_threads)
            self._check_tokenizers(self.value)
        self._pool: list[_Slot] = []
        self._pool_lock = threading.Lock()
        self._tau_cache: dict[tuple[str, int, float, float, int], float] = {}
        self._calibration_lock = threading.Lock()

    # ----------------------------------------------------------------- setup checks
    def _check_tokenizers(self, value: ValueModel) -> None:
        base_fp, value_fp = self.base.fingerprint, value.model.fingerprint
        if base_fp != value_fp:
            raise TokenizerMismatchError(
                f"tokenizers differ: base model {self.base.path.name} ({self.base.n_vocab} tokens, "
                f"fingerprint {base_fp}) and value model {value.path.name} ({value.model.n_vocab} tokens, "
                f"fingerprint {value_fp}); train the value model from a backbone with the base model's tokenizer"
            )

    # ----------------------------------------------------------------- prompts
    def chat_prompt(self, messages: Messages) -> list[int]:
        """Token ids of ``messages`` in the base model's own chat template, ready to generate."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.base.chat_template
        if not template:
            raise ValueError(f"{self.base.path.name} has no chat template: pass a plain prompt instead")
        if not messages:
            raise ValueError("messages is empty")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each message needs 'role' and 'content', got {m!r}")
        bos = self.base.token_text(int(_bos(self.base))) if _bos(self.base) >= 0 else ""
        eos = self.base.token_text(int(_eos(self.base))) if _eos(self.base) >= 0 else ""
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
        text = formatter(messages=list(messages)).prompt  # type: ignore[arg-type]
        # The template may already write BOS; llama.cpp would add a second one.
        return self.base.tokenize(text, add_special=not (bos and text.startswith(bos)), parse_special=True)

    def encode_prompt(self, prompt: str | Messages | TokenIds) -> list[int]:
        """Plain text (tokenised with BOS), chat messages (the model's template), or token ids
        (used as they are, checked against the vocabulary)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("the prompt is empty")
            return self.base.tokenize(prompt, add_special=True, parse_special=False)
        if isinstance(prompt, TokenIds):
            ids = [int(t) for t in prompt.ids]
            if not ids:
                raise ValueError("the prompt is empty")
            bad = [t for t in ids if not 0 <= t < self.base.n_vocab]
            if bad:
                raise ValueError(f"token ids outside the vocabulary [0, {self.base.n_vocab}): {bad[:5]}")
            return ids
        return self.chat_prompt(prompt)

    def top_candidates(self, prompt: str | Messages | TokenIds, k: int = 10) -> list[int]:
        """The base model's k most likely next tokens after ``prompt`` (sorted, ties by id)."""
        ids = self.encode_prompt(prompt)
        if len(ids) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx}")
        slot = self._acquire()
        try:
            slot.base.clear()
            slot.base_cached = []
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
    ) -> Generation:
        """Start a generation; iterate the result for ``TokenEvent``s. ``prompt`` is plain text
        (completion) or a list of chat messages (the model's chat template is applied)."""
        config = config or SteeringConfig()
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be a whole number from 0 to 2**64 - 1, got {seed!r}")
        if config.k > min(self.k_max, self.base.n_vocab):
            raise ValueError(f"k = {config.k} exceeds the engine's k_max {self.k_max} or the vocabulary")
        if config.steers and self.value is None:
            raise ValueError(f"gate {config.gate!r} needs a value model; load one or use gate 'off'")
        if config.target_ratio is not None:
            config = config.with_tau(self.calibrate_tau(config))
        tokens = self.encode_prompt(prompt)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}; shorten it or "
                "raise n_ctx"
            )
        return Generation(self, tokens, max_tokens=max_tokens, config=config, seed=seed)

    def complete(self, prompt: str | Messages | TokenIds, **kwargs: Any) -> tuple[str, GenerationStats]:
        """Run a generation to the end and return its text and stats."""
        gen = self.generate(prompt, **kwargs)
        with gen:
            for _ in gen:
                pass
        return gen.text, gen.stats

    def _acquire(self) -> _Slot:
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
        base = LlamaContext(self.base, n_ctx=self.n_ctx, n_threads=self.n_threads)
        scorer = None
        if self.value is not None:
            scorer = self.value.new_scorer(n_ctx=self.n_ctx, k_max=self.k_max, n_threads=self.n_threads)
        return _Slot(base=base, scorer=scorer)

    def _release(self, slot: _Slot) -> None:
        with self._pool_lock:
            self._pool.append(slot)

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

    def gate_statistics(
        self, prompts: Sequence[str | Messages] | None = None, *, config: SteeringConfig | None = None,
        max_tokens: int = 96, seed: int = 0,
    ) -> list[float]:
        """The gate statistic at every step of unsteered (``off``) runs of the base model; the
        first ``config.head`` steps of each run are +inf (junctions whatever tau is)."""
        cfg = config or SteeringConfig()
        off = SteeringConfig(gate="off", k=cfg.k, temperature=cfg.temperature)
        on_full = cfg.gate == "full-entropy"
        stats: list[float] = []
        for i, p in enumerate(prompts or [[{"role": "user", "content": q}] for q in self.CALIBRATION_PROMPTS]):
            gen = self.generate(p, max_tokens=max_tokens, config=off, seed=seed + i)
            with gen:
                run = [ev.entropy for ev in gen]
            if on_full:
                run = list(gen.full_entropies[: len(run)])
            run[: cfg.head] = [math.inf] * min(cfg.head, len(run))
            stats.extend(run)
        return stats

    def _tau_keys(self, config: SteeringConfig) -> tuple[tuple[str, int, float, float, int], str]:
        assert config.target_ratio is not None
        key = (config.gate, config.k, config.temperature, config.target_ratio, config.head)
        return key, f"{self.base.fingerprint}|{self.base.path.name}|{key}"

    def cached_tau(self, config: SteeringConfig) -> float | None:
        """The tau for ``config.target_ratio`` if it is already known (in memory or in the cache
        file in models/), else None: ``calibrate_tau`` would then measure it, which takes seconds."""
        key, disk_key = self._tau_keys(config)
        if key in self._tau_cache:
            return self._tau_cache[key]
        stored = _read_tau_file(models_dir() / "tau-calibration.json").get(disk_key)
        if isinstance(stored, (int, float)) and math.isfinite(stored):
            self._tau_cache[key] = float(stored)
            return self._tau_cache[key]
        return None

    def calibrate_tau(self, config: SteeringConfig) -> float:
        """tau giving ``config.target_ratio`` junctions on unsteered runs; cached per model. A
        ``horizon`` plays no part: it only ends steering, with the tau the ratio gives whole answers."""
        key, disk_key = self._tau_keys(config)
        if key in self._tau_cache:
            return self._tau_cache[key]
        # One calibration at a time: concurrent requests for the same uncached ratio wait for the
        # first one's answer instead of each running the unsteered calibration generations.
        with self._calibration_lock:
            cached = self.cached_tau(config)
            if cached is not None:
                return cached
            assert config.target_ratio is not None
            tau = tau_for_ratio(self.gate_statistics(config=config), config.target_ratio)
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
        to predict). Returns (best text, [(text, score, stats)] for all N)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if reward is None and self.value is None:
            raise ValueError("best-of-N needs a reward function or a value model to rank the samples")
        prompt_ids = self.encode_prompt(prompt)
        prompt_text = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))
        results = []
        for i in range(n):
            gen = self.generate(prompt, max_tokens=max_tokens, config=config, seed=(seed + i) & MAX_SEED)
            with gen:
                for _ in gen:
                    pass
            if reward is not None:
                score = float(reward(prompt_text, gen.text))
            else:
                assert self.value is not None
                v = self.value.values_at_positions(prompt_ids + gen.tokens, n_threads=self.n_threads)
                score = float(v[len(prompt_ids):].mean()) if gen.tokens else -math.inf
            results.append((gen.text, score, gen.stats))
        best = max(results, key=lambda r: r[1])
        return best[0], results


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


def _bos(model: LlamaModel) -> int:
    import llama_cpp

    return int(llama_cpp.llama_vocab_bos(model.vocab))


def _eos(model: LlamaModel) -> int:
    import llama_cpp

    return int(llama_cpp.llama_vocab_eos(model.vocab))


class Generation:
    """A running generation: iterate it for ``TokenEvent``s; ``cancel()`` from any thread.

    Use it as a context manager (or call ``close()``) so its contexts return to the engine's
    pool even if you stop iterating early.
    """

    def __init__(self, engine: SteeringEngine, prompt_tokens: list[int], *, max_tokens: int,
                 config: SteeringConfig, seed: int) -> None:
        self.engine = engine
        self.config = config
        self.seed = seed
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.tokens: list[int] = []
        self.stats = GenerationStats(prompt_tokens=len(prompt_tokens), tau=config.tau)
        self.full_entropies: list[float] = []
        self._text: list[str] = []
        self._cancel = threading.Event()
        self._iter: Generator[TokenEvent, None, None] | None = None
        self._slot: _Slot | None = None

    @property
    def text(self) -> str:
        return "".join(self._text)

    def cancel(self) -> None:
        """Stop after the current token (thread-safe)."""
        self._cancel.set()

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._iter is None:
            self._iter = self._run()
        return self._iter

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._iter is not None:
            self._iter.close()  # runs the generator's finally: the slot goes back to the pool
        elif self._slot is not None:
            self.engine._release(self._slot)
            self._slot = None

    def _prefill(self, slot: _Slot) -> None:
        """Decode the prompt, reusing the slot's cached prefix (multi-turn chat)."""
        ctx, cached, prompt = slot.base, slot.base_cached, self.prompt_tokens
        common = 0
        limit = min(len(cached), len(prompt) - 1)  # always decode >= 1 token to get logits
        while common < limit and cached[common] == prompt[common]:
            common += 1
        ctx.seq_rm(0, common, -1)
        ctx.decode(prompt[common:], common)
        slot.base_cached = list(prompt)

    def _run(self) -> Generator[TokenEvent, None, None]:
        eng, cfg, st = self.engine, self.config, self.stats
        slot = self._slot = eng._acquire()
        base, scorer = slot.base, slot.scorer
        gate = JunctionGate(cfg, self.seed)
        rng = kernels.Rng(self.seed)
        topk = kernels.TopK(cfg.k)
        decoder = StreamDecoder(eng.base)
        sequence = list(self.prompt_tokens)
        value_tokens0 = scorer.tokens_decoded if scorer else 0
        value_s0 = scorer.decode_seconds if scorer else 0.0
        perf = time.perf_counter
        t_start = perf()
        try:
            t0 = perf()
            self._prefill(slot)
            n_decoded = len(sequence)  # tokens of `sequence` in the base KV cache
            st.prefill_ms = (perf() - t0) * 1e3
            st.base_decode_ms += st.prefill_ms
            while True:
                if self._cancel.is_set():
                    st.stop_reason = "cancelled"
                    break
                if st.tokens >= self.max_tokens:
                    st.stop_reason = "length"
                    break
                if len(sequence) >= eng.n_ctx:
                    st.stop_reason = "context"
                    break
                logits = base.logits(-1)
                t0 = perf()
                chosen, js = kernels.junction_step(
                    logits, topk, threshold=gate.threshold(), gate_on_full_entropy=gate.on_full_entropy,
                    temperature=cfg.temperature, rng=rng,
                )
                t_kernel = perf() - t0
                junction = chosen < 0
                values: tuple[float, ...] = ()
                shift = 0.0
                if junction:
                    assert scorer is not None
                    v = scorer.score(sequence, topk.ids)
                    t0 = perf()
                    chosen = kernels.steer_topk_inplace(
                        logits, topk, v, w=cfg.w, temperature=cfg.temperature, rng=rng
                    )
                    t_kernel += perf() - t0
                    # numpy on k values, about 50 us: outside kernel_ms, which times the native steps
                    shift = steering_shift(topk.logits, v, cfg.w, cfg.temperature)  # topk.logits: the base's
                    gate.steered(shift)
                    scorer.commit(chosen)
                    st.junctions += 1
                    values = tuple(float(x) for x in v)
                st.kernel_ms += t_kernel * 1e3
                token = int(topk.ids[chosen])
                self.full_entropies.append(js.full_entropy)
                stat = js.full_entropy if gate.on_full_entropy else js.topk_entropy
                if eng.base.is_eog(token):
                    st.stop_reason = "eos"
                    break
                sequence.append(token)
                self.tokens.append(token)
                st.tokens += 1
                piece = decoder.push(token)
                self._text.append(piece)
                yield TokenEvent(piece, token, junction, stat,
                                 tuple(int(i) for i in topk.ids) if junction else (), values, shift)
                if len(sequence) >= eng.n_ctx:
                    continue  # the loop head reports "context" without decoding past the window
                t0 = perf()
                base.decode([token], len(sequence) - 1)
                n_decoded = len(sequence)
                st.base_decode_ms += (perf() - t0) * 1e3
            tail = decoder.flush()
            if tail:
                self._text.append(tail)
            slot.base_cached = sequence[:n_decoded]
        except BaseException:
            st.stop_reason = st.stop_reason or "error"
            slot.base_cached = []
            base.clear()
            if scorer is not None:
                scorer.reset()
            raise
        finally:
            st.total_ms = (perf() - t_start) * 1e3
            if scorer is not None:
                st.value_tokens = scorer.tokens_decoded - value_tokens0
                st.value_decode_ms = (scorer.decode_seconds - value_s0) * 1e3
            self._slot = None
            eng._release(slot)
