"""Fused GPU kernels for the exact training step: one launch where the array code needs many.

On a modern GPU the CifarNet step is bound by kernel launches, not arithmetic: each
CuPy operation is a launch (about 16 us of host time), and the readable array code
of a layer is several operations. Each kernel here does the work of one such
sequence in one launch. Its twin, and the oracle it is tested against, is the array
code it replaces, which stays in the layer (or optimizer) and still runs on NumPy:

    kernel                  replaces (the twin)                        launches
    sgd_update              SGD.update (+ weight decay)                 6 -> 1
    adam_update             Adam.update (+ weight decay)               12 -> 1
    lrn_forward/backward    LocalResponseNorm.forward/backward         ~10 -> 1 each
    maxpool_forward/backward MaxPool2D (windows that do not overlap)   3 / ~25 -> 1
    relu_backward           ReLU.backward                               2 -> 1
    dropout_forward         Dropout.forward (counter-based random)      5 -> 1
    accumulate_step         the trainer's loss and accuracy sums        6 -> 1
    im2col / col2im         layers.conv.im2col / col2im             kh*kw -> 1

The layers call these only on CuPy arrays; NumPy arrays take the array code.

All kernels are grid-stride loops over independent outputs (gathers: no atomics,
except for the two sums of accumulate_step). They load, are checked against their
signatures and launch through minireuse.kernels.runtime, like the deep-reuse kernels, so
the same source also runs as its host build on NumPy arrays: tests check every
kernel on machines without a GPU through the launch the GPU uses. The module is
compiled without fused multiply-add (and the host build without contraction), so
elementwise kernels round like the NumPy expressions they replace on normal numbers.
Not on subnormals: CuPy adds -ftz=true to every NVRTC compile, so a float32 input or
result below 1.18e-38 (float64 keeps them) flushes to zero on the GPU where NumPy
keeps it. Exact comparisons with NumPy hold for data without float32 subnormals.

Values that change every step (learning rate, Adam's bias corrections, dropout
keys) are read from device memory (``backend.DeviceScalars``), never passed as
launch arguments, so a step recorded in a CUDA graph (step_graphs.py) stays correct when
replayed.
"""
import numpy as np

from .. import backend
from . import runtime

