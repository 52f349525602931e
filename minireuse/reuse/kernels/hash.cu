// Hashing of neuron vectors: the input scale, the fused projection + threshold
// + bit packing (+ cluster-table insertion), and table insertion of given codes.
// Python twins: minireuse/reuse/lsh.py (input_scale, hash_codes) and
// clustering.py (assign_clusters).
#include "reuse_common.cuh"

// s = sqrt(mean(x * x)) for the 'offset' family's thresholds b = U * s, left on
// the device. Each block reduces its grid-stride share; the last block to
// finish (ticket) adds the per-block partials in a fixed order, so the result
// does not depend on block timing. ticket must be zero on entry.
// Launch: 256 threads per block (a power of two; the shared arrays hold 256),
// at most 1024 blocks.
extern "C" __global__ void __launch_bounds__(256)
input_rms(const float* __restrict__ x, long long n, float* __restrict__ partials,
          unsigned int* __restrict__ ticket, float* __restrict__ scale)
{
    __shared__ float red[256];
    __shared__ double red_d[256];
    __shared__ int is_last;
    const int tid = threadIdx.x;
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + tid; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i];
        acc = fmaf(v, v, acc);
    }
    red[tid] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) {
            red[tid] += red[tid + s];
        }
        __syncthreads();
    }
    if (tid == 0) {
        partials[blockIdx.x] = red[0];
        __threadfence();
        is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) {
        return;
    }
    __threadfence();    // the reading side of the ticket: see every block's partial
    double total = 0.0;
    for (int i = tid; i < (int)gridDim.x; i += blockDim.x) {
        total += ((volatile float*)partials)[i];
    }
    red_d[tid] = total;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) {
            red_d[tid] += red_d[tid + s];
        }
        __syncthreads();
    }
    if (tid == 0) {
        *scale = n > 0 ? (float)sqrt(red_d[0] / (double)n) : 0.0f;
    }
}

// One thread per (row, group): code = sum_h [x_row,g . r_h > b_h] << h.
// blockIdx.y is the group g, so the whole block shares g's planes, staged in
// shared memory (planes_in_smem) or read through L1 when L * HB is too large.
// planes (Gp, L, HB) and unit_offsets (Gp, HB) are padded from H to HB bits
// with zeros by the host; bits >= H are masked off. Thresholds are
// unit_offsets * (*scale), or 0 when scale is null ('origin' family).
// The last group of a row past column K reads no memory: its missing columns
// are the zero padding. Outputs, each optional (null = skip):
//   codes (rows, G) uint32;
//   slots (rows, G): the row's slot in group g's table (keys/vals, table_size
//   per group, see table_insert) or -1 (no slot: computed exactly).
// Bits hashed per pass over a row: every bit at once up to 32.
template <int HB>
constexpr int HASH_PASS_BITS = HB < 32 ? HB : 32;

