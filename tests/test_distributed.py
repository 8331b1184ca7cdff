"""Distributed training with gradient statistics, with two gloo processes on CPU spawned from
pytest: the statistics merged from 2 ranks x batch B equal those of one process on the global
batch of 2B, DDP's gradients equal that process's, plain DDP leaves each rank's statistics alone
(they are not buffers), and GradStatSyncBatchNorm2d gives the gradients of batch norm over the global batch.

One process "on the global batch" means: with per-rank BatchNorm, the process normalises each
rank's B samples separately, as DDP does (gradient accumulation over the two halves, each loss
halved); with GradStatSyncBatchNorm2d, it is a plain model on all 2B samples. float64 throughout,
so agreement is to 1e-10 relative."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import assert_close_scaled, global_batches, read_records
from torch.nn.parallel import DistributedDataParallel

import gradstats
from gradstats import distributed
from gradstats.models import cifar_resnet
from gradstats.stats import GradStats, PerSampleStats
from gradstats.syncbn import GradStatSyncBatchNorm2d, convert_sync_batchnorm
from gradstats.tools import launch
from gradstats.tools.checkpoint import load_checkpoint
from gradstats.tools.cli import main as cli_main

WORLD = 2
LOCAL_BATCH = 4
STEPS = 3
TOL = 1e-10

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
    ),
    pytest.mark.usefixtures("one_thread"),  # tiny models: see conftest.one_thread
]


def _model(sync: bool, per_sample: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=5)
    if sync:
        convert_sync_batchnorm(model, per_sample=per_sample)
    return gradstats.instrument(model, per_sample=per_sample).double()


def _batches():
    """STEPS global batches of WORLD * LOCAL_BATCH images, the same in every process."""
    return global_batches(STEPS, WORLD * LOCAL_BATCH)


def _recorders(model):
    return [m for _, m in gradstats.batchnorms(model)] + [m for _, m in gradstats.probes(model)]


def _train(net, model, parts):
    """STEPS SGD steps; ``parts(x, y)`` yields (images, labels, loss scale) for this process.
    Returns each step's parameter gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    grads = []
    for x, y in _batches():
        optimizer.zero_grad(set_to_none=True)
        for images, labels, scale in parts(x, y):
            (F.cross_entropy(net(images), labels) * scale).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        optimizer.step()
    return grads


def _worker(rank: int, store: str, out: str, sync: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        ctx = launch.setup("cpu")
        assert (ctx.rank, ctx.world_size) == (rank, WORLD)
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        result = {}
        for ignore in (True, False) if not sync else (True,):
            model = _model(sync, per_sample=sync)  # SyncBN: its per-sample path too
            net = launch.wrap_ddp(model, ctx) if ignore else DistributedDataParallel(model)
            grads = _train(net, model, lambda x, y: [(x[mine], y[mine], 1.0)])
            modules = _recorders(model)
            window = torch.zeros(2, dtype=torch.float64)
            merged, _ = distributed.gather_stats(modules, window)
            result[f"ignore={ignore}"] = {"grads": grads, "merged": merged}
            if ignore:  # a checkpoint's consolidation must not change what is merged later
                window += torch.tensor([1.0, rank + 1.0], dtype=torch.float64)
                distributed.consolidate(modules, window)
                result["window"] = window.clone()
                result["after_consolidate"] = distributed.gather_stats(modules, window)[0]
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, sync: bool) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), sync), nprocs=WORLD)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_grads(actual, expected, what):
    for step, (a, e) in enumerate(zip(actual, expected)):
        for name in e:
            assert_close_scaled(a[name], e[name], e[name].abs().max(), TOL, f"{what} step {step} {name}")


def _assert_stats(actual, expected, what):
    a, e = GradStats.from_slot(actual), GradStats.from_slot(expected)
    assert a is not None and e is not None, what
    for kind in ("grad_output", "grad_input"):
        ca, ce = getattr(a, kind), getattr(e, kind)
        assert torch.equal(ca.count, ce.count), f"{what} {kind} count"
        assert_close_scaled(ca.mean, ce.mean, ce.std + ce.mean.abs(), TOL, f"{what} {kind} mean")
        assert_close_scaled(ca.var, ce.var, ce.var, TOL, f"{what} {kind} var")


