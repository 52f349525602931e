"""Whole training-step benchmark: ms per CifarNet step, minireuse against PyTorch, in one run.

    python -m minireuse bench step [--model cifarnet] [--data DIR] [--batch 128] [--steps N] [--warmup N]
        [--device auto|cpu|gpu] [--reuse-config FILE] [--graph auto|on|off] [--torch auto|off]
        [--threads N] [--batches K] [--seed S] [--weights FILE] [--json FILE] [--quiet]

A step is what training runs per batch (Trainer.run_step): dropout seeds, learning
rate, forward, loss, backward, optimizer update and the loss/accuracy sums; the
batches are device-resident, augmented CIFAR-10 batches (real images when --data
loads, else a fixed random fixture, and the report says which), cycled. Rows:

    minireuse exact            eager
    minireuse exact + graph    the step replayed as a CUDA graph (GPU only)
    minireuse default reuse    `make cifar`'s setting while it reuses (the first stage of
                               the adaptive default: conv2 L64 H32, backward only)
    minireuse fast reuse       the fastest settings measured (reuse in the forward too:
                               DEFAULT_FIXED, offset L64 H32; and pca L64 H16)
    minireuse reuse ... + graph   each reuse row recorded as a CUDA graph (GPU only;
                               reported as not capturable when its implementation is not)
    pytorch eager              the same network in PyTorch (cuDNN on the GPU, the
                               --threads CPU threads on the CPU) when ``import torch`` works;
                               PyTorch is optional (pip install -e '.[compare]'):
                               without it the row says it was skipped and why
    data pipeline              BatchIterator's gather + crop/flip + normalise, per batch

With --reuse-config FILE, one reuse row with that setting replaces the default and
fast rows (a layer's ladder times its first setting; the file's "options", the rules
that start or end reuse across epochs, have no epochs to act on in a step and are
ignored, so a training run's settings file can be timed as it is). Each time is the
median of --steps steps after --warmup steps (CUDA events on the GPU, perf_counter on
the CPU), also given as seconds per 50,000-image epoch and as ratios against PyTorch
and against minireuse exact eager, all from the same run. On the CPU the rows take
turns of 5 steps each, so that a machine whose speed drifts (a shared or virtual one)
slows every row alike and the ratios stay fair; minireuse (its fast path and BLAS)
and PyTorch use the same --threads threads.

--weights FILE starts every row, PyTorch's included, from a trained CifarNet (a run's
model.npz or checkpoint.npz) instead of the initialisation of --seed. A step's time
depends on where training is: behind ReLU, LRN and pooling a conv's dY is about half
zeros at initialisation and 95 % zeros after a few epochs, which the CPU fast path's
backward skips (cpu/conv.py, sparse_backward).
"""
import importlib.util
import json
import math
import sys
import tempfile
import time

import numpy as np

from .. import backend, cpu
from ..checks import check_range
from .bench import git_commit
from ..data.sample import sample_images
from ..tables import align_rows
from ..timing import Clock

EPOCH_IMAGES = 50_000
# the fastest setting of the parity runs (docs/adaptive.md: conv2 2.12x over a run)
PCA_FAST = {"conv2": dict(L=64, H=16, dx_mode="cluster", family="pca")}
# how to get the PyTorch row: the optional extra of setup.cfg, or torch itself
TORCH_INSTALL_HINT = "pip install -e '.[compare]' (or pip install torch)"


def add_arguments(parser):
    parser.add_argument("--model", default="cifarnet", choices=["cifarnet"])
    parser.add_argument("--data", default="data", help="directory with CIFAR-10 (a random fixture when missing)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per row (default 30 on the GPU, 5 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 5 on the GPU, 1 on the CPU; at least 2 with graphs)")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled through (default 4)")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--reuse-config", metavar="FILE", default=None,
                        help="JSON reuse settings for the reuse rows (default: adaptive.DEFAULT_FIXED)")
    parser.add_argument("--graph", choices=["auto", "on", "off"], default="auto",
                        help="graph rows: auto = on the GPU only; on = required; off = none")
    parser.add_argument("--torch", choices=["auto", "off"], default="auto",
                        help="time PyTorch too when it imports (default auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for minireuse (its fast path and BLAS) and for PyTorch "
                             "(default: every core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", metavar="FILE", default=None,
                        help="start every row from these CifarNet weights (a run's model.npz or checkpoint.npz) "
                             "instead of the initialisation of --seed")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


# ---------------------------------------------------------------- inputs

