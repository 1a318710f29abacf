"""The settings of one training run (:class:`TrainSettings`), checked when they are made."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

from .data import split_sizes, steps_per_epoch
from .model import NORMS

__all__ = ["DEFAULT_LR", "DEFAULT_STORAGE", "OPTIMIZERS", "SCHEDULES", "TrainSettings"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")
#: learning rate when none is given, per optimizer
DEFAULT_LR = {"sgd": 0.05, "adam": 0.003}
#: where runs are stored when no storage path is given (relative to the working directory)
DEFAULT_STORAGE = "normkit-runs"


@dataclass(frozen=True)
class TrainSettings:
    """One data-parallel training run of :class:`~normkit.train.model.DigitsCNN` on the digits.

    Attributes:
        norm: the normalization layer, one of :data:`~normkit.train.model.NORMS`.
        workers: Ray Train workers (processes); each takes one CPU, or one GPU with ``use_gpu``.
        epochs: passes over the training set.
        batch_size: samples per worker per step (the global batch is ``workers * batch_size``).
        lr: peak learning rate; ``None``: :data:`DEFAULT_LR` for the optimizer.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        momentum: SGD's momentum.
        weight_decay: L2 penalty, for either optimizer.
        schedule: ``"cosine"`` decays the learning rate to 0 over the run, step by step; ``"constant"``.
        seed: fixes the initial weights and every epoch's shuffle.
        split_seed: fixes the training/validation split; it stays 0 when ``seed`` changes, so runs with
            different seeds are scored on the same validation images.
        val_fraction: share of the digits held out for validation (stratified).
        use_gpu: one GPU per worker; the process group then uses NCCL.
        address: an existing Ray cluster's GCS address (``HOST:PORT`` or ``"auto"``); ``None`` starts a
            private local Ray instance (loopback only) for the run.
        storage_path: where Ray Train writes checkpoints; a local directory (made absolute) or a URI
            such as ``s3://bucket/prefix``. ``None``: ``./normkit-runs``.
        name: the run's directory under ``storage_path``; ``None``: ``<norm>-<timestamp>``. Running again
            with the name of a finished or failed run resumes it from its last checkpoint.
        max_failures: worker-group restarts Ray Train may make after a failure (``-1``: unlimited).
        fail_at_epoch: a test hook: the last worker raises once, halfway through this epoch. "Once" is
            recorded by a marker file in the run's directory, so the restarted workers do not raise
            again. Needs a local ``storage_path``.
    """

    norm: str = "batch"
    workers: int = 2
    epochs: int = 5
    batch_size: int = 32
    lr: float | None = None
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    seed: int = 0
    split_seed: int = 0
    val_fraction: float = 0.2
    use_gpu: bool = False
    address: str | None = None
    storage_path: str | None = None
    name: str | None = None
    max_failures: int = 0
    fail_at_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose from {', '.join(NORMS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        for name in ("workers", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(f"need 0 <= momentum < 1 and weight_decay >= 0, got {self.momentum}, {self.weight_decay}")
        if self.seed < 0 or self.split_seed < 0:
            raise ValueError(f"seeds must be non-negative, got seed={self.seed}, split_seed={self.split_seed}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be -1 (unlimited) or more, got {self.max_failures}")
        n_train, _ = split_sizes(self.val_fraction)
        if steps_per_epoch(n_train, self.workers, self.batch_size) < 1:
            raise ValueError(
                f"batch_size {self.batch_size} x {self.workers} workers leaves no full batch in the "
                f"{n_train} training images; use a smaller batch or fewer workers"
            )
        if self.fail_at_epoch is not None:
            if not 0 <= self.fail_at_epoch < self.epochs:
                raise ValueError(f"fail_at_epoch must be in [0, {self.epochs}), got {self.fail_at_epoch}")
            if self.storage_path is not None and "://" in self.storage_path:
                raise ValueError("fail_at_epoch needs a local storage_path (its marker file lives there)")
        if self.name is not None and (not self.name or os.sep in self.name or self.name in (".", "..")):
            raise ValueError(f"name must be a plain directory name, got {self.name!r}")

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: ``lr``, or the optimizer's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def train_samples(self) -> int:
        return split_sizes(self.val_fraction)[0]

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the same on every worker)."""
        return steps_per_epoch(self.train_samples, self.workers, self.batch_size)

    def replace(self, **changes: Any) -> TrainSettings:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
