// Runs the fused attention's CUDA kernels (crates/unitune-kernels/cuda/attention.cu) on the CPU,
// compiled as plain C++ with one std::thread per CUDA thread, and compares their output and
// gradients with a direct double-precision computation. It checks the kernels' logic (indexing,
// layouts, partial blocks and tiles, the online softmax, the recomputing backward) on a machine
// without a GPU; the GPU tests (crates/unitune-kernels/tests/cuda_attention.rs) check the rest.
// Built and run by dev/check-attention-cu.sh.

#include <barrier>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

// The CUDA dialect, emulated: blocks run one after another, their threads at once. __shared__
// arrays are function statics (one block at a time uses them); a warp shuffle is a write, a
// block-wide barrier and a read, which is equivalent because every thread of a block reaches
// every shuffle (the kernels call them in uniform control flow only).
struct Index { unsigned x, y, z; };
thread_local Index threadIdx, blockIdx;
std::barrier<>* block_barrier;
float shuffle_slots[1024];
#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(threads)
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float x, int mask) {
    shuffle_slots[threadIdx.x] = x;
    __syncthreads();
    const float other = shuffle_slots[threadIdx.x ^ mask];
    __syncthreads();
    return other;
}
using std::min;

#include "../../crates/unitune-kernels/cuda/attention.cu"

template <class Kernel> void launch(unsigned blocks_x, unsigned blocks_y, Kernel kernel) {
    for (unsigned by = 0; by < blocks_y; ++by) {
        for (unsigned bx = 0; bx < blocks_x; ++bx) {
            std::barrier<> sync(THREADS);
            block_barrier = &sync;
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < THREADS; ++t) {
                threads.emplace_back([&, t] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {bx, by, 0};
                    kernel();
                });
            }
            for (auto& t : threads) t.join();
        }
    }
}

// Both layouts: [b, heads, n, d] (split) or [b, n, heads·d] (packed).
struct Case { int b, heads, nq, nk, d; bool packed; };

long long at(const Case& c, int bh, int n, int row, int col) {
    const int batch = bh / c.heads, head = bh % c.heads;
    return c.packed ? ((long long)batch * n + row) * c.heads * c.d + head * c.d + col
                    : (((long long)bh) * n + row) * c.d + col;
}

// (batch, head, row) strides, as the Rust side passes them.
void strides(const Case& c, int n, long long (&s)[3]) {
    const long long h = c.heads, d = c.d;
    if (c.packed) { s[0] = n * h * d; s[1] = d; s[2] = h * d; }
    else { s[0] = h * n * d; s[1] = n * d; s[2] = d; }
}

double worst(const std::vector<float>& got, const std::vector<double>& want) {
    double diff = 0, size = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        diff = std::max(diff, std::abs(got[i] - want[i]));
        size = std::max(size, std::abs(want[i]));
    }
    return diff / (1 + size);
}

