// NEON kernels (4 float lanes) for arm64, where NEON is part of the baseline ISA.
#if defined(__aarch64__)
#include <arm_neon.h>

#include <cmath>
#include <limits>

#include "sia_kernels.h"
#include "stats_common.h"

namespace sia {
namespace {

// exp(x) for x in [kExpFloor, 0]: x = n ln2 + r, Cephes expf polynomial, 2^n via the exponent.
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
    const float inf = std::numeric_limits<float>::infinity();
    const int64_t n_vec = n - n % 4;
    for (int64_t b = 0; b < n_vec; b += kBlock) {
        const int64_t len = n_vec - b < kBlock ? n_vec - b : kBlock;
        const float* xb = logits + b;
        float32x4_t vmax = vdupq_n_f32(-inf);
        for (int64_t i = 0; i < len; i += 4) {
            const float32x4_t v = vld1q_f32(xb + i);
            // vmaxnmq ignores a NaN operand, like the scalar path.
            vmax = vmaxnmq_f32(vmax, v);
            // finite and < +inf lanes compare true; NaN or +inf lanes give 0.
            const uint32x4_t good = vcltq_f32(v, vdupq_n_f32(inf));
            if (vminvq_u32(good) == 0) {
                for (int j = 0; j < 4; ++j) {
                    if (xb[i + j] != xb[i + j])
                        ++st.nan_count;
                    else if (xb[i + j] == inf)
                        ++st.posinf_count;
                }
            }
            const float thr = st.threshold();
            const uint32x4_t cand =
                st.count < k ? vcgeq_f32(v, vdupq_n_f32(thr)) : vcgtq_f32(v, vdupq_n_f32(thr));
            if (vmaxvq_u32(cand) != 0) {
                for (int j = 0; j < 4; ++j) st.insert(static_cast<int32_t>(b + i + j), xb[i + j]);
            }
        }
        st.raise_max(vmaxvq_f32(vmax));
        if (st.M == -inf) continue;
        const float32x4_t vm = vdupq_n_f32(st.M);
        const float32x4_t floor = vdupq_n_f32(kExpFloor);
        float32x4_t vs = vdupq_n_f32(0.0f), vt = vdupq_n_f32(0.0f);
        for (int64_t i = 0; i < len; i += 4) {
            const float32x4_t v = vld1q_f32(xb + i);
            const uint32x4_t ok = vcleq_f32(v, vm);  // drops NaN and +inf
            const float32x4_t d = vmaxq_f32(vsubq_f32(v, vm), floor);
            const float32x4_t e = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(exp_neon(d)), ok));
            vs = vaddq_f32(vs, e);
            vt = vfmaq_f32(vt, e, d);
        }
        st.S += static_cast<double>(vaddvq_f32(vs));
        st.T += static_cast<double>(vaddvq_f32(vt));
    }
    stats_span_scalar(logits + n_vec, n - n_vec, 1, static_cast<int32_t>(n_vec), st);
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
