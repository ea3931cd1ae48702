// Scalar reference kernels and the ISA-independent pieces (top-k entropy, RNG, steering).
#include <cmath>
#include <limits>

#include "sia_kernels.h"
#include "stats_common.h"

namespace sia {

void junction_stats_scalar(const float* logits, int64_t n, int64_t stride, int32_t k, int32_t* top_ids,
                           float* top_logits, JunctionStats* out) {
    StatsState st;
    stats_begin(st, k, top_ids, top_logits);
    stats_span_scalar(logits, n, stride, 0, st);
    st.finish(out);
}

void value_head_scalar(const float* hidden, int64_t n_rows, int64_t d, int64_t row_stride,
                       const float* weight, float bias, float* out) {
    for (int64_t r = 0; r < n_rows; ++r) {
        const float* h = hidden + r * row_stride;
        double acc = 0.0;
        for (int64_t j = 0; j < d; ++j) acc += static_cast<double>(h[j]) * weight[j];
        out[r] = static_cast<float>(acc + bias);
    }
}

double topk_entropy(const float* z, int32_t k) {
    if (k <= 0) return std::numeric_limits<double>::quiet_NaN();
    const double m = z[0];  // sorted: the first entry is the max
    if (!std::isfinite(m)) return std::numeric_limits<double>::quiet_NaN();
    double s = 0.0, t = 0.0;
    for (int32_t i = 0; i < k; ++i) {
        const double d = static_cast<double>(z[i]) - m;
        if (d == -std::numeric_limits<double>::infinity()) continue;  // zero probability
        const double e = std::exp(d);
        s += e;
        t += e * d;
    }
    // H = -sum p log p with p = e / s and log p = d - log s.
    const double h = std::log(s) - t / s;
    return h < 0.0 ? 0.0 : h;  // rounding can give -1e-17 for a one-hot distribution
}

uint64_t rng_next(uint64_t* state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double rng_uniform(uint64_t* state) {
    return static_cast<double>(rng_next(state) >> 11) * (1.0 / 9007199254740992.0);
}

namespace {

// Zero the least likely of the k unnormalised probabilities p beyond the smallest set of the
// likeliest whose mass reaches top_p of the total (ties: the lower index first, as in the top-k).
void truncate_top_p(double* p, int32_t k, float top_p) {
    constexpr int32_t kLocal = 64;
    int32_t local[kLocal];
    int32_t* order = k <= kLocal ? local : new int32_t[static_cast<size_t>(k)];
    double total = 0.0;
    for (int32_t i = 0; i < k; ++i) {
        total += p[i];
        int32_t j = i;  // insertion sort, likeliest first: k is small
        while (j > 0 && p[order[j - 1]] < p[i]) {
            order[j] = order[j - 1];
            --j;
        }
        order[j] = i;
    }
    const double want = static_cast<double>(top_p) * total;
    double acc = 0.0;
    int32_t kept = 0;
    while (kept < k && (kept == 0 || acc < want)) acc += p[order[kept++]];
    for (int32_t r = kept; r < k; ++r) p[order[r]] = 0.0;
    if (order != local) delete[] order;
}

}  // namespace

int32_t steer_topk(float* logits, int64_t stride, const int32_t* top_ids, const float* top_logits,
                   const float* values, int32_t k, float w, float temperature, float top_p, float min_p,
                   bool write_back, uint64_t* rng_state, double* probs_out) {
    constexpr int32_t kLocal = 64;
    double local[kLocal];
    double* z = k <= kLocal ? local : new double[static_cast<size_t>(k)];
    double zmax = -std::numeric_limits<double>::infinity();
    int32_t imax = 0;
    for (int32_t i = 0; i < k; ++i) {
        double zi = top_logits[i];
        if (values != nullptr) {
            zi += static_cast<double>(w) * values[i];
            if (write_back) logits[static_cast<int64_t>(top_ids[i]) * stride] = static_cast<float>(zi);
        }
        z[i] = zi;
        if (zi > zmax) {
            zmax = zi;
            imax = i;
        }
    }
    // One draw per step whatever the temperature, so seeded streams stay aligned across modes.
    const double u01 = rng_uniform(rng_state);
    int32_t chosen = imax;
    if (temperature > 0.0f && std::isfinite(zmax)) {
        double sum = 0.0;
        for (int32_t i = 0; i < k; ++i) {
            z[i] = std::exp((z[i] - zmax) / temperature);  // now unnormalised probabilities, max 1
            // min-p: a candidate less likely than min_p times the likeliest is dropped
            if (z[i] < static_cast<double>(min_p)) z[i] = 0.0;
        }
        if (top_p < 1.0f) truncate_top_p(z, k, top_p);
        for (int32_t i = 0; i < k; ++i) sum += z[i];
        const double u = u01 * sum;
        double acc = 0.0;
        chosen = -1;
        for (int32_t i = 0; i < k; ++i) {
            acc += z[i];
            if (u < acc) {
                chosen = i;
                break;
            }
        }
        if (chosen < 0) {  // u landed on the rounding slack past the last term
            for (int32_t i = k - 1; i >= 0; --i)
                if (z[i] > 0.0) {
                    chosen = i;
                    break;
                }
        }
        if (probs_out != nullptr)
            for (int32_t i = 0; i < k; ++i) probs_out[i] = z[i] / sum;
    } else {
        if (probs_out != nullptr)
            for (int32_t i = 0; i < k; ++i) probs_out[i] = i == imax ? 1.0 : 0.0;
    }
    if (z != local) delete[] z;
    return chosen;
}

void candidate_head(ValueHeadFn dot, const float* h, int64_t d, const float* weight, float bias,
                    const float* proj, const float* proj_bias, int64_t r, const float* table,
                    const float* token_bias, const int32_t* cands, int32_t k, float* out) {
    float g[kMaxCandidateRank];
    float v_state = 0.0f;
    dot(proj, r, d, d, h, 0.0f, g);  // g = proj h (one row of proj per entry)
    for (int64_t i = 0; i < r; ++i) g[i] += proj_bias[i];
    dot(h, 1, d, d, weight, bias, &v_state);  // V(s), the scalar head on the prefix's own state
    for (int32_t j = 0; j < k; ++j) {
        const int64_t c = cands[j];
        dot(table + c * r, 1, r, r, g, v_state + token_bias[c], out + j);
    }
}

}  // namespace sia