template <int HB, typename Code>
__device__ __forceinline__ void hash_rows_impl(
    const float* __restrict__ x, int rows, int K, int L, int G,
    int hp, int wp, int h, int w, int top, int left,
    const float* __restrict__ planes, const float* __restrict__ unit_offsets, int H,
    int shared_planes, int planes_in_smem, const float* __restrict__ scale,
    Code* __restrict__ codes,
    unsigned long long* __restrict__ keys, int* __restrict__ vals, int table_size,
    int* __restrict__ distinct, int capacity, int probe_limit,
    int* __restrict__ slots, int* __restrict__ stats)
{
    extern __shared__ float smem_f[];
    const int g = blockIdx.y;
    const int gp = shared_planes ? 0 : g;
    const float* gplanes = planes + (long long)gp * L * HB;
    float* s_thr = smem_f;
    float* s_planes = smem_f + HB;
    const float s = scale != nullptr ? *scale : 0.0f;
    for (int i = threadIdx.x; i < HB; i += blockDim.x) {
        s_thr[i] = scale != nullptr ? unit_offsets[gp * HB + i] * s : 0.0f;
    }
    if (planes_in_smem) {
        for (int i = threadIdx.x; i < L * HB; i += blockDim.x) {
            s_planes[i] = gplanes[i];
        }
    }
    __syncthreads();
    const float* P = planes_in_smem ? s_planes : gplanes;
    const Code mask = H >= (int)(8 * sizeof(Code)) ? ~(Code)0 : (((Code)1 << H) - (Code)1);
    const int k0 = g * L;
    const int len = min(L, K - k0);

    for (long long rr = (long long)blockIdx.x * blockDim.x + threadIdx.x; rr < rows;
         rr += (long long)gridDim.x * blockDim.x) {
        const int r = (int)rr;             // rows < 2^31; the step may not be
        const int src = source_row(r, hp, wp, h, w, top, left);
        const float* xr = src >= 0 ? x + (long long)src * K + k0 : x;
        // the bits in passes of at most 32 accumulators: 64 at once held 166 registers
        // per thread at sm_90 (19 % occupancy); a second pass rereads the row from L1
        Code code = 0;
#pragma unroll 1
        for (int c0 = 0; c0 < HB; c0 += HASH_PASS_BITS<HB>) {
            float acc[HASH_PASS_BITS<HB>];
#pragma unroll
            for (int j = 0; j < HASH_PASS_BITS<HB>; ++j) {
                acc[j] = 0.0f;
            }
            if (src >= 0) {
                for (int l = 0; l < len; ++l) {
                    const float v = xr[l];
                    const float* pl = P + l * HB + c0;
#pragma unroll
                    for (int j = 0; j < HASH_PASS_BITS<HB>; ++j) {
                        acc[j] = fmaf(v, pl[j], acc[j]);
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < HASH_PASS_BITS<HB>; ++j) {
                code |= (Code)(acc[j] > s_thr[c0 + j] ? 1u : 0u) << (c0 + j);
            }
        }
        code &= mask;
        const long long out = (long long)r * G + g;
        if (codes != nullptr) {
            codes[out] = code;
        }
        if (keys != nullptr) {
            const int slot = table_insert(keys + (long long)g * table_size, vals + (long long)g * table_size,
                                          table_size, code, distinct + g, capacity, probe_limit);
            if (slot < 0 && (unsigned long long)code != REUSE_EMPTY_KEY) {
                atomicAdd(stats + STAT_TABLE_FULL, 1);
            }
            slots[out] = slot;
        }
    }
}

// The four compiled bit widths (cuda/runtime.py hash_bits_bucket picks the smallest that holds H).
extern "C" __global__ void __launch_bounds__(128)
hash_rows_h8(const float* __restrict__ x, int rows, int K, int L, int G,
             int hp, int wp, int h, int w, int top, int left,
             const float* __restrict__ planes, const float* __restrict__ unit_offsets, int H,
             int shared_planes, int planes_in_smem, const float* __restrict__ scale,
             unsigned int* __restrict__ codes,
             unsigned long long* __restrict__ keys, int* __restrict__ vals, int table_size,
             int* __restrict__ distinct, int capacity, int probe_limit,
             int* __restrict__ slots, int* __restrict__ stats)
{
    hash_rows_impl<8, unsigned int>(x, rows, K, L, G, hp, wp, h, w, top, left, planes, unit_offsets, H, shared_planes,
                      planes_in_smem, scale, codes, keys, vals, table_size, distinct, capacity, probe_limit,
                      slots, stats);
}

extern "C" __global__ void __launch_bounds__(128)
hash_rows_h16(const float* __restrict__ x, int rows, int K, int L, int G,
              int hp, int wp, int h, int w, int top, int left,
              const float* __restrict__ planes, const float* __restrict__ unit_offsets, int H,
              int shared_planes, int planes_in_smem, const float* __restrict__ scale,
              unsigned int* __restrict__ codes,
              unsigned long long* __restrict__ keys, int* __restrict__ vals, int table_size,
              int* __restrict__ distinct, int capacity, int probe_limit,
              int* __restrict__ slots, int* __restrict__ stats)
{
    hash_rows_impl<16, unsigned int>(x, rows, K, L, G, hp, wp, h, w, top, left, planes, unit_offsets, H, shared_planes,
                       planes_in_smem, scale, codes, keys, vals, table_size, distinct, capacity, probe_limit,
                       slots, stats);
}

extern "C" __global__ void __launch_bounds__(128)
hash_rows_h32(const float* __restrict__ x, int rows, int K, int L, int G,
              int hp, int wp, int h, int w, int top, int left,
              const float* __restrict__ planes, const float* __restrict__ unit_offsets, int H,
              int shared_planes, int planes_in_smem, const float* __restrict__ scale,
              unsigned int* __restrict__ codes,
              unsigned long long* __restrict__ keys, int* __restrict__ vals, int table_size,
              int* __restrict__ distinct, int capacity, int probe_limit,
              int* __restrict__ slots, int* __restrict__ stats)
{
    hash_rows_impl<32, unsigned int>(x, rows, K, L, G, hp, wp, h, w, top, left, planes, unit_offsets, H, shared_planes,
                       planes_in_smem, scale, codes, keys, vals, table_size, distinct, capacity, probe_limit,
                       slots, stats);
}

extern "C" __global__ void __launch_bounds__(128)
hash_rows_h64(const float* __restrict__ x, int rows, int K, int L, int G,
              int hp, int wp, int h, int w, int top, int left,
              const float* __restrict__ planes, const float* __restrict__ unit_offsets, int H,
              int shared_planes, int planes_in_smem, const float* __restrict__ scale,
              unsigned long long* __restrict__ codes,
              unsigned long long* __restrict__ keys, int* __restrict__ vals, int table_size,
              int* __restrict__ distinct, int capacity, int probe_limit,
              int* __restrict__ slots, int* __restrict__ stats)
{
    hash_rows_impl<64, unsigned long long>(x, rows, K, L, G, hp, wp, h, w, top, left, planes, unit_offsets, H, shared_planes,
                       planes_in_smem, scale, codes, keys, vals, table_size, distinct, capacity, probe_limit,
                       slots, stats);
}

// Table insertion of given codes (rows, G) (uint64, any width), one thread per
// (row, group): the cluster assignment of precomputed codes (hash_rows does the
// same fused).
extern "C" __global__ void
assign_codes(const unsigned long long* __restrict__ codes, int rows, int G,
             unsigned long long* __restrict__ keys, int* __restrict__ vals, int table_size,
             int* __restrict__ distinct, int capacity, int probe_limit,
             int* __restrict__ slots, int* __restrict__ stats)
{
    const long long total = (long long)rows * G;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int g = (int)i % G;          // rows * G < 2^31 (checked by the host)
        const int slot = table_insert(keys + (long long)g * table_size, vals + (long long)g * table_size,
                                      table_size, codes[i], distinct + g, capacity, probe_limit);
        if (slot < 0 && codes[i] != REUSE_EMPTY_KEY) {
            atomicAdd(stats + STAT_TABLE_FULL, 1);
        }
        slots[i] = slot;
    }
}
