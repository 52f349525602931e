"""Hashing: parameters drawn from a seed, bit packing, groups, families."""
import numpy as np
import pytest

from minireuse import backend
from minireuse.reuse import ReuseConfig, ReuseState, assign_clusters, lsh
from minireuse.reuse.matmul import hash_groups


@pytest.fixture
def xp(device):
    """The array module of the device under test (conftest parametrizes cpu/gpu)."""
    return device


def random_groups(xp, n=500, g=3, L=8, seed=0):
    rng = np.random.default_rng(seed)
    return xp.asarray(rng.standard_normal((n, g, L)) + 0.3)


def codes_of(xp, Xg, H, family="offset", seed=0, shared=True):
    config = ReuseConfig(L=Xg.shape[2], H=H, family=family, seed=seed, shared_planes=shared)
    return hash_groups(Xg, config, ReuseState(), Xg)


def test_hash_params_follow_the_contract():
    planes, offsets = lsh.draw_hash_params(L=4, H=3, G=5, seed=7, shared=False)
    rng = np.random.default_rng(7)
    np.testing.assert_array_equal(planes, rng.normal(0.0, 0.5, size=(5, 4, 3)))
    np.testing.assert_array_equal(offsets, rng.normal(0.0, 1.0, size=(5, 3)))
    shared, _ = lsh.draw_hash_params(L=4, H=3, G=5, seed=7, shared=True)
    assert shared.shape == (1, 4, 3)


def test_codes_stable_for_a_seed_and_different_across_seeds(xp):
    Xg = random_groups(xp)
    a, b = codes_of(xp, Xg, 12, seed=1), codes_of(xp, Xg, 12, seed=1)
    c = codes_of(xp, Xg, 12, seed=2)
    assert a.dtype == np.uint32 and a.shape == (500, 3)
    assert bool((a == b).all())
    assert float((a != c).mean()) > 0.5


@pytest.mark.parametrize("family", ["offset", "origin"])
def test_every_bit_is_used_on_random_data(xp, family):
    H = 16
    codes = backend.asnumpy(codes_of(xp, random_groups(xp, n=2000), H, family=family)).astype(np.int64)
    bits = (codes[..., None] >> np.arange(H)) & 1
    share_set = bits.reshape(-1, H).mean(axis=0)
    assert ((share_set > 0) & (share_set < 1)).all(), share_set


def test_codes_are_the_bits_of_the_projections(xp):
    Xg = random_groups(xp, n=50, g=2, L=5)
    planes, unit = lsh.draw_hash_params(5, 7, 2, seed=3, shared=False)
    b = unit * 0.4
    codes = backend.asnumpy(lsh.hash_codes(Xg, xp.asarray(planes), xp.asarray(b)))
    X = backend.asnumpy(Xg)
    for g in range(2):
        bits = X[:, g, :] @ planes[g] > b[g]
        np.testing.assert_array_equal(codes[:, g], (bits * 2 ** np.arange(7)).sum(axis=1))


@pytest.mark.parametrize("H", [1, 24, 32])
def test_extreme_bit_counts(xp, H):
    codes = backend.asnumpy(codes_of(xp, random_groups(xp, n=2000), H)).astype(np.int64)
    assert codes.min() >= 0 and codes.max() < 2 ** H
    if H == 1:
        assert set(np.unique(codes)) == {0, 1}
    else:
        assert codes.max() >= 2 ** (H - 1)       # the top bit is set somewhere
        assert len(np.unique(codes[:, 0])) > 1000  # 24+ bits separate most random vectors


def test_origin_family_ignores_the_scale_offset_family_follows_it(xp):
    Xg = random_groups(xp)
    assert bool((codes_of(xp, Xg, 10, "origin") == codes_of(xp, 3 * Xg, 10, "origin")).all())
    # offsets scale with the input RMS, so scaling the input keeps offset codes too
    assert bool((codes_of(xp, Xg, 10, "offset") == codes_of(xp, 3 * Xg, 10, "offset")).all())
    assert bool((codes_of(xp, Xg, 10, "offset") != codes_of(xp, Xg, 10, "origin")).any())


