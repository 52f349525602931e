"""Command line: python -m minireuse {train,compare,parity,evaluate,plot,summary,bench {layers,step}} ...

Errors the user can fix (missing data, bad settings, a bad checkpoint) print one
line starting with 'error:' and exit with status 2; Ctrl-C during training saves
a checkpoint and exits with status 130.
"""
import argparse
import os
import re
import sys

from . import __version__
from .checks import describe_range, in_range


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows every default once (arguments without a help text get one that does);
    not for switches (their default is the opposite of what they say), required arguments or
    None, nor where the help text already names the default."""

    def add_argument(self, action):
        if not action.help and action.option_strings and action.default not in (None, argparse.SUPPRESS) \
                and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            action.help = "default: %(default)s"
        super().add_argument(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs == 0 or action.required or action.default is None or re.search(r"(^|[(;,] ?)default\b", text):
            return text
        return super()._get_help_string(action)


def number(low=None, high=None, open_low=False, open_high=False, kind=float):
    """An argparse type: a finite number (an integer where kind is int) in a range (low/high
    None: unbounded), checked and described as everywhere else (checks.py)."""
    integer = kind is int
    what = describe_range(low, high, open_low, open_high, integer)

    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        if not in_range(v, low, high, open_low, open_high, integer):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return parse


positive_int = number(1, kind=int)
positive_float = number(0, open_low=True)


def add_train_arguments(p, resume=True, reuse_default="off", overwrite=True, seed=True):
    """The training flags; compare and parity (reuse_default not 'off') need a reuse strategy,
    parity takes its seeds from --seeds (seed=False)."""
    from .training.config import TrainConfig
    d = TrainConfig.defaults()
    p.add_argument("--model", default=d["model"], choices=["alexnet", "cifarnet", "vgg19"])
    p.add_argument("--data", default=d["data"], help="directory holding cifar-10-batches-py/ or "
                   "cifar-10-python.tar.gz (downloaded there when missing and the network allows)")
    p.add_argument("--epochs", type=positive_int, default=d["epochs"])
    p.add_argument("--batch-size", type=positive_int, default=d["batch_size"])
    p.add_argument("--lr", type=positive_float, default=d["lr"], help="peak learning rate")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=d["optimizer"])
    p.add_argument("--momentum", type=number(0, 1, open_high=True), default=d["momentum"],
                   help="SGD momentum, in [0, 1)")
    p.add_argument("--no-nesterov", dest="nesterov", action="store_false",
                   help="SGD with plain momentum instead of Nesterov's")
    p.add_argument("--weight-decay", type=number(0), default=d["weight_decay"], help=">= 0")
    p.add_argument("--decay-layers", default=",".join(d["decay_layers"]),
                   help="comma-separated layer names that get weight decay ('all' for every weight; the "
                        "default is CifarNet's: a model without those layers decays every weight)")
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default=d["schedule"])
    p.add_argument("--warmup-epochs", type=number(0), default=d["warmup_epochs"],
                   help="epochs of linear warm-up of the learning rate, >= 0")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="train on the images as they are (no random crops and flips)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default=d["device"])
    # parity refuses --seed with a message (hidden: else argparse would take it for --seeds)
    p.add_argument("--seed", type=number(0, kind=int), default=d["seed"] if seed else None,
                   help=None if seed else argparse.SUPPRESS)
    p.add_argument("--out", default=d["out"], help="output directory (history.json, checkpoint.npz, model.npz)")
    if overwrite:
        p.add_argument("--overwrite", action="store_true",
                       help="start over in an --out that already holds a run, discarding it (without it, "
                            "such a directory is refused)")
    p.add_argument("--limit-train", type=positive_int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=positive_int, default=None, help="use only the first N test images")
    p.add_argument("--eval-every", type=number(0, 1, open_low=True), default=d["eval_every"],
                   help="evaluate the test set every this fraction of an epoch too (0.5: at half and end; "
                        "the time resolution of time to accuracy); it changes nothing that is trained")
    if resume:
        p.add_argument("--resume", metavar="CKPT", default=None,
                       help="continue the run saved in a checkpoint.npz with its own settings; flags given "
                            "with it may only change " + ", ".join(f"--{k.replace('_', '-')}" for k in
                                                                  ("epochs", "data", "device", "graph", "out",
                                                                   "limit_test", "eval_every")))
    p.add_argument("--reuse", choices=["off", "fixed", "schedule", "adaptive"][reuse_default != "off":],
                   default=reuse_default,
                   help="deep-reuse strategy for the conv/dense layers (off: exact)")
    p.add_argument("--reuse-config", metavar="FILE", default=None,
                   help="JSON file: {\"layers\": {\"conv2\": {\"L\": 16, \"H\": 16} or [stages...]}, "
                        "\"options\": {...}}; without it, CifarNet defaults (docs/adaptive.md)")
    p.add_argument("--graph", choices=["auto", "on", "off"], default=d["graph"],
                   help="record the training step as a CUDA graph and replay it (auto: on the GPU when "
                        "every layer can be recorded; docs/speed.md)")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="never download CIFAR-10 when it is missing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads_argument(p)


def add_threads_argument(p):
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for the fast path and BLAS (default: every core)")


def seed_list(s):
    from .tools.parity import ParityError, parse_seeds
    try:
        return parse_seeds(s)
    except ParityError as e:
        raise argparse.ArgumentTypeError(str(e))


def percent_list(s):
    """'70,75,80' -> [70.0, 75.0, 80.0]: accuracies in percent, in (0, 100]."""
    try:
        values = [float(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated percentages, got {s!r}") from None
    if not all(0 < v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"percentages must be in (0, 100], got {s!r}")
    return values


def step_times(s):
    """'exact=313,reuse=226[,pytorch=455]' -> {'exact': 313.0, ...}: milliseconds per step."""
    out = {}
    for item in s.split(","):
        name, _, value = item.partition("=")
        if name not in ("exact", "reuse", "pytorch") or name in out:
            raise argparse.ArgumentTypeError(f"expected exact=MS,reuse=MS[,pytorch=MS], got {s!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of milliseconds for {name}, got {value!r}") from None
        if not in_range(out[name], 0, open_low=True):
            raise argparse.ArgumentTypeError(f"{name}: expected {describe_range(0, open_low=True)} of "
                                             f"milliseconds, got {value!r}")
    if not {"exact", "reuse"} <= set(out):
        raise argparse.ArgumentTypeError(f"expected at least exact=MS,reuse=MS, got {s!r}")
    return out


def train_config(a):
    keys = ["model", "data", "epochs", "batch_size", "lr", "optimizer", "momentum", "nesterov",
            "weight_decay", "schedule", "warmup_epochs", "augment", "seed", "out", "limit_train",
            "limit_test", "device", "download", "graph", "eval_every"]
    cfg = {k: getattr(a, k) for k in keys}
    # saved absolute, so that a resume from another directory finds them
    cfg["out"], cfg["data"] = os.path.abspath(a.out), os.path.abspath(a.data)
    cfg["decay_layers"] = None if a.decay_layers == "all" else [s for s in a.decay_layers.split(",") if s]
    cfg["reuse"] = a.reuse
    if a.reuse_config:
        from .training.adaptive import load_settings
        cfg["reuse_layers"], cfg["reuse_options"] = load_settings(a.reuse_config)
    return cfg


def given_flags(argv):
    """The train settings that argv names explicitly (dests), by parsing it again with every
    default suppressed."""
    parser = build_parser()
    for action in _subparser(parser, "train")._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _subparser(parser, name):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def resumed_config(a, argv):
    """The checkpoint's settings, with the flags given explicitly on top (Trainer.resume
    refuses those that contradict it, except the settings TrainConfig lets a resume change);
    the output directory is the checkpoint's own unless --out is given."""
    from .training.checkpoint import checkpoint_config
    from .training.config import TrainConfig
    saved = {k: v for k, v in checkpoint_config(a.resume).items() if k in TrainConfig.defaults()}
    # a run continues where its checkpoint is (a copied run in the copy), not where it was saved
    saved["out"] = os.path.dirname(os.path.abspath(a.resume))
    cfg = train_config(a)
    given = given_flags(argv)
    explicit = {k: v for k, v in cfg.items() if k in given or (k in ("reuse_layers", "reuse_options")
                                                              and "reuse_config" in given)}
    return {**saved, **explicit}


