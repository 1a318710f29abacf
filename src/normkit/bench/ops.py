"""The benchmarked ops: for each, its inputs, normkit's call, torch eager's, and the plain formula.

Every op is described by one :class:`OpSpec`. All its callables take the same positional tensors,
named by :attr:`OpSpec.args` (``x`` first), and return a tuple of outputs (the fused add ops return
``(y, x + residual)``); constants (eps, groups, momentum) are fixed here so that every provider
computes the same thing:

* :attr:`OpSpec.normkit` builds normkit's call from the function found in :mod:`normkit.functional`
  (the benchmark never names a backend's method: the backend normkit selects runs);
* :attr:`OpSpec.eager` is torch eager, ``torch.nn.functional`` (and its compositions for the fused ops);
* :attr:`OpSpec.formula` is the plain math, written the way a user writes it before reaching for a
  kernel (statistics in float32, the result cast back to the input's dtype): what ``torch.compile``
  is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["EPS", "RMS_EPS", "GROUPS", "MOMENTUM", "OpSpec", "OPS", "OP_ALIASES", "resolve_ops"]

EPS = 1e-5
RMS_EPS = 1e-6
GROUPS = 32
MOMENTUM = 0.1

Outputs = tuple[Tensor, ...]


def _tuple(out: Tensor | tuple[Tensor, ...]) -> Outputs:
    return out if isinstance(out, tuple) else (out,)


def _row_shape(x: Tensor) -> tuple[int]:
    return (x.shape[-1],)


def _acc(t: Tensor) -> Tensor:
    """``t`` in the dtype the formulas compute in: float32, or float64 for float64 input."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _per_channel(t: Tensor) -> Tensor:
    """A per-channel (C,) tensor in the compute dtype, broadcastable over (N, C, H, W)."""
    return _acc(t)[None, :, None, None]


def _layout_like(y: Tensor, x: Tensor) -> Tensor:
    """``y`` in ``x``'s memory layout (channels_last input gives channels_last output, as torch does)."""
    if y.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y


# --------------------------------------------------------------------------------------------------
# The plain formulas (torch.compile's input): float32 statistics (float64 for float64 input), two
# passes, the result in x's dtype
# --------------------------------------------------------------------------------------------------


def layer_norm_formula(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    xf = _acc(x)
    xc = xf - xf.mean(-1, keepdim=True)
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + EPS)
    return (y * _acc(weight) + _acc(bias)).to(x.dtype)


def rms_norm_formula(x: Tensor, weight: Tensor) -> Tensor:
    xf = _acc(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return (y * _acc(weight)).to(x.dtype)


def fused_add_rms_norm_formula(x: Tensor, residual: Tensor, weight: Tensor) -> Outputs:
    h = x + residual
    return rms_norm_formula(h, weight), h


def fused_add_layer_norm_formula(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor) -> Outputs:
    h = x + residual
    return layer_norm_formula(h, weight, bias), h


def batch_norm_train_formula(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor, bias: Tensor
) -> Tensor:
    xf = _acc(x)
    mean = xf.mean((0, 2, 3))
    var = (xf - mean[None, :, None, None]).pow(2).mean((0, 2, 3))
    n = x.numel() // x.shape[1]
    with torch.no_grad():
        running_mean.mul_(1 - MOMENTUM).add_(mean.detach() * MOMENTUM)
        running_var.mul_(1 - MOMENTUM).add_(var.detach() * (MOMENTUM * n / (n - 1)))
    y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + EPS)[None, :, None, None]
    return _layout_like((y * _per_channel(weight) + _per_channel(bias)).to(x.dtype), x)


def batch_norm_eval_formula(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor, bias: Tensor
) -> Tensor:
    y = (_acc(x) - _per_channel(running_mean)) * _per_channel(torch.rsqrt(_acc(running_var) + EPS))
    return _layout_like((y * _per_channel(weight) + _per_channel(bias)).to(x.dtype), x)


def _group_normalized(x: Tensor, groups: int) -> Tensor:
    """float32 ``(x - mean) * rstd`` with statistics per (sample, group), shaped like ``x``."""
    xf = _acc(x).reshape(x.shape[0], groups, -1)
    xc = xf - xf.mean(-1, keepdim=True)
    return (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + EPS)).reshape(x.shape)


