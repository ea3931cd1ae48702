// Pieces shared by every junction_stats implementation: the running state, top-k insertion,
// the block rescale and the scalar span that is both the scalar kernel and every SIMD tail.
//
// Everything here lives in an anonymous namespace on purpose: each ISA file is compiled with
// its own -m flags, and a shared inline function would otherwise be emitted once per file and
// merged by the linker, so the scalar path could end up running an AVX-512 copy.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "sia_kernels.h"

namespace sia {
namespace {

struct StatsState {
    // Top-k insertion list, sorted by logit descending, ties keep the lower (earlier) id first.
    int32_t k = 0;
    int32_t count = 0;
    int32_t* ids = nullptr;
    float* vals = nullptr;
    // Log-sum-exp state: S = sum exp(z - M), T = sum exp(z - M) * (z - M) over finite z seen.
    float M = -std::numeric_limits<float>::infinity();
    double S = 0.0;
    double T = 0.0;
    int64_t nan_count = 0;
    int64_t posinf_count = 0;

    // Smallest logit a new candidate must beat (strictly, since ids only grow) once full.
    inline bool accepts(float x) const { return count < k || x > vals[k - 1]; }
    inline float threshold() const {
        return count < k ? -std::numeric_limits<float>::infinity() : vals[k - 1];
    }

    inline void insert(int32_t id, float x) {
        if (x != x || !accepts(x)) return;  // NaN never enters the list
        int32_t j = count < k ? count++ : k - 1;
        // Shift smaller entries down; equal entries stay ahead of the newcomer (lower id).
        while (j > 0 && vals[j - 1] < x) {
            vals[j] = vals[j - 1];
            ids[j] = ids[j - 1];
            --j;
        }
        vals[j] = x;
        ids[j] = id;
    }

    // Called with the max of a new block before its exponentials are summed.
    inline void raise_max(float block_max) {
        if (!(block_max > M) || std::isinf(block_max)) return;  // -inf block, NaN or +inf
        if (M == -std::numeric_limits<float>::infinity()) {
            M = block_max;
            return;
        }
        // Terms were exp(z - M); they become exp(z - M') = exp(z - M) * f with f = exp(M - M'),
        // and (z - M') = (z - M) + (M - M').
        const double delta = static_cast<double>(M) - static_cast<double>(block_max);
        const double f = std::exp(delta);
        T = f * (T + delta * S);
        S = f * S;
        M = block_max;
    }

    inline void finish(JunctionStats* out) {
        out->nan_count = nan_count;
        out->posinf_count = posinf_count;
        if (S > 0.0) {
            const double log_s = std::log(S);
            out->full_lse = static_cast<double>(M) + log_s;
            out->full_entropy = log_s - T / S;
        } else {  // every logit was -inf (or NaN/+inf, reported above)
            out->full_lse = -std::numeric_limits<double>::infinity();
            out->full_entropy = std::numeric_limits<double>::quiet_NaN();
        }
        out->topk_entropy = topk_entropy(vals, count);
    }
};

// The scalar kernel body over logits[0 .. n) at `stride`, whose first element has id `id0`.
// Two passes per block: max, non-finite counts and top-k, then exponential sums (block in L1).
inline void stats_span_scalar(const float* x, int64_t n, int64_t stride, int32_t id0, StatsState& st) {
    for (int64_t b = 0; b < n; b += kBlock) {
        const int64_t len = n - b < kBlock ? n - b : kBlock;
        const float* xb = x + b * stride;
        float block_max = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < len; ++i) {
            const float v = xb[i * stride];
            if (v != v) {
                ++st.nan_count;
                continue;
            }
            if (v == std::numeric_limits<float>::infinity()) ++st.posinf_count;
            if (v > block_max) block_max = v;
            if (st.accepts(v)) st.insert(id0 + static_cast<int32_t>(b + i), v);
        }
        st.raise_max(block_max);
        if (st.M == -std::numeric_limits<float>::infinity()) continue;
        float s = 0.0f, t = 0.0f;
        for (int64_t i = 0; i < len; ++i) {
            const float v = xb[i * stride];
            if (!(v <= st.M)) continue;  // NaN and +inf are reported, not summed
            const float d = std::fmax(v - st.M, kExpFloor);
            const float e = std::exp(d);
            s += e;
            t += e * d;
        }
        st.S += s;
        st.T += t;
    }
}

inline void stats_begin(StatsState& st, int32_t k, int32_t* top_ids, float* top_logits) {
    st.k = k;
    st.ids = top_ids;
    st.vals = top_logits;
}

}  // namespace
}  // namespace sia
