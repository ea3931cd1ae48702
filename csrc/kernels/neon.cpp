// NEON kernels (4 float lanes) for arm64, where NEON is part of the baseline ISA.
#if defined(__aarch64__)
#include <arm_neon.h>

#include <cmath>
#include <limits>

#include "sia_kernels.h"
#include "stats_common.h"

namespace sia {
namespace {

// exp(x) for x in [kExpFloor, kFusedHeadroom]: x = n ln2 + r, Cephes expf polynomial, 2^n via the
// exponent (n >= -116 as x >= kExpFloor = -80; above the headroom the fused pass discards the
// block). NEON has no float permute from a register table, so no 2^(j/32) table as on x86.
inline float32x4_t exp_neon(float32x4_t x) {
    const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

struct OpsNeon {
    using V = float32x4_t;
    static constexpr int64_t kWidth = 4;
    static constexpr int kGroup = 4;  // not measured: no arm64 machine here (checked under qemu)

    static V load(const float* p) { return vld1q_f32(p); }
    static V set1(float x) { return vdupq_n_f32(x); }
    static V max(V a, V b) { return vmaxnmq_f32(a, b); }  // a NaN operand is ignored, as on x86
    static V sub(V a, V b) { return vsubq_f32(a, b); }
    static V add(V a, V b) { return vaddq_f32(a, b); }
    static V fmadd(V a, V b, V c) { return vfmaq_f32(c, a, b); }
    static unsigned ge_mask(V a, V b) {
        const uint32x4_t bits = {1u, 2u, 4u, 8u};
        return vaddvq_u32(vandq_u32(vcgeq_f32(a, b), bits));
    }
    static V where_le(V a, V b, V x) {
        return vreinterpretq_f32_u32(vandq_u32(vcleq_f32(a, b), vreinterpretq_u32_f32(x)));
    }
    static float hmax(V v) { return vmaxnmvq_f32(v); }
    static double hsum(V v) { return static_cast<double>(vaddvq_f32(v)); }
    // Clamped: -inf becomes exp(kExpFloor); vmaxq (not vmaxnmq) keeps a NaN.
    static V fused_diff(V v, V ref) { return vmaxq_f32(vdupq_n_f32(kExpFloor), vsubq_f32(v, ref)); }
    static V exp(V x) { return exp_neon(x); }
};

}  // namespace

void junction_stats_neon(const float* logits, int64_t n, int64_t stride, int32_t k, int32_t* top_ids,
                         float* top_logits, JunctionStats* out) {
    StatsState st;
    stats_begin(st, k, top_ids, top_logits);
    if (stride != 1) {
        stats_span_scalar(logits, n, stride, 0, st);
        st.finish(out);
        return;
    }
    fused_stats_span(OpsNeon{}, logits, n, st);
    st.finish(out);
}

void value_head_neon(const float* hidden, int64_t n_rows, int64_t d, int64_t row_stride, const float* weight,
                     float bias, float* out) {
    const int64_t d_vec = d - d % 4;
    for (int64_t r = 0; r < n_rows; ++r) {
        const float* h = hidden + r * row_stride;
        float32x4_t acc = vdupq_n_f32(0.0f);
        for (int64_t j = 0; j < d_vec; j += 4) acc = vfmaq_f32(acc, vld1q_f32(h + j), vld1q_f32(weight + j));
        double total = static_cast<double>(vaddvq_f32(acc));
        for (int64_t j = d_vec; j < d; ++j) total += static_cast<double>(h[j]) * weight[j];
        out[r] = static_cast<float>(total + bias);
    }
}

}  // namespace sia
#endif