def test_split_groups_pads_when_K_is_not_a_multiple_of_L(xp):
    X = xp.asarray(np.arange(2 * 10, dtype=np.float64).reshape(2, 10) + 1)
    Xg = lsh.split_groups(X, 4)
    assert Xg.shape == (2, 3, 4)
    np.testing.assert_array_equal(backend.asnumpy(Xg[:, 2, 2:]), 0)
    np.testing.assert_array_equal(backend.asnumpy(Xg.reshape(2, 12)[:, :10]), backend.asnumpy(X))


def test_shared_planes_hash_every_group_alike(xp):
    row = np.random.default_rng(0).standard_normal(6)
    Xg = xp.asarray(np.tile(row, (40, 3, 1)) + np.random.default_rng(1).standard_normal((40, 1, 6)))
    shared = backend.asnumpy(codes_of(xp, Xg, 12, shared=True))
    per_group = backend.asnumpy(codes_of(xp, Xg, 12, shared=False))
    assert (shared == shared[:, :1]).all()
    assert (per_group != per_group[:, :1]).any()


def python_codes(bits):
    """Codes of (..., H) booleans as exact Python ints (no float, no overflow), then uint64."""
    flat = [sum(1 << int(h) for h in np.flatnonzero(row)) for row in bits.reshape(-1, bits.shape[-1])]
    return np.array(flat, dtype=np.uint64).reshape(bits.shape[:-1])


@pytest.mark.parametrize("H", [1, 24, 25, 32, 33, 53, 54, 63, 64])
def test_pack_bits_is_exact_for_every_bit_count(xp, H):
    bits = np.random.default_rng(H).random((300, 2, H)) < 0.6
    bits[0] = True                                   # 2**H - 1: where a float sum would round
    bits[1, :, :] = False
    bits[1, :, -1] = bits[1, :, 0] = True            # the top and the bottom bit alone
    codes = lsh.pack_bits(xp.asarray(bits))
    assert codes.dtype == (np.uint32 if H <= 32 else np.uint64)
    np.testing.assert_array_equal(backend.asnumpy(codes).astype(np.uint64), python_codes(bits))


@pytest.mark.parametrize("H", [40, 64])
def test_codes_of_more_than_32_bits_are_the_bits_of_the_projections(xp, H):
    Xg = random_groups(xp, n=200, g=2, L=6)
    planes, unit = lsh.draw_hash_params(6, H, 2, seed=5, shared=False)
    b = unit * 0.4
    codes = backend.asnumpy(lsh.hash_codes(Xg, xp.asarray(planes), xp.asarray(b)))
    assert codes.dtype == np.uint64
    X = backend.asnumpy(Xg)
    bits = np.stack([X[:, g, :] @ planes[g] > b[g] for g in range(2)], axis=1)
    np.testing.assert_array_equal(codes, python_codes(bits))
    assert (codes >> np.uint64(H - 1)).any()         # the top bit is set somewhere


def explicit_projections(Xg, planes):
    """(N, G, H) projections in NumPy, one group at a time."""
    X, planes = backend.asnumpy(Xg), backend.asnumpy(planes)
    return np.stack([X[:, g] @ planes[0 if len(planes) == 1 else g] for g in range(X.shape[1])], axis=1)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("chunk", [lsh.HASH_CHUNK_ELEMENTS, 50])
def test_centred_thresholds_are_the_mean_plus_unit_offset_times_std(xp, shared, chunk, monkeypatch):
    monkeypatch.setattr(lsh, "HASH_CHUNK_ELEMENTS", chunk)           # 50: several chunks of rows
    rng = np.random.default_rng(4)
    Xg = xp.asarray(rng.standard_normal((300, 3, 5)) * np.array([1.0, 2.0, 0.5])[:, None]
                    + rng.uniform(-3, 5, size=(1, 3, 5)))              # groups differ in scale and place
    config = ReuseConfig(L=5, H=9, family="centred", seed=2, shared_planes=shared)
    planes, unit = ReuseState().hash_params(5, 9, 3, "centred", 2, shared, xp, Xg.dtype)
    proj = explicit_projections(Xg, planes)
    axes = (0, 1) if shared else (0,)
    mean, std = proj.mean(axis=axes).reshape(-1, 9), proj.std(axis=axes).reshape(-1, 9)
    expected = mean + backend.asnumpy(unit) * std
    got_mean, got_std = lsh.projection_stats(Xg, planes)
    np.testing.assert_allclose(backend.asnumpy(got_mean), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backend.asnumpy(got_std), std, rtol=1e-12)
    b = lsh.centred_offsets(unit, got_mean, got_std)
    np.testing.assert_allclose(backend.asnumpy(b), expected, rtol=1e-12, atol=1e-12)
    codes = backend.asnumpy(hash_groups(Xg, config, ReuseState(), Xg))
    np.testing.assert_array_equal(codes, python_codes(proj > expected))