def cmd_train(a):
    from .training.distributed import world
    from .training.outdir import clear_run, refuse_existing_run
    from .training.trainer import Trainer
    comm = world(a.distributed)
    if a.resume and a.overwrite:
        raise ValueError("--resume continues a run and --overwrite discards one: give one of them")
    cfg = resumed_config(a, a.argv) if a.resume else train_config(a)
    if a.reuse_config and cfg["reuse"] == "off":
        # an error rather than a strategy picked for the user: the same file means one setting
        # (fixed), stages by progress (schedule) or the controller's ladder (adaptive)
        raise ValueError(f"--reuse-config {a.reuse_config} sets reuse layers, but the reuse strategy is off: "
                         "add --reuse fixed, schedule or adaptive")
    if not a.resume and not a.overwrite:
        refuse_existing_run(cfg["out"])
    trainer = Trainer(cfg, quiet=a.quiet, comm=comm)
    if a.overwrite and comm.rank == 0:
        clear_run(trainer.out)        # only once every setting and the data were accepted
    if a.resume:
        meta = trainer.resume(a.resume)
        if comm.rank == 0:
            print(f"resuming from {a.resume}: epoch {meta['epoch'] + 1}, step {meta['step']}", file=sys.stderr)
    if not trainer.quiet:
        if comm.size > 1:
            print(f"data-parallel: {comm.size} processes, {cfg['batch_size'] // comm.size} images of each batch "
                  "of " f"{cfg['batch_size']} per process", file=sys.stderr)
        print(trainer.model.summary((32, 32, 3)), file=sys.stderr)
        print(f"device: {trainer.device}; training images: {len(trainer.data[0])}, "
              f"test images: {len(trainer.data[2])}", file=sys.stderr)
    history = trainer.fit()
    if history and comm.rank == 0:
        last = history[-1]
        print(f"done: {len(history)} epochs, test accuracy {last['test_acc']:.4f}; "
              f"outputs in {trainer.out}")
    return 0


