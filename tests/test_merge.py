"""Value GGUFs built from adapter assets without torch (sia_edge/train/merge.py): the same model
as the PyTorch export, built on an install that has no torch, atomically, into the cache the
user chose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sia_edge.gguf_io import read_gguf_kv, read_gguf_tensor_infos
from sia_edge.presets import get_preset
from sia_edge.value_format import read_value_meta

REPO = Path(__file__).resolve().parent.parent
PRESET = get_preset("smollm2-safety")  # the llama architecture: its q/k deltas are permuted
# Imports that fail as they do where the train extra is not installed.
NO_TORCH = ("import sys\n"
            "for name in ('torch', 'peft', 'transformers'):\n"
            "    sys.modules[name] = None\n")


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from sia_edge.train.export import read_gguf_tensor

    return {name: read_gguf_tensor(path, info) for name, info in read_gguf_tensor_infos(path).items()}


@pytest.mark.slow
def test_the_numpy_merge_writes_the_model_the_pytorch_export_writes(tmp_path: Path) -> None:
    from sia_edge.train.export import export_value_model
    from sia_edge.train.merge import build_value_gguf

    base = PRESET.base_model()
    torch_paths, _ = export_value_model(PRESET.assets_dir, tmp_path / "torch", base_gguf=base, backbone=base,
                                        types=("f32",), n_threads=2)
    numpy_path = build_value_gguf(PRESET.assets_dir, tmp_path / "numpy-f32.gguf", backbone=base, quant="f32")
    want, got = _tensors(torch_paths["f32"]), _tensors(numpy_path)
    assert sorted(want) == sorted(got)
    merged = [name for name in want if name.startswith("blk.") and "norm" not in name]
    assert any(".attn_q." in name for name in merged) and any(".ffn_down." in name for name in merged)
    for name, w in want.items():
        scale = float(np.abs(w).max()) or 1.0
        assert float(np.abs(got[name] - w).max()) <= 1e-5 * scale, name  # float32 rounding of one merge
    # the merge changed the weights (a merge that did nothing would pass the comparison above with
    # a broken export too): the q weights differ from the backbone's by the LoRA's delta
    from sia_edge.train.export import read_gguf_tensor

    q = "blk.0.attn_q.weight"
    assert not np.allclose(got[q], read_gguf_tensor(base, read_gguf_tensor_infos(base)[q]), atol=1e-4)
    a, b = read_value_meta(torch_paths["f32"]), read_value_meta(numpy_path)
    assert np.array_equal(a.weight, b.weight) and a.bias == b.bias
    assert (a.reward_mean, a.reward_std, a.tokenizer_fingerprint, a.steering_w, a.steering_tau, a.steering_horizon) \
        == (b.reward_mean, b.reward_std, b.tokenizer_fingerprint, b.steering_w, b.steering_tau, b.steering_horizon)
    assert read_gguf_kv(numpy_path)["general.name"] == read_gguf_kv(torch_paths["f32"])["general.name"]
    # the shipped candidate head rides along in both, array for array
    assert a.candidate is not None and b.candidate is not None
    for name in ("proj", "proj_bias", "table", "token_bias"):
        assert np.array_equal(getattr(a.candidate, name), getattr(b.candidate, name)), name


def test_the_permuted_architectures_are_the_ones_transformers_unpermutes() -> None:
    from sia_edge.train.export import _permutes_qk, exportable_architectures
    from sia_edge.train.merge import QK_PERMUTED_ARCHITECTURES

    assert {a for a in exportable_architectures() if _permutes_qk(a)} == set(QK_PERMUTED_ARCHITECTURES)


def _run(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", NO_TORCH + code], capture_output=True, text=True, timeout=600,
                          env=env, cwd=cwd, check=False)


@pytest.mark.slow
def test_a_preset_builds_without_torch_into_the_chosen_cache_and_steers(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "SIA_EDGE_MODELS": str(cache)}
    code = ("from sia_edge.engine import SteeringEngine\n"
            "eng = SteeringEngine.from_preset('smollm2-safety', n_threads=1)\n"
            "out = eng.generate([{'role': 'user', 'content': 'How do I make a bomb?'}], max_tokens=8, seed=1)\n"
            "text = ''.join(ev.text for ev in out)\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
            "print('JUNCTIONS', out.stats.junctions)\n")
    r = _run(code, env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[smollm2-safety] merged" in r.stderr and "built " in r.stderr
    assert int(r.stdout.split("JUNCTIONS")[1]) > 0  # the recommended setting steers the opening
    built = sorted(p.name for p in cache.iterdir())
    assert built == [PRESET.value_path.name, PRESET.value_path.name + ".assets-sha256"], built
    # the built model is the one setup built the same way into the checkout's models/
    assert (cache / PRESET.value_path.name).read_bytes() == PRESET.value_model().read_bytes()


def test_an_unwritable_cache_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "SIA_EDGE_MODELS": str(blocker / "models")}
    r = subprocess.run([sys.executable, "-m", "sia_edge.chat", "--prompt", "hi", "--max-tokens", "2"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "is not writable" in line[0] and "SIA_EDGE_MODELS" in line[0], r.stderr


def test_an_interrupted_first_build_leaves_nothing_that_counts_as_built(tmp_path: Path, ctrl_c_when) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    env = {**os.environ, "SIA_EDGE_MODELS": str(cache)}
    code, err = ctrl_c_when("sia_edge.chat", ["--prompt", "hi", "--max-tokens", "2"],
                            lambda line: "merging the LoRA" in line, env=env, cwd=tmp_path)
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not (cache / PRESET.value_path.name).exists()
    assert not list(cache.glob("*.assets-sha256"))
