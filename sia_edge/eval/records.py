"""One answer of eval, as it runs and as ``--outputs`` holds it: ``RowResult`` and its row
schema, the per-prompt seed, and the run settings every written row carries for ``--resume``."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sia_edge.cli_common import finite_or_none
from sia_edge.files import file_sha256
from sia_edge.prompts import Prompt, stable_seed

if TYPE_CHECKING:
    from sia_edge.engine import SteeringEngine

__all__ = [
    "PROG",
    "ROW_START",
    "RowResult",
    "finite_or_none",
    "prompt_seed",
    "run_settings",
    "sample_steps",
    "sampling_decisions",
    "stats_dict",
]

PROG = "sia-edge eval"  # the command that writes these rows, named in errors about them
ROW_START = b'{"set": '  # how a written row begins (as_row's first key): --resume tells a cut row by it



def stats_dict(stats: Any) -> dict[str, Any]:
    """A ``GenerationStats`` as a row's JSON-safe ``stats``."""
    return {k: finite_or_none(v) for k, v in stats.as_dict().items()}


def prompt_seed(seed: int, set_name: str, index: int) -> int:
    """The seed of one prompt: the same in every mode, so modes differ only by their steering."""
    return stable_seed(seed, set_name, index)


def sampling_decisions(tokens: int, stop_reason: str | None) -> int:
    """A sample's sampling decisions: its tokens, plus the end-of-sequence token when one was sampled."""
    return tokens + (stop_reason == "eos")


@dataclass
class RowResult:
    """One answer (one prompt, one mode), with what the summary needs."""

    set: str
    index: int
    item: Prompt
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
            "reward": finite_or_none(self.reward), "refused": self.refused, "toxicity": self.toxicity,
            "drift": self.drift, "stats": self.stats,
        }
        if run is not None:  # what --resume needs to count the row and check it belongs to the run
            row.update(system=self.item.system, steps=self.steps, p=self.p, run=run)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any], item: Prompt, *, tau_gate: bool) -> RowResult:
        """An answer of an earlier run, as ``as_row(run)`` wrote it (``--resume``). The summary needs
        no token ids, only their count."""
        st = row["stats"]
        tau = st.get("tau") if tau_gate else None  # Best-of-N rows store None for other gates
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


def sample_steps(row: RowResult) -> list[int]:
    """The sampling decisions of each sample of a row (one sample unless Best-of-N)."""
    samples = row.stats.get("samples")
    if not samples:
        return [row.steps]
    return [sampling_decisions(int(s["tokens"]), s["stop_reason"]) for s in samples]


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
