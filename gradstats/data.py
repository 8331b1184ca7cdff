"""Built-in data that needs no download: scikit-learn's bundled handwritten digits (1,797 real
8x8 grayscale images, 10 classes; UCI "Optical Recognition of Handwritten Digits"), upscaled to
32x32 and repeated over 3 channels so CIFAR-style models take them as they are."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset


def digits(size: int = 32, channels: int = 3) -> TensorDataset:
    """The digits as a TensorDataset of (images [N, channels, size, size] float32, normalised to
    zero mean and unit variance; labels [N] int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the built-in dataset comes with scikit-learn: pip install scikit-learn") from error
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8], 0..16
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return TensorDataset(images.expand(-1, channels, -1, -1).contiguous(), labels)
