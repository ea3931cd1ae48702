// AVX-512F kernels (16 float lanes). Compiled with -mavx512f -mfma for this file only;
// dispatch.cpp calls them only when the CPU and OS support AVX-512F.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// GCC 12's AVX-512 reduction intrinsics start from _mm512_undefined_ps(), which trips
// -Wmaybe-uninitialized inside the compiler's own header (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <cmath>
#include <limits>

#include "sia_kernels.h"
#include "stats_common.h"

namespace sia {
namespace {

// exp(x) for x in [kExpFloor, kFusedHeadroom] in eight instructions, relative error below 4e-7
// where it matters (x > -12; below, the terms are < 1e-5 of the max term and the error grows
// to 3e-6 at kExpFloor). x = (32 n + j) ln2 / 32 + r with |r| <= ln2 / 64, so
// exp(x) = 2^n * 2^(j/32) * e^r: 2^(j/32) from a 32-entry table held in two registers (one
// permute), e^r from a degree-2 polynomial, 2^n by vscalefps (which floors its exponent).
// The fixed-point trick: t = x * 32/ln2 + 1.5 * 2^23 rounds x * 32/ln2 to an integer m held in
// t's low mantissa bits (so the permute reads j = m mod 32 from them), and
// (t - 1.5 * 2^23) / 32 = m / 32 is exact, with floor(m / 32) = n.
struct Exp2Table {  // 2^(j/32), j < 32: filled once at load, not per call
    alignas(64) float v[32];
    Exp2Table() {
        for (int j = 0; j < 32; ++j) v[j] = static_cast<float>(std::exp2(j / 32.0));
    }
};
const Exp2Table kExp2Table;

struct Exp512 {
    __m512 tab_lo = _mm512_load_ps(kExp2Table.v), tab_hi = _mm512_load_ps(kExp2Table.v + 16);
    inline __m512 operator()(__m512 x) const {
        const float magic = 12582912.0f;  // 1.5 * 2^23
        const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(46.166241308446828f), _mm512_set1_ps(magic));
        const __m512 m32 = _mm512_fmadd_ps(t, _mm512_set1_ps(0.03125f), _mm512_set1_ps(-magic / 32.0f));
        const __m512 r = _mm512_fnmadd_ps(m32, _mm512_set1_ps(0.693147180559945309f), x);
        const __m512 p = _mm512_fmadd_ps(r, _mm512_fmadd_ps(r, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f)),
                                         _mm512_set1_ps(1.0f));
        const __m512 frac = _mm512_mul_ps(p, _mm512_permutex2var_ps(tab_lo, _mm512_castps_si512(t), tab_hi));
        return _mm512_scalef_ps(frac, m32);
    }
};

}  // namespace

namespace {

// S += exp(z - M), T += exp(z - M) * (z - M) over one L1-resident block, M = st.M: the
// careful path for the rare blocks the fused pass cannot take (non-finite logits, a new max).
inline void block_sums(const float* xb, int64_t len, const Exp512& exp512, StatsState& st) {
    const __m512 vm = _mm512_set1_ps(st.M);
    const __m512 floor = _mm512_set1_ps(kExpFloor);
    __m512 vs = _mm512_setzero_ps(), vt = _mm512_setzero_ps();
    for (int64_t i = 0; i < len; i += 16) {
        const __m512 v = _mm512_loadu_ps(xb + i);
        const __mmask16 ok = _mm512_cmp_ps_mask(v, vm, _CMP_LE_OQ);  // drops NaN and +inf
        const __m512 d = _mm512_max_ps(_mm512_sub_ps(v, vm), floor);
        const __m512 e = exp512(d);
        vs = _mm512_mask_add_ps(vs, ok, vs, e);
        vt = _mm512_mask3_fmadd_ps(e, d, vt, ok);
    }
    st.S += static_cast<double>(_mm512_reduce_add_ps(vs));
    st.T += static_cast<double>(_mm512_reduce_add_ps(vt));
}

// exp(z - R) may exceed 1 in the fused pass; below this headroom the float lanes cannot
// overflow (e^60 * 2048 < 3e38), above it the block is summed again against its own max.
constexpr float kFusedHeadroom = 60.0f;

}  // namespace

