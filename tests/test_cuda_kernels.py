"""Every CUDA kernel of the deep-reuse fast path against the reference path.

Every test runs on two runners: ``host`` (the kernels' host build through
cuda.HostDevice: NumPy arrays, every block's threads as real threads, real
barriers and atomics; runs on every machine) and ``gpu`` (CuPy, the real
kernels; skipped without a GPU). The fast path's Python code is the same on
both. Inputs are asymmetric and random
(never zeros or symmetric data that hides swapped indices); sizes are chosen
so rows are not a multiple of any block size and K is not a multiple of L.
Cluster ids are compared as partitions (up to relabelling), centroids per
matched cluster, outputs with float32 tolerances. Hash codes are compared
where no projection lies within a relative 1e-4 of its threshold (float32
rounding may flip those bits); full forward/backward tests draw inputs with no
such ties, so both paths see the same clusters.

The reference path runs on NumPy copies (its CPU form is the oracle).
"""
import numpy as np
import pytest

from minireuse import backend
from minireuse.kernels import runtime
from minireuse.layers.conv import im2col as ref_im2col
from minireuse.reuse import ReuseConfig, ReuseState, clustering, conv2d_backward, conv2d_forward, lsh
from minireuse.reuse import conv as ref_conv
from minireuse.reuse import cuda
from minireuse.reuse.common import use_pixel_aligned
from minireuse.reuse import matmul as ref_matmul

RUNNERS = [pytest.param("host", marks=pytest.mark.skipif(runtime.host_compiler() is None,
                                                          reason="no host C++ compiler for the kernels' host build")),
           pytest.param("gpu", marks=pytest.mark.skipif(not backend.gpu_available(),
                                                         reason="no usable GPU/cupy on this machine"))]

TIE = 1e-4          # relative distance of a projection to its threshold counted as a tie
ATOL, RTOL = 3e-4, 1e-4


@pytest.fixture(params=RUNNERS)
def layer(request):
    """The device layer of the runner: HostDevice (host build) or CupyDevice (GPU)."""
    if request.param == "gpu":
        yield cuda.device()
        return
    with cuda.using_device(cuda.HostDevice()) as d:
        yield d


@pytest.fixture
def xp(layer):
    """The runner's array module (numpy on the host runner, cupy on the GPU)."""
    return layer.xp


@pytest.fixture
def host_runner(layer):
    """The host runner's kernel runner (None on the GPU), restored after the test."""
    if layer.kind != "host":
        yield None
        return
    r = layer.runner
    saved = (r.schedule, r.reverse_blocks, r.max_blocks)
    yield r
    r.schedule, r.reverse_blocks, r.max_blocks = saved


def dev(xp, a):
    return xp.asarray(np.ascontiguousarray(a))


def host(a):
    return None if a is None else backend.asnumpy(a)


def close(got, want, what, atol=ATOL, rtol=RTOL):
    got, want = host(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= atol + rtol * np.abs(want)), f"{what}: max abs error {err.max():.3g}"


def same_partition(ids_a, ids_b):
    """Whether two (N, G) id arrays cluster the rows of every group identically (relabelling allowed)."""
    ids_a, ids_b = host(ids_a), host(ids_b)
    for g in range(ids_a.shape[1]):
        pairs = np.unique(np.stack([ids_a[:, g], ids_b[:, g]], 1), axis=0)
        if len(pairs) != len(np.unique(ids_a[:, g])) or len(pairs) != len(np.unique(ids_b[:, g])):
            return False
    return True


def as_singletons(ids):
    """ids with every -1 (overflow) replaced by a fresh singleton cluster, and n_clusters."""
    ids = host(ids).copy()
    n = np.empty(ids.shape[1], np.int32)
    for g in range(ids.shape[1]):
        col = ids[:, g]
        over = col < 0
        col[over] = col.max(initial=-1) + 1 + np.arange(over.sum())
        n[g] = col.max() + 1
    return ids.astype(np.int32), n


def margin(vectors, planes, offsets):
    """Smallest |projection - threshold| of vectors (N, G, L), relative to the RMS of the vectors.

    All-zero vectors (padding) are left out: their projection is exactly 0 in any order of summation.
    """
    proj = lsh.project(vectors.astype(np.float64), planes.astype(np.float64))
    scale = np.sqrt(np.mean(vectors.astype(np.float64) ** 2)) or 1.0
    gap = np.abs(proj - offsets.astype(np.float64)).min(-1)
    return gap[vectors.any(-1)].min(initial=np.inf) / scale


def hash_setup(config, G, scale, stats_vectors=None):
    """Planes and thresholds of config; 'centred' takes its statistics from stats_vectors (n, G, L),
    'pca' fits its planes to them."""
    if config.family == "pca":
        return lsh.pca_params(stats_vectors.astype(np.float32), config.H, config.shared_planes)
    planes, unit = lsh.draw_hash_params(config.L, config.H, G, config.seed, config.shared_planes)
    planes = planes.astype(np.float32)
    if config.family == "centred":
        mean, std = lsh.projection_stats(stats_vectors.astype(np.float32), planes)
        return planes, lsh.centred_offsets(unit.astype(np.float32), mean, std)
    return planes, lsh.offsets(unit, config.family, scale).astype(np.float32)


def untied(make, vectors_of, config, tries=60, distinct=False):
    """The first make(seed) whose neuron vectors have no projection tie under config.

    vectors_of(data) -> (neuron vectors (N, G, L), the array whose RMS scales the offsets[,
    the vectors whose projections centre the 'centred' thresholds (default: the neuron vectors)]).
    distinct: also require every vector of a group to have its own code.
    """
    for seed in range(tries):
        data = make(np.random.default_rng(seed))
        vectors, scale_source, *stats = vectors_of(data)
        planes, b = hash_setup(config, vectors.shape[1], np.sqrt(np.mean(scale_source.astype(np.float64) ** 2)),
                               stats[0] if stats else vectors)
        if margin(vectors, planes, b) <= TIE:
            continue
        if distinct and (clustering.assign_clusters(lsh.hash_codes(vectors, planes, b), 32)[1]
                         < vectors.shape[0]).any():
            continue
        return data
    raise AssertionError("could not draw tie-free test data")


def synchronize(xp):
    """Wait for the device (so the statistics of earlier calls have arrived)."""
    if hasattr(xp, "cuda"):
        xp.cuda.get_current_stream().synchronize()


def prototypes(rng, n, k, n_proto, noise_rows=0.1):
    """Rows drawn from a few random prototypes (real clusters), some rows unique."""
    protos = rng.standard_normal((n_proto, k)) * rng.uniform(0.5, 2.0, k) + rng.uniform(-0.5, 0.5, k)
    X = protos[rng.integers(0, n_proto, n)]
    unique = rng.random(n) < noise_rows
    X[unique] = rng.standard_normal((unique.sum(), k))
    return X.astype(np.float32)


def image(rng, b, h, w, c, n_colors=6):
    """NHWC image whose pixels come from a small palette (clusters), one pixel unique."""
    palette = rng.standard_normal((n_colors, c)) * 1.5 + rng.uniform(-0.3, 0.7, c)
    x = palette[rng.integers(0, n_colors, (b, h, w))]
    x[0, 0, -1] = rng.standard_normal(c)
    return x.astype(np.float32)


# ---------------------------------------------------------------- kernels one by one

def test_input_scale(xp):
    x = np.random.default_rng(1).standard_normal((1037, 53)).astype(np.float32) * 1.7 + 0.3
    close(cuda.input_scale(dev(xp, x)), lsh.input_scale(x), "scale", atol=0, rtol=1e-5)


