"""Numerical gradient checks in float64 (in the spirit of chainer.gradient_check)."""

from minireuse import backend


def numerical_directional(f, x, v, eps=1e-6):
    """(f(x + eps v) - f(x - eps v)) / 2 eps for a scalar function f, restoring x."""
    orig = x.copy()
    x += eps * v
    fp = float(f())
    x[...] = orig - eps * v
    fm = float(f())
    x[...] = orig
    return (fp - fm) / (2 * eps)


def check_layer_backward(layer, x, rng, wrt_params=True, atol=1e-6, rtol=1e-5, train=True, before=None):
    """Compare analytic gradients of sum(y * g) (g random) against central differences
    along random directions, for the input and every parameter of ``layer``.

    ``before`` is called before every forward (e.g. to reseed dropout)."""
    xp = backend.get_array_module(x)
    before = before or (lambda: None)
    before()
    y = layer.forward(x, train=train)
    g = xp.asarray(rng.standard_normal(y.shape))

    def loss():
        before()
        return (layer.forward(x, train=train) * g).sum()

    before()
    layer.forward(x, train=train)
    dx = layer.backward(g)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    targets = [("x", x, dx)]
    if wrt_params:
        targets += [(k, layer.params[k], grads[k]) for k in layer.params]
    for name, arr, analytic in targets:
        for _ in range(2):
            v = xp.asarray(rng.standard_normal(arr.shape))
            num = numerical_directional(loss, arr, v)
            ana = float((analytic * v).sum())
            assert abs(num - ana) <= atol + rtol * abs(num), \
                f"{type(layer).__name__} gradient w.r.t. {name}: numerical {num} vs analytic {ana}"