def device_batches(x, y, batch, count, seed):
    """``count`` augmented, normalised batches on the device, and the iterator that made them."""
    from ..data import CIFAR10_MEAN, CIFAR10_STD, BatchIterator
    it = BatchIterator(x, y, batch, shuffle=True, rng=np.random.default_rng(seed), augment=True,
                       drop_last=True, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    batches = []
    for xb, yb in it:
        batches.append((xb, yb))
        if len(batches) == count:
            break
    return batches, it


# ---------------------------------------------------------------- timing

def summary(times):
    t = np.asarray(times, dtype=np.float64)
    return dict(ms=float(np.median(t)), ms_p10=float(np.percentile(t, 10)), ms_p90=float(np.percentile(t, 90)),
                steps=len(t))


class MinireuseRow:
    """A minireuse row: a Trainer whose run_step (Trainer.run_step) is timed, step by step."""

    def __init__(self, batches, cfg, gpu, weights=None):
        from ..training.checkpoint import load_weights
        from ..training.trainer import Trainer
        self.t = Trainer(cfg, data=(None, None, None, None), quiet=True)
        self.t.begin_run()
        if weights is not None:
            load_weights(self.t.model, weights)
        self.batches, self.gpu = batches, gpu
        self.per_epoch = math.ceil(EPOCH_IMAGES / len(batches[0][1]))
        self.clock = Clock(gpu, self.t.step.graphs.stream if self.t.step.graphs is not None else None)

    def step(self, i, timed):
        xb, yb = self.batches[i % len(self.batches)]
        # steps numbered from 1: step 0 of an epoch is the one timed per layer
        args = (xb, yb, 0, 1 + i % (self.per_epoch - 1), self.per_epoch)
        with self.t.step.stream():
            if timed:
                self.clock.time(self.t.run_step, *args)
            else:
                self.t.run_step(*args)

    def result(self):
        """Median ms per step, and what ran (implementation, graph replays)."""
        times = self.clock.times()
        t = self.t
        t.timer.collect()
        impl = "cupy + fused kernels" if self.gpu else cpu.describe()
        reuse_impls = sorted({l.reuse_state.last["impl"] for l in t.model.reuse_layers()
                              if l.reuse is not None and l.reuse_state is not None and l.reuse_state.last})
        if reuse_impls:
            impl += ", reuse " + "/".join(reuse_impls)
        graphs = t.step.graphs
        out = dict(summary(times), implementation=impl,
                   graph_replays=graphs.replays if graphs is not None else 0,
                   graph_recordings=graphs.recordings if graphs is not None else 0)
        if graphs is not None and graphs.replays == 0:
            from ..training.graphs import uncapturable_layers
            blockers = uncapturable_layers(t.model) or list(graphs.failed.values())
            out["note"] = "not capturable: " + ("; ".join(blockers) or "no replay happened")
        return out


# on the CPU, the rows take turns of this many steps each
STEPS_PER_TURN = 5


def time_rows(rows, steps, warmup, per_turn=None):
    """Run warmup + steps steps of every row, timing the last ``steps``.

    per_turn (the CPU): after its warm-up, each row runs ``per_turn`` timed steps, then
    the next row, and round again, so that a machine whose speed drifts over minutes (a
    shared or virtual one) slows every row alike and the ratios stay paired, while each
    row still runs several steps in a row, as training does (caches and thread pools
    warm). None (the GPU, timed by CUDA events): each row's steps one after another.
    """
    per_turn = per_turn or steps
    for row in rows:
        for i in range(warmup):
            row.step(i, timed=False)
    for first in range(warmup, warmup + steps, per_turn):
        for row in rows:
            for i in range(first, min(first + per_turn, warmup + steps)):
                row.step(i, timed=True)


def time_data_pipeline(iterator, steps, warmup, gpu):
    """Median ms per batch of BatchIterator (gather, crop/flip, normalise) on the device."""
    clock = Clock(gpu)
    batches = iterator.epoch()

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:          # the few batches ran out: a new epoch
            batches = iterator.epoch()
            return next(batches)

    for i in range(warmup + steps):
        if i < warmup:
            next_batch()
        else:
            clock.time(next_batch)
    return dict(summary(clock.times()), implementation="BatchIterator (cupy)" if gpu else "BatchIterator (numpy)")


# ---------------------------------------------------------------- PyTorch

class TorchRow:
    """The PyTorch row: the same network (torch_cifarnet), optimizer and batches, timed step by step."""

    def __init__(self, batches, gpu, threads, weights=None):
        import torch
        if gpu and not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        self.torch, self.gpu = torch, gpu
        dev = torch.device("cuda" if gpu else "cpu")
        if gpu:
            torch.backends.cudnn.benchmark = True
            self.implementation = f"pytorch {torch.__version__} eager, cuDNN {torch.backends.cudnn.version()}, NCHW"
        else:
            torch.set_num_threads(threads or cpu.threads())
            self.implementation = f"pytorch {torch.__version__} eager, {torch.get_num_threads()} CPU threads, NCHW"
        from .pytorch_run import copy_weights, torch_cifarnet
        torch.manual_seed(0)
        self.model, groups = torch_cifarnet(torch)
        if weights is not None:
            copy_weights(torch, trained_cifarnet(weights), self.model)
        self.model.to(dev)
        self.opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True)
        self.data = [(torch.from_numpy(backend.asnumpy(xb)).permute(0, 3, 1, 2).contiguous().to(dev),
                      torch.from_numpy(backend.asnumpy(yb)).to(dev)) for xb, yb in batches]
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.correct = torch.zeros((), dtype=torch.int64, device=dev)
        self.marks = []

    def _step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        out = self.model(x)
        loss = self.torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        self.opt.step()
        self.loss_sum += loss.detach() * len(y)      # the same sums as minireuse's step, no host read
        self.correct += (out.argmax(1) == y).sum()

    def step(self, i, timed):
        x, y = self.data[i % len(self.data)]
        if self.gpu:
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            self._step(x, y)
            end.record()
            mark = (start, end)
        else:
            t0 = time.perf_counter()
            self._step(x, y)
            mark = 1e3 * (time.perf_counter() - t0)
        if timed:
            self.marks.append(mark)

    def result(self):
        times = self.marks
        if self.gpu:
            self.torch.cuda.synchronize()
            times = [a.elapsed_time(b) for a, b in self.marks]
        return dict(summary(times), implementation=self.implementation)


