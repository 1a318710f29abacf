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
    "row_config", "row_warps", "set_splits", "tile_elements", "tuned", "tuning", "warps_for",
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

#: elements per tile of the channel kernels, by family, and the least elements a thread holds in one, as
#: timed on an H200 (benchmarks/gpu_tune.py; docs/triton-backend.md has the sweep). GroupNorm: 8192 with
#: 8 warps was 1.07-1.23x the 4096 with 8 it replaced, contiguous and channels-last. BatchNorm: 2048 with
#: 2 warps was 1.21-1.48x at 256x64x56x56 channels-last and 1.35-1.37x at 64x2048x7x7, 0.93-1.00x at
#: 64x64x112x112; large tiles with few warps ran 0.07-0.4x at 7x7 (too few programs, too many registers)
_TILE = {"sets": 8192, "batch": 2048}
_PER_THREAD = {"rows": 16, "rows_multi": 32, "sets": 32, "batch": 32}
#: the fewest elements one split of a GroupNorm set reads (two 4096-element tiles, as first chosen)
_SPLIT_ELEMENTS = 8192


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


def tile_elements(kind: str) -> int:
    """Elements per tile of the ``"sets"`` (GroupNorm, InstanceNorm) or ``"batch"`` (BatchNorm) kernels."""
    tile = _tuned.get("tile", _TILE[kind])
    return min(tile, _cap_override) if _cap_override is not None else tile


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small fixed number for CPU tensors in the interpreter)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def warps_for(elements: int, kind: str = "rows") -> int:
    """Warps for a tile of ``elements`` values of the ``kind`` of kernel (``"rows"`` for one row a program,
    ``"rows_multi"`` for several, ``"sets"``, ``"batch"``): 16 or 32 elements per thread, 1 to 16 warps."""
    warps = max(1, min(16, elements // (32 * _PER_THREAD[kind])))
    return _tuned.get("warps", warps) if _tuned else warps


def row_warps(block_m: int, block_n: int) -> int:
    """Warps of the row kernels: 16 elements per thread for one row a program, 32 when several rows share
    one (LayerNorm 32768x1024 bfloat16 on an H200, 4 rows a program: 4 warps against the 8 of 16 per
    thread were 1.20x forward and 2.34x forward+backward)."""
    return warps_for(block_m * block_n, "rows_multi" if block_m > 1 else "rows")


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


def set_splits(programs: int, tiles: int, sms: int, tile: int) -> int:
    """Programs per set of the GroupNorm/InstanceNorm kernels, ``programs`` being the one-per-set count,
    ``tiles`` a set's position tiles of ``tile`` elements each and ``sms`` the GPU's: 1 while there are at
    least as many programs as SMs; with fewer (small batches: GroupNorm(32) at batch 1 is 32 programs),
    enough splits of at least :data:`_SPLIT_ELEMENTS` elements each (with the tile capped, one tile) to give
    every SM about two programs, so that the idle SMs read the set too."""
    if _tuned and "set_splits" in _tuned:
        return max(1, min(_tuned["set_splits"], tiles))
    least = min(_SPLIT_ELEMENTS, tile_elements("sets"))  # tests cap the tile: then one tile
    most = min(tiles, tiles * tile // least)
    if programs >= sms or most < 2:
        return 1
    return max(1, min(cdiv(2 * sms, programs), most))


def row_backward_programs(num_tiles: int, one_tile: bool, device: torch.device) -> int:
    """Programs of the row backward: a few per SM for rows that fit a tile (each walks every G-th tile);
    one per SM for long rows, whose (G, N) partial buffers are read and written per column block."""
    per_sm = (_tuned.get("row_programs_per_sm", 4) if _tuned else 4) if one_tile else 1
    return max(1, min(num_tiles, num_sms(device) * per_sm))