def _accumulated(model):
    """(names, accumulated statistics) of model's recorders, in the order the ranks report them."""
    named = gradstats.batchnorms(model) + gradstats.probes(model)  # the order of _recorders
    return [n for n, _ in named], [m.grad_stats_state[gradstats.stats.SLOT_ACCUMULATED] for _, m in named]


def test_two_ranks_equal_one_process_per_rank_batchnorm(tmp_path):
    results = _spawn(tmp_path, sync=False)
    # One process: the two halves normalised separately, each loss halved (DDP's average).
    model = _model(sync=False)

    def halves(x, y):
        return [
            (
                x[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH],
                y[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH],
                1.0 / WORLD,
            )
            for r in range(WORLD)
        ]

    grads = _train(model, model, halves)
    names, expected = _accumulated(model)
    for rank, result in enumerate(results):
        ok = result["ignore=True"]
        _assert_grads(ok["grads"], grads, f"rank {rank} DDP gradients")
        for name, a, e in zip(names, ok["merged"], expected):
            _assert_stats(a, e, f"rank {rank} {name}")
        for name, a, e in zip(names, result["after_consolidate"], expected):
            _assert_stats(a, e, f"rank {rank} {name} after consolidate")
        # consolidate sums the extras into rank 0: (1 + 1) and (1 + 2)
        assert result["window"].tolist() == ([2.0, 3.0] if rank == 0 else [0.0, 0.0])
        # Plain DDP (default arguments) gives the same: the statistics are not buffers, so its
        # broadcast of rank 0's buffers leaves every rank's own statistics alone.
        plain = result["ignore=False"]
        _assert_grads(plain["grads"], grads, f"rank {rank} plain DDP gradients")
        for name, a, e in zip(names, plain["merged"], expected):
            _assert_stats(a, e, f"rank {rank} {name} plain DDP")


def test_two_ranks_sync_batchnorm_equal_one_process_on_global_batch(tmp_path):
    results = _spawn(tmp_path, sync=True)
    model = _model(sync=False, per_sample=True)  # plain GradStatBatchNorm2d on all 2B samples
    grads = _train(model, model, lambda x, y: [(x, y, 1.0)])
    names, expected = _accumulated(model)
    for rank, result in enumerate(results):
        ok = result["ignore=True"]
        _assert_grads(ok["grads"], grads, f"rank {rank} SyncBN DDP gradients")
        for name, a, e in zip(names, ok["merged"], expected):
            _assert_stats(a, e, f"rank {rank} {name}")
            # Each rank's samples' terms given the global batch: over the ranks, the terms of
            # one process on the global batch.
            pa, pe = PerSampleStats.from_slot(a), PerSampleStats.from_slot(e)
            assert (pa is None) == (pe is None) == (".grad_probe" in name), name
            for kind in ("grad_weight", "grad_bias") if pe is not None else ():
                ca, ce = getattr(pa, kind), getattr(pe, kind)
                assert torch.equal(ca.count, ce.count), f"{name} {kind} count"
                assert_close_scaled(ca.mean, ce.mean, ce.std + ce.mean.abs(), TOL, f"{name} {kind} mean")
                assert_close_scaled(ca.var, ce.var, ce.var, TOL, f"{name} {kind} var")


def test_sync_batchnorm_without_process_group_is_gradstat_batchnorm():
    torch.manual_seed(0)
    plain = gradstats.GradStatBatchNorm2d(6)
    sync = convert_sync_batchnorm(torch.nn.Sequential(gradstats.GradStatBatchNorm2d(6)))[0]
    assert type(sync) is GradStatSyncBatchNorm2d
    sync.load_state_dict(plain.state_dict())
    x = torch.randn(4, 6, 3, 3, requires_grad=True)
    for layer in (plain, sync):
        layer(x).pow(2).sum().backward()
    assert torch.equal(plain.grad_stats_state, sync.grad_stats_state)
    assert torch.equal(plain.running_var, sync.running_var)


