"""fastclip.loss.ClipLoss against open_clip's ClipLoss and a float64 reference, on one and several ranks."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from loss_inputs import features

from fastclip.loss import ClipLoss


def _features(n: int, d: int, seed: int, dtype=torch.float32):
    return tuple(t.to(dtype) for t in features(n, d, seed, noise=0.8, scale=(14.0, 17.0)))


def _loss_and_grads(loss_fn, a, b, s):
    a, b, s = (x.detach().clone().requires_grad_() for x in (a, b, s))
    loss = loss_fn(a, b, s)
    loss.backward()
    return loss.detach(), a.grad, b.grad, s.grad


def _reference64(a, b, s):
    logits = s.double() * a.double() @ b.double().T
    labels = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("n, d", [(1, 64), (3, 500), (127, 512), (300, 768)])
def test_matches_open_clip_and_float64(n, d):
    from open_clip.loss import ClipLoss as OpenClipLoss

    a, b, s = _features(n, d, seed=n + d)
    ours = _loss_and_grads(ClipLoss(), a, b, s)
    theirs = _loss_and_grads(OpenClipLoss(), a, b, s)
    ref = _loss_and_grads(_reference64, a.double(), b.double(), s.double())
    for x, y, r in zip(ours, theirs, ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.double(), r, rtol=1e-5, atol=1e-6)


def test_output_dict_and_bad_input():
    a, b, s = _features(4, 8, seed=0)
    out = ClipLoss()(a, b, s, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    with pytest.raises(ValueError, match=r"image_features and text_features must both be \[N, D\]"):
        ClipLoss()(a, b[:3], s)
    with pytest.raises(ValueError, match="N=0"):
        ClipLoss()(a[:0], b[:0], s)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        ClipLoss()(a, b, torch.ones(2))
    nan = a.clone()
    nan[1, 2] = float("nan")
    assert torch.isnan(ClipLoss()(nan, b, s))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


VARIANTS = [(True, "auto"), (False, "auto"), (True, "torch"), (False, "torch")]  # (local_loss, backend)


def _rank_worker(rank, world, port, a, b, s, out):
    """Every VARIANT's loss and gradients on this rank, reduced as a data-parallel engine would; rank 0 sends them."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = a.shape[0] // world
    rows = slice(rank * n, (rank + 1) * n)
    results = []
    for local_loss, backend in VARIANTS:
        loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world, backend=backend)
        loss, ga, gb, gs = _loss_and_grads(loss_fn, a[rows], b[rows], s)
        # what a data-parallel engine does: average the loss and the parameter (here: logit scale) gradient over
        # ranks; a rank's feature gradient already holds every rank's contribution (reduce-scatter), over world
        for t in (loss, gs):
            dist.all_reduce(t)
        grads_a = [torch.empty_like(ga) for _ in range(world)]
        grads_b = [torch.empty_like(gb) for _ in range(world)]
        dist.all_gather(grads_a, ga / world)
        dist.all_gather(grads_b, gb / world)
        # numpy arrays travel by value: a tensor would travel as a shared-memory handle that dies with us
        results.append(tuple(t.numpy() for t in (loss / world, torch.cat(grads_a), torch.cat(grads_b), gs / world)))
    if rank == 0:
        out.put(results)
    dist.barrier()
    dist.destroy_process_group()
    out.close()
    out.join_thread()  # rank 0's result has reached the parent
    # The numbers are this test's subject. Interpreter teardown of a spawned gloo worker on an oversubscribed
    # 2-core machine aborted once in ~40 runs (SIGABRT after the result was sent); skip that teardown.
    os._exit(0)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_match_one_rank_on_the_global_batch(world):
    """The mean over ranks of the loss and gradients equals the one-rank values on the whole batch, for local and
    global losses, fused and plain (one launch of the ranks for all four)."""
    a, b, s = _features(12 * world, 32, seed=world)
    one_rank = _loss_and_grads(ClipLoss(), a, b, s)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, world, port, a, b, s, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # local-loss rows each see every column: the loss over ranks averages to the global loss
    for variant, result in zip(VARIANTS, results):
        for ours, ref in zip(result, one_rank):
            torch.testing.assert_close(torch.from_numpy(ours), ref, rtol=1e-5, atol=1e-6, msg=str(variant))


def _no_grad_gather_worker(rank, world, port, a, b, s, out):
    import torch.distributed as dist
    from open_clip.loss import ClipLoss as OpenClipLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = a.shape[0] // world
    rows = slice(rank * n, (rank + 1) * n)
    for local_loss in (True, False):
        kwargs = dict(local_loss=local_loss, gather_with_grad=False, rank=rank, world_size=world)
        ours = _loss_and_grads(ClipLoss(**kwargs), a[rows], b[rows], s)
        theirs = _loss_and_grads(OpenClipLoss(**kwargs), a[rows], b[rows], s)
        out.put((rank, local_loss, [t.numpy() for t in ours], [t.numpy() for t in theirs]))
    dist.barrier()
    dist.destroy_process_group()
    out.close()
    out.join_thread()
    os._exit(0)  # as _rank_worker: skip a gloo worker's interpreter teardown


def test_gather_without_grad_matches_open_clip_rank_by_rank():
    """With gather_with_grad false the other ranks' features are constants, so a rank's gradients are not the
    one-rank ones: the contract is open_clip's own numbers, rank by rank (local loss and not, one launch)."""
    world = 2
    a, b, s = _features(10 * world, 24, seed=7)
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_no_grad_gather_worker, args=(r, world, port, a, b, s, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in range(2 * world)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted((rank, local) for rank, local, *_ in results) == [(0, False), (0, True), (1, False), (1, True)]
    for rank, local_loss, ours, theirs in results:
        for x, y in zip(ours, theirs):
            torch.testing.assert_close(
                torch.from_numpy(x), torch.from_numpy(y), rtol=1e-5, atol=1e-6, msg=f"rank {rank}, {local_loss}"
            )
