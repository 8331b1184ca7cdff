"""`gradstats train` on the built-in data: the command end to end, what stats.jsonl records,
per-epoch evaluation, clear errors for bad options and data, no host synchronisation inside
training steps, TensorBoard when installed, and the augmentation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import cli_error, read_records, torchvision_or_skip, train_quietly

import gradstats
from gradstats.models import cifar_resnet
from gradstats.tools import trainer
from gradstats.tools.cli import main as cli_main
from gradstats.tools.sources import augment

FAST = ["--depth", "8", "--no-progress", "--device", "cpu"]
PNG = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """An ImageFolder of 24 small PNGs in 2 classes (19 train / 5 test images), for runs that
    need whole epochs or a big model in a second."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(12):
            pixels = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / label / f"{i}.png")
    return str(root)


def test_cli_smoke_on_builtin_data(tmp_path):
    """`python -m gradstats train`, a few steps in seconds: every record parses and carries
    every BN layer and residual block, with the statistics of exactly its own interval."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradstats",
            "train",
            "--out",
            str(out),
            "--batch-size",
            "64",
            "--steps",
            "6",
            "--log-every",
            "2",
            "--no-tensorboard",
            *FAST,
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )  # not the source folder, whose gradstats/ has no compiled extension
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "digits" in proc.stdout and "test loss" in proc.stdout + proc.stderr
    model = gradstats.instrument(cifar_resnet(8))
    bn_names = [n for n, _ in gradstats.batchnorms(model)]
    block_names = [n.removesuffix(".grad_probe") for n, _ in gradstats.probes(model)]
    records = read_records(out)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert r["samples"] == 2 * 64 and 0 <= r["train_acc"] <= 1 and r["train_loss"] > 0
        assert [layer["name"] for layer in r["bn_layers"]] == bn_names
        assert [block["name"] for block in r["blocks"]] == block_names
        # Accumulated over this interval only (reset after each record): 128 images of 32x32
        # at the stem, 8x8 in the last stage.
        assert r["bn_layers"][0]["count"] == 128 * 32 * 32
        assert r["blocks"][-1]["count"] == 128 * 8 * 8
        for layer in r["bn_layers"]:
            assert layer["dy_var"] > 0 and layer["dx_var"] > 0 and layer["dy_nonfinite"] == 0
            assert layer["dy_var_min"] <= layer["dy_var"] <= layer["dy_var_max"]
        assert all(block["grad_var"] > 0 for block in r["blocks"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["records"] == 3 and summary["bn_layers"] == bn_names
    assert 0 <= summary["final_test_acc"] <= 1
    assert summary["block_grad_var_last"]["grad_var"] == [b["grad_var"] for b in records[-1]["blocks"]]
    for name in ("grad_var_heatmap.png", "grad_var_blocks.png"):
        assert (out / name).read_bytes().startswith(PNG)
    assert (out / "checkpoint.pt").exists()


def test_evaluates_each_epoch_on_an_image_folder(tmp_path, tiny_folder):
    torchvision_or_skip()  # an ImageFolder is streamed with torchvision
    # 19 training images, global batch 8: 2 steps per epoch.
    summary = train_quietly(
        out=str(tmp_path),
        data=tiny_folder,
        depth=8,
        workers=0,
        batch_size=8,
        epochs=2,
        log_every=3,
    )
    assert summary["data"].startswith("ImageFolder")
    assert [e["step"] for e in summary["eval"]] == [2, 4]
    assert [r["step"] for r in read_records(tmp_path)] == [3, 4]  # every 3 steps, and at the end
    assert summary["steps_per_epoch"] == 2 and summary["epochs"] == 2


@pytest.mark.parametrize("per_sample", [False, True], ids=["plain", "per_sample"])
def test_no_host_synchronisation_inside_training_steps(tmp_path, monkeypatch, per_sample):
    """Reading a tensor's value on the host (item, tolist, bool, float, ...) would synchronise
    with a GPU: none may happen inside a training step, only in the logging between steps.
    (On CPU this catches Python-level reads; C++ ones would not show.)"""
    reads, inside = [], []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            if inside:
                reads.append((inside[-1], _name))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    step = trainer.Trainer.train_step

    def watched(self, index):
        inside.append(index)
        try:
            step(self, index)
        finally:
            inside.pop()

    monkeypatch.setattr(trainer.Trainer, "train_step", watched)
    train_quietly(
        out=str(tmp_path),
        depth=8,
        batch_size=16,
        steps=5,
        log_every=2,
        augment=True,
        per_sample=per_sample,
    )
    assert reads == []
    assert len(read_records(tmp_path)) == 3  # the logging steps did run (and read values)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--model", "vgg"], "--model 'vgg'"),
        (["--variant", "nope"], "--variant 'nope'"),
        (["--milestones", "0.5,2"], "--milestones"),
        (["--log-every", "0"], "--log-every"),
        (["--data", "/nonexistent/cifar"], "--data '/nonexistent/cifar': no such file or folder"),
        (["--batch-size", "4096"], "--batch-size 4096 is larger than the 1438 training images"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    ],
)
def test_bad_options_and_data_are_named(tmp_path, capsys, argv, message):
    assert message in cli_error(
        ["train", "--out", tmp_path / "run", "--depth", "8", "--no-progress", *argv], capsys
    )


def test_malformed_cifar_folder_is_reported(tmp_path, capsys):
    data = tmp_path / "cifar"
    data.mkdir()
    (data / "data_batch_1").write_bytes(b"not a pickle")
    (data / "test_batch").write_bytes(b"not a pickle")
    assert "not a CIFAR python-format batch" in cli_error(
        ["train", "--out", tmp_path / "run", "--data", data, *FAST], capsys
    )


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    assert (
        cli_main(
            ["train", "--out", str(tmp_path), "--batch-size", "32", "--steps", "2", "--log-every", "1", *FAST]
        )
        == 0
    )
    events = os.listdir(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_torchvision_resnet18_is_instrumented(tmp_path, tiny_folder):
    torchvision_or_skip()
    summary = train_quietly(
        out=str(tmp_path),
        data=tiny_folder,
        model="resnet18",
        image_size=32,
        workers=0,
        batch_size=4,
        steps=1,
        log_every=1,
    )
    assert len(summary["bn_layers"]) == 20 and len(summary["blocks"]) == 8
    assert "3x32x32" in summary["data"]
    record = read_records(tmp_path)[0]
    assert all(layer["count"] > 0 for layer in record["bn_layers"] + record["blocks"])


def test_torchvision_stem_follows_the_image_size():
    torchvision_or_skip()
    config = trainer.TrainConfig(model="resnet18")
    small = trainer.build_model(config, 2, image_size=trainer.CIFAR_STEM_MAX_SIZE)
    large = trainer.build_model(config, 2, image_size=trainer.CIFAR_STEM_MAX_SIZE + 1)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, torch.nn.MaxPool2d)


def test_augment_crops_and_flips():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    centre = torch.full((2, 2), 4)
    assert torch.equal(augment(images, centre, torch.tensor([False, False])), images)
    assert torch.equal(augment(images, centre, torch.tensor([True, False]))[0], images[0].flip(-1))
    shifted = augment(images, torch.tensor([[0, 8], [0, 8]]), torch.tensor([False, False]))
    assert torch.equal(shifted[0, :, 4:, 4:], images[0, :, :28, :28])  # content moved down-right
    assert shifted[0, :, :4].abs().sum() == 0  # zero padding above
    assert torch.equal(shifted[1, :, :28, :28], images[1, :, 4:, 4:])