def cmd_compare(a):
    from .tools import compare
    cfg = train_config(a)
    _, _, table = compare.run(cfg, a.reuse, quiet=a.quiet, overwrite=a.overwrite)
    print(table)
    return 0


def cmd_parity(a):
    from .tools import parity
    if a.seed is not None:
        raise ValueError("parity trains one pair of runs per seed of --seeds; --seed is for train and compare")
    cfg = train_config(a)
    del cfg["seed"]
    result = parity.run(cfg, a.seeds, exact_from=a.exact_from, quiet=a.quiet, control=a.control,
                        targets=a.targets, pytorch=a.pytorch, step_ms=a.step_ms)
    print(result["table"])
    return 0


def cmd_summary(a):
    from .models import MODELS
    print(MODELS[a.model]().summary((32, 32, 3)))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m minireuse",
                                     description="minireuse: deep learning with adaptive deep reuse")
    parser.add_argument("--version", action="version", version=f"minireuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model on CIFAR-10", formatter_class=Formatter)
    add_train_arguments(p)
    p.add_argument("--distributed", choices=["auto", "on", "off"], default="auto",
                   help="data-parallel training over the processes of `mpiexec -n N` (docs/distributed.md; "
                        "needs the .[distributed] extra): auto when mpiexec started several, on even for one")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("compare", help="train exact and with reuse from the same seed; print a table",
                       formatter_class=Formatter)
    add_train_arguments(p, resume=False, reuse_default="adaptive")
    p.set_defaults(func=cmd_compare, out="runs/compare")
    p = sub.add_parser("parity", help="exact and reuse runs over several seeds: accuracy differences "
                       "with their spread, and the time ratios (resumable)", formatter_class=Formatter)
    add_train_arguments(p, resume=False, reuse_default="adaptive", overwrite=False, seed=False)
    p.add_argument("--seeds", type=seed_list, default="0,1,2",
                   help="comma-separated distinct non-negative seeds, one exact and one reuse run each "
                        "(default 0,1,2)")
    p.add_argument("--exact-from", metavar="DIR", default=None,
                   help="take each seed's exact run from DIR/seedS/exact (an earlier parity OUT) "
                        "instead of training it")
    p.add_argument("--control", action="store_true",
                   help="also train each seed's control run (OUT/seedS/control: the reuse layers with the "
                        "exact gradients, so only float rounding differs from exact): the table's noise floor")
    p.add_argument("--targets", type=percent_list, default=[], metavar="P,P,...",
                   help="test accuracies (percent) whose time to reach every run reports, besides each "
                        "seed's exact final accuracy minus 0.3 and minus 1.0 points")
    p.add_argument("--pytorch", type=seed_list, nargs="?", const=True, default=None, metavar="SEEDS",
                   help="also train the recipe in PyTorch (OUT/seedS/pytorch; the .[compare] extra) on every "
                        "seed, or on the comma-separated SEEDS")
    p.add_argument("--step-ms", type=step_times, default=None, metavar="exact=MS,reuse=MS[,pytorch=MS]",
                   help="time to accuracy from steps instead of the runs' own seconds: each evaluation's "
                        "step count times these milliseconds per step (reuse's in the epochs where a layer "
                        "reused, exact's in the others), for runs that shared the machine; take them from "
                        "one idle `bench step` run")
    p.set_defaults(func=cmd_parity, out="runs/parity")
    p = sub.add_parser("summary", help="print a model's layers, output shapes and parameter counts",
                       formatter_class=Formatter)
    p.add_argument("--model", default="cifarnet", choices=["alexnet", "cifarnet", "vgg19"])
    p.set_defaults(func=cmd_summary)
    from .tools import evaluate
    p = sub.add_parser("evaluate", help="a trained model's test accuracy and speed, exact and with deep "
                       "reuse at inference, side by side", formatter_class=Formatter)
    evaluate.add_arguments(p, positive_int)
    add_threads_argument(p)
    p.set_defaults(func=evaluate.run)
    from .tools import plot
    p = sub.add_parser("plot", help="a figure of training runs: accuracy, loss, r_c and error of the reuse "
                       "layers, seconds per epoch (needs matplotlib: .[plot])", formatter_class=Formatter)
    plot.add_arguments(p)
    p.set_defaults(func=plot.run)
    from .tools import bench, bench_step
    p = sub.add_parser("bench", help="benchmarks: 'bench layers' times each layer exact and under reuse "
                       "settings, 'bench step' a whole training step")
    what = p.add_subparsers(dest="bench", required=True, metavar="{layers,step}")
    q = what.add_parser("layers", help="each conv/dense layer, exact and under deep-reuse settings: "
                        "forward/backward time, r_c, error", formatter_class=Formatter)
    bench.add_arguments(q)
    add_threads_argument(q)
    q.set_defaults(func=bench.run)
    q = what.add_parser("step", help="a whole training step: minireuse exact and reuse, with and without "
                        "CUDA graphs, and PyTorch eager when installed", formatter_class=Formatter)
    bench_step.add_arguments(q)
    q.set_defaults(func=bench_step.run)
    return parser


