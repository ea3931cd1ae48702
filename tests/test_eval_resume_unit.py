"""``--resume``'s checks on their own, without a model: the rows of tests/data/eval_golden.jsonl
(written by a real run) as the file an interrupted run left, read against this run's settings.
The end-to-end resume tests (tests/test_eval.py) run the models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sia_edge.cli_common import CliError
from sia_edge.eval.modes import parse_modes
from sia_edge.eval.prompt_sets import load_prompt_set
from sia_edge.eval.records import ROW_START
from sia_edge.eval.resume import read_resumable

DATA = Path(__file__).resolve().parent / "data"
ROWS = [json.loads(line) for line in (DATA / "eval_golden.jsonl").read_text(encoding="utf-8").splitlines()]
for _row in ROWS:  # the golden file leaves the timings out; a written row has them
    _row["stats"].update(prefill_ms=1.0, total_ms=9.0)
MODES = parse_modes("off,sparse@0.5,dense,random@sparse@0.5,sparse@0.5+horizon@4+head@1,bon@2")
SETS = [load_prompt_set(DATA / "golden_prompts.txt", harmful=True)]
RUN = ROWS[0]["run"]


def write(path: Path, rows: list[dict[str, Any]], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + tail, encoding="utf-8")
    return path


def read(path: Path, *, seed: int = 3, run: dict[str, Any] | None = None) -> Any:
    return read_resumable(path, SETS, MODES, seed=seed, run=run or RUN)


def test_the_answers_of_the_same_run_are_taken(tmp_path: Path) -> None:
    resumed = read(write(tmp_path / "rows.jsonl", ROWS[:5]))
    assert sorted(resumed.rows) == sorted((r["mode"], r["set"], r["index"]) for r in ROWS[:5])
    assert resumed.valid_bytes == resumed.read_bytes
    assert not read(tmp_path / "none.jsonl").rows  # no file: nothing to resume


def test_a_row_cut_short_is_left_out_then_dropped_from_the_file(tmp_path: Path) -> None:
    cut = json.dumps(ROWS[5])[:40]
    assert cut.encode().startswith(ROW_START)
    path = write(tmp_path / "rows.jsonl", ROWS[:5], tail=cut)
    resumed = read(path)
    assert len(resumed.rows) == 5 and resumed.valid_bytes < resumed.read_bytes == path.stat().st_size
    resumed.drop_unfinished_row()
    assert path.stat().st_size == resumed.valid_bytes and path.read_text(encoding="utf-8").endswith("\n")


@pytest.mark.parametrize(("change", "words"), [
    (lambda rows: rows[1]["run"].update(w=9.0), "was written with w 9.0, this run has 2.0"),
    (lambda rows: rows.append(dict(rows[0])), "a second time: the file holds two runs"),
    (lambda rows: rows[0].update(seed=1), "different seed (--seed)"),
    (lambda rows: rows[0].update(prompt="another"), "different prompt"),
    (lambda rows: rows[0].update(mode="dense@9"), "not in --modes"),
    (lambda rows: rows[0].update(index=7), "which this run does not have"),
    (lambda rows: rows[0].pop("run"), "does not record its settings"),
    (lambda rows: rows[0].pop("stats"), "lacks the verdicts or the stats"),
])
def test_answers_of_another_run_are_refused_saying_how_they_differ(tmp_path: Path, change: Any, words: str) -> None:
    rows = json.loads(json.dumps(ROWS[:4]))
    change(rows)
    path = write(tmp_path / "rows.jsonl", rows)
    before = path.read_bytes()
    with pytest.raises(CliError, match=words.replace("(", r"\(").replace(")", r"\)")):
        read(path)
    assert path.read_bytes() == before  # a refused file stays as it was


def test_a_file_of_something_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("my notes\nmore", encoding="utf-8")
    with pytest.raises(CliError, match="does not end in answers of"):
        read(path)
