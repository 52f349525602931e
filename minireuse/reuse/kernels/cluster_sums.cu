// Backward: per-cluster sums of dY (scaled by 1 / |cluster|), the exact weight
// gradient of overflow members, and db, in one pass over dY.
// Python twin: minireuse/reuse/clustering.py (cluster_sums) via matmul.py / conv.py.
#include "reuse_common.cuh"

// Column sums of the block's rows of dy into db (zero on entry): one atomic
// per block and column instead of one per element. Block (32, 8).
__device__ __forceinline__ void add_block_column_sums(float partial, int m, int M, float* db)
{
    __shared__ float red[8][32];
    red[threadIdx.y][threadIdx.x] = partial;
    __syncthreads();
    if (threadIdx.y == 0 && m < M) {
        float s = 0.0f;
        for (int r = 0; r < 8; ++r) {
            s += red[r][threadIdx.x];
        }
        atomicAdd(db + m, s);
    }
}

// Exact weight gradient of one overflow member (a singleton cluster):
// dW_over[l * stride_l, m] += xs[l] * d for l < len.
__device__ __forceinline__ void add_overflow_dw(const float* __restrict__ xs, int len, float d,
                                             float* __restrict__ dws, long long stride_l)
{
    for (int l = 0; l < len; ++l) {
        atomicAdd(dws + l * stride_l, xs[l] * d);
    }
}

// General path. One thread per column m of a run of REUSE_RUN consecutive
// rows of dy, lanes along m:
//   S[g, c, m] += dy[n, m] / counts[g, c]       for c = ids[n, g] >= 0
//   dW_over[g*L + l, m] += x[n, g*L + l] * dy[n, m]   for overflow members (c == -1)
//   db[m] += dy[n, m]                              (db may be null)
// S (G, capacity, M), dW_over (G*L, M) and db must be zero on entry. dW_over null:
// the overflow members' dW is left to the caller (one GEMM, when many overflow).
// S / count is what both gradients need: dW_g = sums_g^T @ (S / count) (the
// centroid mean is sums / count) and dX cluster = (S / count) @ W_g^T, so the
// division is done here, once per run, and never on a cluster table.
// Rows of the run in the same cluster are summed in registers first: one
// atomic per run of equal ids. Why atomics: a gather would need per-cluster
// member lists (sort or scan: more launches); here each warp's atomics go to
// one contiguous row of S, and zeros of dy (after ReLU) are skipped. Sums
// depend on the atomics' order.
// Launch: block (32, 8) exactly (add_block_column_sums' shared array; the host
// launches cuda.runtime.ROW_BLOCK); grid (ceil(M / 32), any) with runs grid-strided.
// (No __launch_bounds__: with one, nvcc 13 spills 12 bytes on sm_80.)
extern "C" __global__ void
cluster_sums_rows(const float* __restrict__ dy, const int* __restrict__ ids,
                  const int* __restrict__ counts, int capacity, const float* __restrict__ x,
                  float* __restrict__ S, float* __restrict__ dW_over, float* __restrict__ db,
                  int N, int K, int L, int G, int M)
{
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    float db_part = 0.0f;
    for (int n0 = (blockIdx.y * blockDim.y + threadIdx.y) * REUSE_RUN; n0 < N;
         n0 += gridDim.y * blockDim.y * REUSE_RUN) {
        if (m >= M) {
            continue;
        }
        const int rows = min(REUSE_RUN, N - n0);
        float d[REUSE_RUN];
        bool any = false;
#pragma unroll
        for (int r = 0; r < REUSE_RUN; ++r) {
            d[r] = r < rows ? dy[(long long)(n0 + r) * M + m] : 0.0f;
            db_part += d[r];
            any = any || d[r] != 0.0f;
        }
        if (!any) {
            continue;
        }
        for (int g = 0; g < G; ++g) {
            int cur = -1;
            float acc = 0.0f;
#pragma unroll
            for (int r = 0; r < REUSE_RUN; ++r) {
                if (r >= rows) {
                    break;
                }
                const int n = n0 + r;
                const int id = ids[(long long)n * G + g];
                if (id != cur) {
                    if (cur >= 0 && acc != 0.0f) {
                        const long long c = (long long)g * capacity + cur;
                        atomicAdd(S + c * M + m, acc / (float)counts[c]);
                    }
                    cur = id;
                    acc = 0.0f;
                }
                acc += d[r];
                if (id < 0 && d[r] != 0.0f && dW_over != nullptr) {
                    const int k0 = g * L;
                    add_overflow_dw(x + (long long)n * K + k0, min(L, K - k0), d[r],
                                    dW_over + (long long)k0 * M + m, M);
                }
            }
            if (cur >= 0 && acc != 0.0f) {
                const long long c = (long long)g * capacity + cur;
                atomicAdd(S + c * M + m, acc / (float)counts[c]);
            }
        }
    }
    if (db != nullptr) {
        add_block_column_sums(db_part, m, M, db);
    }
}

