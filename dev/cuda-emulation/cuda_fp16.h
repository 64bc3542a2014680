// Host stand-in for CUDA's header, for check-attention-cu.sh: a 16-bit float held as a float.
#pragma once
struct __half { float value; };
inline float __half2float(__half x) { return x.value; }
inline __half __float2half(float x) { return {x}; }
