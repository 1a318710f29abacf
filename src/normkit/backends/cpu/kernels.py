"""Typed Python entry points to the C kernels: allocate outputs, pick the dtype's symbol, pass pointers.

Inputs must already be in the layout the kernel expects (callers in :mod:`.backend` arrange that);
parameters are passed as contiguous vectors in the arithmetic dtype (float64 for float64 data,
float32 otherwise), or, when all of a call's are contiguous vectors of 16-bit data's own dtype, as they
are (the kernel converts them once; see :func:`_params`).
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from ctypes import c_double, c_int, c_int64, c_void_p

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from .build import load_library

__all__ = [
    "SUPPORTED_DTYPES",
    "arithmetic_dtype",
    "chan_backward",
    "chan_forward",
    "channel_row_backward",
    "channel_row_forward",
    "channels_last_like",
    "is_channels_last",
    "row_backward",
    "row_forward",
    "running_update",
]

_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
SUPPORTED_DTYPES = frozenset(_SUFFIX)

_P, _I64, _D, _I = c_void_p, c_int64, c_double, c_int
#: each kernel's arguments, in order. They are packed into one buffer of 8-byte slots (a pointer or an
#: integer as int64, a floating-point value as double) and passed as one pointer: ctypes converting
#: eighteen separate arguments took 4.4 µs a call, a packed buffer 1 µs (csrc/kernels.c reads the slots).
_SIGNATURES = {
    # (params_t: the parameters are in the data's 16-bit dtype, for the kernel to convert; see _params)
    # x, res, hout, w, b, y, rstd, M, N, eps, rms, rounding, gate, gate_act, gate_first, wgroups, params_t, threads
    "nk_row_fwd": [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _D, _I, _I, _P, _I, _I, _I64, _I, _I],
    # x, dy, dh, w, rstd, dx, dw, db, grads_float, M, N, rms, params_t, threads
    "nk_row_bwd": [_P, _P, _P, _P, _P, _P, _P, _P, _I, _I64, _I64, _I, _I, _I],
    # x, y, N, C, S, in_nhwc, out_nhwc, groups, w, b, fixed_mean, fixed_var, eps, act, mean, rstd, var, params_t,
    # threads
    "nk_chan_fwd": [_P, _P, _I64, _I64, _I64, _I, _I, _I64, _P, _P, _P, _P, _D, _I, _P, _P, _P, _I, _I],
    # x, dy, dx, N, C, S, nhwc, groups, w, b, mean, rstd, train, act, dw, db, grads_float, params_t, threads
    "nk_chan_bwd": [_P, _P, _P, _I64, _I64, _I64, _I, _I64, _P, _P, _P, _P, _I, _I, _P, _P, _I, _I, _I],
    # run_mean, run_var, mean, var, C, momentum, var_factor
    "nk_running_update": [_P, _P, _P, _P, _I64, _D, _D],
    # x, x_nhwc, w, b, y, y_nhwc, rstd, N, C, S, eps, rms, params_t, threads
    "nk_cf_fwd": [_P, _I, _P, _P, _P, _I, _P, _I64, _I64, _I64, _D, _I, _I, _I],
    # x, x_nhwc, dy, dy_nhwc, w, rstd, dx, dx_nhwc, dw, db, grads_float, N, C, S, rms, params_t, threads
    "nk_cf_bwd": [_P, _I, _P, _I, _P, _P, _P, _I, _P, _P, _I, _I64, _I64, _I64, _I, _I, _I],
}

#: activation codes of the channel-norm forward kernel (NK_ACT_* in csrc/kernels.c)
ACTIVATIONS = {None: 0, "silu": 1, "relu": 2, "hardswish": 3}

#: rounding codes of the row forward kernel (NK_ROUND_* in csrc/kernels.c): what a two-step composition
#: rounds to the data type before the last multiply, the normalized value or the scale
ROUNDINGS = {None: 0, "xhat": 1, "rstd": 2}

#: gate activations of the row forward kernel (NK_GATE_* in csrc/kernels.c)
GATES = {"silu": 1, "sigmoid": 2}

_PACKERS = {
    name: struct.Struct("=" + "".join("d" if t is _D else "q" for t in signature)).pack
    for name, signature in _SIGNATURES.items()
}

_lib: ctypes.CDLL | None = None
_functions: dict[tuple[str, torch.dtype], Callable[..., None]] = {}


def _fn(name: str, dtype: torch.dtype) -> Callable[..., None]:
    """The kernel ``name`` for data of ``dtype``, called with its arguments in :data:`_SIGNATURES`' order
    (pointers as ints, 0 for none)."""
    global _lib
    key = (name, dtype)
    call = _functions.get(key)
    if call is None:
        if _lib is None:
            _lib = load_library()
        fn = getattr(_lib, f"{name}_{_SUFFIX[dtype]}")
        fn.argtypes = [ctypes.c_char_p]  # the packed bytes, passed as a pointer to their buffer
        fn.restype = None
        pack = _PACKERS[name]

        def call(*args, fn=fn, pack=pack):
            fn(pack(*args))

        _functions[key] = call
    return call


def ensure_loaded() -> None:
    """Build/load the library now (raises :class:`.build.BuildError` if it cannot be built)."""
    _fn("nk_row_fwd", torch.float32)


#: elements per thread below which a kernel runs on fewer threads: waking a thread costs more than
#: it saves on small tensors (torch's own grain size is of the same order)
GRAIN = 16384


def _threads(numel: int) -> int:
    return max(1, min(torch.get_num_threads(), numel // GRAIN))


def arithmetic_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' arithmetic (and saved-statistics) dtype for data of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_dtype(*param_dtypes: torch.dtype | None) -> torch.dtype:
    """The dtype the backward kernels write parameter gradients in: float32 when every parameter (its dtype;
    None: absent) is float32 (the double sums rounded once, as torch's cast of a float64 result rounds
    them, without a cast op per call), else float64, for the caller to cast."""
    return torch.float32 if all(d is None or d == torch.float32 for d in param_dtypes) else torch.float64


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _param(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A parameter as a contiguous vector of the arithmetic dtype (no copy when it already is one)."""
    if p is None:
        return None
    acc = arithmetic_dtype(dtype)
    if p.dtype == acc and p.dim() == 1 and p.is_contiguous():  # the common case, without a copy
        return p
    return p.detach().reshape(-1).to(acc).contiguous()


