"""Value-model data: prompt files, sampling the base model, and the value-data JSONL.

One JSONL row per sampled response::

    {"id": "p3-s1", "prompt_index": 3, "sample": 1,
     "prompt": "...", "harmful": false, "system": null,
     "prompt_ids": [...],          # chat-formatted prompt, ready to generate from
     "response_ids": [...],        # sampled tokens (the end-of-generation token excluded)
     "response": "...", "stop_reason": "eos",
     "reward": 0.85, "reward_name": "safety",
     "base_model": "SmolLM2-135M-Instruct.Q4_1.gguf", "base_fingerprint": "v1-49152-...",
     "base_path": "/.../SmolLM2-135M-Instruct.Q4_1.gguf",  # what training and export default to
     "seed": 1234567}

Generation samples through the engine with the gate ``off`` (plain top-k sampling, exactly the
distribution that steering will later reweight) or, with ``--steer``, from a steered policy, with
a seed derived from (run seed, prompt, sample) so any row can be regenerated alone. The file is
appended to and flushed row by row; a rerun skips the rows already there, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sia_edge.prompts import Prompt, iter_jsonl, read_prompt_file, stable_seed
from sia_edge.prompts import read_text_lines as _read_text_lines
from sia_edge.train import TrainError

if TYPE_CHECKING:
    from sia_edge.engine import SteeringEngine
    from sia_edge.steering import SteeringConfig

__all__ = [
    "PromptItem",
    "SampleFn",
    "SteeredPolicy",
    "ValueRow",
    "derive_seed",
    "engine_sampler",
    "generate_value_data",
    "read_openings",
    "read_prompts",
    "read_value_rows",
    "split_rows",
]


PromptItem = Prompt  # a prompt of a prompt file (sia_edge.prompts), under its older name here


@dataclass(frozen=True)
class ValueRow:
    """What training needs from a data row."""

    id: str
    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    base_fingerprint: str = ""
    base_model: str = ""
    reward_name: str = ""
    base_path: str = ""  # the base GGUF the row was sampled from (absent in rows of older files)


def read_text_lines(path: Path, what: str) -> list[str]:
    """``sia_edge.prompts.read_text_lines`` with the training pipeline's error type."""
    return _read_text_lines(path, what, error=TrainError)


def read_prompts(path: str | os.PathLike[str], *, harmful: bool | None = None) -> list[PromptItem]:
    """The prompts of a prompt file, read as the evaluation reads them (``sia_edge.prompts``).
    ``harmful`` sets the flag for every prompt that has none."""
    return read_prompt_file(path, harmful=harmful, error=TrainError)


def read_openings(path: str | os.PathLike[str]) -> list[str]:
    """Forced openings from a text file: one per line, blank lines and ``#`` comments skipped."""
    p = Path(path).expanduser()
    lines = [line.strip() for line in read_text_lines(p, "openings file")]
    openings = [line for line in lines if line and not line.startswith("#")]
    if not openings:
        raise TrainError(f"openings file {p} has no openings (one per line)")
    return openings


def derive_seed(seed: int, prompt_index: int, sample: int) -> int:
    """A per-sample seed that does not depend on which rows were generated before (resume-safe)."""
    return stable_seed(seed, prompt_index, sample)


# (chat messages or a plain-text prompt, seed) -> (prompt ids, response ids, response text, stop reason)
SampleFn = Callable[[list[dict[str, str]] | str, int], tuple[list[int], list[int], str, str]]


@dataclass(frozen=True)
class SteeredPolicy:
    """Sample from a steered policy instead of the base model's own: an eval mode (``sparse@25%``,
    ``dense``, ...) with a value model and a strength.

    Data sampled from the steered policy tells a value model what its own choices lead to: it
    shows where a value model's favourite candidates end up when the steering that trusts them
    runs (one round of policy iteration, as value-guided decoding does). See docs/TRAINING.md."""

    mode: str
    value_model: str | os.PathLike[str]
    w: float = 1.0


