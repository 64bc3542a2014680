// Fused scaled-dot-product attention for CUDA, softmax(q·kᵀ·scale)·v, with a backward that
// recomputes the probabilities: the GPU twin of src/attention.rs (same semantics, same base-2
// log-sum-exp). No [n_q, n_k] score matrix is ever stored, so SD 1.5's 4096-token self-attention
// costs activations of O(n·d) per head instead of 4096² floats.
//
// Mapping: a group of LANES consecutive threads owns one row (a query row forward and for dQ, a
// key row for dK/dV) and holds a slice of its d values in registers: element c lives in lane
// c % LANES, slot c / LANES. A dot product is a partial sum per lane plus three xor-shuffles
// within the group. The other operand's rows are staged TILE at a time in shared memory, in f32,
// and read by all groups of the block (broadcast reads, no bank conflicts).
//
// Layout: head bh = (batch, head) of a tensor starts at batch·sb + head·sh and its rows are sr
// apart, which covers both [b, heads, n, d] and the projections' [b, n, heads·d]. q, out and their
// gradients share one set of strides, k, v and theirs another (the op requires d_v = d).
// Arithmetic is f32 for every storage type (f32, f16, bf16).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

namespace {

constexpr int LANES = 8;                 // threads per row; shuffles by 4, 2, 1 stay in the group
constexpr int ROWS = 16;                 // rows per block: 128 threads
constexpr int THREADS = ROWS * LANES;
constexpr int TILE = 32;                 // rows of the other operand staged per step
constexpr int MAX_D = 160;               // SD 1.5's widest head (1280 / 8)
constexpr int SLOTS = MAX_D / LANES;     // register slots per thread

__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ float load(__half x) { return __half2float(x); }
__device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T store(float x);
template <> __device__ __forceinline__ float store<float>(float x) { return x; }
template <> __device__ __forceinline__ __half store<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

// Sum over the LANES threads of a group; every thread of the warp must call it.
__device__ __forceinline__ float group_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 4);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x;
}

// Where one tensor's heads and rows lie.
struct Rows {
    long long sb, sh, sr;
    __device__ long long head(int bh, int heads) const {
        return (long long)(bh / heads) * sb + (long long)(bh % heads) * sh;
    }
};

// This thread's slice of row `row` (zeros past d, or for a row past n), times `mul`.
template <typename T>
__device__ __forceinline__ void load_slice(float (&dst)[SLOTS], const T* src, long long at,
                                           bool live, int d, int lane, float mul) {
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
        const int c = s * LANES + lane;
        dst[s] = (live && c < d) ? load(src[at + c]) * mul : 0.f;
    }
}

template <typename T>
__device__ __forceinline__ void store_slice(T* dst, long long at, const float (&src)[SLOTS],
                                            int d, int lane, float mul) {
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
        const int c = s * LANES + lane;
        if (c < d) dst[at + c] = store<T>(src[s] * mul);
    }
}

// Dot product of this thread's slice with row j of a staged tile (row length d), summed over
// the group.
__device__ __forceinline__ float dot_tile(const float (&x)[SLOTS], const float* tile, int j,
                                          int d, int lane) {
    float part = 0.f;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
        const int c = s * LANES + lane;
        if (c < d) part += x[s] * tile[j * d + c];
    }
    return group_sum(part);
}

// acc += w · (row j of a staged tile).
__device__ __forceinline__ void axpy_tile(float (&acc)[SLOTS], float w, const float* tile, int j,
                                          int d, int lane) {
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
        const int c = s * LANES + lane;
        if (c < d) acc[s] += w * tile[j * d + c];
    }
}

// Stages rows start..start+count of two tensors with the same strides into shared memory.
template <typename T>
__device__ void stage(float* a_tile, float* b_tile, const T* a, const T* b, long long base,
                      long long sr, int start, int count, int d) {
    for (int idx = threadIdx.x; idx < count * d; idx += THREADS) {
        const int j = idx / d, c = idx % d;
        const long long at = base + (long long)(start + j) * sr + c;
        a_tile[idx] = load(a[at]);
        b_tile[idx] = load(b[at]);
    }
}

