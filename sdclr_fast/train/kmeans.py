"""Deterministic k-means for the DnC clustering stage, with a faiss and a torch backend.

Two metrics, both meant for L2-normalised embeddings:

* ``"cosine"`` (the default) is spherical k-means: a point goes to the centroid with the
  largest dot product and every centroid is re-normalised to unit length after its mean is
  taken. On unit vectors this is the natural geometry of a contrastive embedding (the loss
  only sees cosines) and it is faiss' ``spherical=True``.
* ``"euclidean"`` is plain Lloyd k-means (squared L2 distance, centroids are raw means) on the
  vectors as given; DnC feeds it normalised vectors, so distances are ``2 - 2 cos`` to points
  but centroids may lie inside the sphere.

Both backends start from the same greedy k-means++ seeding (D^2 sampling drawn from a
``torch.Generator`` seeded with ``seed``), so for a seed the result is deterministic and the
two backends normally agree. Every cluster is non-empty on return whenever ``n >= k``: a
cluster that loses all its points is reseeded with the point farthest from its own centroid
(taken from a cluster with more than one member), which also covers duplicate points and
``k`` close to ``n``. The returned centroids are the (normalised, for cosine) means of the
returned assignments.
"""
import math
from dataclasses import dataclass

import torch

__all__ = ["KMeansResult", "kmeans", "kmeans_plusplus", "lloyd", "assign", "faiss_available"]

KMEANS_METRICS = ("cosine", "euclidean")  # also the choices of DnCConfig's kmeans_metric / kmeans_backend
KMEANS_BACKENDS = ("auto", "faiss", "torch")
# Rows per block when computing point-centroid scores, so memory stays O(block * k).
_BLOCK = 65536


@dataclass
class KMeansResult:
    """Outcome of :func:`kmeans`.

    assignments: (n,) int64 cluster id of every point, in ``[0, k)``.
    centroids: (k, d) float32 centroids (unit length for ``metric="cosine"``).
    inertia: sum over points of the distance to their centroid (``1 - cos`` for cosine,
        squared L2 for euclidean).
    iterations: Lloyd iterations run (fewer than asked when the assignment converged).
    backend: ``"torch"`` or ``"faiss"``.
    metric: ``"cosine"`` or ``"euclidean"``.
    """

    assignments: torch.Tensor
    centroids: torch.Tensor
    inertia: float
    iterations: int
    backend: str
    metric: str

    def sizes(self):
        return torch.bincount(self.assignments, minlength=self.centroids.shape[0])


def faiss_available():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _check(x, k, metric):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor of shape (n, d), got "
                         f"{type(x).__name__ if not isinstance(x, torch.Tensor) else tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k points: k={k} but x has {x.shape[0]} rows")
    if x.shape[1] < 1:
        raise ValueError("x must have at least one column")
    if metric not in KMEANS_METRICS:
        raise ValueError(f"metric must be one of {KMEANS_METRICS}, got {metric!r}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")


def _prepare(x, metric):
    x = x.detach().float().contiguous()
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    return x


def _dist_to(x, c, metric, x_sq=None):
    """(n, m) distances: 1 - cos for cosine (x, c unit), squared L2 for euclidean (``x_sq``: the
    rows' squared norms when the caller has them, to avoid an (n, d) temporary per call)."""
    if metric == "cosine":
        return (1.0 - x @ c.t()).clamp_min_(0.0)
    if x_sq is None:
        x_sq = (x * x).sum(1)
    return torch.addmm((c * c).sum(1)[None, :], x, c.t(), alpha=-2.0).add_(x_sq[:, None]).clamp_min_(0.0)


def assign(x, centroids, metric="cosine", x_sq=None):
    """Nearest centroid of every row of x and the distance to it (blocked over rows).

    Ties go to the lowest centroid index. x is used as given (normalise it first for cosine).
    """
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], _BLOCK):
        d = _dist_to(x[s:s + _BLOCK], centroids, metric, None if x_sq is None else x_sq[s:s + _BLOCK])
        dist[s:s + _BLOCK], labels[s:s + _BLOCK] = d.min(dim=1)
    return labels, dist


def _point_dist(x, centroids, labels, metric):
    """Distance of every point to its own centroid."""
    c = centroids[labels]
    if metric == "cosine":
        return (1.0 - (x * c).sum(1)).clamp_min_(0.0)
    return ((x - c) ** 2).sum(1)


