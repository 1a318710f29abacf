"""The driver: :func:`run` trains :class:`~normkit.train.model.DigitsCNN` data-parallel with Ray Train.

``run(settings)`` starts (or joins) Ray (:func:`~normkit.train.cluster.ray_session`), checks that the
cluster can place the workers, and runs :class:`ray.train.torch.TorchTrainer` with
:func:`~normkit.train.loop.train_loop_per_worker` in a background thread. Meanwhile the calling thread
shows the workers' progress: rank 0 puts an event per start and per epoch into a
``ray.util.queue.Queue`` (an actor; Ray Train's own metrics reach the driver only when the run ends),
which the driver polls. Running ``fit`` outside the main thread also keeps Ray Train from installing
its SIGINT handler in the caller's process.

The returned :class:`TrainResult` takes its history from the final checkpoint, which carries the record
of every epoch, including the epochs a restart ran and the checkpoint it resumed from.
"""

from __future__ import annotations

import datetime
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rich.console import Console

from .checkpoint import load_checkpoint
from .cluster import check_resources, ray_session, require_ray
from .data import load_digits_split
from .display import LiveProgress, format_epoch
from .errors import TrainingFailed
from .settings import DEFAULT_STORAGE, TrainSettings

__all__ = ["EpochRecord", "TrainResult", "run", "storage_location"]

#: how often the driver polls the workers' event queue (seconds)
_POLL_S = 0.2


@dataclass(frozen=True)
class EpochRecord:
    """The metrics of one epoch, as rank 0 reported them."""

    epoch: int
    train_loss: float
    val_loss: float
    val_error: float
    val_accuracy: float
    lr: float
    samples: int
    epoch_time_s: float
    #: the epoch of the checkpoint the workers had resumed from when they ran this epoch (None: fresh)
    resumed_from_epoch: int | None = None
    #: that checkpoint's path
    resumed_from_checkpoint: str | None = None

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> EpochRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What :func:`run` returns."""

    settings: TrainSettings
    #: one record per epoch, in order (epochs from before a restart included)
    history: list[EpochRecord]
    #: the last epoch's metrics
    metrics: dict[str, Any]
    #: the last checkpoint (a directory with state.pt and history.json), or None if no epoch finished
    checkpoint_path: str | None
    #: the run's directory in storage
    run_path: str
    #: seconds from the call to its return, Ray's start-up included
    wall_time_s: float
    #: seconds of ``TorchTrainer.fit`` (worker start-up, training, restarts)
    fit_time_s: float
    #: how many times the workers started (1 + restarts) during this call
    attempts: int
    #: the Ray GCS address the run used
    address: str
    #: every event rank 0 sent, in order (``start`` and ``epoch``)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def restarts(self) -> int:
        return max(0, self.attempts - 1)

    @property
    def final_val_error(self) -> float:
        return self.history[-1].val_error


def storage_location(storage_path: str | None) -> str:
    """The storage path Ray Train gets: a URI as it is, a local path made absolute (and created)."""
    if storage_path is not None and "://" in storage_path:
        return storage_path
    path = Path(storage_path if storage_path is not None else DEFAULT_STORAGE).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def timestamped_name(prefix: str) -> str:
    """``PREFIX-YYYYmmdd-HHMMSS-xxxx``: a run name that sorts by time (the suffix tells apart two in a second)."""
    return f"{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _drain(queue: Any) -> list[dict[str, Any]]:
    size = queue.qsize()
    return list(queue.get_nowait_batch(size)) if size else []


def fit_with_events(trainer: Any, queue: Any, on_event: Any) -> Any:
    """``trainer.fit()`` in a daemon thread, passing each event of ``queue`` to ``on_event`` meanwhile.

    Returns fit's result or raises its exception (after the remaining events are handed over).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the calling thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name="normkit-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        for event in _drain(queue):
            on_event(event)
        thread.join(_POLL_S)
    for event in _drain(queue):
        on_event(event)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def local_cpus(workers: int) -> int:
    """CPUs a private local instance advertises: the machine's, or ``workers`` if more (they share cores)."""
    return max(os.cpu_count() or 1, workers)


