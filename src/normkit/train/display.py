"""What the driver shows: a live progress display fed by the workers' events, and the per-epoch table."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

__all__ = ["LiveProgress", "cells_table", "format_epoch", "history_table"]


def _pct(value: float) -> str:
    return f"{100.0 * value:.2f}%"


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """One line per finished epoch: ``epoch 3/5  train loss 0.1234  val loss ...``."""
    return (
        f"epoch {record['epoch'] + 1}/{epochs}  train loss {record['train_loss']:.4f}  "
        f"val loss {record['val_loss']:.4f}  val error {_pct(record['val_error'])}  "
        f"lr {record['lr']:.3g}  {record['epoch_time_s']:.1f} s"
    )


class LiveProgress:
    """Progress of a run as the driver hears of it: a bar (on a terminal) and a line per event.

    ``total`` counts units of work (epochs, or steps for the experiment). Without a console nothing is
    shown; on a console that is not a terminal each line is printed, with no bar.
    """

    def __init__(self, console: Console | None, description: str, total: int) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task = None
        self._description = description
        self._total = total
        self._started = time.perf_counter()

    def __enter__(self) -> LiveProgress:
        if self.console is not None and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._description, total=self._total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def line(self, text: str, style: str | None = None) -> None:
        """Print ``text`` above the bar, prefixed with the elapsed time."""
        if self.console is None:
            return
        elapsed = time.perf_counter() - self._started
        self.console.print(Text(f"[{elapsed:6.1f} s] {text}", style=style or ""), soft_wrap=True)

    def update(self, completed: int, description: str | None = None) -> None:
        if self._progress is not None and self._task is not None:
            changes: dict[str, Any] = {"completed": completed}
            if description is not None:
                changes["description"] = description
            self._progress.update(self._task, **changes)


def history_table(history: Iterable[Any], title: str = "normkit train") -> Table:
    """A rich table with a row per epoch (records are dicts or :class:`~normkit.train.driver.EpochRecord`)."""
    rows = [r if isinstance(r, dict) else r.to_dict() for r in history]
    table = Table(title=title, title_justify="left")
    for name in ("epoch", "train loss", "val loss", "val error", "val accuracy", "lr", "time", "run"):
        table.add_column(name, justify="left" if name == "run" else "right")
    for r in rows:
        resumed = r.get("resumed_from_epoch")
        origin = "first start" if resumed is None else f"resumed after epoch {resumed + 1}"
        table.add_row(
            str(r["epoch"] + 1),
            f"{r['train_loss']:.4f}",
            f"{r['val_loss']:.4f}",
            _pct(r["val_error"]),
            _pct(r["val_accuracy"]),
            f"{r['lr']:.3g}",
            f"{r['epoch_time_s']:.1f} s",
            origin,
        )
    return table


def cells_table(rows: Sequence[dict[str, Any]], norms: Sequence[str], batch_sizes: Sequence[int], title: str) -> Table:
    """Validation error per (norm, per-worker batch size): one row per batch size, one column per norm."""
    table = Table(title=title, title_justify="left")
    table.add_column("batch / worker", justify="right")
    table.add_column("global batch", justify="right")
    table.add_column("lr", justify="right")
    for norm in norms:
        table.add_column(f"{norm} error", justify="right")
    by_cell = {(r["norm"], r["batch_size"]): r for r in rows}
    for b in batch_sizes:
        cells = [by_cell.get((n, b)) for n in norms]
        first = next((c for c in cells if c is not None), None)
        table.add_row(
            str(b),
            str(first["global_batch"]) if first else "-",
            f"{first['lr']:.4g}" if first else "-",
            *(_pct(c["val_error"]) if c else "-" for c in cells),
        )
    return table
