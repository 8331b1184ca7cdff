// Included first by every bn_backward_stats_<isa>.cpp, before the instruction-set pragma: all
// headers outside the kernel itself must be compiled for the baseline ISA, or the linker could
// pick an AVX instantiation of a shared inline function for code that runs on a CPU without AVX.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // streaming stores (vec.h); usable inside each build's target region
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../bn_backward_passes.h"
#include "isa.h"
