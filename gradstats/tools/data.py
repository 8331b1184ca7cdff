"""Datasets for the analysis and training commands as in-memory tensors of 3 x 32 x 32 float32
images (normalised per channel) and int64 labels; and the checked reading of image files
(``image_files``, ``read_image``) that a training run's streamed ImageFolder (imagefolder.py,
sources.py) also decodes through.

Sources (``load_dataset(spec)``):
  "builtin"             scikit-learn's bundled handwritten digits: 1,797 real 8x8 grayscale
                        images of 10 classes (UCI "Optical Recognition of Handwritten Digits"),
                        upscaled to 32x32 and repeated over 3 channels. No download.
  a folder with CIFAR-10 or CIFAR-100 in the "python version" format (data_batch_1..5 and
                        test_batch, or train and test; as the tarballs from the CIFAR site unpack)
  a folder in ImageFolder layout: one sub-folder per class holding image files (read with
                        Pillow, resized to 32x32); an optional train/ and test/ split inside.
                        (`gradstats train` streams such a folder at full size instead.)
Missing or malformed data raises DataError, which says what was expected where.

Untrusted folders. Reading a dataset never runs code from it: CIFAR batches are pickles, read
with ``safe_pickle.load_restricted_pickle`` (plain data and numpy arrays only; a pickle naming any
other global is refused with a DataError naming the file). Never pass a CIFAR folder to a reader
that unpickles on its own (torchvision's CIFAR10/CIFAR100) without that loader. Image files are
decoded by Pillow only after their header: an image declaring more than MAX_IMAGE_PIXELS pixels (a
decompression bomb) is refused before it is decoded; a truncated, corrupt or non-image file with an
image suffix raises DataError naming the file (nothing is skipped silently), and so does a
special file (a FIFO, a link to a device) in place of a batch or an image, before it is opened.
Class folder names only label the data; nothing read from a dataset becomes part of a path
gradstats writes.
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..extras import MissingExtra, require
from .safe_pickle import UnsafePickleError, load_restricted_pickle

IMAGE_SIZE = 32
# Images are shrunk to 32x32; a bigger file than 64 megapixels (8192 x 8192) is far more likely a
# decompression bomb than a training image. Pillow's own limit (89 megapixels, an error at twice
# that) stays active too.
MAX_IMAGE_PIXELS = 1 << 26
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
    """The data named by ``spec`` (see the module docstring), in memory at 32x32. Splits without
    their own test set (the digits, an ImageFolder without train/ and test/) are split with
    ``test_fraction``."""
    kind = data_kind(spec)
    if kind == "builtin":
        images, labels = _digits()
        return _finish("digits (scikit-learn, built in)", *_split(images, labels, test_fraction, seed))
    if kind == "cifar":
        return _find_cifar(spec)
    return _image_folder(spec, test_fraction, seed)


def data_kind(spec: str) -> str:
    """What ``spec`` names: "builtin", "cifar" (a CIFAR-10/100 python-format folder) or "folder"
    (anything else that is a folder: read as an ImageFolder); DataError if it is neither."""
    if spec == "builtin":
        return "builtin"
    if not os.path.exists(spec):
        raise DataError(
            f"--data {spec!r}: no such file or folder (use 'builtin', a CIFAR-10/100 "
            f"python-format folder, or an ImageFolder folder)"
        )
    if not os.path.isdir(spec):
        raise DataError(f"--data {spec!r}: expected a folder, got a file")
    return "cifar" if cifar_files(spec) is not None else "folder"


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
    train, test = split_indices(len(labels), test_fraction, seed)
    return images[train], labels[train], images[test], labels[test]


def split_indices(samples: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, test) indices of a dataset without its own test split: a seeded permutation, of
    which the first round(samples * test_fraction) are the test set."""
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(samples * test_fraction))
    return order[n_test:], order[:n_test]


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
    """CIFAR-10 or CIFAR-100 read from ``folder`` (see cifar_files); None when it is not there."""
    found = cifar_files(folder)
    if found is None:
        return None
    kind, train_files, test_file = found
    label_key = b"labels" if kind == "CIFAR-10" else b"fine_labels"
    train = [_cifar_file(path, label_key) for path in train_files]
    test = _cifar_file(test_file, label_key)
    root = os.path.dirname(test_file)
    return _finish(
        f"{kind} {root}", torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train]), *test
    )


