"""What the benchmark ran on: CPU model, cores, threads, versions, date (recorded in the JSON)."""

from __future__ import annotations

import datetime
import os
import platform
import sys

import torch

__all__ = ["cpu_model", "machine_info"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: above 0 means other processes competed for the cores."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, object]:
    """CPU, cores and threads, load, versions (Python, torch, normkit) and date, for result files."""
    from .. import __version__

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "normkit": __version__,
        "platform": platform.platform(),
        "load_average": _load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
