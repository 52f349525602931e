// Backward to the input: the 'cluster' dX (every member gets its cluster's
// row of D = (S / count) @ W_g^T). The general conv path carries it to the
// input with the one col2im kernel (minireuse/fused.py).
// Python twins: matmul.py (reuse_matmul_backward), conv.py (pixel_conv_backward).
#include "reuse_common.cuh"

// dX[n, k] of the general path. g = k / L:
//   ids[n, g] = c >= 0: D[g, c, k - g*L]           (D (G, capacity, L))
//   c == -1 (overflow, a singleton cluster): the exact dy[n, :] . W[k, :]
__device__ __forceinline__ float dcol_value(int n, int k, const float* __restrict__ D,
                                            const int* __restrict__ ids, int capacity,
                                            const float* __restrict__ dy, const float* __restrict__ W,
                                            int L, int G, int M)
{
    const int g = k / L;
    const int id = ids[(long long)n * G + g];
    if (id >= 0) {
        return D[((long long)g * capacity + id) * L + (k - g * L)];
    }
    const float* dyn = dy + (long long)n * M;
    const float* wk = W + (long long)k * M;
    float acc = 0.0f;
    for (int m = 0; m < M; ++m) {
        acc = fmaf(dyn[m], wk[m], acc);
    }
    return acc;
}

// Dense layers: dX (N, K), one thread per element (n, k). Gather, no atomics.
// Launch: 256 threads per block, elements grid-strided.
extern "C" __global__ void
dx_cluster_rows(const float* __restrict__ D, const int* __restrict__ ids, int capacity,
                const float* __restrict__ dy, const float* __restrict__ W, float* __restrict__ dx,
                int N, int K, int L, int G, int M)
{
    const long long total = (long long)N * K;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int n = (int)i / K;          // N * K < 2^31 (checked by the host)
        const int k = (int)i - n * K;
        dx[i] = dcol_value(n, k, D, ids, capacity, dy, W, L, G, M);
    }
}

// Pixel-aligned conv, 'cluster' dX: one thread per input element (b, y, x, c)
// of the unpadded input, q = c / L, l = c % L, pixel = padded (b, y+top, x+left):
//   ids[pixel, q] = c' >= 0: D[q, c', l]   (D (Q, capacity, L) = (S / count) @ W'_q^T)
//   c' == -1 (overflow): the exact sum over offsets t = (i, j) whose output n
//   exists of dy[n, :] . W[t, c, :].
// Padding pixels get nothing (their gradient is dropped). Gather, no atomics.
// Launch: 256 threads per block, elements grid-strided.
extern "C" __global__ void
dx_cluster_pixels(const float* __restrict__ D, const int* __restrict__ ids, int capacity,
                  const float* __restrict__ dy, const float* __restrict__ W, float* __restrict__ dx,
                  int B, int h, int w, int C, int L, int Q, int kh, int kw, int stride,
                  int top, int left, int hp, int wp, int oh, int ow, int M)
{
    const long long total = (long long)B * h * w * C;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int c = (int)e % C;          // the input has < 2^31 elements (checked by the host)
        const int pix = (int)e / C;
        const int x0 = pix % w;
        const int y0 = (pix / w) % h;
        const int b = pix / (w * h);
        const int py = y0 + top;
        const int px = x0 + left;
        const int q = c / L;
        const int id = ids[((long long)(b * hp + py) * wp + px) * Q + q];
        if (id >= 0) {
            dx[e] = D[((long long)q * capacity + id) * L + (c - q * L)];
            continue;
        }
        float acc = 0.0f;
        for (int i = 0; i < kh; ++i) {
            const int ny = py - i;
            if (ny < 0 || ny % stride != 0 || ny / stride >= oh) {
                continue;
            }
            for (int j = 0; j < kw; ++j) {
                const int nx = px - j;
                if (nx < 0 || nx % stride != 0 || nx / stride >= ow) {
                    continue;
                }
                const float* dyn = dy + ((long long)(b * oh + ny / stride) * ow + nx / stride) * M;
                const float* wc = W + ((long long)(i * kw + j) * C + c) * M;
                for (int m = 0; m < M; ++m) {
                    acc = fmaf(dyn[m], wc[m], acc);
                }
            }
        }
        dx[e] = acc;
    }
}