def _update(x, labels, k, metric):
    """Centroids as means of their members; a one-hot matmul rather than index_add_ so that the
    sum order is fixed and the result is deterministic on CUDA as well."""
    sums = x.new_zeros(k, x.shape[1])
    counts = x.new_zeros(k)
    ids = torch.arange(k, device=x.device)
    for s in range(0, x.shape[0], _BLOCK):
        onehot = (labels[s:s + _BLOCK, None] == ids[None, :]).to(x.dtype)
        sums += onehot.t() @ x[s:s + _BLOCK]
        counts += onehot.sum(0)
    cent = sums / counts.clamp_min(1.0)[:, None]
    if metric == "cosine":
        cent = torch.nn.functional.normalize(cent, dim=1)
    return cent, counts


def _reseed_empty(x, labels, centroids, metric):
    """Give every empty cluster the point farthest from its own centroid, taken only from
    clusters with at least two members (so no new cluster empties). Returns the number of
    clusters reseeded. Deterministic: ties go to the lowest point index."""
    k = centroids.shape[0]
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return 0
    dist = _point_dist(x, centroids, labels, metric)
    for j in empty:
        donor_ok = counts[labels] > 1
        cand = torch.where(donor_ok, dist, torch.full_like(dist, -1.0))
        i = int(torch.argmax(cand))
        counts[labels[i]] -= 1
        labels[i] = j
        counts[j] = 1
        centroids[j] = x[i]
        dist[i] = 0.0
    return len(empty)


def _sq_dists(x, c, x_sq):
    """(n, m) squared L2 distances, blocked over rows (memory O(block * m), not O(n * m * d))."""
    out = torch.empty(x.shape[0], c.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], _BLOCK):
        out[s:s + _BLOCK] = _dist_to(x[s:s + _BLOCK], c, "euclidean", x_sq[s:s + _BLOCK])
    return out


