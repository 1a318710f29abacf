"""The ``triton`` backend: every norm through the custom ops of :mod:`.ops` (Triton kernels underneath).

Forward ops return the output and the float32 statistics (the mean as a pair, a shift and the mean
relative to it, which together hold it to more bits than one float32: see :mod:`.kernels.rows`).
Autograd saves only the input (for the fused adds, the sum ``h``, which the op returns anyway), the
weight (and for GroupNorm+SiLU the bias, to recompute SiLU's input) and the statistics: never the
output, never a float32 copy of a 16-bit input.
Running statistics are updated in place by a small kernel from the batch statistics, with the unbiased
variance and :func:`normkit.reference.batch_norm`'s momentum rule.

Calls the kernels do not take go to the reference backend, unchanged in meaning: empty tensors, tensors
under torch.func transforms, float64 data (the kernels compute in float32) and parameters or running
statistics that are float64 or on another device (torch's ops then raise torch's error).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ... import reference as ref
from ..base import Backend, gated_needs_composition
from . import config, ops

__all__ = ["TritonBackend", "SUPPORTED_DTYPES"]

#: data types the kernels take (statistics and arithmetic are float32 for all three)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _flat(p: Tensor | None) -> Tensor | None:
    """A parameter as the contiguous vector the kernels index: itself when it is one (a reshape would add
    a view node to the autograd graph, which the backward then walks: 25 µs of host time per BatchNorm
    training step, with the two parameters), else a flattened copy or view."""
    if p is None or (p.dim() == 1 and p.is_contiguous()):
        return p
    return p.reshape(-1).contiguous()


class TritonBackend(Backend):
    """normkit's Triton kernels: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before
    the backend loaded (the interpreter runs the same kernels in numpy: slow, for tests)."""

    name = "triton"

    def __init__(self) -> None:
        if not (config.INTERPRET or torch.cuda.is_available()):
            raise ImportError(
                "the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 set before it loads (its kernels "
                "then run on CPU tensors in Triton's interpreter)"
            )
        from ..reference import ReferenceBackend

        self._reference = ReferenceBackend()

    def supports(self, x: Tensor) -> bool:
        return x.dtype in SUPPORTED_DTYPES and (x.is_cuda or (config.INTERPRET and x.is_cpu))

    def _fallback(self, x: Tensor, *others: Tensor | None) -> bool:
        """Hand the call to the reference (see the module docstring)."""
        if x.numel() == 0 or ops.wrapped(x, *others):
            return True
        return any(t is not None and (t.device != x.device or t.dtype == torch.float64) for t in others)

    # row norms

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        if self._fallback(x, weight, bias):
            return self._reference.layer_norm(x, normalized_shape, weight, bias, eps)
        n = math.prod(normalized_shape)
        return ops.rows(x, None, _flat(weight), _flat(bias), n, eps, False)[0]

    def rms_norm(self, x, normalized_shape, weight, eps):
        if self._fallback(x, weight):
            return self._reference.rms_norm(x, normalized_shape, weight, eps)
        n = math.prod(normalized_shape)
        return ops.rows(x, None, _flat(weight), None, n, ref.rms_norm_eps(x.dtype, eps), True)[0]

    def rms_norm_rounded_scale(self, x, normalized_shape, weight, eps):
        # one kernel where the weight has x's dtype; the composition elsewhere and under torch.compile
        if weight.dtype != x.dtype or torch.compiler.is_compiling() or self._fallback(x, weight):
            return super().rms_norm_rounded_scale(x, normalized_shape, weight, eps)
        n = math.prod(normalized_shape)
        return ops.rms_rounded_scale(x, _flat(weight), n, ref.rms_norm_eps(x.dtype, eps))

    def rms_norm_rounded_rstd(self, x, normalized_shape, eps):
        # one kernel for float32 and 16-bit data; float64 and torch.compile take the composition
        if x.dtype == torch.float64 or torch.compiler.is_compiling() or self._fallback(x):
            return super().rms_norm_rounded_rstd(x, normalized_shape, eps)
        return ops.rms_rounded_rstd(x, math.prod(normalized_shape), ref.rms_norm_eps(x.dtype, eps))

    def gated_rms_norm(self, x, gate, normalized_shape, weight, eps, activation, round_first, gate_first=False,
                       group_size=None):
        # inference in one kernel, the gate in float32 (see the base class)
        if gated_needs_composition(x, gate, weight, round_first) or self._fallback(x, gate, weight):
            return super().gated_rms_norm(x, gate, normalized_shape, weight, eps, activation, round_first, gate_first,
                                          group_size)
        return ops.gated_rms(x, gate, weight, ref.rms_norm_eps(torch.float32, eps), activation, round_first,
                             gate_first, group_size or x.shape[-1])

    def fused_add_rms_norm(self, x, residual, normalized_shape, weight, eps):
        if self._fallback(x, residual, weight):
            return self._reference.fused_add_rms_norm(x, residual, normalized_shape, weight, eps)
        n = math.prod(normalized_shape)
        y, h, _, _ = ops.rows(x, residual, _flat(weight), None, n, ref.rms_norm_eps(x.dtype, eps), True)
        return y, h

    def fused_add_layer_norm(self, x, residual, normalized_shape, weight, bias, eps):
        if self._fallback(x, residual, weight, bias):
            return self._reference.fused_add_layer_norm(x, residual, normalized_shape, weight, bias, eps)
        n = math.prod(normalized_shape)
        y, h, _, _ = ops.rows(x, residual, _flat(weight), _flat(bias), n, eps, False)
        return y, h

    # channel norms

    def group_norm(self, x, num_groups, weight, bias, eps):
        if self._fallback(x, weight, bias):
            return self._reference.group_norm(x, num_groups, weight, bias, eps)
        return ops.sets(x, _flat(weight), _flat(bias), num_groups, eps, False, stats=False)[0]

    def group_norm_silu(self, x, num_groups, weight, bias, eps):
        if self._fallback(x, weight, bias):
            return self._reference.group_norm_silu(x, num_groups, weight, bias, eps)
        return ops.sets(x, _flat(weight), _flat(bias), num_groups, eps, True, stats=False)[0]

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        if self._fallback(x, weight, bias, running_mean, running_var):
            return self._reference.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        if not training:
            return ops.batch(x, _flat(weight), _flat(bias), running_mean, running_var, eps, stats=False)[0]
        tracked = running_mean is not None
        y, mean, _, var = ops.batch(x, _flat(weight), _flat(bias), None, None, eps, stats=tracked)
        if running_mean is not None:
            count = x.numel() // x.shape[1]
            ops.update_running_stats(running_mean, running_var, mean.detach(), var.detach(), momentum, count)
        return y

    def instance_norm(self, x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
        if self._fallback(x, weight, bias, running_mean, running_var):
            return self._reference.instance_norm(
                x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
            )
        if not use_input_stats:  # every instance normalized with the running statistics: BatchNorm eval
            return ops.batch(x, _flat(weight), _flat(bias), running_mean, running_var, eps, stats=False)[0]
        y, mean, _, var = ops.sets(x, _flat(weight), _flat(bias), x.shape[1], eps, False,
                                   stats=running_mean is not None)
        if running_mean is not None:
            # the batch averages of the per-instance statistics; the update makes the variance unbiased
            count = x.numel() // (x.shape[0] * x.shape[1])
            ops.update_running_stats(
                running_mean, running_var, mean.detach().sum(0).mean(0), var.detach().mean(0), momentum, count
            )
        return y
