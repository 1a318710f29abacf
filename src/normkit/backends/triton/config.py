"""Launch heuristics: block sizes, warps and program counts, in one place.

Everything here is a plain function of shapes, dtypes and the device, so that a given call on a given
GPU always launches the same grid: the per-program partial sums, and so the results, are then bitwise
the same run to run.

Tests shrink the largest block (:func:`max_block`) with :func:`block_cap` so that the loops over column
blocks, spatial chunks and row tiles run at sizes the Triton interpreter can execute in seconds;
``benchmarks/gpu_tune.py`` replaces single choices with :func:`tuning` to time the alternatives on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import triton  # noqa: F401  (the backend is unavailable without triton: fail at import)

__all__ = [
    "INTERPRET", "TUNABLE", "block_cap", "cdiv", "max_block", "next_power_of_2", "num_sms", "row_backward_programs",
    "row_config", "set_splits", "tile_elements", "tuned", "tuning", "warps_for",
]

#: whether TRITON_INTERPRET=1 was set when the backend loaded: then its kernels run on CPU tensors
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: programs a CPU "device" gets in the interpreter: a few, so that per-program loops and partial
#: buffers with several rows are exercised
_INTERPRETER_SMS = 3

_cap_override: int | None = None

#: the choices :func:`tuning` can replace, with what each sets
TUNABLE = {
    "warps": "num_warps of every kernel whose warps the heuristics choose (rows, sets, BatchNorm)",
    "row_block_m": "rows per program of the row kernels, for rows that fit one tile",
    "row_programs_per_sm": "programs per SM of the row backward, for rows that fit one tile",
    "tile": "elements per tile of the set (GroupNorm/InstanceNorm) and BatchNorm kernels",
    "set_splits": "programs per (sample, group) set of the GroupNorm/InstanceNorm kernels",
}
_tuned: dict[str, int] = {}


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints. The launchers call these two on every launch, and triton 3.8's
    own ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: 13 µs a call under the
    profiler on the 2-core CI machine, seven calls per BatchNorm."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@contextlib.contextmanager
def block_cap(elements: int) -> Iterator[None]:
    """Within the block, no tile holds more than ``elements`` elements (a power of two; for tests)."""
    global _cap_override
    if elements < 1 or elements & (elements - 1):
        raise ValueError(f"block cap must be a power of two, got {elements}")
    old, _cap_override = _cap_override, elements
    try:
        yield
    finally:
        _cap_override = old


@contextlib.contextmanager
def tuning(**choices: int) -> Iterator[None]:
    """Within the block, each named choice of :data:`TUNABLE` is the given value instead of the heuristic's
    (not thread-safe; for timing alternatives, not for production use)."""
    unknown = set(choices) - set(TUNABLE)
    if unknown:
        raise ValueError(f"unknown launch choices {sorted(unknown)}; known: {sorted(TUNABLE)}")
    if any(not isinstance(v, int) or v < 1 for v in choices.values()):
        raise ValueError(f"launch choices are positive ints, got {choices}")
    if "tile" in choices and choices["tile"] & (choices["tile"] - 1):
        raise ValueError(f"tile must be a power of two, got {choices['tile']}")
    old = dict(_tuned)
    _tuned.update(choices)
    try:
        yield
    finally:
        _tuned.clear()
        _tuned.update(old)


def max_block(dtype: torch.dtype) -> int:
    """The most elements of one row a program holds in registers: rows longer than this are
    processed in column blocks of this size, in two passes (statistics, then the output)."""
    if _cap_override is not None:
        return _cap_override
    return 16384 if dtype.itemsize <= 2 else 8192


def tile_elements() -> int:
    """Elements per tile for the elementwise and channel kernels."""
    tile = _tuned.get("tile", 4096)
    return min(tile, _cap_override) if _cap_override is not None else tile


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small fixed number for CPU tensors in the interpreter)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def warps_for(elements: int) -> int:
    """Warps for a tile of ``elements`` values: about 16 elements per thread, 1 to 16 warps."""
    if _tuned:
        return _tuned.get("warps", max(1, min(16, elements // 512)))
    return max(1, min(16, elements // 512))


def row_config(n: int, dtype: torch.dtype) -> tuple[int, int, bool]:
    """``(BLOCK_M, BLOCK_N, ONE_TILE)`` for rows of ``n`` elements.

    Rows up to :func:`max_block` fit one tile (``ONE_TILE``: read once, kept in registers); shorter rows
    share a program, several to a tile, so that each program moves at least a few KB. Longer rows take
    one program each and are walked in blocks of :func:`max_block` columns.
    """
    cap = max_block(dtype)
    block_n = next_power_of_2(max(n, 1))
    if block_n <= cap:
        block_m = min(max(1, min(cap, 4096) // block_n), 16)
        return _tuned.get("row_block_m", block_m) if _tuned else block_m, block_n, True
    return 1, cap, False


def tuned() -> bool:
    """Whether :func:`tuning` replaces any choice now (launch parameters cached per shape are then stale)."""
    return bool(_tuned)


def set_splits(programs: int, tiles: int, sms: int) -> int:
    """Programs per set of the GroupNorm/InstanceNorm kernels, ``programs`` being the one-per-set count,
    ``tiles`` a set's position tiles and ``sms`` the GPU's: 1 while there are at least as many programs as
    SMs; with fewer (small batches: GroupNorm(32) at batch 1 is 32 programs), enough splits of two or more
    tiles each to give every SM about two programs, so that the idle SMs read the set too."""
    if _tuned and "set_splits" in _tuned:
        return max(1, min(_tuned["set_splits"], tiles))
    if programs >= sms or tiles < 4:
        return 1
    return max(1, min(cdiv(2 * sms, programs), tiles // 2))


def row_backward_programs(num_tiles: int, one_tile: bool, device: torch.device) -> int:
    """Programs of the row backward: a few per SM for rows that fit a tile (each walks every G-th tile);
    one per SM for long rows, whose (G, N) partial buffers are read and written per column block."""
    per_sm = (_tuned.get("row_programs_per_sm", 4) if _tuned else 4) if one_tile else 1
    return max(1, min(num_tiles, num_sms(device) * per_sm))
