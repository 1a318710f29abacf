"""The backend layer: one small registry that :mod:`normkit.functional` dispatches through.

A backend implements the five norms *after* argument checking, with the signatures of the ATen ops
(``torch.layer_norm``, ``torch.batch_norm``, ...): see :class:`Backend`. Backends are registered
lazily by name, so a backend's dependencies (a C compiler, triton) are needed only when it is used.

Which backend runs a call, first match wins:

1. the innermost :func:`use_backend` context, or the process-wide :func:`set_backend`;
2. the ``NORMKIT_BACKEND`` environment variable (read at each call, so it can change at run time);
3. the default, ``"auto"``: the fastest backend available for the tensor's device
   (:data:`DEVICE_DEFAULTS`: ``"cpu"``, normkit's C kernels, for CPU tensors; ``"triton"``, its Triton
   kernels, for CUDA tensors when triton imports), else ``"reference"``.

A backend that cannot take a tensor (wrong device or dtype) hands it to the reference backend, which
runs everywhere torch does. An unknown name is a :class:`ValueError` that lists the known ones. A
backend whose dependencies are missing raises :class:`ImportError` when selected by name, and is
skipped by ``"auto"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .base import Backend

__all__ = [
    "AUTO",
    "Backend",
    "DEFAULT_BACKEND",
    "DEVICE_DEFAULTS",
    "default_backend",
    "ENV_VAR",
    "available_backends",
    "current_backend_name",
    "get_backend",
    "register_backend",
    "registered_backends",
    "resolve",
    "set_backend",
    "use_backend",
]

ENV_VAR = "NORMKIT_BACKEND"
# os.environ's own storage, read with one dict lookup: os.environ.get runs several Python frames
# (key encoding, decoding), which cost tens of microseconds per call when a convolution has just
# evicted them from the caches; os.environ[...] = / del keep this dict current
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None


def _env_choice() -> str | None:
    if _ENV_DATA is None or _ENV_KEY is None:
        return os.environ.get(ENV_VAR)
    raw = _ENV_DATA.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)
#: the pseudo-backend that picks per device, from :data:`DEVICE_DEFAULTS`
AUTO = "auto"
DEFAULT_BACKEND = AUTO
#: per device type, the backends ``"auto"`` tries in order before falling back to the reference
DEVICE_DEFAULTS: dict[str, tuple[str, ...]] = {"cpu": ("cpu",), "cuda": ("triton",)}

_factories: dict[str, Callable[[], Backend]] = {}
_instances: dict[str, Backend] = {}
_failures: dict[str, ImportError] = {}  # a backend that could not be built is not retried each call
_auto_cache: dict[str, Backend] = {}  # device type -> what "auto" picked (cleared on registration)
_process_choice: str | None = None
_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "normkit_backend", default=None
)


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register ``factory`` (called once, on first use) under ``name`` (lower case)."""
    name = name.strip().lower()
    _factories[name] = factory
    _instances.pop(name, None)
    _failures.pop(name, None)
    _auto_cache.clear()


def _lazy(module: str, attr: str) -> Callable[[], Backend]:
    def factory() -> Backend:
        return getattr(importlib.import_module(module, __name__), attr)()

    return factory


register_backend("reference", _lazy(".reference", "ReferenceBackend"))
register_backend("torch", _lazy(".torch_ops", "TorchBackend"))
register_backend("cpu", _lazy(".cpu", "CpuBackend"))
register_backend("triton", _lazy(".triton", "TritonBackend"))


def registered_backends() -> list[str]:
    """Names of every registered backend, importable or not."""
    return sorted(_factories)


def _check_name(name: str) -> str:
    """The registry key for ``name`` (case and surrounding spaces ignored), or a ValueError."""
    name = name.strip().lower()
    if name != AUTO and name not in _factories:
        raise ValueError(
            f"unknown normkit backend {name!r}; registered backends: {', '.join(registered_backends())}"
            f" (or {AUTO!r})"
        )
    return name


