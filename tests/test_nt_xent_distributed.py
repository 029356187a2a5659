"""gather_distributed=True on two gloo processes equals one process holding the whole batch.

Single-process batch: [z1 of rank 0, z1 of rank 1; z2 of rank 0, z2 of rank 1], so the
positive of rank r's local row i (view 1) is global row N + r n + i. One-matrix cases
(nt_xent(z, labels=idx)): [z of rank 0; z of rank 1] with their labels. Convention under test:
each rank's "mean" is over its own 2n rows, the ranks' mean equals the single-process loss,
and the gradient reaching each rank's z is world_size x the single-process gradient, which
DDP's averaging turns into the single-process parameter gradient.
"""
import os


import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from helpers import free_port  # noqa: E402
from sdclr_fast.ops.nt_xent import nt_xent  # noqa: E402
from sdclr_fast.ops.reference import nt_xent_reference  # noqa: E402

WORLD = 2
N, D, D_IN = 5, 7, 6

# name: (dtype, backend, reduction, labels kind ("m": one matrix), weights, normalize)
CASES = {
    "two_view": (torch.float64, "torch", "mean", None, False, True),
    "two_view_sum_weights": (torch.float64, "torch", "none", None, True, True),
    "labels_n": (torch.float64, "torch", "mean", "n", True, True),
    "labels_2n": (torch.float64, "torch", "none", "2n", False, False),
    "labels_2n_in": (torch.float64, "torch", "none", "2n", True, True),
    "one_matrix_in": (torch.float64, "torch", "mean", "m", True, True),
    "triton_two_view": (torch.float32, "triton", "none", None, True, True),
    "triton_labels": (torch.float32, "triton", "mean", "2n", False, True),
    "triton_labels_in": (torch.float32, "triton", "none", "2n", False, True),
    "triton_one_matrix": (torch.float32, "triton", "none", "m", True, True),
}
MULTI_POSITIVE = {name: "in" if name.endswith("_in") else "out" for name in CASES}
M = 7  # rows per rank in the one-matrix cases (odd)


def _data(name):
    """Every rank's inputs, generated identically in all processes."""
    dtype, _, reduction, labels, weights, _ = CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    z1 = torch.randn(WORLD, N, D, generator=g, dtype=torch.float64).to(dtype)
    z2 = torch.randn(WORLD, N, D, generator=g, dtype=torch.float64).to(dtype)
    lab = None
    rows = 2 * N
    if labels == "n":
        lab = torch.randint(0, 3, (WORLD, N), generator=g)
    elif labels == "2n":
        lab = torch.randint(0, 4, (WORLD, 2 * N), generator=g)
    elif labels == "m":  # one matrix per rank: z1 holds it, z2 is None
        z1, z2, rows = torch.randn(WORLD, M, D, generator=g, dtype=torch.float64).to(dtype), None, M
        lab = torch.randint(0, 5, (WORLD, M), generator=g)
    w = torch.rand(WORLD, rows, generator=g, dtype=torch.float64).to(dtype) if weights else None
    cot = torch.rand(WORLD, rows, generator=g, dtype=torch.float64) + 0.5
    return z1, z2, lab, w, cot


N_PAIRED = 32  # local pairs that fill whole row tiles of the interpreter's kernels


def _paired_data():
    g = torch.Generator().manual_seed(11)
    z1, z2 = (torch.randn(WORLD, N_PAIRED, D, generator=g) for _ in range(2))
    return z1, z2, torch.rand(WORLD, 2 * N_PAIRED, generator=g, dtype=torch.float64) + 0.5


