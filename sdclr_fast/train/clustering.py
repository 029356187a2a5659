"""DnC stage 2a: embed the training split with the base model and cluster it with k-means.

The base model's dense-branch embedding (backbone features by default, or the projection) of
the *eval view* of every training image is L2-normalised and clustered (spherical k-means by
default, see :mod:`sdclr_fast.train.kmeans`). Cluster ids are renumbered by decreasing size
(ties: smallest first member), so the numbering does not depend on the backend. The record
(``clusters.json``) also holds, for inspection only, a per-cluster class histogram and the
purity (share of a cluster's largest class; overall: the images in their cluster's largest
class over all images); the method never sees labels. :func:`clusters_markdown` renders the
records of every round (``clusters.md`` of a DnC run).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .models import DenseEncoder

CLUSTERS_NAME = "clusters.json"


def embed_images(model, images, data, which="features", *, batch_size=512, device=None, amp=False):
    """L2-normalised float32 embeddings (N, D) of ``images`` (an ImageSet or uint8 tensor) under
    the deterministic eval transform, model frozen in eval mode."""
    from ..eval.features import extract_features

    feats = extract_features(DenseEncoder(model, which), images, data.mean, data.std, batch_size=batch_size,
                             device=device, autocast_dtype=torch.bfloat16 if amp else None)
    return F.normalize(feats.features, dim=1)


def canonical_order(assignments, k):
    """Renumber clusters by decreasing size, ties by their first member, so the numbering does
    not depend on the backend's arbitrary one. Returns (new assignments, old id of each new id)."""
    n = assignments.shape[0]
    sizes = torch.bincount(assignments, minlength=k)
    first = torch.full((k,), n, dtype=torch.long)
    first.scatter_reduce_(0, assignments, torch.arange(n), reduce="amin")
    order = sorted(range(k), key=lambda j: (-int(sizes[j]), int(first[j])))
    remap = torch.empty(k, dtype=torch.long)
    remap[torch.tensor(order)] = torch.arange(k)
    return remap[assignments], order


def embed_distributed(model, images, data, which, dist_info, *, batch_size=512, device=None, amp=False):
    """:func:`embed_images` of ``images`` (an ImageSet) split over the ranks: rank r embeds the
    extraction batches r, r + W, ... (whole batches, so each feature is computed exactly as in one
    process) and rank 0 gets all of them back in order; the other ranks get None."""
    from .distributed import gather_object

    n = len(images)
    starts = list(range(0, n, batch_size))
    mine = starts[dist_info.rank::dist_info.world_size]
    pos = torch.cat([torch.arange(s, min(s + batch_size, n)) for s in mine]) if mine else \
        torch.empty(0, dtype=torch.long)
    local = embed_images(model, images.subset(pos), data, which, batch_size=batch_size, device=device,
                         amp=amp).cpu() if mine else None
    parts = gather_object(local, dist_info)
    if parts is None:
        return None
    out, taken = [], [0] * dist_info.world_size
    for b, s in enumerate(starts):  # batch b came from rank b % W
        q, size = b % dist_info.world_size, min(s + batch_size, n) - s
        out.append(parts[q][taken[q]:taken[q] + size])
        taken[q] += size
    return torch.cat(out)


def embed_stream(model, train, data, which, dist_info=None, *, batch_size=512, device=None, amp=False):
    """Embeddings (N, D) of a streamed set (``data/webdataset.py``) in its own order: rank r reads
    the shards r, r + W, ... once, unshuffled; rank 0 gets all of them (None on the other ranks)."""
    from .distributed import DistInfo, gather_object

    dist_info = dist_info or DistInfo()
    pos, feats = [], []
    for images, p in train.ordered_batches(batch_size, dist_info.rank, dist_info.world_size):
        feats.append(embed_images(model, images, data, which, batch_size=batch_size, device=device, amp=amp).cpu())
        pos.append(p)
    parts = gather_object((torch.cat(pos), torch.cat(feats)) if pos else None, dist_info)
    if parts is None:
        return None
    parts = [p for p in parts if p is not None]
    pos, feats = torch.cat([p for p, _ in parts]), torch.cat([f for _, f in parts])
    if pos.numel() != len(train) or torch.unique(pos).numel() != len(train):
        raise ValueError(f"the shards gave {pos.numel()} of the {len(train)} samples to embed; are all shards there?")
    out = torch.empty(len(train), feats.shape[1], dtype=feats.dtype)
    out[pos] = feats
    return out


