"""`gradstats bench`: the rows, the summary and the JSON it writes are consistent with each other
and with the byte count, bad options get a clear error, --e2e compares equal work (its hooks
variant computes the statistics gradstats records) and reports every variant's times, page
faults and per-round overheads, and the allocator is the default one unless --steady-allocator
asks otherwise, as the output says. Timings themselves are never asserted."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import cli_error

from gradstats import batchnorms
from gradstats.tools.bench import cli as bench_cli
from gradstats.tools.bench import step as bench_step
from gradstats.tools.bench.op import HEADER, PER_SAMPLE_HEADER, PRESETS, bench_shape
from gradstats.tools.bench.step import BASELINE, VARIANTS, _variants, summarize
from gradstats.tools.cli import main as cli_main


def test_bench_rows_summary_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = [
        "bench",
        "--shape",
        "4,3,5,5",
        "--shape",
        "2,17,3,2",
        "--both-layouts",
        "--dtype",
        "bfloat16",
        "--repeats",
        "2",
        "--json",
        str(path),
    ]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    header = out.index(HEADER)
    lines = out[header + 1 : header + 5]
    assert [line.split()[:3] for line in lines] == [
        ["4x3x5x5", "bfloat16", "nchw"],
        ["4x3x5x5", "bfloat16", "channels_last"],
        ["2x17x3x2", "bfloat16", "nchw"],
        ["2x17x3x2", "bfloat16", "channels_last"],
    ]
    assert len({len(line) for line in lines}) == 1  # fixed width
    payload = json.loads(path.read_text())
    rows = payload["rows"]
    assert [(r["shape"], r["layout"]) for r in rows] == [
        ([4, 3, 5, 5], "nchw"),
        ([4, 3, 5, 5], "channels_last"),
        ([2, 17, 3, 2], "nchw"),
        ([2, 17, 3, 2], "channels_last"),
    ]
    for r, line in zip(rows, lines):
        assert r["dtype"] == "bfloat16" and r["device"] == "cpu"
        assert r["bytes"] == 5 * math.prod(r["shape"]) * 2  # read dy and x twice, write dx
        assert all(r[k] > 0 for k in ("fused_ms", "native_ms", "unfused_ms", "copy_gbps"))
        assert r["fused_gbps"] == pytest.approx(r["bytes"] / r["fused_ms"] / 1e6)
        assert r["fused_vs_native"] == pytest.approx(r["fused_ms"] / r["native_ms"])
        assert r["unfused_vs_fused"] == pytest.approx(r["unfused_ms"] / r["fused_ms"])
        assert r["fused_pct_copy"] == pytest.approx(100 * r["fused_gbps"] / r["copy_gbps"])
        printed = line.split()
        assert float(printed[-2]) == pytest.approx(r["fused_vs_native"], abs=6e-4)
        assert float(printed[-1]) == pytest.approx(r["unfused_vs_fused"], abs=6e-3)
    summary = payload["summary"]
    assert summary["fused_vs_native_geomean"] == pytest.approx(
        statistics.geometric_mean([r["fused_vs_native"] for r in rows])
    )
    assert summary["unfused_vs_fused_geomean"] == pytest.approx(
        statistics.geometric_mean([r["unfused_vs_fused"] for r in rows])
    )
    assert (
        f"geometric mean over 4 configurations: fused/native {summary['fused_vs_native_geomean']:.3f}"
        in "\n".join(out)
    )
    assert payload["repeats"] == 2 and payload["machine"]
    assert payload["allocator"] == "default"
    assert any(line.startswith("allocator: default") for line in out)
    assert all(r["per_sample_ms"] is None for r in rows)  # timed only when asked
    assert "per_sample_vs_fused_geomean" not in summary


def test_bench_per_sample_columns(tmp_path, capsys):
    """--per-sample times the op with per_sample=True too: two more columns, consistent with
    the JSON, and a geometric mean of per-sample/fused."""
    path = tmp_path / "bench.json"
    argv = ["bench", "--shape", "4,3,5,5", "--both-layouts", "--repeats", "2", "--per-sample"]
    assert cli_main([*argv, "--json", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out.index(HEADER + PER_SAMPLE_HEADER)
    lines = out[header + 1 : header + 3]
    assert len({len(line) for line in lines}) == 1  # fixed width
    payload = json.loads(path.read_text())
    rows = payload["rows"]
    assert [r["layout"] for r in rows] == ["nchw", "channels_last"]
    for r, line in zip(rows, lines):
        assert r["per_sample_ms"] > 0 and r["per_sample_iqr_ms"] >= 0
        assert r["per_sample_vs_fused"] == pytest.approx(r["per_sample_ms"] / r["fused_ms"])
        assert float(line.split()[-1]) == pytest.approx(r["per_sample_vs_fused"], abs=6e-4)
    geomean = payload["summary"]["per_sample_vs_fused_geomean"]
    assert geomean == pytest.approx(statistics.geometric_mean([r["per_sample_vs_fused"] for r in rows]))
    assert f"per-sample/fused {geomean:.3f}" in "\n".join(out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shape", "1,2,3"], "--shape expects N,C,H,W"),
        (["--shape", "0,2,3,3"], "--shape expects N,C,H,W"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--e2e", "--steps", "0"], "--steps must be at least 1"),
        (["--dtype", "int8"], "argument --dtype: invalid choice"),
        (["--preset", "vgg"], "argument --preset: invalid choice"),
    ],
)
def test_bench_rejects_bad_options(argv, message, capsys):
    assert message in cli_error(["bench", *argv], capsys)


def test_presets_are_the_networks_bn_shapes():
    # ResNet-56 on CIFAR at batch 128: three stages of 16/32/64 channels at 32/16/8 pixels.
    assert PRESETS["resnet56-cifar"] == [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]
    r50 = PRESETS["resnet50"]
    assert (32, 64, 112, 112) in r50 and (64, 2048, 7, 7) in r50 and len(set(r50)) == len(r50)
    assert {n for n, *_ in r50} == {32, 64}


def test_bench_shape_times_the_train_mode_op():
    row = bench_shape((3, 4, 5, 6), torch.float32, channels_last=True, repeats=1, copy_gbps=1.0)
    assert row.layout == "channels_last" and row.native_kind == "native" and row.bytes == 5 * 360 * 4


def test_e2e_variants_do_equal_work(one_thread):
    """The three --e2e variants start from the same weights, and the hooks variant computes,
    with torch.var_mean, the dy and dx statistics that the gradstats variant records."""
    models = _variants(torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    outputs = {}
    for name, (model, _, _) in models.items():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        outputs[name] = loss.item()
    assert list(outputs) == [v.name for v in VARIANTS] and VARIANTS[0].name == BASELINE
    assert outputs["convert"] == pytest.approx(outputs["plain"], rel=1e-5)
    assert outputs["per-sample"] == pytest.approx(outputs["plain"], rel=1e-5)
    assert outputs["gradstats"] == pytest.approx(outputs["plain"], rel=1e-5)
    assert outputs["hooks"] == pytest.approx(outputs["plain"], rel=1e-5)
    hooked = models["hooks"][2]
    bns = batchnorms(models["gradstats"][0])
    # dy and dx at every BN layer of a ResNet-56: the stem, 2 per block x 27, 2 projection shortcuts
    assert len(hooked) == 2 * len(bns) == 2 * 57
    # Order-free comparison: the total per-channel variance of all dy and dx tensors.
    hooks_total = sum(var.double().sum().item() for var, _ in hooked)
    ours_total = sum(
        (bn.last_grad_stats.grad_output.var.sum() + bn.last_grad_stats.grad_input.var.sum()).item()
        for _, bn in bns
    )
    assert hooks_total == pytest.approx(ours_total, rel=1e-4)
    assert hooks_total > 0


def test_e2e_overheads_are_per_round_ratios():
    names = ["plain", "other"]
    times = [[10.0, 20.0, 10.0, 10.0, 10.0], [11.0, 20.0, 12.0, 10.5, 9.0]]
    faults = [[0, 0, 0, 0, 0], [5, 7, 5, 5, 9]]
    results = summarize(names, times, faults)
    assert "overhead_pct" not in results["plain"]
    other = results["other"]
    # per round: +10%, 0%, +20%, +5%, -10% (the medians, 11 and 10 ms, would say +10%)
    assert other["overhead_pct"] == pytest.approx(5.0)
    assert other["overhead_range_pct"] == pytest.approx([-10.0, 20.0])
    q1, q3 = other["overhead_iqr_pct"]
    assert -10.0 <= q1 <= 5.0 <= q3 <= 20.0
    assert other["step_ms"] == 11.0 and other["minor_faults_per_step"] == 5
    assert results["plain"]["minor_faults"] == [0] * 5


@pytest.fixture
def small_e2e(monkeypatch, one_thread):
    """--e2e on a ResNet-8 at batch 4: the same code, seconds instead of minutes."""
    monkeypatch.setattr(bench_step, "DEPTH", 8)
    monkeypatch.setattr(bench_step, "BATCH", 4)


@pytest.mark.parametrize("steady", [False, True])
def test_e2e_reports_every_variant_and_the_allocator(steady, small_e2e, tmp_path, capsys, monkeypatch):
    calls = []

    def fake_steady_allocator():
        calls.append(1)
        return True

    monkeypatch.setattr(bench_cli, "steady_allocator", fake_steady_allocator)
    path = tmp_path / "e2e.json"
    argv = ["bench", "--e2e", "--steps", "4", "--json", str(path)] + (
        ["--steady-allocator"] if steady else []
    )
    assert cli_main(argv) == 0
    assert calls == ([1] if steady else [])  # the allocator is left alone unless asked
    out = capsys.readouterr().out
    assert f"allocator: {'steady' if steady else 'default'}" in out
    payload = json.loads(path.read_text())
    assert payload["allocator"] == ("steady" if steady else "default")
    assert payload["steps"] == 4 and payload["baseline"] == BASELINE
    results = payload["results"]
    assert list(results) == [v.name for v in VARIANTS]
    lines = out.splitlines()
    for name, r in results.items():
        assert len(r["steps_ms"]) == len(r["minor_faults"]) == 4
        assert r["step_ms"] == pytest.approx(statistics.median(r["steps_ms"]))
        assert r["minor_faults_per_step"] == statistics.median(r["minor_faults"])
        assert all(f >= 0 for f in r["minor_faults"])
        (line,) = [line for line in lines if line.split()[:1] == [name]]
        assert float(line.split()[1]) == pytest.approx(r["step_ms"], abs=0.06)
        if name == BASELINE:
            assert "overhead_pct" not in r
            continue
        ratios = [100 * (a / b - 1) for a, b in zip(r["steps_ms"], results[BASELINE]["steps_ms"])]
        assert r["overhead_pct"] == pytest.approx(statistics.median(ratios))
        assert r["overhead_range_pct"] == pytest.approx([min(ratios), max(ratios)])
        assert f"{r['overhead_pct']:+.1f}%" in line
    # per-sample is also compared with the variant it adds to, round by round.
    compared = results["per-sample"]["compared_with"]
    ratios = [
        100 * (a / b - 1) for a, b in zip(results["per-sample"]["steps_ms"], results["convert"]["steps_ms"])
    ]
    assert compared["variant"] == "convert" and compared["overhead_pct"] == pytest.approx(
        statistics.median(ratios)
    )
    assert f"vs convert: {compared['overhead_pct']:+.1f}%" in out
