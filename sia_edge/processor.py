"""SIA for existing llama-cpp-python code: a ``logits_processor`` for ``Llama.create_completion``.

    from llama_cpp import Llama, LogitsProcessorList
    from sia_edge.processor import SIALogitsProcessor

    llm = Llama("base.gguf")
    sia = SIALogitsProcessor(llm, "value.gguf", k=10, tau=1.0, w=1.0)
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

import os
from typing import Any

import numpy as np
import numpy.typing as npt

from sia_edge import kernels
from sia_edge.engine import TokenizerMismatchError
from sia_edge.gate import JunctionGate
from sia_edge.steering import SteeringConfig
from sia_edge.value_scorer import ValueModel

__all__ = ["SIALogitsProcessor"]


class SIALogitsProcessor:
    """Callable ``(input_ids, scores) -> scores`` that applies SIA's steering step in place."""

    def __init__(
        self,
        llm: Any,
        value_model: str | os.PathLike[str] | ValueModel,
        *,
        k: int = 10,
        tau: float = 1.0,
        w: float = 1.0,
        gate: str = "entropy",
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.config = SteeringConfig(gate=gate, k=k, tau=tau, w=w, temperature=temperature)
        self.value = value_model if isinstance(value_model, ValueModel) else ValueModel(value_model)
        n_vocab = int(llm.n_vocab())
        if n_vocab != self.value.model.n_vocab:
            raise TokenizerMismatchError(
                f"base model has {n_vocab} tokens but value model {self.value.name} has {self.value.model.n_vocab}"
            )
        n_ctx = int(llm.n_ctx())
        self.scorer = self.value.new_scorer(n_ctx=n_ctx, k_max=k)
        self.gate = JunctionGate(self.config, seed)
        self.topk = kernels.TopK(k)
        self.rng = kernels.Rng(seed)  # only consumed by the in-place write (temperature 0: argmax)
        self.steps = 0
        self.junctions = 0

    def sampling_kwargs(self) -> dict[str, Any]:
        """Sampler settings under which llama.cpp samples exactly SIA's distribution."""
        return {"top_k": self.config.k, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
                "temperature": self.config.temperature, "repeat_penalty": 1.0,
                "frequency_penalty": 0.0, "presence_penalty": 0.0}

    @property
    def intervention_rate(self) -> float:
        return self.junctions / self.steps if self.steps else 0.0

    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        self.steps += 1
        stats = kernels.junction_stats(scores, self.topk)
        statistic = stats.full_entropy if self.gate.on_full_entropy else stats.topk_entropy
        if not statistic >= self.gate.threshold():
            return scores  # the top_k sampler that follows does plain top-k sampling
        self.junctions += 1
        values = self.scorer.score(input_ids.tolist(), self.topk.ids)
        scores[:] = -np.inf  # only the k candidates may be sampled: steer_topk writes them back
        kernels.steer_topk_inplace(scores, self.topk, values, w=self.config.w, temperature=0.0, rng=self.rng)
        return scores
