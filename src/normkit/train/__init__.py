"""Data-parallel training on Ray Train: a small CNN on scikit-learn's digits, with any normkit norm.

* :mod:`.settings`: :class:`TrainSettings`, one run's settings;
* :mod:`.data`: the digits, split once (stratified, seeded) and sharded per worker and epoch;
* :mod:`.model`: :class:`DigitsCNN` and the norm names (``batch``, ``sync-batch``, ``group``, ...);
* :mod:`.loop`: what each Ray Train worker runs (DDP, validation, a checkpoint per epoch, resume);
* :mod:`.checkpoint`: checkpoints written with ``torch.save``, read only with ``weights_only=True``;
* :mod:`.cluster`: a private loopback-only Ray instance, or an existing cluster checked before joining;
* :mod:`.driver`: :func:`run`, the live progress and the :class:`TrainResult`;
* :mod:`.experiment`: the batch-size sweep (BatchNorm vs SyncBatchNorm vs GroupNorm).

Importing this package needs only torch and rich; Ray Train and scikit-learn (``pip install
"normkit[ray]"``) are imported when a run starts. ``normkit train`` and ``normkit experiment`` are the
commands; docs/training.md is the guide.
"""

from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .cluster import RayConnection, check_address, ray_session
from .data import load_digits_split, shard_indices
from .display import history_table
from .driver import EpochRecord, TrainResult, run
from .errors import CheckpointError, ClusterUnreachable, InsufficientResources, RayNotInstalled, TrainingFailed
from .experiment import BatchSizeExperiment, ExperimentResult, run_batch_size_experiment
from .model import NORMS, DigitsCNN, build_model
from .settings import TrainSettings

__all__ = [
    "NORMS",
    "BatchSizeExperiment",
    "CheckpointError",
    "ClusterUnreachable",
    "DigitsCNN",
    "EpochRecord",
    "ExperimentResult",
    "InsufficientResources",
    "RayConnection",
    "RayNotInstalled",
    "TrainResult",
    "TrainSettings",
    "TrainState",
    "TrainingFailed",
    "build_model",
    "check_address",
    "history_table",
    "load_checkpoint",
    "load_digits_split",
    "ray_session",
    "run",
    "run_batch_size_experiment",
    "save_checkpoint",
    "shard_indices",
]