def kmeans_plusplus(x, k, generator, n_trials=None):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; the greedy variant sklearn uses):
    the first centre uniformly at random; for each next one, ``n_trials`` candidates
    (default ``2 + floor(ln k)``) are drawn with probability proportional to the squared
    distance to the nearest chosen centre, and the candidate that lowers the total potential
    most is kept. The greedy step makes a bad seeding (two seeds in one true cluster, a local
    optimum Lloyd cannot leave) far less likely than plain D^2 sampling. Squared L2 is
    ``2 - 2 cos`` on unit vectors, so the same rule serves both metrics.

    If all remaining mass is zero (fewer distinct points than k) the next centre is drawn
    uniformly; the empty clusters that follow are reseeded by Lloyd. The draws use the CPU
    ``generator`` (probabilities are moved there), so a seed gives the same seeding on every
    device. Returns the (k,) indices of the chosen rows.
    """
    n = x.shape[0]
    if n_trials is None:
        n_trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(1)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = _sq_dists(x, x[chosen], x_sq)[:, 0]
    for _ in range(1, k):
        w = closest.double().cpu()
        total = float(w.sum())
        if total > 0.0:
            cand = torch.multinomial(w / total, n_trials, replacement=True, generator=generator)
        else:
            cand = torch.randint(n, (1,), generator=generator)
        cand = cand.to(x.device)
        # potential after adding each candidate; the first minimum wins ties
        new_closest = torch.minimum(closest[:, None], _sq_dists(x, x[cand], x_sq))
        best = int(torch.argmin(new_closest.double().sum(0)))
        chosen.append(int(cand[best]))
        closest = new_closest[:, best].contiguous()
    return torch.tensor(chosen, dtype=torch.long)


def lloyd(x, centroids, iters, metric="cosine"):
    """Lloyd iterations from the given centroids (assign, reseed empty clusters, update) until
    the assignment stops changing or ``iters`` updates have run. x must already be prepared
    (unit rows for cosine). Returns (labels, centroids, iterations)."""
    k = centroids.shape[0]
    centroids = centroids.clone()
    labels = None
    x_sq = (x * x).sum(1) if metric == "euclidean" else None
    it = 0
    for it in range(1, max(iters, 1) + 1):
        new, _ = assign(x, centroids, metric, x_sq)
        _reseed_empty(x, new, centroids, metric)
        converged = labels is not None and torch.equal(new, labels)
        labels = new
        centroids, _ = _update(x, labels, k, metric)
        if converged:
            break
    return labels, centroids, it


def _faiss_lloyd(x, init, iters, metric, seed):
    import faiss
    import numpy as np

    n, d = x.shape
    k = init.shape[0]
    # faiss' GPU index where faiss-gpu sees a GPU, its CPU one otherwise
    gpu = bool(getattr(faiss, "get_num_gpus", lambda: 0)())
    km = faiss.Kmeans(d, k, niter=max(iters, 1), seed=int(seed) & 0x7FFFFFFF, verbose=False,
                      spherical=(metric == "cosine"), nredo=1, gpu=gpu,
                      # no subsampling and no warning on small clusters: cluster every point
                      min_points_per_centroid=1, max_points_per_centroid=n // k + 1)
    xn = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
    try:
        km.train(xn, init_centroids=np.ascontiguousarray(init.cpu().numpy(), dtype=np.float32))
    except TypeError:  # faiss before 1.7.1 has no init_centroids: its own seeded init
        km.train(xn)
    cent = torch.from_numpy(km.centroids.copy()).to(x.device)
    return cent, len(km.obj)


def kmeans(x, k, *, iters=50, seed=0, metric="cosine", backend="auto"):
    """Cluster the rows of ``x`` (n, d) into ``k`` groups: DnC's divide step.

    k-means++ seeding, then Lloyd iterations, with faiss where it is installed (GPU faiss on a
    GPU) or a seeded torch implementation on x's device; empty clusters are reseeded.

    Args:
        x: (n, d) floating tensor on any device; it is not modified. For ``metric="cosine"``
            rows are L2-normalised first (zero rows stay zero and are equally far from every
            centroid).
        k: number of clusters, ``1 <= k <= n``.
        iters: maximum number of Lloyd iterations.
        seed: seeds the k-means++ draws (and faiss' own generator); same seed, same result.
        metric: ``"cosine"`` (spherical k-means) or ``"euclidean"``.
        backend: ``"faiss"`` (faiss-gpu where installed with a GPU, else CPU faiss; numpy round
            trip), ``"torch"`` (on x's device) or ``"auto"``: faiss where it is installed,
            torch otherwise.

    Returns:
        A `KMeansResult` on x's device: ``assignments`` (n,) int64, ``centroids`` (k, d)
        float32, ``inertia``, ``iterations``, ``backend``, ``metric``.

    Raises:
        ValueError: for x that is not a 2-d floating tensor with at least k rows and one
            column, NaN or inf in x, a bad k, iters, metric or backend, ``backend="faiss"``
            without faiss.

    Examples:
        >>> import torch, sdclr_fast
        >>> x = torch.cat([torch.randn(20, 4) + 10, torch.randn(20, 4) - 10])   # two blobs
        >>> result = sdclr_fast.kmeans(x, 2, metric="euclidean", backend="torch")
        >>> result.assignments[:20].unique().numel(), result.assignments[20:].unique().numel()
        (1, 1)
    """
    _check(x, k, metric)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"backend must be one of {KMEANS_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "faiss" if faiss_available() else "torch"
    elif backend == "faiss" and not faiss_available():
        raise ValueError("backend='faiss' but faiss is not installed (pip install faiss-cpu)")

    xp = _prepare(x, metric)
    gen = torch.Generator().manual_seed(int(seed))
    init = xp[kmeans_plusplus(xp, k, gen).to(xp.device)]
    if backend == "torch":
        labels, cent, its = lloyd(xp, init, iters, metric)
    else:
        cent, its = _faiss_lloyd(xp, init, iters, metric, seed)
        # faiss returns centroids; assign with the same rule as the torch path and make the
        # returned centroids the means of the returned assignment (one more Lloyd step).
        labels, _ = assign(xp, cent, metric)
        _reseed_empty(xp, labels, cent, metric)
        cent, _ = _update(xp, labels, k, metric)
    inertia = float(_point_dist(xp, cent, labels, metric).sum())
    return KMeansResult(assignments=labels, centroids=cent, inertia=inertia, iterations=its,
                        backend=backend, metric=metric)
