"""One way to load, check, launch and host-build minireuse's CUDA kernels.

Both kernel families use it: the fused kernels of the exact step (step_kernels.py) and
the deep-reuse kernels (reuse/kernels/*.cu). A ``KernelModule`` is one CUDA
translation unit. Its ``extern "C" __global__`` functions are the kernels; their
signatures are read from the source, so every launch is checked against the
parameters the kernel declares (count, pointee dtypes, scalar widths, contiguity,
``__launch_bounds__``) before anything runs.

A launch runs on one of two runners:

- ``gpu``: the source compiled once per process by NVRTC (``cupy.RawModule``),
  arguments are CuPy arrays;
- ``host``: the same source compiled as C++ after ``host_runtime.h``, which
  executes a launch as CUDA does: every block of the grid (one after another),
  each with its blockDim threads as real threads, a barrier for
  ``__syncthreads``, static and dynamic shared memory per block, real atomics.
  Arguments are NumPy arrays. The host runner is how every kernel is tested on
  machines without a GPU; ``HostRunner.schedule`` and ``reverse_blocks`` make a
  missing barrier or a dependence on block order fail reproducibly.

The only text the host build changes is the dynamic shared memory declaration
(``extern __shared__ T name[];``), which C++ cannot express with a macro: it
becomes a pointer to the launch's shared buffer.
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading

import numpy as np

from .. import backend

HOST_HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_runtime.h")

_SIGNATURE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\((\d+)\)\s+)?(\w+)\s*\(([^)]*)\)')
_PARAM = re.compile(r"\s*(const\s+)?([A-Za-z_][\w\s]*?)\s*(\*?)\s*(?:__restrict__\s+)?(\w+)\s*$")
POINTEE = {"float": np.float32, "double": np.float64, "int": np.int32, "unsigned int": np.uint32,
           "long long": np.int64, "unsigned long long": np.uint64, "unsigned char": np.uint8}
SCALAR = {"int": np.int32, "unsigned int": np.uint32, "long long": np.int64, "float": np.float32,
          "double": np.float64}
_CTYPE_OF = {np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32, np.int64: ctypes.c_int64,
             np.float32: ctypes.c_float, np.float64: ctypes.c_double}


class Param:
    """One kernel parameter: C type (``const float*``), pointer or scalar, its dtype and name."""

    def __init__(self, decl):
        m = _PARAM.match(decl)
        if m is None:
            raise ValueError(f"cannot read kernel parameter {decl!r}")
        const, base, star, self.name = m.groups()
        base = " ".join(base.split())
        self.pointer = bool(star)
        table = POINTEE if self.pointer else SCALAR
        if base not in table:
            raise ValueError(f"kernel parameter {decl.strip()!r}: type {base!r} is not one of {sorted(table)}")
        self.dtype = np.dtype(table[base])
        self.ctype = (const or "") + base + ("*" if self.pointer else "")

    def __repr__(self):
        return f"{self.ctype} {self.name}"


class Signature:
    """A kernel's name, parameters and ``__launch_bounds__`` (None when it declares none)."""

    def __init__(self, name, params, max_threads):
        self.name, self.params, self.max_threads = name, params, max_threads


def parse_signatures(source):
    """{kernel: Signature} of every ``extern "C" __global__`` function in a CUDA source."""
    out = {}
    for bound, name, params in _SIGNATURE.findall(source):
        plist = [Param(p) for p in params.split(",")] if params.strip() else []
        out[name] = Signature(name, plist, int(bound) if bound else None)
    return out


def _sizes(v):
    """Launch dimensions as a tuple of 1 to 3 positive ints (ValueError otherwise)."""
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if not 1 <= len(v) <= 3 or min(v) < 1:
        raise ValueError(f"launch dimensions must be 1 to 3 positive sizes, got {v}")
    return v


def _dims(v):
    """The (x, y, z) of launch dimensions."""
    v = tuple(int(e) for e in _sizes(v))
    return v + (1,) * (3 - len(v))


