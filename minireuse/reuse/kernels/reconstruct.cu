// Reconstruction y[n] = sum over groups of the cluster product, as a gather.
// Python twin: minireuse/reuse/clustering.py (reconstruct) via matmul.py / conv.py.
#include "reuse_common.cuh"

// Exact product of one overflow member (a singleton cluster):
// sum_l xs[l] * ws[l * stride_l].
__device__ __forceinline__ float overflow_dot(const float* __restrict__ xs, int len,
                                          const float* __restrict__ ws, long long stride_l)
{
    float acc = 0.0f;
    for (int l = 0; l < len; ++l) {
        acc = fmaf(xs[l], ws[l * stride_l], acc);
    }
    return acc;
}

// General path (dense layers, im2col rows). One thread per output column m of
// a run of REUSE_RUN consecutive rows, lanes along m so a warp reads one
// contiguous piece of a row of P:
//   y[n, m] = sum_g P[g, c, m] / counts[g, c]  with c = ids[n, g]     (+ bias[m])
// P = sums @ W_g (cuBLAS), so P / count is the centroid's product. Rows of the
// run in the same cluster reuse the value already loaded (one L2 read per run
// of equal ids). For an overflow member (c == -1) the exact
// x[n, g] . W[g*L:(g+1)*L, m] is added instead: it acts as a singleton
// cluster. No atomics: deterministic.
// Launch: block (32, 8); grid (ceil(M / 32), any) with runs grid-strided.
extern "C" __global__ void
reconstruct_rows(const float* __restrict__ P, const int* __restrict__ ids,
                 const int* __restrict__ counts, int capacity,
                 const float* __restrict__ x, const float* __restrict__ W,
                 const float* __restrict__ bias, float* __restrict__ y,
                 int N, int K, int L, int G, int M)
{
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) {
        return;
    }
    const float b = bias != nullptr ? bias[m] : 0.0f;
    for (int n0 = (blockIdx.y * blockDim.y + threadIdx.y) * REUSE_RUN; n0 < N;
         n0 += gridDim.y * blockDim.y * REUSE_RUN) {
        const int rows = min(REUSE_RUN, N - n0);
        float acc[REUSE_RUN];
#pragma unroll
        for (int r = 0; r < REUSE_RUN; ++r) {
            acc[r] = 0.0f;
        }
        for (int g = 0; g < G; ++g) {
            int cur = -1;
            float value = 0.0f;
#pragma unroll
            for (int r = 0; r < REUSE_RUN; ++r) {
                if (r >= rows) {
                    break;
                }
                const int n = n0 + r;
                const int id = ids[(long long)n * G + g];
                if (id >= 0) {
                    if (id != cur) {
                        const long long c = (long long)g * capacity + id;
                        value = P[c * M + m] / (float)counts[c];
                        cur = id;
                    }
                    acc[r] += value;
                } else {
                    const int k0 = g * L;
                    acc[r] += overflow_dot(x + (long long)n * K + k0, min(L, K - k0),
                                           W + (long long)k0 * M + m, M);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < REUSE_RUN; ++r) {
            if (r < rows) {
                y[(long long)(n0 + r) * M + m] = acc[r] + b;
            }
        }
    }
}

// Pixel-aligned conv path. Output n = (b, oy, ox) reads, for every kernel
// offset t = (i, j) and channel group q, the cluster of the padded pixel
// (b, oy*stride + i, ox*stride + j):
//   y[n, m] = sum_{t, q} P[q, c, t, m] / counts[q, c]   with c = ids[pixel, q]   (+ bias[m])
// P (Q, capacity, kh*kw, M) = sums_q @ W'_q with W'_q[l, (t, m)] = W[t, q*L + l, m].
// One thread per column m of a run of REUSE_RUN consecutive outputs; outputs
// of the run whose pixels share a cluster reuse the loaded value. Overflow
// members (c == -1) add the exact x[pixel, q-slice] . W[t, q-slice, m] (zero
// for padding pixels). x is the unpadded NHWC input (B, h, w, C),
// W (kh, kw, C, M), ids (B*hp*wp, Q). No atomics: deterministic.
// Launch: block (32, 8); grid (ceil(M / 32), any) with runs grid-strided.
extern "C" __global__ void
reconstruct_pixels(const float* __restrict__ P, const int* __restrict__ ids,
                   const int* __restrict__ counts, int capacity,
                   const float* __restrict__ x, const float* __restrict__ W,
                   const float* __restrict__ bias, float* __restrict__ y,
                   int B, int h, int w, int C, int L, int Q, int kh, int kw, int stride,
                   int top, int left, int hp, int wp, int oh, int ow, int M)
{
    const int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= M) {
        return;
    }
    const float b = bias != nullptr ? bias[m] : 0.0f;
    const int T = kh * kw;
    const int N = B * oh * ow;
    for (int n0 = (blockIdx.y * blockDim.y + threadIdx.y) * REUSE_RUN; n0 < N;
         n0 += gridDim.y * blockDim.y * REUSE_RUN) {
        const int rows = min(REUSE_RUN, N - n0);
        float acc[REUSE_RUN];
        int base[REUSE_RUN];   // padded pixel under offset (0, 0) of each output of the run
#pragma unroll
        for (int r = 0; r < REUSE_RUN; ++r) {
            acc[r] = 0.0f;
            const int n = min(n0 + r, N - 1);
            const int bi = n / (oh * ow);
            const int rem = n - bi * oh * ow;
            const int oy = rem / ow;
            base[r] = (bi * hp + oy * stride) * wp + (rem - oy * ow) * stride;
        }
        for (int i = 0; i < kh; ++i) {
            for (int j = 0; j < kw; ++j) {
                const int t = i * kw + j;
                for (int q = 0; q < Q; ++q) {
                    int cur = -1;
                    float value = 0.0f;
#pragma unroll
                    for (int r = 0; r < REUSE_RUN; ++r) {
                        if (r >= rows) {
                            break;
                        }
                        const int pixel = base[r] + i * wp + j;
                        const int id = ids[(long long)pixel * Q + q];
                        if (id >= 0) {
                            if (id != cur) {
                                const long long c = (long long)q * capacity + id;
                                value = P[(c * T + t) * M + m] / (float)counts[c];
                                cur = id;
                            }
                            acc[r] += value;
                            continue;
                        }
                        const int bi = pixel / (hp * wp);
                        const int y0 = (pixel - bi * hp * wp) / wp - top;
                        const int x0 = pixel % wp - left;
                        if (y0 < 0 || y0 >= h || x0 < 0 || x0 >= w) {
                            continue;
                        }
                        acc[r] += overflow_dot(x + ((long long)(bi * h + y0) * w + x0) * C + q * L, L,
                                               W + ((long long)t * C + q * L) * M + m, M);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < REUSE_RUN; ++r) {
            if (r < rows) {
                y[(long long)(n0 + r) * M + m] = acc[r] + b;
            }
        }
    }
}
