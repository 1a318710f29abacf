"""Bytes saved for backward: what a forward with gradients keeps alive until its backward runs.

Measured with :class:`torch.autograd.graph.saved_tensors_hooks`: every tensor autograd saves (by a
built-in op's backward node or a custom ``autograd.Function``'s ``ctx.save_for_backward``, compiled
graphs included) passes through the pack hook once. Tensors are counted by their *storage*: each
distinct storage once, at its full size (``untyped_storage().nbytes()``), because that is the memory
kept alive; two views of one buffer, or the same tensor saved by two nodes, count once.

``total`` includes the storages of the call's own inputs (``x``, the weight; torch's LayerNorm saves
its input), which usually stay alive anyway as the previous layer's output; ``new`` is what the op
allocates on top (statistics, an upcast copy, a normalized ``x̂``), the part a fused kernel can
shrink. A tensor stashed on ``ctx`` as a plain attribute (not via ``save_for_backward``) is invisible
to the hooks and not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SavedBytes", "saved_bytes", "storage_key"]


@dataclass(frozen=True)
class SavedBytes:
    total: int  # every distinct saved storage
    new: int  # those that are not a storage of one of the call's inputs
    tensors: int  # how many tensors were saved (before de-duplication)
    storages: int  # how many distinct storages


def storage_key(t: Tensor) -> tuple[str, int]:
    """Identifies a tensor's storage (device, address), so that views of one storage count once."""
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def saved_bytes(fn: Callable[..., object], args: Iterable[Tensor | None] = ()) -> SavedBytes:
    """Run ``fn(*args)`` once with the saved-tensor hooks on; the bytes of what it saved.

    Arguments that should get gradients must already require them. The outputs are dropped, and
    with them the graph and the saved tensors.
    """
    args = list(args)
    inputs = {storage_key(a) for a in args if isinstance(a, Tensor)}
    seen: dict[tuple[str, int], int] = {}
    count = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal count
        count += 1
        try:
            seen.setdefault(storage_key(t), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a wrapper subclass)
            seen.setdefault(("?", id(t)), t.numel() * t.element_size())
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    del out
    return SavedBytes(
        total=sum(seen.values()),
        new=sum(n for k, n in seen.items() if k not in inputs),
        tensors=count,
        storages=len(seen),
    )
