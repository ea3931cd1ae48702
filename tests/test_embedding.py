"""docs/EMBEDDING.md's example runs as documented: streaming into UI callbacks from a worker
thread, then cancelling an answer from the UI thread."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_embed_in_app_example(value_model_path: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIA_EDGE_")}
    env["SIA_EDGE_MODELS"] = str(tmp_path)
    r = subprocess.run(
        [sys.executable, str(REPO / "examples" / "embed_in_app.py"), "--value-model", str(value_model_path),
         "--max-tokens", "12", "--threads", "1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env, check=False,
    )
    assert r.returncode == 0, r.stderr
    summaries = re.findall(r"-- (\d+) tokens, (\d+) junctions, [\d.]+ ms/token, stop: (\w+)", r.stdout)
    assert len(summaries) == 2, r.stdout
    (n1, _, stop1), (n2, _, stop2) = summaries
    assert 1 <= int(n1) <= 12 and stop1 in ("eos", "length")
    assert stop2 == "cancelled" and 3 <= int(n2) < 64  # the UI pressed stop after three tokens
    assert "conversation: 4 messages" in r.stdout
    assert "error" not in r.stdout and "Traceback" not in r.stderr


def test_embedding_guide_names_the_example() -> None:
    guide = (REPO / "docs" / "EMBEDDING.md").read_text()
    assert "examples/embed_in_app.py" in guide
    # The guide's code quotes the example: keep the two in step.
    example = (REPO / "examples" / "embed_in_app.py").read_text()
    for line in ("self.ui.post(on_token, ev.text, ev.junction)", "self._gen.cancel()",
                 "gen = self.engine.generate(self.history, max_tokens=max_tokens, config=self.config, seed=seed)"):
        assert line in guide and line in example, line
