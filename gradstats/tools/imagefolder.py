"""An ImageFolder read at full size as training goes (sources.FolderStream builds on it), with
torchvision's ImageFolder and transforms. Importing this module imports torchvision; sources.py
imports it only for ImageFolder data and names the extra when torchvision is missing.

Every file is listed and decoded by data.py's checked functions, never by torchvision's own:
``data.image_files`` lists the files (only those directly in each class folder) and
``data.read_image`` decodes them (special files, decompression bombs, truncated or corrupt images
raise DataError naming the file, in a DataLoader worker as in the main process).
"""

from __future__ import annotations

import copy

import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from .data import image_classes, image_files, read_image

# The normalisation torchvision's ImageNet models are trained with: the stream never reads the
# whole dataset, so it cannot measure the folder's own per-channel statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CheckedImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder (samples, targets, classes, __getitem__ with the transform) that
    lists its files with data.image_files and decodes them with data.read_image. It holds paths
    and labels only: its memory does not grow with the images' sizes."""

    def __init__(self, root: str, transform=None) -> None:
        super().__init__(root, transform=transform, loader=read_image)

    def find_classes(self, directory):
        classes = image_classes(directory)
        return classes, {name: label for label, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return image_files(directory, list(class_to_idx))


def classes_of(dataset) -> list[str]:
    """The class names of a CheckedImageFolder or of a Subset of one."""
    return dataset.dataset.classes if isinstance(dataset, torch.utils.data.Subset) else dataset.classes


def with_transform(dataset: CheckedImageFolder, transform) -> CheckedImageFolder:
    """A view of ``dataset`` (the same file list, not a copy of it) with another transform."""
    view = copy.copy(dataset)
    view.transform = transform
    return view


def train_transform(size: int, augment: bool):
    """Training: a random-resized crop to size x size and a horizontal flip with ``augment``;
    without, as evaluation."""
    if not augment:
        return eval_transform(size)
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(size: int):
    """Evaluation (deterministic): the shorter side resized to size x 8/7 (256 for 224), then
    the centre size x size crop."""
    return transforms.Compose(
        [
            transforms.Resize(round(size * 8 / 7), antialias=True),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class SeededSamples(Dataset):
    """``dataset``'s samples keyed by (index, seed): the random draws of the transform (from
    torch's global generator, which torchvision's transforms use) are those of ``seed``, in
    whichever process or DataLoader worker decodes it; the caller's generator state is left as
    it was."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]
