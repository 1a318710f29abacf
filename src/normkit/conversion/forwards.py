"""Forwards for third-party norm classes, computed by :mod:`normkit.functional`.

Each class below is a mixin placed in front of a Hugging Face or timm norm class (see
:mod:`normkit.conversion.handlers`): the module keeps its class's attributes, parameters and buffers,
and only ``forward`` changes. Each forward reproduces its original's dtype handling exactly (where
it upcasts, where it rounds back to the input's dtype, before or after the weight), so a converted
model gives the same outputs up to floating-point rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from ..backends.base import GATE_ACTIVATIONS
from ..nn.batchnorm import _BatchNormMixin

__all__ = [
    "LlamaStyleRMSNorm",
    "Llama4StyleRMSNorm",
    "WeightThenCastRMSNorm",
    "HeliumStyleRMSNorm",
    "Float32ScaleRMSNorm",
    "GemmaStyleRMSNorm",
    "GroupedGemmaStyleRMSNorm",
    "OffsetInWeightDtypeRMSNorm",
    "ScaleFirstRMSNorm",
    "GroupedGatedRMSNorm",
    "Gemma3nStyleRMSNorm",
    "UnweightedRMSNorm",
    "OlmoStyleLayerNorm",
    "CohereStyleLayerNorm",
    "T5StyleLayerNorm",
    "ChannelsFirstOrLastLayerNorm",
    "DebertaStyleLayerNorm",
    "ChannelsFirstLayerNorm",
    "EsmcStyleLayerNorm",
    "InputDtypeRMSNorm",
    "FrozenBatchNorm2d",
    "DetrFrozenBatchNorm2d",
    "TimmFrozenBatchNormAct2d",
    "TimmLayerNorm",
    "TimmLayerNorm2d",
    "TimmGroupNorm",
    "TimmRmsNorm",
    "TimmRmsNorm2d",
    "TimmRmsNormAct",
    "TimmRmsNormAct2d",
    "TimmRmsNormFp32",
    "TimmRmsNorm2dFp32",
    "TimmLayerNormFp32",
    "TimmLayerNorm2dFp32",
    "TimmBatchNormAct2d",
    "TimmGroupNormAct",
    "TimmLayerNormAct",
    "TimmLayerNormAct2d",
]


def _laid_out_as(y: Tensor, x: Tensor) -> Tensor:
    """``y`` contiguous where ``x`` is: a norm that computes over dim 1 of x as it is laid out (ViTDet's,
    timm's RmsNorm2d, unlike timm's LayerNorm2d, which permutes) gives channels-first output for
    channels-first input, where channel_layer_norm's and channel_rms_norm's is channels-last."""
    return y.contiguous() if x.is_contiguous() else y


def _float32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def _fp32_input(x: Tensor, layer_norm: bool) -> Tensor:
    """What a timm ``*Fp32`` norm's ``x.float()`` becomes: float16/bfloat16 input as it is, where normkit
    takes it with float32 parameters (computed in float32, rounded once, as the original's cast back
    does), which ``layer_norm`` ops on a GPU do not; float32 as it is; anything else as float32."""
    if x.dtype == torch.float32 or (x.dtype in (torch.float16, torch.bfloat16) and (x.is_cpu or not layer_norm)):
        return x
    return x.float()


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------------------


class LlamaStyleRMSNorm:
    """Llama, Mistral, Qwen2, Qwen3: statistics in float32, the normalized value rounded to the input's
    dtype, *then* multiplied by the weight (``weight * normalize(x.float()).to(x.dtype)``)."""

    @property
    def _eps(self) -> float:
        return self.variance_epsilon

    def forward(self, hidden_states: Tensor) -> Tensor:
        x, eps = hidden_states, self._eps
        if self.weight.shape == x.shape[-1:] and x.dtype != torch.float64:
            if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
                # the kernel given the weight computes round(round(x * rstd) * w), as the two steps do:
                # one pass over memory instead of two, the same bits
                return F.rms_norm(x, (x.shape[-1],), self.weight, eps)
            # 16-bit input: normkit computes in float32 (as the original does), rounds the normalized
            # value to x's dtype, then multiplies by the weight
            return F._rms_norm_rounded_scale(x, (x.shape[-1],), self.weight, eps)
        # float64 input (the original computes it in float32), or a weight that broadcasts otherwise
        # (some models' per-head norms): normkit's norm, the original's casts and multiply
        work = x.float() if x.dtype == torch.float64 else x
        return self.weight * F.rms_norm(work, (x.shape[-1],), None, eps).to(x.dtype)


class GateAfterRMSNorm(LlamaStyleRMSNorm):
    """Qwen3-Next's gated RMSNorm and its copies (Qwen3.5, OLMo-Hybrid, ...): Llama's RMSNorm (the
    normalized value rounded to the input's dtype, then times the weight), times ``silu(gate)`` in
    float32, rounded to the input's dtype once more (one pass in inference: ``F._gated_rms_norm``). Another
    activation than SiLU runs the original."""

    def forward(self, hidden_states: Tensor, gate: Tensor) -> Tensor:
        if self.activation != "silu":
            return super(LlamaStyleRMSNorm, self).forward(hidden_states, gate)
        x, w = hidden_states, self.weight
        if _gateable(x, gate) and w.shape == x.shape[-1:] and w.dtype == x.dtype:
            # Llama's RMSNorm and the gate's product in one pass in inference (the same casts)
            return F._gated_rms_norm(x, gate, (x.shape[-1],), w, self.variance_epsilon, "silu", round_first=True)
        y = LlamaStyleRMSNorm.forward(self, hidden_states)
        return (y * torch.nn.functional.silu(gate.to(torch.float32))).to(hidden_states.dtype)


class GateFirstRMSNorm:
    """Mamba-2's gated RMSNorm and its copies (Bamba, Zamba2, NemotronH, GraniteMoeHybrid): ``x *
    silu(gate)`` in float32 (x alone without a gate), normalized over groups of ``group_size`` of the
    last dim, rounded to the input's dtype, then times the weight (one pass in inference, for a weight in
    the input's dtype: ``F._gated_rms_norm``)."""

    def forward(self, hidden_states: Tensor, gate: Tensor | None = None) -> Tensor:
        # transformers before groups (5.17's class has no group_size) normalizes over the whole row
        x, w, size = hidden_states, self.weight, getattr(self, "group_size", hidden_states.shape[-1])
        if _gateable(x, gate) and w.shape == x.shape[-1:] and w.dtype == x.dtype and x.shape[-1] % size == 0:
            # one pass in inference: x · silu(gate), its norm over groups, rounded, times the weight
            return F._gated_rms_norm(x, gate, (x.shape[-1],), w, self.variance_epsilon, "silu", round_first=True,
                                     gate_first=True, group_size=size)
        h = hidden_states.to(torch.float32)
        if gate is not None:
            h = h * torch.nn.functional.silu(gate.to(torch.float32))
        *prefix, last = h.shape
        y = F.rms_norm(h.view(*prefix, last // size, size), (size,), None, self.variance_epsilon)
        del h  # in inference its memory is free for the product below, as the original's is
        return self.weight * y.view(*prefix, last).to(hidden_states.dtype)


#: the gate activations (transformers' ACT2FN names) the float32 gated norms are converted with, by their
#: names in normkit.functional._gated_rms_norm
_GATE_ACTIVATIONS = {"sigmoid": "sigmoid", "silu": "silu", "swish": "silu"}


def _gateable(x: Tensor, gate: Tensor | None) -> bool:
    """Whether a gated norm's input and gate are what ``F._gated_rms_norm`` takes: the same shape and
    dtype, not float64 (which the originals compute in float32)."""
    return gate is not None and gate.shape == x.shape and gate.dtype == x.dtype and x.dtype != torch.float64


class Float32GatedRMSNorm:
    """GLM-5-Next's gated RMSNorm and its copies (Kimi-Linear, Bailing-Hybrid, Lara-Mini): RMSNorm in
    float32 times the weight in float32, times the module's activation (sigmoid or SiLU) of the gate in
    float32, then one rounding to the input's dtype (one pass in inference: ``F._gated_rms_norm``). Another
    activation runs the original."""

    def forward(self, hidden_states: Tensor, gate: Tensor | None = None) -> Tensor:
        act = _GATE_ACTIVATIONS.get(self.activation)
        if act is None or gate is None:  # the original's own error for a missing gate
            return super().forward(hidden_states, gate)
        x, n = hidden_states, hidden_states.shape[-1]
        if _gateable(x, gate) and self.weight.shape == (n,):
            return F._gated_rms_norm(x, gate, (n,), self.weight, self.variance_epsilon, act)
        y = F.rms_norm(x.to(torch.float32), (n,), self.weight.to(torch.float32), self.variance_epsilon)
        return (y * GATE_ACTIVATIONS[act](gate.to(torch.float32))).to(x.dtype)


class GroupedGatedRMSNorm:
    """Falcon-H1's gated RMSNorm: all in float32, rounded to the input's dtype once at the end. ``x *
    silu(gate)`` first unless ``norm_before_gate``, normalized over ``n_groups`` groups of the last dim,
    times the weight (promoted to float32), then times ``silu(gate)`` if ``norm_before_gate`` (one pass in
    inference: ``F._gated_rms_norm``). Input of other than 2 or 3 dims runs the original (which refuses
    it)."""

    def forward(self, hidden_states: Tensor, gate: Tensor | None = None) -> Tensor:
        if hidden_states.dim() not in (2, 3):
            return super().forward(hidden_states, gate)
        gated = gate is not None
        last = hidden_states.shape[-1]
        if (_gateable(hidden_states, gate) and self.weight.shape == (last,) and last % self.n_groups == 0):
            # the gate, the norm over groups and the weight's product in float32, one rounding: one pass
            return F._gated_rms_norm(hidden_states, gate, (last,), self.weight, self.variance_epsilon, "silu",
                                     gate_first=not self.norm_before_gate, group_size=last // self.n_groups)
        h = hidden_states
        if gated and not self.norm_before_gate:
            h = h * torch.nn.functional.silu(gate.to(torch.float32))
        h = h.to(torch.float32)
        groups, last = self.n_groups, h.shape[-1]
        if groups == 1:  # the weight's product in the kernel, in float32 as the original's promotion does it
            y = F.rms_norm(h, (last,), self.weight.to(torch.float32), self.variance_epsilon)
        else:
            size = last // groups
            y = F.rms_norm(h.view(*h.shape[:-1], groups, size), (size,), None, self.variance_epsilon)
            y = (self.weight.view(groups, size) * y).view(h.shape)
        del h  # free for the products below, as the original's memory is
        if gated and self.norm_before_gate:
            y = y * torch.nn.functional.silu(gate.to(torch.float32))
        return y.to(hidden_states.dtype)


class Llama4StyleRMSNorm(LlamaStyleRMSNorm):
    """Llama 4's text RMSNorm: Llama's computation, its epsilon called ``eps``."""

    @property
    def _eps(self) -> float:
        return self.eps


class WeightThenCastRMSNorm:
    """Olmo2, Olmo3, GPT-OSS and their copies: float32 statistics, times the weight (promoted with
    float32), *then* one rounding to the input's dtype (``(w * normalize(x.float())).to(x.dtype)``)."""

    #: Helium's copy casts the weight to float32 first (a float64 weight then computes in float32)
    _weight_to_float32 = False

    def forward(self, hidden_states: Tensor) -> Tensor:
        x, w = hidden_states, self.weight
        if w.shape == x.shape[-1:] and w.dtype == x.dtype and x.dtype != torch.float64:
            # the kernel multiplies by the weight in float32 and rounds once, as the original does
            return F.rms_norm(x, (x.shape[-1],), w, self.variance_epsilon)
        if self._weight_to_float32:
            w = w.float()
        normalized = F.rms_norm(x.float(), (x.shape[-1],), None, self.variance_epsilon)
        return (w * normalized).to(x.dtype)


class HeliumStyleRMSNorm(WeightThenCastRMSNorm):
    """Helium, Nemotron-H and their copies: as :class:`WeightThenCastRMSNorm`, the weight cast to
    float32 before it multiplies (``(w.float() * normalize(x.float())).to(x.dtype)``)."""

    _weight_to_float32 = True


class Float32ScaleRMSNorm:
    """Moshi and its copies: float32 statistics, times the weight in float32, then one rounding to the
    input's dtype (``(normalize(x.float()) * w.float()).type_as(x)``). The subclasses below differ
    only in the scale."""

    def _scale(self) -> Tensor | None:
        return self.weight.float()

    def forward(self, x: Tensor) -> Tensor:
        scale = self._scale()
        if scale is not None and scale.shape != x.shape[-1:]:  # a weight that broadcasts otherwise
            return (F.rms_norm(x.float(), (x.shape[-1],), None, self.eps) * scale).type_as(x)
        y = F.rms_norm(x.float() if x.dtype == torch.float64 else x, (x.shape[-1],), scale, self.eps)
        return y.type_as(x)


class GemmaStyleRMSNorm(Float32ScaleRMSNorm):
    """Gemma, Gemma2, Gemma3 and their copies: the weight is stored as an offset from 1 and applied in
    float32 before the single rounding to the input's dtype (``(normalize(x.float()) * (1 +
    w.float())).type_as(x)``)."""

    def _scale(self) -> Tensor:
        return 1.0 + self.weight.float()


class Gemma3nStyleRMSNorm(Float32ScaleRMSNorm):
    """Gemma3n, Gemma4 and their copies: the weight is the scale, and optional (``with_scale``)."""

    def _scale(self) -> Tensor | None:
        return self.weight.float() if self.with_scale else None


class GroupedGemmaStyleRMSNorm(GemmaStyleRMSNorm):
    """Qwen4-Exp's text RMSNorm: Gemma's, normalized over groups of ``group_size`` of the last dim when the
    module has one (the weight, ``1 + w`` in float32, spans the whole last dim)."""

    def forward(self, x: Tensor) -> Tensor:
        size = self.group_size
        if size is None:
            return super().forward(x)
        *prefix, last = x.shape
        # float32 out of the norm (a 16-bit input's float32 copy in, as the original's x.float() is)
        y = F.rms_norm(x.float().reshape(*prefix, last // size, size), (size,), None, self.eps)
        return (y.view(*prefix, last) * self._scale()).type_as(x)


class OffsetInWeightDtypeRMSNorm(Float32ScaleRMSNorm):
    """MuseSpark's centered RMSNorm: Gemma's, but ``1 + w`` is added in the weight's dtype and then cast
    to float32 (``(normalize(x.float()) * (1 + w).float()).type_as(x)``); it differs from Gemma's for a
    16-bit weight."""

    def _scale(self) -> Tensor:
        return (1.0 + self.weight).float()


class ScaleFirstRMSNorm:
    """MuseSpark's input-scaled RMSNorm: the input times ``(1 + w)`` in float32, rounded to the input's
    dtype, *then* normalized without a weight in float32 and rounded again."""

    def forward(self, x: Tensor) -> Tensor:
        scaled = (x.float() * (1.0 + self.weight).float()).type_as(x)
        work = scaled.float() if scaled.dtype == torch.float64 else scaled  # float32, as the original's
        return F.rms_norm(work, (x.shape[-1],), None, self.eps).type_as(x)


class UnweightedRMSNorm(Float32ScaleRMSNorm):
    """NanoChat, Falcon-Mamba's weightless norm, Llama 4's L2 norm, Inkling2's and their copies: no
    weight, ``normalize(x.float()).type_as(x)``."""

    def _scale(self) -> None:
        return None


class UnweightedRoundedScaleRMSNorm:
    """DeepSeek-V4's weightless norm and its copies (GLM-5-Next's): the scale
    ``rsqrt(mean(x.float()²) + eps)`` is computed in float32 and rounded to x's dtype *before* it
    multiplies x (``x * scale.to(x.dtype)``), which in 16-bit differs from rounding the product once."""

    def forward(self, x: Tensor) -> Tensor:
        return F._rms_norm_rounded_rstd(x, (x.shape[-1],), self.eps)


class OlmoStyleLayerNorm:
    """OLMo (the first): LayerNorm without weight or bias in float32, eps 1e-5 (fixed in its code), then
    rounded to the input's dtype."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        x = hidden_states
        return F.layer_norm(x.float() if x.dtype == torch.float64 else x, self.normalized_shape, None, None,
                            1e-5).to(x.dtype)


class CohereStyleLayerNorm:
    """Cohere, Cohere2: LayerNorm without a bias, in float32, times the weight in float32, then one
    rounding to the input's dtype. The weight may be (heads, head_dim) (their per-head q/k norms):
    then the norm is normkit's and the multiply the original's."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        x, scale = hidden_states, self.weight.float()
        # a 16-bit input with the float32 scale is a mixed-dtype LayerNorm, which torch's (and so normkit's)
        # CUDA LayerNorm refuses: there too, the float32 norm and the original's multiply
        if scale.shape != x.shape[-1:] or (not x.is_cpu and x.dtype != torch.float32):
            normalized = F.layer_norm(x.float(), (x.shape[-1],), None, None, self.variance_epsilon)
            return (scale * normalized).to(x.dtype)
        y = F.layer_norm(x.float() if x.dtype == torch.float64 else x, (x.shape[-1],), scale, None,
                         self.variance_epsilon)
        return y.to(x.dtype)


class DebertaStyleLayerNorm:
    """DeBERTa: LayerNorm in float32, rounded to the input's dtype, *then* times the weight plus the bias
    (``w * normalize(x.float()).to(x.dtype) + b``)."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        x, w, b, eps = hidden_states, self.weight, self.bias, self.variance_epsilon
        if x.dtype == w.dtype == b.dtype == torch.float32 and w.shape == b.shape == x.shape[-1:]:
            return F.layer_norm(x, (x.shape[-1],), w, b, eps)  # the affine inside the kernel
        work = x.float() if x.dtype == torch.float64 else x  # 16-bit: computed in float32, rounded once
        return w * F.layer_norm(work, (x.shape[-1],), None, None, eps).to(x.dtype) + b


class ChannelsFirstLayerNorm:
    """ViTDet: LayerNorm over dim 1 of (N, C, H, W), the affine per channel, computed in the input's dtype
    by the original (normkit: in float32 for 16-bit input), its output laid out as the input."""

    def forward(self, x: Tensor) -> Tensor:
        return _laid_out_as(F.channel_layer_norm(x, self.weight, self.bias, self.eps), x)


class EsmcStyleLayerNorm:
    """ESM C: torch's LayerNorm, then cast to the input's dtype."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        x = hidden_states
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class InputDtypeRMSNorm:
    """ImageGPT: RMSNorm computed in the input's dtype by the original, ``x / sqrt(mean(x²) + eps) * w``
    (normkit: in float32 for 16-bit input)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.shape != x.shape[-1:]:
            return F.rms_norm(x, (x.shape[-1],), None, self.eps) * self.weight
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class T5StyleLayerNorm:
    """T5: RMSNorm with float32 statistics; the result stays float32 unless the weight is float16 or
    bfloat16, in which case it is rounded to the weight's dtype; then multiplied by the weight."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        x = hidden_states
        half_weight = self.weight.dtype in (torch.float16, torch.bfloat16)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # as in LlamaStyleRMSNorm
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)
        if half_weight and x.dtype == self.weight.dtype:
            # the float32 result rounded to the weight's dtype, then times the weight: Llama's order
            return F._rms_norm_rounded_scale(x, (x.shape[-1],), self.weight, self.variance_epsilon)
        # promotes to float32 (float64 stays float64), as x * rsqrt(float32 variance) does
        work = x.float() if x.dtype != torch.float64 else x
        normalized = F.rms_norm(work, (x.shape[-1],), None, self.variance_epsilon)
        if half_weight:
            normalized = normalized.to(self.weight.dtype)
        return self.weight * normalized


class ChannelsFirstOrLastLayerNorm:
    """ConvNext, SAM and their copies (subclasses of nn.LayerNorm): LayerNorm over the channels, which
    are dim 1 (``data_format="channels_first"``, computed without the original's permuted copy, the
    output laid out channels-last as the original's is) or the last dim."""

    def forward(self, features: Tensor) -> Tensor:
        if self.data_format == "channels_first":
            return F.channel_layer_norm(features, self.weight, self.bias, self.eps)
        return F.layer_norm(features, self.normalized_shape, self.weight, self.bias, self.eps)


class FrozenBatchNorm2d:
    """torchvision's FrozenBatchNorm2d: BatchNorm in inference, its statistics and affine held in buffers.
    The original folds them into ``x * scale + shift`` per channel, which normkit's inference BatchNorm
    computes in one pass (the constants in float64, so equal up to float32 rounding)."""

    @property
    def _eps(self) -> float:
        return self.eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:  # the original's (1, C, 1, 1) reshapes broadcast any other shape their own way
            return super().forward(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self._eps)


class DetrFrozenBatchNorm2d(FrozenBatchNorm2d):
    """DETR's copy of torchvision's (and its copies': RT-DETR, Grounding DINO, Table Transformer, ...),
    its epsilon 1e-5 fixed in the code."""

    _eps = 1e-5


# --------------------------------------------------------------------------------------------------
# timm (its "fast norm" path, an apex/autocast option, is replaced too: normkit computes in float32)
# --------------------------------------------------------------------------------------------------


class TimmLayerNorm:
    """timm.layers.LayerNorm: LayerNorm over the trailing ``normalized_shape``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class TimmLayerNorm2d:
    """timm.layers.LayerNorm2d: LayerNorm over the channels of (N, C, H, W), per position (and SqueezeBERT's
    over the channels of (N, C, W), which permutes around ``nn.LayerNorm`` the same way)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.channel_layer_norm(x, self.weight, self.bias, self.eps)


class OffsetWeightLayerNorm:
    """VideoPrism's LayerNorm (a subclass of ``nn.LayerNorm``): the weight is stored as an offset from 1,
    ``layer_norm(x, weight + 1, bias)``, the sum in the weight's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


class TimmGroupNorm:
    """timm.layers.GroupNorm and GroupNorm1 (one group: LayerNorm over (C, H, W) with per-channel affine)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class TimmRmsNorm:
    """timm.layers.RmsNorm: RMSNorm over the trailing ``normalized_shape`` (normkit computes float16/
    bfloat16 input in float32, where timm's eager path stays in the input's dtype)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class TimmRmsNorm2d:
    """timm.layers.RmsNorm2d: RMSNorm over the channels of (N, C, H, W), per position."""

    def forward(self, x: Tensor) -> Tensor:
        return _laid_out_as(F.channel_rms_norm(x, self.weight, self.eps), x)


class _TimmNormVariant:
    """timm's ``RmsNormAct`` and the ``*Fp32`` norms: LayerNorm or RMSNorm (``_rms``) over the trailing dims
    or, ``_two_d``, the channels of (N, C, H, W); the Fp32 ones in float32 (parameters cast to float32, the
    output back to the input's dtype); then ``drop`` and ``act`` where the module has them (the Act classes).
    The mixins below set the flags."""

    _rms, _two_d, _fp32 = False, False, False

    def _norm(self, x: Tensor) -> Tensor:
        w, b = self.weight, getattr(self, "bias", None)
        if self._fp32:  # mixed dtypes: LayerNorm and the channel norms only on the CPU (torch's rule)
            w, b, x_in = _float32(w), _float32(b), _fp32_input(x, layer_norm=not self._rms or self._two_d)
        else:
            x_in = x
        if self._rms:
            y = (F.channel_rms_norm(x_in, w, self.eps) if self._two_d
                 else F.rms_norm(x_in, self.normalized_shape, w, self.eps))
        else:
            y = (F.channel_layer_norm(x_in, w, b, self.eps) if self._two_d
                 else F.layer_norm(x_in, self.normalized_shape, w, b, self.eps))
        y = y.to(x.dtype) if self._fp32 else y
        return _laid_out_as(y, x) if self._rms and self._two_d else y

    def forward(self, x: Tensor) -> Tensor:
        y = self._norm(x)
        return self.act(self.drop(y)) if hasattr(self, "act") else y


class TimmRmsNormAct(_TimmNormVariant):
    """timm's RmsNormAct."""

    _rms = True


class TimmRmsNormAct2d(_TimmNormVariant):
    """timm's RmsNormAct2d."""

    _rms, _two_d = True, True


class TimmRmsNormFp32(_TimmNormVariant):
    """timm's RmsNormFp32 and RmsNormActFp32."""

    _rms, _fp32 = True, True


class TimmRmsNorm2dFp32(_TimmNormVariant):
    """timm's RmsNorm2dFp32 and RmsNormAct2dFp32."""

    _rms, _two_d, _fp32 = True, True, True


class TimmLayerNormFp32(_TimmNormVariant):
    """timm's LayerNormFp32 and LayerNormActFp32."""

    _fp32 = True


class TimmLayerNorm2dFp32(_TimmNormVariant):
    """timm's LayerNorm2dFp32 and LayerNormAct2dFp32."""

    _two_d, _fp32 = True, True


class _ActMixin:
    """The ``drop`` then ``act`` that timm's *Act norms apply after the norm; GroupNorm followed by a
    plain SiLU (and no dropout) runs as normkit's fused GroupNorm+SiLU when conversion asked for it."""

    _normkit_fused: bool = False

    def _post(self, y: Tensor) -> Tensor:
        return self.act(self.drop(y))

    def _silu_fusable(self) -> bool:
        return (
            self._normkit_fused
            and type(self.act) is torch.nn.SiLU
            and type(self.drop) is torch.nn.Identity
        )


class TimmBatchNormAct2d(_ActMixin):
    """timm.layers.BatchNormAct2d: BatchNorm2d (torch's bookkeeping of momentum and buffers), then
    drop and act. A ReLU runs as :func:`normkit.functional.batch_norm_act` (one pass in inference,
    identical results: ReLU commutes with rounding); Hardswish and SiLU do too when conversion asked
    for fused modules (they then round once instead of twice)."""

    def _fused_activation(self) -> str | None:
        if type(self.drop) is not torch.nn.Identity:
            return None
        act = type(self.act)
        if act is torch.nn.ReLU:
            return "relu"
        if self._normkit_fused and act in (torch.nn.Hardswish, torch.nn.SiLU):
            return "hardswish" if act is torch.nn.Hardswish else "silu"
        return None

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise AssertionError(f"expected 4D input (got {x.ndim}D input)")
        running_mean, running_var, use_batch_stats, factor = _BatchNormMixin._step(self)
        activation = self._fused_activation()
        if activation is not None:
            return F.batch_norm_act(x, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor,
                                    self.eps, activation)
        y = F.batch_norm(x, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor, self.eps)
        return self._post(y)


class TimmFrozenBatchNormAct2d(FrozenBatchNorm2d, _ActMixin):
    """timm.layers.FrozenBatchNormAct2d: torchvision's FrozenBatchNorm2d, then drop and act."""

    def forward(self, x: Tensor) -> Tensor:
        return self._post(FrozenBatchNorm2d.forward(self, x)) if x.dim() == 4 else super().forward(x)


class TimmGroupNormAct(_ActMixin):
    """timm.layers.GroupNormAct and GroupNorm1Act: GroupNorm, then drop and act (fused with SiLU)."""

    def forward(self, x: Tensor) -> Tensor:
        if self._silu_fusable():
            return F.group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)
        return self._post(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class TimmLayerNormAct(_ActMixin):
    """timm.layers.LayerNormAct: LayerNorm, then drop and act."""

    def forward(self, x: Tensor) -> Tensor:
        return self._post(F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps))


class TimmLayerNormAct2d(_ActMixin):
    """timm.layers.LayerNormAct2d: LayerNorm over the channels of (N, C, H, W), then drop and act."""

    def forward(self, x: Tensor) -> Tensor:
        return self._post(F.channel_layer_norm(x, self.weight, self.bias, self.eps))
