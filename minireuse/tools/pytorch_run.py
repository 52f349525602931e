"""A minireuse run's recipe trained in PyTorch: the parity protocol's anchor against what
users would pick instead (``parity --pytorch``; PyTorch is the optional ``.[compare]`` extra).

TorchRun(cfg, data).fit() trains CifarNet in PyTorch with everything that decides what is
learned taken from minireuse:

- the initial weights: minireuse's initialisation of the seed, converted (conv weights
  (kh, kw, c_in, c_out) -> (c_out, c_in, kh, kw), dense (in, out) -> (out, in), and the
  first dense layer's inputs from NHWC's (h, w, c) order to NCHW's (c, h, w));
- the batches: minireuse's BatchIterator with the run's seed (the same order, crops
  and flips in every epoch), NHWC -> NCHW;
- the dropout masks: drawn by the minireuse model's own Dropout layer reseeded with
  (seed, epoch, step), as the trainer does every step;
- the learning rate of every step (the same schedule), SGD with the same momentum,
  Nesterov update and weight decay (on the weights minireuse decays), the same loss.

So this run and minireuse's exact run of the seed differ by the order of float
operations and by speed. It writes OUT/history.json with the fields of a minireuse
run (evaluations at the same points, ``eval_every`` included; ``layers`` is empty: no
per-layer times) and OUT/checkpoint.npz at the end of every epoch, with the settings
in the same place as minireuse's, which ``resume`` continues from.
"""
import json
import math
import os
import time

import numpy as np
from tqdm import tqdm

from .. import backend, cpu
from ..training.checkpoint import TrainingError, read_checkpoint, resume_conflicts
from ..fileio import atomic_savez, atomic_write_json
from ..layers import Conv2D, Dense, Dropout, Flatten
from ..layers.simple import reseed_dropout
from ..models import MODELS
from ..optim import make_schedule
from ..training.outdir import OutLock, check_writable
from ..training.batches import batches, epoch_batches, load_data, mid_epoch_evaluations
from ..training.outdir import CHECKPOINT, HISTORY
from ..training.trainer import Trainer

FRAMEWORK = "pytorch"
# how to get this run: the optional extra of setup.cfg, or torch itself
TORCH_INSTALL_HINT = "pip install -e '.[compare]' (or pip install torch)"


