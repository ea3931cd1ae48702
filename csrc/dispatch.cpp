#include "dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace sia {
namespace {

const KernelTable kScalar{"scalar", junction_stats_scalar, value_head_scalar};
#if defined(__x86_64__) || defined(_M_X64)
const KernelTable kAvx2{"avx2", junction_stats_avx2, value_head_avx2};
const KernelTable kAvx512{"avx512", junction_stats_avx512, value_head_avx512};
#endif
#if defined(__aarch64__)
const KernelTable kNeon{"neon", junction_stats_neon, value_head_neon};
#endif

std::vector<const KernelTable*> supported_tables() {
    std::vector<const KernelTable*> tables{&kScalar};
#if defined(__x86_64__) || defined(_M_X64)
    // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) tables.push_back(&kAvx2);
    if (__builtin_cpu_supports("avx512f")) tables.push_back(&kAvx512);
#endif
#if defined(__aarch64__)
    tables.push_back(&kNeon);  // NEON is part of the arm64 baseline
#endif
    return tables;
}

const KernelTable* find_table(const std::string& name) {
    for (const KernelTable* t : supported_tables())
        if (name == t->isa) return t;
    return nullptr;
}

// An atomic pointer: kernels running in threads without the GIL read it while a test may
// switch ISA; each call reads it once, so it always runs one consistent implementation.
std::atomic<const KernelTable*> g_active{nullptr};

const KernelTable* pick_initial() {
    if (const char* env = std::getenv("SIA_EDGE_ISA")) {
        if (const KernelTable* t = find_table(env)) return t;
    }
    return supported_tables().back();
}

}  // namespace

std::vector<std::string> available_isas() {
    std::vector<std::string> names;
    for (const KernelTable* t : supported_tables()) names.emplace_back(t->isa);
    return names;
}

const KernelTable& active_kernels() {
    const KernelTable* t = g_active.load(std::memory_order_acquire);
    if (t == nullptr) {
        t = pick_initial();
        g_active.store(t, std::memory_order_release);
    }
    return *t;
}

void force_isa(const std::string& name) {
    const KernelTable* t = find_table(name);
    if (t == nullptr) {
        std::string msg = "ISA '" + name + "' is not available on this CPU/build; available: ";
        for (const std::string& n : available_isas()) msg += n + " ";
        throw std::invalid_argument(msg);
    }
    g_active.store(t, std::memory_order_release);
}

}  // namespace sia
