"""The value-model pipeline end to end on a tiny random llama with SmolLM2's real tokenizer:
synthetic data -> LoRA training -> GGUF export -> llama.cpp quantisation -> parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sia_edge.value_format import fingerprint_from_gguf, read_value_meta

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, base_model_path: Path, smollm2_tokenizer_dir: Path
             ) -> tuple[dict[str, Any], Path]:
    from sia_edge.train.selfcheck import self_check

    work = tmp_path_factory.mktemp("selfcheck")
    report = self_check(base_gguf=base_model_path, tokenizer_dir=smollm2_tokenizer_dir, work_dir=work,
                        steps=40, n_threads=1)
    return report, work


def test_loss_goes_down(pipeline: tuple[dict[str, Any], Path]) -> None:
    report, _ = pipeline
    assert report["loss_before"] == pytest.approx(1.0, abs=1e-3)  # zero head = the mean predictor
    assert report["loss_after"] < 0.5 * report["loss_before"]
    assert report["eval_r2_after"] > 0.3


def test_parity_goals(pipeline: tuple[dict[str, Any], Path]) -> None:
    report, _ = pipeline
    assert set(report) >= {"f16", "q8_0", "q4_k_m"}
    assert report["n_junctions"] >= 10
    assert report["f16"]["max_abs_err"] <= 1e-2
    assert report["q8_0"]["top1_agreement"] >= 0.95
    for t in ("f16", "q8_0", "q4_k_m"):
        assert np.isfinite(report[t]["max_abs_err"])
        assert 0.0 <= report[t]["top1_agreement"] <= 1.0
    # coarser quantisation, larger error
    assert report["f16"]["max_abs_err"] <= report["q8_0"]["max_abs_err"] <= report["q4_k_m"]["max_abs_err"]


def test_export_loads_in_llama_cpp_with_the_head(pipeline: tuple[dict[str, Any], Path], base_model_path: Path) -> None:
    from safetensors.torch import load_file

    from sia_edge.llama_backend import LlamaModel
    from sia_edge.train.model import META_FILE, ValueMeta

    report, work = pipeline
    head = load_file(str(work / "value" / "value_head.safetensors"))
    meta = ValueMeta.from_file(work / "value" / META_FILE)
    for t, path in report["files"].items():
        m = LlamaModel(path)
        assert m.n_embd == 64
        assert m.fingerprint == fingerprint_from_gguf(base_model_path)
        v = read_value_meta(path)
        np.testing.assert_allclose(v.weight, head["weight"].numpy().reshape(-1), rtol=0, atol=0)
        assert v.bias == pytest.approx(float(head["bias"][0]))
        assert v.reward_mean == pytest.approx(meta.reward_mean)
        assert v.reward_std == pytest.approx(meta.reward_std)
        assert v.objective == "synthetic", t
        assert v.steering_w is None and v.steering_target_ratio is None  # none recommended: paper defaults


def test_saved_model_is_peft_format_without_pickle(pipeline: tuple[dict[str, Any], Path], tiny_llama_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, work = pipeline
    out = work / "value"
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors", "value_meta.json",
            "metrics.jsonl", "training_curve.png"} <= names
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32 and cfg["lora_dropout"] == 0.1
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    base = AutoModelForCausalLM.from_pretrained(str(work / "tiny"), local_files_only=True)
    model = PeftModel.from_pretrained(base, str(out))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # trained, not the zero init
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert any("eval_r2" in m for m in metrics)


def test_export_cli_check_json(pipeline: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    _, work = pipeline
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_value_gguf.py"), str(work / "value"),
         "--out", str(tmp_path / "v"), "--base", str(work / "tiny-base-f32.gguf"), "--types", "f16,q8_0",
         "--check", "--check-rows", "2", "--junctions-per-row", "2", "--tau", "0", "--json", "--threads", "1",
         "--steering-w", "3", "--steering-target-ratio", "0.25"],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert set(report) == {"f16", "q8_0", "n_positions", "n_junctions", "v_std"}
    assert report["f16"]["max_abs_err"] <= 1e-2 * report["v_std"]
    assert set(report["q8_0"]) == {"max_abs_err", "top1_agreement"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v-f16.gguf", "v-q8_0.gguf"]
    for p in tmp_path.iterdir():  # the recommended settings travel with the model
        meta = read_value_meta(p)
        assert (meta.steering_w, meta.steering_target_ratio) == (3.0, 0.25)
    # a tau replaces the target ratio (they set the same threshold); a horizon joins them
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_value_gguf.py"), str(work / "value"),
         "--out", str(tmp_path / "t"), "--base", str(work / "tiny-base-f32.gguf"), "--types", "f16", "--threads", "1",
         "--steering-w", "3", "--steering-target-ratio", "0.25", "--steering-tau", "1.5", "--steering-horizon", "16"],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode != 0 and "a tau or a target ratio, not both" in proc.stderr  # both given: refused
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_value_gguf.py"), str(work / "value"),
         "--out", str(tmp_path / "t"), "--base", str(work / "tiny-base-f32.gguf"), "--types", "f16", "--threads", "1",
         "--steering-w", "3", "--steering-tau", "1.5", "--steering-horizon", "16"],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_value_meta(tmp_path / "t-f16.gguf").recommended_steering() == {"w": 3.0, "tau": 1.5, "horizon": 16}


def test_shallow_value_model_keeps_the_first_layers_and_parity(tmp_path: Path, base_model_path: Path,
                                                                smollm2_tokenizer_dir: Path) -> None:
    """--layers 1 of the 2-layer tiny model: trains, records the depth, exports a 1-block GGUF that
    llama.cpp runs with the same values as the shortened PyTorch model."""
    from sia_edge.llama_backend import LlamaModel
    from sia_edge.train.model import ValueMeta
    from sia_edge.train.selfcheck import self_check

    report = self_check(base_gguf=base_model_path, tokenizer_dir=smollm2_tokenizer_dir, work_dir=tmp_path,
                        steps=20, n_threads=1, types=("f16",), layers=1)
    assert ValueMeta.from_file(tmp_path / "value" / "value_meta.json").layers == 1
    assert report["f16"]["max_abs_err"] <= 1e-2
    assert report["loss_after"] < report["loss_before"]
    model = LlamaModel(Path(report["files"]["f16"]))
    assert model.meta("llama.block_count") == "1"


def test_export_carries_the_candidate_head_and_checks_its_parity(pipeline: tuple[dict[str, Any], Path],
                                                                  tmp_path: Path) -> None:
    """A candidate head beside the trained model (as tools/train_candidate_head.py writes it) is
    exported with it, and llama.cpp's candidate values (the prefix's hidden state through the
    native kernel) agree with the head applied to PyTorch's hidden state."""
    import shutil

    from sia_edge.train.candidate import save_head_asset
    from sia_edge.train.meta import CANDIDATE_FILE
    from sia_edge.value_format import CandidateHeadMeta

    _, work = pipeline
    model_dir = tmp_path / "value"
    shutil.copytree(work / "value", model_dir)
    from sia_edge.llama_backend import LlamaModel

    assert read_value_meta(next(iter(pipeline[0]["files"].values()))).candidate is None  # none of its own
    d, r, n_vocab = 64, 8, LlamaModel(work / "tiny-base-f32.gguf").n_vocab
    rng = np.random.default_rng(0)
    head = CandidateHeadMeta(proj=(rng.standard_normal((r, d)) / np.sqrt(d)).astype(np.float32),
                             proj_bias=np.zeros(r, dtype=np.float32),
                             table=(rng.standard_normal((n_vocab, r)) / np.sqrt(r)).astype(np.float32),
                             token_bias=rng.standard_normal(n_vocab).astype(np.float32))
    save_head_asset(head, model_dir / CANDIDATE_FILE)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_value_gguf.py"), str(model_dir),
         "--out", str(tmp_path / "v"), "--base", str(work / "tiny-base-f32.gguf"), "--types", "f16,q8_0",
         "--check", "--check-rows", "4", "--junctions-per-row", "3", "--tau", "0", "--json", "--threads", "1"],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["n_junctions"] >= 10
    assert report["f16"]["candidate_max_abs_err"] <= 2e-2
    assert report["q8_0"]["candidate_top1_agreement"] >= 0.95
    meta = read_value_meta(tmp_path / "v-q8_0.gguf")
    assert meta.candidate is not None
    np.testing.assert_array_equal(meta.candidate.table, head.table)