void junction_stats_avx512(const float* logits, int64_t n, int64_t stride, int32_t k, int32_t* top_ids,
                           float* top_logits, JunctionStats* out) {
    StatsState st;
    stats_begin(st, k, top_ids, top_logits);
    if (stride != 1) {  // gathers would cost more than they save; see the precision policy
        stats_span_scalar(logits, n, stride, 0, st);
        st.finish(out);
        return;
    }
    const Exp512 exp512;
    const float inf = std::numeric_limits<float>::infinity();
    // Flush denormal results to zero in this thread while the kernel runs (restored on return): the
    // fused pass lets exp underflow instead of clamping its argument.
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8000u);  // FTZ only: DAZ would make subnormal logits compare equal to 0
    const int64_t n_vec = n - n % 16;
    for (int64_t b = 0; b < n_vec; b += kBlock) {
        const int64_t len = n_vec - b < kBlock ? n_vec - b : kBlock;
        const float* xb = logits + b;
        if (st.M == -inf) {  // no reference max yet: take this block's (NaN ignored), one cheap pass
            __m512 vmax0 = _mm512_set1_ps(-inf);
            for (int64_t i = 0; i < len; i += 16) vmax0 = _mm512_max_ps(_mm512_loadu_ps(xb + i), vmax0);
            st.raise_max(_mm512_reduce_max_ps(vmax0));
        }
        // One fused pass per block: max, top-k candidates (threshold in a register, refreshed
        // only after an insertion) and exponential sums against R, the max of the blocks so far.
        // The loop has no masks: -inf becomes exp(kExpFloor), and a NaN or +inf logit makes the
        // T sum non-finite (d is NaN or +inf, and e * d is then never finite). Such a block, a
        // block whose max exceeds R by more than the headroom, or one with no reference yet, is
        // counted and summed again on the careful path; a block with a smaller new max is
        // rescaled after (raise_max).
        const bool have_ref = st.M != -inf;
        const __m512 vm = _mm512_set1_ps(have_ref ? st.M : 0.0f);
        __m512 vmax = _mm512_set1_ps(-inf);
        // Two accumulator pairs, one per vector of a step: independent add chains.
        __m512 vs[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, vt[2] = {vs[0], vs[0]};
        __m512 thr = _mm512_set1_ps(st.threshold());
        // Two vectors per step share one top-k test (on their pairwise max), which also feeds
        // the block max: the test rarely passes once the list is full.
        const auto insert_candidates = [&](int64_t i, __m512 v) {
            __mmask16 cand = _mm512_cmp_ps_mask(v, thr, _CMP_GE_OQ);  // never NaN
            while (cand) {
                const int j = __builtin_ctz(cand);
                cand &= static_cast<__mmask16>(cand - 1);
                st.insert(static_cast<int32_t>(b + i + j), xb[i + j]);
            }
            thr = _mm512_set1_ps(st.threshold());
        };
        const auto accumulate = [&](int u, __m512 v) {
            // No clamp at kExpFloor here: under flush-to-zero (set below) exp of a very negative
            // finite d scales to 0; -inf gives a NaN d, which sends the block the careful way.
            const __m512 d = _mm512_sub_ps(v, vm);
            const __m512 e = exp512(d);
            vs[u] = _mm512_add_ps(vs[u], e);
            vt[u] = _mm512_fmadd_ps(e, d, vt[u]);
        };
        int64_t i = 0;
        for (; i + 32 <= len; i += 32) {
            const __m512 v0 = _mm512_loadu_ps(xb + i), v1 = _mm512_loadu_ps(xb + i + 16);
            // A NaN lane can hide the other vector's lane from this test; that is harmless, as
            // a NaN anywhere makes the step rejected (the top-k is unspecified, see the policy).
            const __m512 v01 = _mm512_max_ps(v1, v0);
            vmax = _mm512_max_ps(v01, vmax);
            // >= so that the list fills from -inf; once full, ties with the k-th are rejected
            // by insert() (the lower id stays), so >= only costs a rare extra call.
            if (_mm512_cmp_ps_mask(v01, thr, _CMP_GE_OQ)) {
                insert_candidates(i, v0);  // in id order: ties keep the lower id
                insert_candidates(i + 16, v1);
            }
            accumulate(0, v0);
            accumulate(1, v1);
        }
        for (; i < len; i += 16) {
            const __m512 v = _mm512_loadu_ps(xb + i);
            vmax = _mm512_max_ps(v, vmax);
            if (_mm512_cmp_ps_mask(v, thr, _CMP_GE_OQ)) insert_candidates(i, v);
            accumulate(0, v);
        }
        const float block_max = _mm512_reduce_max_ps(vmax);
        const float s = _mm512_reduce_add_ps(_mm512_add_ps(vs[0], vs[1]));
        const float t = _mm512_reduce_add_ps(_mm512_add_ps(vt[0], vt[1]));
        if (!have_ref || !std::isfinite(t) || !std::isfinite(s) || !(block_max <= st.M + kFusedHeadroom)) {
            for (int64_t i = 0; i < len; ++i) {  // rare: count non-finite logits exactly
                if (xb[i] != xb[i])
                    ++st.nan_count;
                else if (xb[i] == inf)
                    ++st.posinf_count;
            }
            st.raise_max(block_max);
            if (st.M != -inf) block_sums(xb, len, exp512, st);
            continue;
        }
        st.S += static_cast<double>(s);
        st.T += static_cast<double>(t);
        st.raise_max(block_max);  // rescales this block's sums with the earlier ones
    }
    _mm_setcsr(csr);
    stats_span_scalar(logits + n_vec, n - n_vec, 1, static_cast<int32_t>(n_vec), st);
    st.finish(out);
}

void value_head_avx512(const float* hidden, int64_t n_rows, int64_t d, int64_t row_stride,
                       const float* weight, float bias, float* out) {
    const int64_t d_vec = d - d % 16;
    for (int64_t r = 0; r < n_rows; ++r) {
        const float* h = hidden + r * row_stride;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < d_vec; j += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(h + j), _mm512_loadu_ps(weight + j), acc);
        double total = static_cast<double>(_mm512_reduce_add_ps(acc));
        for (int64_t j = d_vec; j < d; ++j) total += static_cast<double>(h[j]) * weight[j];
        out[r] = static_cast<float>(total + bias);
    }
}

}  // namespace sia
#endif
