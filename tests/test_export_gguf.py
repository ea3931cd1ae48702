"""GGUF writing and quantisation: atomic outputs, and the fast metadata reader."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from sia_edge.train import TrainError
from sia_edge.value_format import read_gguf_kv


@pytest.fixture(scope="module")
def tiny_state(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), local_files_only=True)
    return model.state_dict(), model.config


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_state, base_model_path: Path) -> Path:  # type: ignore[no-untyped-def]
    from sia_edge.train.export import write_llama_gguf

    sd, cfg = tiny_state
    return write_llama_gguf(sd, cfg, base_model_path, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".partial" in p.name)


def test_failed_quantisation_leaves_the_old_file(tmp_path: Path, tiny_gguf: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import llama_cpp

    from sia_edge.train.export import quantize_gguf

    dst = tmp_path / "v-q8_0.gguf"
    dst.write_bytes(b"old")
    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *a: 1)
    with pytest.raises(TrainError, match="could not quantise"):
        quantize_gguf(tiny_gguf, dst, "q8_0")
    assert dst.read_bytes() == b"old" and _leftovers(tmp_path) == []
    monkeypatch.undo()
    quantize_gguf(tiny_gguf, dst, "q8_0", n_threads=1)
    assert dst.read_bytes()[:4] == b"GGUF" and _leftovers(tmp_path) == []
    mask = os.umask(0)
    os.umask(mask)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
    from sia_edge.llama_backend import LlamaModel

    assert LlamaModel(dst).n_embd == 64
    assert read_gguf_kv(dst)["general.file_type"] == llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0


def test_interrupted_write_leaves_nothing(tmp_path: Path, tiny_state, base_model_path: Path,  # type: ignore[no-untyped-def]
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    from sia_edge.train.export import write_llama_gguf

    sd, cfg = tiny_state
    dst = tmp_path / "v.gguf"
    dst.write_bytes(b"old")

    def boom(self, *a, **kw):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(KeyboardInterrupt):
        write_llama_gguf(sd, cfg, base_model_path, dst)
    assert dst.read_bytes() == b"old" and _leftovers(tmp_path) == []
    monkeypatch.undo()
    bad = dict(sd)
    bad["model.norm.weight"] = bad["model.norm.weight"].clone().fill_(float("nan"))
    with pytest.raises(TrainError, match="NaN"):
        write_llama_gguf(bad, cfg, base_model_path, dst)
    assert dst.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_exported_backbone_matches_pytorch(tiny_gguf: Path, tiny_llama_dir: Path) -> None:
    """Final-norm hidden states from llama.cpp equal transformers' (q/k permutation, tied
    embeddings, GQA and hyperparameters all written right)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sia_edge.llama_backend import LlamaContext, LlamaModel

    tokens = [1, 4093, 198, 2020, 536, 339, 919, 253, 16253, 47, 2, 198, 1, 520, 9531, 198]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), local_files_only=True)
    with torch.no_grad():
        want = model.model(input_ids=torch.tensor([tokens])).last_hidden_state[0].numpy()
    lm = LlamaModel(tiny_gguf)
    ctx = LlamaContext(lm, n_ctx=32, n_batch=32, n_threads=1, embeddings=True)
    try:
        ctx.decode(tokens, 0)
        got = np.array(ctx.hidden_states(len(tokens)))
    finally:
        ctx.close()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * float(np.abs(want).max()))


def test_tokenizer_mismatch_between_backbone_and_base(tmp_path: Path, tiny_state) -> None:  # type: ignore[no-untyped-def]
    import gguf

    from sia_edge.train.export import write_llama_gguf

    other = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(other), arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    sd, cfg = tiny_state
    with pytest.raises(TrainError, match=r"vocabulary of 49152 but the base model other\.gguf has 3 tokens"):
        write_llama_gguf(sd, cfg, other, tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()


def test_fast_metadata_reader_agrees_with_gguf_reader(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "kv.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    T = gguf.GGUFValueType
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.arr_str", ["a", "", "Ġthe", "✓"])
    w.add_key_value("t.arr_i32", [1, -2, 3], T.ARRAY, sub_type=T.INT32)
    w.add_key_value("t.arr_f32", [0.5, -1.25], T.ARRAY, sub_type=T.FLOAT32)
    w.add_key_value("t.arr_bool", [True, False], T.ARRAY, sub_type=T.BOOL)
    w.add_tensor("x", np.arange(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fast = read_gguf_kv(path)
    slow = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}
    assert fast == slow
    typed = read_gguf_kv(path, with_types=True)
    assert typed["t.arr_i32"] == ([1, -2, 3], T.ARRAY, T.INT32)
    assert typed["t.f32"] == (1.5, T.FLOAT32, None)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + os.urandom(8))
    from sia_edge.value_format import ValueFormatError

    with pytest.raises(ValueFormatError):
        read_gguf_kv(tmp_path / "junk.gguf")
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:60])  # a download or copy cut short
    with pytest.raises(ValueFormatError, match=r"cut\.gguf: not a readable GGUF file: truncated or not a GGUF"):
        read_gguf_kv(tmp_path / "cut.gguf")


def test_gguf_backbone_round_trip(tmp_path: Path) -> None:
    """A GGUF backbone loads for training (transformers' GGUF loader) with the exact weights that
    were exported: the exporter's q/k permutation is the inverse of the loader's. (A 256-token
    vocabulary: the loader parses every token with gguf.GGUFReader, slow for 49k of them.)"""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sia_edge.train.export import write_llama_gguf
    from sia_edge.train.model import load_backbone

    vocab = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(vocab), arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(256)])
    w.add_token_types([1] * 256)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    sd = LlamaForCausalLM(cfg).state_dict()
    path = write_llama_gguf(sd, cfg, vocab, tmp_path / "m.gguf")
    model = load_backbone(path)
    assert not hasattr(model.config, "quantization_config")
    got = model.state_dict()
    for k, v in sd.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