def skipped_row(name, reason):
    """A row that was not timed: ``ms`` None, ``skipped`` True and the reason."""
    return dict(name=name, ms=None, skipped=True, reason=reason, note=f"skipped: {reason}")


def trained_cifarnet(path):
    """minireuse's CifarNet with the weights of a model.npz or checkpoint.npz."""
    from ..models.cifarnet import cifarnet
    from ..training.checkpoint import load_weights
    model = cifarnet()
    load_weights(model, path)
    return model


def pytorch_row(batches, gpu, threads, weights=None):
    """(TorchRow, None) when torch imports (and sees the device), else (None, the skipped row)."""
    name = "pytorch eager"
    if importlib.util.find_spec("torch") is None:
        return None, skipped_row(name, f"PyTorch is not installed; for this row: {TORCH_INSTALL_HINT}")
    try:
        return TorchRow(batches, gpu, threads, weights), None
    except ImportError as e:
        return None, skipped_row(name, f"torch is installed but does not import ({e}); "
                                       f"reinstall it: {TORCH_INSTALL_HINT}")
    except RuntimeError as e:
        return None, skipped_row(name, str(e))


# ---------------------------------------------------------------- the report

def reuse_label(layers):
    """'conv2 L64 H32' from {layer: setting or [settings]} (a fixed strategy uses the first);
    the family when it is not the default, and 'backward only' for an exact forward."""
    first = {name: (s[0] if isinstance(s, list) else s) for name, s in layers.items()}
    return ", ".join(f"{name}" + (f" {s['family']}" if s.get("family", "offset") != "offset" else "")
                     + f" L{s.get('L', 16)} H{s.get('H', 12)}"
                     + (", backward only" if s.get("forward") == "exact" else "") for name, s in first.items())


def reuse_rows(reuse_config):
    """[(row name, layers)]: the file's setting, or the default and the fast settings. No row
    takes strategy options: they act across epochs, and a row times single steps."""
    from ..training.adaptive import DEFAULT_FIXED, DEFAULT_LADDERS, load_settings
    if reuse_config:
        layers, _ = load_settings(reuse_config)
        return [(f"minireuse reuse ({reuse_label(layers)})", layers)]
    default = {name: ladder[0] for name, ladder in DEFAULT_LADDERS.items()}
    return [(f"minireuse default reuse ({reuse_label(default)})", default),
            (f"minireuse fast reuse ({reuse_label(DEFAULT_FIXED)})", DEFAULT_FIXED),
            (f"minireuse fast reuse ({reuse_label(PCA_FAST)})", PCA_FAST)]


