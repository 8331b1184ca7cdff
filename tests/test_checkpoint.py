"""Checkpoints: atomic writes, truncation and corruption detected before anything loads, and
`gradstats train --resume` continuing a run exactly (weights, optimizer, schedule, accumulated
gradient statistics and the logged records equal those of an uninterrupted run)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import cli_error, read_records

from gradstats.stats import SLOT_ACCUMULATED
from gradstats.tools import checkpoint
from gradstats.tools.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gradstats.tools.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _state():
    return {
        "step": 7,
        "weights": torch.arange(10, dtype=torch.float32),
        "nested": {"a": [1, 2.5, "x"]},
        "rng": torch.get_rng_state(),
    }


def test_round_trip_and_no_temporary_files(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(_state(), str(path))
    save_checkpoint(_state(), str(path))  # replacing an existing file
    loaded = load_checkpoint(str(path))
    assert loaded["step"] == 7 and loaded["nested"] == {"a": [1, 2.5, "x"]}
    assert torch.equal(loaded["weights"], _state()["weights"])
    assert os.listdir(tmp_path) == ["c.pt"]
    assert path.read_bytes().startswith(b"GRADSTATS-CHECKPOINT 1 sha256=")


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(_state(), str(path))
    before = path.read_bytes()

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({**_state(), "step": 8}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.pt"]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "truncated checkpoint"),
        ("flip", "sha256 does not match"),
        ("append", "bytes beyond the payload"),
        ("header", "not a gradstats checkpoint"),
        ("empty", "not a gradstats checkpoint"),
    ],
)
def test_damaged_checkpoint_is_reported(tmp_path, damage, message):
    path = tmp_path / "c.pt"
    save_checkpoint(_state(), str(path))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "flip":
        data[-50] ^= 0x01
    elif damage == "append":
        data += b"\0"
    elif damage == "header":
        data = data[10:]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(path))


def test_missing_and_unsafe_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(str(tmp_path / "none.pt"))
    # Intact, but holding an arbitrary Python object: weights_only loading refuses it.
    path = tmp_path / "object.pt"
    save_checkpoint({"object": CheckpointError("x")}, str(path))
    with pytest.raises(CheckpointError, match="does not load"):
        load_checkpoint(str(path))


# -- resume ---------------------------------------------------------------------------------------

RUN = [
    "--depth",
    "8",
    "--batch-size",
    "32",
    "--steps",
    "10",
    "--log-every",
    "3",
    "--no-progress",
    "--no-tensorboard",
    "--device",
    "cpu",
]
TIMING = ("images_per_s", "elapsed_s")


def _train(*argv):
    assert cli_main(["train", *map(str, argv)]) == 0


def _records(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_records(out)]


@pytest.mark.parametrize(
    "options",
    [["--augment"], ["--schedule", "step", "--dtype", "float64"]],
    ids=["augment-cosine-fp32", "step-fp64"],
)
def test_resume_continues_exactly(tmp_path, options):
    """k = 4 steps, stop, resume to 2k = 8 (options given once: the checkpoint holds them), against
    8 uninterrupted steps. Records every 3 steps, so statistics are mid-interval at both ends."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _train("--out", whole, "--stop-at", 8, *RUN, *options)
    _train("--out", parts, "--stop-at", 4, *RUN, *options)
    _train("--out", parts, "--resume", "--stop-at", 8, "--no-progress", "--no-tensorboard")
    a, b = load_checkpoint(str(whole / "checkpoint.pt")), load_checkpoint(str(parts / "checkpoint.pt"))
    assert a["step"] == b["step"] == 8
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    for name, value in a["grad_stats"].items():
        assert torch.equal(value, b["grad_stats"][name]), name
    accumulated = a["grad_stats"]["layer1.0.bn1.grad_stats_state"][SLOT_ACCUMULATED]
    assert accumulated[0, 0].min() > 0  # steps 7 and 8 are in the accumulators
    assert torch.equal(a["window"], b["window"]) and a["window"][2] == 64
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for key in sa:
        assert torch.equal(sa[key]["momentum_buffer"], sb[key]["momentum_buffer"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scheduler"] == b["scheduler"]
    assert _records(whole) == _records(parts)
    assert [r["step"] for r in _records(whole)] == [3, 6]


def test_resume_errors_name_the_option(tmp_path, capsys):
    out = tmp_path / "run"
    _train("--out", out, "--stop-at", 2, *RUN)
    capsys.readouterr()

    def error(*argv):
        return cli_error(["train", *argv], capsys)

    message = error("--out", out, *RUN)  # a new run would overwrite this one
    assert "--out" in message and "--resume" in message
    message = error("--out", out, "--resume", "--depth", 14)
    assert "--resume" in message and "--depth 8 (this command: 14)" in message
    assert "--resume" in error("--out", tmp_path / "elsewhere", "--resume")  # no checkpoint there
    path = out / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = error("--out", out, "--resume")
    assert "--resume" in message and "truncated" in message
    path.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    message = error("--out", out, "--resume")
    assert "--resume" in message and "corrupted" in message