def _ddp_data():
    g = torch.Generator().manual_seed(7)
    x1 = torch.randn(WORLD, N, D_IN, generator=g, dtype=torch.float64)
    x2 = torch.randn(WORLD, N, D_IN, generator=g, dtype=torch.float64)
    lin = torch.nn.Linear(D_IN, D, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(D, D_IN, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(D, generator=g, dtype=torch.float64))
    return x1, x2, lin


def _worker(rank, port, out_dir):
    from sdclr_fast.kernels import nt_xent as kn

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, (dtype, backend, reduction, _, _, normalize) in CASES.items():
            z1, z2, lab, w, cot = _data(name)
            a = z1[rank].clone().requires_grad_(True)
            b = None if z2 is None else z2[rank].clone().requires_grad_(True)
            out = nt_xent(a, b, 0.3, normalize=normalize, reduction=reduction,
                          weights=None if w is None else w[rank],
                          labels=None if lab is None else lab[rank],
                          multi_positive=MULTI_POSITIVE[name],
                          gather_distributed=True, _backend=backend)
            (out.double() * cot[rank]).sum().backward() if reduction == "none" else out.backward()
            results[name] = (out.detach(), a.grad, None if b is None else b.grad)
        # two views whose local pairs fill whole row tiles: the PAIRED kernels
        z1p, z2p, cotp = _paired_data()
        a, b = z1p[rank].clone().requires_grad_(True), z2p[rank].clone().requires_grad_(True)
        plans, real = [], kn.plan
        kn.plan = lambda *args, **kw: plans.append(real(*args, **kw)) or plans[-1]
        try:
            out = nt_xent(a, b, 0.3, reduction="none", gather_distributed=True, _backend="triton")
            (out.double() * cotp[rank]).sum().backward()
        finally:
            kn.plan = real
        results["paired"] = (out.detach(), a.grad, b.grad, [p["meta"]["PAIRED"] for p in plans])
        # DDP: averaged parameter gradients must equal the single-process ones.
        x1, x2, lin = _ddp_data()
        model = torch.nn.parallel.DistributedDataParallel(lin)
        loss = nt_xent(model(x1[rank]), model(x2[rank]), 0.2, gather_distributed=True)
        loss.backward()
        results["ddp"] = (loss.detach(), lin.weight.grad, lin.bias.grad)
        # Unequal local batches are refused on every rank.
        try:
            k = N if rank == 0 else N - 1
            nt_xent(torch.randn(k, D), torch.randn(k, D), gather_distributed=True)
        except ValueError as exc:
            results["unequal"] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: see helpers.free_port
    finally:
        dist.destroy_process_group()


def _single(name):
    dtype, _, reduction, labels, weights, normalize = CASES[name]
    z1, z2, lab, w, cot = _data(name)
    if labels == "m":  # [z of rank 0; z of rank 1]: rank r's rows are r M .. (r + 1) M
        a = torch.cat(list(z1)).double().requires_grad_(True)
        out = nt_xent_reference(a, None, 0.3, normalize=normalize, reduction=reduction,
                                weights=None if w is None else torch.cat(list(w)).double(),
                                labels=torch.cat(list(lab)),
                                multi_positive=MULTI_POSITIVE[name])
        (out * torch.cat(list(cot))).sum().backward() if reduction == "none" else out.backward()
        return out.detach(), a.grad, None
    a = torch.cat(list(z1)).double().requires_grad_(True)
    b = torch.cat(list(z2)).double().requires_grad_(True)
    if labels == "n":
        lab = torch.cat(list(lab))
    elif labels == "2n":
        lab = torch.cat([lab[:, :N].reshape(-1), lab[:, N:].reshape(-1)])
    split = lambda t: torch.cat([t[:, :N].reshape(-1), t[:, N:].reshape(-1)])  # noqa: E731
    w = split(w.double()) if w is not None else None
    out = nt_xent_reference(a, b, 0.3, normalize=normalize, reduction=reduction, weights=w,
                            labels=lab, multi_positive=MULTI_POSITIVE[name])
    if reduction == "none":
        # each rank scales its rows' gradient by its own cot; the single process sees them all
        (out * split(cot)).sum().backward()
    else:
        out.backward()
    return out.detach(), a.grad, b.grad


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(free_port(), out_dir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def _rows(t, r):
    """Rank r's rows of a single-process per-row tensor (2 * WORLD * N, ...)."""
    return torch.cat([t[r * N:(r + 1) * N], t[WORLD * N + r * N:WORLD * N + (r + 1) * N]])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process(results, name):
    dtype, _, reduction, labels, *_ = CASES[name]
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    out, ga, gb = _single(name)
    factor = 1.0 if reduction == "none" else WORLD
    if labels == "m":
        for r in range(WORLD):
            if reduction == "none":
                torch.testing.assert_close(results[r][name][0].double(),
                                           out[r * M:(r + 1) * M], **tol)
            torch.testing.assert_close(results[r][name][1].double(),
                                       ga[r * M:(r + 1) * M] * factor, **tol)
        if reduction != "none":
            mean = sum(results[r][name][0].double() for r in range(WORLD)) / WORLD
            torch.testing.assert_close(mean, out, **tol)
        return
    if reduction == "none":
        for r in range(WORLD):
            torch.testing.assert_close(results[r][name][0].double(), _rows(out, r), **tol)
    else:
        mean = sum(results[r][name][0].double() for r in range(WORLD)) / WORLD
        torch.testing.assert_close(mean, out, **tol)
    # For "none" every rank's loss is a plain function of its rows; the gather's summed
    # backward makes each z's gradient the single-process one (x WORLD for "mean").
    for r in range(WORLD):
        torch.testing.assert_close(results[r][name][1].double(), ga[r * N:(r + 1) * N] * factor,
                                   **tol)
        torch.testing.assert_close(results[r][name][2].double(), gb[r * N:(r + 1) * N] * factor,
                                   **tol)


@pytest.mark.slow
def test_paired_kernels_under_a_gather_match_single_process(results):
    """Two views with N = 32 per rank: the query rows' pairs fill whole row tiles, so the
    gathered rows take the PAIRED kernels (forward and backward), and each rank's losses and
    gradients equal the single-process reference's."""
    z1, z2, cot = _paired_data()
    a = torch.cat(list(z1)).double().requires_grad_(True)
    b = torch.cat(list(z2)).double().requires_grad_(True)
    out = nt_xent_reference(a, b, 0.3, reduction="none")
    split = torch.cat([cot[:, :N_PAIRED].reshape(-1), cot[:, N_PAIRED:].reshape(-1)])
    (out * split).sum().backward()
    n = N_PAIRED
    for r in range(WORLD):
        got, ga, gb, paired = results[r]["paired"]
        assert paired == [True, True], paired
        rows = torch.cat([out[r * n:(r + 1) * n], out[WORLD * n + r * n:WORLD * n + (r + 1) * n]])
        torch.testing.assert_close(got.double(), rows.detach(), rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(ga.double(), a.grad[r * n:(r + 1) * n], rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(gb.double(), b.grad[r * n:(r + 1) * n], rtol=2e-5, atol=1e-6)


@pytest.mark.slow
def test_ddp_parameter_gradients_match_single_process(results):
    x1, x2, lin = _ddp_data()
    loss = nt_xent_reference(lin(torch.cat(list(x1))), lin(torch.cat(list(x2))), 0.2)
    loss.backward()
    for r in range(WORLD):
        got_loss, gw, gb = results[r]["ddp"]
        torch.testing.assert_close(gw, lin.weight.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gb, lin.bias.grad, rtol=1e-9, atol=1e-12)
    mean = sum(results[r]["ddp"][0] for r in range(WORLD)) / WORLD
    torch.testing.assert_close(mean, loss.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_unequal_local_batches_are_refused(results):
    for r in range(WORLD):
        assert "same N on every rank" in results[r]["unequal"]
