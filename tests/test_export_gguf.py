"""GGUF writing and quantisation: the value GGUF is a copy of the backbone's GGUF (atomic, every key
and tensor kept, blocks beyond --layers dropped), quantised by llama.cpp; the fast readers."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from sia_edge.gguf_io import read_gguf_kv, read_gguf_tensor_infos
from sia_edge.train import TrainError

TOKENS = [1, 4093, 198, 2020, 536, 339, 919, 253, 16253, 47, 2, 198, 1, 520, 9531, 198]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny llama (SmolLM2's tokenizer) converted by llama.cpp's own converter."""
    from sia_edge.train.export import hf_to_gguf

    return hf_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".partial" in p.name)


def _hidden_llama_cpp(path: Path, tokens: list[int]) -> np.ndarray:
    from sia_edge.llama_backend import LlamaContext, LlamaModel

    ctx = LlamaContext(LlamaModel(path), n_ctx=32, n_batch=32, n_threads=1, embeddings=True)
    try:
        ctx.decode(tokens, 0)
        return np.array(ctx.hidden_states(len(tokens)))
    finally:
        ctx.close()


def _hidden_torch(model_dir: Path, tokens: list[int], layers: int | None = None) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    from sia_edge.train.model import truncate_layers

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    if layers is not None:
        truncate_layers(model, layers)
    with torch.no_grad():
        return model.model(input_ids=torch.tensor([tokens])).last_hidden_state[0].numpy()  # type: ignore[no-any-return]


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