// Forward. Grid (ceil(nq / ROWS), b·heads). Online softmax in base 2 (scale2 = scale·log₂e):
// running max m and sum l, the accumulator rescaled when the max grows. Writes out and
// lse[bh·nq + i] = m + log₂ l.
template <typename T>
__device__ void forward(const T* q, const T* k, const T* v, T* out, float* lse, int heads,
                        int nq, int nk, int d, float scale2, Rows qr, Rows kr) {
    __shared__ float k_tile[TILE * MAX_D];
    __shared__ float v_tile[TILE * MAX_D];
    const int bh = blockIdx.y, lane = threadIdx.x % LANES;
    const int row = blockIdx.x * ROWS + threadIdx.x / LANES;
    const bool live = row < nq;
    const long long q_at = qr.head(bh, heads) + (long long)row * qr.sr;
    const long long k_head = kr.head(bh, heads);
    float q_s[SLOTS], acc[SLOTS];
    load_slice(q_s, q, q_at, live, d, lane, scale2);
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) acc[s] = 0.f;
    float m = -CUDART_INF_F, l = 0.f;
    for (int start = 0; start < nk; start += TILE) {
        const int count = min(TILE, nk - start);
        __syncthreads(); // the previous tile has been read
        stage(k_tile, v_tile, k, v, k_head, kr.sr, start, count, d);
        __syncthreads();
        float scores[TILE];
        float tile_max = -CUDART_INF_F;
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
            scores[j] = j < count ? dot_tile(q_s, k_tile, j, d, lane) : -CUDART_INF_F;
            tile_max = fmaxf(tile_max, scores[j]);
        }
        const float m_new = fmaxf(m, tile_max);
        const float rescale = exp2f(m - m_new); // 0 on the first tile (m = -inf)
        l *= rescale;
#pragma unroll
        for (int s = 0; s < SLOTS; ++s) acc[s] *= rescale;
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
            if (j < count) {
                const float p = exp2f(scores[j] - m_new);
                l += p;
                axpy_tile(acc, p, v_tile, j, d, lane);
            }
        }
        m = m_new;
    }
    if (live) {
        store_slice(out, q_at, acc, d, lane, 1.f / l);
        if (lane == 0) lse[(long long)bh * nq + row] = m + log2f(l);
    }
}

// delta[bh·nq + i] = rowsum(dO ∘ O): the shift of the softmax Jacobian, rowsum(P ∘ dP).
template <typename T>
__device__ void backward_delta(const T* out, const T* grad_out, float* delta, int heads, int nq,
                               int d, Rows qr) {
    const int bh = blockIdx.y, lane = threadIdx.x % LANES;
    const int row = blockIdx.x * ROWS + threadIdx.x / LANES;
    const bool live = row < nq;
    const long long at = qr.head(bh, heads) + (long long)row * qr.sr;
    float o[SLOTS], g[SLOTS];
    load_slice(o, out, at, live, d, lane, 1.f);
    load_slice(g, grad_out, at, live, d, lane, 1.f);
    float part = 0.f;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) part += o[s] * g[s];
    part = group_sum(part);
    if (live && lane == 0) delta[(long long)bh * nq + row] = part;
}

// dQ. Grid as forward: each group recomputes its query row's probabilities
// p = 2^(s − lse) against every key, dS = p·(dP − delta) with dP = dO·vᵀ, dQ = scale·Σ dS·k.
template <typename T>
__device__ void backward_dq(const T* q, const T* k, const T* v, const T* grad_out,
                            const float* lse, const float* delta, T* dq, int heads, int nq, int nk,
                            int d, float scale, float scale2, Rows qr, Rows kr) {
    __shared__ float k_tile[TILE * MAX_D];
    __shared__ float v_tile[TILE * MAX_D];
    const int bh = blockIdx.y, lane = threadIdx.x % LANES;
    const int row = blockIdx.x * ROWS + threadIdx.x / LANES;
    const bool live = row < nq;
    const long long q_at = qr.head(bh, heads) + (long long)row * qr.sr;
    const long long k_head = kr.head(bh, heads);
    float q_s[SLOTS], g_s[SLOTS], acc[SLOTS];
    load_slice(q_s, q, q_at, live, d, lane, scale2);
    load_slice(g_s, grad_out, q_at, live, d, lane, 1.f);
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) acc[s] = 0.f;
    const long long stat = (long long)bh * nq + row;
    const float row_lse = live ? lse[stat] : 0.f;
    const float row_delta = live ? delta[stat] : 0.f;
    for (int start = 0; start < nk; start += TILE) {
        const int count = min(TILE, nk - start);
        __syncthreads();
        stage(k_tile, v_tile, k, v, k_head, kr.sr, start, count, d);
        __syncthreads();
#pragma unroll
        for (int j = 0; j < TILE; ++j) {
            if (j < count) {
                const float p = exp2f(dot_tile(q_s, k_tile, j, d, lane) - row_lse);
                const float dp = dot_tile(g_s, v_tile, j, d, lane);
                axpy_tile(acc, p * (dp - row_delta), k_tile, j, d, lane);
            }
        }
    }
    if (live) store_slice(dq, q_at, acc, d, lane, scale);
}