def group_norm_formula(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    y = _group_normalized(x, GROUPS) * _per_channel(weight) + _per_channel(bias)
    return _layout_like(y.to(x.dtype), x)


def group_norm_silu_formula(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    y = _group_normalized(x, GROUPS) * _per_channel(weight) + _per_channel(bias)
    return _layout_like(F.silu(y).to(x.dtype), x)


def instance_norm_formula(x: Tensor) -> Tensor:
    xf = _acc(x)
    xc = xf - xf.mean((2, 3), keepdim=True)
    y = xc * torch.rsqrt(xc.pow(2).mean((2, 3), keepdim=True) + EPS)
    return _layout_like(y.to(x.dtype), x)


def instance_norm_affine_formula(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    xf = _acc(x)
    xc = xf - xf.mean((2, 3), keepdim=True)
    y = xc * torch.rsqrt(xc.pow(2).mean((2, 3), keepdim=True) + EPS)
    return _layout_like((y * _per_channel(weight) + _per_channel(bias)).to(x.dtype), x)


# --------------------------------------------------------------------------------------------------
# torch eager
# --------------------------------------------------------------------------------------------------


def _eager_fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor) -> Outputs:
    h = x + residual
    return F.rms_norm(h, _row_shape(h), weight, RMS_EPS), h


def _eager_fused_add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor) -> Outputs:
    h = x + residual
    return F.layer_norm(h, _row_shape(h), weight, bias, EPS), h


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """One benchmarked op.

    ``kind`` is ``"rows"`` (input (rows, features), normalized over the last dim) or ``"spatial"``
    (input (N, C, H, W)). ``running_stats`` is ``"none"``, ``"read"`` (BatchNorm eval) or
    ``"update"`` (BatchNorm train: read and written in place).
    """

    name: str
    label: str
    kind: str
    function: str  # the name in normkit.functional
    args: tuple[str, ...]
    normkit: Callable[[Callable[..., object]], Callable[..., Outputs]]
    eager: Callable[..., Outputs]
    formula: Callable[..., object]
    outputs: int = 1
    running_stats: str = "none"

    @property
    def grad_args(self) -> tuple[str, ...]:
        """The arguments that get gradients in forward+backward (running statistics never do)."""
        return tuple(a for a in self.args if a in ("x", "residual", "weight", "bias"))

    def formula_call(self, *args: Tensor) -> Outputs:
        """The op written as its plain torch formula (what torch.compile is given)."""
        return _tuple(self.formula(*args))


def _wrap(fn: Callable[..., object]) -> Callable[..., Outputs]:
    def call(*args: Tensor) -> Outputs:
        return _tuple(fn(*args))

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


def _spec(name: str, label: str, kind: str, function: str, args: tuple[str, ...],
          normkit: Callable[[Callable[..., object]], Callable[..., object]],
          eager: Callable[..., object], formula: Callable[..., object], **kw: object) -> OpSpec:
    return OpSpec(
        name=name, label=label, kind=kind, function=function, args=args,
        normkit=lambda fn: _wrap(normkit(fn)), eager=_wrap(eager), formula=formula, **kw,  # type: ignore[arg-type]
    )


_SPECS = [
    _spec(
        "layer_norm", "LayerNorm", "rows", "layer_norm", ("x", "weight", "bias"),
        lambda fn: lambda x, w, b: fn(x, _row_shape(x), w, b, EPS),
        lambda x, w, b: F.layer_norm(x, _row_shape(x), w, b, EPS),
        layer_norm_formula,
    ),
    _spec(
        "rms_norm", "RMSNorm", "rows", "rms_norm", ("x", "weight"),
        lambda fn: lambda x, w: fn(x, _row_shape(x), w, RMS_EPS),
        lambda x, w: F.rms_norm(x, _row_shape(x), w, RMS_EPS),
        rms_norm_formula,
    ),
    _spec(
        "fused_add_rms_norm", "add+RMSNorm", "rows", "fused_add_rms_norm", ("x", "residual", "weight"),
        lambda fn: lambda x, r, w: fn(x, r, _row_shape(x), w, RMS_EPS),
        _eager_fused_add_rms_norm,
        fused_add_rms_norm_formula,
        outputs=2,
    ),
    _spec(
        "fused_add_layer_norm", "add+LayerNorm", "rows", "fused_add_layer_norm",
        ("x", "residual", "weight", "bias"),
        lambda fn: lambda x, r, w, b: fn(x, r, _row_shape(x), w, b, EPS),
        _eager_fused_add_layer_norm,
        fused_add_layer_norm_formula,
        outputs=2,
    ),
    _spec(
        "batch_norm_train", "BatchNorm train", "spatial", "batch_norm",
        ("x", "running_mean", "running_var", "weight", "bias"),
        lambda fn: lambda x, rm, rv, w, b: fn(x, rm, rv, w, b, True, MOMENTUM, EPS),
        lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS),
        batch_norm_train_formula,
        running_stats="update",
    ),
    _spec(
        "batch_norm_eval", "BatchNorm eval", "spatial", "batch_norm",
        ("x", "running_mean", "running_var", "weight", "bias"),
        lambda fn: lambda x, rm, rv, w, b: fn(x, rm, rv, w, b, False, MOMENTUM, EPS),
        lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS),
        batch_norm_eval_formula,
        running_stats="read",
    ),
    _spec(
        "group_norm", "GroupNorm(32)", "spatial", "group_norm", ("x", "weight", "bias"),
        lambda fn: lambda x, w, b: fn(x, GROUPS, w, b, EPS),
        lambda x, w, b: F.group_norm(x, GROUPS, w, b, EPS),
        group_norm_formula,
    ),
    _spec(
        "instance_norm", "InstanceNorm", "spatial", "instance_norm", ("x",),
        lambda fn: lambda x: fn(x, eps=EPS),
        lambda x: F.instance_norm(x, eps=EPS),
        instance_norm_formula,
    ),
    _spec(
        "instance_norm_affine", "InstanceNorm affine", "spatial", "instance_norm", ("x", "weight", "bias"),
        lambda fn: lambda x, w, b: fn(x, weight=w, bias=b, eps=EPS),
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=EPS),
        instance_norm_affine_formula,
    ),
    _spec(
        "group_norm_silu", "GroupNorm(32)+SiLU", "spatial", "group_norm_silu", ("x", "weight", "bias"),
        lambda fn: lambda x, w, b: fn(x, GROUPS, w, b, EPS),
        lambda x, w, b: F.silu(F.group_norm(x, GROUPS, w, b, EPS)),
        group_norm_silu_formula,
    ),
]