def cluster_stage(model, data, opt, *, seed=0, batch_size=512, device=None, amp=False, dist_info=None) -> dict:
    """Embed the training split with the base model, run k-means and return the clusters record
    (what ``clusters.json`` holds). ``opt`` is the run's DnCConfig. Under torchrun (``dist_info``
    enabled) every rank embeds its share of the images and rank 0 alone runs k-means on all of
    them (the other ranks return None), so the record is the one-process one."""
    from .kmeans import kmeans

    device = torch.device(device) if device is not None else torch.device("cpu")
    if opt.k > len(data.train):
        raise ValueError(f"--dnc-k={opt.k} exceeds the {len(data.train)} training images")
    t0 = time.perf_counter()
    streamed = hasattr(data.train, "ordered_batches")
    if streamed:
        emb = embed_stream(model, data.train, data, opt.cluster_on, dist_info, batch_size=batch_size, device=device,
                           amp=amp)
        if emb is None:
            return None
        emb = emb.to(device)
    elif dist_info is not None and dist_info.enabled:
        emb = embed_distributed(model, data.train, data, opt.cluster_on, dist_info, batch_size=batch_size,
                                device=device, amp=amp)
        if emb is None:
            return None
        emb = emb.to(device)
    else:
        emb = embed_images(model, data.train, data, opt.cluster_on, batch_size=batch_size, device=device, amp=amp)
    t_embed = time.perf_counter() - t0
    res = kmeans(emb, opt.k, iters=opt.kmeans_iters, seed=seed, metric=opt.kmeans_metric, backend=opt.kmeans_backend)
    assignments, order = canonical_order(res.assignments.cpu(), opt.k)
    centroids = res.centroids.cpu()[torch.tensor(order)]
    sizes = torch.bincount(assignments, minlength=opt.k)
    labels = data.train.labels
    labelled = labels >= 0  # an uncurated stream has no labels: no histogram for those samples
    class_counts = torch.zeros(opt.k, int(data.num_classes), dtype=torch.long)
    class_counts.index_put_((assignments[labelled], labels[labelled]), torch.ones_like(assignments[labelled]),
                            accumulate=True)
    purity, overall = cluster_purity(class_counts.tolist())
    return {
        "k": opt.k, "backend": res.backend, "metric": res.metric, "embedding": opt.cluster_on,
        "iterations": res.iterations, "inertia": res.inertia, "seed": int(seed),
        "embed_seconds": t_embed, "kmeans_seconds": time.perf_counter() - t0 - t_embed,
        "sizes": sizes.tolist(),
        "class_counts": class_counts.tolist(),
        "purity": purity, "overall_purity": overall,
        "train_indices": data.train.indices.tolist(),
        **({"keys": data.train.kept_keys()} if streamed else {}),  # a stream's experts keep these keys
        "assignments": assignments.tolist(),
        "centroids": centroids.tolist(),
    }


def read_clusters(run_dir_or_file) -> dict:
    """``clusters.json`` of a DnC run, with ``assignments`` (int64) and ``centroids`` (float32)
    as tensors."""
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / CLUSTERS_NAME
    try:
        rec = json.loads(path.read_text())
        rec["assignments"] = torch.tensor(rec["assignments"], dtype=torch.long)
        rec["centroids"] = torch.tensor(rec["centroids"], dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable clusters file: {exc}") from None
    return rec


def cluster_purity(class_counts):
    """(per-cluster purity, overall purity) of a (k, classes) histogram: the share of each
    cluster's largest class (None for an empty cluster) and the images in their cluster's
    largest class over all images."""
    rows = [list(map(int, r)) for r in class_counts]
    per = [max(r) / sum(r) if sum(r) else None for r in rows]
    total = sum(sum(r) for r in rows)
    return per, (sum(max(r) for r in rows if r) / total if total else None)


def cluster_summary(record) -> str:
    """One line: sizes and purities of a clusters record."""
    per, overall = cluster_purity(record["class_counts"])
    pur = ", ".join("-" if p is None else f"{p:.2f}" for p in per)
    return f"sizes {record['sizes']}, purity [{pur}], overall purity " + ("-" if overall is None else f"{overall:.3f}")


def clusters_markdown(rounds, class_names=None) -> str:
    """Markdown of the clusters of every round: ``rounds`` is a list of (round number, clusters
    record); one table per round with each cluster's size, purity and class histogram."""
    lines = ["# DnC clusters", "",
             "Purity: share of a cluster's largest class (labels are used for this report only; "
             "DnC never sees them). Overall: images in their cluster's largest class / all images.", ""]
    for r, rec in rounds:
        per, overall = cluster_purity(rec["class_counts"])
        n_cls = len(rec["class_counts"][0]) if rec["class_counts"] else 0
        names = list(class_names) if class_names is not None and len(class_names) == n_cls else \
            [str(c) for c in range(n_cls)]
        lines += [f"## Round {r}", "",
                  f"k = {rec['k']}, {rec.get('metric', '?')} k-means on the {rec.get('embedding', '?')} "
                  f"({rec.get('backend', '?')}), overall purity {'-' if overall is None else f'{overall:.3f}'}", "",
                  "| " + " | ".join(["cluster", "size", "purity", *names]) + " |",
                  "| " + " | ".join("---" for _ in range(3 + len(names))) + " |"]
        for k, (size, p, row) in enumerate(zip(rec["sizes"], per, rec["class_counts"])):
            cells = [str(k), str(size), "-" if p is None else f"{p:.3f}", *(str(int(c)) for c in row)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
