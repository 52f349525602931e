"""Cluster ids, centroids and cluster sums against plain loops."""
import numpy as np
import pytest

from minireuse import backend
from minireuse.reuse import clustering


@pytest.fixture
def xp(device):
    """The array module of the device under test (conftest parametrizes cpu/gpu)."""
    return device


def random_codes(n=300, g=4, distinct=20, seed=0):
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 2 ** 31, size=(g, distinct))
    return table[np.arange(g), rng.integers(0, distinct, size=(n, g))].astype(np.uint32)


@pytest.mark.parametrize("dense", [True, False])
def test_ids_number_equal_codes_per_group(xp, dense, monkeypatch):
    codes = random_codes() % (2 ** 10)
    if not dense:
        monkeypatch.setattr(clustering, "DENSE_TABLE_MAX", 0)
    ids, n = clustering.assign_clusters(xp.asarray(codes.astype(np.uint32)), H=10)
    ids, n = backend.asnumpy(ids), backend.asnumpy(n)
    assert ids.dtype == np.int32 and n.dtype == np.int32
    for g in range(codes.shape[1]):
        distinct, expected = np.unique(codes[:, g], return_inverse=True)
        np.testing.assert_array_equal(ids[:, g], expected)   # numbered in code order
        assert n[g] == len(distinct)


def test_dense_table_and_unique_agree_on_32_bit_codes(xp, monkeypatch):
    codes = xp.asarray(random_codes())
    a = backend.asnumpy(clustering.assign_clusters(codes, H=32)[0])
    monkeypatch.setattr(clustering, "DENSE_TABLE_MAX", 1 << 40)
    monkeypatch.setattr(clustering, "DENSE_TABLE_PER_KEY", 1 << 40)
    codes8 = codes & 255
    b = backend.asnumpy(clustering.assign_clusters(codes8, H=8)[0])
    monkeypatch.setattr(clustering, "DENSE_TABLE_MAX", 0)
    c = backend.asnumpy(clustering.assign_clusters(codes8, H=8)[0])
    np.testing.assert_array_equal(b, c)
    assert a.max() < 20


def test_centroids_and_cluster_sums_match_loops(xp):
    rng = np.random.default_rng(0)
    n, g, L, m = 200, 3, 5, 4
    ids_np = rng.integers(0, 7, size=(n, g)).astype(np.int32)
    ids_np[:7] = np.arange(7)[:, None]                       # every id occurs
    Xg = rng.standard_normal((n, g, L))
    dY = rng.standard_normal((n, m))
    C, counts = clustering.centroids(xp.asarray(Xg), xp.asarray(ids_np), xp.asarray(np.full(g, 7, np.int32)))
    S = clustering.cluster_sums(xp.asarray(dY), xp.asarray(ids_np), 7)
    for gi in range(g):
        for c in range(7):
            members = ids_np[:, gi] == c
            np.testing.assert_allclose(backend.asnumpy(C)[gi, c], Xg[members, gi].mean(axis=0), rtol=1e-12)
            np.testing.assert_allclose(backend.asnumpy(S)[gi, c], dY[members].sum(axis=0), rtol=1e-12)
            assert int(backend.asnumpy(counts)[gi, c]) == members.sum()


def test_unused_cluster_slots_are_zero(xp):
    ids = xp.asarray(np.array([[0, 0], [1, 0], [1, 0]], dtype=np.int32))
    C, counts = clustering.centroids(xp.ones((3, 2, 2)), ids, xp.asarray(np.array([2, 1], np.int32)))
    np.testing.assert_array_equal(backend.asnumpy(C)[1, 1], 0)
    np.testing.assert_array_equal(backend.asnumpy(counts), [[1, 2], [3, 0]])


def brute_force_clusters(codes):
    """ids and n_clusters by a Python dict per group: distinct codes numbered in increasing order."""
    ids = np.empty(codes.shape, dtype=np.int64)
    n_clusters = []
    for g in range(codes.shape[1]):
        number = {c: i for i, c in enumerate(sorted(set(codes[:, g].tolist())))}
        ids[:, g] = [number[c] for c in codes[:, g].tolist()]
        n_clusters.append(len(number))
    return ids, np.array(n_clusters)


def wide_codes(H, n=400, g=3, distinct=30, seed=0):
    """Codes of H bits, few distinct per group, among them pairs that differ in one bit only
    (the top or the bottom one) so that any loss of precision would merge them."""
    rng = np.random.default_rng(seed)
    dtype = np.uint32 if H <= 32 else np.uint64
    table = rng.integers(0, 2 ** H - 1, size=(g, distinct), dtype=np.uint64, endpoint=True)
    table[:, 1] = table[:, 0] ^ np.uint64(1 << (H - 1))
    table[:, 2] = table[:, 0] ^ np.uint64(1)
    table[:, 3] = 2 ** H - 1
    picks = rng.integers(0, distinct, size=(n, g))
    picks[:distinct] = np.arange(distinct)[:, None]           # every code of the table occurs
    return table[np.arange(g), picks].astype(dtype)


@pytest.mark.parametrize("H", [8, 32, 40, 64])
@pytest.mark.parametrize("dense", [True, False])
def test_assign_clusters_matches_a_brute_force_dict_clustering(xp, H, dense, monkeypatch):
    if not dense:
        monkeypatch.setattr(clustering, "DENSE_TABLE_MAX", 0)
    codes = wide_codes(H)
    ids, n = clustering.assign_clusters(xp.asarray(codes), H=H)
    expected_ids, expected_n = brute_force_clusters(codes)
    assert ids.dtype == np.int32 and n.dtype == np.int32 and ids.flags.c_contiguous
    np.testing.assert_array_equal(backend.asnumpy(ids), expected_ids)
    np.testing.assert_array_equal(backend.asnumpy(n), expected_n)
    assert (expected_n > 20).all()                            # several clusters per group


def test_sorted_runs_equal_the_dense_table_up_to_32_bits(xp, monkeypatch):
    monkeypatch.setattr(clustering, "DENSE_TABLE_MAX", 1 << 40)
    monkeypatch.setattr(clustering, "DENSE_TABLE_PER_KEY", 1 << 40)
    for H in (1, 5, 12):
        codes = xp.asarray(wide_codes(H, seed=H))
        dense = clustering.assign_clusters(codes, H=H)
        runs = clustering.number_sorted_runs(codes)
        for a, b in zip(dense, runs):
            np.testing.assert_array_equal(backend.asnumpy(a), backend.asnumpy(b))
