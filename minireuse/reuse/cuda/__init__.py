"""CUDA fast path of deep reuse: fused RawKernels plus batched cuBLAS GEMMs.

Same math as the reference path (reuse/lsh.py, clustering.py, matmul.py,
conv.py), which is its oracle in tests/test_cuda_kernels.py; each file here sits
beside its twin:

    runtime.py     kernel sources, launch checks, device layers (GPU / host)
    capacity.py    workspace (Arena) and the cluster tables' capacities (CapacityTracker)
    lsh.py         input_rms, hash_rows_h*                        (twin: reuse/lsh.py)
    clustering.py  the clustering stage, centroids, reconstruct, cluster sums, cluster dX
    matmul.py      the reuse product X @ W + b                    (twin: reuse/matmul.py)
    conv.py        the reuse convolution, general and pixel paths (twin: reuse/conv.py)

The kernels live in ``reuse/kernels/*.cu`` (one page each in docs/kernels/) and
run on the GPU (one NVRTC module) or, through ``runtime.HostDevice``, as their
host build on NumPy arrays (tests on machines without a GPU).

Capacity. The cluster tables have a fixed capacity (clusters per group), sized
from earlier calls' statistics (capacity.CapacityTracker). A code that finds its
group's table full of other clusters is not dropped: its members get id -1 and
every kernel computes them exactly, as singleton clusters. Which codes overflow
depends on which thread inserted first (ids are first-come), so near capacity the
partition into clusters and singletons, and with it y, may differ from run to run
(by the error of the clusters that overflowed); without overflow (capacity above
the distinct codes, the state the statistics steer to) the result does not depend
on the capacity or on timing beyond float summation order. The exact path of
overflow members is bounded by the exact layer's cost: their forward products
are L multiply-adds each, and once the statistics show overflow their dW is one
GEMM (matmul.overflow_rows, conv.overflow_pixels) instead of per-element atomics.

Importing this package needs no GPU; cupy is imported through
minireuse.backend.require_gpu() on first use of the GPU device layer.
"""
from .clustering import (assign_codes, centroid_pixels, centroid_rows, cluster_sums_rows, dx_cluster_rows,
                         reconstruct_rows)
from .conv import ConvGeometry, CudaConvCache, cuda_reuse_conv_backward, cuda_reuse_conv_forward
from .lsh import hash_pixels, hash_rows, input_scale
from .matmul import CudaMatmulCache, batched_gemm, cuda_reuse_matmul_backward, cuda_reuse_matmul_forward
from .capacity import Arena, CapacityTracker, CudaState, cuda_state, round_capacity
from .runtime import (KERNEL_DIR, MODULE, STAT_COUNT, STAT_MAX_DISTINCT, STAT_OVERFLOW, STAT_SUM_DISTINCT,
                      STAT_TABLE_FULL, CupyDevice, HostDevice, HostReader, check_launch_args, device,
                      hash_bits_bucket, kernel_header, kernel_signatures, kernel_sources, module_source, table_size,
                      using_device)
