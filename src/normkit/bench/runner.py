"""Runs the matrix: for each cell and pass, check every provider against torch eager, then time them.

Per cell: the inputs are made once (fixed seed). Per pass (``fwd``: the forward under
``torch.no_grad()``; ``fwdbwd``: the forward with gradients on, then the backward of
``sum(out_i * grad_i)`` for fixed random ``grad_i``, every output of a fused op getting one):

1. each provider's call is built, and run once; its outputs (and in ``fwdbwd`` the gradients of
   ``x``, the residual, the weight and the bias) are compared with torch eager's under a loose
   per-dtype tolerance (:data:`TOLERANCE`). A provider that is wrong or raises is reported and not
   timed. For ``torch.compile`` this first call compiles: its duration is the reported compile time;
2. in ``fwdbwd``, the bytes each provider saves for backward are measured (:mod:`.memory`);
3. the floor (``x.clone()``) and the providers that passed are timed alternately
   (:func:`.timing.alternate`): warm-up rotations, then the repetitions; the median is reported.

All the providers share the input tensors (and the gradient leaves); each has its own copy of
BatchNorm's running statistics, which training updates in place.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import backends as _backends
from .matrix import Cell, make_inputs
from .memory import SavedBytes, saved_bytes
from .peers import BASELINE, Provider, select_providers
from .timing import Timed, alternate

__all__ = [
    "PASSES", "TOLERANCE", "FLOOR", "Settings", "Row", "Skipped", "RunResult", "run",
    "moved_bytes",
]

PASSES = ("fwd", "fwdbwd")
FLOOR = "floor"

#: loose check of each provider, per dtype. Torch eager and the provider are both compared with a
#: float64 truth (torch eager on float64 copies of the inputs); an element of the provider may miss it
#: by ``2·|torch - truth| + tol·(max|truth| + |truth|)``: twice torch's own error there (torch's
#: low-precision reductions, such as bfloat16 LayerNorm's bias gradient, are far from exact) plus a
#: part scaled to the tensor's largest magnitude and a relative part. It catches wrong math, not
#: last-bit differences between correct implementations.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-8,
    torch.float32: 2e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}


@dataclass
class Settings:
    passes: Sequence[str] = PASSES
    providers: Sequence[str] | None = None  # None: every available provider; torch is always timed
    reps: int | None = None  # fixed repetitions; None: fill budget_s, within [min_reps, max_reps]
    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 200
    budget_s: float = 2.0
    seed: int = 0
    backend: str | None = None  # normkit backend (normkit.use_backend); None: normkit's choice
    threads: int | None = None  # torch.set_num_threads while running; None: leave as is

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict of the fields."""
        return {
            "passes": list(self.passes), "providers": None if self.providers is None else list(self.providers),
            "reps": self.reps, "warmup": self.warmup, "min_reps": self.min_reps, "max_reps": self.max_reps,
            "budget_s": self.budget_s, "seed": self.seed, "backend": self.backend, "threads": self.threads,
        }


def moved_bytes(cell: Cell, pass_: str, inputs: dict[str, Tensor]) -> int:
    """The minimal memory traffic of one call, in bytes (see docs/benchmarks.md).

    Forward: read every argument once (activations, parameters, running statistics), write every
    output once, and write the running statistics back when training updates them. Backward adds:
    read ``x`` (for a fused add: the sum ``h``), read each output's gradient, write the input
    gradient once (the residual's gradient is the same tensor), read the weight, write the weight's
    and the bias's gradients.
    """
    spec = cell.spec

    def nbytes(name: str) -> int:
        t = inputs.get(name)
        return 0 if t is None else t.numel() * t.element_size()

    act = nbytes("x")
    fwd = sum(nbytes(a) for a in spec.args) + spec.outputs * act
    if spec.running_stats == "update":
        fwd += nbytes("running_mean") + nbytes("running_var")
    if pass_ == "fwd":
        return fwd
    bwd = act + spec.outputs * act + act + 2 * nbytes("weight") + nbytes("bias")
    if spec.running_stats == "read":
        bwd += nbytes("running_var")
    return fwd + bwd


