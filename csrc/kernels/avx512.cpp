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

// exp(x) for x <= kFusedHeadroom in eight instructions (Ops512::exp below), relative error below
// 4e-7 where it matters (x > -12; below, the terms are < 1e-5 of the max term and the error grows
// to 3e-6 at -80; under the kernel's flush-to-zero, results below the float range become 0).
// x = (32 n + j) ln2 / 32 + r with |r| <= ln2 / 64, so exp(x) = 2^n * 2^(j/32) * e^r: 2^(j/32)
// from a 32-entry table held in two registers (one permute), e^r from a degree-2 polynomial, 2^n
// by vscalefps (which floors its exponent).
// The fixed-point trick: t = x * 32/ln2 + 1.5 * 2^23 rounds x * 32/ln2 to an integer m held in
// t's low mantissa bits (so the permute reads j = m mod 32 from them), and
// (t - 1.5 * 2^23) / 32 = m / 32 is exact, with floor(m / 32) = n.

// 2^(j/32), j < 32, rounded to float: literals, so that nothing in this file runs at load time
// (it is compiled with -mavx512f and may only run after dispatch.cpp has checked the CPU).
alignas(64) constexpr float kExp2Table[32] = {1.0f,
                                              1.0218971967697144f,
                                              1.0442737340927124f,
                                              1.0671404600143433f,
                                              1.0905077457427979f,
                                              1.114386796951294f,
                                              1.1387885808944702f,
                                              1.1637248992919922f,
                                              1.1892070770263672f,
                                              1.215247392654419f,
                                              1.2418577671051025f,
                                              1.2690509557724f,
                                              1.2968395948410034f,
                                              1.3252366781234741f,
                                              1.3542555570602417f,
                                              1.3839099407196045f,
                                              1.4142135381698608f,
                                              1.4451807737350464f,
                                              1.4768261909484863f,
                                              1.5091644525527954f,
                                              1.5422108173370361f,
                                              1.5759809017181396f,
                                              1.610490322113037f,
                                              1.6457555294036865f,
                                              1.6817928552627563f,
                                              1.7186193466186523f,
                                              1.7562521696090698f,
                                              1.7947090864181519f,
                                              1.8340080976486206f,
                                              1.8741676807403564f,
                                              1.9152065515518188f,
                                              1.9571441411972046f};

struct Ops512 {
    using V = __m512;
    static constexpr int64_t kWidth = 16;
    static constexpr int kGroup = 4;  // measured: 11% faster than 2 at 49k and 262k, 8 no better
    __m512 tab_lo = _mm512_load_ps(kExp2Table), tab_hi = _mm512_load_ps(kExp2Table + 16);

    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static V set1(float x) { return _mm512_set1_ps(x); }
    static V max(V a, V b) { return _mm512_max_ps(a, b); }  // a NaN in either returns b
    static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static unsigned ge_mask(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
    static V where_le(V a, V b, V x) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, b, _CMP_LE_OQ), x); }
    static float hmax(V v) { return _mm512_reduce_max_ps(v); }
    static double hsum(V v) { return static_cast<double>(_mm512_reduce_add_ps(v)); }
    // No clamp at kExpFloor: under flush-to-zero (set by the kernel) exp of a very negative
    // finite d scales to 0; -inf gives a NaN d (NaN exponent), which sends the block the careful way.
    static V fused_diff(V v, V ref) { return _mm512_sub_ps(v, ref); }

    inline V exp(V x) const {
        const float magic = 12582912.0f;  // 1.5 * 2^23
        const V t = _mm512_fmadd_ps(x, _mm512_set1_ps(46.166241308446828f), _mm512_set1_ps(magic));
        const V m32 = _mm512_fmadd_ps(t, _mm512_set1_ps(0.03125f), _mm512_set1_ps(-magic / 32.0f));
        const V r = _mm512_fnmadd_ps(m32, _mm512_set1_ps(0.693147180559945309f), x);
        const V p = _mm512_fmadd_ps(r, _mm512_fmadd_ps(r, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f)),
                                    _mm512_set1_ps(1.0f));
        const V frac = _mm512_mul_ps(p, _mm512_permutex2var_ps(tab_lo, _mm512_castps_si512(t), tab_hi));
        return _mm512_scalef_ps(frac, m32);
    }
};

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
    // Flush denormal results to zero in this thread while the kernel runs, restored after: the
    // fused pass lets exp underflow instead of clamping its argument. FTZ only: DAZ would make
    // subnormal logits compare equal to 0.
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8000u);
    fused_stats_span(Ops512{}, logits, n, st);
    _mm_setcsr(csr);
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