def get_backend(name: str | None = None) -> Backend:
    """The backend instance called ``name`` (default: the one currently selected; ``"auto"`` gives
    the default for CPU tensors)."""
    name = _check_name(name if name is not None else current_backend_name())
    if name == AUTO:
        return default_backend("cpu")
    backend = _instances.get(name)
    if backend is None:
        if name in _failures:
            raise _failures[name]
        try:
            backend = _instances[name] = _factories[name]()
        except ImportError as exc:
            _failures[name] = exc
            raise
    return backend


def default_backend(device_type: str) -> Backend:
    """What ``"auto"`` runs on ``device_type``: the first available of :data:`DEVICE_DEFAULTS`, else
    the reference."""
    for name in DEVICE_DEFAULTS.get(device_type, ()):
        try:
            return get_backend(name)
        except ImportError:
            continue
    return get_backend("reference")


def available_backends() -> list[str]:
    """Registered backends whose dependencies import on this machine."""
    names = []
    for name in registered_backends():
        try:
            get_backend(name)
        except ImportError:
            continue
        names.append(name)
    return names


def _constant_while_compiling(fn: Callable[..., str]) -> Callable[..., str]:
    """Mark ``fn`` as :func:`torch.compiler.assume_constant_result` does (dynamo calls it once while
    tracing and bakes the result in), without importing ``torch._dynamo`` at import time: that takes a
    second and imports triton. The decorator only sets this attribute (checked by the test suite)."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_constant_while_compiling
def current_backend_name() -> str:
    """The name selected by context, process setting, environment or default (in that order);
    ``"auto"`` when nothing was selected.

    ``torch.compile`` reads it once, while tracing, and keeps the answer in the compiled code (dynamo
    cannot trace a ContextVar): a model compiled under one backend keeps it."""
    name = _context_choice.get() or _process_choice or _env_choice() or DEFAULT_BACKEND
    return name.strip().lower()


def set_backend(name: str | None) -> None:
    """Select the backend for this process (a name or ``"auto"``); ``None`` returns to
    ``NORMKIT_BACKEND``/the default."""
    global _process_choice
    _process_choice = None if name is None else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """Run the enclosed code with backend ``name``: ``with normkit.use_backend("torch"): ...``.

    Like ``torch.no_grad()``, this applies to the current thread (and asyncio task) only: threads
    started inside the block use the process-wide choice. :func:`set_backend` covers every thread.
    """
    key = _check_name(name)
    backend = get_backend(key)
    token = _context_choice.set(key)
    try:
        yield backend
    finally:
        _context_choice.reset(token)


@_constant_while_compiling
def _compiled_choice(device: str) -> str:
    """The backend name for ``device`` while torch.compile traces: evaluated once, at trace time, and
    baked into the graph as a constant (dynamo cannot trace the context variable behind the choice)."""
    get_backend("reference")  # built, for what the chosen backend does not support
    name = current_backend_name()
    if name == AUTO:
        return default_backend(device).name
    get_backend(name)  # fail at trace time, with the usual error, for an unknown or broken backend
    return name


def resolve(x: Tensor) -> Backend:
    """The backend that runs a norm on ``x``: the selected one (per device for ``"auto"``), or the
    reference if it can't. Under torch.compile the choice is made once, when the model is traced."""
    if torch.compiler.is_compiling():
        backend = _instances[_compiled_choice(x.device.type)]
        return backend if backend.supports(x) else _instances["reference"]
    name = current_backend_name()
    if name == AUTO:
        device = "cpu" if x.is_cpu else x.device.type  # is_cpu: no torch.device object per call
        backend = _auto_cache.get(device)  # the per-call path: skip the registry walk
        if backend is None:
            backend = _auto_cache[device] = default_backend(device)
    else:
        backend = get_backend(name)
    if backend.supports(x):
        return backend
    return get_backend("reference")
