"""Hugging Face norm classes that are copies of one another.

transformers gives every model its own norm class, most of them copied from another model's
(transformers 5.24 has 142 classes whose ``forward`` is ``LlamaRMSNorm``'s, word for word). Listing
each by name would leave out every model added after the list was written, so a class without a
handler of its own is matched to a *family*: it belongs to one when its ``forward`` (and the
``_norm`` helper some of them call) parse to the same syntax tree as the family's canonical class
in the installed transformers, and it has the same base classes. Comments, docstrings, type
annotations, decorators and the function's name are ignored; everything else (every attribute read,
every cast, the order of the operations) must be the same. The same code reading the same attributes
computes the same thing, so the canonical class's handler applies. The check that
:func:`normkit.convert` runs before converting a class's first module still runs for every member.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import textwrap
from collections.abc import Iterator

__all__ = ["code_signature", "family_of", "members"]

#: the methods whose code decides what a norm computes: forward, and the helper some forwards call
_METHODS = ("forward", "_norm")


def _function_tree(fn) -> str:
    """The syntax tree of ``fn`` without what does not change what it computes."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    if not isinstance(tree, ast.FunctionDef):
        raise TypeError(f"{fn!r} is not a plain function")
    tree.name, tree.decorator_list, tree.returns = "_", [], None
    for arg in (*tree.args.posonlyargs, *tree.args.args, *tree.args.kwonlyargs):
        arg.annotation = None
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(
        body[0].value.value, str
    ):
        tree.body = body[1:] or [ast.Pass()]  # the docstring
    return ast.dump(tree, include_attributes=False)


@functools.cache
def code_signature(cls: type) -> str | None:
    """What decides ``cls``'s computation, as text: its bases and its methods' syntax trees.

    Args:
        cls: a module class.

    Returns:
        The text two classes share exactly when their code is the same up to comments, docstrings,
        annotations and decorators; None where the source cannot be read (a class defined in an
        interactive session).

    Example::

        >>> from transformers.models.mistral.modeling_mistral import MistralRMSNorm
        >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
        >>> code_signature(MistralRMSNorm) == code_signature(LlamaRMSNorm)
        True
    """
    parts = [",".join(f"{b.__module__}.{b.__qualname__}" for b in cls.__bases__)]
    for name in _METHODS:
        fn = getattr(cls, name, None)
        if fn is None:
            continue
        try:
            parts.append(f"{name}:{_function_tree(fn)}")
        except (OSError, TypeError, SyntaxError):
            return None
    return "\n".join(parts)


def _import(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # not installed, or renamed in this version: the family has no members
        return None


def family_of(cls: type, canonicals: tuple[str, ...]) -> str | None:
    """The family of a transformers class: the first of ``canonicals`` whose code ``cls``'s is.

    Args:
        cls: a module class; only classes defined in ``transformers`` are matched.
        canonicals: import paths of the classes that head a family (:data:`.handlers.FAMILIES`); one that
            the installed transformers does not have is skipped.

    Returns:
        The import path of the canonical class, or None (no family, or ``cls`` is a canonical itself).

    Example::

        >>> from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm
        >>> family_of(Phi3RMSNorm, normkit.conversion.handlers.FAMILIES)
        'transformers.models.llama.modeling_llama.LlamaRMSNorm'
    """
    if not cls.__module__.startswith("transformers."):
        return None
    mine = code_signature(cls)
    if mine is None:
        return None
    for path in canonicals:
        canonical = _import(path)
        if canonical is not None and canonical is not cls and code_signature(canonical) == mine:
            return path
    return None


def members(canonicals: tuple[str, ...]) -> Iterator[tuple[type, str]]:
    """Every class named like a norm in the installed transformers' models that belongs to a family.

    Imports every model's modeling module (about 20 seconds); modules that need an optional dependency
    are skipped.

    Args:
        canonicals: as in :func:`family_of`.

    Yields:
        ``(class, canonical import path)`` pairs.
    """
    import pkgutil

    import torch
    import transformers.models

    for info in pkgutil.iter_modules(transformers.models.__path__):
        try:
            module = importlib.import_module(f"transformers.models.{info.name}.modeling_{info.name}")
        except Exception:  # no modeling module, or one that needs an optional dependency
            continue
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and obj.__module__ == module.__name__
                and issubclass(obj, torch.nn.Module)
                and "Norm" in obj.__name__
            ):
                path = family_of(obj, canonicals)
                if path is not None:
                    yield obj, path