def cifar_files(folder: str) -> tuple[str, list[str], str] | None:
    """("CIFAR-10" or "CIFAR-100", training batch paths, test batch path) when ``folder`` or the
    sub-folder its tarball unpacks to holds CIFAR-10 (data_batch_*, test_batch) or CIFAR-100
    (train, test); None when neither is there. Nothing is read."""
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
            return "CIFAR-10", [os.path.join(root, n) for n in batches], os.path.join(root, "test_batch")
        if {"train", "test"} <= names and os.path.isfile(os.path.join(root, "train")):
            return "CIFAR-100", [os.path.join(root, "train")], os.path.join(root, "test")
    return None


def _cifar_file(path: str, label_key: bytes) -> tuple[Tensor, Tensor]:
    _check_regular_file(path)
    try:
        batch = load_restricted_pickle(path, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except UnsafePickleError as error:  # the message names the file and the refused global
        raise DataError(f"{error}; not read (CIFAR batches hold only arrays, lists and bytes)") from None
    except (
        OSError,
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        IndexError,
        AttributeError,
        TypeError,
        ValueError,
        RecursionError,
    ) as error:
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
        classes = image_classes(train_dir)
        train = _read_images(train_dir, classes)
        test = _read_images(test_dir, classes)
        return _finish("ImageFolder " + folder, *train, *test)
    classes = image_classes(folder)
    images, labels = _read_images(folder, classes)
    return _finish("ImageFolder " + folder, *_split(images, labels, test_fraction, seed))


def image_classes(folder: str) -> list[str]:
    """The class names of an ImageFolder: its sub-folders, sorted (label i is the i-th)."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise DataError(
            f"{folder}: found neither CIFAR python-format files (data_batch_1.., "
            f"test_batch, or train/test) nor class sub-folders of images (ImageFolder)"
        )
    return classes


def image_files(folder: str, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) of every image file of an ImageFolder: the files with an image suffix
    directly in each class folder, sorted by name. Sub-folders of a class folder are not walked
    (a link back up would make that walk endless). DataError if there is none."""
    files = []
    for label, name in enumerate(classes):
        directory = os.path.join(folder, name)
        if os.path.isdir(directory):
            files += [
                (os.path.join(directory, f), label) for f in sorted(os.listdir(directory)) if is_image_file(f)
            ]
    if not files:
        raise DataError(
            f"{folder}: the class folders {classes[:5]} hold no image files ({', '.join(_IMAGE_SUFFIXES)})"
        )
    return files


def _read_images(folder: str, classes: list[str]) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    bilinear = _pillow().BILINEAR
    for path, label in image_files(folder, classes):
        rgb = read_image(path).resize((IMAGE_SIZE, IMAGE_SIZE), bilinear)
        images.append(torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def is_image_file(path: str) -> bool:
    """Whether ``path`` names an image by its suffix (the files an ImageFolder reads)."""
    return path.lower().endswith(_IMAGE_SUFFIXES)


def _pillow():
    try:
        return require("PIL.Image", "reading an image folder")
    except MissingExtra as error:
        raise DataError(str(error)) from error


def read_image(path: str):
    """The image file at ``path`` as an RGB Pillow image, at its own size: the only way
    gradstats decodes an image (also as the loader of the ImageFolder a training run streams).
    DataError naming the file for a special file, a decompression bomb (refused from its header,
    before decoding), a truncated, corrupt or non-image file."""
    Image = _pillow()
    _check_regular_file(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns above its limit and raises above twice it: both refuse the file here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
                if width * height <= MAX_IMAGE_PIXELS:
                    image.load()  # decodes: a truncated or corrupt file fails here
                    return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"{path}: image refused as a decompression bomb ({error})") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as error:
        raise DataError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None
    raise DataError(
        f"{path}: image of {width} x {height} pixels refused before decoding (more than "
        f"MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS}; a decompression bomb?)"
    )


def _check_regular_file(path: str) -> None:
    """A dataset file must be a regular file (after links): a FIFO would block the read forever
    and a device (a link to /dev/zero) never ends."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a regular file (a folder, device, pipe or broken link)")