_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def _params(dtype: torch.dtype, *params: Tensor | None) -> tuple[list[Tensor | None], int]:
    """A call's parameters as the kernel takes them, and its ``params_t`` flag. When every parameter given
    is a contiguous vector of the arithmetic dtype, or, for 16-bit data, of the data's own dtype (a bfloat16
    model's weights: the kernel converts them, where a torch op per parameter cost more than a small norm's
    kernel), they go as they are, the flag 1 for the 16-bit case; else each as :func:`_param` gives it,
    flag 0. Converted copies must outlive the call: bind the list before the call, not inside its argument
    list."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # arithmetic_dtype, inlined
    as_is = dtype if dtype in _SIXTEEN_BIT else acc
    for p in params:  # one loop and no generator: this runs on every kernel call
        if p is not None and (p.dtype != as_is or p.dim() != 1 or not p.is_contiguous()):
            return [_param(p, dtype) for p in params], 0
    return list(params), int(as_is != acc)


def row_forward(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    n: int,
    eps: float,
    rms: bool,
    save_rstd: bool = True,
    rounding: str | None = None,
    gate: Tensor | None = None,
    gate_act: str = "silu",
    gate_first: bool = False,
    weight_groups: int = 1,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """LayerNorm/RMSNorm over contiguous rows of length ``n`` (after ``h = x + residual``).

    Returns ``(y, h, rstd)`` (h is None without a residual; rstd None unless ``save_rstd``); the
    backward recomputes the row means. ``rounding`` (:data:`ROUNDINGS`): ``"xhat"`` (a weight, no
    bias): the normalized value is rounded to x's dtype before the weight multiplies it,
    ``round(round(x̂) · w)``; ``"rstd"`` (RMSNorm without parameters): the scale is, ``round(x ·
    round(rstd))``. rstd itself is saved unrounded either way. ``gate`` (x's shape and dtype, contiguous;
    no residual, no ``"rstd"`` rounding): ``y = round(v · act(gate))`` with ``act`` the ``gate_act`` of
    :data:`GATES` and v the norm before its last rounding (after it with ``"xhat"``), in float32; with
    ``gate_first``, y is the norm of ``x · act(gate)`` (in float32). ``weight_groups`` (gated only): the
    weight and bias have ``weight_groups · n`` elements, row i taking the ``(i % weight_groups)``-th n of
    them (a norm over groups of n of each longer row, with a weight over the whole row).
    """
    numel = x.numel()
    m = numel // n
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    rstd = torch.empty(m, dtype=arithmetic_dtype(x.dtype)) if save_rstd else None
    (w, b), params_t = _params(x.dtype, weight, bias)
    _fn("nk_row_fwd", x.dtype)(
        x.data_ptr(), _ptr(residual), _ptr(h), _ptr(w), _ptr(b), y.data_ptr(), _ptr(rstd),
        m, n, float(eps), int(rms), ROUNDINGS[rounding], _ptr(gate), GATES[gate_act], int(gate_first), weight_groups,
        params_t, _threads(numel),
    )
    return y, h, rstd


def row_backward(
    dy: Tensor,
    x: Tensor,
    dh: Tensor | None,
    weight: Tensor | None,
    rstd: Tensor,
    n: int,
    rms: bool,
    need_weight: bool,
    need_bias: bool,
    grads: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients ``(dx, dweight, dbias)`` of :func:`row_forward`; the parameter gradients in ``grads``
    (float64, or float32: see :func:`grad_dtype`)."""
    m = x.numel() // n
    dx = torch.empty_like(x)
    dw = torch.empty(n, dtype=grads) if need_weight else None
    db = torch.empty(n, dtype=grads) if need_bias else None
    (w,), params_t = _params(x.dtype, weight)
    _fn("nk_row_bwd", x.dtype)(
        x.data_ptr(), dy.data_ptr(), _ptr(dh), _ptr(w), rstd.data_ptr(), dx.data_ptr(),
        _ptr(dw), _ptr(db), int(grads == torch.float32), m, n, int(rms), params_t, _threads(x.numel()),
    )
    return dx, dw, db


