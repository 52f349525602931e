"""The kernel runtime's host build (minireuse.kernels.runtime): CUDA's execution model on the CPU.

Each test builds a small kernel of its own. The host runner must run a launch as
CUDA does (every block, blockDim real threads, barriers, shared memory, atomics),
and must make the classic kernel bugs fail: a missing barrier, a dependence on the
order in which blocks run, barrier divergence, writing past the dynamic shared
memory. Correct variants of the same kernels pass under every schedule.
"""
import numpy as np
import pytest

from minireuse.kernels import runtime

pytestmark = pytest.mark.skipif(runtime.host_compiler() is None, reason="no host C++ compiler")

SOURCE = r"""
// Block sums of x into partials, then the last block (ticket) adds them in a fixed order.
extern "C" __global__ void __launch_bounds__(256)
sum_ticket(const float* x, long long n, float* partials, unsigned int* ticket, float* out)
{
    __shared__ float red[256];
    __shared__ int is_last;
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        acc += x[i];
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = red[0];
        __threadfence();
        is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int b = 0; b < (int)gridDim.x; ++b) total += ((volatile float*)partials)[b];
        *out = total;
    }
}

// The same with the barrier after the shared store missing.
extern "C" __global__ void __launch_bounds__(256)
sum_no_barrier(const float* x, long long n, float* partials, unsigned int* ticket, float* out)
{
    __shared__ float red[256];
    __shared__ int is_last;
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        acc += x[i];
    }
    red[threadIdx.x] = acc;
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = red[0];
        __threadfence();
        is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int b = 0; b < (int)gridDim.x; ++b) total += ((volatile float*)partials)[b];
        *out = total;
    }
}

// The same, but "the last block" taken to be the one with the highest index: right
// only when blocks finish in index order.
extern "C" __global__ void __launch_bounds__(256)
sum_last_index(const float* x, long long n, float* partials, unsigned int* ticket, float* out)
{
    __shared__ float red[256];
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        acc += x[i];
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = red[0];
    if (blockIdx.x != gridDim.x - 1 || threadIdx.x != 0) return;
    float total = 0.0f;
    for (int b = 0; b < (int)gridDim.x; ++b) total += ((volatile float*)partials)[b];
    *out = total;
}

// Threads of the upper half return before a barrier the others reach.
extern "C" __global__ void
divergent(float* y)
{
    if (threadIdx.x >= blockDim.x / 2) return;
    __syncthreads();
    y[threadIdx.x] = 1.0f;
}

// Stages n floats in dynamic shared memory, reversed through it.
extern "C" __global__ void
reverse_in_shared(const float* x, float* y, int n)
{
    extern __shared__ float buf[];
    for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = x[i];
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = buf[n - 1 - i];
}

// A histogram with atomics from every thread of every block (ints and floats).
extern "C" __global__ void
histogram(const int* bins, int n, int* counts, float* weights)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        atomicAdd(counts + bins[i], 1);
        atomicAdd(weights + bins[i], 0.5f);
    }
}

// Each thread reports its indices and the launch's dimensions (2-D grid and block).
extern "C" __global__ void
whoami(int* out)
{
    const int t = threadIdx.x + blockDim.x * threadIdx.y;
    const int b = blockIdx.x + gridDim.x * blockIdx.y;
    int* o = out + 6 * (b * blockDim.x * blockDim.y + t);
    o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = blockIdx.x; o[3] = blockIdx.y;
    o[4] = blockDim.x * blockDim.y; o[5] = gridDim.x * gridDim.y;
}
"""

MODULE = runtime.KernelModule("test kernels", SOURCE)


@pytest.fixture
def host():
    r = MODULE.host()
    saved = (r.schedule, r.reverse_blocks)
    yield r
    r.schedule, r.reverse_blocks = saved


def _sum(host, name, x, blocks):
    partials = np.zeros(blocks, np.float32)
    ticket = np.zeros((), np.uint32)
    out = np.full((), np.nan, np.float32)
    host.launch(name, (blocks,), (256,), (x, np.int64(x.size), partials, ticket, out))
    return float(out)


def _data():
    return np.random.default_rng(0).uniform(0.5, 1.5, 5000).astype(np.float32)