def engine_sampler(base_model: str | os.PathLike[str] | None, *, max_tokens: int = 256, k: int = 10,
                   temperature: float = 1.0, n_ctx: int = 2048, n_threads: int | None = None,
                   explore_first: bool = False, openings: Sequence[str] = (),
                   steer: SteeredPolicy | None = None,
                   ) -> tuple[SampleFn, str, str, str | None]:
    """Sampling through ``SteeringEngine``, with the gate ``off`` unless ``steer`` is given.
    Returns the sample function, the base model's file name, its tokenizer fingerprint and the
    identity of the steered policy (None for the base model's own), which every row records.

    ``explore_first``: the first response token is drawn uniformly from the base model's top-k
    instead of from its distribution, the rest on-policy. The first answer token is the junction
    that decides refusals; a 135M model puts a few percent on "I" there, so on-policy samples
    would show the value model almost no refusals to learn from. Values stay on-policy estimates
    (the continuation is the base policy), each candidate just gets equal coverage.

    ``openings``: every response starts with one of these texts (drawn by the sample's seed) and
    the base model continues it. This is how refusals get into the data of a model that almost
    never refuses by itself: the rows are off-policy (the opening is forced), so V learns what an
    opening is worth, not how likely the base model is to produce it. See docs/TRAINING.md."""
    if explore_first and openings:
        raise TrainError("explore-first and forced openings are two kinds of data: make them in two runs")
    import random

    from sia_edge.engine import SteeringEngine, TokenIds

    engine = SteeringEngine(None if base_model is None else Path(base_model),
                            None if steer is None else Path(steer.value_model),
                            n_ctx=n_ctx, n_threads=n_threads, k_max=max(k, 1))
    config, policy = _steered_config(engine, steer, k=k, temperature=temperature)

    opening_ids = [engine.base.tokenize(text, add_special=False, parse_special=False) for text in openings]
    if any(not ids for ids in opening_ids):
        raise TrainError("a forced opening is empty; every line of the openings file needs text")

    def continue_from(prompt_ids: list[int], first: list[int], seed: int) -> tuple[list[int], list[int], str, str]:
        gen = engine.generate(TokenIds([*prompt_ids, *first]), max_tokens=max(1, max_tokens - len(first)),
                              config=config, seed=seed)
        with gen:
            for _ in gen:
                pass
        response = [*first, *gen.tokens]
        return prompt_ids, response, engine.base.detokenize(response), gen.stats.stop_reason or "length"

    def sample(messages: list[dict[str, str]] | str, seed: int) -> tuple[list[int], list[int], str, str]:
        if opening_ids:
            return continue_from(engine.encode_prompt(messages), random.Random(seed).choice(opening_ids), seed)
        if not explore_first:
            gen = engine.generate(messages, max_tokens=max_tokens, config=config, seed=seed)
            with gen:
                for _ in gen:
                    pass
            return list(gen.prompt_tokens), list(gen.tokens), gen.text, gen.stats.stop_reason
        prompt_ids = engine.encode_prompt(messages)
        first = random.Random(seed).choice(engine.top_candidates(TokenIds(prompt_ids), k))
        if engine.base.is_eog(first):
            return prompt_ids, [], "", "eos"
        return continue_from(prompt_ids, [first], seed)

    return sample, engine.base.path.name, engine.base.fingerprint, policy


def _steered_config(engine: SteeringEngine, steer: SteeredPolicy | None, *, k: int, temperature: float,
                    ) -> tuple[SteeringConfig, str | None]:
    """The engine config of ``steer`` and its identity: mode with the resolved tau, w and the value
    model's file hash, so that a file never mixes rows of two policies."""
    from sia_edge.steering import TAU_GATES, SteeringConfig, parse_spec_parts

    if steer is None:
        return SteeringConfig(gate="off", k=k, temperature=temperature), None
    try:
        mode = parse_spec_parts(steer.mode, allow_match=True)
    except ValueError as e:
        raise TrainError(f"--steer {steer.mode}: {e}") from None
    if mode.bon != 1 or mode.match is not None:
        raise TrainError(f"--steer {steer.mode}: a data policy is one steered sample: use off, sparse, "
                         "sparse@TAU, sparse@N%, shift@TAU, dense or random@P (no Best-of-N, no random@MODE)")
    try:
        config = mode.config(k=k, w=steer.w, temperature=temperature)
    except ValueError as e:
        raise TrainError(f"--steer {steer.mode}: {e}") from None
    if not config.steers:
        return config, None
    if config.target_ratio is not None:
        config = config.with_tau(engine.calibrate_tau(config))
    with open(steer.value_model, "rb") as fh:
        value_id = hashlib.sha256(fh.read()).hexdigest()[:12]
    setting = f"@{config.tau:.4f}" if config.gate in TAU_GATES else (
        f"@{config.p:g}" if config.gate == "random" else "")
    # Each setting that changes which tokens are steered is part of the policy's identity, added
    # only when set: files steered without follow or horizon keep their ids; a file steered with
    # +follow@F before follow joined the id (2026-11-27) no longer resumes, and is refused.
    extra = f"+head@{config.head}" if config.head else ""
    extra += f"+follow@{config.follow:g}" if config.follow is not None else ""
    extra += f"+horizon@{config.horizon}" if config.horizon is not None else ""
    return config, f"{config.gate}{setting}{extra} w={config.w:g} value={value_id}"


