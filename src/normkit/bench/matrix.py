"""The benchmark cells (op × shape × dtype × layout) and their input tensors.

The standard matrix (``normkit bench``):

* row ops (LayerNorm, RMSNorm, add+RMSNorm, add+LayerNorm) at 8192x4096 and 64x768, contiguous;
* spatial ops (BatchNorm train, BatchNorm eval, GroupNorm(32), InstanceNorm without and with affine,
  GroupNorm(32)+SiLU) at 32x256x32x32 (N, C, H, W), contiguous and channels_last;
* each in float32 and bfloat16: 40 cells, each timed forward and forward+backward.

``--quick`` keeps every op, dtype and layout but at small shapes (1024x1024, 64x768 and 8x64x32x32).

Inputs come from a generator seeded with ``seed`` and the cell's id, so a cell's data does not
depend on which other cells run. Parameters have the input's dtype (a model converted with
``.to(dtype)``): weight ``1 + 0.1·N(0, 1)``, bias ``0.1·N(0, 1)``, running mean ``0.1·N(0, 1)``,
running variance ``1 + 0.1·U(0, 1)``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .ops import GROUPS, OPS, OpSpec, resolve_ops

__all__ = [
    "DTYPES", "LAYOUTS", "Cell", "standard_matrix", "make_inputs", "parse_shape", "dtype_name",
]

#: dtype names accepted by the matrix (and ``--dtype``), with their short labels
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
LAYOUTS = ("contiguous", "channels_last")

ROW_SHAPES = ((8192, 4096), (64, 768))
SPATIAL_SHAPES = ((32, 256, 32, 32),)
QUICK_ROW_SHAPES = ((1024, 1024), (64, 768))
QUICK_SPATIAL_SHAPES = ((8, 64, 32, 32),)
STANDARD_DTYPES = ("float32", "bfloat16")


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype's short name as used in cell ids (``fp32``, ``bf16``, ...)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Cell:
    """One benchmarked configuration; timed once per pass (forward, forward+backward)."""

    op: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str = "contiguous"

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def id(self) -> str:
        parts = [self.op, self.shape_str, _SHORT.get(self.dtype, self.dtype)]
        if self.layout != "contiguous":
            parts.append(self.layout)
        return " ".join(parts)

    def __str__(self) -> str:
        return self.id


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8192x4096"`` -> ``(8192, 4096)``; 2-D shapes are for row ops, 4-D for spatial ops."""
    try:
        shape = tuple(int(s) for s in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected sizes joined by 'x', like 8192x4096") from None
    if len(shape) not in (2, 4) or any(s <= 0 for s in shape):
        raise ValueError(f"bad shape {text!r}: expected 2 (rows x features) or 4 (N x C x H x W) positive sizes")
    return shape


def _valid(spec: OpSpec, shape: tuple[int, ...]) -> bool:
    if spec.kind == "rows":
        return len(shape) == 2
    if len(shape) != 4:
        return False
    if spec.name.startswith("group_norm") and shape[1] % GROUPS:
        return False
    if spec.name.startswith("instance_norm") and shape[2] * shape[3] < 2:
        return False
    return True


def standard_matrix(
    *,
    quick: bool = False,
    ops: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    layouts: Sequence[str] | None = None,
    shapes: Sequence[tuple[int, ...]] | None = None,
) -> list[Cell]:
    """The cells of the standard (or quick) matrix, filtered.

    ``ops`` takes names or aliases (:func:`normkit.bench.ops.resolve_ops`); ``dtypes`` replaces the
    dtype axis (float32 and bfloat16); ``layouts`` filters layouts (channels_last applies to spatial
    ops only); ``shapes`` replaces the shapes: 2-D ones go to row ops, 4-D ones to spatial ops (a
    GroupNorm shape needs a channel count divisible by 32; an op with no shape of its kind is left out).
    """
    op_names = resolve_ops(list(ops) if ops else None)
    dtype_list = list(dict.fromkeys(dtypes or STANDARD_DTYPES))
    for d in dtype_list:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    layout_list = list(dict.fromkeys(layouts or LAYOUTS))
    for lay in layout_list:
        if lay not in LAYOUTS:
            raise ValueError(f"unknown layout {lay!r}; choose from {', '.join(LAYOUTS)}")
    if shapes:
        row_shapes = [s for s in shapes if len(s) == 2]
        spatial_shapes = [s for s in shapes if len(s) == 4]
    else:
        row_shapes = list(QUICK_ROW_SHAPES if quick else ROW_SHAPES)
        spatial_shapes = list(QUICK_SPATIAL_SHAPES if quick else SPATIAL_SHAPES)
    cells = []
    for name in op_names:
        spec = OPS[name]
        op_shapes = row_shapes if spec.kind == "rows" else spatial_shapes
        op_layouts = [lay for lay in layout_list if spec.kind == "spatial" or lay == "contiguous"]
        for shape in op_shapes:
            if not _valid(spec, tuple(shape)):
                continue
            for dtype in dtype_list:
                for layout in op_layouts:
                    cells.append(Cell(name, tuple(shape), dtype, layout))
    return cells


def _seed(base: int, cell: Cell) -> int:
    return (base * 1_000_003 + zlib.crc32(cell.id.encode())) % (2**63)


def _normal(shape: Iterable[int], gen: torch.Generator) -> Tensor:
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def make_inputs(cell: Cell, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The cell's input tensors by argument name (see :attr:`OpSpec.args`), from a fixed seed.

    Returns also ``"grad:<i>"`` entries: the fixed random upstream gradient of each output
    (forward+backward computes ``sum(out_i * grad_i)``'s backward), in the input's layout.
    """
    spec = cell.spec
    gen = torch.Generator().manual_seed(_seed(seed, cell))
    dtype = cell.torch_dtype
    memory_format = torch.channels_last if cell.layout == "channels_last" else torch.contiguous_format

    def activation() -> Tensor:
        return _normal(cell.shape, gen).to(device=device, dtype=dtype).contiguous(memory_format=memory_format)

    features = cell.shape[-1] if spec.kind == "rows" else cell.shape[1]
    out: dict[str, Tensor] = {}
    for name in spec.args:
        if name in ("x", "residual"):
            t = activation()
        elif name == "weight":
            t = 1 + 0.1 * _normal((features,), gen)
        elif name in ("bias", "running_mean"):
            t = 0.1 * _normal((features,), gen)
        elif name == "running_var":
            t = 1 + 0.1 * torch.rand((features,), generator=gen)
        else:  # pragma: no cover - a new OpSpec argument
            raise ValueError(f"no input recipe for argument {name!r}")
        out[name] = t.to(device=device, dtype=dtype)
    for i in range(spec.outputs):
        out[f"grad:{i}"] = activation()
    return out
