"""Eval's rows stay the same across refactors: a fixed prompt set, every kind of mode, answered
by the current code and compared with rows written by the code before the reshaping of issue 18
(commit a19ad76; tests/data/eval_golden.jsonl, timings removed). Same seeds, same tokens, same
judgements: a difference here is a change of behaviour, not of structure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from sia_edge.value_format import random_head_value_gguf

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
MODES = "off,sparse@0.5,dense,random@sparse@0.5,sparse@0.5+horizon@4+head@1,bon@2"
TIMING = {"prefill_ms", "base_decode_ms", "value_decode_ms", "kernel_ms", "total_ms", "ms_per_token"}


def _same(a: object, b: object, where: str) -> None:
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{where}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_eval_rows_equal_the_rows_before_the_reshaping(tmp_path: Path, base_model_path: Path) -> None:
    value = random_head_value_gguf(base_model_path, tmp_path / "golden-value.gguf")  # the same bytes every time
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "sia_edge.eval", "--harmful", str(DATA / "golden_prompts.txt"), "--modes", MODES,
         "--max-tokens", "8", "--seed", "3", "--threads", "1", "--n-ctx", "512", "--value-model", str(value),
         "--w", "2", "--outputs", str(out), "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    golden = [json.loads(line) for line in (DATA / "eval_golden.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(golden)
    for row, want in zip(rows, golden, strict=True):
        row["stats"] = {k: v for k, v in row["stats"].items() if k not in TIMING}
        _same(row, want, f"{want['mode']}/{want['index']}")