def _repair_tail(path: Path, data: bytes) -> None:
    """Drop a partial last line (of the file's bytes ``data``) left by an interrupted write. Called
    only once every complete line has been checked to be a row of this run, and only a tail that
    starts like one of our rows is dropped: a file that is not ours is refused, never cut."""
    cut = data.rfind(b"\n") + 1
    tail, row_start = data[cut:], b'{"id": "p'  # how every row begins (json.dumps of the row dict)
    if not tail:
        return
    if not (tail.startswith(row_start) or row_start.startswith(tail)):
        raise TrainError(f"{path} does not end like a value-data file (its last line is not a row); "
                         "pass --overwrite or another --out")
    os.truncate(path, cut)


def openings_id(openings: Sequence[str]) -> str | None:
    """A short identity of a list of forced openings (None: no forced openings)."""
    if not openings:
        return None
    return hashlib.sha256("\n".join(openings).encode()).hexdigest()[:12]


def _existing(path: Path, *, fingerprint: str, seed: int, reward_name: str, explore_first: bool,
              openings: str | None, policy: str | None, prompt_style: str = "chat") -> set[str]:
    done: set[str] = set()
    if path.is_dir():
        raise TrainError(f"--out {path} is a directory; pass a file name such as {path / 'data.jsonl'}")
    if not path.exists():
        return done
    # Only complete lines are checked: an interrupted write may have cut the last one anywhere,
    # even inside a UTF-8 character.
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    try:
        lines = complete.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise TrainError(f"{path} is not UTF-8 text, so it is not this tool's output; "
                         "pass another --out (or --overwrite to replace it)") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or "id" not in row:
            raise TrainError(f"{path}:{n} is not a value-data row, so {path} is not this tool's output; "
                             "pass another --out (or --overwrite to replace it)")
        if (row.get("base_fingerprint"), row.get("seed_base"), row.get("reward_name"),
                bool(row.get("explore_first", False)), row.get("openings_id"), row.get("policy"),
                row.get("prompt_style", "chat")) != (
                    fingerprint, seed, reward_name, explore_first, openings, policy, prompt_style):
            raise TrainError(
                f"{path} holds rows of another run (different base model, seed, reward, --explore-first, "
                "--openings, --steer or --prompt-style); "
                "pass --overwrite or another --out"
            )
        done.add(str(row["id"]))
    _repair_tail(path, data)
    return done


def generate_value_data(
    prompts: Sequence[PromptItem],
    out_path: str | os.PathLike[str],
    *,
    sample: SampleFn,
    reward: Any,
    base_model: str,
    base_fingerprint: str,
    samples_per_prompt: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    explore_first: bool = False,
    openings: Sequence[str] = (),
    policy: str | None = None,
    prompt_style: str = "chat",
    base_path: str | os.PathLike[str] | None = None,
) -> int:
    """Sample, score and append rows to ``out_path``; returns the number of new rows.
    ``base_path``: the base GGUF, recorded in every row so that training and export default to
    the model the data was sampled from.
    ``explore_first``, ``openings`` and ``policy`` (the steered policy's identity, None for the
    base model) are recorded (they must be what ``sample`` does): a file never mixes rows sampled
    in different ways. ``prompt_style`` ``chat`` answers each prompt as a user turn in the base
    model's chat template, ``text`` continues it as plain text (base models, text prefixes)."""
    if prompt_style not in ("chat", "text"):
        raise TrainError(f"prompt style must be 'chat' or 'text', got {prompt_style!r}")
    from sia_edge.rewards import check_reward

    if samples_per_prompt < 1:
        raise TrainError("samples per prompt must be >= 1")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and out.exists():
        out.unlink()
    done = _existing(out, fingerprint=base_fingerprint, seed=seed, reward_name=reward.name,
                     explore_first=explore_first, openings=openings_id(openings), policy=policy,
                     prompt_style=prompt_style)
    todo = [(i, s) for i in range(len(prompts)) for s in range(samples_per_prompt) if f"p{i}-s{s}" not in done]
    bar = _progress(len(prompts) * samples_per_prompt, len(done), progress)
    written = 0
    with open(out, "a", encoding="utf-8") as fh:
        for i, s in todo:
            item = prompts[i]
            row_seed = derive_seed(seed, i, s)
            prompt_ids, response_ids, text, stop = sample(item.messages() if prompt_style == "chat" else item.prompt,
                                                          row_seed)
            row: dict[str, Any] = {
                "id": f"p{i}-s{s}", "prompt_index": i, "sample": s,
                "prompt": item.prompt, "harmful": item.harmful, "system": item.system,
                "prompt_ids": prompt_ids, "response_ids": response_ids, "response": text,
                "stop_reason": stop,
            }
            value = reward.score_batch([item.prompt], [text], [row])[0]
            row.update({
                "reward": check_reward(float(value), f"prompt {i} sample {s}"),
                "reward_name": reward.name, "base_model": base_model, "base_fingerprint": base_fingerprint,
                "base_path": str(Path(base_path).resolve()) if base_path is not None else None, "seed": row_seed, "seed_base": seed, "explore_first": explore_first,
                "openings_id": openings_id(openings), "policy": policy,
            })
            if prompt_style != "chat":  # absent means chat: the rows written before plain-text prompts
                row["prompt_style"] = prompt_style
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            written += 1
            bar.update(1)
    bar.close()
    return written


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="sample", dynamic_ncols=True)