def chan_forward(
    x: Tensor,
    y: Tensor,
    dims: tuple[int, int, int],
    in_nhwc: bool,
    out_nhwc: bool,
    groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    fixed_mean: Tensor | None,
    fixed_var: Tensor | None,
    eps: float,
    silu: bool,
    need_stats: bool = True,
    activation: str | None = None,
    need_rstd: bool | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """BatchNorm (``groups == 0``) or GroupNorm/InstanceNorm (``groups > 0``) of x viewed as (N, C, S),
    written into ``y``; with ``fixed_mean``/``fixed_var`` (per channel: the running statistics, passed as
    they are stored when in the arithmetic dtype) instead of batch statistics. Returns the statistics
    used, ``(mean, rstd, biased var)``: the mean and variance in float64 (for the running statistics; None
    without ``need_stats``), rstd in the arithmetic dtype (for the backward; None without ``need_rstd``,
    which defaults to ``need_stats``).
    ``activation`` (inference only; :data:`ACTIVATIONS`) is applied to the output, as ``silu`` is."""
    n, c, s = dims
    sets = n * groups if groups > 0 else c
    # separate tensors, not views of one: the custom ops return them, and outputs may not alias
    if need_stats:
        mean, var = torch.empty(sets, dtype=torch.float64), torch.empty(sets, dtype=torch.float64)
    else:
        mean = var = None
    if need_rstd is None:
        need_rstd = need_stats
    rstd = torch.empty(sets, dtype=arithmetic_dtype(x.dtype)) if need_rstd else None
    (w, b, fm, fv), params_t = _params(x.dtype, weight, bias, fixed_mean, fixed_var)
    _fn("nk_chan_fwd", x.dtype)(
        x.data_ptr(), y.data_ptr(), n, c, s, int(in_nhwc), int(out_nhwc), groups, _ptr(w), _ptr(b),
        _ptr(fm), _ptr(fv), float(eps), ACTIVATIONS[activation] if activation else int(silu), _ptr(mean), _ptr(rstd),
        _ptr(var), params_t, _threads(x.numel()),
    )
    return mean, rstd, var


def running_update(
    running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor, momentum: float,
    var_factor: float,
) -> None:
    """BatchNorm's running statistics updated in place from the float64 batch ``mean`` and biased ``var``:
    ``run = run * (1 - momentum) + stat * momentum`` in float64, the variance times ``var_factor``
    (count / (count - 1)) first. One kernel call where the buffers are contiguous vectors of the
    arithmetic dtype (the usual case, inference tensors included, which torch's kernel too updates outside
    inference mode), else (and under torch.compile) the same formula in torch ops."""
    ref = running_mean if running_mean is not None else running_var
    if ref is None:
        return
    acc = arithmetic_dtype(ref.dtype)
    if not torch.compiler.is_compiling() and all(
        r is None or (r.dtype == acc and r.dim() == 1 and r.is_contiguous())
        for r in (running_mean, running_var)
    ):
        _fn("nk_running_update", acc)(
            _ptr(running_mean), _ptr(running_var), mean.data_ptr(), var.data_ptr(), mean.numel(), float(momentum),
            float(var_factor),
        )
        # written behind autograd's back: bump the version counters as an in-place torch op would
        increment_version([r for r in (running_mean, running_var) if r is not None])
        return
    with torch.no_grad():
        for running, stat in ((running_mean, mean), (running_var, var * var_factor)):
            if running is not None:
                running.copy_(running.to(torch.float64) * (1.0 - momentum) + stat * momentum)


def chan_backward(
    dy: Tensor,
    x: Tensor,
    dims: tuple[int, int, int],
    nhwc: bool,
    groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    train: bool,
    silu: bool,
    need_weight: bool,
    need_bias: bool,
    grads: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients ``(dx, dweight, dbias)`` of :func:`chan_forward`; ``dy`` has x's layout, ``mean`` (float64)
    and ``rstd`` (the arithmetic dtype) as :func:`chan_forward` returned them (``mean`` may be None with
    statistics of x, which the kernel recomputes); the parameter gradients in ``grads``."""
    n, c, s = dims
    dx = torch.empty_like(x)
    dw = torch.empty(c, dtype=grads) if need_weight else None
    db = torch.empty(c, dtype=grads) if need_bias else None
    (w, b), params_t = _params(x.dtype, weight, bias)
    _fn("nk_chan_bwd", x.dtype)(
        x.data_ptr(), dy.data_ptr(), dx.data_ptr(), n, c, s, int(nhwc), groups, _ptr(w), _ptr(b),
        _ptr(mean), rstd.data_ptr(), int(train), int(silu), _ptr(dw), _ptr(db), int(grads == torch.float32),
        params_t, _threads(x.numel()),
    )
    return dx, dw, db


def channels_last_like(x: Tensor) -> Tensor:
    """An empty tensor of x's shape laid out channels-last: (N, *, C) in memory, channels at dim 1. Made
    with its strides rather than as a view of an (N, *, C) tensor: a custom autograd Function that
    returned a view could not have an in-place op (timm's in-place activations) applied to its output."""
    c, spatial = x.shape[1], x.shape[2:]
    strides, step = [], c
    for size in reversed(spatial):
        strides.append(step)
        step *= size
    return torch.empty_strided(tuple(x.shape), (step, 1, *reversed(strides)), dtype=x.dtype, device=x.device)


def is_channels_last(t: Tensor) -> bool:
    """Whether ``t`` (N, C, *) with more than two dims is laid out channels-last (channels innermost)."""
    return t.dim() > 2 and t.movedim(1, -1).is_contiguous()


def channel_row_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool, save_rstd: bool = True
) -> tuple[Tensor, Tensor | None]:
    """LayerNorm/RMSNorm over dim 1 of an (N, C, *) tensor, contiguous or channels-last, at each
    position: ``(y, rstd)``. y is laid out channels-last, as ``layer_norm(x.movedim(1, -1), (C,))
    .movedim(-1, 1)`` gives it; rstd has shape (N, prod(*)), None unless ``save_rstd`` (the backward
    recomputes the means)."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    y = channels_last_like(x)
    rstd = torch.empty(n, s, dtype=arithmetic_dtype(x.dtype)) if save_rstd else None
    (w, b), params_t = _params(x.dtype, weight, bias)
    _fn("nk_cf_fwd", x.dtype)(
        x.data_ptr(), int(is_channels_last(x)), _ptr(w), _ptr(b), y.data_ptr(), 1, _ptr(rstd), n, c, s,
        float(eps), int(rms), params_t, _threads(x.numel()),
    )
    return y, rstd


def channel_row_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, rms: bool, need_weight: bool, need_bias: bool,
    grads: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients ``(dx, dweight, dbias)`` of :func:`channel_row_forward`; ``dy`` and ``x`` each contiguous
    or channels-last, dx channels-last (parameter gradients in ``grads``)."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    dx = channels_last_like(x)
    dw = torch.empty(c, dtype=grads) if need_weight else None
    db = torch.empty(c, dtype=grads) if need_bias else None
    (w,), params_t = _params(x.dtype, weight)  # a converted copy must outlive the call
    _fn("nk_cf_bwd", x.dtype)(
        x.data_ptr(), int(is_channels_last(x)), dy.data_ptr(), int(is_channels_last(dy)),
        _ptr(w), rstd.data_ptr(), dx.data_ptr(), 1, _ptr(dw), _ptr(db), int(grads == torch.float32), n, c, s,
        int(rms), params_t, _threads(x.numel()),
    )
    return dx, dw, db