_KERNELS = r"""
// Every kernel: a grid-stride loop over independent outputs; scalars arrive as double
// and are rounded to T where the NumPy twin rounds a Python float to the array dtype.

template <typename T> __device__ __forceinline__ T power(T a, T b);
template <> __device__ __forceinline__ float power<float>(float a, float b) { return powf(a, b); }
template <> __device__ __forceinline__ double power<double>(double a, double b) { return pow(a, b); }
template <typename T> __device__ __forceinline__ T square_root(T a);
template <> __device__ __forceinline__ float square_root<float>(float a) { return sqrtf(a); }
template <> __device__ __forceinline__ double square_root<double>(double a) { return sqrt(a); }

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// ---- optimizers: hyper = [lr, 1 - b1^t, 1 - b2^t] in device memory

template <typename T>
__device__ void sgd_update(T* p, const T* g, T* v, const double* hyper, long long n,
                           double momentum, double weight_decay, int nesterov, int first)
{
    const T lr = (T)hyper[0];
    const T m = (T)momentum, wd = (T)weight_decay;
    GRID_STRIDE(i, n) {
        T gi = g[i];
        if (weight_decay != 0.0) gi = gi + wd * p[i];          // g + wd * p
        if (momentum == 0.0) { p[i] = p[i] - lr * gi; continue; }
        T vi = first ? gi : m * v[i] + gi;                       // v *= m; v += g
        v[i] = vi;
        p[i] = p[i] - lr * (nesterov ? gi + m * vi : vi);
    }
}

template <typename T>
__device__ void adam_update(T* p, const T* g, T* m, T* v, const double* hyper, long long n,
                            double b1, double b2, double eps, double weight_decay)
{
    const T lr = (T)hyper[0], c1 = (T)hyper[1], c2 = (T)hyper[2];
    const T tb1 = (T)b1, tb2 = (T)b2, one_b1 = (T)(1.0 - b1), one_b2 = (T)(1.0 - b2);
    const T teps = (T)eps, wd = (T)weight_decay;
    GRID_STRIDE(i, n) {
        T gi = g[i];
        if (weight_decay != 0.0) gi = gi + wd * p[i];
        T mi = tb1 * m[i] + one_b1 * gi;
        T vi = tb2 * v[i] + one_b2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] - lr * (mi / c1) / (square_root(vi / c2) + teps);
    }
}

// ---- local response normalisation over the last (channel) axis, window d-r..d+r

template <typename T>
__device__ void lrn_forward(const T* x, T* y, T* scale, T* denom, long long n, int c, int r,
                            double bias, double alpha, double beta)
{
    const T tb = (T)bias, ta = (T)alpha, nb = (T)(-beta);
    GRID_STRIDE(i, n) {
        const long long base = i - i % c;
        const int d = (int)(i % c);
        const int lo = d - r < 0 ? 0 : d - r, hi = d + r > c - 1 ? c - 1 : d + r;
        T s = 0;
        for (int j = lo; j <= hi; ++j) { T xj = x[base + j]; s += xj * xj; }
        T di = tb + ta * s;
        T si = power(di, nb);
        denom[i] = di;
        scale[i] = si;
        y[i] = x[i] * si;
    }
}

template <typename T>
__device__ void lrn_backward(const T* dy, const T* x, const T* scale, const T* denom, T* dx,
                             long long n, int c, int r, double two_alpha_beta)
{
    const T k = (T)two_alpha_beta;
    GRID_STRIDE(i, n) {
        const long long base = i - i % c;
        const int d = (int)(i % c);
        const int lo = d - r < 0 ? 0 : d - r, hi = d + r > c - 1 ? c - 1 : d + r;
        T s = 0;     // sum over the window of dy_j x_j D_j^-b / D_j
        for (int j = lo; j <= hi; ++j) {
            const long long q = base + j;
            s += dy[q] * x[q] * scale[q] / denom[q];
        }
        dx[i] = dy[i] * scale[i] - k * x[i] * s;
    }
}

// ---- max pooling, NHWC, windows that do not overlap (stride >= k); pads = top, left.
// arg[o] is the window position (i*k + j) of the first maximum, 255 when it is NaN
// (NumPy's backward gives a NaN maximum no gradient).

template <typename T>
__device__ void maxpool_forward(const T* x, T* y, unsigned char* arg, long long n,
                                int h, int w, int c, int oh, int ow, int k, int stride,
                                int top, int left)
{
    GRID_STRIDE(o, n) {
        const int ch = (int)(o % c);
        long long t = o / c;
        const int ox = (int)(t % ow); t /= ow;
        const int oy = (int)(t % oh);
        const long long b = t / oh;
        T best = 0;
        int best_at = -1;
        for (int di = 0; di < k; ++di) {
            const int iy = oy * stride + di - top;
            if (iy < 0 || iy >= h) continue;
            for (int dj = 0; dj < k; ++dj) {
                const int ix = ox * stride + dj - left;
                if (ix < 0 || ix >= w) continue;
                const T v = x[((b * h + iy) * w + ix) * c + ch];
                if (best_at < 0 || v > best || (v != v && best == best)) { best = v; best_at = di * k + dj; }
            }
        }
        y[o] = best;
        arg[o] = (unsigned char)(best != best ? 255 : best_at);
    }
}

template <typename T>
__device__ void maxpool_backward(const T* dy, const unsigned char* arg, T* dx, long long n,
                                 int h, int w, int c, int oh, int ow, int k, int stride,
                                 int top, int left)
{
    GRID_STRIDE(i, n) {
        const int ch = (int)(i % c);
        long long t = i / c;
        const int ix = (int)(t % w); t /= w;
        const int iy = (int)(t % h);
        const long long b = t / h;
        const int py = iy + top, px = ix + left;
        const int oy = py / stride, ox = px / stride;
        const int di = py - oy * stride, dj = px - ox * stride;
        T g = 0;
        if (di < k && dj < k && oy < oh && ox < ow) {
            const long long o = ((b * oh + oy) * ow + ox) * c + ch;
            if (arg[o] == di * k + dj) g = dy[o];
        }
        dx[i] = g;
    }
}

// ---- ReLU backward from its output: dx = dy * (y > 0), as the array code

template <typename T>
__device__ void relu_backward(const T* dy, const T* y, T* dx, long long n)
{
    GRID_STRIDE(i, n) dx[i] = dy[i] * (T)(y[i] > (T)0);
}

// ---- dropout: element i keeps when u_i < keep, u_i uniform in [0, 1) from SplitMix64
// of (key + (i + 1) * golden ratio); key = key_words[1]:key_words[0] in device memory.

template <typename T>
__device__ void dropout_forward(const T* x, T* mask, T* y, const unsigned int* key_words,
                                long long n, double keep, double scale)
{
    const unsigned long long key = ((unsigned long long)key_words[1] << 32) | key_words[0];
    const float fkeep = (float)keep;
    const T s = (T)scale;
    GRID_STRIDE(i, n) {
        unsigned long long z = key + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        z ^= z >> 31;
        const float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        const T m = u < fkeep ? s : (T)0;
        mask[i] = m;
        y[i] = x[i] * m;
    }
}

// ---- the trainer's sums: sums[0] += loss * n, sums[1] += #(argmax(logits) == label).
// One thread per row; the count goes through atomicAdd (integers in double: the
// total is exact in any order), the loss is added by row 0 alone.

// atomicAdd(double*) exists from sm_60 on; below it (CuPy on CUDA 12 still targets
// sm_5x) the same sum is a compare-and-swap loop, so the module compiles everywhere.
__device__ inline void add_f64(double* address, double value)
{
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 600
    atomicAdd(address, value);
#else
    unsigned long long* bits = (unsigned long long*)address;
    unsigned long long seen = *bits, expected;
    do {
        expected = seen;
        seen = atomicCAS(bits, expected, __double_as_longlong(__longlong_as_double(expected) + value));
    } while (seen != expected);
#endif
}

template <typename T>
__device__ void accumulate_step(double* sums, const T* loss, const T* logits,
                                const long long* labels, long long n, int k)
{
    GRID_STRIDE(row, n) {
        const T* z = logits + row * k;
        T best = z[0];
        int arg = 0;
        for (int j = 1; j < k; ++j)
            if (z[j] > best || (z[j] != z[j] && best == best)) { best = z[j]; arg = j; }
        if ((long long)arg == labels[row]) add_f64(&sums[1], 1.0);
        if (row == 0) add_f64(&sums[0], (double)(loss[0] * (T)n));
    }
}

// ---- im2col / col2im, NHWC, columns (dy, dx, c) as layers/conv.py; pads = top, left.
// col2im is a gather: each input pixel sums its kh*kw sources in (dy, dx) order.

template <typename T>
__device__ void im2col(const T* x, T* cols, long long n, int h, int w, int c, int kh, int kw,
                       int stride, int top, int left, int oh, int ow)
{
    GRID_STRIDE(e, n) {
        const int ch = (int)(e % c);
        long long t = e / c;
        const int dj = (int)(t % kw); t /= kw;
        const int di = (int)(t % kh); t /= kh;
        const int ox = (int)(t % ow); t /= ow;
        const int oy = (int)(t % oh);
        const long long b = t / oh;
        const int iy = oy * stride + di - top, ix = ox * stride + dj - left;
        cols[e] = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? x[((b * h + iy) * w + ix) * c + ch] : (T)0;
    }
}

template <typename T>
__device__ void col2im(const T* cols, T* x, long long n, int h, int w, int c, int kh, int kw,
                       int stride, int top, int left, int oh, int ow)
{
    GRID_STRIDE(i, n) {
        const int ch = (int)(i % c);
        long long t = i / c;
        const int ix = (int)(t % w); t /= w;
        const int iy = (int)(t % h);
        const long long b = t / h;
        T s = 0;
        for (int di = 0; di < kh; ++di) {
            const int py = iy + top - di;
            if (py < 0 || py % stride != 0 || py / stride >= oh) continue;
            for (int dj = 0; dj < kw; ++dj) {
                const int px = ix + left - dj;
                if (px < 0 || px % stride != 0 || px / stride >= ow) continue;
                s += cols[((((b * oh + py / stride) * ow + px / stride) * kh + di) * kw + dj) * c + ch];
            }
        }
        x[i] = s;
    }
}

"""

