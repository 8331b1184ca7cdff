"""Plain DistributedDataParallel (default arguments, broadcast_buffers=True), 2 gloo processes on
CPU, eager and under torch.compile: each rank's statistics are those of its own local batches
(DDP does not broadcast them: they are not buffers), and gradstats.all_reduce_grad_stats merges
them, in one collective, into those of one process on the global batch.

The single-process references follow DDP's parameters exactly: a model trained on both halves
of each global batch with each loss halved (DDP's gradient average; per-rank BatchNorm
normalises each half separately), and, per rank, a recorder model loaded with those parameters
before each step that runs that rank's half alone (loss not halved: a rank's own units). float64
throughout."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import assert_close_scaled, global_batches
from torch.nn.parallel import DistributedDataParallel

import gradstats
from gradstats.models import cifar_resnet
from gradstats.stats import SLOT_ACCUMULATED, SLOT_LAST, GradStats

WORLD = 2
LOCAL_BATCH = 4
STEPS = 3
TOL = 1e-10

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
    ),
    pytest.mark.usefixtures("one_thread"),
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return gradstats.instrument(cifar_resnet(8, num_classes=5)).double()


def _batches():
    """STEPS global batches of WORLD * LOCAL_BATCH images, the same in every process."""
    return global_batches(STEPS, WORLD * LOCAL_BATCH)


def _half(x, y, rank):
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return x[mine], y[mine]


def _states(model):
    return [m.grad_stats_state.clone() for _, m in gradstats.batchnorms(model) + gradstats.probes(model)]


def _worker(rank: int, store: str, out: str, compiled: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        net = DistributedDataParallel(model)  # default arguments: broadcast_buffers=True
        if compiled:
            net = torch.compile(net, backend="aot_eager")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for x, y in _batches():
            images, labels = _half(x, y, rank)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(images), labels).backward()
            optimizer.step()
        local = _states(model)
        gradstats.all_reduce_grad_stats(model)
        merged = _states(model)
        try:  # a second merge before a reset would count the merged interval once per rank
            gradstats.all_reduce_grad_stats(model)
            again = None
        except RuntimeError as error:
            again = str(error)
        for _, m in gradstats.batchnorms(model) + gradstats.probes(model):
            m.reset_grad_stats()
        gradstats.all_reduce_grad_stats(model)  # after the reset: a merge again
        torch.save({"local": local, "merged": merged, "again": again}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _references():
    """(merged, per-rank local) statistics of single-process runs that follow DDP's parameters."""
    model = _model()
    recorders = [_model() for _ in range(WORLD)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in _batches():
        for rank, recorder in enumerate(recorders):
            recorder.load_state_dict(model.state_dict())  # parameters only: statistics are kept
            F.cross_entropy(recorder(_half(x, y, rank)[0]), _half(x, y, rank)[1]).backward()
        optimizer.zero_grad(set_to_none=True)
        for rank in range(WORLD):
            images, labels = _half(x, y, rank)
            (F.cross_entropy(model(images), labels) / WORLD).backward()
        optimizer.step()
    return _states(model), [_states(r) for r in recorders]


def _assert_slot(actual, expected, what):
    a, e = GradStats.from_slot(actual), GradStats.from_slot(expected)
    assert a is not None and e is not None, what
    for kind in ("grad_output", "grad_input"):
        ca, ce = getattr(a, kind), getattr(e, kind)
        assert torch.equal(ca.count, ce.count), f"{what} {kind} count"
        assert_close_scaled(ca.mean, ce.mean, ce.std + ce.mean.abs(), TOL, f"{what} {kind} mean")
        assert_close_scaled(ca.var, ce.var, ce.var, TOL, f"{what} {kind} var")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_plain_ddp_records_local_batches_and_all_reduce_merges_them(tmp_path, compiled):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), compiled), nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    merged, local = _references()
    for rank, result in enumerate(results):
        for index, (got, want) in enumerate(zip(result["local"], local[rank])):
            _assert_slot(got[SLOT_ACCUMULATED], want[SLOT_ACCUMULATED], f"rank {rank} local #{index}")
            _assert_slot(got[SLOT_LAST], want[SLOT_LAST], f"rank {rank} local last #{index}")
        for index, (got, want) in enumerate(zip(result["merged"], merged)):
            _assert_slot(got[SLOT_ACCUMULATED], want[SLOT_ACCUMULATED], f"rank {rank} merged #{index}")
    # The ranks recorded different batches, and the merge made them one.
    assert not torch.allclose(results[0]["local"][0], results[1]["local"][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0]["merged"], results[1]["merged"]))
    # Merging twice without a reset in between is refused, naming the remedy.
    assert all(r["again"] is not None and "reset_grad_stats()" in r["again"] for r in results), [
        r["again"] for r in results
    ]
