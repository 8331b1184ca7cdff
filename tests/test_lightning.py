"""gradstats.lightning.GradStatsCallback under PyTorch Lightning (Trainer on CPU, CSVLogger): the
CSV holds, every log_every_n_steps, the statistics of exactly that interval (against the same
training in a plain loop), also with a torch.compile'd network, and merged across the two
processes of Lightning's ddp strategy on gloo; loss units under a GradScaler; alerts."""

from __future__ import annotations

import csv
import glob
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning")

import lightning_job  # noqa: E402  (tests/lightning_job.py; needs lightning)

import gradstats  # noqa: E402
from gradstats.alerts import AlertThresholds  # noqa: E402
from gradstats.distributed import scale_moments  # noqa: E402
from gradstats.lightning import GradStatsCallback  # noqa: E402
from gradstats.models import cifar_resnet  # noqa: E402
from gradstats.records import flatten, metrics, summarize_slots  # noqa: E402
from gradstats.stats import merge_moments  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
JOB = os.path.join(os.path.dirname(__file__), "lightning_job.py")


def _csv_rows(out) -> dict[int, dict[str, float]]:
    (path,) = glob.glob(os.path.join(out, "csv", "*", "metrics.csv"))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {
        int(row["step"]): {k: float(v) for k, v in row.items() if k.startswith("gradstats/") and v != ""}
        for row in rows
    }


def _plain_loop_metrics(steps: int, every: int, per_sample: bool = False) -> dict[int, dict[str, float]]:
    """The job's training in a plain loop: metrics() every ``every`` steps, then a reset."""
    torch.manual_seed(0)
    net = gradstats.instrument(cifar_resnet(8), per_sample=per_sample)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(lightning_job.dataset(), batch_size=8, shuffle=False)
    out = {}
    for step, (images, labels) in enumerate(loader, start=1):
        optimizer.zero_grad()
        F.cross_entropy(net(images), labels).backward()
        optimizer.step()
        if step % every == 0:
            out[step] = metrics(net)
            for _, m in gradstats.batchnorms(net) + gradstats.probes(net):
                m.reset_grad_stats()
        if step == steps:
            return out
    raise AssertionError("not enough batches")


def _assert_same(logged: dict[str, float], expected: dict[str, float], rel: float) -> None:
    assert set(expected) <= set(logged), sorted(set(expected) - set(logged))[:5]
    worst = max(abs(logged[k] - v) / max(abs(v), 1e-30) for k, v in expected.items() if v != 0)
    print(f"{len(expected)} metrics, worst relative difference {worst:.2e}")
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=rel, abs=1e-30, nan_ok=True), key


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_csv_holds_each_intervals_statistics(tmp_path, compiled):
    argv = [str(tmp_path), "--steps", "4", "--every", "2"] + (["--compile"] if compiled else [])
    callback = lightning_job.main(argv)
    rows = _csv_rows(tmp_path)
    assert sorted(rows) == [2, 4]
    expected = _plain_loop_metrics(4, 2)
    for step in (2, 4):
        assert rows[step]["gradstats/alerts"] == 0
        _assert_same(rows[step], expected[step], rel=1e-9 if not compiled else 1e-5)
    assert callback.alerts == []


def test_per_sample_metrics_reach_the_csv(tmp_path):
    lightning_job.main([str(tmp_path), "--steps", "2", "--every", "2", "--per-sample"])
    rows = _csv_rows(tmp_path)
    expected = _plain_loop_metrics(2, 2, per_sample=True)
    assert "gradstats/model/noise_scale" in expected[2]
    assert any(k.endswith("/gsnr_weight") for k in expected[2])
    _assert_same(rows[2], expected[2], rel=1e-9)


def test_loss_units_under_16_bit_mixed_precision_with_a_grad_scaler(tmp_path):
    """Lightning's MixedPrecision plugin with a GradScaler (scale 1024: the recorded gradients
    are 1024 times the loss's): the logged variances are those of the float32 run, up to float16
    rounding (a forgotten unscale would be off by 1024^2)."""
    lightning_job.main([str(tmp_path), "--steps", "4", "--every", "2", "--loss-scale", "1024"])
    rows = _csv_rows(tmp_path)
    expected = _plain_loop_metrics(4, 2)
    for step in (2, 4):
        variances = {k: v for k, v in expected[step].items() if k.endswith(("_var", "dx_over_dy"))}
        _assert_same(rows[step], variances, rel=5e-2)


