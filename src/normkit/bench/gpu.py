"""GPU benchmark: normkit's triton backend against torch eager, ``torch.compile`` and Liger-Kernel.

``python -m normkit.bench.gpu [--out DIR] [--tiny] [--providers ...] [--time-limit S]``

For each cell (op, shape, dtype, layout) and pass (``fwd``; ``fwdbwd``: forward, then the backward of
``sum(out_i * grad_i)`` for fixed random ``grad_i``):

1. every provider is checked first, on the inputs it is timed on, against a truth (torch eager on float64
   copies; float32 above 64M elements) under :mod:`normkit.bench.runner`'s per-dtype bound; a provider
   that fails or raises is reported, not timed;
2. then each provider is timed with L2-cold repetitions: before every repetition a 256 MiB buffer is
   written (evicting the inputs from the 50 MB L2) and the stream is held busy for about 1 ms (so that
   the host's launch time is hidden: ``--with-launch`` counts it), and CUDA events time the call alone;
   the median over the repetitions is reported;
3. GB/s is :func:`normkit.bench.runner.moved_bytes` (the minimal traffic of the op) over that time, and
   "of copy" divides it by the device-to-device copy bandwidth measured in the same run
   (``dst.copy_(src)`` of 1 GiB, the same L2-cold timing, counting a read and a write).

Writes ``gpu.csv`` and ``gpu.md`` (a markdown table headed by the card's name and the versions) into
``--out``. ``--tiny`` runs the same code on tiny shapes; on a machine without a GPU it runs on CPU
tensors through Triton's interpreter (``TRITON_INTERPRET=1`` must be set before the run starts), which
is how it is tested. Cells not started within ``--time-limit`` seconds are listed as skipped.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .matrix import Cell, make_inputs
from .ops import RMS_EPS
from .runner import _compare, moved_bytes

__all__ = ["FULL_CELLS", "TINY_CELLS", "GpuRow", "main", "run"]

_ROW_OPS = ("layer_norm", "rms_norm", "fused_add_rms_norm")
_ROW_SHAPES_BF16 = ((32768, 1024), (32768, 4096), (32768, 8192), (32768, 16384), (8192, 65536), (2048, 262144))

#: the issue's matrix: row ops in bfloat16 at 1K-256K columns (each tensor at most 1 GiB) and in float32 at
#: 32768x4096; GroupNorm(32)+SiLU on channels_last and NCHW; BatchNorm training on channels_last. In the
#: order they run: one cell of every op first, so that a run cut short by --time-limit still covers each
FULL_CELLS: tuple[Cell, ...] = (
    *(Cell(op, (32768, 4096), "bfloat16") for op in _ROW_OPS),
    Cell("group_norm_silu", (8, 512, 64, 64), "bfloat16", "channels_last"),
    Cell("group_norm_silu", (8, 512, 64, 64), "bfloat16", "contiguous"),
    Cell("batch_norm_train", (256, 64, 56, 56), "bfloat16", "channels_last"),
    *(Cell(op, (32768, 4096), "float32") for op in _ROW_OPS),
    *(Cell(op, shape, "bfloat16") for shape in _ROW_SHAPES_BF16 if shape != (32768, 4096) for op in _ROW_OPS),
)

#: the same ops at sizes Triton's interpreter runs in seconds
TINY_CELLS: tuple[Cell, ...] = (
    Cell("layer_norm", (16, 96), "bfloat16"),
    Cell("rms_norm", (16, 96), "float32"),
    Cell("fused_add_rms_norm", (8, 64), "bfloat16"),
    Cell("group_norm_silu", (2, 64, 4, 4), "bfloat16", "channels_last"),
    Cell("batch_norm_train", (4, 8, 3, 3), "bfloat16", "channels_last"),
)

PASSES = ("fwd", "fwdbwd")
PROVIDERS = ("normkit", "torch", "compile", "liger")
_WIDE_TRUTH_ELEMENTS = 2**26
_L2_FLUSH_BYTES = 256 * 2**20
#: GPU clock cycles the stream is held before each timed call: about 1 ms at 2 GHz, longer than any
#: provider's Python launch path measured (see Timer)
_HOLD_CYCLES = 2_000_000


# --------------------------------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------------------------------


def _liger_calls() -> dict[str, Callable[..., object]]:
    """Liger-Kernel's functions for the ops it has (its own argument order), or {} when not installed."""
    try:
        from liger_kernel.transformers import functional as lf
    except Exception:  # not installed, or a broken install
        return {}
    calls: dict[str, Callable[..., object]] = {}
    if hasattr(lf, "liger_rms_norm"):
        # "gemma" casting: everything in float32, then one rounding (normkit's and the formula's numerics);
        # not in place, since the upstream gradient is reused across repetitions
        calls["rms_norm"] = lambda x, w: lf.liger_rms_norm(x, w, RMS_EPS, 0.0, "gemma", False)
    if hasattr(lf, "liger_layer_norm"):
        calls["layer_norm"] = lambda x, w, b: lf.liger_layer_norm(x, w, b, 1e-5)
    if hasattr(lf, "liger_fused_add_rms_norm"):
        # returns (normalized, x + residual), normkit's order
        calls["fused_add_rms_norm"] = lambda x, r, w: lf.liger_fused_add_rms_norm(x, r, w, RMS_EPS, 0.0, "gemma",
                                                                                   False)
    return calls


