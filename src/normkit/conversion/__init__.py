"""Convert the normalization layers of an existing model to normkit's, and back.

>>> model = normkit.convert(model)          # torch.nn, Hugging Face and timm norms, in place
>>> normkit.revert(model)                   # the original classes again

A module is converted by switching its class (``module.__class__``) to one whose only difference is
``forward``: parameters, buffers, attributes, hooks and the module's place in the model stay the
same objects, so state_dict keys and values, optimizers holding the parameters and ``isinstance``
checks against the original class are untouched. ``revert`` switches the class back.

Only classes that normkit has a handler for are converted, and only on an exact class match: a
third-party subclass may override ``forward`` (timm's ``BatchNormAct2d`` adds an activation), so its
parent's handler would change what it computes. A transformers norm class whose code is a copy of a
handled class's is converted as that class (:mod:`.families`). Everything that looks like a norm but is not
converted is reported with the reason (see :func:`plan`). Before the first module of a class is
converted, the converted forward is checked against the original on a small random input (in a
copy of the module, in eval mode); a class whose installed version computes something else than the
handler expects is left alone and reported.
"""

from __future__ import annotations

import copy
import re
import types
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..testing import compare
from .handlers import KINDS, Handler, handler_for, known_classes, qualified_name, swap_class_by_name

__all__ = ["KINDS", "ConversionReport", "Site", "convert", "known_classes", "plan", "revert"]

# set on a converted module: the class it had before, for revert
_ORIGINAL = "_normkit_original_class"
# class names that look like norms: ...Norm, ...Norm2d, ...NormAct2d, ...NormFp32, ...NormGated (the gated
# RMSNorms of Mamba-2 hybrids and Qwen3-Next, reported as left) but not NormMlpHead
_NORMISH = re.compile(r"Norm(\d?d)?(Act\d?d?)?(Fp32)?(Gated)?$")


@dataclass(frozen=True)
class Site:
    """One module that is (or would be) converted, or that looks like a norm and is left alone."""

    name: str  # its path in the model ("" for the root)
    original: str  # its class's import path
    kind: str | None  # batch_norm, layer_norm, ... (None when no handler knows it)
    converted_to: str | None  # the class it becomes; None if left alone
    reason: str = ""  # why it is left alone