@pytest.mark.parametrize("schedule", ["concurrent", "forward", "reverse"])
@pytest.mark.parametrize("reverse_blocks", [False, True])
def test_a_correct_reduction_passes_under_every_schedule(host, schedule, reverse_blocks):
    host.schedule, host.reverse_blocks = schedule, reverse_blocks
    x = _data()
    for blocks in (1, 3):
        assert _sum(host, "sum_ticket", x, blocks) == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-5)


def test_a_missing_barrier_is_caught(host):
    """Thread order: thread 0 adds red[128] before thread 128 has stored it."""
    host.schedule = "forward"
    x = _data()
    want = float(x.astype(np.float64).sum())
    assert _sum(host, "sum_ticket", x, 2) == pytest.approx(want, rel=1e-5)
    assert _sum(host, "sum_no_barrier", x, 2) != pytest.approx(want, rel=1e-3)


def test_a_dependence_on_block_order_is_caught(host):
    x = _data()
    want = float(x.astype(np.float64).sum())
    assert _sum(host, "sum_last_index", x, 3) == pytest.approx(want, rel=1e-5)      # blocks in index order
    host.reverse_blocks = True
    assert _sum(host, "sum_last_index", x, 3) != pytest.approx(want, rel=1e-3)
    assert _sum(host, "sum_ticket", x, 3) == pytest.approx(want, rel=1e-5)          # the ticket does not care


@pytest.mark.parametrize("schedule", ["concurrent", "forward"])
def test_barrier_divergence_is_an_error(host, schedule):
    host.schedule = schedule
    with pytest.raises(RuntimeError, match=r"kernel divergent \(host build\): __syncthreads\(\) reached after .* "
                                           r"returned \(barrier divergence\)"):
        host.launch("divergent", (1,), (8,), (np.zeros(8, np.float32),))


def test_dynamic_shared_memory_per_launch_and_its_bounds(host):
    x = np.arange(100, dtype=np.float32)
    y = np.zeros_like(x)
    host.launch("reverse_in_shared", (2,), (32,), (x, y, np.int32(100)), shared_mem=400)
    assert np.array_equal(y, x[::-1])
    with pytest.raises(RuntimeError, match="wrote past the 200 bytes of dynamic shared memory"):
        host.launch("reverse_in_shared", (1,), (32,), (x, y, np.int32(100)), shared_mem=200)


def test_atomics_from_concurrent_threads_lose_nothing(host):
    bins = np.random.default_rng(1).integers(0, 7, 20000).astype(np.int32)
    counts, weights = np.zeros(7, np.int32), np.zeros(7, np.float32)
    host.launch("histogram", (3,), (128,), (bins, np.int32(bins.size), counts, weights))
    assert np.array_equal(counts, np.bincount(bins, minlength=7))
    assert np.array_equal(weights, 0.5 * counts.astype(np.float32))


def test_indices_and_dimensions_as_launched(host):
    out = np.full((3 * 2, 4 * 2, 6), -1, np.int32)
    host.launch("whoami", (3, 2), (4, 2), (out,))
    blocks = [(bx, by) for by in range(2) for bx in range(3)]
    for b, (bx, by) in enumerate(blocks):
        for t in range(8):
            assert out[b, t].tolist() == [t % 4, t // 4, bx, by, 8, 6]


def test_launches_are_checked_before_running(host):
    x = np.zeros(10, np.float32)
    with pytest.raises(TypeError, match="argument n expected a numpy int64 scalar, got int"):
        host.launch("sum_ticket", (1,), (256,), (x, 10, x, np.zeros((), np.uint32), x))
    with pytest.raises(TypeError, match="argument ticket expected a device array of uint32"):
        host.launch("sum_ticket", (1,), (256,), (x, np.int64(10), x, np.zeros((), np.int32), x))
    with pytest.raises(ValueError, match="argument x must be C-contiguous"):
        host.launch("sum_ticket", (1,), (256,), (np.zeros(20, np.float32)[::2], np.int64(10), x,
                                                 np.zeros((), np.uint32), x))
    with pytest.raises(ValueError, match=r"more than its __launch_bounds__\(256\)"):
        host.launch("sum_ticket", (1,), (512,), (x, np.int64(10), x, np.zeros((), np.uint32), x))
    with pytest.raises(ValueError, match="not defined in test kernels"):
        host.launch("nothing", (1,), (1,), ())
    with pytest.raises(ValueError, match="HostRunner.schedule must be one of"):
        host.schedule = "sideways"
        host.launch("divergent", (1,), (2,), (x,))
