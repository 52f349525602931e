"""Per-kernel GPU times of the deep-reuse CUDA path on CifarNet's conv2 (GPU only).

    PYTHONPATH=. python scripts/kernel_times.py [--data DIR] [--json FILE] [--repeats 20]

conv2: batch 128, 16x16x64 input (the real output of conv1 + ReLU + pool + LRN
of a randomly initialised CifarNet on CIFAR-10 images, or the bench's random
fixture when the data is missing; the report says which), 5x5 kernel, 64
outputs, 'same' padding. For each reuse setting it reports:
  - every device operation of one forward + backward (kernels, cuBLAS GEMMs,
    memsets, copies) timed with a CUDA event pair each, medians over repeats;
  - the whole forward and backward timed with one event pair each (no per-op
    events), eagerly and replayed as a captured CUDA graph;
  - the operation count;
and, in the same run, the exact layer (im2col + cuBLAS) and, when PyTorch
imports, cuDNN forward + backward of the same layer in float32 (TF32 off).
The tests run the same pipeline on the kernels' host build (``main(argv,
cuda.HostDevice())``: perf_counter times, no graph, no cuDNN), so it cannot
break unseen between GPU runs.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minireuse import backend  # noqa: E402
from minireuse.tools import bench  # noqa: E402
from minireuse.timing import Clock, timed  # noqa: E402
from minireuse.reuse import ReuseConfig, ReuseState, cuda  # noqa: E402

SETTINGS = [
    ("pixel L=64 H=32 offset dx=cluster (the default)", dict(L=64, H=32, dx_mode="cluster")),
    ("pixel L=64 H=20 offset dx=cluster", dict(L=64, H=20, dx_mode="cluster")),
    ("pixel L=16 H=12 offset dx=cluster", dict(L=16, H=12, dx_mode="cluster")),
    ("pixel L=64 H=20 offset dx=exact", dict(L=64, H=20, dx_mode="exact")),
    ("general L=16 H=12 offset dx=cluster", dict(L=16, H=12, dx_mode="cluster", pixel_aligned=False)),
]


class TimedDevice:
    """A device layer (CupyDevice; HostDevice in the tests) with a timer around every operation:
    a CUDA event pair each on the GPU, perf_counter on the host."""

    def __init__(self, inner):
        self.inner = inner
        self._restart()

    def __getattr__(self, name):           # everything not timed is the inner layer's own
        return getattr(self.inner, name)

    def _restart(self):
        self.clock = Clock(gpu=self.inner.kind == "gpu")
        self.labels = []

    def _timed(self, label, fn):
        self.labels.append(label)
        self.clock.time(fn)

    def launch(self, name, grid, block, args, shared_mem=0):
        self._timed(name, lambda: self.inner.launch(name, grid, block, args, shared_mem))

    def memset(self, a, byte):
        self._timed("memset", lambda: self.inner.memset(a, byte))

    def copy(self, dst, src):
        self._timed("memcpy D2D", lambda: self.inner.copy(dst, src))

    def gemm_strided_batched(self, *args):
        m, n, k, batch = args[2], args[3], args[4], args[-1]
        self._timed(f"cuBLAS {batch}x({n}x{k} @ {k}x{m})", lambda: self.inner.gemm_strided_batched(*args))

    def collect(self):
        """[(label, ms)] of the logged operations (waits for them), then clears the log."""
        out = list(zip(self.labels, self.clock.times()))
        self._restart()
        return out


def median_ms(fn, repeats):
    return float(np.median([timed(fn)[0] for _ in range(repeats)]))


def reuse_step(x, W, b, dy, pads, config, state):
    y, cache = cuda.cuda_reuse_conv_forward(x, W, b, 1, pads, config, state)
    return cuda.cuda_reuse_conv_backward(dy, cache)


def time_setting(x, W, b, dy, pads, fields, repeats, layer):
    """The times of one reuse setting on the device layer ``layer`` (its CUDA graph on the GPU only)."""
    config = ReuseConfig(seed=0, **fields)
    state = ReuseState()
    for _ in range(4):                           # compile, then let the capacity settle
        reuse_step(x, W, b, dy, pads, config, state)
        backend.synchronize()
    with cuda.using_device(TimedDevice(layer)) as ops_timer:
        per_op = []
        for _ in range(repeats):
            y, cache = cuda.cuda_reuse_conv_forward(x, W, b, 1, pads, config, state)
            fwd_ops = ops_timer.collect()
            cuda.cuda_reuse_conv_backward(dy, cache)
            per_op.append([("fwd " + k, v) for k, v in fwd_ops] +
                          [("bwd " + k, v) for k, v in ops_timer.collect()])
    ops = [(label, float(np.median([run[i][1] for run in per_op]))) for i, (label, _) in enumerate(per_op[0])]
    fwd, bwd = [], []
    for _ in range(repeats):
        t, (y, cache) = timed(lambda: cuda.cuda_reuse_conv_forward(x, W, b, 1, pads, config, state))
        fwd.append(t)
        bwd.append(timed(lambda: cuda.cuda_reuse_conv_backward(dy, cache))[0])
    graph_ms = time_graph(x, W, b, dy, pads, config, state, repeats) if layer.kind == "gpu" else None
    last = state.last
    return dict(config=config.as_dict(), ops=ops, op_count=len(ops), fwd_ms=float(np.median(fwd)),
                bwd_ms=float(np.median(bwd)), graph_fwd_bwd_ms=graph_ms,
                r_c=float(backend.asnumpy(last["r_c"])), capacity=int(last["capacity"]),
                overflow=int(backend.asnumpy(last["overflow"])))


def time_graph(x, W, b, dy, pads, config, state, repeats):
    """ms of one forward + backward recorded as a CUDA graph and replayed (median)."""
    cp = backend.require_gpu()
    # everything the capture allocates comes from a pool of its own, kept while the graph
    # replays (as training/graphs.py does): later eager work cannot reuse the addresses it writes
    pool = cp.cuda.MemoryPool()
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Stream.null.synchronize()
    with stream:
        with cp.cuda.using_allocator(pool.malloc):
            stream.begin_capture()
            try:
                reuse_step(x, W, b, dy, pads, config, state)
            finally:
                graph = stream.end_capture()
        return median_ms(lambda: (graph.launch(stream), stream.synchronize()), repeats)


def time_exact(layer, x, dy, repeats):
    layer.set_reuse(None)
    for _ in range(2):
        layer.forward(x, train=True)
        layer.backward(dy)
    fwd, bwd = [], []
    for _ in range(repeats):
        fwd.append(timed(lambda: layer.forward(x, train=True))[0])
        bwd.append(timed(lambda: layer.backward(dy))[0])
    return dict(fwd_ms=float(np.median(fwd)), bwd_ms=float(np.median(bwd)))


def time_cudnn(x, W, b, dy, repeats):
    """cuDNN fp32 forward and backward of the same conv through PyTorch, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    xt = torch.from_dlpack(x).permute(0, 3, 1, 2).detach().requires_grad_(True)   # NHWC memory: channels_last
    wt = torch.from_dlpack(W).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    wt.requires_grad_(True)
    bt = torch.from_dlpack(b).detach().requires_grad_(True)
    dyt = torch.from_dlpack(dy).permute(0, 3, 1, 2)
    pad = W.shape[0] // 2

    def fwd():
        return torch.nn.functional.conv2d(xt, wt, bt, padding=pad)

    def tms(fn):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e), out

    def clear_grads():             # .grad accumulates across backward calls otherwise
        xt.grad = wt.grad = bt.grad = None

    for _ in range(3):
        fwd().backward(dyt)
        clear_grads()
    f, bw = [], []
    for _ in range(repeats):
        clear_grads()
        t, y = tms(fwd)
        f.append(t)
        bw.append(tms(lambda: y.backward(dyt))[0])
    return dict(fwd_ms=float(np.median(f)), bwd_ms=float(np.median(bw)), torch=torch.__version__,
                note="cuDNN float32, TF32 off, channels_last, cudnn.benchmark on")


