"""Which training samples each step uses, for every command that draws batches (train, analyze,
demo): step s takes batch s % B of epoch s // B, where each epoch is a fresh permutation of the
samples drawn from (seed, epoch) and cut into B = n // batch_size batches (the remainder is left
out). A step's batch is thus a function of (seed, step) alone: it depends neither on the number
of processes, which split it, nor on where a run was resumed."""

from __future__ import annotations

import zlib

import torch
from torch import Tensor


def stable_seed(*parts) -> int:
    """A seed per (run seed, purpose, index), the same in every process (unlike hash())."""
    return zlib.crc32("/".join(map(str, parts)).encode())


class BatchSampler:
    """Indices of the samples of each step's batch, for ``samples`` samples in batches of
    ``batch_size`` (at most ``samples``); the permutation of the current epoch is kept on
    ``device``."""

    def __init__(self, samples: int, batch_size: int, seed: int, device: torch.device | str = "cpu") -> None:
        if not 1 <= batch_size <= samples:
            raise ValueError(f"batch size {batch_size} must be in [1, {samples}] (the number of samples)")
        self.samples, self.batch_size, self.seed, self.device = samples, batch_size, seed, device
        self.steps_per_epoch = samples // batch_size
        self._epoch: int | None = None
        self._order: Tensor | None = None

    def indices(self, step: int) -> Tensor:
        """The [batch_size] sample indices of ``step`` (0-based, counted over the whole run)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(stable_seed(self.seed, "order", epoch))
            self._order = torch.randperm(self.samples, generator=generator).to(self.device)
            self._epoch = epoch
        return self._order[position * self.batch_size : (position + 1) * self.batch_size]
