"""What a backend provides: the five norms after argument checking, with the ATen ops' signatures."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

__all__ = ["ACTIVATIONS", "Backend", "GATE_ACTIVATIONS", "gated_needs_composition", "needs_grad"]

#: the activations :meth:`Backend.batch_norm_act` applies, by name
ACTIVATIONS = {
    "relu": torch.nn.functional.relu,
    "hardswish": torch.nn.functional.hardswish,
    "silu": torch.nn.functional.silu,
}


#: the gate activations of :meth:`Backend.gated_rms_norm`, by name
GATE_ACTIVATIONS = {"silu": torch.nn.functional.silu, "sigmoid": torch.sigmoid}


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether a kernel call must go through autograd: a tensor that requires grad with grad mode on,
    or forward-mode AD active (where the backends' Functions raise that they have no jvp, instead of
    silently dropping the tangent). Otherwise the kernel runs alone (inference)."""
    if forward_ad._current_level >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a loop, not any() over a generator: half the time on every call
        if t is not None and t.requires_grad:
            return True
    return False


def gated_needs_composition(x: Tensor, gate: Tensor, weight: Tensor, round_first: bool) -> bool:
    """Whether :meth:`Backend.gated_rms_norm` must run its composition rather than a one-pass kernel: a
    gradient, torch.compile, float64 (which the originals compute in float32), a weight over other than the
    last dim, or (``round_first``) a weight not in x's dtype."""
    return (
        x.dtype == torch.float64
        or torch.compiler.is_compiling()
        or needs_grad(x, gate, weight)
        or weight.shape != x.shape[-1:]
        or (round_first and weight.dtype != x.dtype)
    )


