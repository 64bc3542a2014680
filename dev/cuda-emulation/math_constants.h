// Host stand-in for CUDA's header, for check-attention-cu.sh.
#pragma once
#include <limits>
#define CUDART_INF_F std::numeric_limits<float>::infinity()
