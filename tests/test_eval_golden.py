"""Eval's rows stay the same across refactors: a fixed prompt set, every kind of mode, answered
by the current code and compared with rows written by the code before the reshaping of issue 18
(commit a19ad76, with the prefill fix of ea92a1c; tests/data/eval_golden*.jsonl, timings removed).
Same seeds, same tokens, same judgements: a difference here is a change of behaviour, not of
structure. eval_golden-avx2.jsonl: the same code's rows (commit c093523) on an AVX2-only CPU."""

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
TIMING = {"prefill_ms", "base_decode_ms", "value_decode_ms", "kernel_ms", "grammar_ms", "total_ms", "ms_per_token"}


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
    for row in rows:
        row["stats"] = {k: v for k, v in row["stats"].items() if k not in TIMING}
    # llama.cpp's matmuls round differently on CPUs with other vector units (its build is native),
    # so the same code samples other tokens there: one file of rows per kind of CPU met so far,
    # each written by the code of the commits the module docstring names on such a CPU.
    goldens = {path.name: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
               for path in sorted(DATA.glob("eval_golden*.jsonl"))}
    assert len(goldens) >= 2
    misses = {}
    for name, golden in goldens.items():
        try:
            assert len(rows) == len(golden)
            for row, want in zip(rows, golden, strict=True):
                _same(row, want, f"{want['mode']}/{want['index']}")
            return  # the rows of this CPU's kind
        except AssertionError as exc:
            misses[name] = str(exc).splitlines()[0]
    raise AssertionError(f"the rows equal none of the golden files ({misses}); on a new kind of CPU, write its "
                         "rows with the code of the last commit whose rows are golden (docs/TESTING.md)")