// dK and dV. Grid (ceil(nk / ROWS), b·heads): each group owns a key row and walks the query rows
// in tiles (with their lse and delta), dV = Σ p·dO, dK = scale·Σ dS·q. No atomics: every
// gradient element has one writer.
template <typename T>
__device__ void backward_dkv(const T* q, const T* k, const T* v, const T* grad_out,
                             const float* lse, const float* delta, T* dk, T* dv, int heads,
                             int nq, int nk, int d, float scale, float scale2, Rows qr, Rows kr) {
    __shared__ float q_tile[TILE * MAX_D];
    __shared__ float g_tile[TILE * MAX_D];
    __shared__ float lse_tile[TILE];
    __shared__ float delta_tile[TILE];
    const int bh = blockIdx.y, lane = threadIdx.x % LANES;
    const int row = blockIdx.x * ROWS + threadIdx.x / LANES;
    const bool live = row < nk;
    const long long k_at = kr.head(bh, heads) + (long long)row * kr.sr;
    const long long q_head = qr.head(bh, heads);
    float k_s[SLOTS], v_s[SLOTS], dk_acc[SLOTS], dv_acc[SLOTS];
    load_slice(k_s, k, k_at, live, d, lane, scale2);
    load_slice(v_s, v, k_at, live, d, lane, 1.f);
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) dk_acc[s] = dv_acc[s] = 0.f;
    for (int start = 0; start < nq; start += TILE) {
        const int count = min(TILE, nq - start);
        __syncthreads();
        stage(q_tile, g_tile, q, grad_out, q_head, qr.sr, start, count, d);
        for (int i = threadIdx.x; i < count; i += THREADS) {
            lse_tile[i] = lse[(long long)bh * nq + start + i];
            delta_tile[i] = delta[(long long)bh * nq + start + i];
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < TILE; ++i) {
            if (i < count) {
                const float p = exp2f(dot_tile(k_s, q_tile, i, d, lane) - lse_tile[i]);
                const float dp = dot_tile(v_s, g_tile, i, d, lane);
                axpy_tile(dv_acc, p, g_tile, i, d, lane);
                axpy_tile(dk_acc, p * (dp - delta_tile[i]), q_tile, i, d, lane);
            }
        }
    }
    if (live) {
        store_slice(dk, k_at, dk_acc, d, lane, scale);
        store_slice(dv, k_at, dv_acc, d, lane, 1.f);
    }
}

} // namespace

// Entry points per storage type: attention_{forward,delta,dq,dkv}_{f32,f16,bf16}.
#define ROWS_ARGS(p) long long p##_sb, long long p##_sh, long long p##_sr
#define ROWS_OF(p) Rows{p##_sb, p##_sh, p##_sr}
#define ENTRY_POINTS(T, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_forward_##NAME(              \
        const T* q, const T* k, const T* v, T* out, float* lse, int heads, int nq, int nk, int d, \
        float scale2, ROWS_ARGS(q), ROWS_ARGS(k)) {                                               \
        forward(q, k, v, out, lse, heads, nq, nk, d, scale2, ROWS_OF(q), ROWS_OF(k));            \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_delta_##NAME(                \
        const T* out, const T* grad_out, float* delta, int heads, int nq, int d, ROWS_ARGS(q)) {  \
        backward_delta(out, grad_out, delta, heads, nq, d, ROWS_OF(q));                          \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_dq_##NAME(                   \
        const T* q, const T* k, const T* v, const T* grad_out, const float* lse,                 \
        const float* delta, T* dq, int heads, int nq, int nk, int d, float scale, float scale2,  \
        ROWS_ARGS(q), ROWS_ARGS(k)) {                                                             \
        backward_dq(q, k, v, grad_out, lse, delta, dq, heads, nq, nk, d, scale, scale2,          \
                    ROWS_OF(q), ROWS_OF(k));                                                      \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_dkv_##NAME(                  \
        const T* q, const T* k, const T* v, const T* grad_out, const float* lse,                 \
        const float* delta, T* dk, T* dv, int heads, int nq, int nk, int d, float scale,         \
        float scale2, ROWS_ARGS(q), ROWS_ARGS(k)) {                                               \
        backward_dkv(q, k, v, grad_out, lse, delta, dk, dv, heads, nq, nk, d, scale, scale2,     \
                     ROWS_OF(q), ROWS_OF(k));                                                     \
    }

ENTRY_POINTS(float, f32)
ENTRY_POINTS(__half, f16)
ENTRY_POINTS(__nv_bfloat16, bf16)
