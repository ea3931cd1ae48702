"""Bad inputs to the training pipeline end in one clear error, never a traceback wall."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sia_edge.train import TrainError
from sia_edge.train.data import read_prompts, read_value_rows
from sia_edge.train.trainer import TrainConfig, train
from sia_edge.value_format import fingerprint_from_gguf

REPO = Path(__file__).resolve().parent.parent


def _row(i: int, reward: Any = 0.5, fp: str = "", **kw: Any) -> str:
    row = {"id": f"r{i}", "prompt_ids": [1, 520, 9531, 198], "response_ids": [2683, 359 + i], "reward": reward,
           "base_fingerprint": fp, **kw}
    return json.dumps(row)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _train(data: Path, backbone: Path, out: Path, **kw: Any) -> None:
    train(TrainConfig(data=[str(data)], backbone=str(backbone), out_dir=str(out), max_steps=1, progress=False,
                      n_threads=1, **kw), log=lambda s: None)


def test_missing_and_empty_data(tmp_path: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(TrainError, match="does not exist"):
        _train(tmp_path / "missing.jsonl", tiny_llama_dir, tmp_path / "out")
    empty = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(TrainError, match="empty"):
        _train(empty, tiny_llama_dir, tmp_path / "out")
    only_empty_responses = _write(tmp_path / "e.jsonl", [json.dumps({"prompt_ids": [1], "response_ids": [],
                                                                      "reward": 1.0})])
    with pytest.raises(TrainError, match="empty responses"):
        read_value_rows([only_empty_responses])


def test_missing_backbone(tmp_path: Path) -> None:
    data = _write(tmp_path / "d.jsonl", [_row(i, reward=float(i)) for i in range(4)])
    with pytest.raises(TrainError, match="does not exist"):
        _train(data, tmp_path / "no-such-model", tmp_path / "out")
    not_a_model = tmp_path / "x.bin"
    not_a_model.write_bytes(b"\x00" * 16)
    with pytest.raises(TrainError, match="neither a GGUF"):
        _train(data, not_a_model, tmp_path / "out")


@pytest.mark.parametrize("reward", ["NaN", "Infinity", None, "high"])
def test_bad_rewards(tmp_path: Path, reward: Any) -> None:
    lines = [_row(0, 0.1), _row(1, 0.2)]
    lines.append(_row(2).replace('"reward": 0.5', f'"reward": {reward}' if reward in ("NaN", "Infinity")
                                 else f'"reward": {json.dumps(reward)}'))
    data = _write(tmp_path / "d.jsonl", lines)
    with pytest.raises(TrainError, match=r"d\.jsonl:3"):
        read_value_rows([data])


def test_constant_rewards_and_out_of_vocab_ids(tmp_path: Path, tiny_llama_dir: Path) -> None:
    flat = _write(tmp_path / "flat.jsonl", [_row(i, reward=1.0) for i in range(6)])
    with pytest.raises(TrainError, match="nothing to learn"):
        _train(flat, tiny_llama_dir, tmp_path / "out")
    oov = _write(tmp_path / "oov.jsonl", [_row(i, reward=float(i)) for i in range(5)]
                 + [json.dumps({"id": "big", "prompt_ids": [1], "response_ids": [10**6], "reward": 0.0})])
    with pytest.raises(TrainError, match="outside the backbone's vocabulary"):
        _train(oov, tiny_llama_dir, tmp_path / "out")


def test_backbone_with_another_tokenizer(tmp_path: Path, base_model_path: Path) -> None:
    """Data sampled from SmolLM2 cannot train a backbone whose tokenizer maps ids to other texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sia_edge.train.tiny import build_tiny_llama

    words = ["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(2000)]]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    other = build_tiny_llama(tmp_path / "other", tok, hidden_size=32, intermediate_size=64)
    fp = fingerprint_from_gguf(base_model_path)
    data = _write(tmp_path / "d.jsonl", [_row(i, reward=float(i), fp=fp) for i in range(6)])
    with pytest.raises(TrainError, match="different tokenizer"):
        _train(data, other, tmp_path / "out")


def test_layers_out_of_range(tmp_path: Path, tiny_llama_dir: Path) -> None:
    data = _write(tmp_path / "d.jsonl", [_row(i, reward=float(i % 2)) for i in range(4)])
    with pytest.raises(TrainError, match="between 1 and the backbone's 2 layers, got 3"):
        _train(data, tiny_llama_dir, tmp_path / "out", layers=3)
    with pytest.raises(TrainError, match="--layers must be >= 1"):
        _train(data, tiny_llama_dir, tmp_path / "out", layers=0)


def test_bad_openings_files(tmp_path: Path) -> None:
    from sia_edge.train.data import read_openings

    with pytest.raises(TrainError, match="does not exist"):
        read_openings(tmp_path / "nope.txt")
    with pytest.raises(TrainError, match="has no openings"):
        read_openings(_write(tmp_path / "c.txt", ["# only a comment", "  "]))
    assert read_openings(_write(tmp_path / "o.txt", ["# refusals", "I can't help with that.", "", " No. "])) == [
        "I can't help with that.", "No."]


def test_bad_prompt_files(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="does not exist"):
        read_prompts(tmp_path / "nope.jsonl")
    bad = _write(tmp_path / "p.jsonl", ['{"prompt": "ok", "harmful": false}', '{"text": "no prompt"}'])
    with pytest.raises(TrainError, match=r"p\.jsonl:2"):
        read_prompts(bad)
    flag = _write(tmp_path / "f.jsonl", ['{"prompt": "ok", "harmful": "yes"}'])
    with pytest.raises(TrainError, match="true or false"):
        read_prompts(flag)
    with pytest.raises(TrainError, match="no prompts"):
        read_prompts(_write(tmp_path / "e.txt", []))
    txt = read_prompts(_write(tmp_path / "p.txt", ["How do I bake bread?", "", "Write a poem."]), harmful=False)
    assert [p.prompt for p in txt] == ["How do I bake bread?", "Write a poem."] and txt[0].harmful is False
    # the file and line of a byte that is not UTF-8, not a bare codec error without a file name
    (tmp_path / "latin1.txt").write_bytes("Hello?\nCaf\u00e9 au lait?\n".encode("latin-1"))
    with pytest.raises(TrainError, match=r"latin1\.txt:2: prompt file is not UTF-8 text \(byte 0xe9\); save it as UTF-8"):
        read_prompts(tmp_path / "latin1.txt", harmful=False)
    with pytest.raises(TrainError, match="is a directory; pass the file inside it"):
        read_prompts(tmp_path)
    # only "\n" ends a prompt, as when the file was read line by line (splitlines() would also split at U+2028)
    assert [p.prompt for p in read_prompts(_write(tmp_path / "u.txt", ["one\u2028two"]))] == ["one\u2028two"]


def test_make_value_data_never_cuts_a_file_that_is_not_its_own(tmp_path: Path) -> None:
    """--out pointing at someone else's file: refused, the file untouched. It used to drop the
    file's last line as "a partial row" before it checked the rows (one-line notes: emptied)."""
    prompts = str(REPO / "data/prompts/benign_heldout.jsonl")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, no newline at the end")
    blob = tmp_path / "big.out"
    blob.write_bytes(bytes(range(256)) * 64)
    for target, message in ((notes, "notes.txt does not end like a value-data file"),
                            (blob, "big.out is not UTF-8 text, so it is not this tool's output")):
        before = target.read_bytes()
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "make_value_data.py"), prompts, "--out",
                               str(target), "--max-tokens", "2", "--threads", "1", "--no-progress"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert target.read_bytes() == before


