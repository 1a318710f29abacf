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
    #: an input that exercises the module, for the check that the conversion gives the same output
    sample: Callable[[torch.nn.Module], torch.Tensor]


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
_TRANSFORMERS: list[Handler] = [
    *(
        Handler(f"{_HF}.{model}.modeling_{model}.{cls}", "rms_norm", "transformers", swap_class(fw.LlamaStyleRMSNorm),
                _rows)
        for model, cls in [
            ("llama", "LlamaRMSNorm"),
            ("mistral", "MistralRMSNorm"),
            ("qwen2", "Qwen2RMSNorm"),
            ("qwen3", "Qwen3RMSNorm"),
        ]
    ),
    *(
        Handler(f"{_HF}.{model}.modeling_{model}.{cls}", "rms_norm", "transformers", swap_class(fw.GemmaStyleRMSNorm),
                _rows)
        for model, cls in [("gemma", "GemmaRMSNorm"), ("gemma2", "Gemma2RMSNorm"), ("gemma3", "Gemma3RMSNorm")]
    ),
    Handler(f"{_HF}.t5.modeling_t5.T5LayerNorm", "rms_norm", "transformers", swap_class(fw.T5StyleLayerNorm), _rows),
    Handler(f"{_HF}.olmo2.modeling_olmo2.Olmo2RMSNorm", "rms_norm", "transformers",
            swap_class(fw.WeightThenCastRMSNorm), _rows),
    Handler(f"{_HF}.helium.modeling_helium.HeliumRMSNorm", "rms_norm", "transformers",
            swap_class(fw.HeliumStyleRMSNorm), _rows),
    Handler(f"{_HF}.gemma3n.modeling_gemma3n.Gemma3nRMSNorm", "rms_norm", "transformers",
            swap_class(fw.Gemma3nStyleRMSNorm), _rows),
    Handler(f"{_HF}.moshi.modeling_moshi.MoshiRMSNorm", "rms_norm", "transformers",
            swap_class(fw.Float32ScaleRMSNorm), _rows),
    Handler(f"{_HF}.llama4.modeling_llama4.Llama4TextRMSNorm", "rms_norm", "transformers",
            swap_class(fw.Llama4StyleRMSNorm), _rows),
    Handler(f"{_HF}.llama4.modeling_llama4.Llama4TextL2Norm", "rms_norm", "transformers",
            swap_class(fw.UnweightedRMSNorm), _rows),
    Handler(f"{_HF}.olmo.modeling_olmo.OlmoLayerNorm", "layer_norm", "transformers",
            swap_class(fw.OlmoStyleLayerNorm), _rows),
    Handler(f"{_HF}.detr.modeling_detr.DetrFrozenBatchNorm2d", "batch_norm", "transformers",
            swap_class(fw.DetrFrozenBatchNorm2d), _offset_by_data(_buffers_sample)),
    Handler(f"{_HF}.cohere.modeling_cohere.CohereLayerNorm", "layer_norm", "transformers",
            swap_class(fw.CohereStyleLayerNorm), _rows),
    Handler(f"{_HF}.convnext.modeling_convnext.ConvNextLayerNorm", "layer_norm", "transformers",
            swap_class(fw.ChannelsFirstOrLastLayerNorm), _channels_first_or_last),
    Handler(f"{_HF}.deberta.modeling_deberta.DebertaLayerNorm", "layer_norm", "transformers",
            swap_class(fw.DebertaStyleLayerNorm), _rows),
    Handler(f"{_HF}.esmc.modeling_esmc.EsmcLayerNorm", "layer_norm", "transformers",
            swap_class(fw.EsmcStyleLayerNorm), _rows),
    Handler(f"{_HF}.vitdet.modeling_vitdet.VitDetLayerNorm", "layer_norm", "transformers",
            swap_class(fw.ChannelsFirstLayerNorm), _channels(4)),
    # a subclass of nn.LayerNorm that permutes, as timm's LayerNorm2d does
    Handler(f"{_HF}.eomt.modeling_eomt.EomtLayerNorm2d", "layer_norm", "transformers",
            swap_class(fw.TimmLayerNorm2d), _channels(4)),
    # a subclass of nn.GroupNorm with one group whose forward is nn.GroupNorm's
    Handler(f"{_HF}.poolformer.modeling_poolformer.PoolFormerGroupNorm", "group_norm", "transformers",
            swap_class(fw.TimmGroupNorm), _channels(4)),
    Handler(f"{_HF}.imagegpt.modeling_imagegpt.ImageGPTLayerNorm", "rms_norm", "transformers",
            swap_class(fw.InputDtypeRMSNorm), _rows),
]

_TORCHVISION: list[Handler] = [
    Handler("torchvision.ops.misc.FrozenBatchNorm2d", "batch_norm", "torchvision", swap_class(fw.FrozenBatchNorm2d),
            _offset_by_data(_buffers_sample)),
]

#: transformers classes whose copies in other models are converted as they are (see :mod:`.families`)
FAMILIES: tuple[str, ...] = tuple(
    f"{_HF}.{path}"
    for path in (
        "llama.modeling_llama.LlamaRMSNorm",
        "gemma.modeling_gemma.GemmaRMSNorm",
        "t5.modeling_t5.T5LayerNorm",
        "olmo2.modeling_olmo2.Olmo2RMSNorm",
        "helium.modeling_helium.HeliumRMSNorm",
        "gemma3n.modeling_gemma3n.Gemma3nRMSNorm",
        "moshi.modeling_moshi.MoshiRMSNorm",
        "llama4.modeling_llama4.Llama4TextRMSNorm",
        "llama4.modeling_llama4.Llama4TextL2Norm",
        "olmo.modeling_olmo.OlmoLayerNorm",
        "detr.modeling_detr.DetrFrozenBatchNorm2d",
        "cohere.modeling_cohere.CohereLayerNorm",
        "convnext.modeling_convnext.ConvNextLayerNorm",
        "deberta.modeling_deberta.DebertaLayerNorm",
        "esmc.modeling_esmc.EsmcLayerNorm",
        "vitdet.modeling_vitdet.VitDetLayerNorm",
        "eomt.modeling_eomt.EomtLayerNorm2d",
        "poolformer.modeling_poolformer.PoolFormerGroupNorm",
        "imagegpt.modeling_imagegpt.ImageGPTLayerNorm",
    )
)

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
