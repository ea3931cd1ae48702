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
  ``sia_edge.rewards.is_refusal``); ``over_refusal_rate``: the same over the benign prompts.
- ``intervention_rate``: junctions / sampling decisions (the tokens, plus the end-of-sequence token
  when one was sampled; Best-of-N: over all N samples).
- ``value_tokens_per_token``: tokens the value model decoded per answer token (branches, catch-up
  and, for Best-of-N, ranking).
- ``ms_per_token``: generation time (prompt prefill excluded) per answer token; for Best-of-N the
  time of all N samples and their ranking, divided by the tokens of the answer returned.
- ``drift``: mean over answers of the mean log-probability of the answer's tokens under the base
  model at temperature 1 over the full vocabulary (``BaseLogprobScorer``); 0 is the base model's own
  argmax, more negative means further from what it would say.

The package, one module per concern: ``modes`` (the ``--modes`` grammar over sia_edge.steering),
``prompt_sets``, ``runner`` (``evaluate``, ``run_prompt``), ``judge``, ``drift``, ``records`` (the
row schema, per-prompt seeds, run settings), ``resume``, ``metrics`` (the statistics of the
summaries and of the headline), ``report`` (table, plot), ``cli``, and ``rescore`` (saved answers
judged again, with the share of dense's gain and paired differences: ``tools/rescore_answers.py``).
"""

from __future__ import annotations

from sia_edge import _early_sigint  # noqa: F401  (first: a Ctrl-C while the imports below run exits quietly)

# isort: split
from sia_edge.cli_common import CliError
from sia_edge.eval.cli import build_parser, main
from sia_edge.eval.drift import BaseLogprobScorer
from sia_edge.eval.judge import Judge
from sia_edge.eval.metrics import matched_probability, summarise_rows
from sia_edge.eval.modes import (
    DEFAULT_MODES,
    MAX_BON,
    MODE_SYNTAX,
    EvalMode,
    ModeError,
    parse_mode,
    parse_modes,
)
from sia_edge.eval.prompt_sets import EvalPrompt, PromptSet, load_prompt_set
from sia_edge.eval.records import PROG, RowResult, prompt_seed, run_settings
from sia_edge.eval.report import format_table, machine_info, plot_summary
from sia_edge.eval.resume import ResumedAnswers, read_resumable
from sia_edge.eval.runner import DEFAULT_MAX_TOKENS, evaluate, run_prompt

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MODES",
    "MAX_BON",
    "MODE_SYNTAX",
    "PROG",
    "BaseLogprobScorer",
    "CliError",
    "EvalMode",
    "EvalPrompt",
    "Judge",
    "ModeError",
    "PromptSet",
    "ResumedAnswers",
    "RowResult",
    "build_parser",
    "evaluate",
    "format_table",
    "load_prompt_set",
    "machine_info",
    "main",
    "matched_probability",
    "parse_mode",
    "parse_modes",
    "plot_summary",
    "prompt_seed",
    "read_resumable",
    "run_prompt",
    "run_settings",
    "summarise_rows",
]
