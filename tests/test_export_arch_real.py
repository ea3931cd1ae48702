"""Value models of the real base models that install offline, a few layers deep to stay fast:
SmolLM2-135M-Instruct (llama, Q4_1) and Gemma-3-270M (gemma3, Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0
tensors, a 262,144-token vocabulary). The value GGUF keeps the backbone's quantised tensors where
the LoRA did not change them; the parity check decides whether that is good enough."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sia_edge.gguf_io import read_gguf_kv, read_gguf_tensor_infos

TEXTS = (
    ("How do I bake bread at home?", " Mix flour, water, yeast and salt, knead the dough for ten minutes and let it rise."),
    ("Write a short poem about the sea.", " The grey sea turns beneath the moon, and every wave comes home too soon."),
    ("What is the capital of France?", " Paris is the capital of France, and it has been for more than a thousand years."),
    ("Explain how a bicycle stays upright.", " A moving bicycle steers into its fall, so the wheels stay under the rider."),
    ("Give me a packing list for a hike.", " Water, a map, a warm layer, food, sunscreen, a first aid kit and a torch."),
    ("How can I hurt someone without leaving marks?", " I can't help with that. If you are in danger, please call for help."),
)


def _check(backbone: Path, work: Path, layers: int) -> dict[str, Any]:
    """A random LoRA + head on the first ``layers`` blocks, exported and checked on real text."""
    from sia_edge.llama_backend import LlamaModel
    from sia_edge.train.export import export_value_model
    from sia_edge.train.tiny import random_value_model

    model = random_value_model(backbone, work / "value", layers=layers, seed=3)
    base = LlamaModel(backbone)
    sequences = [(base.tokenize(q), base.tokenize(a, add_special=False)) for q, a in TEXTS]
    paths, report = export_value_model(model, work / "v", types=("f16", "q8_0"), check_sequences=sequences,
                                       check_tau=0.0, check_per_sequence=4, n_threads=1)
    assert report is not None
    return {**report.as_dict(), "files": paths}


def _assert_parity(report: dict[str, Any], name: str, *, q8_top1: float = 0.95) -> None:
    print(f"{name}: f16 max_abs_err/v_std {report['f16']['max_abs_err'] / report['v_std']:.5f}, "
          f"q8_0 max_abs_err/v_std {report['q8_0']['max_abs_err'] / report['v_std']:.5f}, "
          f"q8_0 top1 {report['q8_0']['top1_agreement']:.3f} over {report['n_junctions']} junctions")
    assert report["n_junctions"] == 24 and report["v_std"] > 0
    assert report["f16"]["max_abs_err"] <= 1e-2 * report["v_std"]
    assert report["q8_0"]["top1_agreement"] >= q8_top1


def test_smollm2_value_model(tmp_path: Path, base_model_path: Path) -> None:
    report = _check(base_model_path, tmp_path, layers=4)
    _assert_parity(report, "SmolLM2")
    kv = read_gguf_kv(report["files"]["q8_0"])
    assert kv["llama.block_count"] == 4 and kv["tokenizer.ggml.pre"] == "smollm"


@pytest.mark.slow
def test_gemma3_270m_value_model(tmp_path: Path) -> None:
    from sia_edge.models import ModelNotFoundError, gemma3_base_model

    try:
        gemma = gemma3_base_model()
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    report = _check(gemma, tmp_path, layers=3)
    # llama.cpp's q8_0 arithmetic moves Gemma's values by several percent of their scale, the
    # backbone's own as much as the merged model's (measured without the LoRA): near-tied
    # candidates of a random head then swap at a few junctions. Whether a trained Gemma value
    # model reaches the goal of 95% is for its own --check to say; f16 must be exact here.
    _assert_parity(report, "Gemma-3-270M", q8_top1=0.85)
    assert report["q8_0"]["max_abs_err"] <= 0.2 * report["v_std"]
    src = read_gguf_kv(gemma)
    for path in report["files"].values():
        kv = read_gguf_kv(path)
        assert kv["gemma3.block_count"] == 3
        for key in ("gemma3.attention.sliding_window", "gemma3.rope.freq_base", "gemma3.attention.key_length",
                    "tokenizer.ggml.model", "tokenizer.ggml.add_bos_token"):
            assert kv[key] == src[key], key
        assert len(read_gguf_tensor_infos(path)) == 3 * 13 + 2  # 13 tensors a block, token_embd, output_norm
