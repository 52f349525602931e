"""Parameter-free layers: ReLU, Flatten, Dropout.

On CuPy arrays, ReLU's backward and Dropout's forward are one fused kernel each
(minireuse.kernels.step_kernels); on NumPy arrays ReLU runs on every core (minireuse.cpu.ops).
The array code below is their twin (Dropout's GPU masks come from a counter-based
generator instead of NumPy's, see Dropout).
"""
import numpy as np

from .. import backend, cpu
from ..kernels import step_kernels
from ..cpu import ops as cpu_ops
from .base import Layer

_MASK64 = (1 << 64) - 1
# the dropout kernel's counter step: element i of a call mixes key + (i + 1) * KEY_STRIDE
KEY_STRIDE = 0x9E3779B97F4A7C15


def _splitmix64(z):
    z = (z + KEY_STRIDE) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def call_key(seed, call):
    """The 64-bit key of a dropout call: its seed (an int or a tuple of ints) and its number."""
    h = 0
    for v in (tuple(seed) if isinstance(seed, (tuple, list)) else (seed,)) + (call,):
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h


class ReLU(Layer):
    def forward(self, x, train=True):
        y = cpu_ops.relu_forward(x) if cpu.supports(x) else backend.get_array_module(x).maximum(x, 0)
        if train:
            self._y = y
        return y

    def backward(self, dy):
        y, self._y = self._y, None
        if step_kernels.supports(dy, y):
            return step_kernels.relu_backward(dy, y)
        if cpu.supports(dy, y):
            return cpu_ops.relu_backward(dy, y)
        return dy * (y > 0)


class Flatten(Layer):
    """(batch, ...) -> (batch, prod(...)); NHWC order, so features are (h, w, c)."""

    def output_shape(self, input_shape):
        return (input_shape[0], int(np.prod(input_shape[1:])))

    def forward(self, x, train=True):
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self._shape)


def reseed_dropout(model, seed):
    """Reseed every Dropout layer of ``model``."""
    for layer in model.layers:
        if isinstance(layer, Dropout):
            layer.reseed(seed)


def reseed_layers(model, seed):
    """Reseed everything of ``model`` that draws randomness in a training step (the trainer
    does it every step with (seed, epoch, step)): the Dropout layers, and the deep-reuse
    states' row samples (ReuseConfig.dw_sample), each keyed by its layer's position too."""
    reseed_dropout(model, seed)
    for i, layer in enumerate(model.layers):
        if getattr(layer, "reuse_state", None) is not None:
            layer.reuse_state.reseed((*seed, i) if isinstance(seed, tuple) else (seed, i))


class Dropout(Layer):
    """Inverted dropout: in training, zero each unit with probability ``rate`` and
    scale the rest by 1/(1-rate); identity at evaluation.

    On the CPU, random draws come from ``self.rng``, a numpy Generator; the trainer
    reseeds it every step with (seed, epoch, step), so runs are reproducible.

    On the GPU a fused kernel draws the mask from a counter-based generator: element
    i of call k after ``reseed(s)`` keeps when SplitMix64(call_key(s, k) + i) says so.
    Reseeding is then a host integer (no generator to build per step), the mask of a
    step depends only on (seed, epoch, step), so resuming mid-epoch is exact on the
    GPU too. The key is per-step state in device memory: ``begin_step`` advances it
    before a training step and ``end_step`` closes the step (the trainer's Step does
    both, around every step); within a step the forward only reads the key, outside
    one every forward advances it itself. GPU masks differ from CPU masks.

    ``batch_shard`` = (first row, rows of the whole batch), set by data-parallel training
    (minireuse.training.distributed): the input is those rows of a larger batch, and the mask
    is the same rows of the mask drawn for the whole batch (on the GPU, the key moves on by
    the elements before the first row), so every process draws what one process would. The
    offset is known only once the input is, so with a shard the forward advances the key
    itself and ``begin_step`` leaves it alone.
    """

    def __init__(self, rate=0.5, seed=0, name=None):
        super().__init__(name)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{self.name}: rate must be in [0, 1), got {rate}")
        self.rate = rate
        self._device_key = None
        self.batch_shard = None
        self.reseed(seed)

    def reseed(self, seed):
        self.seed, self._calls = seed, 0
        self._in_step = False       # between begin_step and end_step: the key is the step's
        # a cupy generator costs a kernel launch or more to build: the GPU path uses keys
        self.rng = backend.random_generator(seed) if backend.device() == "cpu" else None

    def begin_step(self):
        """The per-step state: on the GPU, the step's key into device memory (asynchronous).
        A layer given a batch shard advances its key in the forward, where the offset is known."""
        if backend.device() == "gpu" and self.batch_shard is None:
            self._advance_key()
            self._in_step = True

    def end_step(self):
        self._in_step = False

    def _advance_key(self, first=0):
        """``first``: the index in the whole batch's mask of the input's first element."""
        self._calls += 1
        key = (call_key(self.seed, self._calls) + first * KEY_STRIDE) & _MASK64
        if self._device_key is None:
            self._device_key = backend.DeviceScalars(2, np.uint32, xp=backend.require_gpu())
        self._device_key.set((key & 0xFFFFFFFF, key >> 32))

    def forward(self, x, train=True):
        if not train or self.rate == 0.0:
            self._mask = None
            return x
        keep = 1.0 - self.rate
        if step_kernels.supports(x):
            if not self._in_step:          # a forward outside a training step draws its own key
                self._advance_key(0 if self.batch_shard is None else self.batch_shard[0] * (x.size // len(x)))
            self._mask, y = step_kernels.dropout_forward(x, keep, self._device_key.array)
            return y
        if self.rng is None:
            self.rng = np.random.default_rng(self.seed)
        if self.batch_shard is None:
            u = self.rng.random(x.shape, dtype=np.float32)
        else:
            first, rows = self.batch_shard
            u = self.rng.random((rows,) + x.shape[1:], dtype=np.float32)[first:first + len(x)]
        self._mask = (u < keep).astype(x.dtype) / keep
        return x * self._mask

    def backward(self, dy):
        return dy if self._mask is None else dy * self._mask
