"""Where `gradstats train` sends its statistics besides stats.jsonl: TensorBoard histograms of the
per-channel variances (matching the record), no duplicate TensorBoard points after a resume from
an earlier checkpoint (purge_step), Weights & Biases in offline mode, health alerts printed once
and kept in summary.json, and a clear message naming the extra when one is missing."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
from conftest import cli_error, read_records

from gradstats.tools.cli import main as cli_main

FAST = ["--depth", "8", "--no-progress", "--device", "cpu", "--batch-size", "32"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_histograms_match_the_records(tmp_path):
    pytest.importorskip("tensorboard")
    assert cli_main(["train", "--out", str(tmp_path), "--steps", "2", "--log-every", "1", *FAST]) == 0
    events = _events(tmp_path / "tensorboard")
    records = read_records(tmp_path)
    for record in records:
        for layer in record["bn_layers"]:
            for gradient in ("dy", "dx"):
                tag = f"gradstats/{layer['stage']}/{layer['name']}/{gradient}_log10_var"
                (histogram,) = [h for h in events.Histograms(tag) if h.step == record["step"]]
                value = histogram.histogram_value
                assert value.num == layer["channels"]
                assert value.min == pytest.approx(math.log10(layer[f"{gradient}_var_min"]), rel=1e-9)
                assert value.max == pytest.approx(math.log10(layer[f"{gradient}_var_max"]), rel=1e-9)
                assert sum(value.bucket) == layer["channels"]
        block = record["blocks"][0]
        tag = f"gradstats/{block['stage']}/{block['name']}/grad_var"
        (scalar,) = [s for s in events.Scalars(tag) if s.step == record["step"]]
        assert scalar.value == pytest.approx(block["grad_var"], rel=1e-6)  # stored as float32
    assert "gradstats/layer2/layer2.0/grad_log10_var" in events.Tags()["histograms"]


def test_resume_from_an_earlier_checkpoint_leaves_no_duplicate_points(tmp_path):
    """A run that wrote records past its last checkpoint and crashed: the resumed run writes
    those steps again; TensorBoard shows each step once (purge_step), like stats.jsonl."""
    pytest.importorskip("tensorboard")
    base = [
        "train",
        "--out",
        str(tmp_path),
        "--steps",
        "6",
        "--log-every",
        "1",
        "--checkpoint-every",
        "2",
        *FAST,
    ]
    assert cli_main([*base, "--stop-at", "2"]) == 0
    shutil.copy(tmp_path / "checkpoint.pt", tmp_path / "step2.pt")
    assert cli_main(["train", "--out", str(tmp_path), "--resume", "--stop-at", "4", "--no-progress"]) == 0
    os.replace(tmp_path / "step2.pt", tmp_path / "checkpoint.pt")  # the crash: steps 3-4 not saved
    assert cli_main(["train", "--out", str(tmp_path), "--resume", "--no-progress"]) == 0
    steps = [event.step for event in _events(tmp_path / "tensorboard").Scalars("train/train_loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_records(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_alerts_are_printed_once_and_kept_in_the_summary(tmp_path, capsys):
    # A band of 1 + 1e-9 around the expected ratio: every BN layer raises a dx_over_dy alert.
    argv = ["train", "--out", str(tmp_path), "--steps", "3", "--log-every", "1", "--no-tensorboard", *FAST]
    assert cli_main([*argv, "--alert-thresholds", "dx_over_dy_band=1.000000001,block_ratio=100"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("alert at step")]
    with open(tmp_path / "summary.json") as f:
        alerts = json.load(f)["alerts"]
    records = read_records(tmp_path)
    bn_names = [layer["name"] for layer in records[0]["bn_layers"]]
    ratio_alerts = [a for a in alerts if a["kind"] == "dx_over_dy"]
    assert sorted(a["layer"] for a in ratio_alerts) == sorted(bn_names)  # each layer once
    assert all(set(a) == {"kind", "layer", "step", "message"} and a["step"] == 1 for a in ratio_alerts)
    assert len(printed) == len(alerts)
    assert all(len(r["alerts"]) >= len(bn_names) for r in records)  # active in every record


@pytest.mark.parametrize(
    "value, message",
    [
        ("nope=1", "--alert-thresholds: unknown nope"),
        ("block_ratio=0.5", "--alert-thresholds: dx_over_dy_band and block_ratio are factors >= 1"),
        ("block_ratio", "expected NAME=VALUE pairs"),
    ],
)
def test_bad_alert_thresholds_are_named(tmp_path, capsys, value, message):
    assert message in cli_error(
        ["train", "--out", tmp_path / "run", *FAST, "--alert-thresholds", value], capsys
    )


def test_wandb_offline_gets_the_same_numbers(tmp_path, monkeypatch):
    """What the run logs to wandb (offline: a local run file), seen at Run.log."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    original = wandb.sdk.wandb_run.Run.log

    def log(self, data, *args, **kwargs):
        logged.append((kwargs.get("step"), dict(data)))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    argv = ["train", "--out", str(tmp_path), "--steps", "2", "--log-every", "1", "--no-tensorboard", *FAST]
    assert cli_main([*argv, "--wandb", "gradstats-test"]) == 0
    (run,) = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    (events,) = [f for f in os.listdir(tmp_path / "wandb" / run) if f.endswith(".wandb")]
    assert os.path.getsize(tmp_path / "wandb" / run / events) > 1000
    records = read_records(tmp_path)
    per_step = {}
    for step, data in logged:
        per_step.setdefault(step, {}).update(data)
    assert sorted(per_step) == [1, 2]
    for record in records:
        data = per_step[record["step"]]
        assert data["train/train_loss"] == record["train_loss"]
        for layer in record["bn_layers"]:
            base = f"gradstats/{layer['stage']}/{layer['name']}/"
            assert (
                data[base + "dy_var"] == layer["dy_var"] and data[base + "dx_over_dy"] == layer["dx_over_dy"]
            )
            histogram = data[base + "dx_log10_var"]
            assert isinstance(histogram, wandb.Histogram)
            assert sum(histogram.histogram) == layer["channels"]


def test_missing_wandb_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails
    error = cli_error(["train", "--out", tmp_path / "run", *FAST, "--wandb", "p"], capsys)
    assert "--wandb needs wandb" in error and "pip install 'gradstats[wandb]'" in error
    assert not (tmp_path / "run").exists()


def test_missing_tensorboard_is_a_note_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert cli_main(["train", "--out", str(tmp_path), "--steps", "1", *FAST]) == 0
    out = capsys.readouterr().out
    assert "no TensorBoard events" in out and "pip install 'gradstats[tensorboard]'" in out
    assert not (tmp_path / "tensorboard").exists()
