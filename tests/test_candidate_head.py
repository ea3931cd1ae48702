"""The candidate head (issue 22): native kernel, GGUF format, scorer, engine, training side.

Every value is checked against an independent computation: the kernel against numpy on every
ISA; the scorer's fused junction and the candidate head against fresh llama.cpp contexts with no
cache reuse (``ValueModel.values_at_positions`` and its hidden states)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from sia_edge import _reference as ref
from sia_edge import kernels as K
from sia_edge.llama_backend import LlamaContext
from sia_edge.steering import SpecError, SteeringConfig, parse_spec
from sia_edge.value_format import (
    CandidateHeadMeta,
    ValueFormatError,
    random_head_value_gguf,
    read_value_meta,
    write_gguf_with_value_meta,
)
from sia_edge.value_scorer import ValueModel

MSGS = [{"role": "user", "content": "How do I pick a lock?"}]


def random_head(d: int, r: int, n_vocab: int, seed: int = 0) -> CandidateHeadMeta:
    rng = np.random.default_rng(seed)
    return CandidateHeadMeta(proj=rng.standard_normal((r, d)).astype(np.float32),
                             proj_bias=rng.standard_normal(r).astype(np.float32),
                             table=rng.standard_normal((n_vocab, r)).astype(np.float32),
                             token_bias=rng.standard_normal(n_vocab).astype(np.float32))


# --------------------------------------------------------------------------- kernel
@pytest.mark.parametrize(("d", "r", "n_vocab", "k"), [(1, 1, 1, 1), (7, 3, 11, 5), (8, 8, 64, 10),
                                                      (17, 5, 100, 32), (576, 32, 49152, 10), (643, 33, 1000, 40)])
def test_kernel_matches_numpy_on_every_isa(isa: str, d: int, r: int, n_vocab: int, k: int) -> None:
    rng = np.random.default_rng(d * 1000 + r)
    head = random_head(d, r, n_vocab, seed=d)
    h = rng.standard_normal(d).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    ids = rng.integers(0, n_vocab, k).astype(np.int32)
    got = K.candidate_head(h, head, ids, w, 0.25)
    want = ref.candidate_head(h, w, 0.25, head.proj, head.proj_bias, head.table, head.token_bias, ids)
    scale = 1 + float(np.sqrt(d * r))  # the size of the terms summed in float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_kernel_rejects_a_non_finite_hidden_state(isa: str, bad: float) -> None:
    head = random_head(9, 2, 20)
    h = np.ones(9, dtype=np.float32)
    h[4] = bad
    with pytest.raises(ValueError, match="NaN or infinity"):
        K.candidate_head(h, head, np.arange(3, dtype=np.int32), np.ones(9, dtype=np.float32), 0.0)


@pytest.mark.parametrize("bad_id", [-1, 20, 1 << 30])
def test_kernel_rejects_ids_outside_the_vocabulary(bad_id: int) -> None:
    head = random_head(9, 2, 20)
    ids = np.array([0, bad_id], dtype=np.int32)
    with pytest.raises(ValueError, match="outside the 20-token vocabulary"):
        K.candidate_head(np.ones(9, dtype=np.float32), head, ids, np.ones(9, dtype=np.float32), 0.0)


def test_kernel_rejects_mismatched_shapes() -> None:
    head = random_head(9, 2, 20)
    with pytest.raises(ValueError, match="weight has 8 entries"):
        K.candidate_head(np.ones(9, dtype=np.float32), head, np.arange(2, dtype=np.int32),
                         np.ones(8, dtype=np.float32), 0.0)
    with pytest.raises(ValueError, match="proj: expected a contiguous float32 matrix of 2 x 10"):
        K.candidate_head(np.ones(10, dtype=np.float32), head, np.arange(2, dtype=np.int32),
                         np.ones(10, dtype=np.float32), 0.0)
    with pytest.raises(TypeError, match="float32"):
        K.candidate_head(np.ones(9), head, np.arange(2, dtype=np.int32), np.ones(9, dtype=np.float32), 0.0)


def test_head_meta_refuses_inconsistent_or_non_finite_arrays() -> None:
    head = random_head(9, 2, 20)
    with pytest.raises(ValueFormatError, match="do not fit together"):
        dataclasses.replace(head, token_bias=np.zeros(19, dtype=np.float32))
    bad = head.table.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueFormatError, match="NaN/inf"):
        dataclasses.replace(head, table=bad)


# --------------------------------------------------------------------------- format
@pytest.fixture(scope="module")
def candidate_value_model(tmp_path_factory: pytest.TempPathFactory, base_model_path: Path) -> Path:
    return random_head_value_gguf(base_model_path, tmp_path_factory.mktemp("cand") / "value-cand.gguf",
                                  candidate_rank=16)


def test_gguf_round_trip_and_llama_cpp_loads_it(candidate_value_model: Path) -> None:
    meta = read_value_meta(candidate_value_model)
    assert meta.candidate is not None and meta.candidate.rank == 16
    vm = ValueModel(candidate_value_model, n_threads=1)
    try:  # llama.cpp ignores the sia.* keys, the head's shapes match the backbone
        assert vm.candidate is not None
        assert vm.candidate.table.shape == (vm.model.n_vocab, 16)
        np.testing.assert_array_equal(vm.candidate.table, meta.candidate.table)
    finally:
        vm.close()


def test_a_head_for_another_backbone_is_refused(tmp_path: Path, candidate_value_model: Path) -> None:
    meta = read_value_meta(candidate_value_model)
    assert meta.candidate is not None
    small = dataclasses.replace(meta.candidate, table=meta.candidate.table[:100],
                                token_bias=meta.candidate.token_bias[:100])
    dst = tmp_path / "wrong.gguf"
    write_gguf_with_value_meta(candidate_value_model, dst, dataclasses.replace(meta, candidate=small))
    with pytest.raises(ValueFormatError, match="exported for another backbone"):
        ValueModel(dst)


# --------------------------------------------------------------------------- scorer
def _fresh_hidden(vm: ValueModel, tokens: list[int]) -> np.ndarray:
    """The final-norm hidden state of the last token, from a new context (no cache, no fusion)."""
    ctx = LlamaContext(vm.model, n_ctx=len(tokens) + 8, n_batch=len(tokens), n_threads=1, embeddings=True)
    try:
        ctx.decode(tokens, 0)
        return ctx.hidden_states(len(tokens))[-1].copy()
    finally:
        ctx.close()


def test_fused_and_candidate_scoring_match_fresh_contexts(engine, candidate_value_model: Path) -> None:
    """Catch-ups of 0 to 11 tokens (fused up to FUSE_MAX_CATCHUP, a batch of their own beyond),
    committed branches, and the candidate head on the same cache: every value agrees with the one
    computed from scratch, and the hidden state the candidate head reads is the prefix's last.

    Tolerance as in test_engine.py's cache test (llama.cpp's quantised matmuls round differently
    for different batch shapes): relative to the spread of V."""
    vm = ValueModel(candidate_value_model, n_threads=1)
    assert vm.candidate is not None
    tokens = engine.encode_prompt(MSGS) + engine.base.tokenize(
        " Picking a lock takes a tension wrench, a pick and a great deal of patience, and", add_special=False)
    scorer = vm.new_scorer(n_ctx=256, k_max=10)
    rng = np.random.default_rng(3)
    errors, q_errors, values, q_values = [], [], [], []
    try:
        p, step = 12, 0
        while p < len(tokens):
            cands = rng.choice(np.arange(100, 20000), 10, replace=False).astype(np.int32)
            cands[step % 10] = tokens[p]
            scorer.use_head("scalar")
            v = scorer.score(tokens[:p], cands).copy()
            values.extend(v)
            want = [vm.values_at_positions([*tokens[:p], int(c)], n_threads=1)[-1] for c in cands[:3]]
            errors.extend(np.abs(v[:3] - want))
            scorer.use_head("candidate")
            q = scorer.score(tokens[:p], cands).copy()
            h_cached, h_fresh = scorer.prefix_hidden, _fresh_hidden(vm, tokens[:p])
            assert h_cached is not None
            cosine = float(h_cached @ h_fresh / np.linalg.norm(h_cached) / np.linalg.norm(h_fresh))
            assert cosine > 0.995, (step, cosine)  # the prefix's own last row, not a neighbour's
            q_ref = ref.candidate_head(h_fresh, vm.weight, vm.bias, vm.candidate.proj, vm.candidate.proj_bias,
                                       vm.candidate.table, vm.candidate.token_bias, cands)
            q_errors.extend(np.abs(q - q_ref))
            q_values.extend(q_ref)
            scorer.use_head("scalar")
            scorer.score(tokens[:p], cands)
            scorer.commit(step % 10)  # the branch of tokens[p] becomes the cache's next token
            p += 1 + [0, 1, 3, 11][step % 4]  # catch-ups of 0, 1, 3 and 11 tokens
            step += 1
        assert step >= 4
    finally:
        scorer.close()
        vm.close()
    scale = float(np.std(values))
    assert scale > 0.5
    assert max(errors) <= 0.12 * scale and float(np.mean(errors)) <= 0.03 * scale, (max(errors), scale)
    q_scale = float(np.std(q_values))
    assert max(q_errors) <= 0.12 * q_scale and float(np.mean(q_errors)) <= 0.03 * q_scale, (max(q_errors), q_scale)


def test_a_candidate_junction_decodes_no_branch_rows(base_model_path: Path, candidate_value_model: Path) -> None:
    from sia_edge.engine import SteeringEngine

    with SteeringEngine(base_model_path, candidate_value_model, n_ctx=512, n_threads=1) as eng:
        n_prompt = len(eng.encode_prompt(MSGS))
        dense = SteeringConfig(gate="dense", w=3.0)
        cand = eng.generate(MSGS, max_tokens=24, config=dataclasses.replace(dense, value_head="candidate"), seed=2)
        text_c = "".join(e.text for e in cand)
        scal = eng.generate(MSGS, max_tokens=24, config=dense, seed=2)
        list(scal)
    assert cand.stats.junctions == cand.stats.steps > 10
    # every token the value model decoded is a token of the answer (or the prompt): no branches
    assert cand.stats.value_tokens <= n_prompt + cand.stats.tokens
    assert scal.stats.value_tokens >= 10 * scal.stats.junctions
    assert text_c


def test_candidate_head_settings_and_errors(engine) -> None:
    cfg = parse_spec("sparse@1+horizon@16+candidate", w=3.0)
    assert cfg.value_head == "candidate" and cfg.spec == "sparse@1+horizon@16+candidate"
    assert parse_spec(cfg.spec, w=3.0) == cfg
    assert "candidate head" in cfg.describe()
    with pytest.raises(SpecError, match="never steers"):
        parse_spec("off+candidate")
    with pytest.raises(ValueError, match="value_head must be one of scalar, candidate"):
        SteeringConfig(value_head="vector")
    # the session engine's value model has only the scalar head
    with pytest.raises(ValueError, match=r"has only the scalar head \(it carries no sia.candidate"):
        engine.generate(MSGS, max_tokens=4, config=cfg)


# --------------------------------------------------------------------------- training side
def test_collect_and_fit_learn_a_learnable_teacher(tmp_path: Path, base_model_path: Path,
                                                   candidate_value_model: Path) -> None:
    """Collect real states, then replace the scalar values by a teacher the head's form can
    express (a bilinear form in the prefix's hidden state and the candidate's embedding): the
    fit must reproduce it on its training states and steer closer to it than no steering on
    held-out prompts."""
    from sia_edge.engine import SteeringEngine
    from sia_edge.prompts import Prompt
    from sia_edge.train.candidate import collect_states, fit_candidate_head, load_states, token_embeddings

    prompts = [Prompt(f"{verb} {topic}.", harmful=False)
               for verb in ("Write a poem about", "Explain", "Describe")
               for topic in ("rain", "bread", "rivers", "tides", "cats", "the sky")]
    out = tmp_path / "states.npz"
    with SteeringEngine(base_model_path, candidate_value_model, n_ctx=512, n_threads=1) as eng:
        n = collect_states(eng, prompts, out, k=10, horizon=12)
    states, info = load_states(out)
    assert n == len(states["ids"]) > 40 and info["k"] == 10
    assert np.isfinite(states["hidden"]).all() and np.isfinite(states["values"]).all()
    meta = read_value_meta(candidate_value_model)
    emb = token_embeddings(candidate_value_model)
    rng = np.random.default_rng(0)
    d, norm = emb.shape[1], float(np.linalg.norm(emb, axis=1).mean())
    g = rng.standard_normal((d, 4)) / np.sqrt(d)
    u = rng.standard_normal((d, 4)) / norm
    beta = rng.standard_normal(d) / norm
    token_part = emb[states["ids"]] @ beta  # what a candidate is worth anywhere
    state_part = np.einsum("nr,nkr->nk", states["hidden"] @ g, emb[states["ids"]] @ u)  # and here
    teacher = token_part / token_part.std() + 0.3 * state_part / state_part.std()
    states["values"] = teacher.astype(np.float32)
    fit = fit_candidate_head(states, head_weight=meta.weight, head_bias=meta.bias, embeddings=emb, rank=8,
                             epochs=400, lr=1e-2, val_share=0.2, log=lambda m: None)
    r = fit.report
    h = fit.head
    q = np.stack([ref.candidate_head(hh, meta.weight, meta.bias, h.proj, h.proj_bias, h.table, h.token_bias, ids)
                  for hh, ids in zip(states["hidden"], states["ids"], strict=True)])
    t = states["values"]
    qc, tc = q - q.mean(1, keepdims=True), t - t.mean(1, keepdims=True)
    r2_all = 1 - ((qc - tc) ** 2).sum() / (tc ** 2).sum()
    # it fits what it saw, and steers closer to the teacher than no steering on prompts it did not see
    assert r2_all > 0.6 and r["r2_within_state"] > 0.25, (r2_all, r)
    assert r["kl_teacher_student"] < 0.85 * r["kl_teacher_unsteered"], r


def test_a_damaged_head_asset_is_one_clear_error(tmp_path: Path) -> None:
    from sia_edge.train.candidate import load_head_asset, save_head_asset

    bad = tmp_path / "candidate_head.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"not a candidate head .*re-run tools/train_candidate_head\.py fit"):
        load_head_asset(bad)
    good = tmp_path / "good.safetensors"
    head = random_head(9, 2, 20)
    save_head_asset(head, good)
    np.testing.assert_array_equal(load_head_asset(good).table, head.table)



def test_a_head_shipped_as_factors_expands_against_its_backbone_only(tmp_path: Path, base_model_path: Path) -> None:
    """A preset ships the fit's factors (a few MB for a vocabulary of 262k tokens, not the whole
    table); the build multiplies them out with the backbone's embeddings, and refuses embeddings
    the head was not fitted on."""
    from sia_edge.train import TrainError
    from sia_edge.train.candidate import (
        HeadFactors,
        candidate_asset_of,
        embedding_checksum,
        load_head_asset,
        save_head_asset,
        token_embeddings,
    )

    emb = token_embeddings(base_model_path)
    n, d_emb = emb.shape
    rng = np.random.default_rng(3)
    r, d = 4, 7
    ids = np.array([5, 17, n - 1], dtype=np.int32)
    factors = HeadFactors(proj=rng.standard_normal((r, d)).astype(np.float32),
                          proj_bias=rng.standard_normal(r).astype(np.float32),
                          emb_proj=rng.standard_normal((d_emb, r)).astype(np.float32),
                          emb_bias=rng.standard_normal(d_emb).astype(np.float32), delta_ids=ids,
                          delta_table=rng.standard_normal((3, r)).astype(np.float32),
                          delta_bias=rng.standard_normal(3).astype(np.float32), emb_checksum=embedding_checksum(emb))
    folder = tmp_path / "assets"
    folder.mkdir()
    save_head_asset(factors, folder / "candidate_head.safetensors")
    head = candidate_asset_of(folder, base_model_path)
    assert head is not None and head.table.shape == (n, r) and head.token_bias.shape == (n,)
    want = emb.astype(np.float64) @ factors.emb_proj
    want[ids] += factors.delta_table
    np.testing.assert_allclose(head.table, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head.token_bias[ids], emb[ids] @ factors.emb_bias + factors.delta_bias, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_array_equal(head.proj, factors.proj)
    with pytest.raises(ValueError, match=r"stored as factors .* needs the backbone GGUF"):
        load_head_asset(folder / "candidate_head.safetensors")
    # embeddings the head was not fitted on: a build with another backbone, or the same one re-quantised
    with pytest.raises(ValueError, match=r"fitted on other token embeddings .* backbone GGUF it was fitted on"):
        factors.expand(emb * np.float32(1.001))
    with pytest.raises(ValueError, match="fitted on other token embeddings"):
        factors.expand(emb[::-1])
    save_head_asset(dataclasses.replace(factors, emb_checksum=factors.emb_checksum + 1.0),
                    folder / "candidate_head.safetensors")
    with pytest.raises(TrainError, match="fitted on other token embeddings"):
        candidate_asset_of(folder, base_model_path)
    with pytest.raises(ValueError, match="width"):
        factors.expand(emb[:, :-1])


# --------------------------------------------------------------------------- a shallower student
def test_a_value_gguf_can_recommend_the_candidate_head(tmp_path: Path, candidate_value_model: Path,
                                                       value_model_path: Path) -> None:
    meta = read_value_meta(candidate_value_model)
    rec = tmp_path / "rec.gguf"
    write_gguf_with_value_meta(candidate_value_model, rec, dataclasses.replace(meta, steering_value_head="candidate"))
    assert read_value_meta(rec).recommended_steering() == {"value_head": "candidate"}
    cfg = SteeringConfig.recommended(read_value_meta(rec).recommended_steering())
    assert cfg.value_head == "candidate"
    # the user's choice wins
    assert SteeringConfig.recommended({"value_head": "candidate"}, value_head="scalar").value_head == "scalar"
    # recommending a head the file lacks is refused when it is made, and a name that is no head
    no_head = read_value_meta(value_model_path)
    with pytest.raises(ValueFormatError, match="recommends the candidate head but carries none"):
        dataclasses.replace(no_head, steering_value_head="candidate")
    with pytest.raises(ValueFormatError, match="value_head"):
        dataclasses.replace(meta, steering_value_head="both")


def test_a_student_cut_from_the_default_model_gets_its_own_heads(tmp_path: Path, base_model_path: Path,
                                                                  candidate_value_model: Path) -> None:
    """A 2-layer student of the shipped default value model: its assets keep only the adapter's
    first 2 layers; collect records its hidden state of every prefix (the same as a fresh context
    gives); the fit learns V(s) on them as well as the candidate head; installed, the heads make a
    GGUF that recommends the candidate head, which the engine then uses unasked."""
    from safetensors.numpy import load_file

    from sia_edge.engine import SteeringEngine
    from sia_edge.presets import get_preset
    from sia_edge.prompts import Prompt
    from sia_edge.train import TrainError
    from sia_edge.train.candidate import (
        collect_states,
        fit_candidate_head,
        install_student_heads,
        load_states,
        make_student_assets,
        token_embeddings,
    )
    from sia_edge.train.merge import build_value_gguf
    from sia_edge.train.meta import ValueMeta

    teacher = get_preset("smollm2-safety").assets_dir
    with pytest.raises(TrainError, match=r"between 0 \(the base model.s own state\) and 29"):
        make_student_assets(teacher, tmp_path / "bad", 30)
    folder = make_student_assets(teacher, tmp_path / "student", 2)
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n in load_file(str(folder / "adapter_model.safetensors"))}
    assert layers == {0, 1}
    assert ValueMeta.from_file(folder / "value_meta.json").layers == 2
    gguf = build_value_gguf(folder, tmp_path / "student.gguf", backbone=base_model_path, n_threads=1)
    student = ValueModel(gguf, n_threads=1)
    try:
        assert student.model.meta("llama.block_count") == "2"
        tokens = student.model.tokenize("Hello there, how are you today?")
        scorer = student.new_scorer(n_ctx=128, k_max=4)
        for n in (3, 5, len(tokens)):  # incremental catch-ups against a fresh context's hidden state
            ctx = LlamaContext(student.model, n_ctx=64, n_threads=1, embeddings=True)
            ctx.decode(tokens[:n], 0)
            np.testing.assert_allclose(scorer.hidden_of(tokens[:n]), ctx.hidden_states(n)[-1], atol=1e-4)
            ctx.close()
        scorer.close()
    finally:
        student.close()

    prompts = [Prompt(f"Explain {t}.", harmful=False) for t in ("rain", "bread", "rivers", "tides", "cats", "snow")]
    out = tmp_path / "states.npz"
    with SteeringEngine(base_model_path, candidate_value_model, n_ctx=256, n_threads=1) as eng:
        collect_states(eng, prompts, out, k=10, horizon=8, students=[gguf])
    states, info = load_states(out)
    assert info["students"] == ["student.gguf"]
    # each state's prefix is the start of its prompt's recorded sequence, also across joined files
    twice, _ = load_states(out, out)
    for arrays, n_prompts in ((states, len(prompts)), (twice, 2 * len(prompts))):
        offs, toks = arrays["seq_offsets"], arrays["seq_tokens"]
        assert len(offs) == n_prompts + 1 and offs[-1] == len(toks)
    last = len(twice["prompt"]) - 1
    start = twice["seq_offsets"][twice["prompt"][last]]
    prefix = [int(t) for t in twice["seq_tokens"][start:start + twice["prefix_len"][last]]]
    check = ValueModel(gguf, n_threads=1)
    try:
        assert check.model is not None
        ctx = LlamaContext(check.model, n_ctx=256, n_threads=1, embeddings=True)
        ctx.decode(prefix, 0)
        np.testing.assert_allclose(ctx.hidden_states(len(prefix))[-1], twice["hidden_student0"][last], atol=1e-3)
        ctx.close()
    finally:
        check.close()
    hs = states["hidden_student0"]
    assert hs.shape == states["hidden"].shape and np.isfinite(hs).all()
    assert not np.allclose(hs, states["hidden"])  # 2 layers are not 30
    # a teacher whose state value is linear in the student's hidden state: the fit must learn it
    rng = np.random.default_rng(1)
    direction = rng.standard_normal(hs.shape[1]).astype(np.float32)
    state_value = hs @ direction
    state_value = (state_value - state_value.mean()) / state_value.std()
    states = {**states, "hidden": hs, "values": (states["values"] * 0.1 + state_value[:, None]).astype(np.float32)}
    meta = read_value_meta(gguf)
    fit = fit_candidate_head(states, head_weight=meta.weight, head_bias=meta.bias, embeddings=token_embeddings(gguf),
                             rank=4, epochs=300, lr=1e-2, fit_state_value=True, log=lambda m: None)
    assert fit.state_head is not None
    v = hs @ fit.state_head[0] + fit.state_head[1]
    target = states["values"].mean(1)
    assert 1 - ((v - target) ** 2).sum() / ((target - target.mean()) ** 2).sum() > 0.5

    install_student_heads(folder, fit)
    rebuilt = build_value_gguf(folder, tmp_path / "student2.gguf", backbone=base_model_path, n_threads=1)
    rmeta = read_value_meta(rebuilt)
    assert rmeta.steering_value_head == "candidate" and rmeta.candidate is not None
    np.testing.assert_allclose(rmeta.weight, fit.state_head[0].reshape(-1))
    with SteeringEngine(base_model_path, rebuilt, n_ctx=256, n_threads=1) as eng:
        cfg = eng.recommended()
        assert cfg.value_head == "candidate"
        n_prompt = len(eng.encode_prompt(MSGS))
        res = eng.generate(MSGS, max_tokens=8, config=dataclasses.replace(cfg, gate="dense", horizon=None), seed=0)
        list(res)
    # every token a junction, scored without branch rows: one value-model row per token at most
    assert res.stats.junctions == res.stats.steps > 3
    assert res.stats.value_tokens <= n_prompt + res.stats.tokens


# --------------------------------------------------------------------------- reading the base's own state
@pytest.fixture(scope="module")
def head_only_value_model(tmp_path_factory: pytest.TempPathFactory, base_model_path: Path) -> Path:
    from sia_edge.value_format import (
        HIDDEN_STATE_BASE,
        ValueHeadMeta,
        fingerprint_from_gguf,
        write_head_only_gguf,
    )

    rng = np.random.default_rng(5)
    meta = ValueHeadMeta(weight=(rng.standard_normal(576) / 24).astype(np.float32), bias=0.1,
                         tokenizer_fingerprint=fingerprint_from_gguf(base_model_path), hidden_state=HIDDEN_STATE_BASE,
                         candidate=random_head(576, 8, 49152, seed=3), steering_value_head="candidate")
    return write_head_only_gguf(tmp_path_factory.mktemp("headonly") / "value-head-only.gguf", meta)


def test_a_value_model_without_layers_scores_from_the_base_models_state(base_model_path: Path,
                                                                        head_only_value_model: Path) -> None:
    """Every junction's values equal the candidate head applied to the hidden state a fresh base
    context gives for that prefix; the value model decodes nothing; the base model's own
    sampling is untouched by its context putting out hidden states too."""
    from sia_edge.engine import SteeringEngine
    from sia_edge.llama_backend import LlamaModel

    assert head_only_value_model.stat().st_size < 8 * 2**20  # keys only: no tensors
    with SteeringEngine(base_model_path, head_only_value_model, n_ctx=512, n_threads=1) as eng:
        assert eng.value is not None and eng.value.model is None and eng.value.heads == ("candidate",)
        cfg = eng.recommended(gate="dense", w=2.0)
        assert cfg.value_head == "candidate"
        prompt = eng.encode_prompt(MSGS)
        gen = eng.generate(MSGS, max_tokens=12, config=cfg, seed=4)
        events = list(gen)
        assert gen.stats.junctions == gen.stats.steps >= 6 and gen.stats.value_tokens == 0
        off_here = eng.complete(MSGS, max_tokens=16, config=SteeringConfig(gate="off"), seed=9)[0]
        with pytest.raises(ValueError, match="has only the candidate head"):
            eng.generate(MSGS, max_tokens=2, config=dataclasses.replace(cfg, value_head="scalar"))
        with pytest.raises(ValueError, match=r"best-of-N ranks samples by the scalar head.*has only the candidate head"):
            eng.best_of_n(MSGS, n=2, max_tokens=4, config=SteeringConfig(gate="off"), seed=0)
        meta = eng.value.meta
    with SteeringEngine(base_model_path, None, n_ctx=512, n_threads=1) as plain:
        assert plain.complete(MSGS, max_tokens=16, config=SteeringConfig(gate="off"), seed=9)[0] == off_here
    model = LlamaModel(base_model_path)
    try:
        seq = list(prompt)
        h = meta.candidate
        assert h is not None
        for ev in events:
            ctx = LlamaContext(model, n_ctx=256, n_threads=1, embeddings=True)
            ctx.decode(seq, 0)
            hidden = ctx.hidden_states(len(seq))[-1].copy()
            ctx.close()
            want = ref.candidate_head(hidden, meta.weight, meta.bias, h.proj, h.proj_bias, h.table, h.token_bias,
                                      np.asarray(ev.candidates, dtype=np.int32))
            np.testing.assert_allclose(np.asarray(ev.values), want, atol=0.05 * (1 + float(np.abs(want).max())))
            seq.append(ev.token_id)
    finally:
        model.close()


def test_the_shift_gate_reads_the_base_models_state_at_every_step(base_model_path: Path,
                                                                  head_only_value_model: Path) -> None:
    """The value-aware gate on the real llama.cpp with a base-state head: every step is scored
    from the hidden state the base decode already computed (no value-model token), a step is a
    junction iff its shift reaches tau, and until it steers it samples exactly as off does."""
    import math

    from sia_edge.engine import SteeringEngine

    with SteeringEngine(base_model_path, head_only_value_model, n_ctx=512, n_threads=1) as eng:
        off = eng.generate(MSGS, max_tokens=16, config=SteeringConfig(gate="off"), seed=2)
        off_tokens = [ev.token_id for ev in off]
        cfg = eng.recommended(gate="shift", w=4.0, tau=1.0)
        shifts = eng.gate_statistics([MSGS], config=cfg, max_tokens=16, seed=2)  # scored, never steered
        assert len(shifts) == len(off_tokens) and all(0.0 <= s <= 1.0 for s in shifts) and max(shifts) > 0
        tau = float(np.median(shifts))
        gen = eng.generate(MSGS, max_tokens=24, config=dataclasses.replace(cfg, tau=tau), seed=2)
        events = list(gen)
        assert 0 < gen.stats.junctions < gen.stats.steps and gen.stats.value_tokens == 0
        assert all(ev.junction == (ev.shift >= tau) and not math.isnan(ev.shift) for ev in events)
        # up to its first junction it is the unsteered run, scored
        first = next(i for i, ev in enumerate(events) if ev.junction)
        assert [ev.token_id for ev in events[:first]] == off_tokens[:first]
        assert [ev.shift for ev in events[: first + 1]] == pytest.approx(shifts[: first + 1])


def test_a_value_model_without_layers_must_fit_the_base(tmp_path: Path, base_model_path: Path,
                                                        head_only_value_model: Path) -> None:
    from sia_edge.engine import SteeringEngine, TokenizerMismatchError
    from sia_edge.value_format import write_head_only_gguf

    meta = read_value_meta(head_only_value_model)
    wrong = write_head_only_gguf(tmp_path / "wrong.gguf", dataclasses.replace(meta, tokenizer_fingerprint="v1-x"))
    with pytest.raises(TokenizerMismatchError, match="tokenizers differ"):
        SteeringEngine(base_model_path, wrong, n_threads=1)
    with pytest.raises(ValueFormatError, match="carries none"):
        dataclasses.replace(meta, candidate=None)
    with pytest.raises(ValueFormatError, match="only a value model that reads the base"):
        write_head_only_gguf(tmp_path / "x.gguf", dataclasses.replace(meta, hidden_state="final_norm"))


def test_a_student_of_no_layers_is_built_as_heads_alone(tmp_path: Path, base_model_path: Path) -> None:
    """``student --layers 0``: no adapter, and once its heads are installed the build writes the
    heads alone, a value model the engine runs on the base model's own hidden state."""
    from sia_edge.engine import SteeringEngine
    from sia_edge.presets import get_preset
    from sia_edge.train import TrainError
    from sia_edge.train.candidate import CandidateFit, install_student_heads, make_student_assets
    from sia_edge.train.merge import build_value_gguf

    folder = make_student_assets(get_preset("smollm2-safety").assets_dir, tmp_path / "s0", 0)
    assert sorted(p.name for p in folder.iterdir()) == ["value_head.safetensors", "value_meta.json"]
    with pytest.raises(TrainError, match="carries none"):  # no candidate head yet: nothing it could score with
        build_value_gguf(folder, tmp_path / "early.gguf", backbone=base_model_path)
    rng = np.random.default_rng(0)
    fit = CandidateFit(head=random_head(576, 4, 49152), report={"kl_teacher_student": 0.1},
                       state_head=(rng.standard_normal(576).astype(np.float32), 0.5))
    install_student_heads(folder, fit)
    out = build_value_gguf(folder, tmp_path / "heads.gguf", backbone=base_model_path)
    meta = read_value_meta(out)
    assert meta.reads_base and meta.heads == ("candidate",) and meta.steering_value_head == "candidate"
    with SteeringEngine(base_model_path, out, n_ctx=256, n_threads=1) as eng:
        gen = eng.generate(MSGS, max_tokens=6, config=eng.recommended(gate="dense"), seed=1)
        list(gen)
        assert gen.stats.junctions == gen.stats.steps and gen.stats.value_tokens == 0


def test_the_tool_says_what_is_wrong_with_its_arguments(tmp_path: Path) -> None:
    import subprocess
    import sys

    tool = Path(__file__).resolve().parent.parent / "tools" / "train_candidate_head.py"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, timeout=120,
                              check=False)

    bad_part = run("collect", "--out", str(tmp_path / "s.npz"), "--part", "2/2")
    assert bad_part.returncode == 2 and "--part I/N needs 0 <= I < N" in bad_part.stderr
    (tmp_path / "junk.npz").write_bytes(b"not a collection")
    junk = run("fit", "--states", str(tmp_path / "junk.npz"), "--value-model", str(tmp_path / "v.gguf"))
    assert junk.returncode == 1 and "not a file of collected states" in junk.stderr
    assert "Traceback" not in junk.stderr
