"""Which module classes :func:`normkit.convert` knows, and what each becomes.

A handler matches one class *exactly* (by its import path: a subclass may override ``forward``, so it
is never converted by its parent's handler), or a transformers class whose code is a copy of a handled
one's (:mod:`normkit.conversion.families`), and gives the class the module is switched to:

* a torch.nn norm becomes normkit's class of the same name (a subclass of it, with no state of its own);
* a Hugging Face or timm norm becomes a class made on the fly from a forward mixin
  (:mod:`normkit.conversion.forwards`) in front of the original class, so ``isinstance`` checks against
  the original still hold and every attribute, parameter and buffer is the module's own.

Classes made on the fly live in :mod:`normkit.conversion` under a name that encodes the original's import
path, so a converted model can be pickled and unpickled in another process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .. import nn as nk
from . import forwards as fw
from .families import family_of

__all__ = ["FAMILIES", "KINDS", "Handler", "handler_for", "qualified_name", "swap_class", "swap_class_by_name"]

#: the kinds of norm ``convert(kinds=...)`` selects from
KINDS: tuple[str, ...] = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm")


@dataclass(frozen=True)
class Handler:
    """How one class is converted: its ``kind``, where it comes from, and the class it becomes."""

    qualname: str  # the original class's import path, e.g. "torch.nn.modules.normalization.LayerNorm"
    kind: str
    source: str  # "torch", "torchvision", "transformers" or "timm"
    target: Callable[[type], type]  # original class -> converted class
    #: an input that exercises the module (or a tuple of its inputs), for the check that the conversion
    #: gives the same output
    sample: Callable[[torch.nn.Module], torch.Tensor | tuple[torch.Tensor, ...]]


def qualified_name(cls: type) -> str:
    """A class's import path, e.g. ``torch.nn.modules.normalization.LayerNorm``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _fixed(target: type) -> Callable[[type], type]:
    return lambda _original: target


# on-the-fly classes: one per (mixin, original class), reachable by name from normkit.conversion
_SWAP_PREFIX = "_normkit_swap__"
_swapped: dict[str, type] = {}


def _swap_name(mixin: type, original: type) -> str:
    path = f"{original.__module__}.{original.__qualname__}".replace(".", "_dot_")
    return f"{_SWAP_PREFIX}{mixin.__name__}__{path}"


def swap_class(mixin: type) -> Callable[[type], type]:
    """A class factory: ``mixin`` in front of the original class, named after both."""

    def make(original: type) -> type:
        name = _swap_name(mixin, original)
        if name not in _swapped:
            cls = type(name, (mixin, original), {"__module__": "normkit.conversion", "__qualname__": name})
            cls.__doc__ = f"{original.__name__} with normkit's forward ({mixin.__name__})."
            _swapped[name] = cls
        return _swapped[name]

    return make


def swap_class_by_name(name: str) -> type:
    """The on-the-fly class called ``name``, re-made if needed (for unpickling in a new process)."""
    if name in _swapped:
        return _swapped[name]
    if not name.startswith(_SWAP_PREFIX):
        raise AttributeError(name)
    mixin_name, _, path = name[len(_SWAP_PREFIX) :].partition("__")
    module_name, _, cls_name = path.replace("_dot_", ".").rpartition(".")
    original = getattr(importlib.import_module(module_name), cls_name)
    return swap_class(getattr(fw, mixin_name))(original)


# --------------------------------------------------------------------------------------------------
# samples: small inputs of the shape each module takes
# --------------------------------------------------------------------------------------------------


def _rows(m: torch.nn.Module) -> torch.Tensor:
    weight = getattr(m, "weight", None)
    # a norm without a weight (Gemma3n's with_scale=False) keeps no size: any will do
    shape = tuple(getattr(m, "normalized_shape", None) or (weight.shape if weight is not None else (8,)))
    return torch.randn(3, 5, *shape)


