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

// exp(x) for x in [kExpFloor, 0]: x = n ln2 + r, |r| <= ln2 / 2, Cephes expf polynomial.
inline __m512 exp512(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    // exp(r) = 1 + r + r^2 P(r), P of degree 5 evaluated by Estrin's scheme: three independent
    // FMAs then two, instead of a chain of six (the loop is latency-bound, not port-bound).
    const __m512 r2 = _mm512_mul_ps(r, r);
    const __m512 r4 = _mm512_mul_ps(r2, r2);
    const __m512 a = _mm512_fmadd_ps(_mm512_set1_ps(1.6666665459e-1f), r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 b = _mm512_fmadd_ps(_mm512_set1_ps(8.3334519073e-3f), r, _mm512_set1_ps(4.1665795894e-2f));
    const __m512 c = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
    const __m512 poly = _mm512_fmadd_ps(r4, c, _mm512_fmadd_ps(r2, b, a));
    __m512 p = _mm512_fmadd_ps(r2, poly, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

}  // namespace

namespace {

// S += exp(z - M), T += exp(z - M) * (z - M) over one L1-resident block, M = st.M.
inline void block_sums(const float* xb, int64_t len, StatsState& st) {
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
    const float inf = std::numeric_limits<float>::infinity();
    const __m512 vinf = _mm512_set1_ps(inf);
    const __m512 floor = _mm512_set1_ps(kExpFloor);
    const int64_t n_vec = n - n % 16;
    for (int64_t b = 0; b < n_vec; b += kBlock) {
        const int64_t len = n_vec - b < kBlock ? n_vec - b : kBlock;
        const float* xb = logits + b;
        // One fused pass: max, non-finite flags, top-k candidates (threshold in a register,
        // refreshed only after an insertion) and exponential sums against R, the max of the
        // blocks before. A block whose max exceeds R is rescaled after; by more than the
        // headroom (or for the first finite block) its sums are redone against its own max.
        const bool have_ref = st.M != -inf;
        const __m512 vm = _mm512_set1_ps(have_ref ? st.M : 0.0f);
        __m512 vmax = _mm512_set1_ps(-inf);
        __m512 vs = _mm512_setzero_ps(), vt = _mm512_setzero_ps();
        __mmask16 bad = 0;
        __m512 thr = _mm512_set1_ps(st.threshold());
        bool filling = st.count < k;
        for (int64_t i = 0; i < len; i += 16) {
            const __m512 v = _mm512_loadu_ps(xb + i);
            vmax = _mm512_max_ps(v, vmax);  // operand order: a NaN in v returns vmax
            const __mmask16 ok = _mm512_cmp_ps_mask(v, vinf, _CMP_LT_OQ);  // finite or -inf
            bad |= static_cast<__mmask16>(~ok);
            __mmask16 cand = filling ? _mm512_cmp_ps_mask(v, thr, _CMP_GE_OQ)  // any non-NaN
                                     : _mm512_cmp_ps_mask(v, thr, _CMP_GT_OQ);
            if (cand) {
                while (cand) {
                    const int j = __builtin_ctz(cand);
                    cand &= static_cast<__mmask16>(cand - 1);
                    st.insert(static_cast<int32_t>(b + i + j), xb[i + j]);
                }
                thr = _mm512_set1_ps(st.threshold());
                filling = st.count < k;
            }
            const __m512 d = _mm512_max_ps(_mm512_sub_ps(v, vm), floor);
            const __m512 e = exp512(_mm512_min_ps(d, _mm512_set1_ps(kFusedHeadroom)));
            vs = _mm512_mask_add_ps(vs, ok, vs, e);
            vt = _mm512_mask3_fmadd_ps(e, d, vt, ok);
        }
        if (bad) {  // rare: count exactly, in scalar
            for (int64_t i = 0; i < len; ++i) {
                if (xb[i] != xb[i])
                    ++st.nan_count;
                else if (xb[i] == inf)
                    ++st.posinf_count;
            }
        }
        const float block_max = _mm512_reduce_max_ps(vmax);
        if (bad || !have_ref || !(block_max <= st.M + kFusedHeadroom)) {
            st.raise_max(block_max);
            if (st.M != -inf) block_sums(xb, len, st);
            continue;
        }
        st.S += static_cast<double>(_mm512_reduce_add_ps(vs));
        st.T += static_cast<double>(_mm512_reduce_add_ps(vt));
        st.raise_max(block_max);  // rescales this block's sums with the earlier ones
    }
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