@dataclass
class Row:
    """One provider's result for one cell and pass."""

    cell: Cell
    pass_: str
    provider: str
    status: str  # "ok", "wrong" (failed the check against torch eager: not timed), "error" (raised)
    median_s: float = math.nan
    reps: int = 0
    bytes: int = 0
    floor_s: float = math.nan
    torch_s: float = math.nan
    compile_s: float | None = None
    check: float | None = None  # worst |provider - torch| / allowed (passes when <= 1)
    saved: SavedBytes | None = None
    torch_saved: SavedBytes | None = None
    backend: str | None = None  # normkit's backend that ran the cell (normkit rows only)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def gbps(self) -> float:
        """Achieved bandwidth: :func:`moved_bytes` / median time, in GB/s (1e9 bytes)."""
        return self.bytes / self.median_s / 1e9 if self.median_s > 0 else math.nan

    @property
    def speedup(self) -> float:
        """torch eager's median time / this provider's: > 1 is faster than torch."""
        return self.torch_s / self.median_s if self.median_s > 0 else math.nan

    @property
    def floor_frac(self) -> float:
        """floor (x.clone()) median time / this provider's: 1 would be as fast as one copy of x."""
        return self.floor_s / self.median_s if self.median_s > 0 else math.nan

    @property
    def bw_frac(self) -> float:
        """This provider's GB/s over the clone's (2·bytes(x) per floor time): how close to copy speed."""
        x_bytes = self.cell_x_bytes
        if not (self.median_s > 0 and self.floor_s > 0 and x_bytes):
            return math.nan
        return (self.bytes / self.median_s) / (2 * x_bytes / self.floor_s)

    @property
    def cell_x_bytes(self) -> int:
        n = 1
        for s in self.cell.shape:
            n *= s
        return n * self.cell.torch_dtype.itemsize

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict of the fields."""
        def num(v: float | None, digits: int = 4) -> float | None:
            """``v`` to ``digits`` significant digits; None for NaN/inf (JSON has neither)."""
            return None if v is None or math.isnan(v) or math.isinf(v) else float(f"{v:.{digits}g}")

        return {
            "cell": self.cell.id, "op": self.cell.op, "shape": self.cell.shape_str, "dtype": self.cell.dtype,
            "layout": self.cell.layout, "pass": self.pass_, "provider": self.provider, "status": self.status,
            "median_ms": num(self.median_s * 1e3, 5), "reps": self.reps, "bytes": self.bytes,
            "gbps": num(self.gbps), "speedup_vs_torch": num(self.speedup),
            "floor_ms": num(self.floor_s * 1e3, 5), "floor_frac": num(self.floor_frac),
            "bw_frac": num(self.bw_frac), "torch_ms": num(self.torch_s * 1e3, 5),
            "compile_s": num(self.compile_s), "check": num(self.check, 3),
            "saved_bytes": None if self.saved is None else self.saved.total,
            "saved_new_bytes": None if self.saved is None else self.saved.new,
            "torch_saved_bytes": None if self.torch_saved is None else self.torch_saved.total,
            "saved_vs_torch": (
                num(self.saved.total / self.torch_saved.total)
                if self.saved is not None and self.torch_saved is not None and self.torch_saved.total else None
            ),
            "backend": self.backend, "note": self.note,
        }


@dataclass
class Skipped:
    cell: Cell
    reason: str


@dataclass
class RunResult:
    rows: list[Row] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # about providers (unavailable, not installed)
    providers: list[str] = field(default_factory=list)  # the providers that took part
    backends: list[str] = field(default_factory=list)  # normkit backends that actually ran
    threads: int = 0
    seconds: float = 0.0


def _worst_ratio(got: Tensor, base: Tensor, truth: Tensor, tol: float) -> float:
    """max |got - truth| / (2·|base - truth| + tol·(max|truth| + |truth|)); NaN if any input has one."""
    t_abs = truth.abs()
    allowed = (base - truth).abs_().mul_(2).add_(t_abs, alpha=tol).add_(tol * float(t_abs.max()))
    return float((got - truth).abs_().div_(allowed.clamp_min_(1e-30)).max())


def _compare(got: Sequence[Tensor | None], base: Sequence[Tensor | None], truth: Sequence[Tensor | None],
             dtype: torch.dtype, labels: Sequence[str]) -> tuple[float, str]:
    """Worst |got - truth| / allowed over all tensors (> 1 fails; see :data:`TOLERANCE`), and a note."""
    tol = TOLERANCE.get(dtype, 1e-3)
    if len(got) != len(truth):
        return math.inf, f"returned {len(got)} tensors (with gradients), expected {len(truth)}"
    worst, note = 0.0, ""
    for what, g, b, t in zip(labels, got, base, truth, strict=True):
        if g is None or t is None:
            if (g is None) != (t is None):
                return math.inf, f"{what}: gradient missing"
            continue
        if tuple(g.shape) != tuple(t.shape):
            return math.inf, f"{what}: shape {tuple(g.shape)}, torch's {tuple(t.shape)}"
        if b is not None and g.dtype != b.dtype:
            return math.inf, f"{what}: dtype {g.dtype}, torch's {b.dtype}"
        # float32 arithmetic is exact enough for a tolerance of 2e-4 and several times faster
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        gd, td = g.detach().to(cd), t.detach().to(cd)
        bd = b.detach().to(cd) if b is not None else td
        if td.numel() == 0:
            continue
        ratio = _worst_ratio(gd, bd, td, tol)
        if math.isnan(ratio):  # a NaN somewhere: fine where the truth has one too
            if not torch.equal(gd.isnan(), td.isnan()):
                return math.inf, f"{what}: NaN where torch has none (or the reverse)"
            keep = ~td.isnan()
            ratio = _worst_ratio(gd[keep], bd[keep], td[keep], tol) if bool(keep.any()) else 0.0
        if ratio > worst:
            worst = ratio
            if ratio > 1:
                note = (f"{what}: max |diff| {float((gd - td).abs().nan_to_num(0.0).max()):.3g} from the "
                        f"float64 truth (torch eager's: {float((bd - td).abs().nan_to_num(0.0).max()):.3g})")
    return worst, note


@dataclass
class _Call:
    provider: Provider
    fn: Callable[..., tuple]
    args: tuple[Tensor | None, ...]


def _args_for(spec_args: Sequence[str], tensors: dict[str, Tensor], own_stats: bool) -> tuple[Tensor, ...]:
    out = []
    for name in spec_args:
        t = tensors[name]
        if own_stats and name.startswith("running_"):
            t = t.clone()
        out.append(t)
    return tuple(out)


def _outputs_and_grads(fn: Callable[..., tuple], args: Sequence[Tensor | None], leaves: Sequence[Tensor],
                       grads: Sequence[Tensor], bwd: bool) -> tuple[Tensor | None, ...]:
    if not bwd:
        with torch.no_grad():
            return tuple(t.detach() for t in fn(*args))
    for leaf in leaves:
        leaf.grad = None
    outs = fn(*args)
    torch.autograd.backward(outs, grads)
    return tuple(t.detach() for t in outs) + tuple(leaf.grad for leaf in leaves)


def _truth(cell: Cell, pass_: str, inputs: dict[str, Tensor]) -> tuple[Tensor | None, ...]:
    """Torch eager on float64 copies of the inputs: what the check measures every provider against."""
    spec = cell.spec
    bwd = pass_ == "fwdbwd"
    wide = {k: v.detach().to(torch.float64, copy=True) for k, v in inputs.items()}  # copies: BN updates stats
    leaves = [wide[name].requires_grad_() for name in spec.grad_args] if bwd else []
    grads = [wide[f"grad:{i}"] for i in range(spec.outputs)]
    return _outputs_and_grads(spec.eager, [wide[a] for a in spec.args], leaves, grads, bwd)


def _run_pass(cell: Cell, pass_: str, providers: Sequence[Provider], inputs: dict[str, Tensor],
              settings: Settings, backend_name: str | None) -> list[Row]:
    spec = cell.spec
    bwd = pass_ == "fwdbwd"
    x = inputs["x"]
    total_bytes = moved_bytes(cell, pass_, inputs)
    tensors = dict(inputs)
    leaves: list[Tensor] = []
    if bwd:
        for name in spec.grad_args:
            tensors[name] = inputs[name].detach().requires_grad_()
            leaves.append(tensors[name])
    grads = tuple(inputs[f"grad:{i}"] for i in range(spec.outputs))
    labels = [("output" if spec.outputs == 1 else ("y", "x + residual")[i]) for i in range(spec.outputs)]
    labels += [f"grad of {name}" for name in spec.grad_args] if bwd else []

    def reset() -> None:
        for leaf in leaves:
            leaf.grad = None

    def once(call: _Call) -> tuple[Tensor | None, ...]:
        """One call, returning what the check compares: the outputs, and in fwdbwd the gradients."""
        got = _outputs_and_grads(call.fn, call.args, leaves, grads, bwd)
        reset()
        return got

    rows: list[Row] = []
    calls: dict[str, _Call] = {}
    for p in providers:
        if pass_ not in p.passes:
            continue
        row = Row(cell, pass_, p.name, "ok", bytes=total_bytes,
                  backend=backend_name if p.kind == "normkit" else None)
        try:
            fn = p.build(spec)
        except Exception as e:
            row.status, row.note = "error", f"build: {type(e).__name__}: {e}"
            rows.append(row)
            continue
        if fn is None:  # the provider does not implement this op
            continue
        calls[p.name] = _Call(p, fn, _args_for(spec.args, tensors, own_stats=spec.running_stats == "update"))
        rows.append(row)

    by_name = {r.provider: r for r in rows}
    with _one_thread():
        truth = _truth(cell, pass_, inputs) if len(calls) > 1 else None
    base: tuple[Tensor | None, ...] | None = None
    got: tuple[Tensor | None, ...] | None = None
    for name, call in list(calls.items()):
        row = by_name[name]
        start = time.perf_counter()
        try:
            got = once(call)
        except Exception as e:
            row.status, row.note = "error", f"{type(e).__name__}: {e}".splitlines()[0][:300]
            del calls[name]
            continue
        first_s = time.perf_counter() - start
        if call.provider.compiles:
            row.compile_s = first_s
        if name == BASELINE:
            base = got
            continue
        if truth is None:
            continue
        with _one_thread():
            row.check, note = _compare(got, base or (None,) * len(truth), truth, x.dtype, labels)
        if not row.check <= 1:
            row.status, row.note = "wrong", note or "differs from torch eager"
            del calls[name]
    del truth, base, got  # free them before timing

    if bwd:
        for name, call in calls.items():
            try:
                by_name[name].saved = saved_bytes(call.fn, call.args)
            except Exception as e:  # pragma: no cover - the check call above ran the same forward
                by_name[name].note += f" saved bytes: {type(e).__name__}: {e}"
        reset()
        torch_saved = by_name[BASELINE].saved if BASELINE in by_name else None
        for row in rows:
            row.torch_saved = torch_saved

    def timed(call: _Call) -> Timed:
        if bwd:
            def run_fwdbwd() -> None:
                torch.autograd.backward(call.fn(*call.args), grads)

            return Timed(run_fwdbwd, reset)
        return Timed(lambda: call.fn(*call.args))

    timers = {FLOOR: Timed(x.clone)}
    timers.update({name: timed(call) for name, call in calls.items()})
    with torch.set_grad_enabled(bwd):
        timings = alternate(timers, reps=settings.reps, warmup=settings.warmup, min_reps=settings.min_reps,
                            max_reps=settings.max_reps, budget_s=settings.budget_s)
    reset()
    floor_s, torch_s = timings.median(FLOOR), timings.median(BASELINE)
    for row in rows:
        row.floor_s, row.torch_s = floor_s, torch_s
        if row.provider in timings.errors:
            e = timings.errors[row.provider]
            row.status, row.note = "error", f"while timing: {type(e).__name__}: {e}".splitlines()[0][:300]
        elif row.provider in calls:
            row.median_s, row.reps = timings.median(row.provider), len(timings.times[row.provider])
    return rows


def run(
    cells: Sequence[Cell],
    settings: Settings | None = None,
    *,
    providers: Sequence[Provider] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> RunResult:
    """Benchmark ``cells``; ``progress(description, advance)`` is told as each (cell, pass) starts (0) and ends (1).

    ``providers`` (default: every registered one, filtered by ``settings.providers``) is where tests
    inject their own.
    """
    settings = settings or Settings()
    chosen, notes = select_providers(settings.providers, providers)
    result = RunResult(notes=notes, providers=[p.name for p in chosen])
    if BASELINE not in result.providers:
        raise ValueError("torch eager (the baseline) is not among the providers")
    old_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    result.threads = torch.get_num_threads()
    start = time.perf_counter()
    backends_seen: dict[str, None] = {}
    try:
        for cell in cells:
            needs_normkit = any(p.kind == "normkit" for p in chosen)
            if needs_normkit and next(p for p in chosen if p.kind == "normkit").build(cell.spec) is None:
                result.skipped.append(Skipped(cell, f"normkit.functional has no {cell.spec.function} (yet)"))
                if progress:
                    progress(cell.id, len(settings.passes))
                continue
            inputs = make_inputs(cell, settings.seed)
            backend_name = None
            if needs_normkit:
                backend_name = _backend_for(inputs["x"], settings.backend)
                backends_seen[backend_name] = None
            for pass_ in settings.passes:
                if progress:
                    progress(f"{cell.id} {pass_}", 0)
                with _selected_backend(settings.backend):
                    result.rows.extend(_run_pass(cell, pass_, chosen, inputs, settings, backend_name))
                if progress:
                    progress(f"{cell.id} {pass_}", 1)
            del inputs  # freed by reference counting (a full gc.collect() costs ~0.2 s per call here)
    finally:
        torch.set_num_threads(old_threads)
    result.backends = list(backends_seen)
    result.seconds = time.perf_counter() - start
    return result


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the check's own arithmetic (the float64 truth, the comparison) on one thread.

    Those are many short elementwise ops: on a loaded machine a parallel region waits for its slowest
    thread, which costs milliseconds each, and on an idle one a second thread gains little.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _backend_for(x: Tensor, name: str | None) -> str:
    """The name of the normkit backend that runs ``x`` (the selected one, or the one it hands over to)."""
    with _selected_backend(name):
        try:
            return _backends.resolve(x).name
        except Exception:  # a registry without resolve(): at least the selected name
            return _backends.current_backend_name()


def _selected_backend(name: str | None) -> contextlib.AbstractContextManager[object]:
    return _backends.use_backend(name) if name else contextlib.nullcontext()
