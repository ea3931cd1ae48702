// Parity of one SIMD kernel set against the scalar kernels, in C++ alone: for the instruction
// sets whose Python build cannot run on the development machine (NEON, checked by
// cross-compiling for arm64 and running under qemu-aarch64; see tests/test_native_parity.py).
// The same cases as tests/test_kernels.py: sizes around the vector width and the block, -inf
// masks, huge and far-apart values, ties, one-hot, uniform, NaN and +inf counts, the value head.
// Exit status 0 when every case agrees, 1 otherwise (each failure printed).
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "sia_kernels.h"

#if defined(__aarch64__)
#define SIMD_STATS sia::junction_stats_neon
#define SIMD_HEAD sia::value_head_neon
#define SIMD_NAME "neon"
#else
#define SIMD_STATS sia::junction_stats_avx2
#define SIMD_HEAD sia::value_head_avx2
#define SIMD_NAME "avx2"
#endif

namespace {

int failures = 0;

void fail(const char* what, const char* label, int64_t n, int k) {
    ++failures;
    std::printf("FAIL %s: %s (n=%lld, k=%d)\n", what, label, static_cast<long long>(n), k);
}

bool close(double a, double b, double abs_tol, double rel_tol) {
    if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
    if (std::isinf(a) || std::isinf(b)) return a == b;
    return std::fabs(a - b) <= abs_tol + rel_tol * std::fabs(b);
}

void check(const std::vector<float>& z, int k, const char* label) {
    const int64_t n = static_cast<int64_t>(z.size());
    std::vector<int32_t> ids_s(k), ids_v(k);
    std::vector<float> top_s(k), top_v(k);
    sia::JunctionStats s{}, v{};
    sia::junction_stats_scalar(z.data(), n, 1, k, ids_s.data(), top_s.data(), &s);
    SIMD_STATS(z.data(), n, 1, k, ids_v.data(), top_v.data(), &v);
    if (s.nan_count != v.nan_count || s.posinf_count != v.posinf_count)
        fail("non-finite counts", label, n, k);
    if (s.nan_count || s.posinf_count) return;  // other outputs are unspecified then
    for (int i = 0; i < k; ++i)
        if (ids_s[i] != ids_v[i] ||
            !(top_s[i] == top_v[i] || (std::isinf(top_s[i]) && top_s[i] == top_v[i]))) {
            fail("top-k", label, n, k);
            break;
        }
    if (!close(v.topk_entropy, s.topk_entropy, 1e-9, 0)) fail("top-k entropy", label, n, k);
    if (!close(v.full_lse, s.full_lse, 1e-5, 1e-6)) fail("log-sum-exp", label, n, k);
    if (!close(v.full_entropy, s.full_entropy, 1e-4, 0)) fail("full entropy", label, n, k);
}

}  // namespace

int main() {
    std::mt19937 rng(1234);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    const float inf = std::numeric_limits<float>::infinity();
    const int64_t sizes[] = {1, 3, 4, 5, 15, 16, 17, 63, 64, 65, 100, 2047, 2048, 2049, 4103, 49152, 70001};
    int cases = 0;
    for (int64_t n : sizes) {
        for (int k : {1, 10, 40}) {
            if (k > n) continue;
            std::vector<float> z(n);
            for (auto& x : z) x = normal(rng);
            check(z, k, "normal");
            std::vector<float> masked = z;
            for (int64_t i = 0; i < n; i += 3) masked[i] = -inf;
            if (n > 1) check(masked, k, "every third masked with -inf");
            std::vector<float> far = z;
            for (int64_t i = 0; i < n; i += 5) far[i] -= 150.0f;
            far[n / 2] = 60.0f;
            check(far, k, "far below the max, a later larger max");
            std::vector<float> ties(n);
            for (int64_t i = 0; i < n; ++i) ties[i] = std::round(z[i]);
            check(ties, k, "ties");
            check(std::vector<float>(n, 0.5f), k, "uniform");
            std::vector<float> one_hot(n, -inf);
            one_hot[n - 1] = 2.0f;
            check(one_hot, k, "one-hot");
            std::vector<float> huge = z;
            huge[0] = 3e38f;
            if (n > 1) huge[n - 1] = -3e38f;
            check(huge, k, "huge values");
            for (float bad : {std::numeric_limits<float>::quiet_NaN(), inf}) {
                std::vector<float> b = z;
                b[n / 3] = bad;
                check(b, k, bad != bad ? "a NaN" : "a +inf");
            }
            cases += 9;
        }
    }
    for (int64_t d : {1, 15, 16, 17, 576, 2049}) {
        std::vector<float> h(3 * d), w(d), out_s(3), out_v(3);
        for (auto& x : h) x = normal(rng);
        for (auto& x : w) x = normal(rng);
        sia::value_head_scalar(h.data(), 3, d, d, w.data(), 0.25f, out_s.data());
        SIMD_HEAD(h.data(), 3, d, d, w.data(), 0.25f, out_v.data());
        for (int r = 0; r < 3; ++r)
            if (!close(out_v[r], out_s[r], 1e-4 * std::sqrt(static_cast<double>(d)), 1e-5))
                fail("value head", "normal", d, 0);
        ++cases;
    }
    std::printf("%s vs scalar: %d cases, %d failures\n", SIMD_NAME, cases, failures);
    return failures == 0 ? 0 : 1;
}
