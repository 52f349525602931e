"""Hashing: parameters drawn from a seed, bit packing, groups, families."""
import numpy as np
import pytest

from minireuse import backend
from minireuse.reuse import ReuseConfig, ReuseState, lsh
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