def test_ddp_two_processes_log_the_merged_statistics(tmp_path):
    """Lightning's ddp strategy, 2 CPU processes on gloo: the CSV holds the Chan merge of both
    ranks' statistics (saved by the job just before the callback merged them), in units of the
    global mean loss."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(JOB), *sys.path])}
    proc = subprocess.run(
        [sys.executable, JOB, str(tmp_path), "--devices", "2", "--steps", "2", "--every", "1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _csv_rows(tmp_path)
    assert sorted(rows) == [1, 2]
    for step in (1, 2):
        ranks = [torch.load(tmp_path / f"slots_rank{r}_step{step}.pt") for r in (0, 1)]
        merged = {}
        for kind in ("bn", "block"):
            merged[kind] = [
                (name, scale_moments(merge_moments([ranks[0][kind][i][1], ranks[1][kind][i][1]]), 0.5))
                for i, (name, _) in enumerate(ranks[0][kind])
            ]
            # the two ranks saw different samples: each one's statistics differ from the merge
            assert not torch.equal(ranks[0][kind][0][1], ranks[1][kind][0][1])
        expected = flatten(*summarize_slots(merged["bn"], merged["block"]))
        _assert_same(rows[step], expected, rel=1e-12)


class _FakeTrainer:
    """What GradStatsCallback reads of a Trainer, for driving it step by step."""

    def __init__(self, scaler=None) -> None:
        self.precision_plugin = type("Precision", (), {"scaler": scaler})()
        self.logged: list[tuple[int, dict]] = []
        record = lambda _, metrics, step: self.logged.append((step, metrics))  # noqa: E731
        self.loggers = [type("Logger", (), {"log_metrics": record})()]
        self.global_step = 0
        self.log_every_n_steps = 1


def _one_step(scale: float | None, seed: int = 3):
    torch.manual_seed(seed)
    net = cifar_resnet(8)
    callback = GradStatsCallback()
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    trainer = _FakeTrainer(scaler)
    callback.setup(trainer, net, "fit")
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    loss = F.cross_entropy(net(images), torch.arange(6))
    (scaler.scale(loss) if scaler else loss).backward()
    callback.on_after_backward(trainer, net)
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, net, None, None, 0)
    ((step, logged),) = trainer.logged
    return logged


def test_loss_units_under_a_grad_scaler():
    """Gradients recorded from a loss scaled by 1024 are reported divided by it."""
    plain, scaled = _one_step(None), _one_step(1024.0)
    _assert_same(scaled, plain, rel=1e-5)


def test_alerts_are_logged_once_when_they_start(caplog):
    torch.manual_seed(4)
    net = cifar_resnet(8)
    callback = GradStatsCallback(thresholds=AlertThresholds(dx_over_dy_band=1.0 + 1e-9))
    trainer = _FakeTrainer()
    callback.setup(trainer, net, "fit")
    images = torch.randn(6, 3, 8, 8)
    for step in (1, 2):
        F.cross_entropy(net(images), torch.arange(6)).backward()
        trainer.global_step = step
        callback.on_train_batch_end(trainer, net, None, None, 0)
    ratio_alerts = [a for a in callback.alerts if a["kind"] == "dx_over_dy"]
    assert ratio_alerts and all(a["step"] == 1 for a in ratio_alerts)  # raised at 1, not again at 2
    assert trainer.logged[1][1]["gradstats/alerts"] >= len(ratio_alerts)
    assert any("gradstats alert at step 1" in r.message for r in caplog.records)
    # NaN gradients: a nonfinite alert naming the first layer that met them
    out = net(images)
    (out * torch.tensor([math.nan] + [1.0] * 9)).sum().backward()
    trainer.global_step = 3
    callback.on_train_batch_end(trainer, net, None, None, 0)
    (nonfinite,) = [a for a in callback.alerts if a["kind"] == "nonfinite"]
    assert nonfinite["layer"] and "NaN/Inf" in nonfinite["message"]


def test_convert_false_needs_a_converted_model():
    with pytest.raises(ValueError, match="no gradstats recording modules"):
        GradStatsCallback(convert=False).setup(None, cifar_resnet(8), "fit")
    GradStatsCallback(convert=False).setup(None, gradstats.convert_batchnorm(cifar_resnet(8)), "fit")


def test_a_loss_scale_change_within_an_interval_is_an_alert():
    """Two backwards at scales 512 and 1024 before one record: reported in the last scale's
    units, with a loss_scale alert saying the interval mixed them."""
    torch.manual_seed(5)
    net = cifar_resnet(8)
    callback = GradStatsCallback()
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    trainer = _FakeTrainer(scaler)
    callback.setup(trainer, net, "fit")
    images = torch.randn(6, 3, 8, 8)
    for _ in range(2):
        scaler.scale(F.cross_entropy(net(images), torch.arange(6))).backward()
        callback.on_after_backward(trainer, net)
        scaler.update(new_scale=1024.0)
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, net, None, None, 0)
    (alert,) = [a for a in callback.alerts if a["kind"] == "loss_scale"]
    assert "from 512 to 1024" in alert["message"]


def test_convert_needs_something_to_record():
    with pytest.raises(ValueError, match="no nn.BatchNorm2d layer or residual block"):
        GradStatsCallback().setup(None, torch.nn.Sequential(torch.nn.Linear(2, 2)), "fit")


def test_without_lightning_the_import_names_the_extra(monkeypatch):
    import importlib

    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "gradstats.lightning")
    with pytest.raises(ImportError, match=r"pip install 'gradstats\[lightning\]'"):
        importlib.import_module("gradstats.lightning")
