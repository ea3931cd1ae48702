"""Judging answers: reward, refusal and toxicity (``Judge``)."""

from __future__ import annotations

import math

from sia_edge.cli_common import CliError
from sia_edge.eval.records import RowResult

__all__ = ["Judge"]


class Judge:
    """Reward, refusal and toxicity of answers. ``safety`` is the built-in safety reward; any other
    spec goes through ``sia_edge.rewards.load_reward`` (which may need the train extra)."""

    def __init__(self, spec: str = "safety") -> None:
        from sia_edge import rewards

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
            if self._custom.name == "nontoxicity":  # its reward is 1 - toxicity: the toxic rate comes free
                row.toxicity = 1.0 - row.reward
        if not math.isfinite(row.reward):
            raise CliError(f"reward {self.name} returned {row.reward} for set {row.set}, prompt {row.index + 1}")