def _gated_rows(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A gated norm's two inputs, the rows and their gate."""
    x = _rows(m)
    return x, torch.randn_like(x)


def _channels(dims: int) -> Callable[[torch.nn.Module], torch.Tensor]:
    def sample(m: torch.nn.Module) -> torch.Tensor:
        c = getattr(m, "num_features", None) or getattr(m, "num_channels", None) or m.normalized_shape[0]
        return torch.randn(4, c, *([5, 3, 4][: dims - 2]))

    return sample


def _channels_first_or_last(m: torch.nn.Module) -> torch.Tensor:
    return _channels(4)(m) if m.data_format == "channels_first" else _rows(m)


def _buffers_sample(m: torch.nn.Module) -> torch.Tensor:
    """A frozen BatchNorm keeps its size only in its buffers."""
    return torch.randn(2, m.running_mean.shape[0], 5, 3)


def _offset_by_data(sample: Callable[[torch.nn.Module], torch.Tensor]) -> Callable[[torch.nn.Module], torch.Tensor]:
    return lambda m: sample(m) * 2.0 + 0.5


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------

_T = "torch.nn.modules"
_TORCH: list[Handler] = [
    Handler(f"{_T}.batchnorm.BatchNorm1d", "batch_norm", "torch", _fixed(nk.BatchNorm1d), _channels(3)),
    Handler(f"{_T}.batchnorm.BatchNorm2d", "batch_norm", "torch", _fixed(nk.BatchNorm2d), _channels(4)),
    Handler(f"{_T}.batchnorm.BatchNorm3d", "batch_norm", "torch", _fixed(nk.BatchNorm3d), _channels(5)),
    Handler(f"{_T}.batchnorm.SyncBatchNorm", "batch_norm", "torch", _fixed(nk.SyncBatchNorm), _channels(4)),
    Handler(f"{_T}.instancenorm.InstanceNorm1d", "instance_norm", "torch", _fixed(nk.InstanceNorm1d), _channels(3)),
    Handler(f"{_T}.instancenorm.InstanceNorm2d", "instance_norm", "torch", _fixed(nk.InstanceNorm2d), _channels(4)),
    Handler(f"{_T}.instancenorm.InstanceNorm3d", "instance_norm", "torch", _fixed(nk.InstanceNorm3d), _channels(5)),
    Handler(f"{_T}.normalization.LayerNorm", "layer_norm", "torch", _fixed(nk.LayerNorm), _rows),
    Handler(f"{_T}.normalization.GroupNorm", "group_norm", "torch", _fixed(nk.GroupNorm), _channels(4)),
    Handler(f"{_T}.normalization.RMSNorm", "rms_norm", "torch", _fixed(nk.RMSNorm), _rows),
]

_HF = "transformers.models"
#: (model, class, kind, forward mixin, sample); Llama's first: a copy of several classes' code (Mistral's is
#: Llama's) is matched to the first of them
_TRANSFORMERS_TABLE = [
    ("llama", "LlamaRMSNorm", "rms_norm", fw.LlamaStyleRMSNorm, _rows),
    ("mistral", "MistralRMSNorm", "rms_norm", fw.LlamaStyleRMSNorm, _rows),
    ("qwen2", "Qwen2RMSNorm", "rms_norm", fw.LlamaStyleRMSNorm, _rows),
    ("qwen3", "Qwen3RMSNorm", "rms_norm", fw.LlamaStyleRMSNorm, _rows),
    ("gemma", "GemmaRMSNorm", "rms_norm", fw.GemmaStyleRMSNorm, _rows),
    ("gemma2", "Gemma2RMSNorm", "rms_norm", fw.GemmaStyleRMSNorm, _rows),
    ("gemma3", "Gemma3RMSNorm", "rms_norm", fw.GemmaStyleRMSNorm, _rows),
    ("t5", "T5LayerNorm", "rms_norm", fw.T5StyleLayerNorm, _rows),
    ("olmo2", "Olmo2RMSNorm", "rms_norm", fw.WeightThenCastRMSNorm, _rows),
    ("helium", "HeliumRMSNorm", "rms_norm", fw.HeliumStyleRMSNorm, _rows),
    ("gemma3n", "Gemma3nRMSNorm", "rms_norm", fw.Gemma3nStyleRMSNorm, _rows),
    ("moshi", "MoshiRMSNorm", "rms_norm", fw.Float32ScaleRMSNorm, _rows),
    ("llama4", "Llama4TextRMSNorm", "rms_norm", fw.Llama4StyleRMSNorm, _rows),
    ("llama4", "Llama4TextL2Norm", "rms_norm", fw.UnweightedRMSNorm, _rows),
    ("imagegpt", "ImageGPTLayerNorm", "rms_norm", fw.InputDtypeRMSNorm, _rows),
    ("deepseek_v4", "DeepseekV4UnweightedRMSNorm", "rms_norm", fw.UnweightedRoundedScaleRMSNorm, _rows),
    ("inkling2", "Inkling2UnweightedRMSNorm", "rms_norm", fw.UnweightedRMSNorm, _rows),
    # gated RMSNorms (two inputs): Mamba-2's gates before the norm, over groups; Qwen3-Next's after it;
    # GLM-5-Next's after it, all in float32
    ("mamba2", "MambaRMSNormGated", "rms_norm", fw.GateFirstRMSNorm, _gated_rows),
    ("qwen3_next", "Qwen3NextRMSNormGated", "rms_norm", fw.GateAfterRMSNorm, _gated_rows),
    ("glm5_next", "Glm5NextTextRMSNormGated", "rms_norm", fw.Float32GatedRMSNorm, _gated_rows),
    # Falcon-H1's: all in float32, over groups, the gate before or after the norm
    ("falcon_h1", "FalconH1RMSNormGated", "rms_norm", fw.GroupedGatedRMSNorm, _gated_rows),
    # Gemma's casts, over groups of the last dim (Qwen4-Exp); the offset added in the weight's dtype, and the
    # scale applied before the norm (MuseSpark)
    ("qwen4_exp", "Qwen4ExpTextRMSNorm", "rms_norm", fw.GroupedGemmaStyleRMSNorm, _rows),
    ("muse_spark", "MuseSparkTextCenteredRMSNorm", "rms_norm", fw.OffsetInWeightDtypeRMSNorm, _rows),
    ("muse_spark", "MuseSparkTextInputScaledRMSNorm", "rms_norm", fw.ScaleFirstRMSNorm, _rows),
    ("videoprism", "VideoPrismLayerNorm", "layer_norm", fw.OffsetWeightLayerNorm, _rows),
    # subclasses of nn.LayerNorm that permute the channels of (N, C, W) last and back
    ("squeezebert", "SqueezeBertLayerNorm", "layer_norm", fw.TimmLayerNorm2d, _channels(3)),
    ("olmo", "OlmoLayerNorm", "layer_norm", fw.OlmoStyleLayerNorm, _rows),
    ("cohere", "CohereLayerNorm", "layer_norm", fw.CohereStyleLayerNorm, _rows),
    ("convnext", "ConvNextLayerNorm", "layer_norm", fw.ChannelsFirstOrLastLayerNorm, _channels_first_or_last),
    ("deberta", "DebertaLayerNorm", "layer_norm", fw.DebertaStyleLayerNorm, _rows),
    ("esmc", "EsmcLayerNorm", "layer_norm", fw.EsmcStyleLayerNorm, _rows),
    ("vitdet", "VitDetLayerNorm", "layer_norm", fw.ChannelsFirstLayerNorm, _channels(4)),
    # a subclass of nn.LayerNorm that permutes, as timm's LayerNorm2d does
    ("eomt", "EomtLayerNorm2d", "layer_norm", fw.TimmLayerNorm2d, _channels(4)),
    # a subclass of nn.GroupNorm with one group whose forward is nn.GroupNorm's
    ("poolformer", "PoolFormerGroupNorm", "group_norm", fw.TimmGroupNorm, _channels(4)),
    ("detr", "DetrFrozenBatchNorm2d", "batch_norm", fw.DetrFrozenBatchNorm2d, _offset_by_data(_buffers_sample)),
]
_TRANSFORMERS: list[Handler] = [
    Handler(f"{_HF}.{model}.modeling_{model}.{cls}", kind, "transformers", swap_class(mixin), sample)
    for model, cls, kind, mixin, sample in _TRANSFORMERS_TABLE
]

#: transformers classes whose copies in other models are converted as they are (see :mod:`.families`): every
#: handled one, in the table's order
FAMILIES: tuple[str, ...] = tuple(h.qualname for h in _TRANSFORMERS)

_TORCHVISION: list[Handler] = [
    Handler("torchvision.ops.misc.FrozenBatchNorm2d", "batch_norm", "torchvision", swap_class(fw.FrozenBatchNorm2d),
            _offset_by_data(_buffers_sample)),
]

_L = "timm.layers"
_TIMM: list[Handler] = [
    Handler(f"{_L}.norm.LayerNorm", "layer_norm", "timm", swap_class(fw.TimmLayerNorm), _rows),
    Handler(f"{_L}.norm.LayerNorm2d", "layer_norm", "timm", swap_class(fw.TimmLayerNorm2d), _channels(4)),
    Handler(f"{_L}.norm.GroupNorm", "group_norm", "timm", swap_class(fw.TimmGroupNorm), _channels(4)),
    Handler(f"{_L}.norm.GroupNorm1", "group_norm", "timm", swap_class(fw.TimmGroupNorm), _channels(4)),
    Handler(f"{_L}.norm.RmsNorm", "rms_norm", "timm", swap_class(fw.TimmRmsNorm), _rows),
    Handler(f"{_L}.norm.RmsNorm2d", "rms_norm", "timm", swap_class(fw.TimmRmsNorm2d), _channels(4)),
    Handler(f"{_L}.norm_act.BatchNormAct2d", "batch_norm", "timm", swap_class(fw.TimmBatchNormAct2d),
            _offset_by_data(_channels(4))),
    Handler(f"{_L}.norm_act.FrozenBatchNormAct2d", "batch_norm", "timm", swap_class(fw.TimmFrozenBatchNormAct2d),
            _offset_by_data(_buffers_sample)),
    Handler(f"{_L}.norm_act.GroupNormAct", "group_norm", "timm", swap_class(fw.TimmGroupNormAct), _channels(4)),
    Handler(f"{_L}.norm_act.GroupNorm1Act", "group_norm", "timm", swap_class(fw.TimmGroupNormAct), _channels(4)),
    Handler(f"{_L}.norm_act.LayerNormAct", "layer_norm", "timm", swap_class(fw.TimmLayerNormAct), _rows),
    Handler(f"{_L}.norm_act.LayerNormAct2d", "layer_norm", "timm", swap_class(fw.TimmLayerNormAct2d), _channels(4)),
    # the float32 variants and RMSNorm+activation
    *(
        Handler(f"{_L}.{path}", kind, "timm", swap_class(mixin), sample)
        for path, kind, mixin, sample in [
            ("norm.LayerNormFp32", "layer_norm", fw.TimmLayerNormFp32, _rows),
            ("norm.LayerNorm2dFp32", "layer_norm", fw.TimmLayerNorm2dFp32, _channels(4)),
            ("norm.RmsNormFp32", "rms_norm", fw.TimmRmsNormFp32, _rows),
            ("norm.RmsNorm2dFp32", "rms_norm", fw.TimmRmsNorm2dFp32, _channels(4)),
            ("norm_act.LayerNormActFp32", "layer_norm", fw.TimmLayerNormFp32, _rows),
            ("norm_act.LayerNormAct2dFp32", "layer_norm", fw.TimmLayerNorm2dFp32, _channels(4)),
            ("norm_act.RmsNormAct", "rms_norm", fw.TimmRmsNormAct, _rows),
            ("norm_act.RmsNormAct2d", "rms_norm", fw.TimmRmsNormAct2d, _channels(4)),
            ("norm_act.RmsNormActFp32", "rms_norm", fw.TimmRmsNormFp32, _rows),
            ("norm_act.RmsNormAct2dFp32", "rms_norm", fw.TimmRmsNorm2dFp32, _channels(4)),
        ]
    ),
    # MetaFormer's (CAFormer, ConvFormer) bias-free LayerNorms: the parent's forward, with no bias
    Handler("timm.models.metaformer.LayerNormNoBias", "layer_norm", "timm", swap_class(fw.TimmLayerNorm), _rows),
    Handler("timm.models.metaformer.LayerNorm2dNoBias", "layer_norm", "timm", swap_class(fw.TimmLayerNorm2d),
            _channels(4)),
]

_HANDLERS: dict[str, Handler] = {h.qualname: h for h in (*_TORCH, *_TORCHVISION, *_TRANSFORMERS, *_TIMM)}


_family_handlers: dict[type, Handler | None] = {}


def handler_for(cls: type) -> Handler | None:
    """The handler of exactly this class, or of the transformers class whose code it copies (see
    :mod:`.families`), or None."""
    handler = _HANDLERS.get(qualified_name(cls))
    if handler is not None or "Norm" not in cls.__name__ or not cls.__module__.startswith("transformers."):
        return handler  # a model's other classes are not parsed
    if cls not in _family_handlers:
        canonical = family_of(cls, FAMILIES)
        _family_handlers[cls] = (
            None if canonical is None else replace(_HANDLERS[canonical], qualname=qualified_name(cls))
        )
    return _family_handlers[cls]


def known_classes() -> list[str]:
    """Import paths of every class :func:`normkit.convert` converts."""
    return sorted(_HANDLERS)