def markdown(report):
    lines = [f"## conv2 kernels ({report['device']}, commit {report['commit']})", "",
             f"inputs: {report['data']}; medians of {report['repeats']}", ""]
    ex = report["exact"]
    lines.append(f"- exact im2col + cuBLAS (CuPy): fwd {ex['fwd_ms']:.3f} ms, bwd {ex['bwd_ms']:.3f} ms, "
                 f"total {ex['fwd_ms'] + ex['bwd_ms']:.3f} ms")
    cd = report["cudnn"]
    if cd:
        lines.append(f"- cuDNN (PyTorch {cd['torch']}, {cd['note']}): fwd {cd['fwd_ms']:.3f} ms, "
                     f"bwd {cd['bwd_ms']:.3f} ms, total {cd['fwd_ms'] + cd['bwd_ms']:.3f} ms")
    else:
        lines.append("- cuDNN: not measured (PyTorch not importable)")
    for label, s in report["settings"].items():
        total = s["fwd_ms"] + s["bwd_ms"]
        lines += ["", f"### {label}", "",
                  f"r_c {s['r_c']:.4f}, capacity {s['capacity']}, overflow {s['overflow']}, "
                  f"{s['op_count']} device operations (+ CuPy's own transposes/matmul)", "",
                  f"fwd {s['fwd_ms']:.3f} ms, bwd {s['bwd_ms']:.3f} ms, total {total:.3f} ms eager; "
                  + (f"{s['graph_fwd_bwd_ms']:.3f} ms as a CUDA graph; " if s["graph_fwd_bwd_ms"] else "")
                  + f"x{(ex['fwd_ms'] + ex['bwd_ms']) / total:.2f} vs exact"
                  + (f", x{(cd['fwd_ms'] + cd['bwd_ms']) / total:.2f} vs cuDNN (eager), "
                     f"x{(cd['fwd_ms'] + cd['bwd_ms']) / s['graph_fwd_bwd_ms']:.2f} (graph)" if cd else ""),
                  "", "| operation | ms |", "|---|---|"]
        lines += [f"| {label_} | {ms:.4f} |" for label_, ms in s["ops"]]
    return "\n".join(lines) + "\n"