def test_interrupted_write_leaves_nothing(tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    from sia_edge.train.export import write_value_gguf

    dst = tmp_path / "v.gguf"
    dst.write_bytes(b"old")

    def boom(self, *a, **kw):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", boom)
    with pytest.raises(KeyboardInterrupt):
        write_value_gguf(tiny_gguf, dst, {})
    assert dst.read_bytes() == b"old" and _leftovers(tmp_path) == []
    monkeypatch.undo()
    q = read_gguf_tensor_infos(tiny_gguf)["blk.0.attn_q.weight"]
    with pytest.raises(TrainError, match="NaN"):
        write_value_gguf(tiny_gguf, dst, {"blk.0.attn_q.weight": np.full(q.shape, np.nan, dtype=np.float32)})
    with pytest.raises(TrainError, match=r"shape \(3, 64\), tiny-f32\.gguf holds \(64, 64\)"):
        write_value_gguf(tiny_gguf, dst, {"blk.0.attn_q.weight": np.zeros((3, 64), dtype=np.float32)})
    with pytest.raises(TrainError, match=r"no tensor blk\.0\.attn_qkv\.weight"):
        write_value_gguf(tiny_gguf, dst, {"blk.0.attn_qkv.weight": np.zeros((3, 64), dtype=np.float32)})
    assert dst.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_the_value_gguf_is_the_backbone_gguf_with_the_head(tmp_path: Path, tiny_gguf: Path, tiny_llama_dir: Path
                                                           ) -> None:
    """Nothing replaced: every key and tensor of the backbone's GGUF is there unchanged (tokenizer,
    hyperparameters), plus the sia.* head; llama.cpp computes transformers' hidden states."""
    from sia_edge.train.export import write_value_gguf
    from sia_edge.value_format import ValueHeadMeta, read_value_meta

    meta = ValueHeadMeta(weight=np.linspace(-1, 1, 64, dtype=np.float32), bias=0.5, objective="test")
    out = write_value_gguf(tiny_gguf, tmp_path / "v.gguf", {}, head_meta=meta, name="a value model")
    src, got = read_gguf_kv(tiny_gguf), read_gguf_kv(out)
    assert got["general.name"] == "a value model"
    assert {k: v for k, v in got.items() if not k.startswith("sia.") and k != "general.name"} == {
        k: v for k, v in src.items() if k != "general.name"}
    assert read_value_meta(out).objective == "test"
    a, b = read_gguf_tensor_infos(tiny_gguf), read_gguf_tensor_infos(out)
    assert [(n, i.shape, i.ggml_type) for n, i in a.items()] == [(n, i.shape, i.ggml_type) for n, i in b.items()]
    raw_a, raw_b = tiny_gguf.read_bytes(), out.read_bytes()
    for name, info in a.items():
        assert raw_a[info.offset:info.offset + info.nbytes] == raw_b[b[name].offset:b[name].offset + b[name].nbytes]
    want = _hidden_torch(tiny_llama_dir, TOKENS)
    np.testing.assert_allclose(_hidden_llama_cpp(out, TOKENS), want, rtol=0, atol=2e-3 * float(np.abs(want).max()))


def test_layers_drop_blocks_and_shorten_per_layer_arrays(tmp_path: Path, tiny_gguf: Path, tiny_llama_dir: Path
                                                         ) -> None:
    """A GGUF whose head counts and feed-forward widths are per-layer arrays (as llama.cpp allows):
    a 1-layer value GGUF keeps block 0, says 1 block and shortens the arrays, and llama.cpp runs it
    with the values of the 1-layer PyTorch model."""
    import gguf

    from sia_edge.llama_backend import LlamaModel
    from sia_edge.train.export import copy_gguf

    T = gguf.GGUFValueType
    arrays = copy_gguf(tiny_gguf, tmp_path / "arrays.gguf", set_keys={
        "llama.attention.head_count": ([4, 4], T.ARRAY, T.UINT32),
        "llama.feed_forward_length": ([128, 128], T.ARRAY, T.UINT32)})
    assert LlamaModel(arrays).meta("llama.block_count") == "2"
    one = copy_gguf(arrays, tmp_path / "one.gguf", layers=1)
    kv = read_gguf_kv(one)
    assert kv["llama.block_count"] == 1
    assert kv["llama.attention.head_count"] == [4] and kv["llama.feed_forward_length"] == [128]
    names = list(read_gguf_tensor_infos(one))
    assert not [n for n in names if n.startswith("blk.1.")] and "blk.0.attn_q.weight" in names
    want = _hidden_torch(tiny_llama_dir, TOKENS, layers=1)
    np.testing.assert_allclose(_hidden_llama_cpp(one, TOKENS), want, rtol=0, atol=2e-3 * float(np.abs(want).max()))
    with pytest.raises(TrainError, match="has 2 blocks; a model of 3 cannot be written"):
        copy_gguf(tiny_gguf, tmp_path / "three.gguf", layers=3)


def test_tokenizer_mismatch_between_backbone_and_base(tmp_path: Path, tiny_gguf: Path) -> None:
    import gguf

    from sia_edge.train.export import export_value_model
    from sia_edge.train.tiny import random_value_model

    other = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(other), arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model = random_value_model(tiny_gguf, tmp_path / "value")
    with pytest.raises(TrainError, match=r"the base model .*other\.gguf has a different tokenizer"):
        export_value_model(model, tmp_path / "v", base_gguf=other, types=["f16"])
    assert not list(tmp_path.glob("v-*"))


def test_fast_metadata_readers_agree_with_gguf_reader(tmp_path: Path) -> None:
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
    w.add_tensor("y", np.ones((3, 64), dtype=np.float16))
    w.add_tensor("z", gguf.quants.quantize(np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64),
                                           gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fast = read_gguf_kv(path)
    reader = gguf.GGUFReader(str(path))
    slow = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fast == slow
    typed = read_gguf_kv(path, with_types=True)
    assert typed["t.arr_i32"] == ([1, -2, 3], T.ARRAY, T.INT32)
    assert typed["t.f32"] == (1.5, T.FLOAT32, None)
    infos = read_gguf_tensor_infos(path)
    assert list(infos) == ["x", "y", "z"]
    for t in reader.tensors:
        info = infos[t.name]
        assert (info.shape, info.ggml_type) == (tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type))
        assert (info.offset, info.nbytes) == (t.data_offset, t.n_bytes)
    from sia_edge.train.export import read_gguf_tensor

    np.testing.assert_allclose(read_gguf_tensor(path, infos["z"]), np.linspace(-1, 1, 128).reshape(2, 64), atol=1e-2)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + os.urandom(8))
    from sia_edge.gguf_io import GGUFError

    with pytest.raises(GGUFError):
        read_gguf_kv(tmp_path / "junk.gguf")
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:60])  # a download or copy cut short
    for reader_fn in (read_gguf_kv, read_gguf_tensor_infos):
        with pytest.raises(GGUFError, match=r"cut\.gguf: not a readable GGUF file: truncated or not a GGUF"):
            reader_fn(tmp_path / "cut.gguf")
    (tmp_path / "short.gguf").write_bytes(path.read_bytes()[:-40])  # the header whole, the last tensor not
    with pytest.raises(GGUFError, match="tensor z lies past the end of the file"):
        read_gguf_tensor_infos(tmp_path / "short.gguf")


