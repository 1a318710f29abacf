"""The exceptions :mod:`normkit.train` raises for problems the user can fix."""

from __future__ import annotations

__all__ = ["CheckpointError", "ClusterUnreachable", "InsufficientResources", "RayNotInstalled", "TrainingFailed"]


class RayNotInstalled(ImportError):
    """Ray Train (or scikit-learn, for the data) is not installed: ``pip install "normkit[ray]"``."""


class ClusterUnreachable(ConnectionError):
    """No Ray cluster answers at the given address (refused, timed out, not a Ray GCS, or unknown host).

    Raised within seconds, before ``ray.init`` is called: ``ray.init`` itself retries an unreachable
    address for many minutes before it gives up.
    """


class InsufficientResources(RuntimeError):
    """The cluster cannot place the requested workers (too few CPUs or GPUs).

    Raised before training starts: Ray Train would otherwise wait for the resources indefinitely.
    """


class CheckpointError(ValueError):
    """A checkpoint cannot be read: missing files, an unknown format, or content that is not plain data.

    Checkpoints are loaded with ``torch.load(..., weights_only=True)``; a file that needs arbitrary
    code to unpickle is refused with this error, whose ``__cause__`` is torch's ``UnpicklingError``.
    """


class TrainingFailed(RuntimeError):
    """The workers failed more often than ``max_failures`` allows; ``__cause__`` is Ray Train's error.

    ``run_path`` and ``name`` say where the run's checkpoints are: running again with the same name,
    storage path and settings resumes from the last one.
    """

    def __init__(self, message: str, *, run_path: str, name: str) -> None:
        super().__init__(message)
        self.run_path = run_path
        self.name = name
