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