def test_centred_family_splits_inputs_far_from_the_origin_where_origin_does_not(xp):
    rng = np.random.default_rng(6)
    Xg = xp.asarray(rng.standard_normal((400, 2, 8)) * np.linspace(0.5, 1.5, 8) + 1000.0)
    n_clusters = {}
    for family in ("origin", "centred"):
        _, n_clusters[family] = assign_clusters(codes_of(xp, Xg, 12, family=family), 12)
    # every plane through the origin sees the whole cloud on one side
    assert backend.asnumpy(n_clusters["origin"]).tolist() == [1, 1]
    assert int(n_clusters["centred"].min()) > 100


def test_offsets_refuses_the_centred_family(xp):
    with pytest.raises(ValueError, match="centred"):
        lsh.offsets(xp.ones((1, 3)), "centred", 1.0)


# ---------------------------------------------------------------- the 'pca' family

def greedy_cuts(std, H):
    """The oracle of allot_cuts: bit by bit, to the axis whose cells are widest."""
    cuts = np.zeros(len(std), dtype=int)
    for _ in range(H):
        cuts[np.argmax(std / (cuts + 1))] += 1
    return cuts


def test_tied_spreads_are_cut_in_axis_order_on_every_backend(xp):
    """Equal widths (equal spreads, or std_a / 2 == std_b) go to the lower axis, then the lower k:
    NumPy's default sort orders ties arbitrarily, CuPy's stably, so the same data would get
    different planes on the CPU and the GPU."""
    L, H = 64, 32
    std = np.ones((2, L), np.float32)
    std[1, ::3] = 2
    axis, cut, _ = (backend.asnumpy(a) for a in lsh.allot_cuts(xp.asarray(std), H))
    for g in range(2):
        widths = [(-std[g, j] / k, j, k) for j in range(L) for k in range(1, H + 1)]
        want = sorted(widths)[:H]
        assert axis[g].tolist() == [j for _, j, _ in want] and cut[g].tolist() == [k for _, _, k in want]


def anisotropic_groups(rng, n, g, L, spreads):
    """(n, g, L): each group a cloud with its own principal axes (a random rotation), scale and place."""
    Xg = np.empty((n, g, L))
    for j in range(g):
        rotation, _ = np.linalg.qr(rng.standard_normal((L, L)))
        Xg[:, j] = (rng.standard_normal((n, L)) * spreads * (j + 1)) @ rotation.T + rng.uniform(-3, 3, L)
    return Xg