def main(argv=None, layer=None):
    """The script; ``layer``: the device layer to time (default: the GPU's; the tests pass
    cuda.HostDevice() to run the whole pipeline on the kernels' host build)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    parser.add_argument("--markdown", default=None, help="write the report as Markdown here")
    args = parser.parse_args(argv)
    if layer is None:
        backend.set_device("gpu")
        layer = cuda.CupyDevice()
    with cuda.using_device(layer):
        report = measure(args, layer)
    text = markdown(report)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


def measure(args, layer):
    t0 = time.time()
    images, source = bench.load_images(args.data, args.batch, args.seed)
    conv2, x = bench.layer_inputs(images, ["conv2"], args.seed)["conv2"]
    x = backend.xp().ascontiguousarray(x, dtype=np.float32)
    W, b = conv2.params["W"], conv2.params["b"]
    pads, (oh, ow) = conv2.pads(x.shape[1], x.shape[2])
    dy = backend.to_device(np.random.default_rng(args.seed).standard_normal((x.shape[0], oh, ow, W.shape[3])),
                           np.float32)
    gpu = layer.kind == "gpu"
    report = dict(device=backend.describe_device(), commit=bench.git_commit() or "unknown", data=source,
                  layer=dict(x=list(x.shape), W=list(W.shape), pads=list(pads)), repeats=args.repeats,
                  exact=time_exact(conv2, x, dy, args.repeats),
                  cudnn=time_cudnn(x, W, b, dy, args.repeats) if gpu else None, settings={})
    for label, fields in SETTINGS:
        report["settings"][label] = time_setting(x, W, b, dy, pads, fields, args.repeats, layer)
    report["seconds"] = time.time() - t0
    return report


if __name__ == "__main__":
    sys.exit(main())