# extern "C" entry points, one per kernel and dtype: name_f32 / name_f64 (T = float / double)
_ENTRIES = [
    ("sgd_update", "T* p, const T* g, T* v, const double* hyper, long long n, double momentum, double wd, "
                   "int nesterov, int first"),
    ("adam_update", "T* p, const T* g, T* m, T* v, const double* hyper, long long n, double b1, double b2, "
                    "double eps, double wd"),
    ("lrn_forward", "const T* x, T* y, T* scale, T* denom, long long n, int c, int r, double bias, double alpha, "
                    "double beta"),
    ("lrn_backward", "const T* dy, const T* x, const T* scale, const T* denom, T* dx, long long n, int c, int r, "
                     "double k"),
    ("maxpool_forward", "const T* x, T* y, unsigned char* arg, long long n, int h, int w, int c, int oh, int ow, "
                        "int k, int stride, int top, int left"),
    ("maxpool_backward", "const T* dy, const unsigned char* arg, T* dx, long long n, int h, int w, int c, int oh, "
                         "int ow, int k, int stride, int top, int left"),
    ("relu_backward", "const T* dy, const T* y, T* dx, long long n"),
    ("dropout_forward", "const T* x, T* mask, T* y, const unsigned int* key, long long n, double keep, double scale"),
    ("accumulate_step", "double* sums, const T* loss, const T* logits, const long long* labels, long long n, int k"),
    ("im2col", "const T* x, T* cols, long long n, int h, int w, int c, int kh, int kw, int stride, int top, "
               "int left, int oh, int ow"),
    ("col2im", "const T* cols, T* x, long long n, int h, int w, int c, int kh, int kw, int stride, int top, "
               "int left, int oh, int ow"),
]


