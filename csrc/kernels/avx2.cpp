// AVX2 + FMA kernels (8 float lanes). Compiled with -mavx2 -mfma for this file only;
// dispatch.cpp calls them only when the CPU supports AVX2 and FMA.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "sia_kernels.h"
#include "stats_common.h"

namespace sia {
namespace {

inline float hmax256(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

inline double hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return static_cast<double>(_mm_cvtss_f32(s));
}

// exp(x) for x in [kExpFloor, 0]: x = n ln2 + r, Cephes expf polynomial, 2^n via the exponent.
inline __m256 exp256(__m256 x) {
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    // exp(r) = 1 + r + r^2 P(r), P of degree 5 evaluated by Estrin's scheme: three independent
    // FMAs then two, instead of a chain of six (the loop is latency-bound, not port-bound).
    const __m256 r2 = _mm256_mul_ps(r, r);
    const __m256 r4 = _mm256_mul_ps(r2, r2);
    const __m256 a = _mm256_fmadd_ps(_mm256_set1_ps(1.6666665459e-1f), r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 b = _mm256_fmadd_ps(_mm256_set1_ps(8.3334519073e-3f), r, _mm256_set1_ps(4.1665795894e-2f));
    const __m256 c = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r, _mm256_set1_ps(1.3981999507e-3f));
    const __m256 poly = _mm256_fmadd_ps(r4, c, _mm256_fmadd_ps(r2, b, a));
    __m256 p = _mm256_fmadd_ps(r2, poly, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // n >= -116 because x >= kExpFloor = -80, so 2^n is a normal float.
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

}  // namespace

void junction_stats_avx2(const float* logits, int64_t n, int64_t stride, int32_t k, int32_t* top_ids,
                         float* top_logits, JunctionStats* out) {
    StatsState st;
    stats_begin(st, k, top_ids, top_logits);
    if (stride != 1) {
        stats_span_scalar(logits, n, stride, 0, st);
        st.finish(out);
        return;
    }
    const float inf = std::numeric_limits<float>::infinity();
    const int64_t n_vec = n - n % 8;
    for (int64_t b = 0; b < n_vec; b += kBlock) {
        const int64_t len = n_vec - b < kBlock ? n_vec - b : kBlock;
        const float* xb = logits + b;
        // Pass 1: max, non-finite flags, top-k candidates above the current threshold.
        // The threshold lives in a register and is refreshed only after an insertion.
        __m256 vmax = _mm256_set1_ps(-inf);
        __m256 bad = _mm256_setzero_ps();
        __m256 thr = _mm256_set1_ps(st.threshold());
        bool filling = st.count < k;
        for (int64_t i = 0; i < len; i += 8) {
            const __m256 v = _mm256_loadu_ps(xb + i);
            vmax = _mm256_max_ps(v, vmax);  // operand order: a NaN in v returns vmax
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, _mm256_set1_ps(inf), _CMP_NLT_UQ));  // NaN or +inf
            int cand = _mm256_movemask_ps(filling ? _mm256_cmp_ps(v, thr, _CMP_GE_OQ)
                                                  : _mm256_cmp_ps(v, thr, _CMP_GT_OQ));
            if (cand) {
                while (cand) {
                    const int j = __builtin_ctz(static_cast<unsigned>(cand));
                    cand &= cand - 1;
                    st.insert(static_cast<int32_t>(b + i + j), xb[i + j]);
                }
                thr = _mm256_set1_ps(st.threshold());
                filling = st.count < k;
            }
        }
        if (_mm256_movemask_ps(bad)) {  // rare: count exactly, in scalar
            for (int64_t i = 0; i < len; ++i) {
                if (xb[i] != xb[i])
                    ++st.nan_count;
                else if (xb[i] == inf)
                    ++st.posinf_count;
            }
        }
        st.raise_max(hmax256(vmax));
        if (st.M == -inf) continue;
        const __m256 vm = _mm256_set1_ps(st.M);
        const __m256 floor = _mm256_set1_ps(kExpFloor);
        __m256 vs0 = _mm256_setzero_ps(), vt0 = _mm256_setzero_ps();
        __m256 vs1 = _mm256_setzero_ps(), vt1 = _mm256_setzero_ps();
        for (int64_t i = 0; i < len; i += 16) {  // len is a multiple of 16 except the last block
            const __m256 v0 = _mm256_loadu_ps(xb + i);
            const __m256 ok0 = _mm256_cmp_ps(v0, vm, _CMP_LE_OQ);  // drops NaN and +inf
            const __m256 d0 = _mm256_max_ps(_mm256_sub_ps(v0, vm), floor);
            const __m256 e0 = _mm256_and_ps(exp256(d0), ok0);
            vs0 = _mm256_add_ps(vs0, e0);
            vt0 = _mm256_fmadd_ps(e0, d0, vt0);
            if (i + 8 >= len) break;
            const __m256 v1 = _mm256_loadu_ps(xb + i + 8);
            const __m256 ok1 = _mm256_cmp_ps(v1, vm, _CMP_LE_OQ);
            const __m256 d1 = _mm256_max_ps(_mm256_sub_ps(v1, vm), floor);
            const __m256 e1 = _mm256_and_ps(exp256(d1), ok1);
            vs1 = _mm256_add_ps(vs1, e1);
            vt1 = _mm256_fmadd_ps(e1, d1, vt1);
        }
        const __m256 vs = _mm256_add_ps(vs0, vs1), vt = _mm256_add_ps(vt0, vt1);
        st.S += hsum256(vs);
        st.T += hsum256(vt);
    }
    stats_span_scalar(logits + n_vec, n - n_vec, 1, static_cast<int32_t>(n_vec), st);
    st.finish(out);
}

void value_head_avx2(const float* hidden, int64_t n_rows, int64_t d, int64_t row_stride, const float* weight,
                     float bias, float* out) {
    const int64_t d_vec = d - d % 8;
    for (int64_t r = 0; r < n_rows; ++r) {
        const float* h = hidden + r * row_stride;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < d_vec; j += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(h + j), _mm256_loadu_ps(weight + j), acc);
        double total = hsum256(acc);
        for (int64_t j = d_vec; j < d; ++j) total += static_cast<double>(h[j]) * weight[j];
        out[r] = static_cast<float>(total + bias);
    }
}

}  // namespace sia
#endif