def test_sync_batchnorm_forward_with_nonfinite_input_is_nan_like_batchnorm(tmp_path):
    """The synchronised forward (run here in a one-process group) gives a channel that holds NaN
    or an infinity NaN statistics and output, as nn.BatchNorm2d does; clean channels match it."""
    from gradstats.syncbn import _SyncBatchNormWithGradStats

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(1)
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
        x[1, 0, 2, 2] = float("inf")
        x[0, 2, 0, 0] = float("nan")
        sync, plain = GradStatSyncBatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()
        out = _SyncBatchNormWithGradStats.apply(
            x,
            sync.weight,
            sync.bias,
            sync.running_mean,
            sync.running_var,
            sync.grad_stats_state,
            0.1,
            sync.eps,
            0.9,
            None,
            1,
            None,  # no per-sample terms kept
        )
        expected = plain(x)
        assert out[:, [0, 2]].isnan().all() and expected[:, [0, 2]].isnan().all()
        torch.testing.assert_close(out[:, 1], expected[:, 1], rtol=1e-12, atol=1e-12)
        assert sync.running_mean[[0, 2]].isnan().all() and sync.running_var[[0, 2]].isnan().all()
        torch.testing.assert_close(sync.running_var[1], plain.running_var[1], rtol=1e-12, atol=0)
    finally:
        dist.destroy_process_group()


def test_torchrun_cli_sync_bn_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m gradstats train --sync-bn` logs what one process logs, also
    when it stops mid-interval and one process resumes it (its checkpoint holds both ranks'
    statistics, which the resumed run converts to its own units)."""
    options = [
        "--depth",
        "8",
        "--batch-size",
        "32",
        "--steps",
        "4",
        "--log-every",
        "2",
        "--sync-bn",
        "--dtype",
        "float64",
        "--no-progress",
        "--no-tensorboard",
        "--device",
        "cpu",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli_main(["train", "--out", str(one), *options]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "gradstats",
            "train",
            "--out",
            str(two),
            "--stop-at",
            "3",
            *options,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )  # not the source folder, whose gradstats/ has no compiled extension
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(two)) == ["checkpoint.pt", "stats.jsonl"]  # rank 0 wrote, nothing else
    assert load_checkpoint(str(two / "checkpoint.pt"))["world_size"] == 2
    assert cli_main(["train", "--out", str(two), "--resume", "--no-progress"]) == 0
    a, b = read_records(two), read_records(one)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4]
    for ra, rb in zip(a, b):  # step 2: two processes; step 4: steps 3 (two) and 4 (one)
        assert ra["samples"] == rb["samples"] == 64
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=TOL)
        for kind in ("bn_layers", "blocks"):
            assert [x["name"] for x in ra[kind]] == [x["name"] for x in rb[kind]]
            for xa, xb in zip(ra[kind], rb[kind]):
                assert xa["count"] == xb["count"]
                for key, value in xb.items():
                    if key.endswith(("_var", "_var_min", "_var_max")):
                        assert xa[key] == pytest.approx(value, rel=TOL), (ra["step"], xb["name"], key)
                    elif key.endswith("_mean"):  # means are ~0: relative to the spread
                        spread = xb[key.replace("_mean", "_var")] ** 0.5
                        assert abs(xa[key] - value) <= TOL * spread, (ra["step"], xb["name"], key)
    wa, wb = load_checkpoint(str(two / "checkpoint.pt")), load_checkpoint(str(one / "checkpoint.pt"))
    for name, value in wb["model"].items():
        if value.is_floating_point() and not name.endswith("grad_stats_state"):
            assert_close_scaled(wa["model"][name], value, value.abs().max().clamp_min(1e-30), TOL, name)
