
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

