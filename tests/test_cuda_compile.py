"""The CUDA sources compile for the GPUs we target, without register spills.

Runs on machines without a GPU: nvcc alone (skipped when it is missing). Also
checks, without any CUDA, that the cuda package imports, names only kernels that exist
and validates launch arguments against the kernels' signatures.
"""
import glob
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from minireuse.kernels import runtime
from minireuse.reuse import cuda

ARCHS = ("sm_80", "sm_90")

# (kernel, arch) -> why its spills are accepted. Empty: no kernel spills today.
ACCEPTED_SPILLS = {}


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for path in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if os.path.exists(path):
            return path
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)")


def compile_cubin(source, arch, out_dir, werror=False):
    """(return code, ptxas/nvcc messages) of compiling one .cu file to a cubin with -Xptxas -v."""
    out = os.path.join(str(out_dir), os.path.basename(source) + f".{arch}.cubin")
    cmd = [NVCC, "-cubin", f"-arch={arch}", "--std=c++17", "-I", cuda.KERNEL_DIR, "-Xptxas", "-v",
           "-o", out, source]
    if werror:
        cmd[1:1] = ["-Werror", "all-warnings"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def per_kernel(messages, heading, value):
    """{kernel: the ints of the last line matching ``value`` below the kernel's ``heading``} of ptxas -v."""
    found, current = {}, None
    for line in messages.splitlines():
        m = re.search(heading, line)
        if m:
            current = m.group(1)
        m = re.search(value, line)
        if m and current is not None:
            found[current] = tuple(int(v) for v in m.groups())
    return found


def spills(messages):
    """{kernel: (spill store bytes, spill load bytes)} from ptxas -v output."""
    return per_kernel(messages, r"Function properties for (\w+)", r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def registers(messages):
    """{kernel: registers per thread} from ptxas -v output."""
    used = per_kernel(messages, r"Compiling entry function '(\w+)'", r"Used (\d+) registers")
    return {kernel: n for kernel, (n,) in used.items()}


def test_kernel_sources_are_listed():
    names = [os.path.basename(p) for p in cuda.kernel_sources()]
    assert names and all(n.endswith(".cu") for n in names)
    assert os.path.exists(cuda.kernel_header())


def test_every_launched_kernel_is_defined():
    text = ""
    for path in glob.glob(os.path.join(os.path.dirname(cuda.__file__), "*.py")):
        with open(path) as f:
            text += f.read()
    launched = set(re.findall(r'\blaunch\("(\w+)"', text))
    launched |= {f"hash_rows_h{hb}" for hb in (8, 16, 32, 64)}
    defined = set(cuda.kernel_signatures())
    assert launched <= defined, f"launched but not defined: {sorted(launched - defined)}"
    assert defined <= launched, f"defined but never launched: {sorted(defined - launched)}"


def test_signatures_use_known_types():
    """Every parameter parses to a pointee/scalar dtype (runtime.Param raises otherwise);
    the kernels with fixed-size shared arrays declare the block size they hold."""
    sigs = cuda.kernel_signatures()
    for name, sig in sigs.items():
        for p in sig.params:
            assert p.dtype.kind in "iuf", f"{name}({p.name}): {p.ctype}"
    assert sigs["input_rms"].max_threads == 256 and sigs["centroid_sums"].max_threads == 256
    assert all(sigs[f"hash_rows_h{hb}"].max_threads == 128 for hb in (8, 16, 32, 64))


def test_launch_bounds_are_checked():
    with pytest.raises(ValueError, match=r"input_rms: block \(512,\) has 512 threads, more than its "
                                         r"__launch_bounds__\(256\)"):
        cuda.check_launch_args("input_rms", (None, np.int64(3), None, None, None), block=(512,))


def test_unknown_parameter_types_are_refused():
    with pytest.raises(ValueError, match="type 'short' is not one of"):
        runtime.parse_signatures('extern "C" __global__ void k(short* x) {}')


def test_launch_args_checked_by_count_and_type():
    with pytest.raises(TypeError, match="input_rms: expected 5 arguments"):
        cuda.check_launch_args("input_rms", (None,))
    with pytest.raises(TypeError, match="argument n expected a numpy int64"):
        cuda.check_launch_args("input_rms", (None, np.int32(3), None, None, None))
    with pytest.raises(TypeError, match="argument x expected a device array of float32"):
        cuda.check_launch_args("input_rms", (np.zeros(3, np.float32), np.int64(3), None, None, None))
    with pytest.raises(ValueError, match="not defined"):
        cuda.check_launch_args("no_such_kernel", ())
    cuda.check_launch_args("input_rms", (None, np.int64(3), None, None, None))


def test_capacity_rounding_and_table_size():
    assert cuda.round_capacity(1, 10 ** 6) == 32
    assert cuda.round_capacity(1000, 10 ** 6) == 1024
    assert cuda.round_capacity(1025, 10 ** 6) == 1280
    assert cuda.round_capacity(5000, 300) == 300
    for cap in (1, 31, 32, 100, 4096, 5000):
        t = cuda.table_size(cap)
        assert t >= 2 * cap and t & (t - 1) == 0
    stats = np.zeros(cuda.STAT_COUNT, np.int32)
    stats[cuda.STAT_MAX_DISTINCT] = 900
    assert cuda.CapacityTracker.next_capacity(stats, 1024, 10 ** 6) == 1280   # within the 1.25 margin: grow
    stats[cuda.STAT_MAX_DISTINCT] = 520
    assert cuda.CapacityTracker.next_capacity(stats, 1024, 10 ** 6) == 1024   # fits, under 2x: keep
    stats[cuda.STAT_MAX_DISTINCT] = 480
    assert cuda.CapacityTracker.next_capacity(stats, 1024, 10 ** 6) == 640    # 2x too large: shrink
    stats[cuda.STAT_MAX_DISTINCT] = 100
    assert cuda.CapacityTracker.next_capacity(stats, 1024, 10 ** 6) == 128
    stats[cuda.STAT_TABLE_FULL] = 1
    assert cuda.CapacityTracker.next_capacity(stats, 1024, 10 ** 6) == 2560   # table full: at least double


def test_header_constants_match_python():
    with open(cuda.kernel_header()) as f:
        header = f.read()
    defines = {k: int(v) for k, v in re.findall(r"#define (STAT_\w+|REUSE_RUN) (\d+)", header)}
    assert defines["REUSE_RUN"] == cuda.runtime.RUN
    for name in ("STAT_MAX_DISTINCT", "STAT_SUM_DISTINCT", "STAT_OVERFLOW", "STAT_TABLE_FULL", "STAT_COUNT"):
        assert defines[name] == getattr(cuda, name), name


def test_capture_key_lists_the_training_capacities_of_one_batch_size():
    cs = cuda.CudaState()
    assert cs.capture_key() == ()
    cs.tracker(("rows", 100, 4, 8, 12), 100, 12, batch=100).capacity = 64
    cs.tracker(("pixels", 400, 1, 64, 20), 400, 20, batch=4).capacity = 320
    cs.tracker(("pixels", 300, 1, 64, 20), 300, 20, batch=3).capacity = 256          # the last, smaller batch
    cs.tracker(("pixels", 400, 1, 64, 20), 400, 20, batch=4, train=False).capacity = 96   # evaluation
    assert cs.capture_key(4) == ((("pixels", 400, 1, 64, 20, "train"), 320),)
    assert cs.capture_key(3) == ((("pixels", 300, 1, 64, 20, "train"), 256),)
    assert len(cs.capture_key()) == 3


def test_hash_bits_bucket():
    assert [cuda.hash_bits_bucket(h) for h in (1, 8, 9, 16, 17, 32, 33, 64)] == [8, 8, 16, 16, 32, 32, 64, 64]
    with pytest.raises(ValueError, match="H: expected 1..64"):
        cuda.hash_bits_bucket(65)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", cuda.kernel_sources(), ids=os.path.basename)
def test_kernel_compiles_without_spills(source, arch, tmp_path):
    rc, messages = compile_cubin(source, arch, tmp_path)
    assert rc == 0, f"nvcc failed on {source} for {arch}:\n{messages}"
    found = spills(messages)
    assert found, f"no ptxas -v report for {source}:\n{messages}"
    bad = {k: v for k, v in found.items() if any(v) and (k, arch) not in ACCEPTED_SPILLS}
    assert not bad, f"register spills (store, load bytes) for {arch}: {bad}; fix them or list them in " \
                    f"ACCEPTED_SPILLS with a reason"


@needs_nvcc
def test_hashing_64_bits_takes_no_more_registers_than_32(tmp_path):
    """hash_rows_h64 hashes in two 32-bit passes: 64 accumulators at once took 166 registers
    per thread at sm_90 (19 % occupancy; h32 80, h16 55)."""
    rc, messages = compile_cubin(os.path.join(cuda.KERNEL_DIR, "hash.cu"), "sm_90", tmp_path)
    assert rc == 0, messages
    used = registers(messages)
    assert used["hash_rows_h64"] <= used["hash_rows_h32"] <= 96, used


@needs_nvcc
@pytest.mark.parametrize("source", cuda.kernel_sources(), ids=os.path.basename)
def test_kernel_compiles_with_warnings_as_errors(source, tmp_path):
    rc, messages = compile_cubin(source, "sm_90", tmp_path, werror=True)
    assert rc == 0, f"warnings in {source}:\n{messages}"


@needs_nvcc
def test_module_source_compiles_as_one_unit(tmp_path):
    """What NVRTC gets at run time: every source in one unit, the header pasted in."""
    path = tmp_path / "module.cu"
    path.write_text(cuda.module_source())
    rc, messages = compile_cubin(str(path), "sm_90", tmp_path, werror=True)
    assert rc == 0, messages
    assert set(spills(messages)) == set(cuda.kernel_signatures())
