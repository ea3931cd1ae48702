"""The training script runs unchanged under torchrun (DistributedDataParallel, gloo, CPU): two
processes with half the rows each take the same steps as one process with all of them (run
in-process here: the CLI is a thin wrapper over the same ``train``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sia_edge.train.model import LoraSettings
from sia_edge.train.trainer import TrainConfig, train
from sia_edge.value_format import fingerprint_from_gguf

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path: Path, tiny_llama_dir: Path, smollm2_tokenizer_dir: Path,
                                          base_model_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from sia_edge.train.selfcheck import make_synthetic_data

    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir), local_files_only=True)
    data = make_synthetic_data(tok, tmp_path / "d.jsonl", n_rows=16, seed=3,
                               fingerprint=fingerprint_from_gguf(base_model_path))
    # dropout 0: the two runs then draw no random masks and must agree to rounding. Two steps:
    # both see the same 8 rows (a later partial group would be padded differently per rank).
    common = [str(data), "--backbone", str(tiny_llama_dir), "--lr", "2e-3", "--grad-accum", "1", "--max-steps", "2",
              "--eval-fraction", "0.25", "--lora-dropout", "0", "--no-progress", "--json", "--threads", "1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(REPO / "tools" / "train_value.py"), *common, "--batch-size", "2",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    one = train(TrainConfig(data=[str(data)], backbone=str(tiny_llama_dir), out_dir=str(tmp_path / "one"), lr=2e-3,
                            batch_size=4, grad_accum=1, max_steps=2, eval_fraction=0.25,
                            lora=LoraSettings(dropout=0.0), progress=False, n_threads=1), log=lambda s: None)
    r1 = {"steps": one.steps, "eval_after": one.eval_after}
    r2 = json.loads(two.stdout)  # rank 0 alone prints
    assert r1["steps"] == r2["steps"] == 2
    assert r2["eval_after"]["mse"] == pytest.approx(r1["eval_after"]["mse"], rel=1e-4)
    meta = json.loads((tmp_path / "two" / "value_meta.json").read_text())
    assert meta["training"]["world_size"] == 2
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
