"""Kernel machinery below the layers: one runtime for every CUDA source (signatures read
from the source, checked launches, NVRTC on the GPU and a threaded host build on the CPU,
runtime.py and host_runtime.h) and the fused kernels of the exact training step
(step_kernels.py)."""