@pytest.mark.parametrize("H", [1, 12, 20, 32, 33, 64])
@pytest.mark.parametrize("L,K,shared", [(16, 53, True), (7, 53, False), (8, 8, True), (500, 500, True)])
def test_hash_codes(xp, H, L, K, shared):
    """Fused projection + threshold + packing, incl. a padded last group and planes read from L1 (L=500)."""
    rng = np.random.default_rng(H * 1000 + L)
    X = (rng.standard_normal((301, K)) * rng.uniform(0.2, 3.0, K)).astype(np.float32)
    G = -(-K // L)
    planes, unit = lsh.draw_hash_params(L, H, G, 3, shared)
    planes, b = planes.astype(np.float32), (unit * 0.8).astype(np.float32)
    Xg = lsh.split_groups(X, L)
    want = lsh.hash_codes(Xg, planes, b)
    got = host(cuda.hash_rows(dev(xp, X), L, dev(xp, planes), dev(xp, b)))
    proj = lsh.project(Xg.astype(np.float64), planes.astype(np.float64))
    tied = (np.abs(proj - b.astype(np.float64)) < TIE * np.sqrt(np.mean(X.astype(np.float64) ** 2))).any(-1)
    assert tied.mean() < 0.03
    assert np.array_equal(got[~tied], want[~tied])
    assert got.dtype == want.dtype == (np.uint64 if H > 32 else np.uint32)
    assert H == 64 or (got < (1 << H)).all()


@pytest.mark.parametrize("pads,L", [((1, 2, 2, 0), 4), ((0, 0, 0, 0), 8), ((2, 2, 2, 2), 2)])
def test_hash_pixels(xp, pads, L):
    """Pixel-aligned hashing on the unpadded image: padding pixels hash as zero vectors."""
    x = image(np.random.default_rng(7), 3, 5, 6, 8)
    planes, unit = lsh.draw_hash_params(L, 12, 8 // L, 1, True)
    planes, b = planes.astype(np.float32), unit.astype(np.float32)
    want = lsh.hash_codes(ref_conv.pixel_vectors(x, pads, L), planes, b)
    got = cuda.hash_pixels(dev(xp, x), pads, L, dev(xp, planes), dev(xp, b))
    assert np.array_equal(host(got), want)


def _codes(rng, n, G, distinct):
    codes = rng.integers(0, distinct, size=(n, G)).astype(np.uint32)
    codes[:, 0] = np.where(codes[:, 0] % 2, 0xFFFFFFFF, 0)     # the extreme codes are ordinary keys
    return codes


@pytest.mark.parametrize("case", ["random", "single", "distinct"])
def test_assign_clusters(xp, case):
    rng = np.random.default_rng(3)
    n, G = 1001, 5
    codes = {"random": _codes(rng, n, G, 40),
             "single": np.full((n, G), 0xABCD, np.uint32),
             "distinct": (np.arange(n * G, dtype=np.uint32).reshape(n, G) * 2654435761).astype(np.uint32)}[case]
    want_ids, want_n = clustering.assign_clusters(codes, 32)
    ids, n_clusters = cuda.assign_codes(dev(xp, codes), capacity=n)
    assert same_partition(ids, want_ids)
    assert np.array_equal(host(n_clusters), want_n)
    assert (host(ids) >= 0).all() and (host(ids) < host(n_clusters)[None, :]).all()


def test_assign_clusters_of_64_bit_codes(xp):
    """Codes beyond 32 bits cluster by all their bits (codes equal in their low or their high
    half stay apart); the one code equal to the tables' empty key (all 64 bits set) is computed
    exactly (id -1) and not counted as a full table."""
    rng = np.random.default_rng(5)
    n, G = 513, 3
    low = rng.integers(0, 6, size=(n, G)).astype(np.uint64)
    high = rng.integers(0, 5, size=(n, G)).astype(np.uint64)
    codes = low | (high << np.uint64(40)) | np.uint64(1 << 63)
    codes[::7, 1] = np.uint64(0xFFFFFFFFFFFFFFFF)
    want_ids, want_n = clustering.assign_clusters(codes, 64)
    ids, n_clusters = cuda.assign_codes(dev(xp, codes), capacity=n)
    ids = host(ids)
    assert (ids[::7, 1] == -1).all() and (np.delete(ids, np.s_[::7], axis=0)[:, 1] >= 0).all()
    assert (ids[:, [0, 2]] >= 0).all()
    full = ids >= 0
    for g in range(G):
        assert same_partition(ids[full[:, g], g:g + 1], want_ids[full[:, g], g:g + 1])
    assert np.array_equal(host(n_clusters)[[0, 2]], want_n[[0, 2]])
    assert host(n_clusters)[1] == want_n[1] - 1        # the empty key's code was given no slot


def test_assign_clusters_overflow(xp):
    """Past capacity, whole clusters become id -1 (singletons); kept clusters are intact."""
    rng = np.random.default_rng(4)
    codes = _codes(rng, 777, 4, 50)
    want_ids, want_n = clustering.assign_clusters(codes, 32)
    ids, n_clusters = cuda.assign_codes(dev(xp, codes), capacity=7)
    ids = host(ids)
    assert np.array_equal(host(n_clusters), want_n)          # distinct codes, overflowed ones included
    assert (ids < 7).all() and (ids == -1).any()
    for g in range(4):
        kept = ids[:, g] >= 0
        assert len(np.unique(ids[kept, g])) == min(7, want_n[g])
        # each kept cluster is a whole reference cluster; every member of an overflowed code is -1
        assert same_partition(ids[kept, g:g + 1], want_ids[kept, g:g + 1])
        over_codes = np.unique(codes[~kept, g])
        assert not np.isin(codes[kept, g], over_codes).any()


def test_centroids(xp):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((513, 27)).astype(np.float32)
    ids, n_clusters = clustering.assign_clusters(_codes(rng, 513, 4, 30), 32)
    want_C, want_counts = clustering.centroids(lsh.split_groups(X, 7), ids, n_clusters)
    C, counts = cuda.centroid_rows(dev(xp, X), dev(xp, ids), 7, capacity=40)
    cm = want_C.shape[1]
    close(C[:, :cm], want_C, "centroids", atol=1e-5)
    assert C.dtype == np.float32                          # int32 counts must not promote the means
    assert np.array_equal(host(counts)[:, :cm], want_counts) and not host(counts)[:, cm:].any()
    assert not host(C)[:, cm:].any()


def test_centroid_pixels(xp):
    rng = np.random.default_rng(6)
    x = image(rng, 2, 5, 7, 6)
    pads = (1, 0, 2, 1)
    vec = ref_conv.pixel_vectors(x, pads, 3)
    ids, n_clusters = clustering.assign_clusters(_codes(rng, vec.shape[0], 2, 9), 32)
    want_C, want_counts = clustering.centroids(vec, ids, n_clusters)
    C, counts = cuda.centroid_pixels(dev(xp, x), pads, dev(xp, ids), 3, capacity=16)
    cm = want_C.shape[1]
    close(C[:, :cm], want_C, "pixel centroids", atol=1e-5)
    assert C.dtype == np.float32
    assert np.array_equal(host(counts)[:, :cm], want_counts)


def _assignment_with_overflow(rng, n, G, distinct, capacity):
    """Reference-style ids with the clusters >= capacity replaced by -1, and the counts."""
    ids, _ = clustering.assign_clusters(_codes(rng, n, G, distinct), 32)
    ids = np.where(ids < capacity, ids, -1).astype(np.int32)
    counts = np.stack([np.bincount(ids[ids[:, g] >= 0, g], minlength=capacity) for g in range(G)])
    return ids, counts.astype(np.int32)


@pytest.mark.parametrize("bias", [True, False])
def test_reconstruct(xp, bias):
    rng = np.random.default_rng(8)
    N, K, L, M, cap = 301, 30, 7, 37, 12
    G = -(-K // L)
    X = rng.standard_normal((N, K)).astype(np.float32)
    W = rng.standard_normal((K, M)).astype(np.float32)
    b = rng.standard_normal(M).astype(np.float32) if bias else None
    ids, counts = _assignment_with_overflow(rng, N, G, 15, cap)
    sums = np.zeros((G, cap, L), np.float32)
    Xg = lsh.split_groups(X, L)
    for g in range(G):
        np.add.at(sums[g], ids[ids[:, g] >= 0, g], Xg[ids[:, g] >= 0, g])
    P = (sums @ ref_matmul.group_weights(W, L)).astype(np.float32)
    want, _ = ref_matmul.reuse_matmul_forward_assigned(X, W, b, *as_singletons(ids), L)
    got = cuda.reconstruct_rows(dev(xp, P), dev(xp, ids), dev(xp, counts), dev(xp, X), dev(xp, W),
                           None if b is None else dev(xp, b), L)
    close(got, want, "y")


def test_cluster_sums_and_dx(xp):
    rng = np.random.default_rng(9)
    N, K, L, M, cap = 299, 30, 7, 37, 12
    G = -(-K // L)
    X = rng.standard_normal((N, K)).astype(np.float32)
    W = rng.standard_normal((K, M)).astype(np.float32)
    dy = rng.standard_normal((N, M)).astype(np.float32)
    dy[::4] = 0.0                                             # ReLU-like zero rows are skipped
    ids, counts = _assignment_with_overflow(rng, N, G, 15, cap)
    S, dW_over, db = cuda.cluster_sums_rows(dev(xp, dy), dev(xp, ids), dev(xp, counts), dev(xp, X), L)
    want_S = np.zeros((G, cap, M))
    want_dW = np.zeros((G * L, M))
    Xg = lsh.split_groups(X, L)
    for n in range(N):
        for g in range(G):
            if ids[n, g] >= 0:
                want_S[g, ids[n, g]] += dy[n] / counts[g, ids[n, g]]
            else:
                want_dW[g * L:(g + 1) * L] += np.outer(Xg[n, g], dy[n])
    close(S, want_S, "S / count")
    close(dW_over, want_dW, "overflow dW")
    close(db, dy.sum(0), "db")
    D = cuda.batched_gemm(S, dev(xp, ref_matmul.group_weights(W, L)), trans_b=True)
    got = cuda.dx_cluster_rows(D, dev(xp, ids), dev(xp, dy), dev(xp, W), L)
    want = (want_S @ ref_matmul.group_weights(W, L).transpose(0, 2, 1))
    want_dx = np.zeros((N, G * L))
    for n in range(N):
        for g in range(G):
            sl = slice(g * L, (g + 1) * L)
            want_dx[n, sl] = want[g, ids[n, g]] if ids[n, g] >= 0 else dy[n] @ ref_matmul.group_weights(W, L)[g].T
    close(got, want_dx[:, :K], "dX cluster")


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_batched_gemm(xp, trans_a, trans_b):
    rng = np.random.default_rng(10)
    a = rng.standard_normal((3, 19, 7) if trans_a else (3, 7, 19)).astype(np.float32)
    b = rng.standard_normal((3, 5, 19) if trans_b else (3, 19, 5)).astype(np.float32)
    want = (a.transpose(0, 2, 1) if trans_a else a) @ (b.transpose(0, 2, 1) if trans_b else b)
    got = cuda.batched_gemm(dev(xp, a), dev(xp, b), trans_a=trans_a, trans_b=trans_b)
    close(got, want, "gemm")
    acc = dev(xp, np.ones_like(want))
    cuda.batched_gemm(dev(xp, a), dev(xp, b), out=acc, trans_a=trans_a, trans_b=trans_b, beta=1.0)
    close(acc, want + 1, "gemm beta=1")


def test_wrappers_name_bad_arrays(xp, layer):
    X = dev(xp, np.ones((4, 6), np.float32))
    with pytest.raises(TypeError, match="X: expected dtype float32, got float64"):
        cuda.hash_rows(dev(xp, np.ones((4, 6))), 3, X, X)
    with pytest.raises(TypeError, match=f"X: expected a {layer.array_name}"):
        cuda.hash_rows([[1.0] * 6] * 4, 3, X, X)
    with pytest.raises(ValueError, match="X: expected a C-contiguous array"):
        cuda.hash_rows(X.T, 3, X, X)
    with pytest.raises(ValueError, match=r"planes: expected shape \(2, 3, \*\), got \(4, 6\)"):
        cuda.hash_rows(X, 3, X, X)
    with pytest.raises(TypeError, match="expected dtype float32"):
        cuda.cuda_reuse_matmul_forward(dev(xp, np.ones((4, 6))), X.T.copy(), None, ReuseConfig(), ReuseState())


# ---------------------------------------------------------------- whole products vs the reference

def _dense_data(config, n=203, k=30, m=11, bias=True, kind="protos"):
    def make(rng):
        X = {"protos": lambda: prototypes(rng, n, k, 6),
             "single": lambda: np.repeat(prototypes(rng, 1, k, 1, 0), n, 0),
             "random": lambda: (rng.standard_normal((n, k)) + 0.3).astype(np.float32),
             "distinct": lambda: (rng.standard_normal((n, k)) + 0.3).astype(np.float32)}[kind]()
        W = (rng.standard_normal((k, m)) / np.sqrt(k)).astype(np.float32)
        b = rng.standard_normal(m).astype(np.float32) if bias else None
        dy = rng.standard_normal((n, m)).astype(np.float32)
        dy[::5] = 0.0
        return X, W, b, dy

    return untied(make, lambda d: (lsh.split_groups(d[0], config.L), d[0]), config, distinct=kind == "distinct")


def _check_grads(got, want, what, scaled=False):
    """scaled: tolerances relative to the largest |value| (long float32 sums, e.g. dW over
    32k outputs, round at that scale)."""
    for name, g, w in zip(("dX", "dW", "db"), got, want):
        if w is None:
            assert g is None, f"{what} {name}: expected None"
        elif scaled:
            close(g, w, f"{what} {name}", atol=2e-5 * float(np.abs(w).max()), rtol=1e-4)
        else:
            close(g, w, f"{what} {name}")


DENSE_CONFIGS = [dict(L=4, H=10), dict(L=7, H=32, family="origin"), dict(L=5, H=1),
                 dict(L=6, H=12, shared_planes=False), dict(L=30, H=16),
                 # the options beyond the published method
                 dict(L=4, H=40), dict(L=7, H=64, family="origin"), dict(L=6, H=12, family="centred"),
                 dict(L=4, H=10, forward="exact"), dict(L=4, H=10, dw_sample=0.3),
                 dict(L=7, H=20, family="centred", forward="exact", dw_sample=0.5, shared_planes=False),
                 dict(L=6, H=12, family="pca"), dict(L=5, H=40, family="pca", shared_planes=False)]


@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
@pytest.mark.parametrize("fields", DENSE_CONFIGS, ids=str)
def test_dense_forward_backward(xp, fields, dx_mode):
    config = ReuseConfig(dx_mode=dx_mode, seed=5, **fields)
    X, W, b, dy = _dense_data(config, bias=fields["H"] != 32)
    ref_state, state = ReuseState(), ReuseState()
    want_y, want_cache = ref_matmul.reuse_matmul_forward(X, W, b, config, ref_state)
    y, cache = cuda.cuda_reuse_matmul_forward(dev(xp, X), dev(xp, W), None if b is None else dev(xp, b),
                                              config, state)
    close(y, want_y, "y")
    assert same_partition(cache.ids, want_cache.ids)
    assert np.array_equal(host(state.last["n_clusters"]), ref_state.last["n_clusters"])
    close(state.last["r_c"], ref_state.last["r_c"], "r_c", atol=1e-7, rtol=1e-6)
    _check_grads(cuda.cuda_reuse_matmul_backward(dev(xp, dy), cache),
                 ref_matmul.reuse_matmul_backward(dy, want_cache), "dense")


@pytest.mark.parametrize("kind", ["single", "distinct"])
def test_dense_extremes(xp, kind):
    """One cluster per group (all rows equal), and all rows distinct (H = 32: the exact product)."""
    config = ReuseConfig(L=10, H=32 if kind == "distinct" else 3, dx_mode="cluster", seed=2)
    X, W, b, dy = _dense_data(config, n=97, kind=kind)
    state = ReuseState()
    y, cache = cuda.cuda_reuse_matmul_forward(dev(xp, X), dev(xp, W), dev(xp, b), config, state)
    want_y, want_cache = ref_matmul.reuse_matmul_forward(X, W, b, config, ReuseState())
    close(y, want_y, f"{kind} y")
    assert same_partition(cache.ids, want_cache.ids)
    n_clusters = host(state.last["n_clusters"])
    if kind == "single":
        assert (n_clusters == 1).all()
    else:
        assert (n_clusters == X.shape[0]).all()
        close(y, X @ W + b, "all-distinct y vs exact")
    _check_grads(cuda.cuda_reuse_matmul_backward(dev(xp, dy), cache),
                 ref_matmul.reuse_matmul_backward(dy, want_cache), kind)


def _conv_data(config, b=3, h=9, w=7, c=8, m=13, kh=3, kw=3, stride=1, pads=(1, 1, 2, 0), bias=True):
    pixel = use_pixel_aligned(config, c)

    def make(rng):
        x = image(rng, b, h, w, c)
        W = (rng.standard_normal((kh, kw, c, m)) / np.sqrt(kh * kw * c)).astype(np.float32)
        bb = rng.standard_normal(m).astype(np.float32) if bias else None
        oh = (h + pads[0] + pads[1] - kh) // stride + 1
        ow = (w + pads[2] + pads[3] - kw) // stride + 1
        dy = rng.standard_normal((b, oh, ow, m)).astype(np.float32)
        return x, W, bb, dy

    def vectors(d):
        if pixel:
            return ref_conv.pixel_vectors(d[0], pads, config.L), d[0], d[0].reshape(-1, c // config.L, config.L)
        cols, _ = ref_im2col(d[0], kh, kw, stride, pads)
        return lsh.split_groups(cols, config.L), d[0]

    return untied(make, vectors, config), stride, pads


CONV_CASES = [
    ("pixel", dict(L=4, H=10), {}),
    ("pixel", dict(L=8, H=3), dict(stride=2, pads=(0, 1, 1, 1))),
    ("pixel", dict(L=2, H=32, pixel_aligned=True, shared_planes=False), dict(bias=False)),
    ("general", dict(L=5, H=20), {}),
    ("general", dict(L=4, H=7, pixel_aligned=False, family="origin"), dict(stride=2, pads=(0, 0, 1, 1))),
    ("general", dict(L=16, H=12, shared_planes=False), dict(kh=5, kw=5, pads=(2, 2, 2, 2))),
    # the options beyond the published method
    ("pixel", dict(L=4, H=48), {}),
    ("pixel", dict(L=4, H=12, family="centred"), {}),
    ("pixel", dict(L=4, H=10, forward="exact", dw_sample=0.25), dict(stride=2, pads=(0, 1, 1, 1))),
    ("general", dict(L=5, H=64, family="centred", forward="exact"), {}),
    ("general", dict(L=5, H=20, dw_sample=0.4), {}),
    ("pixel", dict(L=4, H=10, family="pca"), {}),
    ("general", dict(L=5, H=20, family="pca", forward="exact"), {}),
]


@pytest.mark.parametrize("path", ["pixel", "general", "dense"])
def test_dw_sample_residuals_stay_float32(xp, path):
    """float32 sums over int32 counts promote to float64: the correction GEMM would run in FP64
    (a small fraction of the float32 rate on many GPUs)."""
    config = ReuseConfig(L=4, H=10, dw_sample=0.5, seed=2, pixel_aligned=path == "pixel")
    if path == "dense":
        X, W, b, _ = _dense_data(config)
        _, cache = cuda.cuda_reuse_matmul_forward(dev(xp, X), dev(xp, W), dev(xp, b), config, ReuseState())
    else:
        (x, W, b, _), stride, pads = _conv_data(config)
        _, cache = cuda.cuda_reuse_conv_forward(dev(xp, x), dev(xp, W), dev(xp, b), stride, pads, config,
                                                ReuseState())
    correction = getattr(cache, "correction", None) or cache.matmul.correction
    assert correction.residual.dtype == np.float32


@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
@pytest.mark.parametrize("path,fields,geometry", CONV_CASES, ids=lambda v: str(v))
def test_conv_forward_backward(xp, path, fields, geometry, dx_mode):
    config = ReuseConfig(dx_mode=dx_mode, seed=4, **fields)
    (x, W, b, dy), stride, pads = _conv_data(config, **geometry)
    want_y, want_cache = conv2d_forward(x, W, b, stride, pads, config, ReuseState())
    state = ReuseState()
    y, cache = cuda.cuda_reuse_conv_forward(dev(xp, x), dev(xp, W), None if b is None else dev(xp, b),
                                            stride, pads, config, state)
    assert cache.kind == path == ("pixel" if want_cache[0] == "pixel" else "general")
    close(y, want_y, "y")
    ids = cache.ids if path == "pixel" else cache.matmul.ids
    want_ids = want_cache[1].pixel_ids if path == "pixel" else want_cache[1][4].ids
    assert same_partition(ids, want_ids)
    _check_grads(cuda.cuda_reuse_conv_backward(dev(xp, dy), cache),
                 conv2d_backward(dy, want_cache), f"{path} conv")


@pytest.mark.parametrize("family", ["centred", "pca"])
@pytest.mark.parametrize("pixel_aligned", [True, False])
def test_fitted_thresholds_follow_the_reference(xp, pixel_aligned, family):
    """'centred' and 'pca' on unclustered data far from the origin: every code depends on where
    the thresholds lie (the pixel path's statistics and fit skip the zero padding, the general
    path's include the im2col rows' padding, as on the reference path)."""
    config = ReuseConfig(L=4, H=6, family=family, seed=1, pixel_aligned=pixel_aligned)
    pads = (2, 1, 1, 2)

    def make(rng):
        x = (rng.standard_normal((2, 5, 6, 8)) * 0.5 + rng.uniform(1.5, 2.5, 8)).astype(np.float32)
        return x, (rng.standard_normal((3, 3, 8, 5)) / 6).astype(np.float32)

    def vectors(d):
        if pixel_aligned:
            return ref_conv.pixel_vectors(d[0], pads, 4), d[0], d[0].reshape(-1, 2, 4)
        return lsh.split_groups(ref_im2col(d[0], 3, 3, 1, pads)[0], 4), d[0]

    x, W = untied(make, vectors, config)
    _, want = conv2d_forward(x, W, None, 1, pads, config, ReuseState())
    _, cache = cuda.cuda_reuse_conv_forward(dev(xp, x), dev(xp, W), None, 1, pads, config, ReuseState())
    ids, want_ids = (cache.ids, want[1].pixel_ids) if pixel_aligned else (cache.matmul.ids, want[1][4].ids)
    assert sum(len(np.unique(col)) for col in host(ids).T) > 10
    assert same_partition(ids, want_ids)


def _force_capacity(state, key, rows, H, capacity):
    cuda.cuda_state(state).tracker(key, rows, H).capacity = capacity
    return cuda.cuda_state(state).tracker(key, rows, H)


def _overflow_via(tracker, via):
    """via 'gemm': the last statistics showed overflow, so the backward takes the overflow
    members' dW in one GEMM; 'atomics': the kernels add it element by element."""
    if via == "gemm":
        tracker.last = np.array([0, 0, 1, 0], np.int32)


@pytest.mark.parametrize("via", ["atomics", "gemm"])
@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_dense_overflow_is_exact(xp, dx_mode, via):
    """Capacity far too small: overflowed members are singletons, results match that assignment."""
    config = ReuseConfig(L=4, H=12, dx_mode=dx_mode, seed=1)
    X, W, b, dy = _dense_data(config, n=211, kind="random")
    state = ReuseState()
    G = -(-X.shape[1] // 4)
    _overflow_via(_force_capacity(state, ("rows", X.shape[0], G, 4, 12), X.shape[0], 12, 3), via)
    y, cache = cuda.cuda_reuse_matmul_forward(dev(xp, X), dev(xp, W), dev(xp, b), config, state)
    assert cache.overflow_gemm == (via == "gemm")
    assert cache.counts.shape[1] == 3 and int(host(state.last["overflow"])) > 0
    ids, n_clusters = as_singletons(cache.ids)
    want_y, want_cache = ref_matmul.reuse_matmul_forward_assigned(X, W, b, ids, n_clusters, 4, dx_mode)
    close(y, want_y, "overflow y")
    _check_grads(cuda.cuda_reuse_matmul_backward(dev(xp, dy), cache),
                 ref_matmul.reuse_matmul_backward(dy, want_cache), "overflow dense")


@pytest.mark.parametrize("via", ["atomics", "gemm"])
@pytest.mark.parametrize("path", ["pixel", "general", "dense"])
def test_full_dw_sample_with_overflow_is_the_exact_dW(xp, path, via):
    """dw_sample 1 completes the centroid dW to the exact X^T dY, also where members overflowed
    (computed exactly already: their residual must count zero, not x - a wrong centroid)."""
    if path == "dense":
        config = ReuseConfig(L=4, H=12, seed=1, dw_sample=1.0)
        X, W, b, dy = _dense_data(config, n=211, kind="random")
        state = ReuseState()
        _overflow_via(_force_capacity(state, ("rows", 211, -(-X.shape[1] // 4), 4, 12), 211, 12, 3), via)
        _, cache = cuda.cuda_reuse_matmul_forward(dev(xp, X), dev(xp, W), dev(xp, b), config, state)
        dW = cuda.cuda_reuse_matmul_backward(dev(xp, dy), cache)[1]
        want = X.astype(np.float64).T @ dy
    else:
        config = ReuseConfig(L=4, H=16, seed=3, dw_sample=1.0, pixel_aligned=path == "pixel")
        (x, W, b, dy), stride, pads = _conv_data(config)
        state = ReuseState()
        B, h, w, c = x.shape
        hp, wp = h + pads[0] + pads[1], w + pads[2] + pads[3]
        rows = B * hp * wp if path == "pixel" else B * (hp - 2) * (wp - 2)
        key = ("pixels", rows, c // 4, 4, 16) if path == "pixel" else ("rows", rows, 9 * c // 4, 4, 16)
        _overflow_via(_force_capacity(state, key, rows, 16, 2), via)
        _, cache = cuda.cuda_reuse_conv_forward(dev(xp, x), dev(xp, W), dev(xp, b), stride, pads, config, state)
        dW = cuda.cuda_reuse_conv_backward(dev(xp, dy), cache)[1].reshape(-1, W.shape[3])
        cols, _ = ref_im2col(x.astype(np.float64), 3, 3, stride, pads)
        want = cols.T @ dy.reshape(-1, W.shape[3])
    assert int(host(state.last["overflow"])) > 0
    close(dW, want, f"{path} dW", atol=1e-4 * float(np.abs(want).max()), rtol=1e-4)


@pytest.mark.parametrize("via", ["atomics", "gemm"])
@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
@pytest.mark.parametrize("path", ["pixel", "general"])
def test_conv_overflow_is_exact(xp, path, dx_mode, via):
    fields = dict(L=4, H=16) if path == "pixel" else dict(L=5, H=16)
    config = ReuseConfig(dx_mode=dx_mode, seed=3, **fields)
    (x, W, b, dy), stride, pads = _conv_data(config)
    state = ReuseState()
    B, h, w, c = x.shape
    if path == "pixel":
        rows = B * (h + pads[0] + pads[1]) * (w + pads[2] + pads[3])
        key = ("pixels", rows, c // 4, 4, 16)
    else:
        oh, ow = (h + pads[0] + pads[1] - 3) // stride + 1, (w + pads[2] + pads[3] - 3) // stride + 1
        rows = B * oh * ow
        key = ("rows", rows, -(-9 * c // 5), 5, 16)
    _overflow_via(_force_capacity(state, key, rows, 16, 2), via)
    y, cache = cuda.cuda_reuse_conv_forward(dev(xp, x), dev(xp, W), dev(xp, b), stride, pads, config, state)
    assert (cache.overflow_gemm if path == "pixel" else cache.matmul.overflow_gemm) == (via == "gemm")
    assert int(host(state.last["overflow"])) > 0
    if path == "pixel":
        ids, n_clusters = as_singletons(cache.ids)
        want_y, inner = ref_conv.pixel_conv_forward_assigned(x, W, b, stride, pads, ids, n_clusters, 4, dx_mode)
        want_cache = ("pixel", inner)
    else:
        cols, (oh, ow) = ref_im2col(x, 3, 3, stride, pads)
        ids, n_clusters = as_singletons(cache.matmul.ids)
        want_y, inner = ref_matmul.reuse_matmul_forward_assigned(cols, W.reshape(-1, W.shape[3]), b, ids,
                                                                 n_clusters, 5, dx_mode)
        want_y = want_y.reshape(B, oh, ow, -1)
        want_cache = ("general", (x.shape, W.shape, stride, pads, inner))
    close(y, want_y, f"{path} overflow y")
    _check_grads(cuda.cuda_reuse_conv_backward(dev(xp, dy), cache),
                 conv2d_backward(dy, want_cache), f"{path} overflow")


def test_capacity_grows_after_overflow(xp):
    """Statistics read one call later grow the tables until nothing overflows; results never change."""
    config = ReuseConfig(L=4, H=12, seed=1)
    X, W, b, _ = _dense_data(config, n=211, kind="random")
    state = ReuseState()
    key = ("rows", X.shape[0], -(-X.shape[1] // 4), 4, 12)
    tracker = _force_capacity(state, key, X.shape[0], 12, 3)
    args = (dev(xp, X), dev(xp, W), dev(xp, b), config, state)
    cuda.cuda_reuse_matmul_forward(*args)
    capacities, overflows = [], []
    for _ in range(3):
        synchronize(xp)
        y, cache = cuda.cuda_reuse_matmul_forward(*args)
        capacities.append(cache.counts.shape[1])
        overflows.append(int(host(state.last["overflow"])))
    assert capacities == sorted(capacities) and capacities[0] > 3
    assert overflows[-1] == 0 and capacities[-1] == tracker.capacity
    close(y, ref_matmul.reuse_matmul_forward(X, W, b, config, ReuseState())[0], "y once nothing overflows")


def test_launch_counts(xp, monkeypatch):
    """A forward + backward issues a fixed, small number of kernel launches (cuBLAS not counted)."""
    launched = []
    real = cuda.device().launch
    monkeypatch.setattr(cuda.device(), "launch", lambda name, *a, **k: (launched.append(name), real(name, *a, **k)))
    config = ReuseConfig(L=4, H=10, dx_mode="cluster", seed=4)
    (x, W, b, dy), stride, pads = _conv_data(config)
    state = ReuseState()
    args = (dev(xp, x), dev(xp, W), dev(xp, b), stride, pads, config, state)
    cuda.cuda_reuse_conv_forward(*args)      # the call site's first call calibrates: one more hash
    assert launched == ["input_rms", "hash_rows_h16", "hash_rows_h16", "centroid_sums", "reconstruct_pixels"]
    launched.clear()
    y, cache = cuda.cuda_reuse_conv_forward(*args)
    assert launched == ["input_rms", "hash_rows_h16", "centroid_sums", "reconstruct_pixels"]
    launched.clear()
    cuda.cuda_reuse_conv_backward(dev(xp, dy), cache)
    assert launched == ["cluster_sums_pixels", "dx_cluster_pixels"]


@pytest.mark.parametrize("path", ["pixel", "general", "dense"])
def test_forward_backward_capture_into_cuda_graph(xp, path):
    """No host synchronisation: stream capture fails on any device-to-host wait."""
    if not hasattr(xp, "cuda"):
        pytest.skip("CUDA graphs exist on the GPU only")
    config = ReuseConfig(L=4 if path != "general" else 5, H=12, dx_mode="cluster", seed=6)
    state = ReuseState()
    if path == "dense":
        X, W, b, dy = (dev(xp, a) for a in _dense_data(config))

        def step():
            y, cache = cuda.cuda_reuse_matmul_forward(X, W, b, config, state)
            return (y,) + cuda.cuda_reuse_matmul_backward(dy, cache)
    else:
        (x, W, b, dy), stride, pads = _conv_data(config)
        x, W, b, dy = (dev(xp, a) for a in (x, W, b, dy))

        def step():
            y, cache = cuda.cuda_reuse_conv_forward(x, W, b, stride, pads, config, state)
            return (y,) + cuda.cuda_reuse_conv_backward(dy, cache)

    for _ in range(3):                       # compile, size the capacity, settle it
        eager = [host(a) for a in step()]
        xp.cuda.Stream.null.synchronize()
    stream = xp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            outputs = step()
        finally:
            graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    for name, got, want in zip(("y", "dx", "dW", "db"), outputs, eager):
        close(got, want, f"graph {name}")


# ---------------------------------------------------------------- settings, grids, schedules, capacity

def _conv_case(xp, config, **geometry):
    (x, W, b, dy), stride, pads = _conv_data(config, **geometry)
    return (x, W, b, dy), stride, pads, tuple(None if a is None else dev(xp, a) for a in (x, W, b, dy))


def _check_conv_against_reference(xp, config, data, stride, pads, on_device, what):
    x, W, b, dy = data
    want_y, want_cache = conv2d_forward(x, W, b, stride, pads, config, ReuseState())
    y, cache = cuda.cuda_reuse_conv_forward(*on_device[:3], stride, pads, config, ReuseState())
    close(y, want_y, f"{what} y")
    _check_grads(cuda.cuda_reuse_conv_backward(on_device[3], cache),
                 conv2d_backward(dy, want_cache), what)


@pytest.mark.slow
@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_production_setting_against_the_reference(xp, dx_mode):
    """conv2 of CifarNet as trained: batch 128, 16x16x64 input, 5x5, 64 out, L=64 H=32, pixel path."""
    config = ReuseConfig(L=64, H=32, dx_mode=dx_mode, seed=0)
    (x, W, b, dy), stride, pads = _conv_data(config, b=128, h=16, w=16, c=64, m=64, kh=5, kw=5,
                                             pads=(2, 2, 2, 2))
    dy[:, ::3] = 0.0                                      # ReLU-like zeros after the layer
    state = ReuseState()
    y, cache = cuda.cuda_reuse_conv_forward(dev(xp, x), dev(xp, W), dev(xp, b), stride, pads, config, state)
    assert cache.kind == "pixel"
    want_y, want_cache = conv2d_forward(x, W, b, stride, pads, config, ReuseState())
    close(y, want_y, "y")
    assert same_partition(cache.ids, want_cache[1].pixel_ids)
    _check_grads(cuda.cuda_reuse_conv_backward(dev(xp, dy), cache), conv2d_backward(dy, want_cache),
                 "production conv", scaled=True)


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("path", ["pixel", "general", "dense"])
def test_grid_stride_loops_with_one_or_two_blocks(xp, layer, blocks, path):
    """Every grid-stride launch limited to 1 or 2 blocks: each thread's loop runs many times."""
    runner = layer.runner
    saved = runner.max_blocks
    runner.max_blocks = blocks
    try:
        if path == "dense":
            config = ReuseConfig(L=4, H=10, dx_mode="cluster", seed=5)
            X, W, b, dy = _dense_data(config, n=517)
            want_y, want_cache = ref_matmul.reuse_matmul_forward(X, W, b, config, ReuseState())
            y, cache = cuda.cuda_reuse_matmul_forward(dev(xp, X), dev(xp, W), dev(xp, b), config, ReuseState())
            close(y, want_y, "dense y")
            _check_grads(cuda.cuda_reuse_matmul_backward(dev(xp, dy), cache),
                         ref_matmul.reuse_matmul_backward(dy, want_cache), "dense")
            return
        config = ReuseConfig(L=4 if path == "pixel" else 5, H=12, dx_mode="cluster", seed=4)
        data, stride, pads, on_device = _conv_case(xp, config, b=5, h=11, w=9)
        _check_conv_against_reference(xp, config, data, stride, pads, on_device, f"{path} ({blocks} blocks)")
    finally:
        runner.max_blocks = saved


@pytest.mark.parametrize("schedule,reverse_blocks", [("forward", False), ("reverse", True), ("concurrent", True)])
def test_results_do_not_depend_on_thread_or_block_order(xp, host_runner, schedule, reverse_blocks):
    """Host runner only: serial thread orders and blocks run last to first give the same products."""
    if host_runner is None:
        pytest.skip("thread and block order are chosen on the host runner only")
    host_runner.schedule, host_runner.reverse_blocks = schedule, reverse_blocks
    for path, fields in (("pixel", dict(L=4, H=10)), ("general", dict(L=5, H=20))):
        config = ReuseConfig(dx_mode="cluster", seed=4, **fields)
        data, stride, pads, on_device = _conv_case(xp, config)
        _check_conv_against_reference(xp, config, data, stride, pads, on_device, f"{path} {schedule}")


def test_evaluation_forward(xp):
    """train=False: no cache, the same y, statistics recorded as evaluation, its own capacity."""
    config = ReuseConfig(L=4, H=10, seed=4)
    data, stride, pads, on_device = _conv_case(xp, config)
    state = ReuseState()
    y_train, cache = cuda.cuda_reuse_conv_forward(*on_device[:3], stride, pads, config, state)
    y_eval, none = cuda.cuda_reuse_conv_forward(*on_device[:3], stride, pads, config, state, train=False)
    assert none is None and cache is not None
    close(y_eval, host(y_train), "eval y", atol=1e-6, rtol=1e-6)
    assert len(state.stats) == 1 and len(state.eval_stats) == 1
    trackers = cuda.cuda_state(state).trackers
    assert sorted(k[-1] for k in trackers) == ["eval", "train"]
    assert state.pop_stats(train=False)["calls"] == 1 and state.pop_stats()["calls"] == 1


@pytest.mark.parametrize("forward", ["reuse", "exact"])
@pytest.mark.parametrize("pixel_aligned", [True, False])
@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_measure_error_matches_the_reference(xp, forward, pixel_aligned, dx_mode):
    """rel_error of the forward (0 for forward 'exact'), dw_cos and dw_gain of the backward, and
    dx_cos and dx_gain of a clustered dx, as the reference records them."""
    config = ReuseConfig(L=4, H=8, seed=4, measure_error=True, forward=forward, pixel_aligned=pixel_aligned,
                         dx_mode=dx_mode)
    data, stride, pads, on_device = _conv_case(xp, config)
    ref_state, state = ReuseState(), ReuseState()
    _, want_cache = conv2d_forward(*data[:3], stride, pads, config, ref_state)
    _, cache = cuda.cuda_reuse_conv_forward(*on_device[:3], stride, pads, config, state)
    err = float(host(state.last["rel_error"]))
    assert (err == 0) if forward == "exact" else (0 < err < 1)
    assert err == pytest.approx(float(ref_state.last["rel_error"]), rel=1e-4, abs=1e-7)
    conv2d_backward(data[3], want_cache)
    cuda.cuda_reuse_conv_backward(on_device[3], cache)
    dw_cos = float(host(state.last["dw_cos"]))
    assert 0.5 < dw_cos < 1 - 1e-6
    assert dw_cos == pytest.approx(float(ref_state.last["dw_cos"]), rel=1e-5)
    measures = ("dw_gain", "dx_cos", "dx_gain") if dx_mode == "cluster" else ("dw_gain",)
    for key in measures:
        assert float(host(state.last[key])) == pytest.approx(float(ref_state.last[key]), rel=1e-4), key
    assert ("dx_cos" in state.last) == ("dx_cos" in ref_state.last) == (dx_mode == "cluster")


@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_all_zero_dy(xp, dx_mode):
    config = ReuseConfig(L=4, H=10, dx_mode=dx_mode, seed=4)
    data, stride, pads, on_device = _conv_case(xp, config)
    _, cache = cuda.cuda_reuse_conv_forward(*on_device[:3], stride, pads, config, ReuseState())
    dx, dW, db = cuda.cuda_reuse_conv_backward(xp.zeros_like(on_device[3]), cache)
    for name, g in (("dx", dx), ("dW", dW), ("db", db)):
        assert not host(g).any(), f"{name} of a zero dy is not zero"


@pytest.mark.parametrize("via", ["atomics", "gemm"])
@pytest.mark.parametrize("dx_mode", ["exact", "cluster"])
def test_pixel_overflow_with_stride_two(xp, dx_mode, via):
    """Overflow on the pixel path where outputs skip pixels (stride 2, uneven padding)."""
    config = ReuseConfig(L=4, H=16, dx_mode=dx_mode, seed=3)
    (x, W, b, dy), stride, pads = _conv_data(config, stride=2, pads=(0, 1, 1, 1))
    state = ReuseState()
    B, h, w, c = x.shape
    rows = B * (h + 1) * (w + 2)
    _overflow_via(_force_capacity(state, ("pixels", rows, c // 4, 4, 16), rows, 16, 2), via)
    y, cache = cuda.cuda_reuse_conv_forward(dev(xp, x), dev(xp, W), dev(xp, b), stride, pads, config, state)
    assert cache.overflow_gemm == (via == "gemm")
    assert int(host(state.last["overflow"])) > 0
    ids, n_clusters = as_singletons(cache.ids)
    want_y, inner = ref_conv.pixel_conv_forward_assigned(x, W, b, stride, pads, ids, n_clusters, 4, dx_mode)
    close(y, want_y, "stride-2 overflow y")
    _check_grads(cuda.cuda_reuse_conv_backward(dev(xp, dy), cache),
                 conv2d_backward(dy, ("pixel", inner)), "stride-2 overflow")


def test_full_tables_compute_their_rows_exactly(xp, monkeypatch):
    """A code that finds no free slot within the probe limit gets no cluster (id -1): its rows
    are computed exactly, the statistics count them, and the next capacity at least doubles."""
    monkeypatch.setattr(cuda.lsh, "PROBE_LIMIT", 1)
    config = ReuseConfig(L=4, H=12, dx_mode="cluster", seed=1)
    X, W, b, dy = _dense_data(config, n=211, kind="random")
    state = ReuseState()
    G = -(-X.shape[1] // 4)
    tracker = _force_capacity(state, ("rows", X.shape[0], G, 4, 12), X.shape[0], 12, 256)   # > the rows
    y, cache = cuda.cuda_reuse_matmul_forward(dev(xp, X), dev(xp, W), dev(xp, b), config, state)
    exact_pairs = int(host(state.last["overflow"]))
    synchronize(xp)
    tracker.poll()
    full = int(tracker.last[cuda.STAT_TABLE_FULL])
    assert full > 0 and tracker.capacity == min(cuda.round_capacity(2 * 256 * 1.25, 10 ** 9), tracker.limit)
    # no capacity overflow is possible here: every pair computed exactly found its table full
    assert exact_pairs == full == int((host(cache.ids) == -1).sum())
    ids, n_clusters = as_singletons(cache.ids)
    want_y, want_cache = ref_matmul.reuse_matmul_forward_assigned(X, W, b, ids, n_clusters, 4, "cluster")
    close(y, want_y, "table-full y")
    _check_grads(cuda.cuda_reuse_matmul_backward(dev(xp, dy), cache),
                 ref_matmul.reuse_matmul_backward(dy, want_cache), "table-full")


def test_first_call_calibrates_the_capacity(xp):
    config = ReuseConfig(L=4, H=12, seed=1)
    X, W, b, _ = _dense_data(config, n=211, kind="random")
    state = ReuseState()
    _, cache = cuda.cuda_reuse_matmul_forward(dev(xp, X), dev(xp, W), dev(xp, b), config, state)
    need = int(host(state.last["n_clusters"]).max())
    assert cache.counts.shape[1] == cuda.round_capacity(need * cuda.CapacityTracker.HEADROOM, X.shape[0])
    assert int(host(state.last["overflow"])) == 0


@pytest.mark.parametrize("lag", [1, 3, 8])
def test_capacity_adapts_while_the_device_runs_behind(lag):
    """Host runner with statistics landing `lag` calls late: capacity still grows (it used to
    poll only the newest call's copy, which is never done while the device lags)."""
    if runtime.host_compiler() is None:
        pytest.skip("no host C++ compiler")
    config = ReuseConfig(L=4, H=12, seed=1)
    X, W, b, _ = _dense_data(config, n=211, kind="random")
    with cuda.using_device(cuda.HostDevice(lag=lag)):
        state = ReuseState()
        tracker = _force_capacity(state, ("rows", X.shape[0], -(-X.shape[1] // 4), 4, 12), X.shape[0], 12, 3)
        capacities = []
        for _ in range(lag + 3):
            _, cache = cuda.cuda_reuse_matmul_forward(X, W, b, config, state)
            capacities.append(cache.counts.shape[1])
    assert capacities[:lag + 1] == [3] * (lag + 1)          # nothing has landed yet
    assert capacities[lag + 1] > 3 and int(state.last["overflow"]) == 0
    assert tracker.capacity == capacities[-1]


class CapturingHostDevice(cuda.HostDevice):
    """The host runner inside backend.capturing(): the fast path sees a recording in progress."""

    def capturing(self):
        return backend.is_capturing()


@pytest.mark.parametrize("ends_well", [False, True])
def test_a_call_site_counts_as_captured_only_once_its_recording_ended_well(ends_well):
    """A failed recording (graph 'auto' then runs eagerly) is never replayed: a later replay of
    another graph must not make its call site read statistics nobody wrote."""
    if runtime.host_compiler() is None:
        pytest.skip("no host C++ compiler")
    config = ReuseConfig(L=4, H=12, seed=1)
    X, W, b, _ = _dense_data(config, n=64, kind="random")
    with cuda.using_device(CapturingHostDevice()):
        state = ReuseState()
        cuda.cuda_reuse_matmul_forward(X, W, b, config, state)            # calibrates, eagerly
        tracker = next(iter(cuda.cuda_state(state).trackers.values()))
        with backend.capturing() as capture:
            cuda.cuda_reuse_matmul_forward(X, W, b, config, state)
            assert not tracker.captured
            if ends_well:
                capture.succeeded()
    assert tracker.captured == ends_well


def _capture(xp, fn):
    """(graph, outputs, pool) of fn() captured on a new stream; everything it allocates comes
    from a private pool kept with the graph (as training/graphs.py does), so eager work cannot reuse
    addresses the graph writes."""
    pool = xp.cuda.MemoryPool()
    stream = xp.cuda.Stream(non_blocking=True)
    xp.cuda.Stream.null.synchronize()
    with stream, xp.cuda.using_allocator(pool.malloc):
        stream.begin_capture()
        try:
            outputs = fn()
        finally:
            graph = stream.end_capture()
    return graph, outputs, pool, stream


def test_captured_graph_replayed_on_new_inputs(xp):
    """GPU: a captured forward + backward (error measured inside) replayed twice on new inputs
    equals eager calls on those inputs."""
    if not hasattr(xp, "cuda"):
        pytest.skip("CUDA graphs exist on the GPU only")
    config = ReuseConfig(L=4, H=12, dx_mode="cluster", seed=6, measure_error=True)
    (x, W, b, dy), stride, pads = _conv_data(config)
    W_d, b_d, dy_d = dev(xp, W), dev(xp, b), dev(xp, dy)
    x_static = dev(xp, x)
    state = ReuseState()
    cuda.cuda_reuse_conv_forward(x_static, W_d, b_d, stride, pads, config, state)       # calibrate

    def step():
        y, cache = cuda.cuda_reuse_conv_forward(x_static, W_d, b_d, stride, pads, config, state)
        return (y,) + cuda.cuda_reuse_conv_backward(dy_d, cache) + (state.last["rel_error"],)

    graph, outputs, pool, stream = _capture(xp, step)
    for k in (1, 2):
        xk = (x * (1 + 0.25 * k)).astype(np.float32)      # thresholds scale with the RMS: same clusters
        x_static[...] = dev(xp, xk)
        xp.cuda.Stream.null.synchronize()               # the capture stream does not wait for it
        with stream:
            graph.launch(stream)
        stream.synchronize()
        y, cache = cuda.cuda_reuse_conv_forward(dev(xp, xk), W_d, b_d, stride, pads, config, ReuseState())
        eager = (y,) + cuda.cuda_reuse_conv_backward(dy_d, cache)
        for name, got, want in zip(("y", "dx", "dW", "db"), outputs, eager):
            close(got, host(want), f"replay {k} {name}")
        assert 0 < float(host(outputs[-1])) < 1


def test_replays_feed_their_statistics_back(xp):
    """GPU: a graph captured with too small a capacity overflows on every replay; after_replay
    reads the statistics the replay copied back and the capacity grows (it used to stay frozen
    until an eager step)."""
    if not hasattr(xp, "cuda"):
        pytest.skip("CUDA graphs exist on the GPU only")
    config = ReuseConfig(L=4, H=12, seed=6)
    X, W, b, _ = (dev(xp, a) for a in _dense_data(config, n=211, kind="random"))
    state = ReuseState()
    cuda.cuda_reuse_matmul_forward(X, W, b, config, state)
    tracker = next(iter(cuda.cuda_state(state).trackers.values()))
    tracker.capacity = 32
    xp.cuda.Stream.null.synchronize()
    tracker.poll()                                      # nothing new: the eager call's stats are applied
    tracker.capacity = 32
    graph, outputs, pool, stream = _capture(xp, lambda: cuda.cuda_reuse_matmul_forward(X, W, b, config, state))
    assert tracker.captured and tracker.capacity == 32
    with stream:
        graph.launch(stream)
        state.after_replay(X.shape[0])
    stream.synchronize()
    tracker.poll()
    assert tracker.last[cuda.STAT_OVERFLOW] > 0 and tracker.capacity > 32


@pytest.mark.parametrize("impl", ["reference", "cuda"])
@pytest.mark.parametrize("kind", ["pixel", "general", "dense"])
def test_a_first_layer_with_reuse_computes_no_input_gradient(xp, impl, kind):
    """needs_input_grad False (the model's first layer): the reuse backward skips dx as the exact
    layer does, and dW is the same."""
    from minireuse.layers import Conv2D, Dense
    config = ReuseConfig(L=4, H=10, dx_mode="cluster", seed=4, pixel_aligned=kind == "pixel", impl=impl)
    rng = np.random.default_rng(8)
    if kind == "dense":
        layer, x = Dense(12, 5, rng=rng), rng.standard_normal((40, 12))
    else:
        layer, x = Conv2D(8, 5, 3, padding="same", rng=rng), rng.standard_normal((2, 6, 5, 8))
    layer.set_reuse(config)
    dy = rng.standard_normal(layer.output_shape(x.shape)).astype(np.float32)
    grads = []
    for needs in (True, False):
        layer.needs_input_grad = needs
        layer.forward(dev(xp, x.astype(np.float32)))
        dx = layer.backward(dev(xp, dy))
        assert (dx is None) == (not needs)
        grads.append(host(layer.grads["W"]))
    assert layer.reuse_state.last["impl"] == ("cuda" if impl == "cuda" else "numpy-reference")
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-5)


def test_conv_layer_runs_the_fast_path(xp):
    """Conv2D with impl 'cuda' runs the fast path (on the host build inside using_device) and
    trains like the reference path on the same data."""
    from minireuse.layers import Conv2D
    config = ReuseConfig(L=4, H=10, dx_mode="cluster", seed=4)
    (x, W, b, dy), stride, pads = _conv_data(config, pads=(1, 1, 1, 1))
    outs = {}
    for impl in ("reference", "cuda"):
        layer = Conv2D(8, 13, 3, padding="same", rng=np.random.default_rng(0))
        layer.params["W"], layer.params["b"] = dev(xp, W), dev(xp, b)
        layer.set_reuse(config.replace(impl=impl))
        y = layer.forward(dev(xp, x))
        dx = layer.backward(dev(xp, dy))
        outs[impl] = (y, dx, layer.grads["W"], layer.grads["b"])
        assert (layer.reuse_state.last["impl"] == "cuda") == (impl == "cuda")
    for name, got, want in zip(("y", "dx", "dW", "db"), outs["cuda"], outs["reference"]):
        close(got, host(want), f"layer {name}")
