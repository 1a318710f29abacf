"""``normkit experiment batch-size``: the GroupNorm paper's small-batch finding, in miniature.

Wu & He (GroupNorm, 2018) show that BatchNorm's error rises as the batch per GPU shrinks, because its
batch statistics get noisy and stop matching the running statistics used at evaluation, while GroupNorm
does not depend on the batch at all. Here: :class:`~normkit.train.model.DigitsCNN` on the digits, over
``workers`` Ray Train workers, for every per-worker batch size x norm (``batch``, ``sync-batch``,
``group`` by default) and seed; the validation error of each cell.

What keeps the comparison fair:

* every cell trains the same number of epochs, so it sees the same samples, in the same order for a
  given seed (the shuffles depend only on the seed and the epoch), and every cell is scored on the
  same 360 validation images (the split does not change with the seed);
* the learning rate follows the linear scaling rule that the GroupNorm paper uses (peak ``base_lr``
  at ``reference_batch`` images per worker, proportionally less for smaller batches), with the same
  cosine decay to zero: at each batch size all norms get the same schedule;
* all norms start from the same initial convolution weights (same seed, same construction order);
* BatchNorm is evaluated as it is deployed, in eval mode with its running statistics: the point of
  the experiment is how well those match training-time statistics computed on a few images.

All cells run in one Ray Train run (one worker group): starting a worker group costs 20-40 s on a
2-core machine, more than most cells take to train. After each cell, rank 0 reports the results so
far as a checkpoint (plain JSON), so a restarted worker group continues with the next cell.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from .cluster import check_resources, ray_session, require_ray
from .data import DigitsSplit, load_digits_split
from .display import LiveProgress, cells_table
from .driver import fit_with_events, local_cpus, storage_location, timestamped_name
from .errors import CheckpointError, TrainingFailed
from .settings import TrainSettings

__all__ = ["BatchSizeExperiment", "ExperimentResult", "run_batch_size_experiment", "sweep_loop_per_worker"]

CELLS_FILE = "cells.json"
_CELLS_FORMAT = "normkit.experiment.batch-size/1"


@dataclass(frozen=True)
class BatchSizeExperiment:
    """The sweep: per-worker batch sizes x norms x seeds, each cell a training run of ``epochs``."""

    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32)
    norms: tuple[str, ...] = ("batch", "sync-batch", "group")
    seeds: tuple[int, ...] = (0,)
    workers: int = 2
    epochs: int = 6
    #: SGD (momentum 0.9) peak learning rate at ``reference_batch`` images per worker
    base_lr: float = 0.1
    reference_batch: int = 32
    address: str | None = None
    storage_path: str | None = None
    max_failures: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or not self.norms or not self.seeds:
            raise ValueError("batch_sizes, norms and seeds must each name at least one value")
        if self.base_lr <= 0 or self.reference_batch < 1:
            raise ValueError(f"need base_lr > 0 and reference_batch >= 1, got {self.base_lr}, {self.reference_batch}")
        for cell in self.cells():  # checks every cell's settings now, not halfway through the sweep
            self.cell_settings(*cell)

    def cells(self) -> list[tuple[str, int, int]]:
        """``(norm, batch_size, seed)`` in run order: seed, then batch size, then norm."""
        return [(n, b, s) for s in self.seeds for b in self.batch_sizes for n in self.norms]

    def lr_for(self, batch_size: int) -> float:
        return self.base_lr * batch_size / self.reference_batch

    def cell_settings(self, norm: str, batch_size: int, seed: int) -> TrainSettings:
        return TrainSettings(
            norm=norm,
            workers=self.workers,
            epochs=self.epochs,
            batch_size=batch_size,
            lr=self.lr_for(batch_size),
            optimizer="sgd",
            momentum=0.9,
            schedule="cosine",
            seed=seed,
        )

    def load_data(self) -> DigitsSplit:
        """The split every cell uses: the seeds vary the weights and the shuffles, not the split, so all
        cells are scored on the same validation images."""
        first = self.cell_settings(*self.cells()[0])
        return load_digits_split(first.split_seed, first.val_fraction)

    def total_steps(self) -> int:
        """Optimizer steps of the whole sweep, per worker (the unit of the progress bar)."""
        return sum(self.epochs * self.cell_settings(*c).steps_per_epoch for c in self.cells())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_cells(directory: str | Path) -> list[dict[str, Any]]:
    path = Path(directory) / CELLS_FILE
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != _CELLS_FORMAT:
        raise CheckpointError(f"{path} is not a {_CELLS_FORMAT} checkpoint")
    return list(payload["cells"])


def sweep_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point for the sweep.

    ``config``: ``experiment``; ``data``, the split (loaded here if absent); ``events``, a queue or None.
    """
    import ray.train
    import ray.train.torch
    import torch

    from .loop import evaluate, make_optimizer, prepare, rendezvous_on_loopback, train_epoch
    from .model import build_model

    experiment: BatchSizeExperiment = config["experiment"]
    events = config.get("events")
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    rendezvous_on_loopback(device)
    data = config.get("data") or experiment.load_data()
    done: list[dict[str, Any]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            done = _read_cells(directory)
    finished = {(r["norm"], r["batch_size"], r["seed"]) for r in done}
    work_done = sum(experiment.epochs * experiment.cell_settings(*c).steps_per_epoch for c in finished)
    if rank == 0 and events is not None:
        events.put(
            {
                "event": "start",
                "cells_done": len(done),
                "work_done": work_done,
                "torch_threads": torch.get_num_threads(),
            }
        )
    for norm, batch_size, seed in experiment.cells():
        if (norm, batch_size, seed) in finished:
            continue
        settings = experiment.cell_settings(norm, batch_size, seed)
        started = time.perf_counter()
        model = prepare(build_model(norm, seed=seed))
        optimizer = make_optimizer(model, settings)
        train_loss = math.nan
        for epoch in range(settings.epochs):
            train_loss, _ = train_epoch(model, optimizer, data, settings, epoch, device)
            work_done += settings.steps_per_epoch
            if rank == 0 and events is not None:
                events.put(
                    {
                        "event": "cell-epoch",
                        "norm": norm,
                        "batch_size": batch_size,
                        "seed": seed,
                        "epoch": epoch,
                        "train_loss": train_loss,
                        "work_done": work_done,
                    }
                )
        val_loss, val_error = evaluate(model, data.val_x, data.val_y, device)
        row = {
            "norm": norm,
            "batch_size": batch_size,
            "global_batch": batch_size * settings.workers,
            "lr": settings.learning_rate,
            "seed": seed,
            "epochs": settings.epochs,
            "steps_per_worker": settings.epochs * settings.steps_per_epoch,
            "val_error": val_error,
            "val_loss": val_loss,
            "train_loss": train_loss,
            "time_s": time.perf_counter() - started,
        }
        done.append(row)
        with tempfile.TemporaryDirectory(prefix="normkit-sweep-") as directory:
            reported = None
            if rank == 0:
                with open(Path(directory) / CELLS_FILE, "w", encoding="utf-8") as f:
                    json.dump({"format": _CELLS_FORMAT, "cells": done}, f, indent=1)
                reported = ray.train.Checkpoint.from_directory(directory)
            ray.train.report({"cells_done": len(done), **row}, checkpoint=reported)
        if rank == 0 and events is not None:
            events.put({"event": "cell", **row})


@dataclass
class ExperimentResult:
    experiment: BatchSizeExperiment
    #: one row per cell (norm, batch_size, seed, val_error, ...)
    rows: list[dict[str, Any]]
    wall_time_s: float
    fit_time_s: float
    #: files written (table.md, results.csv, plot.png, run.json)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def error(self, norm: str, batch_size: int) -> float:
        """Mean validation error of a cell over the seeds."""
        values = [r["val_error"] for r in self.rows if r["norm"] == norm and r["batch_size"] == batch_size]
        return sum(values) / len(values)


def _summary(rows: Sequence[dict[str, Any]], norms: Sequence[str], batch_sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Per (norm, batch size): mean, min and max validation error over the seeds."""
    out = []
    for norm in norms:
        for b in batch_sizes:
            cell = [r for r in rows if r["norm"] == norm and r["batch_size"] == b]
            if not cell:
                continue
            errors = [r["val_error"] for r in cell]
            out.append(
                {
                    "norm": norm,
                    "batch_size": b,
                    "global_batch": cell[0]["global_batch"],
                    "lr": cell[0]["lr"],
                    "val_error": sum(errors) / len(errors),
                    "min": min(errors),
                    "max": max(errors),
                    "seeds": len(cell),
                }
            )
    return out


def _markdown_table(experiment: BatchSizeExperiment, summary: list[dict[str, Any]]) -> str:
    seeds = len(experiment.seeds)
    by = {(s["norm"], s["batch_size"]): s for s in summary}
    header = "| batch / worker | global batch | lr | " + " | ".join(f"{n} error" for n in experiment.norms) + " |"
    lines = [header, "|" + "---:|" * (3 + len(experiment.norms))]
    for b in experiment.batch_sizes:
        cells = [by.get((n, b)) for n in experiment.norms]
        first = next((c for c in cells if c), None)
        if first is None:
            continue

        def fmt(c: dict[str, Any] | None) -> str:
            if c is None:
                return "-"
            text = f"{100 * c['val_error']:.2f}%"
            return text + (f" ({100 * c['min']:.2f}-{100 * c['max']:.2f})" if seeds > 1 else "")

        lines.append(f"| {b} | {first['global_batch']} | {first['lr']:.4g} | " + " | ".join(map(fmt, cells)) + " |")
    what = (
        f"mean over seeds {', '.join(map(str, experiment.seeds))} (min-max in brackets)"
        if seeds > 1
        else (f"seed {experiment.seeds[0]}")
    )
    return (
        f"Validation error (eval mode) of DigitsCNN on scikit-learn's digits after {experiment.epochs} epochs, "
        f"{experiment.workers} Ray Train workers, SGD momentum 0.9, peak lr {experiment.base_lr:g} x batch / "
        f"{experiment.reference_batch}, cosine decay; {what}.\n\n" + "\n".join(lines) + "\n"
    )


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns = [
        "norm",
        "batch_size",
        "global_batch",
        "lr",
        "seed",
        "epochs",
        "steps_per_worker",
        "val_error",
        "val_loss",
        "train_loss",
        "time_s",
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _plot(path: Path, experiment: BatchSizeExperiment, summary: list[dict[str, Any]]) -> str | None:
    """Draw error vs per-worker batch size per norm; None, or why no chart was drawn."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: no plot (pip install 'normkit[bench]')"
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for i, norm in enumerate(experiment.norms):
        points = sorted((s for s in summary if s["norm"] == norm), key=lambda s: s["batch_size"])
        if not points:
            continue
        xs = [p["batch_size"] for p in points]
        ys = [100 * p["val_error"] for p in points]
        if len(experiment.seeds) > 1:
            lower = [y - 100 * p["min"] for y, p in zip(ys, points, strict=True)]
            upper = [100 * p["max"] - y for y, p in zip(ys, points, strict=True)]
            ax.errorbar(xs, ys, yerr=[lower, upper], marker=markers[i % len(markers)], capsize=3, label=norm)
        else:
            ax.plot(xs, ys, marker=markers[i % len(markers)], label=norm)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(experiment.batch_sizes), [str(b) for b in experiment.batch_sizes])
    ax.invert_xaxis()  # as in the GroupNorm paper: the batch shrinks to the right
    ax.set_ylim(bottom=0)  # from zero: a difference of one validation image is 0.28 points, not a cliff
    ax.set_xlabel(f"images per worker ({experiment.workers} workers)")
    ax.set_ylabel("validation error (%)")
    seeds = f", mean of {len(experiment.seeds)} seeds (bars: min-max)" if len(experiment.seeds) > 1 else ""
    ax.set_title(f"Digits CNN, {experiment.epochs} epochs, lr scaled with batch{seeds}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return None


def _versions() -> dict[str, str]:
    import ray
    import sklearn
    import torch

    from .. import __version__

    return {
        "normkit": __version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "scikit-learn": sklearn.__version__,
        "python": platform.python_version(),
    }


def write_outputs(out_dir: str | Path, result: ExperimentResult, extra: dict[str, Any] | None = None) -> list[Path]:
    """Write table.md, results.csv, plot.png (if matplotlib is installed) and run.json into ``out_dir``."""
    from ..bench.machine import machine_info

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    experiment = result.experiment
    summary = _summary(result.rows, experiment.norms, experiment.batch_sizes)
    written = []
    (out / "table.md").write_text(_markdown_table(experiment, summary), encoding="utf-8")
    written.append(out / "table.md")
    _write_csv(out / "results.csv", result.rows)
    written.append(out / "results.csv")
    note = _plot(out / "plot.png", experiment, summary)
    if note is None:
        written.append(out / "plot.png")
    else:
        result.notes.append(note)
    meta = {
        "experiment": experiment.to_dict(),
        "wall_time_s": round(result.wall_time_s, 2),
        "fit_time_s": round(result.fit_time_s, 2),
        "versions": _versions(),
        "machine": machine_info(),
        "summary": summary,
        **(extra or {}),
    }
    with open(out / "run.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    written.append(out / "run.json")
    result.files = written
    return written


def run_batch_size_experiment(
    experiment: BatchSizeExperiment,
    out_dir: str | Path | None = None,
    *,
    console: Console | None = None,
    quiet: bool = False,
    verbose: bool = False,
) -> ExperimentResult:
    """Run the sweep on one Ray instance (and one worker group); write the outputs if ``out_dir`` is given."""
    require_ray()
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    started = time.perf_counter()
    # Other processes on the machine slow the sweep down: record how busy it was when it started.
    load_at_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    if console is None and not quiet:
        console = Console(stderr=True, highlight=False)
    shown = None if quiet else console
    cpus = local_cpus(experiment.workers) if experiment.address is None else None
    with contextlib.ExitStack() as stack:
        address = stack.enter_context(ray_session(experiment.address, num_cpus=cpus, verbose=verbose)).address
        check_resources(experiment.workers, use_gpu=False)
        # Without a storage path the checkpoints (the cells done so far) live as long as the sweep.
        scratch = (
            None
            if experiment.storage_path
            else stack.enter_context(tempfile.TemporaryDirectory(prefix="normkit-experiment-"))
        )
        storage = storage_location(experiment.storage_path or scratch)
        name = timestamped_name("batch-size")
        queue = Queue(actor_options={"num_cpus": 0})
        stack.callback(queue.shutdown)
        trainer = TorchTrainer(
            sweep_loop_per_worker,
            train_loop_config={"experiment": experiment, "data": experiment.load_data(), "events": queue},
            scaling_config=ScalingConfig(num_workers=experiment.workers),
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=experiment.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        cells = experiment.cells()
        worker_threads: set[int] = set()
        fit_started = time.perf_counter()
        with LiveProgress(shown, "batch-size sweep", experiment.total_steps()) as live:
            live.line(f"{len(cells)} cells on {experiment.workers} workers; Ray at {address}; starting the workers")

            def on_event(event: dict[str, Any]) -> None:
                if event["event"] == "start":
                    worker_threads.add(event["torch_threads"])
                    live.line(f"workers started ({event['cells_done']} of {len(cells)} cells already done)")
                    live.update(event["work_done"])
                elif event["event"] == "cell-epoch":
                    live.update(
                        event["work_done"],
                        description=(
                            f"{event['norm']} b={event['batch_size']} seed {event['seed']} epoch {event['epoch'] + 1}"
                        ),
                    )
                elif event["event"] == "cell":
                    live.line(
                        f"{event['norm']:>10} batch {event['batch_size']:>3}/worker seed {event['seed']}: "
                        f"val error {100 * event['val_error']:.2f}%  train loss {event['train_loss']:.4f}  "
                        f"({event['time_s']:.1f} s)"
                    )

            try:
                fit_result = fit_with_events(trainer, queue, on_event)
            except Exception as e:  # TrainingFailedError (its module differs across Ray versions) and the like
                raise TrainingFailed(f"the sweep failed: {e}", run_path=os.path.join(storage, name), name=name) from e
        fit_time = time.perf_counter() - fit_started
        if fit_result.checkpoint is None:
            raise RuntimeError("the sweep finished without reporting any cell")
        with fit_result.checkpoint.as_directory() as directory:
            rows = _read_cells(directory)
    result = ExperimentResult(experiment, rows, wall_time_s=time.perf_counter() - started, fit_time_s=fit_time)
    if out_dir is not None:
        write_outputs(
            out_dir,
            result,
            {
                "load_average_start": load_at_start,
                "ray_address": address,
                "torch_threads_per_worker": sorted(worker_threads),
            },
        )
    return result


def results_table(result: ExperimentResult) -> Any:
    """The rich table of mean validation error per batch size (rows) and norm (columns)."""
    experiment = result.experiment
    summary = _summary(result.rows, experiment.norms, experiment.batch_sizes)
    return cells_table(
        summary,
        experiment.norms,
        experiment.batch_sizes,
        title=f"validation error after {experiment.epochs} epochs ({experiment.workers} workers)",
    )
