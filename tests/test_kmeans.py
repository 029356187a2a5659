"""k-means for DnC: both backends against a NumPy Lloyd reference, determinism, empty clusters."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sdclr_fast.train.kmeans import assign, faiss_available, kmeans, kmeans_plusplus, lloyd

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(
    not faiss_available(), reason="faiss not installed"))]
METRICS = ["cosine", "euclidean"]


# ------------------------------------------------------------------ NumPy reference
def numpy_lloyd(x, init, iters, metric):
    """Textbook Lloyd in float64: nearest centroid (max cosine / min squared L2), mean update,
    re-normalised for spherical k-means. No empty-cluster handling (callers avoid empties)."""
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(init, dtype=np.float64).copy()
    labels = None
    for _ in range(iters):
        if metric == "cosine":
            new = np.argmax(x @ c.T, axis=1)
        else:
            new = np.argmin(((x[:, None, :] - c[None, :, :]) ** 2).sum(-1), axis=1)
        done = labels is not None and np.array_equal(new, labels)
        labels = new
        for j in range(c.shape[0]):
            members = x[labels == j]
            assert len(members), "reference hit an empty cluster"
            c[j] = members.mean(0)
        if metric == "cosine":
            # a zero mean stays zero, as with F.normalize (eps 1e-12)
            c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        if done:
            break
    return labels, c


def numpy_farthest_first(x, k):
    """Deterministic seeding for the reference: start at row 0, then the farthest point."""
    chosen = [0]
    dist = ((x - x[0]) ** 2).sum(1)
    for _ in range(1, k):
        chosen.append(int(np.argmax(dist)))
        dist = np.minimum(dist, ((x - x[chosen[-1]]) ** 2).sum(1))
    return x[chosen]


def same_partition(a, b):
    """Labelings a and b define the same partition (equal up to a permutation of ids)."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def blobs(k, per, d, seed, spread=0.01):
    """k well-separated clusters on the unit sphere (and therefore separable in both metrics).

    ``spread`` is per coordinate, so a blob's squared radius grows with d: at 0.05 and d = 31 it
    is about a fifth of the squared distance between blobs, and k-means++ put two seeds in one
    blob (a local optimum Lloyd cannot leave) in about 1 of 400 draws of this test's parameters,
    which hypothesis then found now and then. At 0.01 that ratio is about 1/100 and 6,000 draws
    (both backends and metrics) recovered every partition."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    # push centres apart: separation must beat the noise for the test to be meaningful
    while k > 1 and (centres @ centres.t() - torch.eye(k, dtype=torch.float64)).max() > 0.6:
        centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    x = centres[:, None, :] + spread * torch.randn(k, per, d, generator=g, dtype=torch.float64)
    x = torch.nn.functional.normalize(x.reshape(k * per, d), dim=1)
    truth = torch.arange(k).repeat_interleave(per)
    perm = torch.randperm(k * per, generator=g)
    return x[perm].float(), truth[perm]


# ------------------------------------------------------------------ separable data
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@settings(deadline=None, max_examples=15)
@given(k=st.integers(1, 6), per=st.integers(1, 12), d=st.integers(6, 33), seed=st.integers(0, 2**31 - 1))
def test_separable_matches_reference_and_truth(backend, metric, k, per, d, seed):
    x, truth = blobs(k, per, d, seed)
    res = kmeans(x, k, iters=30, seed=seed, metric=metric, backend=backend)
    ref_labels, _ = numpy_lloyd(x.double().numpy(), numpy_farthest_first(x.double().numpy(), k),
                                30, metric)
    assert res.assignments.shape == (k * per,) and res.assignments.dtype == torch.long
    assert res.centroids.shape == (k, d)
    assert same_partition(res.assignments.numpy(), ref_labels)
    assert same_partition(res.assignments.numpy(), truth.numpy())
    assert res.backend == backend and res.metric == metric
    if metric == "cosine":
        torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(k))


# ------------------------------------------------------------------ Lloyd step by step
@pytest.mark.parametrize("metric", METRICS)
@settings(deadline=None, max_examples=25)
@given(n=st.integers(8, 80), d=st.integers(1, 17), k=st.integers(1, 5), iters=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1))
def test_lloyd_matches_numpy_from_same_init(metric, n, d, k, iters, seed):
    """Non-separable random data, same start: the torch Lloyd must follow the reference
    iteration for iteration (float64 on both sides so near-ties resolve alike)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    init = x[torch.randperm(n, generator=g)[:k]]
    xn = x.numpy()
    # the reference has no empty-cluster rule: only compare runs that never produce one
    try:
        ref_labels, ref_cent = numpy_lloyd(xn, init.numpy(), iters, metric)
    except AssertionError:
        return
    labels, cent, its = lloyd(x, init, iters, metric)
    assert 1 <= its <= iters
    np.testing.assert_array_equal(labels.numpy(), ref_labels)
    np.testing.assert_allclose(cent.numpy(), ref_cent, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("metric", METRICS)
def test_assign_ties_go_to_lowest_index(metric):
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels, dist = assign(x, c, metric)
    assert labels.tolist() == [0, 2]
    assert dist.abs().max() < 1e-6


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_deterministic_for_a_seed(backend, metric):
    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(3))
    a = kmeans(x, 7, seed=11, metric=metric, backend=backend)
    b = kmeans(x.clone(), 7, seed=11, metric=metric, backend=backend)
    assert torch.equal(a.assignments, b.assignments)
    assert torch.equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia
    # a different seed changes the seeding (on this data at least)
    gen = lambda s: kmeans_plusplus(torch.nn.functional.normalize(x, dim=1), 7,  # noqa: E731
                                    torch.Generator().manual_seed(s))
    assert not torch.equal(gen(11), gen(12))