def check_launch(sig, grid, block, args, is_array):
    """Raise TypeError/ValueError unless a launch of ``sig`` is well-formed.

    Pointers take contiguous device arrays of the pointee's dtype (or None: a null
    pointer); scalars take NumPy scalars of the declared width, which is what the
    kernel reads from the argument buffer; the block must not exceed the kernel's
    ``__launch_bounds__``.
    """
    name = sig.name
    if len(args) != len(sig.params):
        raise TypeError(f"kernel {name}: expected {len(sig.params)} arguments "
                        f"({', '.join(p.name for p in sig.params)}), got {len(args)}")
    for p, a in zip(sig.params, args):
        if p.pointer:
            if a is None:
                continue
            if not is_array(a) or a.dtype != p.dtype:
                got = f"{type(a).__name__} of {a.dtype.name}" if hasattr(a, "dtype") else type(a).__name__
                raise TypeError(f"kernel {name}: argument {p.name} expected a device array of "
                                f"{p.dtype.name} (or None), got {got}")
            if not a.flags.c_contiguous:
                raise ValueError(f"kernel {name}: argument {p.name} must be C-contiguous, "
                                 f"got strides {a.strides} for shape {a.shape}")
        elif not (isinstance(a, np.generic) and a.dtype == p.dtype):
            raise TypeError(f"kernel {name}: argument {p.name} expected a numpy {p.dtype.name} scalar, "
                            f"got {type(a).__name__}")
    # every launch is checked, so this stays cheap (plain integers; no array reductions)
    block, grid = _sizes(block), _sizes(grid)
    if sig.max_threads is not None:
        threads = 1
        for e in block:
            threads *= e
        if threads > sig.max_threads:
            raise ValueError(f"kernel {name}: block {block} has {threads} threads, more than its "
                             f"__launch_bounds__({sig.max_threads})")


class KernelModule:
    """One CUDA translation unit: its signatures, and launches on the GPU or the host.

    source: the CUDA text, or a function returning it (read on first use).
    gpu_options: NVRTC options; host_flags: extra C++ compiler flags.
    """

    def __init__(self, label, source, gpu_options=(), host_flags=()):
        self.label = label
        self._source = source
        self.gpu_options = tuple(gpu_options)
        self.host_flags = tuple(host_flags)
        self._signatures = None
        self._gpu = None
        self._host = None
        self._lock = threading.Lock()

    @property
    def source(self):
        if callable(self._source):
            self._source = self._source()
        return self._source

    def signatures(self):
        if self._signatures is None:
            self._signatures = parse_signatures(self.source)
        return self._signatures

    def signature(self, name):
        sig = self.signatures().get(name)
        if sig is None:
            raise ValueError(f"kernel {name!r}: not defined in {self.label}")
        return sig

    def gpu(self):
        """The GPU runner (compiles the module with NVRTC on first use)."""
        if self._gpu is None:
            self._gpu = GpuRunner(self)
        return self._gpu

    def host(self):
        """The host runner (builds the host library on first use)."""
        with self._lock:
            if self._host is None:
                self._host = HostRunner(self)
        return self._host

    def runner_for(self, array):
        """The runner for arguments like ``array``: gpu for CuPy arrays, host for NumPy arrays."""
        return self.gpu() if backend.is_cupy_array(array) else self.host()


class GpuRunner:
    """Launches on the GPU through one ``cupy.RawModule`` of the whole source.

    CuPy appends -ftz=true to the options of every NVRTC compile: float32 subnormals
    flush to zero on the GPU (the host build keeps them), whatever the module asks."""

    kind = "gpu"
    max_blocks = None           # grid-stride launches use the sizes their callers choose

    def __init__(self, module):
        self.module = module
        self._raw = None
        self._functions = {}

    def is_array(self, a):
        return backend.is_cupy_array(a)

    def function(self, name):
        if name not in self._functions:
            if self._raw is None:
                cp = backend.require_gpu()
                self._raw = cp.RawModule(code=self.module.source, options=self.module.gpu_options)
            self._functions[name] = self._raw.get_function(name)
        return self._functions[name]

    def launch(self, name, grid, block, args, shared_mem=0):
        check_launch(self.module.signature(name), grid, block, args, self.is_array)
        args = tuple(np.uint64(0) if a is None else a for a in args)
        self.function(name)(tuple(grid), tuple(block), args, shared_mem=shared_mem)