def format_table(report):
    rows = report["rows"]
    exact = next((r for r in rows if r["name"] == "minireuse exact"), None)
    # a skipped PyTorch row (ms None) gives no 'vs pytorch' ratios
    torch_row = next((r for r in rows if r["name"].startswith("pytorch") and r.get("ms") is not None), None)
    head = ["step", "implementation", "ms/step", "p10-p90", "s/epoch", "vs pytorch", "vs exact"]
    body = []
    for r in rows:
        if r.get("ms") is None:     # not timed: a skipped row's reason is printed under the table
            body.append([r["name"], "skipped (see below)" if r.get("skipped") else r.get("note", ""),
                         "-", "-", "-", "-", "-"])
            continue
        is_data = r["name"] == "data pipeline"
        body.append([r["name"], r["implementation"] + (f" [{r['note']}]" if r.get("note") else ""),
                     f"{r['ms']:.2f}", f"{r['ms_p10']:.2f}-{r['ms_p90']:.2f}", f"{r['epoch_s']:.1f}",
                     "-" if is_data or torch_row is None else f"{torch_row['ms'] / r['ms']:.2f}x",
                     "-" if is_data or exact is None else f"{exact['ms'] / r['ms']:.2f}x"])
    lines = align_rows([head] + body, right_from=2)
    lines += [f"{r['name']}: skipped: {r['reason']}" for r in rows if r.get("skipped")]
    notes = [f"device: {report['device']}   commit: {report['commit']}",
             f"data: {report['data']}",
             f"weights: {report.get('weights') or 'the initialisation of the seed'}",
             f"batch {report['batch']}, median of {report['steps']} steps after {report['warmup']} warm-up steps; "
             f"s/epoch = ms/step x {report['steps_per_epoch']} steps of {EPOCH_IMAGES:,} images; "
             "'vs' columns: how many times faster than that row (>1 = faster)"]
    return "\n".join(notes + [""] + lines)


def run_step_bench(args):
    """Time every row; returns the report dict."""
    device = backend.set_device(args.device)
    gpu = device == "gpu"
    if args.graph == "on" and not gpu:
        raise backend.DeviceError("--graph on times CUDA graphs, which need a GPU; this run is on the CPU "
                                  "(use --graph auto or off)")
    for name in ("batch", "batches"):
        check_range(f"--{name}", getattr(args, name), 1, integer=True)
    steps = args.steps if args.steps is not None else (30 if gpu else 5)
    graph_rows = gpu and args.graph != "off"
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if graph_rows:
        warmup = max(warmup, 2)      # one eager warm-up step, then the recording
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    if args.threads is not None:
        cpu.set_threads(args.threads)
    if args.weights is not None:        # read before any timing: a wrong file stops here
        trained_cifarnet(args.weights)
    reuse_plans = reuse_rows(args.reuse_config)

    def say(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    x, y, source = sample_images(args.data, args.batch * args.batches, args.seed)
    if len(x) < args.batch * args.batches:
        raise ValueError(f"{len(x)} images are fewer than --batch x --batches = {args.batch * args.batches}")
    batches, iterator = device_batches(x, y, args.batch, args.batches, args.seed)
    # graph rows run in 'auto' mode: a step that cannot be recorded runs eagerly and
    # its row says so, instead of stopping the whole benchmark
    # the trainers of the rows write nothing, but a Trainer checks its output directory: a
    # scratch one, so the bench never touches (or waits for) a real run's directory
    base = dict(device=device, seed=args.seed, graph="off", out=tempfile.mkdtemp(prefix="minireuse-bench-"))
    plans = [("minireuse exact", dict(base)), ("minireuse exact + graph", dict(base, graph="auto"))]
    for name, layers in reuse_plans:
        reuse = dict(base, reuse="fixed", reuse_layers=layers)
        plans += [(name, reuse), (f"{name} + graph", dict(reuse, graph="auto"))]
    timers = {name: MinireuseRow(batches, cfg, gpu, args.weights) for name, cfg in plans
              if cfg["graph"] == "off" or graph_rows}
    skipped = None
    if args.torch != "off":
        torch_timer, skipped = pytorch_row(batches, gpu, args.threads, args.weights)
        if torch_timer is not None:
            timers["pytorch eager"] = torch_timer
    say(f"timing {len(timers)} rows, " + (f"{STEPS_PER_TURN} steps of each in turn ..." if not gpu
                                          else "one after another ..."))
    time_rows(list(timers.values()), steps, warmup, per_turn=None if gpu else STEPS_PER_TURN)
    rows = [dict(name=name, **timer.result()) for name, timer in timers.items()]
    if skipped is not None:
        rows.append(skipped)
    say("timing the data pipeline ...")
    rows.append(dict(name="data pipeline", **time_data_pipeline(iterator, steps, warmup, gpu)))
    per_epoch = math.ceil(EPOCH_IMAGES / args.batch)
    for r in rows:
        if r.get("ms") is not None:
            r["epoch_s"] = r["ms"] * per_epoch / 1e3
    skipped = {r["name"]: r["reason"] for r in rows if r.get("skipped")}
    return dict(device=backend.describe_device(), commit=git_commit(), data=source, weights=args.weights,
                batch=args.batch,
                steps=steps, warmup=warmup, steps_per_epoch=per_epoch, rows=rows, skipped=skipped)


def run(args):
    report = run_step_bench(args)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0