def test_gguf_backbone_round_trip(tiny_gguf: Path, tiny_llama_dir: Path) -> None:
    """The GGUF backbone loads for training with the exact weights of the model llama.cpp's
    converter was given (its q/k permutation undone by transformers' loader), also shortened."""
    import torch
    from transformers import AutoModelForCausalLM

    from sia_edge.train.model import load_backbone

    want = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), local_files_only=True).state_dict()
    model = load_backbone(tiny_gguf)
    assert not hasattr(model.config, "quantization_config")
    got = model.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    one = load_backbone(tiny_gguf, layers=1)
    assert one.config.num_hidden_layers == 1 and len(one.model.layers) == 1
    torch.testing.assert_close(one.state_dict()["model.layers.0.self_attn.k_proj.weight"],
                               want["model.layers.0.self_attn.k_proj.weight"], rtol=0, atol=0)
    with pytest.raises(TrainError, match="between 1 and the backbone's 2 layers, got 3"):
        load_backbone(tiny_gguf, layers=3)


def test_the_fast_writer_writes_what_gguf_writes(tmp_path: Path) -> None:
    """gguf_writer packs numpy arrays in one piece (a candidate head's table over a large
    vocabulary); the bytes are those GGUFWriter writes for the same values as Python lists."""
    import gguf

    from sia_edge.gguf_io import gguf_writer

    rng = np.random.default_rng(0)
    floats = rng.standard_normal(1000).astype(np.float32)
    ints = rng.integers(-5, 5, 77).astype(np.int32)
    paths = []
    for name, make, conv in (("slow", lambda p: gguf.GGUFWriter(str(p), "sia-head"), lambda a: a.tolist()),
                             ("fast", lambda p: gguf_writer(p, "sia-head"), lambda a: a)):
        path = tmp_path / f"{name}.gguf"
        w = make(path)
        w.add_array("x.floats", conv(floats))
        w.add_array("x.ints", conv(ints))
        w.add_array("x.strings", ["a", "bc"])
        w.add_uint32("x.n", 3)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    kv = read_gguf_kv(paths[1], numpy_arrays=True)
    np.testing.assert_array_equal(kv["x.floats"], floats)
    assert isinstance(kv["x.ints"], np.ndarray) and kv["x.ints"].tolist() == ints.tolist()
    assert read_gguf_kv(paths[1])["x.ints"] == ints.tolist() and kv["x.strings"] == ["a", "bc"]
    # integers take GGUFWriter's own path: a value beyond the element type is an error, not wrapped
    w = gguf_writer(tmp_path / "big.gguf", "sia-head")
    w.add_array("x.big", np.array([1, 2**31 + 5], dtype=np.int64))
    w.write_header_to_file()
    with pytest.raises(struct.error, match="format requires"):
        w.write_kv_data_to_file()
    w.close()