def test_export_of_missing_or_incomplete_model(tmp_path: Path) -> None:
    from sia_edge.train.export import export_value_model

    with pytest.raises(TrainError, match="does not exist"):
        export_value_model(tmp_path / "nope", tmp_path / "v")
    (tmp_path / "half").mkdir()
    with pytest.raises(TrainError, match=r"value_meta\.json missing"):
        export_value_model(tmp_path / "half", tmp_path / "v")
    with pytest.raises(TrainError, match="unknown quantisation type"):
        export_value_model(tmp_path / "half", tmp_path / "v", types=["q3_xs"])
    # recommended steering settings are checked before anything loads
    with pytest.raises(TrainError, match=r"unknown recommended steering setting\(s\) beta: use w, target_ratio, tau"):
        export_value_model(tmp_path / "half", tmp_path / "v", steering={"beta": 1.0})
    with pytest.raises(ValueError, match="a tau or a target ratio, not both"):
        export_value_model(tmp_path / "half", tmp_path / "v", steering={"tau": 1.0, "target_ratio": 0.2})
    with pytest.raises(ValueError, match="recommended horizon must be a whole number of tokens >= 1, got 0"):
        export_value_model(tmp_path / "half", tmp_path / "v", steering={"horizon": 0})
    with pytest.raises(ValueError, match="recommended tau must be a finite number, got nan"):
        export_value_model(tmp_path / "half", tmp_path / "v", steering={"tau": float("nan")})
    with pytest.raises(ValueError, match=r"recommended tau must be a finite number, got '1\.0'"):
        export_value_model(tmp_path / "half", tmp_path / "v", steering={"tau": "1.0"})  # was a TypeError traceback
    with pytest.raises(ValueError, match=r"recommended w must be a finite number .*got True"):
        export_value_model(tmp_path / "half", tmp_path / "v", steering={"w": True})
    with pytest.raises(ValueError, match=r"recommended target_ratio must be in \(0, 1\), got 30"):
        export_value_model(tmp_path / "half", tmp_path / "v", steering={"target_ratio": 30})
    with pytest.raises(ValueError, match=r"recommended w must be > 0 .*got -1"):
        export_value_model(tmp_path / "half", tmp_path / "v", steering={"w": -1})


