// Host stand-in for CUDA's header, for check-attention-cu.sh: a bfloat16 held as a float.
#pragma once
struct __nv_bfloat16 { float value; };
inline float __bfloat162float(__nv_bfloat16 x) { return x.value; }
inline __nv_bfloat16 __float2bfloat16(float x) { return {x}; }
