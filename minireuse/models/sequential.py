"""Sequential model: layers applied in order; backward in reverse order."""
import contextlib

import numpy as np

from .. import backend
from ..fileio import atomic_savez
from ..layers import ReusableLayer
from ..tables import align_rows


def layer_flops(layer, out_shape):
    """Forward FLOPs of one input through a conv or dense layer (2 per multiply-add of its
    product with the weights), 0 for other layers."""
    W = getattr(layer, "params", {}).get("W")
    if W is None or not isinstance(layer, ReusableLayer):
        return 0
    per_output_pixel = int(np.prod(W.shape))             # conv: kh*kw*c_in*c_out; dense: n_in*n_out
    pixels = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
    return 2 * per_output_pixel * pixels


class Sequential:
    def __init__(self, layers, name="sequential", input_grad=False):
        """input_grad=False lets the first layer skip the gradient of the model's input,
        which training never needs (backward then returns None)."""
        self.layers = list(layers)
        self.name = name
        if self.layers:
            self.layers[0].needs_input_grad = input_grad
        names = [l.name for l in self.layers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"layer names must be unique, repeated: {sorted(dup)}")

    def forward(self, x, train=True, timer=None):
        for layer in self.layers:
            if timer is not None:
                timer.start(layer.name, "forward")
            x = layer.forward(x, train)
            if timer is not None:
                timer.stop(layer.name)
        return x

    __call__ = forward

    def backward(self, dy, timer=None):
        for layer in reversed(self.layers):
            if timer is not None:
                timer.start(layer.name, "backward")
            dy = layer.backward(dy)
            if timer is not None:
                timer.stop(layer.name)
        return dy

    def named_parameters(self):
        """Yield (key, layer, name) for every parameter; key = 'layer.name'."""
        for layer in self.layers:
            for name in layer.params:
                yield f"{layer.name}.{name}", layer, name

    def input_of(self, name, x, train=False):
        """What layer ``name`` receives when the model is applied to x: the layers before it, in order."""
        target = self.layer(name)
        for layer in self.layers:
            if layer is target:
                return x
            x = layer.forward(x, train)

    def reuse_layers(self):
        return [l for l in self.layers if isinstance(l, ReusableLayer)]

    @contextlib.contextmanager
    def reuse_settings(self, setting, names=None):
        """Within the block, every conv/dense layer (those in ``names`` only, when given) runs
        ``setting`` (None: exact); each gets its own setting back after the block, whatever happens.

            with model.reuse_settings(None):      # the exact model, e.g. for a reference
                y = model.forward(x, train=False)
        """
        layers = [l for l in self.reuse_layers() if names is None or l.name in names]
        saved = [l.reuse for l in layers]
        try:
            for layer in layers:
                layer.set_reuse(setting)
            yield layers
        finally:
            for layer, reuse in zip(layers, saved):
                layer.set_reuse(reuse)

    def layer(self, name):
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"no layer named {name!r}; layers: {[l.name for l in self.layers]}")

    def num_parameters(self):
        return sum(int(np.prod(l.params[n].shape)) for _, l, n in self.named_parameters())

    def summary(self, input_shape):
        """A table of each layer's output shape, parameter count and forward FLOPs for one
        input (2 x multiply-adds of the conv/dense products: where deep reuse can pay), as a string."""
        shape = (None,) + tuple(input_shape)
        rows = [("layer", "type", "output shape", "params", "MFLOPs/image", "share"),
                ("input", "", str(shape), "", "", "")]
        per_layer = []
        for l in self.layers:
            shape = l.output_shape(shape)
            per_layer.append((l, shape, layer_flops(l, shape)))
        total_flops = sum(f for _, _, f in per_layer) or 1
        for l, out, f in per_layer:
            n = sum(int(np.prod(p.shape)) for p in l.params.values())
            reuse = getattr(l, "reuse", None)
            rows.append((l.name, type(l).__name__ + (" [reuse]" if reuse is not None else ""), str(out), f"{n:,}",
                         f"{f / 1e6:.2f}" if f else "", f"{100 * f / total_flops:.1f}%" if f else ""))
        lines = align_rows(rows, right_from=3)
        lines.append(f"total parameters: {self.num_parameters():,}")
        lines.append(f"forward: {sum(f for _, _, f in per_layer) / 1e6:.1f} MFLOPs per image")
        return "\n".join(lines)

    def astype(self, dtype):
        for l in self.layers:
            l.astype(dtype)
        return self

    def named_buffers(self):
        """Yield (key, layer, name) for every buffer (state that is saved but not trained, e.g.
        BatchNorm's running statistics); key = 'layer.name'."""
        for layer in self.layers:
            for name in getattr(layer, "buffers", {}):
                yield f"{layer.name}.{name}", layer, name

    def state_dict(self):
        """Parameters and buffers as host arrays, by 'layer.name'."""
        out = {key: backend.asnumpy(layer.params[name]) for key, layer, name in self.named_parameters()}
        out.update({key: backend.asnumpy(layer.buffers[name]) for key, layer, name in self.named_buffers()})
        return out

    def load_state_dict(self, state):
        own = {key: (layer, name) for key, layer, name in self.named_parameters()}
        buffers = {key: (layer, name) for key, layer, name in self.named_buffers()}
        missing = (set(own) | set(buffers)) - set(state)
        extra = set(state) - set(own) - set(buffers)
        if missing or extra:
            raise ValueError(f"parameter names do not match: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for key, (layer, name) in list(own.items()) + list(buffers.items()):
            store = layer.params if key in own else layer.buffers
            if tuple(state[key].shape) != tuple(store[name].shape):
                raise ValueError(f"{key}: checkpoint shape {tuple(state[key].shape)} != model shape "
                                 f"{tuple(store[name].shape)}")
        for key, (layer, name) in list(own.items()) + list(buffers.items()):
            store = layer.params if key in own else layer.buffers
            store[name] = backend.to_device(np.asarray(state[key]), store[name].dtype)

    def save(self, path):
        """Write the parameters to an .npz file atomically."""
        atomic_savez(path, self.state_dict())

    def load(self, path):
        with np.load(path, allow_pickle=False) as f:
            self.load_state_dict({k: f[k] for k in f.files})
