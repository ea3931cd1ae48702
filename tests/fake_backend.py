"""A small numpy stand-in for llama.cpp: the unit tier's backend (``SteeringEngine(backend=...)``).

Logits are a fixed function of the last token and the position, values a fixed function of the
prefix and the candidate, both from seeded random tables: deterministic, cheap, and spread
enough that gates see both confident and uncertain steps. It implements exactly what the engine
calls; everything that needs real weights stays in the integration tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sia_edge.llama_backend import LlamaContext

EOS, BOS = 0, 1


class FakeModel:
    def __init__(self, n_vocab: int = 48, *, seed: int = 0, name: str = "fake-base.gguf",
                 fingerprint: str = "fake-v1") -> None:
        self.n_vocab = n_vocab
        self.n_ctx_train = 4096
        self.path = Path(name)
        self.name = name
        self.fingerprint = fingerprint
        self.chat_template: str | None = None
        self.max_token_bytes = 1
        self.closed = False
        rng = np.random.default_rng(seed)
        # Per previous token, a logit row; a few tokens make the next step nearly certain, the
        # rest spread the mass over many candidates (so entropy gates fire on some steps only).
        sharp = rng.random(n_vocab) < 0.5
        scale = np.where(sharp, 6.0, 0.7)[:, None]
        self.table = (rng.standard_normal((n_vocab, n_vocab)) * scale).astype(np.float32)
        self.table[:, EOS] -= 4.0  # answers rarely end at once
        self.table[:, BOS] = -30.0

    def meta(self, key: str) -> str | None:
        return None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        self.closed = True

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        ids = [2 + b % (self.n_vocab - 2) for b in text.encode("utf-8")]
        return [BOS, *ids] if add_special else ids

    def piece(self, token: int) -> bytes:
        return b"" if token in (EOS, BOS) else chr(ord("a") + token % 26).encode()

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode()

    def is_eog(self, token: int) -> bool:
        return token == EOS


class FakeContext:
    """Sequence 0 only, as the base model's contexts use it."""

    decode_from_prefix = LlamaContext.decode_from_prefix  # the real bookkeeping, over fake decoding
    keep_common_prefix = LlamaContext.keep_common_prefix

    def __init__(self, model: FakeModel, n_ctx: int) -> None:
        self.model, self.n_ctx = model, n_ctx
        self.tokens: list[int] = []
        self.decoded = 0  # tokens decoded, for tests of cache reuse
        self.closed = False
        self.embeddings = False  # the engine switches it per decode; nothing here reads hidden states

    def set_embeddings(self, on: bool) -> None:
        self.embeddings = on

    def decode(self, tokens: Sequence[int], start_pos: int, *, seq_ids: list[int] | None = None,
               output_last: bool = True) -> None:
        assert not self.closed and seq_ids is None
        assert start_pos == len(self.tokens), "decoding must continue sequence 0 where it ends"
        if start_pos + len(tokens) > self.n_ctx:
            raise RuntimeError("fake context full")
        self.tokens.extend(int(t) for t in tokens)
        self.decoded += len(tokens)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        assert seq == 0 and p1 == -1
        del self.tokens[max(p0, 0):]

    def logits(self, i: int = -1) -> npt.NDArray[np.float32]:
        last = self.tokens[-1]
        row = self.model.table[last].copy()
        row[(len(self.tokens) * 7) % self.model.n_vocab] += 1.0  # the position matters a little
        return row

    def clear(self) -> None:
        self.tokens.clear()

    def close(self) -> None:
        self.closed = True


class FakeValueHead:
    """The value GGUF's metadata, as far as the engine reads it: no recommended settings."""

    def recommended_steering(self) -> dict[str, float]:
        return {}


class FakeValueModel:
    def __init__(self, base: FakeModel, *, seed: int = 1, name: str = "fake-value.gguf") -> None:
        self.model = FakeModel(base.n_vocab, seed=seed, name=name, fingerprint=base.fingerprint)
        self.path = Path(name)
        self.name = self.identity = name
        self.meta = FakeValueHead()
        self.candidate = None  # the scalar head only
        self.heads = ("scalar",)
        rng = np.random.default_rng(seed)
        self.table = rng.standard_normal((base.n_vocab, base.n_vocab)).astype(np.float32)
        self.scorers: list[FakeScorer] = []
        self.closed = False

    def value(self, prefix: Sequence[int], candidate: int) -> float:
        return float(self.table[prefix[-1], candidate])

    def new_scorer(self, *, n_ctx: int, k_max: int, n_threads: int | None = None, base: object = None) -> FakeScorer:
        scorer = FakeScorer(self, k_max)
        self.scorers.append(scorer)
        return scorer

    def values_at_positions(self, tokens: Sequence[int], *, n_threads: int | None = None) -> npt.NDArray[np.float32]:
        return np.array([self.value(tokens[:i], t) if i else 0.0 for i, t in enumerate(tokens)], dtype=np.float32)

    def close(self) -> None:
        self.closed = True


class FakeScorer:
    """Counts what the real scorer decodes: the tokens since its last use, then k branch rows."""

    def __init__(self, value_model: FakeValueModel, k_max: int) -> None:
        self.value_model, self.k_max = value_model, k_max
        self.cached: list[int] = []
        self.tokens_decoded = 0
        self.decode_seconds = 0.0
        self.calls = 0
        self._pending: list[int] | None = None

    def score(self, sequence: Sequence[int], candidates: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
        common = 0
        while common < min(len(self.cached), len(sequence)) and self.cached[common] == sequence[common]:
            common += 1
        self.tokens_decoded += len(sequence) - common + len(candidates)
        self.cached = list(sequence)
        self.calls += 1
        self._pending = [int(c) for c in candidates]
        return np.array([self.value_model.value(sequence, int(c)) for c in candidates], dtype=np.float32)

    def use_head(self, head: str) -> None:
        assert head == "scalar", "the fake value model has only the scalar head"

    def commit(self, chosen: int) -> None:
        assert self._pending is not None, "commit() without a preceding score()"
        self.cached.append(self._pending[chosen])
        self._pending = None

    def reset(self) -> None:
        self.cached, self._pending = [], None

    def close(self) -> None:
        pass


class FakeBackend:
    """``SteeringEngine(backend=FakeBackend())``: paths name fakes, nothing is read from disk."""

    def __init__(self, n_vocab: int = 48) -> None:
        self.n_vocab = n_vocab
        self.contexts: list[FakeContext] = []

    def load_model(self, path: Path, *, what: str) -> FakeModel:
        return FakeModel(self.n_vocab, name=Path(path).name)

    def new_context(self, model: FakeModel, *, n_ctx: int, n_threads: int) -> FakeContext:
        ctx = FakeContext(model, n_ctx)
        self.contexts.append(ctx)
        return ctx

    def load_value_model(self, path: Path, *, n_threads: int) -> FakeValueModel:
        return FakeValueModel(FakeModel(self.n_vocab), name=Path(path).name)
