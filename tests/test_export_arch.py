"""Value models of every architecture family the exporter supports, end to end on real parts: a
tiny random Hugging Face model of each family, converted to GGUF by llama.cpp's own converter,
loaded as the backbone by transformers' GGUF loader, given a random LoRA (B not zero) and head,
exported (merged, written from the backbone's GGUF, quantised by llama.cpp) and checked against
PyTorch in llama.cpp. What the exporter cannot handle is refused before any training step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sia_edge.gguf_io import read_gguf_kv, read_gguf_tensor_infos
from sia_edge.train import TrainError
from sia_edge.value_format import fingerprint_from_gguf

REPO = Path(__file__).resolve().parent.parent
# family -> (seed of the tiny model, does llama.cpp's converter permute its q/k rows)
FAMILIES = {"llama": (0, True), "llama3": (1, True), "mistral": (2, True), "qwen2": (3, False),
            "qwen3": (4, False), "gemma3": (5, False), "phi3": (6, False)}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SentencePiece vocabulary trained on the repository's prompts: the converter writes
    it as an SPM vocabulary (as Gemma's and Phi-3's), and 384 tokens keep every load fast."""
    from sia_edge.train.tiny import build_spm_tokenizer

    texts = [json.loads(line)["prompt"] for name in ("benign_train", "harmful_train")
             for line in (REPO / "data" / "prompts" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    return build_spm_tokenizer(tmp_path_factory.mktemp("spm"), texts)


@pytest.fixture(scope="module")
def family_ggufs(tmp_path_factory: pytest.TempPathFactory, spm_tokenizer: Path) -> dict[str, Path]:
    """family -> its tiny model's GGUF, converted on first use."""
    from sia_edge.train.export import hf_to_gguf
    from sia_edge.train.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("families")
    made: dict[str, Path] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, family: str) -> Path:
            hf = build_tiny_model(family, root / f"tiny-{family}", spm_tokenizer, seed=FAMILIES[family][0])
            made[family] = hf_to_gguf(hf, root / f"tiny-{family}.gguf")
            return made[family]

    return Lazy()


def _sequences(n: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [([int(t) for t in rng.integers(4, vocab, 8)], [int(t) for t in rng.integers(4, vocab, 28)])
            for _ in range(n)]


def export_and_check(backbone: Path, work: Path, *, layers: int | None = None, n_sequences: int = 6,
                     per_sequence: int = 4, seed: int = 1, n_threads: int = 1) -> dict[str, Any]:
    """Random value model on ``backbone``, exported to f16 and q8_0 with the parity check."""
    from sia_edge.train.export import export_value_model
    from sia_edge.train.tiny import random_value_model

    model = random_value_model(backbone, work / "value", layers=layers, seed=seed)
    vocab = len(read_gguf_kv(backbone)["tokenizer.ggml.tokens"])  # type: ignore[arg-type]
    paths, report = export_value_model(
        model, work / "v", types=("f16", "q8_0"), check_sequences=_sequences(n_sequences, min(vocab, 20000), seed),
        check_tau=0.0, check_per_sequence=per_sequence, n_threads=n_threads)
    assert report is not None
    return {**report.as_dict(), "files": paths, "model": model}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_parity(family: str, family_ggufs: dict[str, Path], tmp_path: Path) -> None:
    """f16: max abs error of V <= 1e-2 of V's scale; q8_0: the same best candidate at >= 95% of
    the junctions. The value GGUF keeps every key of the backbone's GGUF (tokenizer, RoPE,
    sliding window) and the merged weights are in llama.cpp's layout (else the error is large)."""
    from sia_edge.llama_backend import LlamaModel
    from sia_edge.train.export import check_exportable

    gguf = family_ggufs[family]
    info = check_exportable(gguf)
    assert info.permute_qk == FAMILIES[family][1]
    report = export_and_check(gguf, tmp_path, n_sequences=16)
    print(f"{family}: f16 max_abs_err/v_std {report['f16']['max_abs_err'] / report['v_std']:.5f}, "
          f"q8_0 top1 {report['q8_0']['top1_agreement']:.3f} over {report['n_junctions']} junctions")
    assert report["n_junctions"] == 64 and report["v_std"] > 0.3
    assert report["f16"]["max_abs_err"] <= 1e-2 * report["v_std"]
    assert report["q8_0"]["top1_agreement"] >= 0.95
    src = read_gguf_kv(gguf)
    for kind, path in report["files"].items():
        got = read_gguf_kv(path)
        kept = {k: v for k, v in src.items() if k not in ("general.name", "general.file_type")}
        assert {k: got.get(k) for k in kept} == kept, kind
        assert LlamaModel(path).fingerprint == fingerprint_from_gguf(gguf)
    adapter = json.loads((report["model"] / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == ({"qkv_proj", "o_proj"} if family == "phi3" else set(ATTENTION))


def test_shallow_value_model_of_a_family(family_ggufs: dict[str, Path], tmp_path: Path) -> None:
    """--layers 1 of a 2-layer Gemma 3 (interleaved sliding-window attention, offset norms)."""
    report = export_and_check(family_ggufs["gemma3"], tmp_path, layers=1, n_sequences=3)
    assert report["f16"]["max_abs_err"] <= 1e-2 * report["v_std"]
    for path in report["files"].values():
        assert read_gguf_kv(path)["gemma3.block_count"] == 1
        assert not [n for n in read_gguf_tensor_infos(path) if n.startswith("blk.1.")]


def _gguf_of(path: Path, arch: str, n_tokens: int = 8, **kv: Any) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(n_tokens)])
    for key, value in kv.items():
        w.add_string(key, value)
    w.add_tensor("token_embd.weight", np.zeros((n_tokens, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architectures_are_refused_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """By the GGUF's metadata alone, naming the architecture and what is supported; the trainer
    and train_value.py refuse it before loading anything."""
    from sia_edge.train.export import check_exportable, exportable_architectures
    from sia_edge.train.trainer import TrainConfig, train

    supported = exportable_architectures()
    assert {"llama", "qwen2", "qwen3", "gemma3", "phi3"} <= set(supported)
    bert = _gguf_of(tmp_path / "bert.gguf", "bert")
    with pytest.raises(TrainError, match=r"bert\.gguf is of architecture 'bert', which the value-model exporter "
                                         r"cannot handle \(transformers' GGUF loader cannot read it\); supported "
                                         r"architectures: .*gemma3.*llama.*phi3.*qwen2.*qwen3"):
        check_exportable(bert)
    with pytest.raises(TrainError, match=r"t5 model \(an encoder-decoder model\): it cannot be a value model backbone"):
        check_exportable(_gguf_of(tmp_path / "t5.gguf", "t5"))
    with pytest.raises(TrainError, match=r"'gpt2'.*transformers' GGUF loader rearranges its weights "
                                         r"\(GPT2TensorProcessor\) in a way the exporter does not undo"):
        check_exportable(_gguf_of(tmp_path / "gpt2.gguf", "gpt2"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt_ids": [1, 2], "response_ids": [3, 4],
                                        "reward": float(i), "base_fingerprint": fingerprint_from_gguf(bert)}) + "\n"
                            for i in range(4)))

    def no_loading(*a: Any, **kw: Any) -> None:
        raise AssertionError("the backbone was loaded before the architecture was checked")

    from sia_edge.train import trainer

    monkeypatch.setattr(trainer, "load_backbone", no_loading)
    with pytest.raises(TrainError, match="architecture 'bert'"):
        train(TrainConfig(data=[str(data)], backbone=str(bert), out_dir=str(tmp_path / "out"), progress=False))
    assert not (tmp_path / "out").exists()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "train_value.py"), str(data), "--backbone", str(bert),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and "architecture 'bert'" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_what_the_loader_would_miss_is_refused(tmp_path: Path, family_ggufs: dict[str, Path]) -> None:
    """LoRA targets that are not tensors of the family (Phi-3 fuses q/k/v), and RoPE scaling that
    transformers' GGUF loader ignores (the trained model would not be the one llama.cpp runs)."""
    import gguf

    from sia_edge.train.export import check_exportable, copy_gguf, default_lora_targets

    phi3 = family_ggufs["phi3"]
    with pytest.raises(TrainError, match=r"the LoRA target 'q_proj' is not a weight of this phi3 model .*attn_qkv.*"
                                         r"pass --lora-targets naming its modules, e.g\. qkv_proj,o_proj,gate_up_proj,"
                                         r"down_proj"):
        check_exportable(phi3, ATTENTION)
    assert default_lora_targets(phi3) == ("qkv_proj", "o_proj")
    assert default_lora_targets(family_ggufs["qwen3"]) == ATTENTION
    scaled = copy_gguf(family_ggufs["llama"], tmp_path / "linear.gguf",
                       set_keys={"llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING)})
    with pytest.raises(TrainError, match=r"uses RoPE scaling 'linear', which transformers' GGUF loader ignores"):
        check_exportable(scaled)


def test_a_model_the_loader_builds_wrong_is_refused_before_training(tmp_path: Path, spm_tokenizer: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A Gemma 3 whose attention scale is not the family's (head_dim 16): the GGUF does not carry
    the scale, transformers' loader assumes Gemma's and llama.cpp computes its own, so the trained
    model would not be the exported one. The trainer compares the two on the loaded backbone and
    refuses before the first step."""
    import torch

    from sia_edge.train.export import hf_to_gguf
    from sia_edge.train.tiny import build_tiny_model
    from sia_edge.train.trainer import TrainConfig, train

    hf = build_tiny_model("gemma3", tmp_path / "odd", spm_tokenizer, head_dim=16, query_pre_attn_scalar=16)
    odd = hf_to_gguf(hf, tmp_path / "odd.gguf")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt_ids": [5, 6, 7], "response_ids": [8 + i, 9],
                                        "reward": float(i), "base_fingerprint": fingerprint_from_gguf(odd)}) + "\n"
                            for i in range(6)))

    def no_step(*a: Any, **kw: Any) -> None:
        raise AssertionError("a training step ran before the backbone was checked")

    monkeypatch.setattr(torch.optim.AdamW, "step", no_step)
    with pytest.raises(TrainError, match=r"transformers and llama\.cpp compute different hidden states from odd\.gguf "
                                         r"\(gemma3; .*transformers' GGUF loader builds another model"):
        train(TrainConfig(data=[str(data)], backbone=str(odd), out_dir=str(tmp_path / "out"), progress=False,
                          n_threads=1))


def test_padded_vocabulary_fingerprints_agree(tmp_path: Path, smollm2_tokenizer_dir: Path) -> None:
    """A model whose embedding has more rows than its tokenizer has tokens (Qwen: 151,936 and
    151,665): llama.cpp's converter names the extra ids [PAD<id>], and the fingerprint of the
    Hugging Face directory counts them the same way."""
    from transformers import AutoTokenizer

    from sia_edge.train.export import hf_to_gguf
    from sia_edge.train.model import backbone_fingerprint, hf_tokenizer_fingerprint
    from sia_edge.train.tiny import build_tiny_model

    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir), local_files_only=True)
    hf = build_tiny_model("llama", tmp_path / "padded", tok, vocab_size=len(tok) + 64, num_hidden_layers=1)
    gguf_path = hf_to_gguf(hf, tmp_path / "padded.gguf")
    tokens = read_gguf_kv(gguf_path)["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and len(tokens) == len(tok) + 64 and tokens[-1] == f"[PAD{len(tok) + 63}]"
    assert backbone_fingerprint(hf) == fingerprint_from_gguf(gguf_path)
    assert hf_tokenizer_fingerprint(tok) != fingerprint_from_gguf(gguf_path)  # the tokenizer alone: 64 fewer


def test_training_follows_the_data(tmp_path: Path, family_ggufs: dict[str, Path]) -> None:
    """Without --backbone, train_value.py trains on the base model the data was sampled from (with
    that family's LoRA targets); without --base, the export steers that model."""
    from sia_edge.models import default_base_model
    from sia_edge.train.trainer import backbone_for_data

    phi3 = family_ggufs["phi3"]
    rng = np.random.default_rng(0)
    rows = [{"id": f"p{i}-s0", "prompt_ids": [int(t) for t in rng.integers(4, 384, 6)],
             "response_ids": [int(t) for t in rng.integers(4, 384, 10)], "reward": float(rng.normal()),
             "reward_name": "synthetic", "base_model": phi3.name, "base_fingerprint": fingerprint_from_gguf(phi3),
             "base_path": str(phi3)} for i in range(16)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert backbone_for_data([data]) == phi3
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    train = subprocess.run([sys.executable, str(REPO / "tools" / "train_value.py"), str(data), "--out",
                            str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--grad-accum", "1",
                            "--eval-fraction", "0.25", "--no-progress", "--threads", "1"],
                           capture_output=True, text=True, timeout=300, check=False, env=env)
    assert train.returncode == 0, train.stderr[-2000:]
    meta = json.loads((tmp_path / "run" / "value_meta.json").read_text())
    assert Path(meta["backbone"]) == phi3.resolve() and Path(meta["training"]["base_path"]) == phi3.resolve()
    assert set(meta["lora"]["targets"]) == {"qkv_proj", "o_proj"}
    export = subprocess.run([sys.executable, str(REPO / "tools" / "export_value_gguf.py"), str(tmp_path / "run"),
                             "--out", str(tmp_path / "v"), "--types", "f16", "--threads", "1"],
                            capture_output=True, text=True, timeout=300, check=False, env=env)
    assert export.returncode == 0, export.stderr[-2000:]
    assert read_gguf_kv(tmp_path / "v-f16.gguf")["general.architecture"] == "phi3"
    # rows that record no path: the default base model if they are its own, else a clear error
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({**r, "base_path": None, "base_fingerprint": fingerprint_from_gguf(
        default_base_model())}) + "\n" for r in rows))
    assert backbone_for_data([old]) == default_base_model()
    gone = tmp_path / "gone.jsonl"
    gone.write_text("".join(json.dumps({**r, "base_path": str(tmp_path / "moved.gguf")}) + "\n" for r in rows))
    with pytest.raises(TrainError, match=r"sampled from .*moved\.gguf, which is not there any more: pass --backbone"):
        backbone_for_data([gone])
    unnamed = tmp_path / "unnamed.jsonl"
    unnamed.write_text("".join(json.dumps({**r, "base_path": None}) + "\n" for r in rows))
    with pytest.raises(TrainError, match=r"sampled from tiny-phi3\.gguf, and its rows do not record where that file is"):
        backbone_for_data([unnamed])
