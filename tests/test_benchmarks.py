"""The benchmark scripts run end to end on real models and print the JSON they promise.

Speed is not asserted here (the machine is shared); the scripts check correctness before timing,
and these tests check that they still run, agree with themselves and report sane figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_tool(*args: str) -> dict:
    proc = subprocess.run([sys.executable, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_bench_kernels_reports_every_size_and_a_real_step(base_model_path: Path) -> None:
    out = run_tool("tools/bench_kernels.py", "--json", "--reps", "5", "--vocab", "1000", "4099",
                   "--step-models", str(base_model_path), "--step-tokens", "4")
    assert [r["vocab"] for r in out["results"]] == [1000, 4099]
    for r in out["results"]:
        assert r["core_ms"] > 0 and r["numpy_ms"] > 0 and r["floor_ms"] > 0
    (step,) = out["steps"]
    assert step["vocab"] == 49152 and step["tokens"] == 4
    assert 0 < step["core_share_of_step"] < 1 and step["decode_ms"] > 0


def test_bench_junction_cost_predicts_from_its_measurements(value_model_path: Path) -> None:
    out = run_tool("tools/bench_junction_cost.py", "--json", "--reps", "1", "--ratios", "0.2,0.5",
                   "--value-models", str(value_model_path))
    base = out["base_step_ms"]
    (row,) = out["value_models"]
    assert row["layers"] >= 1 and set(row["catchup_ms"]) == {"1", "2", "5"}
    assert row["candidate_row_ms"] > 0
    # a junction as two decodes and as one, at each catch-up length (checked equal before timing)
    # and each on the whole graph and on the graph ended at the hidden state (checked equal too)
    assert set(row["junction_ms"]) == {"0", "1", "2", "4", "8"}
    for t in row["junction_ms"].values():
        assert min(t["separate"], t["fused"], t["separate_hidden_only"], t["fused_hidden_only"]) > 0
        assert t["fused_saving"] == pytest.approx(1 - t["fused"] / t["separate"], abs=1e-3)
        assert t["fused_saving_hidden_only"] == pytest.approx(
            1 - t["fused_hidden_only"] / t["separate_hidden_only"], abs=1e-3)
        assert t["saving"] == pytest.approx(1 - t["fused_hidden_only"] / t["separate"], abs=1e-3)
    short = row["hidden_only"]
    assert short["branch_ms"] > 0 and short["candidate_row_ms"] > 0
    assert short["branch_saving"] == pytest.approx(1 - short["branch_ms"] / row["branch_ms"], abs=1e-3)
    # The prediction is the documented formula over the measured parts.
    r = 0.2
    sparse = (base + r * (row["catchup_ms"]["5"] + row["branch_ms"])) / base
    assert row["by_ratio"]["0.2"]["sparse_x_plain"] == pytest.approx(sparse, abs=1e-3)
    assert row["dense_x_plain"] == pytest.approx((base + row["branch_ms"]) / base, abs=1e-3)


def test_bench_junction_cost_refuses_bad_ratios() -> None:
    proc = subprocess.run([sys.executable, "tools/bench_junction_cost.py", "--ratios", "0"], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--ratios must lie in (0, 1]" in proc.stderr


def test_bench_decode_times_a_horizon_on_the_prompts_of_a_file(value_model_path: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "How do I pick a lock?"}\n{"prompt": "Name three rivers."}\n')
    out = run_tool("tools/bench_decode.py", "--json", "--prompts", "1", "--tokens", "12", "--naive-prompts", "0",
                   "--target-ratio", "0", "--horizon", "4", "--horizon-tau", "-1", "--threads", "1",
                   "--prompt-file", str(prompts), "--value-model", str(value_model_path))
    modes = out["modes"]
    assert set(modes) == {"plain", "off", "sparse", "dense", "horizon"} and out["horizon"] == 4
    assert out["prompt_file"] == str(prompts) and out["prompts_timed"] == 1
    tokens = modes["horizon"]["tokens"]  # tau -1: every step within the horizon steers, none after it
    assert tokens > 4 and modes["horizon"]["intervention_rate"] == pytest.approx(4 / tokens, abs=4 / tokens**2)
    assert out["ratios"]["horizon_over_dense"] == pytest.approx(
        modes["horizon"]["ms_per_token"] / modes["dense"]["ms_per_token"], abs=1e-3)
    for argv, message in ((["--horizon", "2", "--horizon-tau", "nan"], "tau must be a finite number, got nan"),
                          (["--prompt-file", str(tmp_path / "none.txt")], "none.txt")):
        bad = subprocess.run([sys.executable, "tools/bench_decode.py", *argv], check=False, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_bench_decode_times_every_mode_and_the_head(value_model_path: Path) -> None:
    out = run_tool("tools/bench_decode.py", "--json", "--prompts", "1", "--tokens", "12", "--naive-prompts", "0",
                   "--target-ratio", "0", "--head", "3", "--threads", "1", "--value-model", str(value_model_path),
                   "--whole-graph")
    modes = out["modes"]
    scalar = {"sparse", "dense", "head"}
    assert set(modes) == {"plain", "off", *scalar, *(f"{m}:whole_graph" for m in scalar)} and out["head"] == 3
    for m in scalar:  # the value model's whole graph: the same answers (value_tokens differ by the prompt
        for key in ("tokens", "intervention_rate"):  # cache each engine's value context kept)
            assert modes[f"{m}:whole_graph"][key] == modes[m][key], (m, key)
    assert modes["off"]["intervention_rate"] == 0 and modes["dense"]["intervention_rate"] == 1
    tokens = modes["head"]["tokens"]  # one answer; its end-of-sequence step, if any, is a decision too
    assert 3 / (tokens + 1) - 1e-3 <= modes["head"]["intervention_rate"] <= 3 / tokens + 1e-3
    assert all(m["ms_per_token"] > 0 for m in modes.values())
    assert out["ratios"]["head_over_dense"] == pytest.approx(
        modes["head"]["ms_per_token"] / modes["dense"]["ms_per_token"], abs=1e-3)


def test_bench_grammar_times_constrained_against_unconstrained_answers() -> None:
    out = run_tool("tools/bench_grammar.py", "--json", "--prompts", "2", "--tokens", "40", "--threads", "1")
    modes = out["modes"]
    assert set(modes) == {"off", "off+json_schema", "recommended", "recommended+json_schema"}
    assert modes["off"]["grammar_ms_per_token"] == 0 < modes["off+json_schema"]["grammar_ms_per_token"]
    assert out["ratios"]["off+json_schema_over_off"] == pytest.approx(
        modes["off+json_schema"]["ms_per_token"] / modes["off"]["ms_per_token"], abs=1e-3)
    assert out["constrained_answers_finished_and_valid"] >= 1  # the script checked each against the schema


def test_bench_decode_times_the_candidate_head(base_model_path: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from sia_edge.train.export import copy_gguf
    from sia_edge.value_format import random_head_value_gguf, read_value_meta, write_head_only_gguf

    value = random_head_value_gguf(base_model_path, tmp_path / "value-cand.gguf", candidate_rank=8)
    shallow = copy_gguf(value, tmp_path / "shallow.gguf", layers=2, head_meta=read_value_meta(value))
    out = run_tool("tools/bench_decode.py", "--json", "--prompts", "1", "--tokens", "12", "--naive-prompts", "0",
                   "--target-ratio", "0", "--threads", "1", "--value-model", str(value),
                   "--also-value-model", str(shallow), "--shift-tau", "0.01", "--w", "4")
    modes = out["modes"]
    assert set(modes) == {"plain", "off", "sparse", "dense", "candidate", "dense_candidate", "shift_candidate",
                          "candidate:shallow.gguf", "dense_candidate:shallow.gguf", "shift_candidate:shallow.gguf"}
    # the shift gate scores every token with the candidate head: a value-model row per token at most,
    # and, at a tau this low for w 4, it steers
    assert 0 < modes["shift_candidate"]["intervention_rate"] <= 1 and modes["shift_candidate"]["value_tokens"] < 10
    assert out["shift_tau"] == 0.01 and out["w"] == 4
    assert modes["dense_candidate"]["intervention_rate"] == 1
    assert modes["dense_candidate:shallow.gguf"]["intervention_rate"] == 1
    # no branch rows: the value model decodes each answer token once (plus the prompt, once)
    assert modes["dense"]["value_tokens"] >= 10
    assert modes["dense_candidate"]["value_tokens"] < 10
    assert modes["dense_candidate:shallow.gguf"]["value_tokens"] < 10
    assert "dense_candidate:shallow.gguf_over_plain" in out["ratios"]
    assert out["candidate_gate"] == "sparse"  # no horizon and no target ratio timed: the plain tau
    # a value model without a candidate head cannot be timed so
    plain = random_head_value_gguf(base_model_path, tmp_path / "value-plain.gguf")
    proc = subprocess.run([sys.executable, "tools/bench_decode.py", "--json", "--prompts", "1", "--tokens", "4",
                           "--naive-prompts", "0", "--threads", "1", "--also-value-model", str(plain)],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "has no candidate head" in proc.stderr
    proc = subprocess.run([sys.executable, "tools/bench_decode.py", "--json", "--prompts", "1", "--tokens", "4",
                           "--naive-prompts", "0", "--threads", "1", "--value-model", str(plain), "--shift-tau", "0.5"],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "--shift-tau times the shift gate with a candidate head" in proc.stderr
    # nor can a value model of heads alone time the scalar modes
    heads_only = write_head_only_gguf(tmp_path / "heads.gguf", replace(read_value_meta(value), hidden_state="base_final_norm"))
    proc = subprocess.run([sys.executable, "tools/bench_decode.py", "--json", "--prompts", "1", "--tokens", "4",
                           "--naive-prompts", "0", "--threads", "1", "--value-model", str(heads_only)],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "has no scalar head" in proc.stderr and "--also-value-model" in proc.stderr
    for flag, value, message in (("--shift-tau", "1.5", "--shift-tau takes a share"), ("--w", "nan", "w must be")):
        proc = subprocess.run([sys.executable, "tools/bench_decode.py", "--json", flag, value], check=False, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and message in proc.stderr


def test_oracle_rollouts_score_each_candidate_by_its_own_continuations(base_model_path: Path) -> None:
    """The oracle's batched rollouts: sequence i + 1 continues candidate i // samples. A judge
    that calls an answer a refusal when it starts with one chosen candidate must give that
    candidate 1 and every other 0."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from oracle_ceiling import rollout_scores
    finally:
        sys.path.pop(0)
    from sia_edge import kernels
    from sia_edge.llama_backend import LlamaContext, LlamaModel

    model = LlamaModel(base_model_path)
    prompt = model.tokenize("The three primary colours are")
    cands = [model.tokenize(w, add_special=False)[0] for w in (" red", " blue", " green", " yellow")]
    chosen = model.detokenize([cands[2]])
    ctx = LlamaContext(model, n_ctx=256, n_seq_max=9, n_threads=1)
    try:
        ctx.decode(prompt, 0)
        scores = rollout_scores(ctx, model, prompt, [], cands, samples=2, n_tokens=5, rng=kernels.Rng(1),
                                judge=lambda text: text.startswith(chosen))
        assert scores.tolist() == [0.0, 0.0, 1.0, 0.0]
        ctx.decode(cands[:1], len(prompt))  # the rollouts' cells are gone: sequence 0 continues
    finally:
        ctx.close()