// Pixel-aligned conv path. Output n = (b, oy, ox) scatters dy[n, m] to the
// cluster of the padded pixel under every kernel offset t = (i, j), per
// channel group q:
//   S[q, c, t, m] += dy[n, m] / counts[q, c]          for c = ids[pixel, q] >= 0
//   dW_over[q, l, t, m] += x[pixel, q*L + l] * dy[n, m]  for overflow members
//                                                    (real pixels only)
//   db[m] += dy[n, m]
// dW_over null: the overflow members' dW is left to the caller (one GEMM).
// S (Q, capacity, kh*kw, M), dW_over (Q, L, kh*kw, M) (the layout of the
// batched dW GEMM's output) and db must be zero on entry. One thread per
// column m of a run of REUSE_RUN consecutive outputs; outputs of the run whose
// pixels share a cluster are summed first (one atomic per run of equal ids).
// Launch: block (32, 8) exactly (add_block_column_sums' shared array; the host
// launches cuda.runtime.ROW_BLOCK); grid (ceil(M / 32), any) with runs grid-strided.
// (No __launch_bounds__: with one, nvcc 13 spills 12 bytes on sm_80.)
extern "C" __global__ void
cluster_sums_pixels(const float* __restrict__ dy, const int* __restrict__ ids,
                    const int* __restrict__ counts, int capacity, const float* __restrict__ x,
                    float* __restrict__ S, float* __restrict__ dW_over, float* __restrict__ db,
                    int B, int h, int w, int C, int L, int Q, int kh, int kw, int stride,
                    int top, int left, int hp, int wp, int oh, int ow, int M)
{
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    const int T = kh * kw;
    const int N = B * oh * ow;
    float db_part = 0.0f;
    for (int n0 = (blockIdx.y * blockDim.y + threadIdx.y) * REUSE_RUN; n0 < N;
         n0 += gridDim.y * blockDim.y * REUSE_RUN) {
        if (m >= M) {
            continue;
        }
        const int rows = min(REUSE_RUN, N - n0);
        float d[REUSE_RUN];
        int base[REUSE_RUN];   // padded pixel under offset (0, 0) of each output of the run
        bool any = false;
#pragma unroll
        for (int r = 0; r < REUSE_RUN; ++r) {
            d[r] = r < rows ? dy[(long long)(n0 + r) * M + m] : 0.0f;
            db_part += d[r];
            any = any || d[r] != 0.0f;
            const int n = min(n0 + r, N - 1);
            const int bi = n / (oh * ow);
            const int rem = n - bi * oh * ow;
            const int oy = rem / ow;
            base[r] = (bi * hp + oy * stride) * wp + (rem - oy * ow) * stride;
        }
        if (!any) {
            continue;
        }
        for (int i = 0; i < kh; ++i) {
            for (int j = 0; j < kw; ++j) {
                const int t = i * kw + j;
                for (int q = 0; q < Q; ++q) {
                    int cur = -1;
                    float acc = 0.0f;
#pragma unroll
                    for (int r = 0; r < REUSE_RUN; ++r) {
                        if (r >= rows) {
                            break;
                        }
                        const int pixel = base[r] + i * wp + j;
                        const int id = ids[(long long)pixel * Q + q];
                        if (id != cur) {
                            if (cur >= 0 && acc != 0.0f) {
                                const long long c = (long long)q * capacity + cur;
                                atomicAdd(S + (c * T + t) * M + m, acc / (float)counts[c]);
                            }
                            cur = id;
                            acc = 0.0f;
                        }
                        acc += d[r];
                        if (id >= 0 || d[r] == 0.0f || dW_over == nullptr) {
                            continue;
                        }
                        const int bi = pixel / (hp * wp);
                        const int y0 = (pixel - bi * hp * wp) / wp - top;
                        const int x0 = pixel % wp - left;
                        if (y0 < 0 || y0 >= h || x0 < 0 || x0 >= w) {
                            continue;
                        }
                        add_overflow_dw(x + ((long long)(bi * h + y0) * w + x0) * C + q * L, L, d[r],
                                        dW_over + ((long long)q * L * T + t) * M + m, (long long)T * M);
                    }
                    if (cur >= 0 && acc != 0.0f) {
                        const long long c = (long long)q * capacity + cur;
                        atomicAdd(S + (c * T + t) * M + m, acc / (float)counts[c]);
                    }
                }
            }
        }
    }
    if (db != nullptr) {
        add_block_column_sums(db_part, m, M, db);
    }
}