def read_value_rows(paths: Sequence[str | os.PathLike[str]], *, vocab_size: int | None = None) -> list[ValueRow]:
    """Training rows from value-data JSONL files, validated: ids in range, finite rewards, one
    base model. Rows with an empty response are skipped (nothing to average V over)."""
    rows: list[ValueRow] = []
    skipped = 0
    for raw_path in paths:
        path = Path(raw_path).expanduser()
        for n, row in iter_jsonl(path, error=TrainError):
            where = f"{path}:{n}"
            try:
                prompt_ids = [int(t) for t in row["prompt_ids"]]
                response_ids = [int(t) for t in row["response_ids"]]
                reward = float(row["reward"])
            except (KeyError, TypeError, ValueError) as exc:
                raise TrainError(
                    f"{where}: a value-data row needs prompt_ids, response_ids and a numeric reward ({exc!r})"
                ) from None
            if not math.isfinite(reward):
                raise TrainError(f"{where}: the reward is {reward} (NaN/inf); fix or drop this row")
            if not prompt_ids:
                raise TrainError(f"{where}: empty prompt_ids")
            if vocab_size is not None:
                bad = [t for t in prompt_ids + response_ids if not 0 <= t < vocab_size]
                if bad:
                    raise TrainError(
                        f"{where}: token id {bad[0]} is outside the backbone's vocabulary of {vocab_size}; "
                        "the data was made with another tokenizer"
                    )
            if not response_ids:
                skipped += 1
                continue
            rows.append(ValueRow(
                str(row.get("id", f"{path.name}:{n}")), prompt_ids, response_ids, reward,
                str(row.get("base_fingerprint") or ""), str(row.get("base_model") or ""),
                str(row.get("reward_name") or ""), str(row.get("base_path") or ""),
            ))
    if not rows:
        raise TrainError(
            "no usable training rows in " + ", ".join(str(p) for p in paths)
            + (f" ({skipped} rows had empty responses)" if skipped else " (the data is empty)")
        )
    fps = {r.base_fingerprint for r in rows if r.base_fingerprint}
    if len(fps) > 1:
        raise TrainError(f"the data mixes rows sampled from {len(fps)} different base tokenizers")
    return rows


def split_rows(rows: Sequence[ValueRow], eval_fraction: float, seed: int) -> tuple[list[ValueRow], list[ValueRow]]:
    """A deterministic train/eval split by row id (stable when rows are appended)."""
    if not 0 <= eval_fraction < 1:
        raise TrainError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    train: list[ValueRow] = []
    held: list[ValueRow] = []
    for r in rows:
        h = int.from_bytes(hashlib.sha256(f"{seed}/{r.id}".encode()).digest()[:4], "little") / 2**32
        (held if h < eval_fraction else train).append(r)
    if eval_fraction > 0 and not held and len(train) > 1:
        held.append(train.pop())
    if not train:
        raise TrainError("no training rows left after the eval split; lower --eval-fraction")
    return train, held
