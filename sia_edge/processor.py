"""SIA for existing llama-cpp-python code: a ``logits_processor`` for ``Llama.create_completion``.

    from llama_cpp import Llama, LogitsProcessorList
    from sia_edge.processor import SIALogitsProcessor

    llm = Llama("base.gguf")
    sia = SIALogitsProcessor(llm, "value.gguf")   # the value model's recommended steering
    # or SIALogitsProcessor(llm, "value.gguf", tau=1.0, w=2.0), or config=SteeringConfig(...)
    out = llm.create_completion(prompt, max_tokens=128,
                                logits_processor=LogitsProcessorList([sia]), **sia.sampling_kwargs())

What this path costs, compared with ``SteeringEngine`` (the closest measurement, a numpy logits
processor, is in docs/results/cost.md):

* llama-cpp-python copies all n_vocab logits into a token-data array and wraps it in a numpy
  record array at every step before calling the processor, then copies the processor's result
  back: several full-vocabulary passes in Python-managed memory that the engine never makes.
* At a junction the processor writes the steered candidates and masks every other token with
  -inf (another full-vocabulary write), then llama.cpp's own sampler chain (top-k, temperature,
  dist) samples. The engine samples the k candidates directly.
* The value model cannot keep the sampled branch (the processor never learns which candidate
  was drawn), so each junction re-decodes that token in its catch-up batch.
* It is only exact if nothing runs after it: ``sampling_kwargs()`` turns off min-p, top-p,
  typical-p and every repetition penalty (llama-cpp-python's defaults enable min-p 0.05), since
  any logit rewrite after the steering step changes what SIA samples.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from sia_edge import kernels
from sia_edge.engine import TokenizerMismatchError
from sia_edge.gate import JunctionGate, steering_shift
from sia_edge.steering import SteeringConfig
from sia_edge.value_format import fingerprint_from_gguf
from sia_edge.value_scorer import ValueModel

__all__ = ["SIALogitsProcessor"]


class SIALogitsProcessor:
    """Callable ``(input_ids, scores) -> scores`` that applies SIA's steering step in place."""

    def __init__(
        self,
        llm: Any,
        value_model: str | os.PathLike[str] | ValueModel,
        *,
        config: SteeringConfig | None = None,
        seed: int = 0,
        **settings: Any,
    ) -> None:
        """``config``: the steering; without it, what the value model recommends (the settings it
        was evaluated with, as the chat and ``SteeringEngine.generate`` use them), with any of
        ``settings`` (``gate``, ``k``, ``tau``, ``w``, ``temperature``, ``horizon``, ...) winning."""
        self.value = value_model if isinstance(value_model, ValueModel) else ValueModel(value_model)
        if config is None:
            gate = settings.pop("gate", None)  # None: the recommended one, else the entropy gate
            config = SteeringConfig.recommended(self.value.meta.recommended_steering(), gate=gate, **settings)
        elif settings:
            raise TypeError(f"pass the steering as config or as settings, not both ({', '.join(settings)})")
        if config.target_ratio is not None:
            raise ValueError(f"target_ratio {config.target_ratio:g} needs a tau measured on the base model, which "
                             "SteeringEngine does; pass tau= to the processor")
        self.config = config
        if self.value.model is None:
            raise ValueError(f"{self.value.name} reads the base model's hidden state, which llama-cpp-python's "
                             "Llama does not hand to a logits processor; steer with SteeringEngine instead")
        n_vocab = int(llm.n_vocab())
        base_fp = fingerprint_from_gguf(llm.model_path)  # the same texts llama.cpp's vocabulary holds
        if n_vocab != self.value.model.n_vocab or base_fp != self.value.model.fingerprint:
            raise TokenizerMismatchError(
                f"base model ({n_vocab} tokens, fingerprint {base_fp}) and value model {self.value.name} "
                f"({self.value.model.n_vocab} tokens, fingerprint {self.value.model.fingerprint}) have different "
                "tokenizers; train the value model from a backbone with the base model's tokenizer"
            )
        n_ctx = int(llm.n_ctx())
        self.scorer = self.value.new_scorer(n_ctx=n_ctx, k_max=config.k)
        self.seed = seed
        self.gate = JunctionGate(self.config, seed)
        self.topk = kernels.TopK(config.k)
        self.rng = kernels.Rng(seed)  # only consumed by the in-place write (temperature 0: argmax)
        self.steps = 0
        self.junctions = 0
        self._last_length = -1

    def sampling_kwargs(self) -> dict[str, Any]:
        """Sampler settings under which llama.cpp samples exactly SIA's distribution (with the
        config's top_p and min_p, which llama.cpp's chain applies before the temperature, the
        engine after it: the same draws at temperature 1)."""
        return {"top_k": self.config.k, "top_p": self.config.top_p, "min_p": self.config.min_p, "typical_p": 1.0,
                "temperature": self.config.temperature, "repeat_penalty": 1.0,
                "frequency_penalty": 0.0, "presence_penalty": 0.0}

    @property
    def intervention_rate(self) -> float:
        return self.junctions / self.steps if self.steps else 0.0

    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        if len(input_ids) != self._last_length + 1:
            # a new completion (llama-cpp-python passes the whole sequence, one token longer at
            # each step): the gate's step count (head, horizon) starts again with its answer
            self.gate = JunctionGate(self.config, self.seed)
        self._last_length = len(input_ids)
        self.steps += 1
        stats = kernels.junction_stats(scores, self.topk)
        threshold = self.gate.threshold()
        statistic = stats.full_entropy if self.gate.on_full_entropy else stats.topk_entropy
        # the value-aware gate scores every step it may steer and decides on the shift below
        if not (threshold < math.inf if self.gate.on_shift else statistic >= threshold):
            return scores  # the top_k sampler that follows does plain top-k sampling
        values = self.scorer.score(input_ids.tolist(), self.topk.ids)
        shift = steering_shift(self.topk.logits, values, self.config.w, self.config.temperature)
        if self.gate.on_shift and not shift >= threshold:
            return scores
        self.gate.steered(shift)
        self.junctions += 1
        scores[:] = -np.inf  # only the k candidates may be sampled: steer_topk writes them back
        kernels.steer_topk_inplace(scores, self.topk, values, w=self.config.w, temperature=0.0, rng=self.rng)
        return scores
