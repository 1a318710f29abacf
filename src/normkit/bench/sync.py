"""What SyncBatchNorm costs over BatchNorm per training step: N processes on gloo, timed alternately.

``python -m normkit.bench.sync [--workers 2] [--reps 40] [--out sync.json]`` starts ``workers``
processes in one gloo group (one thread each, as data-parallel workers on one machine run), and in
each times the forward and backward of one layer on that rank's batch: normkit's BatchNorm2d (no
communication), normkit's SyncBatchNorm (one all_gather forward, one all_reduce backward) and torch's
BatchNorm2d, alternately as :mod:`normkit.bench.timing` does. Every call starts after a barrier, so a
collective's time includes waiting for the slowest rank, as in training. Rank 0's medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .machine import machine_info
from .timing import Timed, alternate

__all__ = ["DEFAULT_SHAPES", "run"]

#: per-worker (N, C, H, W): the digits CNN's second layer, then ResNet-like stages
DEFAULT_SHAPES: tuple[tuple[int, int, int, int], ...] = ((16, 32, 8, 8), (32, 64, 28, 28), (16, 256, 14, 14))


def _time_shape(shape: Sequence[int], rank: int, reps: int) -> dict:
    import torch.distributed as dist

    import normkit

    torch.manual_seed(rank)
    x = torch.randn(*shape, requires_grad=True)
    dy = torch.randn(*shape)
    layers = {
        "normkit BatchNorm2d": normkit.nn.BatchNorm2d(shape[1]),
        "normkit SyncBatchNorm": normkit.nn.SyncBatchNorm(shape[1]),
        "torch BatchNorm2d": torch.nn.BatchNorm2d(shape[1]),
    }

    def ready() -> None:
        x.grad = None
        dist.barrier()

    calls = {name: Timed(run=lambda m=m: m(x).backward(dy), prepare=ready) for name, m in layers.items()}
    timings = alternate(calls, reps=reps, warmup=3)
    return {
        "shape": list(shape),
        "median_s": {name: timings.median(name) for name in layers},
        "errors": {k: repr(v) for k, v in timings.errors.items()},
    }


def _worker(rank: int, world: int, store: str, shapes: list[list[int]], reps: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows = [_time_shape(shape, rank, reps) for shape in shapes]
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def run(workers: int = 2, shapes: Sequence[Sequence[int]] = DEFAULT_SHAPES, reps: int = 40) -> list[dict]:
    """Time the three layers in ``workers`` gloo processes; one row per shape with rank 0's medians."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.start_processes(
            _worker, args=(workers, os.path.join(tmp, "store"), [list(s) for s in shapes], reps, out),
            nprocs=workers, start_method="spawn",
        )
        rows = json.loads(Path(out).read_text())
    for row in rows:
        t = row["median_s"]
        row["sync_over_batchnorm"] = t["normkit SyncBatchNorm"] / t["normkit BatchNorm2d"]
        row["sync_overhead_us"] = 1e6 * (t["normkit SyncBatchNorm"] - t["normkit BatchNorm2d"])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m normkit.bench.sync``: time, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m normkit.bench.sync", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--out", type=Path, help="write the rows, machine and versions as JSON")
    args = parser.parse_args(argv)
    rows = run(args.workers, reps=args.reps)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"forward+backward of one layer, {args.workers} gloo workers, 1 thread each (rank 0)")
    for col in ("per-worker shape", "BatchNorm2d", "SyncBatchNorm", "torch BatchNorm2d", "Sync / BN", "overhead"):
        table.add_column(col, justify="right")
    for row in rows:
        t = row["median_s"]
        table.add_row(
            "x".join(map(str, row["shape"])),
            *(f"{1e3 * t[k]:.3f} ms" for k in ("normkit BatchNorm2d", "normkit SyncBatchNorm", "torch BatchNorm2d")),
            f"{row['sync_over_batchnorm']:.2f}x", f"{row['sync_overhead_us']:.0f} µs",
        )
    Console().print(table)
    if args.out:
        summary = {"workers": args.workers, "reps": args.reps, "machine": machine_info(), "rows": rows,
                   "median_ratio": statistics.median(r["sync_over_batchnorm"] for r in rows)}
        args.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
