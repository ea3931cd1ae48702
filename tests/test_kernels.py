"""Every ISA of the native kernels against the numpy reference (sia_edge._reference)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sia_edge import _reference as ref
from sia_edge import kernels as K

ISAS = K.available_isas()
VOCABS = [1, 7, 16, 17, 2047, 2048, 2049, 49152, 128001, 262144]


def random_logits(n: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def check_against_reference(z: np.ndarray, k: int) -> K.JunctionStats:
    topk = K.TopK(k)
    stats = K.junction_stats(z, topk)
    want = ref.junction_stats(z, k)
    np.testing.assert_array_equal(topk.ids, want["top_ids"])
    np.testing.assert_array_equal(topk.logits, want["top_logits"])
    assert stats.topk_entropy == pytest.approx(want["topk_entropy"], abs=1e-9)
    assert stats.full_lse == pytest.approx(want["full_lse"], abs=1e-5)
    assert stats.full_entropy == pytest.approx(want["full_entropy"], abs=1e-4)
    return stats


def test_scalar_always_available_and_best_is_default() -> None:
    assert ISAS[0] == "scalar"
    assert K.active_isa() in ISAS


def test_unknown_isa_is_refused() -> None:
    with pytest.raises(ValueError, match="not available"):
        K.force_isa("sse1")


@pytest.mark.parametrize(("n", "k"), [(n, k) for n in VOCABS for k in (1, 10, 40) if k <= n])
def test_junction_stats_matches_reference(isa: str, n: int, k: int) -> None:
    check_against_reference(random_logits(n, seed=n + k), k)


def test_ties_break_by_lower_id(isa: str) -> None:
    z = np.zeros(5000, dtype=np.float32)
    z[[4000, 17, 2500, 33]] = 5.0
    topk = K.TopK(3)
    K.junction_stats(z, topk)
    assert topk.ids.tolist() == [17, 33, 2500]
    z2 = np.full(300, 1.5, dtype=np.float32)  # uniform: the first k ids
    K.junction_stats(z2, topk)
    assert topk.ids.tolist() == [0, 1, 2]


def test_uniform_and_one_hot(isa: str) -> None:
    n = 49157
    stats = check_against_reference(np.full(n, -2.0, dtype=np.float32), 10)
    assert stats.topk_entropy == pytest.approx(math.log(10), abs=1e-12)
    assert stats.full_entropy == pytest.approx(math.log(n), abs=1e-4)
    one_hot = np.full(n, -1e4, dtype=np.float32)
    one_hot[123] = 0.0
    stats = check_against_reference(one_hot, 10)
    assert stats.topk_entropy == pytest.approx(0.0, abs=1e-12)
    assert stats.full_entropy == pytest.approx(0.0, abs=1e-6)


def test_minus_inf_entries_are_masked_tokens(isa: str) -> None:
    z = random_logits(50000, seed=3)
    z[::3] = -np.inf
    check_against_reference(z, 10)
    few = np.full(1000, -np.inf, dtype=np.float32)
    few[[10, 500]] = [1.0, 2.0]
    topk = K.TopK(4)
    stats = K.junction_stats(few, topk)
    assert topk.ids.tolist()[:2] == [500, 10]
    assert np.isneginf(topk.logits[2:]).all()
    assert stats.topk_entropy == pytest.approx(ref.entropy_from_logits(np.array([2.0, 1.0])), abs=1e-12)


def test_huge_values_do_not_overflow(isa: str) -> None:
    z = random_logits(70001, seed=5, scale=1.0)
    z[100] = 3e38
    z[200] = -3e38
    stats = check_against_reference(z, 10)
    assert stats.full_lse == pytest.approx(3e38, rel=1e-6)
    big = random_logits(70001, seed=6, scale=1e4)
    check_against_reference(big, 10)


def test_far_below_the_max_underflows_to_zero(isa: str) -> None:
    # Differences beyond exp's range (the AVX-512 pass lets such terms flush to zero instead of
    # clamping them) next to ordinary ones, one block with a later, larger max, and masked tokens.
    z = random_logits(20000, seed=7)
    z[::5] -= 150.0
    z[5000] = 60.0
    z[15000:15010] = -np.inf
    check_against_reference(z, 10)


def test_kernels_leave_the_floating_point_mode_as_they_found_it(isa: str) -> None:
    # A kernel that flushes denormals while it runs must restore the mode: otherwise numpy code
    # in the caller's thread would silently lose subnormal results afterwards.
    K.junction_stats(random_logits(5000, seed=8), K.TopK(10))
    tiny = np.array([1e-38], dtype=np.float32) * np.float32(1e-3)
    assert tiny[0] > 0.0


def test_result_type_outlives_its_module_attributes() -> None:
    # The extension keeps its own reference to the JunctionStats type: deleting every Python name
    # for it must not free the type that later results are built from.
    import gc

    from sia_edge import _core

    del _core.JunctionStats, K.JunctionStats
    try:
        gc.collect()
        stats = _core.junction_stats(random_logits(100, seed=9), 10, np.zeros(10, np.int32), np.zeros(10, np.float32))
        assert type(stats).__name__ == "JunctionStats"
        assert math.isfinite(stats.full_lse) and stats.full_lse > stats.topk_entropy
    finally:
        _core.JunctionStats = K.JunctionStats = type(_core.junction_stats(
            random_logits(10, seed=9), 1, np.zeros(1, np.int32), np.zeros(1, np.float32)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_posinf_raise(isa: str, bad: float) -> None:
    z = random_logits(49152, seed=7)
    z[40000] = bad
    with pytest.raises(K.NonFiniteLogitsError, match="NaN" if np.isnan(bad) else r"\+inf"):
        K.junction_stats(z, K.TopK(10))


def test_all_minus_inf_raises(isa: str) -> None:
    with pytest.raises(K.NonFiniteLogitsError, match="every logit is -inf"):
        K.junction_stats(np.full(100, -np.inf, dtype=np.float32), K.TopK(3))


def token_data_array(z: np.ndarray) -> np.ndarray:
    """The layout of llama_token_data {int32 id; float logit; float p}, 12 bytes a record."""
    rec = np.zeros(z.size, dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True))
    rec["id"] = np.arange(z.size)
    rec["logit"] = z
    return rec


def test_strided_token_data_view(isa: str) -> None:
    z = random_logits(49152, seed=11)
    rec = token_data_array(z)
    view = rec["logit"]
    assert view.strides == (12,)
    topk = K.TopK(10)
    stats = K.junction_stats(view, topk)
    want = ref.junction_stats(z, 10)
    np.testing.assert_array_equal(topk.ids, want["top_ids"])
    assert stats.full_lse == pytest.approx(want["full_lse"], abs=1e-5)
    values = np.linspace(-1, 1, 10).astype(np.float32)
    K.steer_topk_inplace(view, topk, values, w=2.0, temperature=1.0, rng=K.Rng(1))
    np.testing.assert_allclose(rec["logit"][topk.ids], topk.logits + 2.0 * values, rtol=1e-6)
    untouched = np.setdiff1d(np.arange(z.size), topk.ids)
    np.testing.assert_array_equal(rec["logit"][untouched], z[untouched])


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: np.zeros(100, dtype=np.float64), TypeError, "float32"),
        (lambda: np.zeros(100, dtype=np.float16), TypeError, "float32"),
        (lambda: np.zeros((10, 10), dtype=np.float32), ValueError, "1-D"),
        (lambda: np.zeros(100, dtype=np.float32)[::-1], ValueError, "stride"),
        (lambda: np.zeros(0, dtype=np.float32), ValueError, "empty"),
    ],
)
def test_bad_logits_buffers_are_refused(make, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        K.junction_stats(make(), K.TopK(1))


def test_k_out_of_range() -> None:
    with pytest.raises(ValueError, match="k must be"):
        K.junction_stats(np.zeros(5, dtype=np.float32), K.TopK(6))
    with pytest.raises(ValueError, match="k must be"):
        K.TopK(0)


def test_readonly_buffer_refused_for_in_place_steering() -> None:
    z = random_logits(100)
    topk = K.TopK(3)
    K.junction_stats(z, topk)
    z.flags.writeable = False
    K.junction_stats(z, topk)  # reading is fine
    with pytest.raises(ValueError, match="read-only"):
        K.steer_topk_inplace(z, topk, np.zeros(3, np.float32), w=1.0, temperature=1.0, rng=K.Rng(0))


def test_steering_parameter_errors() -> None:
    z = random_logits(100)
    topk = K.TopK(3)
    K.junction_stats(z, topk)
    with pytest.raises(ValueError, match="w must be finite"):
        K.steer_topk_inplace(z, topk, np.zeros(3, np.float32), w=math.nan, temperature=1.0, rng=K.Rng(0))
    with pytest.raises(ValueError, match="temperature"):
        K.steer_topk_inplace(z, topk, None, w=1.0, temperature=-1.0, rng=K.Rng(0))
    with pytest.raises(ValueError, match="values contain NaN"):
        K.steer_topk_inplace(z, topk, np.array([0, np.nan, 0], np.float32), w=1.0, temperature=1.0, rng=K.Rng(0))
    with pytest.raises(ValueError, match="one entry per candidate"):
        K.steer_topk_inplace(z, topk, np.zeros(4, np.float32), w=1.0, temperature=1.0, rng=K.Rng(0))


def test_steer_distribution_matches_reference() -> None:
    z = random_logits(1000, seed=2)
    topk = K.TopK(10)
    K.junction_stats(z, topk)
    values = np.random.default_rng(0).standard_normal(10).astype(np.float32)
    probs = np.zeros(10)
    K.steer_topk_inplace(z.copy(), topk, values, w=1.5, temperature=0.7, rng=K.Rng(3), probs_out=probs)
    # temperature crosses the binding as float32 (0.7 -> 0.69999999), hence rtol 1e-6
    np.testing.assert_allclose(probs, ref.steer_probs(topk.logits, values, 1.5, 0.7), rtol=1e-6)
    # The empirical frequencies follow that distribution (chi-square, 20000 draws, p ~ 1e-6 bound).
    rng = K.Rng(42)
    counts = np.zeros(10)
    for _ in range(20000):
        counts[K.steer_topk_inplace(z.copy(), topk, values, w=1.5, temperature=0.7, rng=rng)] += 1
    expected = probs * 20000
    keep = expected > 5
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum()
    assert chi2 < 45.0, (counts, expected)


@pytest.mark.parametrize(("top_p", "min_p"), [(0.5, 0.0), (0.9, 0.0), (0.0, 0.0), (1.0, 0.2), (0.8, 0.05), (1.0, 1.0)])
def test_top_p_and_min_p_truncate_the_sampled_distribution(top_p: float, min_p: float) -> None:
    z = random_logits(1000, seed=6)
    topk = K.TopK(12)
    K.junction_stats(z, topk)
    values = np.random.default_rng(2).standard_normal(12).astype(np.float32)
    want = ref.steer_probs(topk.logits, values, 1.5, 0.8, top_p=top_p, min_p=min_p)
    probs = np.zeros(12)
    rng = K.Rng(3)
    drawn = {K.steer_topk_inplace(z.copy(), topk, values, w=1.5, temperature=0.8, rng=rng, probs_out=probs,
                                  top_p=top_p, min_p=min_p) for _ in range(400)}
    np.testing.assert_allclose(probs, want, rtol=1e-6, atol=1e-12)
    assert drawn <= set(np.flatnonzero(want))  # never a truncated candidate
    kept = np.flatnonzero(want)
    untruncated = ref.steer_probs(topk.logits, values, 1.5, 0.8)
    assert 1 <= kept.size < 12 or (top_p == 1.0 and untruncated.min() >= min_p * untruncated.max())
    # what was kept: every candidate at least min_p times the likeliest, and of those the likeliest
    # whose mass first reaches top_p
    likeliest = untruncated.max()
    assert all(untruncated[i] >= min_p * likeliest * (1 - 1e-9) for i in kept)
    # plain sampling (no values) at a step below the gate truncates the same way
    plain = np.zeros(12)
    K.junction_step(z, topk, threshold=math.inf, gate_on_full_entropy=False, temperature=0.8, rng=K.Rng(1),
                    top_p=top_p, min_p=min_p, probs_out=plain)
    np.testing.assert_allclose(plain, ref.steer_probs(topk.logits, None, 0.0, 0.8, top_p=top_p, min_p=min_p),
                               rtol=1e-6, atol=1e-12)


def test_temperature_zero_is_argmax_of_steered_logits() -> None:
    z = np.array([3.0, 2.0, 1.0, 0.0], np.float32)
    topk = K.TopK(4)
    K.junction_stats(z, topk)
    values = np.array([0.0, 0.0, 5.0, 0.0], np.float32)
    assert K.steer_topk_inplace(z.copy(), topk, values, w=1.0, temperature=0.0, rng=K.Rng(0)) == 2
    assert K.steer_topk_inplace(z.copy(), topk, None, w=1.0, temperature=0.0, rng=K.Rng(0)) == 0


def test_same_seed_same_token_on_every_isa() -> None:
    z = random_logits(49152, seed=9)
    values = np.random.default_rng(1).standard_normal(10).astype(np.float32)
    picks = {}
    before = K.active_isa()
    for name in ISAS:
        K.force_isa(name)
        rng = K.Rng(1234)
        seq = []
        for _ in range(50):
            topk = K.TopK(10)
            K.junction_stats(z, topk)
            seq.append(int(topk.ids[K.steer_topk_inplace(z.copy(), topk, values, w=1.0, temperature=1.0, rng=rng)]))
        picks[name] = seq
    K.force_isa(before)
    assert all(seq == picks["scalar"] for seq in picks.values())


def test_junction_step_samples_below_threshold_and_defers_above(isa: str) -> None:
    z = random_logits(49152, seed=4)
    topk = K.TopK(10)
    stats = K.junction_stats(z, topk)
    chosen, s2 = K.junction_step(z, topk, threshold=stats.topk_entropy + 1e-6, gate_on_full_entropy=False,
                                 temperature=1.0, rng=K.Rng(5))
    assert 0 <= chosen < 10 and s2 == stats
    # The same draw as sampling through steer_topk_inplace with no values.
    assert chosen == K.steer_topk_inplace(z.copy(), topk, None, w=1.0, temperature=1.0, rng=K.Rng(5))
    chosen, _ = K.junction_step(z, topk, threshold=stats.topk_entropy, gate_on_full_entropy=False,
                                temperature=1.0, rng=K.Rng(5))
    assert chosen == -1
    chosen, _ = K.junction_step(z, topk, threshold=stats.full_entropy, gate_on_full_entropy=True,
                                temperature=1.0, rng=K.Rng(5))
    assert chosen == -1


@pytest.mark.parametrize("d", [1, 15, 16, 17, 576, 2049])
def test_value_head_matches_reference(isa: str, d: int) -> None:
    rng = np.random.default_rng(d)
    hidden_full = rng.standard_normal((7, d + 5)).astype(np.float32)
    hidden = hidden_full[:, :d]  # rows with a row stride wider than the width
    weight = rng.standard_normal(d).astype(np.float32)
    out = K.value_head(hidden, weight, 0.25)
    np.testing.assert_allclose(out, ref.value_head(hidden, weight, 0.25), rtol=1e-5, atol=1e-5 * math.sqrt(d))


def test_value_head_shape_errors() -> None:
    with pytest.raises(ValueError, match="weight has 3 entries"):
        K.value_head(np.zeros((2, 4), np.float32), np.zeros(3, np.float32), 0.0)
    with pytest.raises(TypeError, match="2-D float32"):
        K.value_head(np.zeros(4, np.float32), np.zeros(4, np.float32), 0.0)


finite_logits = hnp.arrays(
    np.float32,
    st.integers(min_value=1, max_value=3000),
    elements=st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=150, deadline=None)
@given(z=finite_logits, k=st.integers(1, 12), shift=st.floats(-1e3, 1e3, width=32))
def test_properties_entropy_bounds_and_shift_invariance(z: np.ndarray, k: int, shift: float) -> None:
    k = min(k, z.size)
    for name in ISAS:
        K.force_isa(name)
        topk = K.TopK(k)
        stats = K.junction_stats(z, topk)
        assert -1e-12 <= stats.topk_entropy <= math.log(k) + 1e-9
        assert -1e-4 <= stats.full_entropy <= math.log(z.size) + 1e-4
        assert stats.full_lse >= float(z.max()) - 1e-4
        shifted = (z + np.float32(shift)).astype(np.float32)
        if np.array_equal(shifted - np.float32(shift), z):  # shift exact in float32
            topk2 = K.TopK(k)
            s2 = K.junction_stats(shifted, topk2)
            np.testing.assert_array_equal(topk.ids, topk2.ids)
            assert s2.topk_entropy == pytest.approx(stats.topk_entropy, abs=1e-6)
            assert s2.full_entropy == pytest.approx(stats.full_entropy, abs=1e-3)
    K.force_isa(ISAS[-1])


def test_kernels_from_several_threads() -> None:
    """The GIL is released inside the kernels: concurrent calls must give the serial answers."""
    inputs = [random_logits(262144, seed=s) for s in range(4)]
    expected = []
    for z in inputs:
        topk = K.TopK(10)
        expected.append((K.junction_stats(z, topk), topk.ids.copy()))
    errors: list[str] = []

    def worker(i: int) -> None:
        topk = K.TopK(10)
        for _ in range(30):
            stats = K.junction_stats(inputs[i], topk)
            if stats != expected[i][0] or not np.array_equal(topk.ids, expected[i][1]):
                errors.append(f"thread {i} diverged")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
