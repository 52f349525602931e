// Cluster ids and centroid sums from the table slots of hash_rows/assign_codes.
// Python twin: minireuse/reuse/clustering.py (assign_clusters, centroids).
#include "reuse_common.cuh"

// Adds one run of equal ids (members rows, value sum acc) of column k = g*L + l.
__device__ __forceinline__ void flush_run(int id, float acc, int members, int g, int l, int L, int capacity,
                                          int* __restrict__ counts, float* __restrict__ sums,
                                          int* __restrict__ stats)
{
    if (members == 0) {
        return;
    }
    if (l == 0) {
        atomicAdd(id >= 0 ? counts + (long long)g * capacity + id : stats + STAT_OVERFLOW, members);
    }
    if (id >= 0 && acc != 0.0f) {
        atomicAdd(sums + ((long long)g * capacity + id) * L + l, acc);
    }
}

// One thread per column k < K of a run of REUSE_RUN consecutive rows (the
// zero padding of the last group adds nothing). With g = k / L, l = k % L,
// for each row r of the run:
//   id = vals[g, slots[r, g]]   (-1 when the slot is -1 or the cluster overflowed)
//   the l == 0 thread writes ids[r, g] = id;
//   members are counted in counts[g, id] (id == -1: stats[STAT_OVERFLOW]) and,
//   when x is given, x[r, k] is added to sums[g, id, l].
// Rows of one run with equal ids are merged in registers first: one atomic
// per run of equal ids (padding borders and smooth regions make long runs).
// sums (G, capacity, L) are unnormalised: the mean is taken where it is used
// (reconstruct, cluster_sums), which saves a normalisation launch.
// Why atomics: member lists per cluster would need a sort or a scan (two to
// three more launches) to turn this scatter into a gather, while here a warp's
// atomics hit contiguous floats of one cluster row and zeros are skipped.
// Float sums therefore depend on the order of the atomics (last bits).
// Block 0 also reduces distinct (G,) into stats[STAT_MAX_DISTINCT/SUM_DISTINCT]
// and r_c = sum_g distinct[g] / (rows * G); distinct is final here because the
// table insertion finished in the previous launch.
// Launch: 256 threads per block (a power of two; the shared arrays hold 256);
// rows * K < 2^31 (checked by the host).
extern "C" __global__ void __launch_bounds__(256)
centroid_sums(const float* __restrict__ x, int rows, int K, int L, int G,
              int hp, int wp, int h, int w, int top, int left,
              const int* __restrict__ slots, const int* __restrict__ vals, int table_size,
              int capacity, int* __restrict__ ids, int* __restrict__ counts,
              float* __restrict__ sums, const int* __restrict__ distinct,
              int* __restrict__ stats, float* __restrict__ r_c)
{
    __shared__ int red_sum[256];
    __shared__ int red_max[256];
    const int tid = threadIdx.x;
    if (blockIdx.x == 0) {
        int total = 0;
        int most = 0;
        for (int g = tid; g < G; g += blockDim.x) {
            total += distinct[g];
            most = max(most, distinct[g]);
        }
        red_sum[tid] = total;
        red_max[tid] = most;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (tid < s) {
                red_sum[tid] += red_sum[tid + s];
                red_max[tid] = max(red_max[tid], red_max[tid + s]);
            }
            __syncthreads();
        }
        if (tid == 0) {
            stats[STAT_MAX_DISTINCT] = red_max[0];
            stats[STAT_SUM_DISTINCT] = red_sum[0];
            *r_c = (float)red_sum[0] / ((float)rows * (float)G);
        }
    }

    const int runs = (rows + REUSE_RUN - 1) / REUSE_RUN;
    const long long total = (long long)runs * K;
    for (long long i = (long long)blockIdx.x * blockDim.x + tid; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int run = (int)i / K;        // runs * K <= rows * K < 2^31
        const int k = (int)i - run * K;
        const int g = k / L;
        const int l = k - g * L;
        const int r0 = run * REUSE_RUN;
        const int r_end = min(r0 + REUSE_RUN, rows);
        int cur = -1;
        int members = 0;
        float acc = 0.0f;
        for (int r = r0; r < r_end; ++r) {
            const long long rg = (long long)r * G + g;
            const int slot = slots[rg];
            const int id = slot >= 0 ? vals[(long long)g * table_size + slot] : -1;
            if (l == 0) {
                ids[rg] = id;
            }
            if (id != cur) {
                flush_run(cur, acc, members, g, l, L, capacity, counts, sums, stats);
                cur = id;
                members = 0;
                acc = 0.0f;
            }
            ++members;
            if (id >= 0 && x != nullptr) {
                const int src = source_row(r, hp, wp, h, w, top, left);
                if (src >= 0) {
                    acc += x[(long long)src * K + k];
                }
            }
        }
        flush_run(cur, acc, members, g, l, L, capacity, counts, sums, stats);
    }
}
