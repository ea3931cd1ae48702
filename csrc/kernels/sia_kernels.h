// sia-edge native kernels: the per-token arithmetic of Sparse Inference-time Alignment.
//
// Kernels take plain pointers, lengths and element strides and know nothing of Python.
// Every kernel has a scalar twin (suffix _scalar) that is also the tail loop of the SIMD
// versions (_avx2, _avx512, _neon); dispatch.h picks one implementation per kernel at run time.
//
// Precision policy
// ----------------
// * Logits are float32, read at an element stride: 1 for llama.cpp's logits buffer
//   (llama_get_logits_ith), 3 for the float `logit` field inside llama_token_data
//   {int32 id; float logit; float p} as llama-cpp-python's logits processors see it.
//   SIMD paths vectorise stride 1 and fall back to the scalar path for other strides.
// * Full-vocabulary log-sum-exp and entropy are computed blockwise: exponentials of
//   (z - running max) in float32. Scalar: std::exp with the argument clamped at kExpFloor = -80
//   (such terms are below 2e-35 and do not change a sum that contains the max term, 1.0).
//   NEON: Cephes-style polynomial (relative error < 3e-7), same clamp. AVX2: an 8-entry 2^(j/8)
//   table and a degree-3 polynomial (relative error < 3e-7), same clamp. AVX-512: a
//   32-entry 2^(j/32) table and a degree-2 polynomial (relative error < 4e-7 for terms above
//   1e-5 of the max, < 3e-6 below), no clamp: the kernel runs with flush-to-zero set (and
//   restores the caller's mode), so terms far below the max underflow to exactly 0.
//   Each block of kBlock elements is summed in float32 lanes, blocks are added in double.
//   Result: |lse error| < 1e-5 and |entropy error| < 1e-4 nats for vocabularies up to 2^20.
// * Top-k entropy, top-k sampling and the value head's final reduction run in double.
// * NaN and +inf logits are counted, not interpreted: when either count is non-zero the other
//   outputs are unspecified and the caller must reject the step. -inf logits are valid
//   (masked tokens): they carry zero probability and rank below every finite logit.
// * Top-k order: logit descending, ties broken by the lower token id.
#pragma once

#include <cstdint>

namespace sia {

constexpr int32_t kMaxTopK = 1024;   // top-k is an insertion list; k is small (10 by default)
constexpr int64_t kBlock = 2048;     // elements per block: 8 KiB of float32, stays in L1
constexpr float kExpFloor = -80.0f;  // exp argument clamp, see the precision policy

struct JunctionStats {
    double topk_entropy;   // nats, of softmax over the k largest logits (the SIA gate statistic)
    double full_lse;       // log-sum-exp over the whole vocabulary
    double full_entropy;   // nats, of softmax over the whole vocabulary
    int64_t nan_count;     // NaN logits seen
    int64_t posinf_count;  // +inf logits seen
};

// One pass over n logits: top-k ids and logits (sorted), top-k entropy, full lse and entropy.
// top_ids and top_logits have room for k entries, 1 <= k <= min(n, kMaxTopK).
using JunctionStatsFn = void (*)(const float* logits, int64_t n, int64_t stride, int32_t k, int32_t* top_ids,
                                 float* top_logits, JunctionStats* out);

void junction_stats_scalar(const float* logits, int64_t n, int64_t stride, int32_t k, int32_t* top_ids,
                           float* top_logits, JunctionStats* out);
void junction_stats_avx2(const float* logits, int64_t n, int64_t stride, int32_t k, int32_t* top_ids,
                         float* top_logits, JunctionStats* out);
void junction_stats_avx512(const float* logits, int64_t n, int64_t stride, int32_t k, int32_t* top_ids,
                           float* top_logits, JunctionStats* out);
void junction_stats_neon(const float* logits, int64_t n, int64_t stride, int32_t k, int32_t* top_ids,
                         float* top_logits, JunctionStats* out);

// out[r] = bias + dot(hidden[r * row_stride .. + d], weight) for r < n_rows.
using ValueHeadFn = void (*)(const float* hidden, int64_t n_rows, int64_t d, int64_t row_stride,
                             const float* weight, float bias, float* out);

void value_head_scalar(const float* hidden, int64_t n_rows, int64_t d, int64_t row_stride,
                       const float* weight, float bias, float* out);
void value_head_avx2(const float* hidden, int64_t n_rows, int64_t d, int64_t row_stride, const float* weight,
                     float bias, float* out);
void value_head_avx512(const float* hidden, int64_t n_rows, int64_t d, int64_t row_stride,
                       const float* weight, float bias, float* out);
void value_head_neon(const float* hidden, int64_t n_rows, int64_t d, int64_t row_stride, const float* weight,
                     float bias, float* out);

// The candidate head (sia_edge/value_format.py): for each of k candidate token ids c_j,
// out[j] = bias + dot(weight, h) + token_bias[c_j] + dot(table[c_j], g) with g = proj h + proj_bias,
// proj r x d and table n_vocab x r, both row-major. Every dot product goes through `dot` (the active
// ISA's value_head), so each ISA runs its own SIMD; g is accumulated in double like value_head.
// The caller checks that h is finite, r <= kMaxCandidateRank and every c_j is in [0, n_vocab).
constexpr int64_t kMaxCandidateRank = 1024;
void candidate_head(ValueHeadFn dot, const float* h, int64_t d, const float* weight, float bias,
                    const float* proj, const float* proj_bias, int64_t r, const float* table,
                    const float* token_bias, const int32_t* cands, int32_t k, float* out);

// Top-k entropy in nats of softmax over k sorted logits (double arithmetic, -inf allowed).
double topk_entropy(const float* top_logits, int32_t k);

// SplitMix64: the caller owns the 64-bit state, so a seeded run is reproducible on every ISA.
uint64_t rng_next(uint64_t* state);
double rng_uniform(uint64_t* state);  // [0, 1), 53 random bits

// The steering step, shared by every ISA (k elements: no SIMD to gain).
// z'_i = top_logits[i] + w * values[i] (values may be null: plain top-k sampling, z' = z).
// When write_back is set, logits[top_ids[i] * stride] = z'_i (in place on the caller's buffer).
// Samples i with probability softmax(z' / temperature)_i using the caller's RNG, truncated as
// OpenAI's samplers are: min_p drops candidates less likely than min_p times the likeliest
// (0: none), top_p keeps the smallest set of the likeliest whose mass reaches top_p (1: all).
// Temperature 0 means argmax (first index on ties). probs_out (k entries, may be null) receives
// the sampling distribution. Returns the chosen index in [0, k).
int32_t steer_topk(float* logits, int64_t stride, const int32_t* top_ids, const float* top_logits,
                   const float* values, int32_t k, float w, float temperature, float top_p, float min_p,
                   bool write_back, uint64_t* rng_state, double* probs_out);

}  // namespace sia
