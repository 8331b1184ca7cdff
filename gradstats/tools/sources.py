"""What `gradstats train` draws its batches from: trainer.py asks a source for each step's
training batch (``train_batch(step)``) and for the evaluation batches (``eval_batches(size)``).

  TensorSource  the built-in digits and CIFAR (data.load_dataset): 3x32x32 tensors held on the
                training device; --augment: random crops of the 4-pixel zero-padded image and
                horizontal flips, drawn on the device.
  FolderStream  an ImageFolder, read as it trains (imagefolder.py, needs torchvision): the
                dataset holds file paths only, so memory does not grow with the dataset; a
                DataLoader with --workers processes (pinned memory on CUDA) decodes and
                transforms each batch to --image-size (random-resized crop and flip with
                --augment; resize and centre crop for evaluation).

Reproducibility, the same for both: step s's global batch is sampling.BatchSampler's (a
function of (seed, step)), rank r takes its r-th slice, and the augmentation is drawn from
(seed, step) for the whole global batch (TensorSource) or from (seed, step, the sample's
position in the global batch) for each sample (FolderStream, in whichever worker decodes it).
So a step's batch depends neither on the number of processes or workers nor on where a run was
resumed: after --resume the stream starts its DataLoader at the resumed step (BatchSampler
gives any step's indices directly), with nothing to skip or replay.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import IMAGE_SIZE, DataError, ImageData, data_kind, load_dataset, split_indices
from .sampling import BatchSampler, stable_seed

DATA_EXTRA = "pip install gradstats[data]"


@dataclass(frozen=True)
class BatchPlan:
    """How each step's global batch is cut and augmented: this process is ``rank`` of
    ``world_size`` and takes its slice of ``global_batch`` samples."""

    global_batch: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    augment: bool = False

    @property
    def mine(self) -> slice:
        local = self.global_batch // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    def sampler(self, samples: int, device: torch.device | str = "cpu") -> BatchSampler:
        if self.global_batch > samples:
            raise ValueError(f"--batch-size {self.global_batch} is larger than the {samples} training images")
        return BatchSampler(samples, self.global_batch, self.seed, device)


def open_source(
    spec: str,
    plan: BatchPlan,
    *,
    image_size: int = IMAGE_SIZE,
    image_size_given: bool = True,
    workers: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """The source for ``--data spec``: a FolderStream at ``image_size`` for an ImageFolder, else
    a TensorSource; in-memory data is 32x32 only (ValueError if another size was given)."""
    if data_kind(spec) == "folder":
        return FolderStream(spec, plan, image_size=image_size, workers=workers, device=device, dtype=dtype)
    if image_size_given and image_size != IMAGE_SIZE:
        raise ValueError(
            f"--image-size {image_size}: applies to ImageFolder data; the built-in digits and "
            f"CIFAR are {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    return TensorSource(load_dataset(spec, seed=plan.seed), plan, device=device, dtype=dtype)


class TensorSource:
    """Training and evaluation batches from in-memory tensors on the training device."""

    def __init__(self, data: ImageData, plan: BatchPlan, *, device, dtype) -> None:
        self.description, self.num_classes, self.plan = data.describe(), data.num_classes, plan
        self.sampler = plan.sampler(len(data.train_labels), device)
        self.train_images = data.train_images.to(device, dtype)
        self.train_labels = data.train_labels.to(device)
        self.test_images = data.test_images.to(device, dtype)
        self.test_labels = data.test_labels.to(device)
        self.test_size = len(self.test_labels)
        self.image_size = IMAGE_SIZE
        self.augment_generator = torch.Generator(device)

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """This rank's slice of step ``step``'s global batch, augmented with --augment."""
        plan, mine = self.plan, self.plan.mine
        index = self.sampler.indices(step)[mine]
        images, labels = self.train_images[index], self.train_labels[index]
        if plan.augment:
            g = self.augment_generator.manual_seed(stable_seed(plan.seed, "augment", step))
            device = images.device
            shifts = torch.randint(0, 9, (2, plan.global_batch), generator=g, device=device)[:, mine]
            flips = (torch.rand(plan.global_batch, generator=g, device=device) < 0.5)[mine]
            images = augment(images, shifts, flips)
        return images, labels

    def eval_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for lo in range(0, self.test_size, batch_size):
            yield self.test_images[lo : lo + batch_size], self.test_labels[lo : lo + batch_size]

    def close(self) -> None:
        pass


def augment(images: Tensor, shifts: Tensor, flips: Tensor) -> Tensor:
    """Random crop (4-pixel zero padding, offsets ``shifts`` [2, N] in 0..8) and horizontal flip
    (``flips`` [N] bool), per image, as one gather."""
    n, c, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    rows = shifts[0, :, None] + torch.arange(h, device=images.device)
    cols = shifts[1, :, None] + torch.arange(w, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    index_n = torch.arange(n, device=images.device)[:, None, None, None]
    index_c = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[index_n, index_c, rows[:, None, :, None], cols[:, None, None, :]]


class FolderStream:
    """Training and evaluation batches of an ImageFolder at ``image_size``, decoded by a
    DataLoader as they are needed. A folder with train/ and test/ sub-folders has its own split;
    otherwise ``test_fraction`` of the files (a seeded choice, as load_dataset makes it) are
    the test set."""

    def __init__(
        self,
        folder: str,
        plan: BatchPlan,
        *,
        image_size: int,
        workers: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        test_fraction: float = 0.2,
    ) -> None:
        try:
            from . import imagefolder
        except ImportError as error:
            raise DataError(
                f"--data {folder}: an ImageFolder is read with torchvision, which does not import here "
                f"({type(error).__name__}: {error}); {DATA_EXTRA}"
            ) from error
        except Exception as error:  # a torchvision built for another torch raises RuntimeError
            raise DataError(
                f"--data {folder}: torchvision does not import here ({type(error).__name__}: {error}); "
                f"install the release built for this torch ({DATA_EXTRA})"
            ) from error
        self.plan, self.workers, self.device, self.dtype = plan, workers, torch.device(device), dtype
        self.image_size = image_size
        train_dir, test_dir = os.path.join(folder, "train"), os.path.join(folder, "test")
        train_tf = imagefolder.train_transform(image_size, plan.augment)
        eval_tf = imagefolder.eval_transform(image_size)
        if os.path.isdir(train_dir) and os.path.isdir(test_dir):
            self.train_set = imagefolder.CheckedImageFolder(train_dir, train_tf)
            self.test_set = imagefolder.CheckedImageFolder(test_dir, eval_tf)
            if self.test_set.classes != self.train_set.classes:
                raise DataError(
                    f"{test_dir}: classes {self.test_set.classes[:5]} differ from {train_dir}'s "
                    f"{self.train_set.classes[:5]}"
                )
        else:
            whole = imagefolder.CheckedImageFolder(folder, train_tf)
            train, test = split_indices(len(whole), test_fraction, plan.seed)
            self.train_set = torch.utils.data.Subset(whole, train.tolist())
            self.test_set = torch.utils.data.Subset(imagefolder.with_transform(whole, eval_tf), test.tolist())
        self.num_classes = len(imagefolder.classes_of(self.train_set))
        self.test_size = len(self.test_set)
        self.sampler = plan.sampler(len(self.train_set))
        self.description = (
            f"ImageFolder {folder}: {len(self.train_set)} train / {self.test_size} test images, "
            f"{self.num_classes} classes, 3x{image_size}x{image_size} (streamed, {workers} workers)"
        )
        self._samples = imagefolder.SeededSamples(self.train_set)
        self._batches: Iterator | None = None
        self._next_step = -1

    def _loader(self, dataset, **options) -> torch.utils.data.DataLoader:
        # A generator of its own: a DataLoader iterator otherwise draws its workers' base seed
        # from torch's global one, whose state the checkpoint saves (resume would change it).
        # The transforms' draws are seeded per sample (SeededSamples), not from this.
        return torch.utils.data.DataLoader(
            dataset,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.plan.seed),
            **options,
        )

    def _keys(self, start: int) -> Iterator[list[tuple[int, int]]]:
        """Each step's (sample index, augmentation seed) pairs of this rank, from step ``start``."""
        plan = self.plan
        positions = range(plan.global_batch)[plan.mine]
        for step in itertools.count(start):
            index = self.sampler.indices(step).tolist()
            yield [(index[p], stable_seed(plan.seed, "augment", step, p)) for p in positions]

    def _to_device(self, batch) -> tuple[Tensor, Tensor]:
        images, labels = batch
        pinned = self.device.type == "cuda"  # the copy from pinned memory need not block
        return images.to(self.device, self.dtype, non_blocking=pinned), labels.to(
            self.device, non_blocking=pinned
        )

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """This rank's slice of step ``step``'s global batch. Consecutive steps come from one
        DataLoader iterator (its workers decode ahead); any other step starts a new one there."""
        if self._batches is None or step != self._next_step:
            self.close()
            self._batches = iter(self._loader(self._samples, batch_sampler=_Keys(self._keys, step)))
        self._next_step = step + 1
        return self._to_device(_next(self._batches))

    def eval_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        batches = iter(self._loader(self.test_set, batch_size=batch_size, shuffle=False))
        for _ in range(-(-self.test_size // batch_size)):
            yield self._to_device(_next(batches))

    def close(self) -> None:
        """Stops the training DataLoader's workers (a new iterator starts them again)."""
        self._batches = None


class _Keys:
    """The DataLoader's batch sampler: an endless iterable of keys from a start step."""

    def __init__(self, keys, start: int) -> None:
        self.keys, self.start = keys, start

    def __iter__(self):
        return self.keys(self.start)


def _next(batches: Iterator):
    """The next batch; a DataError raised in a DataLoader worker comes back as the worker's
    message (naming the file), not the worker's whole traceback."""
    try:
        return next(batches)
    except DataError as error:
        lines = str(error).rstrip().splitlines()
        prefix = f"{DataError.__module__}.{DataError.__qualname__}: "
        if len(lines) > 1 and lines[-1].startswith(prefix):  # "Caught DataError in DataLoader worker..."
            raise DataError(lines[-1].removeprefix(prefix) + " (in a DataLoader worker)") from None
        raise