def _entry_points():
    lines = []
    for name, params in _ENTRIES:
        args = ", ".join(p.split()[-1].lstrip("*") for p in params.split(","))
        for ctype, suffix in (("float", "f32"), ("double", "f64")):
            typed = params.replace("T*", ctype + "*")
            lines.append(f'extern "C" __global__ void {name}_{suffix}({typed}) {{ {name}<{ctype}>({args}); }}')
    return "\n".join(lines) + "\n"


CUDA_SOURCE = _KERNELS + "\n// ---- entry points\n" + _entry_points()

MODULE = runtime.KernelModule("minireuse/kernels/step_kernels.py", CUDA_SOURCE, gpu_options=("--std=c++14", "--fmad=false"))

THREADS = 256
MAX_BLOCKS = 1 << 16
_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


# ---------------------------------------------------------------- launching

def supports(*arrays):
    """True when every array is a float32/float64 CuPy array: the layers' test for the
    fused path (NumPy arrays take the array code)."""
    return all(backend.is_cupy_array(a) and a.dtype in _DTYPES for a in arrays)


def _launch(name, a, size, args):
    """Run kernel ``name`` for a's dtype over ``size`` outputs: on the GPU for CuPy
    arrays, on the host build for NumPy arrays (tests)."""
    if size == 0:
        return
    runner = MODULE.runner_for(a)
    blocks = runtime.grid_blocks(runner, -(-size // THREADS), MAX_BLOCKS)
    runner.launch(f"{name}_{_DTYPES[np.dtype(a.dtype)]}", (blocks,), (THREADS,), args)


def _empty_like(a):
    return backend.get_array_module(a).empty(a.shape, dtype=a.dtype)


def _ints(*values):
    """int launch arguments (np.int32: the kernels' ``int``)."""
    return tuple(np.int32(v) for v in values)


def _doubles(*values):
    return tuple(np.float64(v) for v in values)


def _contiguous(*arrays):
    """Arrays a kernel updates in place must be contiguous already."""
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError(f"fused kernels need contiguous arrays, got shape {a.shape} strides {a.strides}")


def _c(a):
    """A contiguous version of an input (no copy when it already is)."""
    return a if a.flags.c_contiguous else backend.get_array_module(a).ascontiguousarray(a)


# ---------------------------------------------------------------- optimizers

def sgd_update(p, g, v, hyper, momentum, nesterov, weight_decay, first):
    """In place: p (and v) after one SGD step; hyper = device [lr, ...] (DeviceScalars.array).

    v is ignored when momentum is 0; first=True sets v = g (the optimizer's first step).
    """
    _contiguous(p, *(() if v is None else (v,)))
    args = (p, _c(g), p if v is None else v, hyper, np.int64(p.size)) + _doubles(momentum, weight_decay)
    _launch("sgd_update", p, p.size, args + _ints(bool(nesterov), bool(first)))


def adam_update(p, g, m, v, hyper, b1, b2, eps, weight_decay):
    """In place: p, m, v after one Adam step; hyper = device [lr, 1 - b1^t, 1 - b2^t]."""
    _contiguous(p, m, v)
    args = (p, _c(g), m, v, hyper, np.int64(p.size)) + _doubles(b1, b2, eps, weight_decay)
    _launch("adam_update", p, p.size, args)


# ---------------------------------------------------------------- layers

def lrn_forward(x, r, bias, alpha, beta):
    """(y, scale, denom) of LocalResponseNorm.forward: denom = bias + alpha * window sum of x^2."""
    x = _c(x)
    y, scale, denom = _empty_like(x), _empty_like(x), _empty_like(x)
    args = (x, y, scale, denom, np.int64(x.size)) + _ints(x.shape[-1], r) + _doubles(bias, alpha, beta)
    _launch("lrn_forward", x, x.size, args)
    return y, scale, denom


def lrn_backward(dy, x, scale, denom, r, alpha, beta):
    """dx of LocalResponseNorm.backward from the forward's (x, scale, denom)."""
    dy, x, scale, denom = _c(dy), _c(x), _c(scale), _c(denom)
    dx = _empty_like(x)
    args = (dy, x, scale, denom, dx, np.int64(x.size)) + _ints(x.shape[-1], r) + _doubles(2.0 * alpha * beta)
    _launch("lrn_backward", x, x.size, args)
    return dx


def maxpool_forward(x, k, stride, pads, out_hw):
    """(y, arg) of MaxPool2D.forward for windows that do not overlap (stride >= k);
    arg (uint8) is each window's first maximum (i * k + j), 255 for NaN."""
    if stride < k or k * k > 255:
        raise ValueError(f"fused max pooling needs stride >= k and k*k <= 255, got k={k}, stride={stride}")
    x = _c(x)
    xp = backend.get_array_module(x)
    b, h, w, c = x.shape
    oh, ow = out_hw
    y = xp.empty((b, oh, ow, c), dtype=x.dtype)
    arg = xp.empty((b, oh, ow, c), dtype=np.uint8)
    args = (x, y, arg, np.int64(y.size)) + _ints(h, w, c, oh, ow, k, stride, pads[0], pads[2])
    _launch("maxpool_forward", x, y.size, args)
    return y, arg


def maxpool_backward(dy, arg, x_shape, k, stride, pads):
    """dx of MaxPool2D.backward from the forward's arg."""
    dy, arg = _c(dy), _c(arg)
    xp = backend.get_array_module(dy)
    b, h, w, c = x_shape
    oh, ow = dy.shape[1:3]
    dx = xp.empty(x_shape, dtype=dy.dtype)
    args = (dy, arg, dx, np.int64(dx.size)) + _ints(h, w, c, oh, ow, k, stride, pads[0], pads[2])
    _launch("maxpool_backward", dy, dx.size, args)
    return dx


def relu_backward(dy, y):
    """dy * (y > 0) in one launch."""
    dy, y = _c(dy), _c(y)
    dx = _empty_like(dy)
    _launch("relu_backward", dy, dy.size, (dy, y, dx, np.int64(dy.size)))
    return dx


def dropout_forward(x, keep, key_words):
    """(mask, y): mask = 1/keep where u < keep else 0, y = x * mask; key_words = device
    uint32[2] (the 64-bit key of this call). u depends only on the key and the index."""
    x = _c(x)
    scale = np.dtype(x.dtype).type(1) / np.dtype(x.dtype).type(keep)
    mask, y = _empty_like(x), _empty_like(x)
    _launch("dropout_forward", x, x.size, (x, mask, y, key_words, np.int64(x.size)) + _doubles(keep, scale))
    return mask, y


def accumulate_step(sums, loss, logits, labels):
    """In place: sums[0] += loss * batch, sums[1] += correct predictions (sums: float64[2])."""
    if sums.dtype != np.float64 or sums.size < 2 or loss.dtype != logits.dtype:
        raise ValueError("accumulate_step: sums must be float64[2] and loss the dtype of logits")
    _contiguous(sums)
    loss, logits, labels = _c(loss), _c(logits), _c(labels.astype(np.int64, copy=False))
    n, k = logits.shape
    _launch("accumulate_step", logits, n, (sums, loss, logits, labels, np.int64(n)) + _ints(k))


def _conv_geometry(x_shape, kh, kw, stride, pads):
    b, h, w, c = x_shape
    oh = (h + pads[0] + pads[1] - kh) // stride + 1
    ow = (w + pads[2] + pads[3] - kw) // stride + 1
    return _ints(h, w, c, kh, kw, stride, pads[0], pads[2], oh, ow), (oh, ow)


def im2col(x, kh, kw, stride, pads):
    """layers.conv.im2col in one launch: (B*OH*OW, kh*kw*C) and (OH, OW)."""
    x = _c(x)
    geometry, (oh, ow) = _conv_geometry(x.shape, kh, kw, stride, pads)
    cols = backend.get_array_module(x).empty((x.shape[0] * oh * ow, kh * kw * x.shape[3]), dtype=x.dtype)
    _launch("im2col", x, cols.size, (x, cols, np.int64(cols.size)) + geometry)
    return cols, (oh, ow)


def col2im(cols, x_shape, kh, kw, stride, pads):
    """layers.conv.col2im in one launch (a gather: deterministic, no atomics)."""
    cols = _c(cols)
    geometry, _ = _conv_geometry(x_shape, kh, kw, stride, pads)
    x = backend.get_array_module(cols).empty(x_shape, dtype=cols.dtype)
    _launch("col2im", cols, x.size, (cols, x, np.int64(x.size)) + geometry)
    return x