def build_call(provider: str, cell: Cell, device: str, compile_backend: str) -> Callable[..., tuple] | None:
    """The provider's call for the cell's op (positional tensors as :attr:`OpSpec.args`), or None."""
    spec = cell.spec
    if provider == "normkit":
        import normkit.functional as NF

        return spec.normkit(getattr(NF, spec.function))
    if provider == "torch":
        return spec.eager
    if provider == "compile":
        torch._dynamo.reset()
        compiled = torch.compile(spec.formula, dynamic=False, backend=compile_backend)
        return lambda *args: _as_tuple(compiled(*args))
    if provider == "liger":
        fn = _liger_calls().get(cell.op) if device == "cuda" else None
        return None if fn is None else (lambda *args: _as_tuple(fn(*args)))
    raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")


def _as_tuple(out: Tensor | tuple) -> tuple:
    return out if isinstance(out, tuple) else (out,)


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


class Timer:
    """L2-cold timing: before each repetition a large buffer is written, then the call alone is timed
    (CUDA events on a GPU; on the CPU, where this only runs for --tiny, the wall clock).

    On a GPU the stream is then held busy for about a millisecond (``torch.cuda._sleep``) before the start
    event, so that the call's kernels are all queued by the time the GPU reaches it: the events time the
    kernels, not the host's launch overhead (in the first H200 run, without the hold, a call whose Python
    took longer than the work queued before it counted that time too). ``hold_launch=False`` times the
    call as a caller sees it, launch gaps included."""

    def __init__(self, device: str, reps: int, warmup: int, hold_launch: bool = True) -> None:
        self.device, self.reps, self.warmup = device, reps, warmup
        self.cuda = device == "cuda"
        self.hold_cycles = _HOLD_CYCLES if hold_launch and self.cuda else 0
        self.flush = torch.empty(_L2_FLUSH_BYTES // 4 if self.cuda else 1, dtype=torch.float32, device=device)

    def median_ms(self, fn: Callable[[], object], prepare: Callable[[], object] | None = None) -> float:
        for _ in range(self.warmup):
            if prepare:
                prepare()
            fn()
        times = []
        for _ in range(self.reps):
            if prepare:
                prepare()
            self.flush.zero_()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if self.hold_cycles:
                    torch.cuda._sleep(self.hold_cycles)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Device-to-device copy bandwidth in GB/s: ``dst.copy_(src)`` of ``nbytes``, read plus write."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=timer.device).normal_()
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


@dataclass
class GpuRow:
    cell: Cell
    pass_: str
    provider: str
    status: str  # ok | wrong | error | skipped
    ms: float = math.nan
    gbps: float = math.nan
    of_copy: float = math.nan
    vs_torch: float = math.nan
    check: float | None = None
    note: str = ""


@dataclass
class GpuResult:
    rows: list[GpuRow] = field(default_factory=list)
    copy_gbps: float = math.nan
    device_name: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _outputs_and_grads(fn, tensors: dict[str, Tensor], cell: Cell, bwd: bool) -> tuple:
    spec = cell.spec
    args = [tensors[a].clone() if a.startswith("running_") else tensors[a] for a in spec.args]
    if not bwd:
        with torch.no_grad():
            return tuple(t.detach() for t in fn(*args))
    leaves = {}
    for i, a in enumerate(spec.args):
        if a in spec.grad_args:
            args[i] = leaves[a] = args[i].detach().requires_grad_()
    outs = fn(*args)
    torch.autograd.backward(outs, [tensors[f"grad:{i}"] for i in range(len(outs))])
    return tuple(o.detach() for o in outs) + tuple(leaves[a].grad for a in spec.grad_args)


def _check(call, cell: Cell, pass_: str, inputs: dict[str, Tensor]) -> tuple[float, str]:
    """Worst error / allowed of the provider against the truth (> 1: wrong), and a note.

    On the inputs that are timed (a check on fewer rows would make torch.compile compile twice). The
    truth is torch eager in float64, or in float32 above :data:`_WIDE_TRUTH_ELEMENTS` elements (a
    float64 copy of a 1 GiB bfloat16 tensor is 4 GiB), which is still far more exact than the
    per-dtype tolerance of 16-bit data and of float32 (2e-4 relative)."""
    bwd = pass_ == "fwdbwd"
    wide_dtype = torch.float64 if inputs["x"].numel() <= _WIDE_TRUTH_ELEMENTS else torch.float32
    wide = {k: v.detach().to(wide_dtype) for k, v in inputs.items()}
    truth = _outputs_and_grads(cell.spec.eager, wide, cell, bwd)
    del wide
    base = _outputs_and_grads(cell.spec.eager, inputs, cell, bwd)
    got = _outputs_and_grads(call, inputs, cell, bwd)
    labels = [f"output {i}" for i in range(cell.spec.outputs)] + [f"grad of {a}" for a in cell.spec.grad_args]
    return _compare(got, base, truth, cell.torch_dtype, labels[: len(truth)])


def _time_call(timer: Timer, call, cell: Cell, pass_: str, inputs: dict[str, Tensor]) -> float:
    spec = cell.spec
    args = [inputs[a].clone() if a.startswith("running_") else inputs[a] for a in spec.args]
    grads = [inputs[f"grad:{i}"] for i in range(spec.outputs)]
    if pass_ == "fwd":
        with torch.no_grad():
            return timer.median_ms(lambda: call(*args))
    leaves = []
    for i, a in enumerate(spec.args):
        if a in spec.grad_args:
            args[i] = args[i].detach().requires_grad_()
            leaves.append(args[i])

    def reset() -> None:
        for leaf in leaves:
            leaf.grad = None

    return timer.median_ms(lambda: torch.autograd.backward(call(*args), grads), prepare=reset)


def run(
    cells: Sequence[Cell], device: str, providers: Sequence[str] = PROVIDERS, reps: int = 20, warmup: int = 3,
    time_limit_s: float = 330.0, copy_bytes: int = 2**30, compile_backend: str | None = None,
    hold_launch: bool = True,
    progress: Callable[[str], None] | None = None, on_cell: Callable[[GpuResult], None] | None = None,
) -> GpuResult:
    """Check, then time, every provider on every cell and pass (see the module docstring); ``on_cell``
    gets the result so far after each cell (the CLI writes its files then, so a killed run keeps them)."""
    import normkit

    start = time.perf_counter()
    compile_backend = compile_backend or ("inductor" if device == "cuda" else "aot_eager")
    result = GpuResult(device_name=_device_name(device))
    timer = Timer(device, reps, warmup, hold_launch)
    result.copy_gbps = copy_bandwidth(timer, copy_bytes)
    if "liger" in providers and not _liger_calls():
        result.notes.append("Liger-Kernel not installed (pip install liger-kernel): not timed")
    if device != "cuda":
        result.notes.append(f"no GPU: CPU tensors through Triton's interpreter; torch.compile with {compile_backend}")
    with normkit.use_backend("triton"):
        for cell in cells:
            if time.perf_counter() - start > time_limit_s:
                result.rows += [GpuRow(cell, p, "-", "skipped", note="time limit") for p in PASSES]
                continue
            inputs = make_inputs(cell, 0, device)
            for pass_ in PASSES:
                if progress:
                    progress(f"{cell.id} {pass_}")
                result.rows += _run_pass(cell, pass_, inputs, device, providers, timer, compile_backend,
                                         result.copy_gbps)
            del inputs
            if on_cell:
                result.seconds = time.perf_counter() - start
                on_cell(result)
    result.seconds = time.perf_counter() - start
    return result


def _run_pass(cell, pass_, inputs, device, providers, timer, compile_backend, copy_gbps) -> list[GpuRow]:
    rows = []
    nbytes = moved_bytes(cell, pass_, inputs)
    for provider in providers:
        row = GpuRow(cell, pass_, provider, "ok")
        try:
            call = build_call(provider, cell, device, compile_backend)
            if call is None:
                continue
            row.check, note = _check(call, cell, pass_, inputs)
            if not row.check <= 1:
                row.status, row.note = "wrong", note or "differs from the float64 truth"
            else:
                row.ms = _time_call(timer, call, cell, pass_, inputs)
                row.gbps = nbytes / (row.ms * 1e-3) / 1e9
        except Exception as e:  # one provider failing must not stop the run
            row.status, row.note = "error", f"{type(e).__name__}: {e}".splitlines()[0][:200]
        rows.append(row)
    torch_ms = next((r.ms for r in rows if r.provider == "torch"), math.nan)
    for r in rows:
        r.vs_torch = torch_ms / r.ms if r.ms > 0 else math.nan
        r.of_copy = r.gbps / copy_gbps
    return rows


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    from .machine import cpu_model

    return f"CPU ({cpu_model()}), Triton interpreter"


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------

_COLUMNS = ["op", "shape", "dtype", "layout", "pass", "provider", "status", "ms", "GB/s", "of copy",
            "vs torch eager", "check", "note"]


def _fields(r: GpuRow) -> list[str]:
    def num(v: float | None, fmt: str) -> str:
        return "" if v is None or math.isnan(v) else format(v, fmt)

    return [r.cell.op, r.cell.shape_str, r.cell.dtype, r.cell.layout, r.pass_, r.provider, r.status,
            num(r.ms, ".4g"), num(r.gbps, ".4g"), num(r.of_copy, ".2f"), num(r.vs_torch, ".2f"),
            num(r.check, ".2g"), r.note]


def _versions() -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    return ", ".join(parts)


def write(result: GpuResult, out_dir: Path) -> tuple[Path, Path]:
    """Write gpu.csv and gpu.md into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "gpu.csv", out_dir / "gpu.md"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "copy_gbps", *_COLUMNS])
        for r in result.rows:
            w.writerow([result.device_name, f"{result.copy_gbps:.4g}", *_fields(r)])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# normkit GPU benchmark: {result.device_name}",
        "",
        f"{date}; {_versions()}; device-to-device copy {result.copy_gbps:.4g} GB/s (read + write).",
        "Times are medians of L2-cold repetitions; GB/s counts the op's minimal traffic; \"of copy\" is that "
        "over the copy bandwidth; \"check\" is the worst error against a float64 truth over what is allowed "
        f"(passes at or below 1). Run took {result.seconds:.0f} s.",
        *(f"- {n}" for n in result.notes),
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
        *("| " + " | ".join(_fields(r)) + " |" for r in result.rows),
        "",
    ]
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normkit.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: bench-results/gpu-<date>)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU + TRITON_INTERPRET=1 without a GPU)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="run only the cells whose id (e.g. 'rms_norm 32768x4096 bf16') contains one of these")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20; --tiny 2)")
    parser.add_argument("--time-limit", type=float, default=330.0, metavar="S",
                        help="start no new cell after S seconds (default 330)")
    parser.add_argument("--with-launch", action="store_true",
                        help="time each call with its host launch gaps (default: the stream is held so that "
                             "only the kernels are timed)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default: inductor on a GPU, aot_eager on the CPU)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.tiny:
            parser.error("no CUDA device: only --tiny runs here (with TRITON_INTERPRET=1)")
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("without a GPU the kernels run in Triton's interpreter: set TRITON_INTERPRET=1")
    cells = TINY_CELLS if args.tiny else FULL_CELLS
    if args.only:
        cells = tuple(c for c in cells if any(text in c.id for text in args.only))
        if not cells:
            parser.error(f"no cell id contains any of {args.only}")
    reps = args.reps or (2 if args.tiny else 20)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out or f"bench-results/gpu-{stamp}")
    result = run(
        cells, device, args.providers, reps=reps, warmup=1 if args.tiny else 3, time_limit_s=args.time_limit,
        copy_bytes=2**20 if args.tiny else 2**30, compile_backend=args.compile_backend,
        hold_launch=not args.with_launch,
        progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True),
        on_cell=lambda partial: write(partial, out_dir),
    )
    csv_path, md_path = write(result, out_dir)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    failed = [r for r in result.rows if r.status in ("wrong", "error") and r.provider == "normkit"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