def run(
    settings: TrainSettings,
    *,
    console: Console | None = None,
    quiet: bool = False,
    verbose: bool = False,
) -> TrainResult:
    """Train on Ray Train as ``settings`` say, showing per-epoch progress; return the history and paths.

    Args:
        settings: the run (see :class:`TrainSettings`).
        console: where progress goes (default: a rich console on stderr).
        quiet: show nothing.
        verbose: Ray's info logs and the workers' output in the driver (Ray's own formats).

    Raises:
        RayNotInstalled, ClusterUnreachable, InsufficientResources: before training starts.
        TrainingFailed: the workers failed more often than ``settings.max_failures`` (the cause is Ray
            Train's ``TrainingFailedError``; the exception says where the checkpoints are).
    """
    require_ray()
    started = time.perf_counter()
    if console is None and not quiet:
        console = Console(stderr=True, highlight=False)
    shown = None if quiet else console
    cpus = local_cpus(settings.workers) if settings.address is None else None
    with ray_session(settings.address, num_cpus=cpus, verbose=verbose) as connection:
        check_resources(settings.workers, settings.use_gpu)
        return _train(settings, shown, connection.address, started)


def _train(settings: TrainSettings, console: Console | None, address: str, started: float) -> TrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from .loop import train_loop_per_worker

    storage = storage_location(settings.storage_path)
    name = settings.name if settings.name is not None else timestamped_name(settings.norm)
    remote = "://" in storage
    run_path = f"{storage.rstrip('/')}/{name}" if remote else os.path.join(storage, name)
    events: list[dict[str, Any]] = []
    attempts = 0
    description = (
        f"{settings.norm}: {settings.workers} workers x batch {settings.batch_size}"
        f"{', GPU' if settings.use_gpu else ''}"
    )
    queue = Queue(actor_options={"num_cpus": 0})  # progress events only: it must not take a worker's CPU
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "settings": settings,
                "data": load_digits_split(settings.split_seed, settings.val_fraction),
                "events": queue,
                "run_dir": None if remote else run_path,
            },
            scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=settings.use_gpu),
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=settings.max_failures),
                # The newest checkpoint is all a restart needs; it carries the whole history.
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        fit_started = time.perf_counter()
        with LiveProgress(console, description, settings.epochs) as live:
            live.line(f"run {name} in {storage}; Ray at {address}; starting {settings.workers} workers")

            def on_event(event: dict[str, Any]) -> None:
                nonlocal attempts
                events.append(event)
                if event["event"] == "start":
                    attempts += 1
                    resumed = event.get("resumed_from_epoch")
                    where = " (process group on 127.0.0.1)" if event.get("rendezvous_on_loopback") else ""
                    if resumed is None:
                        again = " again: no checkpoint yet, from scratch" if attempts > 1 else ""
                        live.line(f"workers started{where}{again}")
                    else:
                        live.line(
                            f"workers started{' again' if attempts > 1 else ''}{where}: resuming after epoch "
                            f"{resumed + 1} from {event.get('resumed_from_checkpoint')}",
                            style="yellow",
                        )
                    live.update(event.get("start_epoch", 0))
                elif event["event"] == "epoch":
                    live.line(format_epoch(event, settings.epochs))
                    live.update(event["epoch"] + 1)

            try:
                result = fit_with_events(trainer, queue, on_event)
            except Exception as e:  # TrainingFailedError (its module differs across Ray versions) and the like
                raise TrainingFailed(
                    f"{e}\nThe run's checkpoints are in {run_path}: run it again with the name {name!r} "
                    "(normkit train --name), the same storage path and the same settings to resume from the "
                    "last one.",
                    run_path=run_path,
                    name=name,
                ) from e
    finally:
        queue.shutdown()
    fit_time = time.perf_counter() - fit_started

    checkpoint_path = None
    history: list[EpochRecord] = []
    if result.checkpoint is not None:
        checkpoint_path = result.checkpoint.path
        with result.checkpoint.as_directory() as directory:
            history = [EpochRecord.from_dict(r) for r in load_checkpoint(directory).history]
    return TrainResult(
        settings=settings,
        history=history,
        metrics=history[-1].to_dict() if history else {},
        checkpoint_path=checkpoint_path,
        run_path=result.path,
        wall_time_s=time.perf_counter() - started,
        fit_time_s=fit_time,
        attempts=attempts,
        address=address,
        events=events,
    )
