"""Providers: who computes each op. normkit, torch eager, torch.compile, and any installed peer library.

A :class:`Provider` turns an :class:`~normkit.bench.ops.OpSpec` into a callable taking the op's
positional tensors and returning a tuple of outputs, or ``None`` when it does not implement the op.

* ``torch``: torch eager (``torch.nn.functional``), the baseline every ratio is relative to;
* ``normkit``: :mod:`normkit.functional`, on whatever backend normkit selects (``--backend`` picks one
  with :func:`normkit.use_backend`); an op missing from ``normkit.functional`` skips the cell;
* ``compile``: ``torch.compile(formula, dynamic=False)`` of the op's plain math; each (cell, pass)
  compiles afresh (``torch._dynamo.reset()`` first), and the first call, which compiles, is timed
  separately and reported as the compile time;
* peers: other libraries, registered with :func:`register_peer` by module name and used only when
  that module imports. Intel Extension for PyTorch's CPU kernels are registered for the forward pass.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .ops import EPS, RMS_EPS, OpSpec

__all__ = [
    "Provider", "BASELINE", "builtin_providers", "register_peer", "unregister_peer", "peers", "all_providers",
    "select_providers",
]

BASELINE = "torch"

Build = Callable[[OpSpec], "Callable[..., tuple] | None"]


@dataclass
class Provider:
    """One implementation of the ops.

    ``build(spec)`` gives the call for one op (or ``None``: not implemented); it is called once per
    (cell, pass). ``passes`` are the passes it can time (a forward-only library: ``{"fwd"}``).
    ``requires``: modules that must import for it to be available. ``compiles``: its first call
    compiles, so its time is reported as the compile time.
    """

    name: str
    description: str
    build: Build
    passes: frozenset[str] = frozenset({"fwd", "fwdbwd"})
    requires: tuple[str, ...] = ()
    compiles: bool = False
    kind: str = "peer"

    def unavailable_reason(self) -> str | None:
        """``None`` if usable here, else why not (the import error)."""
        for module in self.requires:
            try:
                importlib.import_module(module)
            except Exception as e:  # ImportError, or a broken install raising anything
                return f"{module} does not import ({type(e).__name__}: {e})"
        return None


def _normkit_build(spec: OpSpec) -> Callable[..., tuple] | None:
    import normkit.functional as NF

    fn = getattr(NF, spec.function, None)
    return None if fn is None else spec.normkit(fn)


def _eager_build(spec: OpSpec) -> Callable[..., tuple]:
    return spec.eager


def _compile_build(spec: OpSpec) -> Callable[..., tuple]:
    torch._dynamo.reset()  # each (cell, pass) compiles afresh: no recompile limit, no shared cache
    compiled = torch.compile(spec.formula, dynamic=False)

    def call(*args: torch.Tensor) -> tuple:
        out = compiled(*args)
        return out if isinstance(out, tuple) else (out,)

    return call


def builtin_providers() -> list[Provider]:
    """normkit, torch eager and torch.compile: the providers every run has."""
    return [
        Provider(BASELINE, "torch eager: torch.nn.functional (compositions for the fused ops)",
                 _eager_build, kind="eager"),
        Provider("normkit", "normkit.functional on normkit's selected backend", _normkit_build, kind="normkit"),
        Provider("compile", "torch.compile(plain formula, dynamic=False)", _compile_build, compiles=True,
                 kind="compile"),
    ]


# --------------------------------------------------------------------------------------------------
# Peer libraries
# --------------------------------------------------------------------------------------------------

_PEERS: dict[str, Provider] = {}


def register_peer(
    name: str,
    module: str,
    ops: Mapping[str, Callable[[object], Callable[..., object]]],
    *,
    description: str = "",
    passes: frozenset[str] | set[str] = frozenset({"fwd", "fwdbwd"}),
) -> Provider:
    """Register a peer library ``name``, available when ``module`` imports.

    ``ops`` maps op names (:data:`normkit.bench.ops.OPS`) to factories: ``factory(module_object)``
    returns a callable with the op's positional arguments (:attr:`OpSpec.args`), returning the output
    or a tuple of outputs. Ops it lacks are simply not timed for it.
    """

    def build(spec: OpSpec) -> Callable[..., tuple] | None:
        factory = ops.get(spec.name)
        if factory is None:
            return None
        fn = factory(importlib.import_module(module))

        def call(*args: torch.Tensor) -> tuple:
            out = fn(*args)
            return out if isinstance(out, tuple) else (out,)

        return call

    provider = Provider(name, description or f"{module}", build, passes=frozenset(passes), requires=(module,))
    _PEERS[name] = provider
    return provider


def unregister_peer(name: str) -> None:
    """Remove a peer registered with :func:`register_peer`."""
    _PEERS.pop(name, None)


def peers() -> list[Provider]:
    """Every registered peer, available here or not."""
    return list(_PEERS.values())


def all_providers() -> list[Provider]:
    """The built-in providers followed by every registered peer."""
    return builtin_providers() + peers()


def select_providers(names: Sequence[str] | None, candidates: Sequence[Provider] | None = None,
                     ) -> tuple[list[Provider], list[str]]:
    """The providers to time (torch first, always) and notes about those that cannot run here."""
    candidates = list(candidates) if candidates is not None else all_providers()
    by_name = {p.name: p for p in candidates}
    if names is not None:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"unknown provider {unknown[0]!r}; choose from {', '.join(by_name)}")
        wanted = [*([BASELINE] if BASELINE in by_name else []), *(n for n in names if n != BASELINE)]
    else:
        wanted = list(by_name)
    chosen: list[Provider] = []
    notes: list[str] = []
    for name in dict.fromkeys(wanted):
        p = by_name[name]
        reason = p.unavailable_reason()
        if reason is None:
            chosen.append(p)
        elif names is not None or p.kind != "peer":
            notes.append(f"provider {name} unavailable: {reason}")
        else:
            notes.append(f"peer {name} not installed ({p.requires[0]})")
    chosen.sort(key=lambda p: p.name != BASELINE)  # torch eager first: the others are checked against it
    return chosen, notes


# Intel Extension for PyTorch: fused CPU kernels for the LLM norms (inference API: forward only).
# The outputs are checked against the float64 truth before any timing, like every provider's.
register_peer(
    "ipex", "intel_extension_for_pytorch",
    {
        "rms_norm": lambda m: lambda x, w: m.llm.functional.rms_norm(x, w, RMS_EPS),
        "layer_norm": lambda m: lambda x, w, b: m.llm.functional.fast_layer_norm(x, (x.shape[-1],), w, b, EPS),
    },
    description="Intel Extension for PyTorch, ipex.llm.functional (forward only)",
    passes={"fwd"},
)