def host_compiler():
    """A C++ compiler on PATH (c++, g++ or clang++), or None."""
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+([\w\s]+?)\s+(\w+)\s*\[\s*\]\s*;")
SCHEDULES = {"concurrent": 0, "forward": 1, "reverse": 2}


def host_source(module):
    """The C++ text of the host build: runtime header, the kernels, one launch entry per kernel."""
    with open(HOST_HEADER) as f:
        header = f.read()
    body = _DYNAMIC_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = "
                                         f"reinterpret_cast<{m.group(1)}*>(MINIREUSE_DYNAMIC_SHARED());",
                               module.source)
    entries = []
    for sig in module.signatures().values():
        unpack = "".join(f"    {p.ctype} a{i} = *reinterpret_cast<{p.ctype}*>(argv[{i}]);\n"
                         for i, p in enumerate(sig.params))
        call = ", ".join(f"a{i}" for i in range(len(sig.params)))
        entries.append(
            f'extern "C" int mrh_entry_{sig.name}(const long long* dims, long long smem, int schedule, '
            f"int reverse_blocks, void** argv, char* message, int message_size)\n{{\n{unpack}"
            f"    return mrh_launch(dims, smem, schedule, reverse_blocks, [=]() {{ {sig.name}({call}); }}, "
            "message, message_size);\n}\n")
    return header + "\n#line 1 \"kernels\"\n" + body + "\n// ---- host launch entries\n" + "\n".join(entries)


class HostRunner:
    """Launches on the host build of a KernelModule (NumPy arrays).

    schedule: 'concurrent' (a block's threads run at once), 'forward' or 'reverse'
    (one thread at a time in thread order between barriers). reverse_blocks runs
    the grid's blocks last to first. max_blocks caps the blocks of grid-stride
    launches whose callers ask ``grid_blocks`` (a host has few cores; tests set it
    to 1 or 2 to make every grid-stride loop iterate).
    """

    kind = "host"

    def __init__(self, module):
        self.module = module
        self.schedule = "concurrent"
        self.reverse_blocks = False
        self.max_blocks = 4
        self._lib = self._build()
        self._lock = threading.Lock()

    def _build(self):
        cxx = host_compiler()
        if cxx is None:
            raise RuntimeError(f"the host build of {self.module.label} needs a C++ compiler (c++, g++ or clang++)")
        text = host_source(self.module)
        d = tempfile.mkdtemp(prefix="minireuse-host-")
        try:
            digest = hashlib.sha1(text.encode()).hexdigest()[:12]
            src, lib = os.path.join(d, f"kernels_{digest}.cpp"), os.path.join(d, f"kernels_{digest}.so")
            with open(src, "w") as f:
                f.write(text)
            cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-ffp-contract=off",
                   "-Wno-unknown-pragmas", *self.module.host_flags, "-o", lib, src]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"building the host build of {self.module.label} failed:\n{r.stderr[-4000:]}")
            return ctypes.CDLL(lib)
        finally:
            shutil.rmtree(d, ignore_errors=True)     # a loaded library needs no file

    def is_array(self, a):
        return isinstance(a, np.ndarray)

    def launch(self, name, grid, block, args, shared_mem=0):
        sig = self.module.signature(name)
        check_launch(sig, grid, block, args, self.is_array)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"HostRunner.schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        dims = (ctypes.c_longlong * 6)(*_dims(grid), *_dims(block))
        values = []
        for p, a in zip(sig.params, args):
            if p.pointer:
                values.append(ctypes.c_void_p(0 if a is None else a.ctypes.data))
            else:
                values.append(_CTYPE_OF[p.dtype.type](a))
        argv = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        message = ctypes.create_string_buffer(512)
        with self._lock:
            rc = getattr(self._lib, f"mrh_entry_{name}")(dims, ctypes.c_longlong(int(shared_mem)),
                                                        SCHEDULES[self.schedule], int(bool(self.reverse_blocks)),
                                                        argv, message, 512)
        if rc != 0:
            raise RuntimeError(f"kernel {name} (host build): {message.value.decode()}")


def grid_blocks(runner, wanted, most):
    """Blocks of a grid-stride launch: what the caller wants, at most ``most`` and the
    runner's ``max_blocks`` (at least 1)."""
    cap = most if runner.max_blocks is None else min(most, runner.max_blocks)
    return max(1, min(int(wanted), int(cap)))
