"""Datasets: the built-in digits, CIFAR python-format folders, ImageFolder folders, and the
errors for missing or malformed data."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from gradstats.tools.data import DataError, load_dataset


def test_builtin_digits():
    data = load_dataset("builtin")
    assert data.num_classes == 10
    assert data.train_images.shape[1:] == (3, 32, 32) and data.train_images.dtype == torch.float32
    assert len(data.train_labels) + len(data.test_labels) == 1797
    assert abs(data.train_images.mean().item()) < 1e-4  # normalised with the train split's stats
    assert torch.equal(load_dataset("builtin").train_labels, data.train_labels)  # deterministic split


def _write_cifar_batch(path, n, label_key=b"labels", classes=10, seed=0):
    rng = np.random.default_rng(seed)
    batch = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, classes, n).tolist(),
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    return batch


def test_cifar10_python_format(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    first = _write_cifar_batch(root / "data_batch_1", 20, seed=1)
    _write_cifar_batch(root / "data_batch_2", 20, seed=2)
    _write_cifar_batch(root / "test_batch", 10, seed=3)
    data = load_dataset(str(tmp_path))  # the folder the tarball unpacks into
    assert len(data.train_labels) == 40 and len(data.test_labels) == 10
    assert data.train_labels[:20].tolist() == first[b"labels"]
    # CIFAR stores each image channel-major (1024 red, 1024 green, 1024 blue values): the images
    # must come back as those pixels, up to the per-channel normalisation.
    raw = torch.tensor(first[b"data"].reshape(-1, 3, 32, 32), dtype=torch.float32)
    for channel in range(3):
        a, b = data.train_images[:20, channel].flatten(), raw[:, channel].flatten()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9999


def test_cifar100_python_format(tmp_path):
    _write_cifar_batch(tmp_path / "train", 30, label_key=b"fine_labels", classes=100)
    _write_cifar_batch(tmp_path / "test", 5, label_key=b"fine_labels", classes=100)
    data = load_dataset(str(tmp_path))
    assert "CIFAR-100" in data.name and len(data.train_labels) == 30


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for c, name in enumerate(["cat", "dog", "emu"]):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.fromarray(np.full((40, 30, 3), 60 * c + i, dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png"
            )
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = load_dataset(str(tmp_path), test_fraction=0.25)
    assert data.num_classes == 3
    assert len(data.train_labels) == 9 and len(data.test_labels) == 3
    assert data.train_images.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no such file or folder"),
        (lambda p: p.write_text("x"), "expected a folder"),
        (lambda p: p.mkdir(), "found neither CIFAR python-format files"),
        (
            lambda p: (
                p.mkdir(),
                (p / "data_batch_1").write_bytes(b"garbage"),
                (p / "test_batch").write_bytes(b"x"),
            ),
            "not a CIFAR python-format batch",
        ),
        (
            lambda p: (p.mkdir(), (p / "cls").mkdir(), (p / "cls" / "a.png").write_bytes(b"not png")),
            "not a readable image",
        ),
    ],
)
def test_bad_data_is_reported(tmp_path, setup, message):
    target = tmp_path / "data"
    setup(target)
    with pytest.raises(DataError, match=message):
        load_dataset(str(target))