class Backend:
    """Base class of normkit backends.

    :mod:`normkit.functional` has already checked shapes, dtypes and arguments when it calls these
    methods, and it fixes the output's memory layout afterwards, so a backend only computes. Each
    method must support autograd with respect to ``x``, ``weight`` and ``bias``, return the input's
    dtype, and update running statistics in place (never recording them in the autograd graph).
    """

    #: the registry name
    name: str = "base"

    def supports(self, x: Tensor) -> bool:
        """Whether this backend can run on ``x`` (its device, dtype); otherwise the reference does."""
        return True

    def layer_norm(
        self, x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor:
        """LayerNorm over the trailing ``normalized_shape`` dims (``torch.layer_norm``'s arguments)."""
        raise NotImplementedError

    def rms_norm(
        self, x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float | None
    ) -> Tensor:
        """RMSNorm over the trailing ``normalized_shape`` dims; ``eps=None`` means the dtype's epsilon."""
        raise NotImplementedError

    def group_norm(
        self, x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor:
        """GroupNorm of (N, C, *) with ``num_groups`` groups of channels and per-channel affine."""
        raise NotImplementedError

    def batch_norm(
        self,
        x: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> Tensor:
        """BatchNorm of (N, C, *): batch statistics when ``training`` (updating the running ones in place
        with ``momentum`` and the unbiased variance), the running statistics otherwise."""
        raise NotImplementedError

    def instance_norm(
        self,
        x: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        use_input_stats: bool,
        momentum: float,
        eps: float,
    ) -> Tensor:
        """InstanceNorm of (N, C, *): per-(sample, channel) statistics when ``use_input_stats`` (their
        batch average updating the running ones), the running statistics otherwise."""
        raise NotImplementedError

    # Channels-first row norms. The defaults move the channels last (a view) and run the row norm; the
    # result is laid out channels-last, as torch's layer_norm of that view lays it out.

    def channel_layer_norm(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        """LayerNorm over dim 1 of (N, C, *) at every position."""
        return self.layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, eps).contiguous().movedim(-1, 1)

    def channel_rms_norm(self, x: Tensor, weight: Tensor | None, eps: float | None) -> Tensor:
        """RMSNorm over dim 1 of (N, C, *) at every position; ``eps=None`` means the dtype's epsilon."""
        return self.rms_norm(x.movedim(1, -1), (x.shape[1],), weight, eps).contiguous().movedim(-1, 1)

    # Fused ops. The defaults compose the norms above (one extra pass over memory each); a backend
    # with its own kernels overrides them with one-pass versions that give the same results.

    def fused_add_rms_norm(
        self, x: Tensor, residual: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float | None
    ) -> tuple[Tensor, Tensor]:
        """``h = x + residual`` (rounded to x's dtype), then ``(rms_norm(h), h)``."""
        h = x + residual
        return self.rms_norm(h, normalized_shape, weight, eps), h

    def rms_norm_rounded_scale(
        self, x: Tensor, normalized_shape: Sequence[int], weight: Tensor, eps: float | None
    ) -> Tensor:
        """``weight * rms_norm(x)``, the normalized value rounded to x's dtype before the multiply
        (Hugging Face Llama's order; the product's dtype is torch's promotion of the two)."""
        return weight * self.rms_norm(x, normalized_shape, None, eps)

    def rms_norm_rounded_rstd(self, x: Tensor, normalized_shape: Sequence[int], eps: float) -> Tensor:
        """``x * rsqrt(mean(x.float()²) + eps).to(x.dtype)``: a weightless RMSNorm whose scale is computed
        in float32 and rounded to x's dtype before it multiplies x (DeepSeek-V4's order)."""
        dims = tuple(range(-len(normalized_shape), 0))
        return x * torch.rsqrt(x.float().square().mean(dims, keepdim=True) + eps).to(x.dtype)

    def gated_rms_norm(
        self,
        x: Tensor,
        gate: Tensor,
        normalized_shape: Sequence[int],
        weight: Tensor,
        eps: float | None,
        activation: str,
        round_first: bool,
        gate_first: bool = False,
        group_size: int | None = None,
    ) -> Tensor:
        """The gated RMSNorm of linear-attention layers, ``act`` ``"silu"`` or ``"sigmoid"``, rounded to x's dtype
        at the end: ``norm · act(gate.float())``, or with ``gate_first`` the norm of ``x.float() ·
        act(gate.float())``. ``norm`` is RMSNorm in float32 over the last dim, or over each ``group_size``
        elements of it, times the weight (over the whole last dim): in float32 (GLM-5-Next's and Falcon-H1's
        order), or with ``round_first`` after the norm is rounded to x's dtype, in the weight's dtype
        (Llama's, Qwen3-Next's and Mamba-2's; a weight in x's dtype)."""
        act = GATE_ACTIVATIONS[activation]
        n = normalized_shape[-1]
        size = group_size or n
        h = x.float() * act(gate.float()) if gate_first else x.float()
        y = self.rms_norm(h.unflatten(-1, (n // size, size)), (size,), None, eps).flatten(-2)
        y = weight * y.to(x.dtype) if round_first else y * weight.float()
        if not gate_first:
            y = y.float() * act(gate.float())
        return y.to(x.dtype)

    def fused_add_layer_norm(
        self,
        x: Tensor,
        residual: Tensor,
        normalized_shape: Sequence[int],
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        """``h = x + residual`` (rounded to x's dtype), then ``(layer_norm(h), h)``."""
        h = x + residual
        return self.layer_norm(h, normalized_shape, weight, bias, eps), h

    def group_norm_silu(
        self, x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor:
        """``silu(group_norm(x))``."""
        return torch.nn.functional.silu(self.group_norm(x, num_groups, weight, bias, eps))

    def batch_norm_act(
        self,
        x: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        activation: str,
    ) -> Tensor:
        """``activation(batch_norm(...))``, ``activation`` a key of :data:`ACTIVATIONS`."""
        y = self.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return ACTIVATIONS[activation](y)

    def __repr__(self) -> str:
        return f"<normkit backend {self.name!r}>"