@dataclass
class ConversionReport:
    """What :func:`plan` found: ``converted`` sites and ``left`` ones (with reasons)."""

    converted: list[Site] = field(default_factory=list)
    left: list[Site] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Converted modules per original class name."""
        out: dict[str, int] = {}
        for s in self.converted:
            key = s.original.rsplit(".", 1)[-1]
            out[key] = out.get(key, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"normkit.convert: {len(self.converted)} converted, {len(self.left)} left"]
        for cls, n in sorted(self.counts().items()):
            lines.append(f"  converted {n:4d} x {cls}")
        for s in self.left:
            lines.append(f"  left      {s.name or '(root)'} ({s.original.rsplit('.', 1)[-1]}): {s.reason}")
        return "\n".join(lines)


def _select(kinds: Iterable[str] | None) -> frozenset[str]:
    if kinds is None:
        return frozenset(KINDS)
    chosen = frozenset(kinds)
    unknown = chosen - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; choose from {list(KINDS)}")
    return chosen


def _looks_like_norm(module: torch.nn.Module) -> bool:
    norm_bases = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)
    if isinstance(module, norm_bases):
        return True
    if not _NORMISH.search(type(module).__name__):
        return False
    # a block named after its norm (timm's ConvNormAct, LeViT's LinearNorm) holds layers with parameters
    # of their own: it is not a norm, and the norm inside it is converted or reported on its own
    return not any(True for child in module.children() for _ in child.parameters())


def _parameter_dtype(module: torch.nn.Module) -> torch.dtype:
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _variant(module: torch.nn.Module) -> tuple:
    """What picks a different path through a converted forward within one class (a channels-first or
    -last ConvNext norm, a Gemma3n norm with or without its weight, a per-head weight): each variant is
    checked on its own."""
    weight = getattr(module, "weight", None)
    return (
        getattr(module, "data_format", None),
        getattr(module, "with_scale", None),
        weight.dim() if isinstance(weight, torch.Tensor) else None,
    )


def _agrees(module: torch.nn.Module, handler: Handler) -> str:
    """'' if the converted forward matches the original on a sample input, else why not."""
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        return ("its weights are not in memory (the meta device: offloaded by accelerate, or not yet loaded), so "
                "the check cannot run; convert(..., check=False) converts it")
    try:
        original = copy.deepcopy(module).eval()
        converted = copy.deepcopy(module).eval()
        _switch_class(converted, handler.target(type(module)))
        device = next((t.device for t in module.parameters()), torch.device("cpu"))
        dtype = _parameter_dtype(module)
        gen_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(0)
            inputs = handler.sample(module)
        finally:
            torch.random.set_rng_state(gen_state)
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        inputs = [t.to(device=device, dtype=dtype if dtype.is_floating_point else torch.float32) for t in inputs]
        with torch.no_grad():
            want, got = original(*inputs), converted(*inputs)
    except Exception as e:  # a module that cannot run on the sample is not verified, so not converted
        return f"could not check the conversion on a sample input ({type(e).__name__}: {e})"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"converted forward gives {tuple(got.shape)} {got.dtype}, the original {tuple(want.shape)} {want.dtype}"
    # the original in float64 is the truth only for float64; otherwise allow the dtype's rounding
    result = compare(got, want.double(), dtype=want.dtype if want.dtype != torch.float64 else torch.float32)
    if not result.ok:
        return f"converted forward differs from this version's original ({result})"
    return ""


def plan(
    model: torch.nn.Module,
    *,
    kinds: Iterable[str] | None = None,
    fused: bool = False,
    check: bool = True,
) -> ConversionReport:
    """What :func:`convert` would do to ``model`` with the same options, without changing it.

    Args:
        model: any module.
        kinds: the kinds of norm to convert, from :data:`KINDS` (default: all).
        fused: also use fused normkit modules where the structure allows (see :func:`convert`).
        check: verify each class's converted forward against its original on a sample input.
    """
    chosen = _select(kinds)
    report = ConversionReport()
    verdicts: dict[tuple, str] = {}
    for name, module in model.named_modules():
        cls = type(module)
        if getattr(module, _ORIGINAL, None) is not None:
            report.left.append(Site(name, qualified_name(cls), None, None, "already converted by normkit"))
            continue
        handler = handler_for(cls)
        if handler is None:
            if _looks_like_norm(module) and not cls.__module__.startswith("normkit."):
                report.left.append(Site(name, qualified_name(cls), None, None, _why_no_handler(cls)))
            continue
        if handler.kind not in chosen:
            reason = f"kind {handler.kind!r} not selected"
            report.left.append(Site(name, qualified_name(cls), handler.kind, None, reason))
            continue
        instance_forward = _instance_forward(module)
        if instance_forward:
            report.left.append(Site(name, qualified_name(cls), handler.kind, None, instance_forward))
            continue
        key = (cls, _variant(module))
        if check and key not in verdicts:
            verdicts[key] = _agrees(module, handler)
        if check and verdicts[key]:
            report.left.append(Site(name, qualified_name(cls), handler.kind, None, verdicts[key]))
            continue
        target = _fused_target(model, name, module, handler) if fused else None
        target = target or handler.target(cls)
        report.converted.append(Site(name, qualified_name(cls), handler.kind, qualified_name(target)))
    return report


def _why_no_handler(cls: type) -> str:
    for base in cls.__mro__[1:]:
        if handler_for(base) is not None:
            own_forward = "forward" in cls.__dict__
            return (f"subclass of {base.__name__}" + (" with its own forward" if own_forward else "")
                    + ": only exact classes are converted")
    return "no normkit handler for this class"


def _fused_target(model: torch.nn.Module, name: str, module: torch.nn.Module, handler: Handler) -> type | None:
    """GroupNorm directly followed by SiLU in an nn.Sequential: normkit's GroupNormSiLU."""
    from .. import nn as nk

    if type(module) is not torch.nn.GroupNorm:
        return None
    nxt = _next_in_sequential(model, name)
    return nk.GroupNormSiLU if nxt is not None and type(nxt[1]) is torch.nn.SiLU else None


def _next_in_sequential(model: torch.nn.Module, name: str) -> tuple[torch.nn.Sequential, torch.nn.Module, str] | None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, torch.nn.Sequential) or not child:
        return None
    keys = list(parent._modules)
    i = keys.index(child)
    if i + 1 >= len(keys):
        return None
    return parent, parent._modules[keys[i + 1]], keys[i + 1]


class _FusedAway(torch.nn.Identity):
    """Stands where an activation was fused into the norm before it; holds the original for revert."""

    def __init__(self, original: torch.nn.Module) -> None:
        super().__init__()
        self.__dict__["_normkit_fused_away"] = original  # not a submodule: no state_dict entries

    def extra_repr(self) -> str:
        return f"fused into the previous norm: {self._normkit_fused_away!r}"