@pytest.mark.parametrize(("tool", "args", "message"), [
    ("train_value.py", ["missing.jsonl", "--out", "o", "--backbone", "x.gguf"], "does not exist"),
    ("make_value_data.py", ["missing.jsonl", "--out", "o.jsonl"], "prompt file"),
    ("make_value_data.py", [str(REPO / "data/prompts/benign_heldout.jsonl"), "--out", "o.jsonl",
                            "--openings", "missing.txt"], "openings file"),
    ("train_value.py", [str(REPO / "data/prompts/benign_heldout.jsonl"), "--out", "o", "--layers", "0"],
     "--layers must be >= 1"),
    ("make_value_data.py", [str(REPO / "data/prompts/benign_heldout.jsonl"), "--out", "o.jsonl", "--w", "3"],
     "only apply with --steer"),
    ("make_value_data.py", [str(REPO / "data/prompts/benign_heldout.jsonl"), "--out", "o.jsonl",
                            "--steer", "sparse", "--value-model", "missing.gguf"], "missing.gguf"),
    ("export_value_gguf.py", ["no-such-dir", "--out", "v"], "does not exist"),
    ("export_value_gguf.py", [], "--self-check"),
    ("train_value.py", ["--out"], "expected one argument"),
    # found by a bad-input review: each was accepted, a bare OS/codec error, or a traceback
    ("make_value_data.py", [str(REPO / "data/prompts/benign_heldout.jsonl"), "--out", "o.jsonl", "--threads", "0"],
     "expected a positive integer"),
    ("make_value_data.py", [str(REPO / "data/prompts/benign_heldout.jsonl"), "--out", "o.jsonl", "--k", "100000"],
     "--k must be at most 1024"),
    ("make_value_data.py", [str(REPO / "data/prompts"), "--out", "o.jsonl"], "prompts is a directory"),
    ("train_value.py", [str(REPO / "data/prompts/benign_heldout.jsonl"), "--out", str(REPO / "README.md")],
     "README.md is a file; training writes a directory there"),
    ("train_value.py", [str(REPO / "data/prompts/benign_heldout.jsonl"), "--out", "o", "--seed", "-1"],
     "expected a whole number from 0 to 2**64 - 1"),
    ("export_value_gguf.py", [str(REPO / "README.md"), "--out", "v"], "README.md is a file, not a directory"),
    ("export_value_gguf.py", ["d", "--out", "v", "--check", "--check-rows", "0"], "expected a positive integer"),
    ("export_value_gguf.py", ["d", "--out", "v", "--check", "--tau", "nan"], "expected a finite number"),
    ("export_value_gguf.py", ["d", "--out", "v", "--check", "--k", "100000"], "--k must be at most 1024"),
    ("make_value_data.py", [str(REPO / "data/prompts/benign_heldout.jsonl"), "--out", str(REPO / "data"),
                            "--threads", "1"], "data is a directory; pass a file name such as"),
])
def test_cli_errors_are_one_line(tmp_path: Path, tool: str, args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / tool), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and message in errors[0], proc.stderr