def parse(argv):
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1].startswith("-") and argv[1] not in ("-h", "--help"):
        build_parser().error("bench needs what to time first: 'bench layers ...' (each layer) or "
                             "'bench step ...' (a training step; formerly 'bench --model cifarnet')")
    return build_parser().parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    a.argv = argv
    if getattr(a, "threads", None) is not None:
        from . import cpu
        cpu.set_threads(a.threads)
    from .backend import BackendMismatchError, DeviceError
    from .data import CorruptDataError, DataNotFoundError
    from .training.graphs import GraphError
    from .training.checkpoint import TrainingError
    from .training.outdir import OutputError
    from .tools.plot import PlotError
    from .training.distributed import DistributedError, finish, where
    user_errors = (DataNotFoundError, CorruptDataError, GraphError, OutputError, PlotError, DistributedError)
    try:
        return a.func(a)
    except KeyboardInterrupt as e:
        print(f"\n{e or 'interrupted before training started: nothing was saved'}", file=sys.stderr)
        return finish(130, agreed=True)     # every process saw the Ctrl-C and stopped at the same step
    except user_errors + (DeviceError, TrainingError, BackendMismatchError, ValueError) as e:
        print(f"error{where()}: {e}", file=sys.stderr)
        return finish(2)


if __name__ == "__main__":
    sys.exit(main())
