"""Datasets for the analysis and training commands, all as in-memory tensors of 3 x 32 x 32
float32 images (normalised per channel) and int64 labels.

Sources (``load_dataset(spec)``):
  "builtin" / "digits"  scikit-learn's bundled handwritten digits: 1,797 real 8x8 grayscale
                        images of 10 classes (UCI "Optical Recognition of Handwritten Digits"),
                        upscaled to 32x32 and repeated over 3 channels. No download.
  a folder with CIFAR-10 or CIFAR-100 in the "python version" format (data_batch_1..5 and
                        test_batch, or train and test; as the tarballs from the CIFAR site unpack)
  a folder in ImageFolder layout: one sub-folder per class holding image files (read with
                        Pillow, resized to 32x32); an optional train/ and test/ split inside.
Missing or malformed data raises DataError, which says what was expected where.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..extras import MissingExtra, require

IMAGE_SIZE = 32
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """The data at a given place is missing or not in a format gradstats reads."""


@dataclass
class ImageData:
    """Images [N, 3, 32, 32] float32 (normalised with the train split's per-channel mean and
    std) and labels [N] int64, for a train and a test split."""

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train_labels)} train / {len(self.test_labels)} test images, "
            f"{self.num_classes} classes, 3x{IMAGE_SIZE}x{IMAGE_SIZE}"
        )


def load_dataset(spec: str = "builtin", *, test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """The data named by ``spec`` (see the module docstring). Splits without their own test set
    (the digits, an ImageFolder without train/ and test/) are split with ``test_fraction``."""
    if spec in ("builtin", "digits"):
        images, labels = _digits()
        return _finish("digits (scikit-learn, built in)", *_split(images, labels, test_fraction, seed))
    if not os.path.exists(spec):
        raise DataError(
            f"--data {spec!r}: no such file or folder (use 'builtin', a CIFAR-10/100 "
            f"python-format folder, or an ImageFolder folder)"
        )
    if not os.path.isdir(spec):
        raise DataError(f"--data {spec!r}: expected a folder, got a file")
    cifar = _find_cifar(spec)
    if cifar is not None:
        return cifar
    return _image_folder(spec, test_fraction, seed)


def _finish(name, train_images, train_labels, test_images, test_labels) -> ImageData:
    mean = train_images.mean(dim=(0, 2, 3), keepdim=True)
    std = train_images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    num_classes = int(max(train_labels.max().item(), test_labels.max().item() if len(test_labels) else 0)) + 1
    return ImageData(
        name,
        ((train_images - mean) / std).contiguous(),
        train_labels,
        ((test_images - mean) / std).contiguous(),
        test_labels,
        num_classes,
    )


def _split(images: Tensor, labels: Tensor, test_fraction: float, seed: int):
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def _digits() -> tuple[Tensor, Tensor]:
    try:
        load_digits = require("sklearn.datasets", "the built-in dataset").load_digits
    except MissingExtra as error:
        raise DataError(str(error)) from error
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images.expand(-1, 3, -1, -1).contiguous(), torch.as_tensor(bunch.target, dtype=torch.int64)


# -- CIFAR python format --------------------------------------------------------------------------


def _find_cifar(folder: str) -> ImageData | None:
    """CIFAR-10 (data_batch_*, test_batch) or CIFAR-100 (train, test) in ``folder`` or in the
    sub-folder its tarball unpacks to; None when neither is there."""
    for root in (
        folder,
        os.path.join(folder, "cifar-10-batches-py"),
        os.path.join(folder, "cifar-100-python"),
    ):
        if not os.path.isdir(root):
            continue
        names = set(os.listdir(root))
        batches = sorted(n for n in names if n.startswith("data_batch_"))
        if batches and "test_batch" in names:
            train = [_cifar_file(os.path.join(root, n), b"labels") for n in batches]
            test = _cifar_file(os.path.join(root, "test_batch"), b"labels")
            return _finish(
                "CIFAR-10 " + root, torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train]), *test
            )
        if {"train", "test"} <= names and os.path.isfile(os.path.join(root, "train")):
            train = _cifar_file(os.path.join(root, "train"), b"fine_labels")
            test = _cifar_file(os.path.join(root, "test"), b"fine_labels")
            return _finish("CIFAR-100 " + root, *train, *test)
    return None


def _cifar_file(path: str, label_key: bytes) -> tuple[Tensor, Tensor]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise DataError(
            f"{path}: not a CIFAR python-format batch ({type(error).__name__}: {error}); "
            f"expected a pickled dict with b'data' (N x 3072 uint8) and {label_key!r}"
        ) from error
    if data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE or len(labels) != len(data):
        raise DataError(
            f"{path}: b'data' has shape {data.shape} and {len(labels)} labels; expected N x 3072 and N labels"
        )
    images = torch.from_numpy(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32) / 255.0)
    return images, torch.from_numpy(labels)


# -- ImageFolder ----------------------------------------------------------------------------------


def _image_folder(folder: str, test_fraction: float, seed: int) -> ImageData:
    train_dir, test_dir = os.path.join(folder, "train"), os.path.join(folder, "test")
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        classes = _classes(train_dir)
        train = _read_images(train_dir, classes)
        test = _read_images(test_dir, classes)
        return _finish("ImageFolder " + folder, *train, *test)
    classes = _classes(folder)
    images, labels = _read_images(folder, classes)
    return _finish("ImageFolder " + folder, *_split(images, labels, test_fraction, seed))


def _classes(folder: str) -> list[str]:
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise DataError(
            f"{folder}: found neither CIFAR python-format files (data_batch_1.., "
            f"test_batch, or train/test) nor class sub-folders of images (ImageFolder)"
        )
    return classes


def _read_images(folder: str, classes: list[str]) -> tuple[Tensor, Tensor]:
    try:
        Image = require("PIL.Image", "reading an image folder")
    except MissingExtra as error:
        raise DataError(str(error)) from error
    images, labels = [], []
    for label, name in enumerate(classes):
        directory = os.path.join(folder, name)
        if not os.path.isdir(directory):
            continue
        for file in sorted(os.listdir(directory)):
            if not file.lower().endswith(_IMAGE_SUFFIXES):
                continue
            path = os.path.join(directory, file)
            try:
                with Image.open(path) as image:
                    rgb = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            except OSError as error:
                raise DataError(f"{path}: not a readable image ({error})") from error
            images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1))
            labels.append(label)
    if not images:
        raise DataError(
            f"{folder}: the class folders {classes[:5]} hold no image files ({', '.join(_IMAGE_SUFFIXES)})"
        )
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)