def convert(
    model: torch.nn.Module,
    *,
    kinds: Iterable[str] | None = None,
    fused: bool = False,
    inplace: bool = True,
    check: bool = True,
    verbose: bool = False,
) -> torch.nn.Module:
    """Switch every normalization module of ``model`` that normkit knows to normkit's computation.

    Covers every torch.nn norm class (BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d,
    LayerNorm, GroupNorm, RMSNorm) and torchvision's FrozenBatchNorm2d; Hugging Face transformers'
    RMSNorms of Llama, Llama 4, Mistral, Qwen2/3, Gemma/Gemma2/Gemma3/Gemma3n, Olmo2, Helium, Moshi and
    ImageGPT, the LayerNorms of T5, OLMo, Cohere, ConvNext, DeBERTa, ViTDet, EoMT and ESM C, PoolFormer's
    GroupNorm and DETR's frozen BatchNorm, each with its own casting (see
    :mod:`normkit.conversion.forwards`), and every other transformers norm class whose code is a copy
    of one of those (:mod:`normkit.conversion.families`); timm's LayerNorm, LayerNorm2d, GroupNorm,
    GroupNorm1, RmsNorm, RmsNorm2d, their float32 (``*Fp32``) variants, MetaFormer's bias-free LayerNorms
    and the norm+activation modules BatchNormAct2d, FrozenBatchNormAct2d, GroupNormAct, GroupNorm1Act,
    LayerNormAct(2d) and RmsNormAct(2d) (:func:`known_classes` lists the handled classes). State_dict
    keys and values are unchanged; :func:`revert` undoes it.

    Args:
        model: the model (or a single norm module).
        kinds: the kinds to convert, from ``("batch_norm", "layer_norm", "group_norm",
            "instance_norm", "rms_norm")``; default all.
        fused: where the structure allows, use a fused normkit module: a ``torch.nn.GroupNorm``
            followed by ``torch.nn.SiLU`` in an ``nn.Sequential`` becomes ``GroupNormSiLU`` (the SiLU
            is replaced by an Identity that :func:`revert` puts back), and timm's GroupNormAct with a
            SiLU runs as one fused op.
        inplace: convert ``model`` itself (default) or a deep copy of it.
        check: before converting a class, compare its converted forward with the original on a small
            random input; a mismatch leaves that class alone (and reports it).
        verbose: print what was converted and what was left, and why.

    Returns:
        The converted model (``model`` itself when ``inplace``).

    Example::

        >>> model = transformers.LlamaForCausalLM(config)
        >>> model = normkit.convert(model, verbose=True)
        normkit.convert: 5 converted, 0 left
          converted    5 x LlamaRMSNorm
    """
    if not inplace:
        model = copy.deepcopy(model)
    report = plan(model, kinds=kinds, fused=fused, check=check)
    for site in report.converted:
        module = model.get_submodule(site.name)
        original = type(module)
        handler = handler_for(original)
        assert handler is not None
        target = (_fused_target(model, site.name, module, handler) if fused else None) or handler.target(original)
        if target.__name__ == "GroupNormSiLU":
            parent, act, key = _next_in_sequential(model, site.name)
            parent._modules[key] = _FusedAway(act)
        _switch_class(module, target)
        module.__dict__[_ORIGINAL] = original
        if fused and hasattr(module, "_silu_fusable"):
            module._normkit_fused = True
    if verbose:
        print(report)
    return model


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`convert`: every converted module gets its original class back (and every fused-away
    activation returns). Modules built as normkit's own classes are not touched. Returns ``model``."""
    for module in list(model.modules()):
        for key, child in list(module._modules.items()):
            if isinstance(child, _FusedAway):
                module._modules[key] = child._normkit_fused_away
        original = module.__dict__.pop(_ORIGINAL, None)
        if original is not None:
            module.__dict__.pop("_normkit_fused", None)
            _restore_hooked_forward(module, original)
            module.__class__ = original
    return model


# accelerate's hooks (device_map dispatch, offloading) replace a module's forward on the instance with a
# wrapper that calls the forward found when the hook was added, kept bound as ``_old_forward``: switching
# the class alone would leave that one running. Here the bound forward the hook held before conversion.
_HOOKED_FORWARD = "_normkit_hooked_forward"


def _instance_forward(module: torch.nn.Module) -> str:
    """'' if calling ``module`` runs its class's forward (directly, or through accelerate's hook), else why
    not: a forward set on the instance by something else, which switching the class would not change."""
    if "forward" not in module.__dict__:
        return ""
    old = module.__dict__.get("_old_forward")
    if "_hf_hook" in module.__dict__ and isinstance(old, types.MethodType) and old.__self__ is module:
        return ""
    return "its forward is replaced on the instance (not by accelerate's hooks): a new class would change nothing"


def _switch_class(module: torch.nn.Module, target: type) -> None:
    """``module`` becomes a ``target``, and the forward an accelerate hook calls becomes target's."""
    module.__class__ = target
    if "forward" in module.__dict__ and not _instance_forward(module):
        module.__dict__.setdefault(_HOOKED_FORWARD, module.__dict__["_old_forward"])
        module.__dict__["_old_forward"] = types.MethodType(target.forward, module)


def _restore_hooked_forward(module: torch.nn.Module, original: type) -> None:
    hooked = module.__dict__.pop(_HOOKED_FORWARD, None)
    if hooked is None:
        return
    if "_old_forward" in module.__dict__:  # the hook is still there
        module.__dict__["_old_forward"] = hooked
    elif getattr(module.__dict__.get("forward"), "__func__", None) is type(module).forward:
        # the hook was removed since, and put the converted forward it held back on the instance
        module.__dict__["forward"] = types.MethodType(original.forward, module)


def __getattr__(name: str) -> type:
    # the classes convert() makes on the fly, by name: lets pickle find them in a new process
    return swap_class_by_name(name)