def test_input_not_modified_and_centroids_are_means():
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(0)) * 3
    before = x.clone()
    for metric in METRICS:
        res = kmeans(x, 4, seed=0, metric=metric, backend="torch")
        assert torch.equal(x, before)
        xp = torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x
        for j in range(4):
            mean = xp[res.assignments == j].mean(0)
            if metric == "cosine":
                mean = torch.nn.functional.normalize(mean, dim=0)
            torch.testing.assert_close(res.centroids[j], mean, rtol=1e-5, atol=1e-6)
        # inertia is the sum of each point's distance to its own centroid
        c = res.centroids[res.assignments]
        want = (1 - (xp * c).sum(1)).sum() if metric == "cosine" else ((xp - c) ** 2).sum()
        assert res.inertia == pytest.approx(float(want), rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------ empty clusters
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_duplicates_fewer_distinct_points_than_k(backend, metric):
    # 3 distinct points (each repeated) and k = 5: k-means++ must fall back to uniform draws
    # and two clusters would be empty; they get reseeded instead of crashing
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).repeat(4, 1)
    res = kmeans(x, 5, seed=0, metric=metric, backend=backend)
    assert (res.sizes() > 0).all()
    assert res.sizes().sum() == 12
    assert torch.isfinite(res.centroids).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_k_equals_n_every_point_alone(backend, metric):
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(1))
    res = kmeans(x, 9, seed=5, metric=metric, backend=backend)
    assert sorted(res.assignments.tolist()) == list(range(9))
    assert res.inertia == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_bad_init_reseeds_with_farthest_point(metric):
    """Two of three initial centroids coincide, so one cluster empties in the first step; it is
    reseeded with the point farthest from its centroid, and the run finds the true blobs."""
    x, truth = blobs(3, 10, 8, seed=4)
    init = torch.stack([x[0], x[0], x[1]])
    labels, cent, _ = lloyd(x.double(), init.double(), 20, metric)
    assert (torch.bincount(labels, minlength=3) > 0).all()
    assert same_partition(labels.numpy(), truth.numpy())

    # one step by hand: the reseeded cluster holds exactly the farthest point
    from sdclr_fast.train.kmeans import _point_dist, _reseed_empty
    xd = x.double()
    c = init.double().clone()
    lab, _ = assign(xd, c, metric)
    assert (lab == 1).sum() == 0
    far = int(torch.argmax(_point_dist(xd, c, lab, metric)))
    assert _reseed_empty(xd, lab, c, metric) == 1
    assert (lab == 1).nonzero().flatten().tolist() == [far]
    assert torch.equal(c[1], xd[far])


def test_reseed_never_empties_a_singleton():
    # clusters 0 and 1 are singletons, cluster 2 holds the rest; 3 and 4 are empty: donors must
    # come from cluster 2 even if a singleton point is farther from its centroid
    from sdclr_fast.train.kmeans import _reseed_empty
    x = torch.tensor([[0.0], [10.0], [1.0], [1.1], [1.2], [0.9]], dtype=torch.float64)
    c = torch.tensor([[5.0], [10.0], [1.05], [50.0], [60.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 2, 2])
    assert _reseed_empty(x, labels, c, "euclidean") == 2
    assert (torch.bincount(labels, minlength=5) > 0).all()
    assert labels[:2].tolist() == [0, 1]


def test_zero_rows_under_cosine():
    x = torch.zeros(6, 3)
    x[:3, 0] = 1.0
    res = kmeans(x, 2, seed=0, metric="cosine", backend="torch")
    assert (res.sizes() > 0).all() and torch.isfinite(res.centroids).all()


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs, match", [
    (dict(x=torch.randn(5), k=2), "x must be a 2-D"),
    (dict(x=[[1.0]], k=1), "x must be a 2-D"),
    (dict(x=torch.ones(4, 2, dtype=torch.long), k=2), "floating-point"),
    (dict(x=torch.randn(3, 2), k=4), "at least k points"),
    (dict(x=torch.randn(3, 2), k=0), "k must be a positive int"),
    (dict(x=torch.randn(3, 2), k=2.0), "k must be a positive int"),
    (dict(x=torch.randn(3, 2), k=2, metric="l1"), "metric must be one of"),
    (dict(x=torch.randn(3, 2), k=2, backend="sklearn"), "backend must be one of"),
    (dict(x=torch.randn(3, 2), k=2, iters=0), "iters must be a positive int"),
    (dict(x=torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), k=1), "NaN or infinite"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kmeans(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_torch_backend_on_cuda_matches_cpu():
    x, _ = blobs(4, 50, 16, seed=2)
    a = kmeans(x, 4, seed=3, backend="torch")
    b = kmeans(x.cuda(), 4, seed=3, backend="torch")
    assert b.assignments.is_cuda
    assert same_partition(a.assignments.numpy(), b.assignments.cpu().numpy())
