// Shared by every kernel of the deep-reuse fast path (minireuse/reuse/cuda/).
// cuda/runtime.py pastes this file in place of the #include line, so NVRTC needs no
// include path and the compile cache key covers it; nvcc (tests) uses -I.
#ifndef MINIREUSE_REUSE_COMMON_CUH
#define MINIREUSE_REUSE_COMMON_CUH

// Empty slot of a cluster table. Keys are the codes widened to 64 bits, so every
// code of up to 63 bits differs from it; the one 64-bit code equal to it (all
// H = 64 bits set) gets no slot and its rows are computed exactly (table_insert).
#define REUSE_EMPTY_KEY 0xFFFFFFFFFFFFFFFFull

// Layout of the small per-call statistics vector (int32), read by the host one
// call later (see cuda/runtime.py, CapacityTracker).
#define STAT_MAX_DISTINCT 0   // max over groups of the distinct codes seen
#define STAT_SUM_DISTINCT 1   // sum over groups of the distinct codes seen
#define STAT_OVERFLOW 2       // (row, group) pairs computed exactly: cluster beyond capacity
#define STAT_TABLE_FULL 3     // (row, group) pairs whose code found no table slot
#define STAT_COUNT 4

// Consecutive rows handled by one thread in centroid_sums, reconstruct_* and
// cluster_sums_*. Neighbouring rows (neighbouring output pixels, padding
// borders) often fall into the same cluster: the thread merges them in
// registers, one atomic (or one gathered load) per run of equal ids instead
// of one per row. 4 keeps the run kernels near 64-80 registers (8: up to 128).
// Must match cuda/runtime.py RUN.
#define REUSE_RUN 4

// A "row" of the hashing and accumulation passes is either a row of X (N, K)
// (general path: hp == 0) or a pixel of the zero-padded NHWC image
// (B, hp, wp) (pixel path). The source row is the row of the unpadded input
// (B*h*w, K) that holds its values, or -1 for a padding pixel (all zeros).
__device__ __forceinline__ int source_row(int r, int hp, int wp, int h, int w, int top, int left)
{
    if (hp <= 0) {
        return r;
    }
    const int img = r / (hp * wp);
    const int rem = r - img * hp * wp;
    const int y = rem / wp - top;
    const int x = rem % wp - left;
    if (y < 0 || y >= h || x < 0 || x >= w) {
        return -1;
    }
    return (img * h + y) * w + x;
}

// MurmurHash3's finaliser: LSH codes differ mostly in their low bits, so the
// table index must mix all of them (a 64-bit code's halves are folded first;
// a code below 2^32 mixes as itself).
__device__ __forceinline__ unsigned int mix32(unsigned long long code)
{
    unsigned int h = (unsigned int)code ^ (unsigned int)(code >> 32);
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

// Find or insert `code` in one group's open-addressing table (linear probing).
// keys (table_size) start as REUSE_EMPTY_KEY; the thread whose atomicCAS claims
// an empty slot takes the next compact id of the group (atomicAdd on
// *distinct) and writes it to vals[slot], or -1 when the id is beyond
// `capacity` (the cluster overflows and its members are computed exactly).
// Nobody reads vals in the same launch, so no thread ever waits for another.
// Returns the slot, or -1 when probe_limit slots were all taken by other codes
// (or when the code is REUSE_EMPTY_KEY itself, see above).
// Slots only ever go from empty to a key, so every thread hashing the same code
// walks the same probe sequence and stops at the same slot.
__device__ __forceinline__ int table_insert(unsigned long long* keys, int* vals, int table_size,
                                            unsigned long long code, int* distinct, int capacity,
                                            int probe_limit)
{
    const unsigned long long key = code;
    if (key == REUSE_EMPTY_KEY) {
        return -1;
    }
    const unsigned int mask = (unsigned int)table_size - 1u;
    unsigned int s = mix32(code) & mask;
    for (int p = 0; p < probe_limit; ++p) {
        unsigned long long cur = ((volatile unsigned long long*)keys)[s];
        if (cur == REUSE_EMPTY_KEY) {
            cur = atomicCAS(keys + s, REUSE_EMPTY_KEY, key);
            if (cur == REUSE_EMPTY_KEY) {
                const int id = atomicAdd(distinct, 1);
                vals[s] = id < capacity ? id : -1;
                return (int)s;
            }
        }
        if (cur == key) {
            return (int)s;
        }
        s = (s + 1u) & mask;
    }
    return -1;
}

#endif  // MINIREUSE_REUSE_COMMON_CUH