def torch_missing():
    """Why the PyTorch run cannot be made here (a sentence), or None when torch imports."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return f"PyTorch does not import ({e}); for this run: {TORCH_INSTALL_HINT}"
    return None


def check_recipe(cfg):
    """Refuse a recipe this run does not reproduce (it mirrors CifarNet with SGD only)."""
    if cfg["model"] != "cifarnet" or cfg["optimizer"] != "sgd":
        raise ValueError(f"the PyTorch run reproduces CifarNet trained with SGD; this recipe is "
                         f"{cfg['model']} with {cfg['optimizer']}")


def torch_weights(model):
    """{minireuse layer name: (weight, bias)} as PyTorch lays them out (module docstring)."""
    out, shape = {}, (1, 32, 32, 3)
    flat_from = None                  # the NHWC shape a Flatten received
    for layer in model.layers:
        if isinstance(layer, Flatten):
            flat_from = shape
        W, b = (backend.asnumpy(layer.params[k]) if k in layer.params else None for k in ("W", "b"))
        if isinstance(layer, Conv2D):
            out[layer.name] = (W.transpose(3, 2, 0, 1), b)
        elif isinstance(layer, Dense):
            if flat_from is not None:
                _, h, w, c = flat_from
                W = W.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
                flat_from = None
            out[layer.name] = (W.T, b)
        shape = layer.output_shape(shape)
    return out


def torch_cifarnet(torch):
    """CifarNet in PyTorch (NCHW): the layers and sizes of minireuse.models.cifarnet."""
    nn = torch.nn
    # TF's LRN alpha is not divided by the window; PyTorch's is: alpha * size
    lrn = dict(size=9, alpha=0.001 / 9.0 * 9, beta=0.75, k=1.0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2), nn.LocalResponseNorm(**lrn),
        nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(), nn.LocalResponseNorm(**lrn), nn.MaxPool2d(2, 2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 384), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(384, 192), nn.ReLU(), nn.Linear(192, 10))
    decay = [model[9].weight, model[12].weight]
    rest = [p for p in model.parameters() if all(p is not d for d in decay)]
    return model, [dict(params=decay, weight_decay=0.004), dict(params=rest, weight_decay=0.0)]


def build_network(torch, model):
    """(PyTorch CifarNet with ``model``'s weights, its dropout module): the dropout multiplies
    by ``model``'s own mask for the key set on it (``.key = (seed, epoch, step)``)."""
    net, _ = torch_cifarnet(torch)
    drop = next(l for l in model.layers if isinstance(l, Dropout))

    class MinireuseDropout(torch.nn.Module):
        key = None

        def forward(self, x):
            if not self.training or drop.rate == 0.0:
                return x
            reseed_dropout(model, self.key)
            ones = backend.xp().ones(tuple(x.shape), dtype=np.float32)
            return x * torch.from_numpy(backend.asnumpy(drop.forward(ones, train=True))).to(x.device)

    index = next(i for i, m in enumerate(net) if isinstance(m, torch.nn.Dropout))
    net[index] = MinireuseDropout()
    return net, net[index], copy_weights(torch, model, net)


def copy_weights(torch, model, net):
    """Copy minireuse CifarNet ``model``'s weights into torch_cifarnet's ``net``; returns
    {minireuse layer: the PyTorch module holding its weights}."""
    weights = torch_weights(model)
    mods = [m for m in net if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    layers = [l for l in model.layers if isinstance(l, (Conv2D, Dense))]
    with torch.no_grad():
        for m, layer in zip(mods, layers):
            W, b = weights[layer.name]
            m.weight.copy_(torch.from_numpy(np.ascontiguousarray(W)))
            m.bias.copy_(torch.from_numpy(b))
    return dict(zip(layers, mods))


class TorchRun:
    """One PyTorch training run of a minireuse recipe (module docstring); cfg: a Trainer config
    with "framework": "pytorch"."""

    def __init__(self, cfg, data=None, quiet=False):
        import torch
        self.torch = torch
        self.cfg = {**Trainer.DEFAULTS, **cfg, "framework": FRAMEWORK}
        c = self.cfg
        check_recipe(c)
        check_writable(c["out"])
        self.quiet = quiet
        backend.set_device(c["device"])
        self.dev = torch.device("cuda" if backend.device() == "gpu" and torch.cuda.is_available() else "cpu")
        if self.dev.type == "cpu":
            torch.set_num_threads(cpu.threads())
        self.model = MODELS[c["model"]](seed=c["seed"])
        self.net, self.dropout, modules = build_network(torch, self.model)
        self.net.to(self.dev)
        self.names = {p: n for n, p in self.net.named_parameters()}
        decayed = [m.weight for layer, m in modules.items() if self._decays(layer)]
        rest = [p for p in self.net.parameters() if all(p is not d for d in decayed)]
        self.opt = torch.optim.SGD([dict(params=decayed, weight_decay=c["weight_decay"]),
                                    dict(params=rest, weight_decay=0.0)],
                                   lr=c["lr"], momentum=c["momentum"], nesterov=c["nesterov"])
        self.schedule = make_schedule(c["schedule"], c["lr"], c["epochs"], c["warmup_epochs"])
        self.data = data if data is not None else load_data(c, progress=not quiet)
        self.history, self.start_epoch = [], 0

    def _decays(self, layer):
        """Whether minireuse's optimizer decays this layer's weight (optim.Optimizer._decays)."""
        c = self.cfg
        return bool(c["weight_decay"]) and layer.decay.get("W", False) and (
            c["decay_layers"] is None or layer.name in c["decay_layers"])

    @property
    def out(self):
        return self.cfg["out"]

    def describe(self):
        where = f"{self.torch.get_num_threads()} CPU threads" if self.dev.type == "cpu" else "cuda"
        return f"{FRAMEWORK} {self.torch.__version__}, {where}"

    # ----- steps and evaluation
    def tensors(self, xb, yb):
        x = self.torch.from_numpy(backend.asnumpy(xb)).permute(0, 3, 1, 2).contiguous().to(self.dev)
        return x, self.torch.from_numpy(backend.asnumpy(yb).astype(np.int64)).to(self.dev)

    def step(self, xb, yb, epoch, step, steps):
        """One training step at (epoch, step); returns (loss, logits) as tensors and the lr."""
        torch = self.torch
        lr = self.schedule(epoch + step / steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.dropout.key = (self.cfg["seed"], epoch, step)
        x, y = self.tensors(xb, yb)
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        logits = self.net(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        self.opt.step()
        return loss.detach(), logits.detach(), y, lr

    def evaluate(self, test_batches):
        """Mean test loss and accuracy (one read back)."""
        torch = self.torch
        self.net.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dev)
        correct, n = torch.zeros((), dtype=torch.int64, device=self.dev), 0
        with torch.no_grad():
            for x, y in test_batches:
                logits = self.net(x)
                loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
                correct += (logits.argmax(1) == y).sum()
                n += len(y)
        return float(loss_sum) / max(n, 1), int(correct) / max(n, 1)

    def _sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    # ----- the run
    def fit(self):
        """Train from start_epoch to the last epoch; returns the history (minireuse's fields)."""
        with OutLock(self.out):
            return self._fit()

    def _fit(self):
        c = self.cfg
        xtr, ytr, xte, yte = self.data
        train_iter = batches(c, xtr, ytr, train=True)
        test_batches = [self.tensors(xb, yb) for xb, yb in batches(c, xte, yte, train=False)]
        steps = len(train_iter)
        mid = mid_epoch_evaluations(steps, c["eval_every"])
        for epoch in range(self.start_epoch, c["epochs"]):
            loss_sum = self.torch.zeros((), dtype=self.torch.float64, device=self.dev)
            correct = self.torch.zeros((), dtype=self.torch.int64, device=self.dev)
            seen, mid_evals, eval_s = 0, [], 0.0
            t0 = time.perf_counter()
            bar = tqdm(epoch_batches(train_iter, c["seed"], epoch), total=steps, disable=self.quiet,
                       desc=f"pytorch epoch {epoch + 1}/{c['epochs']}", unit="batch", leave=True, dynamic_ncols=True)
            for step, (xb, yb) in enumerate(bar):
                if step in mid:
                    self._sync()
                    began = time.perf_counter()
                    test_loss, test_acc = self.evaluate(test_batches)
                    mid_evals.append(dict(epoch=epoch + step / steps, step=step, seconds=began - t0 - eval_s,
                                          test_loss=test_loss, test_acc=test_acc))
                    eval_s += time.perf_counter() - began
                loss, logits, y, lr = self.step(xb, yb, epoch, step, steps)
                loss_sum += loss.double() * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
            bar.close()
            self._sync()
            seconds = time.perf_counter() - t0 - eval_s
            train_loss = float(loss_sum) / max(seen, 1)
            if not math.isfinite(train_loss):
                raise TrainingError(f"non-finite training loss ({train_loss}) in epoch {epoch + 1} of the "
                                    f"PyTorch run in {os.path.abspath(self.out)}; stopped")
            test_loss, test_acc = self.evaluate(test_batches)
            self.history.append(dict(epoch=epoch + 1, train_loss=train_loss, train_acc=int(correct) / max(seen, 1),
                                     test_loss=test_loss, test_acc=test_acc, lr=lr, seconds=seconds,
                                     images_per_s=seen / seconds if seconds > 0 else 0.0, mid_evals=mid_evals,
                                     layers={}))
            self.save(epoch + 1)
            if not self.quiet:
                tqdm.write(f"pytorch epoch {epoch + 1}: train loss {train_loss:.4f} | test acc {test_acc:.4f} | "
                           f"{seconds:.1f} s")
        return self.history

    # ----- files
    def save(self, epoch):
        """checkpoint.npz (parameters, momentum buffers, and a meta record shaped like minireuse's)
        then history.json, both atomically."""
        arrays = {f"param/{n}": p.detach().cpu().numpy() for n, p in self.net.named_parameters()}
        for p, state in self.opt.state.items():
            if state.get("momentum_buffer") is not None:
                arrays[f"opt/{self.names[p]}/v"] = state["momentum_buffer"].cpu().numpy()
        meta = {"epoch": epoch, "step": 0, "history": self.history, "config": self.cfg, "format": 1,
                "strategy": None, "epoch_totals": None}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        atomic_savez(os.path.join(self.out, CHECKPOINT), arrays)
        self.write_history()

    def write_history(self):
        atomic_write_json(os.path.join(self.out, HISTORY),
                          {"settings": self.cfg, "device": self.describe(), "epochs": self.history})

    def resume(self, path):
        """Continue from a checkpoint this class saved (at the end of an epoch); returns its meta."""
        meta, arrays = read_checkpoint(path)
        saved = meta.get("config") or {}
        conflicts = resume_conflicts(saved, self.cfg, Trainer.SAFE_TO_CHANGE)
        if saved.get("framework") != FRAMEWORK or conflicts:
            listed = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in conflicts)
            raise TrainingError(f"{path} is not a checkpoint of this PyTorch run ({listed or 'another framework'})")
        torch = self.torch
        with torch.no_grad():
            for n, p in self.net.named_parameters():
                p.copy_(torch.from_numpy(arrays[f"param/{n}"]))
                if f"opt/{n}/v" in arrays:
                    self.opt.state[p]["momentum_buffer"] = torch.from_numpy(arrays[f"opt/{n}/v"]).to(self.dev)
        self.history, self.start_epoch = meta["history"], meta["epoch"]
        return meta