#: every op, by name, in the order the matrix and the reports list them
OPS: dict[str, OpSpec] = {s.name: s for s in _SPECS}

#: short names accepted by ``--op`` (besides the full names); one alias may name several ops
OP_ALIASES: dict[str, tuple[str, ...]] = {
    "ln": ("layer_norm",),
    "rms": ("rms_norm",),
    "add_rms": ("fused_add_rms_norm",),
    "add_ln": ("fused_add_layer_norm",),
    "fused": ("fused_add_rms_norm", "fused_add_layer_norm", "group_norm_silu"),
    "bn": ("batch_norm_train", "batch_norm_eval"),
    "batch_norm": ("batch_norm_train", "batch_norm_eval"),
    "bn_train": ("batch_norm_train",),
    "bn_eval": ("batch_norm_eval",),
    "gn": ("group_norm",),
    "in": ("instance_norm",),
    "in_affine": ("instance_norm_affine",),
    "gn_silu": ("group_norm_silu",),
}


def resolve_ops(names: list[str] | None) -> list[str]:
    """Op names for ``--op`` values (full names or :data:`OP_ALIASES`), in :data:`OPS` order."""
    if not names:
        return list(OPS)
    chosen: set[str] = set()
    for raw in names:
        key = raw.strip().lower().replace("-", "_").replace("+", "_")
        if key in OPS:
            chosen.add(key)
        elif key in OP_ALIASES:
            chosen.update(OP_ALIASES[key])
        else:
            known = ", ".join([*OPS, *OP_ALIASES])
            raise ValueError(f"unknown op {raw!r}; choose from {known}")
    return [name for name in OPS if name in chosen]