@pytest.mark.parametrize("shared", [True, False])
def test_pca_planes_are_principal_axes_cut_as_the_rule_says(xp, shared):
    L, H = 6, 11
    Xg = anisotropic_groups(np.random.default_rng(8), 600, 3, L, np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1]))
    planes, thresholds = (backend.asnumpy(a) for a in lsh.pca_params(xp.asarray(Xg), H, shared))
    fitted = Xg.reshape(-1, 1, L) if shared else Xg
    assert planes.shape == (fitted.shape[1], L, H) and thresholds.shape == (fitted.shape[1], H)
    for j in range(fitted.shape[1]):
        v = fitted[:, j]
        variance, axes = np.linalg.eigh(np.cov(v.T, bias=True))
        std, axes = np.sqrt(variance[::-1]), axes[:, ::-1]
        match = np.abs(axes.T @ planes[j])                       # (axis, bit): 1 where bit h cuts axis a
        np.testing.assert_allclose(match.max(axis=0), 1.0, atol=1e-9)
        axis_of = match.argmax(axis=0)
        cuts = greedy_cuts(std, H)
        assert np.bincount(axis_of, minlength=L).tolist() == cuts.tolist()
        for a in np.flatnonzero(cuts):
            bits = np.flatnonzero(axis_of == a)
            along = (thresholds[j, bits] - v.mean(axis=0) @ planes[j][:, bits]) / std[a]
            expected = (np.arange(1, cuts[a] + 1) / (cuts[a] + 1) - 0.5) * lsh.PCA_SPAN
            np.testing.assert_allclose(np.sort(along), expected, atol=1e-9)
    config = ReuseConfig(L=L, H=H, family="pca", shared_planes=shared)
    codes = backend.asnumpy(hash_groups(xp.asarray(Xg), config, ReuseState(), None))
    np.testing.assert_array_equal(codes, python_codes(explicit_projections(Xg, planes) > thresholds))


def test_pca_fits_every_kth_vector_at_most_the_limit(xp, monkeypatch):
    Xg = xp.asarray(anisotropic_groups(np.random.default_rng(9), 1000, 2, 5, np.array([4.0, 2, 1, 0.5, 0.2])))
    want = [backend.asnumpy(a) for a in lsh.pca_params(Xg[::10], 7, False)]
    monkeypatch.setattr(lsh, "PCA_FIT_VECTORS", 100)
    got = [backend.asnumpy(a) for a in lsh.pca_params(Xg, 7, False)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    full = backend.asnumpy(lsh.pca_params(Xg, 7, True)[1])   # shared: 2000 vectors, every 20th
    monkeypatch.setattr(lsh, "PCA_FIT_VECTORS", 4096)
    np.testing.assert_array_equal(full, backend.asnumpy(lsh.pca_params(Xg.reshape(-1, 1, 5)[::20], 7, True)[1]))


def centroid_error(Xg, codes):
    """||X - its cluster's centroid|| / ||X - mean||, over every group."""
    X, codes = backend.asnumpy(Xg), backend.asnumpy(codes)
    err = norm = 0.0
    for g in range(X.shape[1]):
        _, ids = np.unique(codes[:, g], return_inverse=True)
        sums = np.zeros((ids.max() + 1, X.shape[2]))
        np.add.at(sums, ids, X[:, g])
        centroid = sums / np.bincount(ids)[:, None]
        err += ((X[:, g] - centroid[ids]) ** 2).sum()
        norm += ((X[:, g] - X[:, g].mean(axis=0)) ** 2).sum()
    return np.sqrt(err / norm)


def test_pca_clusters_vectors_of_few_main_axes_tighter_than_random_planes(xp):
    """Vectors spread along 3 of 16 axes: the cuts follow those axes, random planes mostly do not,
    so 'pca' with 10 bits makes fewer clusters than the random families with 12, and tighter ones."""
    spreads = np.r_[np.array([6.0, 4.0, 3.0]), np.full(13, 0.05)]
    Xg = xp.asarray(anisotropic_groups(np.random.default_rng(10), 4000, 2, 16, spreads))
    err, clusters = {}, {}
    for family, H in (("offset", 12), ("centred", 12), ("pca", 10)):
        codes = codes_of(xp, Xg, H, family=family, shared=False)
        err[family] = centroid_error(Xg, codes)
        clusters[family] = int(assign_clusters(codes, H)[1].max())
    assert clusters["pca"] <= min(clusters["offset"], clusters["centred"])
    assert err["pca"] < 0.8 * min(err["offset"], err["centred"])


def test_pca_of_identical_vectors_is_one_cluster(xp):
    Xg = xp.asarray(np.tile(np.array([0.3, -1.2, 2.0, 0.7]), (50, 2, 1)))
    planes, thresholds = lsh.pca_params(Xg, 9, False)
    assert bool(xp.isfinite(planes).all()) and bool(xp.isfinite(thresholds).all())
    assert backend.asnumpy(assign_clusters(codes_of(xp, Xg, 9, family="pca", shared=False), 9)[1]).tolist() == [1, 1]
