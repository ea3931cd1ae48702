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

// exp(z - R) may exceed 1 in the fused pass; below this headroom the float lanes cannot
// overflow (e^60 * 2048 < 3e38), above it the block is summed again against its own max.
constexpr float kFusedHeadroom = 60.0f;

// The careful sums of one L1-resident block: S += exp(z - M), T += exp(z - M) * (z - M) with
// M = st.M, NaN and +inf lanes dropped. For the rare blocks the fused pass cannot take.
template <class Ops>
inline void careful_block_sums(const Ops& ops, const float* xb, int64_t len, StatsState& st) {
    using V = typename Ops::V;
    const V vm = ops.set1(st.M), floor = ops.set1(kExpFloor);
    V vs = ops.set1(0.0f), vt = vs;
    for (int64_t i = 0; i < len; i += Ops::kWidth) {
        const V v = ops.load(xb + i);
        const V d = ops.where_le(v, vm, ops.max(ops.sub(v, vm), floor));  // v <= M drops NaN and +inf
        const V e = ops.where_le(v, vm, ops.exp(d));
        vs = ops.add(vs, e);
        vt = ops.fmadd(e, d, vt);
    }
    st.S += ops.hsum(vs);
    st.T += ops.hsum(vt);
}

// The SIMD junction_stats pass, written once over an ISA's vector operations (Ops: V, kWidth,
// load, set1, max, sub, add, fmadd, ge_mask, where_le, hmax, hsum, exp and fused_diff); each
// ISA file instantiates it with its own compiler flags. Per block of kBlock logits, one fused
// pass: the block max, the top-k (a test against the k-th logit held in a register, on the
// lane-wise max of a group of kGroup vectors, refreshed only after an insertion) and the exponential sums
// against R, the max of the blocks so far, with no masks: fused_diff(v, R) keeps a NaN, and a
// NaN or +inf logit makes the T sum non-finite (e * d never is finite then). Such a block, a
// block whose max exceeds R by more than the headroom, or one with no reference yet is counted
// and summed again on the careful path; a block with a smaller new max is rescaled after.
template <class Ops>
inline void fused_stats_span(const Ops& ops, const float* logits, int64_t n, StatsState& st) {
    using V = typename Ops::V;
    constexpr int64_t W = Ops::kWidth;
    constexpr int G = Ops::kGroup;  // vectors per top-k test
    const float inf = std::numeric_limits<float>::infinity();
    const int64_t n_vec = n - n % W;
    for (int64_t b = 0; b < n_vec; b += kBlock) {
        const int64_t len = n_vec - b < kBlock ? n_vec - b : kBlock;
        const float* xb = logits + b;
        if (st.M == -inf) {  // no reference max yet: take this block's (NaN ignored), one cheap pass
            V vmax0 = ops.set1(-inf);
            for (int64_t i = 0; i < len; i += W) vmax0 = ops.max(ops.load(xb + i), vmax0);
            st.raise_max(ops.hmax(vmax0));
        }
        const bool have_ref = st.M != -inf;
        const V vm = ops.set1(have_ref ? st.M : 0.0f);
        V vmax = ops.set1(-inf);
        // Four independent accumulator chains: the exponentials of a group overlap in flight.
        const V zero = ops.set1(0.0f);
        V vs[4] = {zero, zero, zero, zero}, vt[4] = {zero, zero, zero, zero};
        V thr = ops.set1(st.threshold());
        // >= so that the list fills from -inf; once full, ties with the k-th are rejected by
        // insert() (the lower id stays), so >= only costs a rare extra call. Never true for NaN.
        const auto insert_candidates = [&](int64_t i, V v) {
            for (unsigned cand = ops.ge_mask(v, thr); cand; cand &= cand - 1) {
                const int j = __builtin_ctz(cand);
                st.insert(static_cast<int32_t>(b + i + j), xb[i + j]);
            }
            thr = ops.set1(st.threshold());
        };
        const auto accumulate = [&](int u, V v) {
            const V d = ops.fused_diff(v, vm);
            const V e = ops.exp(d);
            vs[u] = ops.add(vs[u], e);
            vt[u] = ops.fmadd(e, d, vt[u]);
        };
        int64_t i = 0;
        for (; i + G * W <= len; i += G * W) {
            V v[G];
#pragma GCC unroll 4
            for (int g = 0; g < G; ++g) v[g] = ops.load(xb + i + g * W);
            // One top-k test on the group's lane-wise max. A NaN lane can hide another vector's
            // lane from it; harmless, as a NaN anywhere makes the step rejected (the top-k is
            // unspecified, see the policy).
            V group_max = v[G - 1];
#pragma GCC unroll 4
            for (int g = G - 2; g >= 0; --g) group_max = ops.max(group_max, v[g]);
            vmax = ops.max(group_max, vmax);
            if (ops.ge_mask(group_max, thr)) {
#pragma GCC unroll 4
                for (int g = 0; g < G; ++g)
                    insert_candidates(i + g * W, v[g]);  // id order: ties keep the lower id
            }
#pragma GCC unroll 4
            for (int g = 0; g < G; ++g) accumulate(g & 3, v[g]);
        }
        for (; i < len; i += W) {
            const V v = ops.load(xb + i);
            vmax = ops.max(v, vmax);
            if (ops.ge_mask(v, thr)) insert_candidates(i, v);
            accumulate(0, v);
        }
        const float block_max = ops.hmax(vmax);
        const double s = ops.hsum(ops.add(ops.add(vs[0], vs[1]), ops.add(vs[2], vs[3])));
        const double t = ops.hsum(ops.add(ops.add(vt[0], vt[1]), ops.add(vt[2], vt[3])));
        if (!have_ref || !std::isfinite(t) || !std::isfinite(s) || !(block_max <= st.M + kFusedHeadroom)) {
            for (int64_t j = 0; j < len; ++j) {  // rare: count non-finite logits exactly
                if (xb[j] != xb[j])
                    ++st.nan_count;
                else if (xb[j] == inf)
                    ++st.posinf_count;
            }
            st.raise_max(block_max);
            if (st.M != -inf) careful_block_sums(ops, xb, len, st);
            continue;
        }
        st.S += s;
        st.T += t;
        st.raise_max(block_max);  // rescales this block's sums with the earlier ones
    }
    stats_span_scalar(logits + n_vec, n - n_vec, 1, static_cast<int32_t>(n_vec), st);
}

inline void stats_begin(StatsState& st, int32_t k, int32_t* top_ids, float* top_logits) {
    st.k = k;
    st.ids = top_ids;
    st.vals = top_logits;
}

}  // namespace
}  // namespace sia