bool check(const Case& c, std::mt19937& rng) {
    const int bh = c.b * c.heads;
    const size_t nq_len = (size_t)bh * c.nq * c.d, nk_len = (size_t)bh * c.nk * c.d;
    std::normal_distribution<float> normal;
    auto randn = [&](size_t n) { std::vector<float> x(n); for (auto& v : x) v = normal(rng); return x; };
    const auto q = randn(nq_len), k = randn(nk_len), v = randn(nk_len), grad = randn(nq_len);
    const float scale = 1 / std::sqrt((float)c.d), scale2 = scale * 1.4426950408889634f;
    long long qs[3], ks[3];
    strides(c, c.nq, qs);
    strides(c, c.nk, ks);

    std::vector<float> out(nq_len), lse(bh * c.nq), delta(bh * c.nq), dq(nq_len), dk(nk_len), dv(nk_len);
    const unsigned q_blocks = (c.nq + ROWS - 1) / ROWS, k_blocks = (c.nk + ROWS - 1) / ROWS;
    launch(q_blocks, bh, [&] {
        attention_forward_f32(q.data(), k.data(), v.data(), out.data(), lse.data(), c.heads, c.nq,
                              c.nk, c.d, scale2, qs[0], qs[1], qs[2], ks[0], ks[1], ks[2]);
    });
    launch(q_blocks, bh, [&] {
        attention_delta_f32(out.data(), grad.data(), delta.data(), c.heads, c.nq, c.d, qs[0], qs[1], qs[2]);
    });
    launch(q_blocks, bh, [&] {
        attention_dq_f32(q.data(), k.data(), v.data(), grad.data(), lse.data(), delta.data(), dq.data(),
                         c.heads, c.nq, c.nk, c.d, scale, scale2, qs[0], qs[1], qs[2], ks[0], ks[1], ks[2]);
    });
    launch(k_blocks, bh, [&] {
        attention_dkv_f32(q.data(), k.data(), v.data(), grad.data(), lse.data(), delta.data(), dk.data(),
                          dv.data(), c.heads, c.nq, c.nk, c.d, scale, scale2, qs[0], qs[1], qs[2],
                          ks[0], ks[1], ks[2]);
    });

    // The same in doubles, directly: P = softmax(scale·q·kᵀ), O = P·v, dV = Pᵀ·dO,
    // dS = P ∘ (dO·vᵀ − rowsum(P ∘ dO·vᵀ)), dQ = scale·dS·k, dK = scale·dSᵀ·q.
    std::vector<double> r_out(nq_len), r_dq(nq_len), r_dk(nk_len), r_dv(nk_len);
    for (int h = 0; h < bh; ++h) {
        for (int i = 0; i < c.nq; ++i) {
            std::vector<double> p(c.nk), dp(c.nk);
            double max = -INFINITY, sum = 0, shift = 0;
            for (int j = 0; j < c.nk; ++j) {
                double s = 0;
                for (int x = 0; x < c.d; ++x) s += (double)q[at(c, h, c.nq, i, x)] * k[at(c, h, c.nk, j, x)];
                p[j] = s * scale;
                max = std::max(max, p[j]);
            }
            for (auto& pj : p) sum += (pj = std::exp(pj - max));
            for (int j = 0; j < c.nk; ++j) {
                p[j] /= sum;
                for (int x = 0; x < c.d; ++x) {
                    r_out[at(c, h, c.nq, i, x)] += p[j] * v[at(c, h, c.nk, j, x)];
                    dp[j] += (double)grad[at(c, h, c.nq, i, x)] * v[at(c, h, c.nk, j, x)];
                }
                shift += p[j] * dp[j];
            }
            for (int j = 0; j < c.nk; ++j) {
                const double ds = p[j] * (dp[j] - shift) * scale;
                for (int x = 0; x < c.d; ++x) {
                    r_dq[at(c, h, c.nq, i, x)] += ds * k[at(c, h, c.nk, j, x)];
                    r_dk[at(c, h, c.nk, j, x)] += ds * q[at(c, h, c.nq, i, x)];
                    r_dv[at(c, h, c.nk, j, x)] += p[j] * grad[at(c, h, c.nq, i, x)];
                }
            }
        }
    }
    const double errors[] = {worst(out, r_out), worst(dq, r_dq), worst(dk, r_dk), worst(dv, r_dv)};
    bool ok = true;
    std::printf("%s b %d heads %d nq %d nk %d d %d:", c.packed ? "packed" : "split ", c.b, c.heads,
                c.nq, c.nk, c.d);
    const char* names[] = {"out", "dq", "dk", "dv"};
    for (int i = 0; i < 4; ++i) {
        std::printf(" %s %.1e", names[i], errors[i]);
        ok = ok && errors[i] < 1e-5;
    }
    std::printf("%s\n", ok ? "" : "  FAILED (> 1e-5 of the largest value)");
    return ok;
}

int main() {
    std::mt19937 rng(7);
    // Partial blocks (16 rows) and tiles (32 rows), a head narrower than the 8 lanes of a row,
    // the widest head (160), cross-attention's 77 keys.
    const Case sizes[] = {{2, 3, 37, 45, 40, false}, {1, 2, 70, 19, 160, false}, {1, 1, 5, 3, 5, false},
                          {1, 2, 33, 77, 64, false}};
    bool ok = true;
    for (Case c : sizes) {
        for (bool packed : {false, true}) {
            c.packed = packed;
            ok = check(c, rng) && ok;
        }
    }
    return ok ? 0 : 1;
}
