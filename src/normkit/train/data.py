"""The training data: scikit-learn's bundled handwritten digits, split once and sharded per worker.

``sklearn.datasets.load_digits`` ships inside scikit-learn (1797 grayscale 8x8 images of the digits 0-9,
pixel values 0-16), so training needs no download. The split into training and validation sets is
stratified and seeded, so every worker, every restart and every run with the same seed sees the same
split. Each epoch the training indices are shuffled with a generator seeded by ``(seed, epoch)`` and cut
into one disjoint contiguous shard per worker: the shards of an epoch together cover the training set,
and a worker restarted at epoch ``k`` gets exactly the shard it would have had without the restart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "NUM_CLASSES",
    "NUM_SAMPLES",
    "DigitsSplit",
    "load_digits_split",
    "shard_bounds",
    "shard_indices",
    "split_sizes",
    "steps_per_epoch",
]

#: images in ``sklearn.datasets.load_digits``
NUM_SAMPLES = 1797
NUM_CLASSES = 10
#: largest pixel value in the dataset (pixels are counts 0-16 of a 4x4 block of the original 32x32 bitmap)
_PIXEL_MAX = 16.0


@dataclass(frozen=True)
class DigitsSplit:
    """Training and validation tensors: images ``(N, 1, 8, 8)`` float32 in [0, 1], labels ``(N,)`` int64."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor


def split_sizes(val_fraction: float) -> tuple[int, int]:
    """``(train, validation)`` sample counts for ``val_fraction``, as scikit-learn rounds them (validation up)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = math.ceil(val_fraction * NUM_SAMPLES)
    return NUM_SAMPLES - n_val, n_val


def load_digits_split(seed: int = 0, val_fraction: float = 0.2) -> DigitsSplit:
    """The digits, split into stratified training and validation sets by ``seed``.

    Requires scikit-learn (``pip install "normkit[ray]"``).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    split_sizes(val_fraction)  # validates
    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / _PIXEL_MAX
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    # Stratified: each class keeps its share in both sets, so validation error is not skewed by the draw.
    train_idx, val_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=val_fraction, random_state=seed, stratify=y.numpy()
    )
    train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    return DigitsSplit(x[train_idx], y[train_idx], x[val_idx], y[val_idx])


def shard_bounds(num_samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s contiguous share of ``num_samples`` items: sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def shard_indices(num_samples: int, world_size: int, rank: int, *, epoch: int, seed: int) -> Tensor:
    """``rank``'s training indices for ``epoch``: its slice of a permutation seeded by ``(seed, epoch)``.

    The ``world_size`` shards of one epoch are disjoint and together hold every index once; every rank
    computes the same permutation, so no communication is needed.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=generator)
    start, stop = shard_bounds(num_samples, world_size, rank)
    return order[start:stop]


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Optimizer steps per epoch: full batches of the *smallest* shard.

    Every rank must take the same number of steps (each step all-reduces gradients), and every step
    sees exactly ``batch_size`` samples per rank (BatchNorm's statistics depend on it), so a rank drops
    the at most ``batch_size`` indices left over at the end of its shard; which ones changes with every
    epoch's shuffle.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return (num_samples // world_size) // batch_size
