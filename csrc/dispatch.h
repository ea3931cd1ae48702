// Runtime choice of kernel implementations: detected once, overridable for tests.
#pragma once

#include <string>
#include <vector>

#include "kernels/sia_kernels.h"

namespace sia {

struct KernelTable {
    const char* isa;
    JunctionStatsFn junction_stats;
    ValueHeadFn value_head;
};

// Names of the implementations this build contains and this CPU can run, best last.
std::vector<std::string> available_isas();
// The table in use. The first call picks the best available ISA, or SIA_EDGE_ISA if set.
const KernelTable& active_kernels();
// Switch to a named ISA; throws std::invalid_argument if it is unknown or unavailable.
void force_isa(const std::string& name);

}  // namespace sia
