"""The ``normkit`` command line: ``verify`` (the conformance matrix), ``bench``, ``train``, ``experiment``, ``env``.

``normkit verify`` runs :mod:`normkit.verify`'s matrix, shows a progress bar on stderr (when it is a
terminal), a table of results grouped by module × dtype × backend × device, every failing case in
detail, and a one-line summary; it exits with status 1 when any check fails, 0 otherwise (2 for
usage errors). ``normkit bench`` times normkit against torch eager, torch.compile and peer libraries
(:mod:`normkit.bench`; docs/benchmarks.md). ``normkit train`` and ``normkit experiment batch-size`` run
on Ray Train (:mod:`normkit.train`; docs/training.md); they import Ray only when they run, and exit with
status 2 and an install hint without it. ``python -m normkit`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from . import backends as _backends
from . import verify as _verify

if TYPE_CHECKING:
    from .bench import runner as _bench_runner

__all__ = ["build_parser", "main"]

_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float64": "float64", "fp64": "float64", "double": "float64",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def _dtype_arg(value: str) -> str:
    try:
        return _DTYPE_ALIASES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {value!r} (choose from {', '.join(_verify.DTYPES)})"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``normkit`` command's argument parser, with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="normkit",
        description="normkit: drop-in normalization layers for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"normkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    v = sub.add_parser(
        "verify",
        help="check every normkit module against torch.nn on a float64 truth",
        description=(
            "Run the conformance matrix: each normkit.nn module against its torch.nn counterpart "
            "(forward, backward, running statistics), both compared with a float64 truth under "
            "normkit.testing's per-dtype tolerances. Exit status 1 if any check fails."
        ),
    )
    v.add_argument("--full", action="store_true",
                   help="the exhaustive sweep (more shapes and variants; takes minutes)")
    v.add_argument("--backend", action="append", metavar="NAME",
                   help="backend to verify (repeatable; default: every available backend)")
    v.add_argument("--device", action="append", choices=["cpu", "cuda"],
                   help="device to run on (repeatable; default: cpu, and cuda when available)")
    v.add_argument("--dtype", action="append", type=_dtype_arg, metavar="DTYPE",
                   help="only this input dtype: float32, float64, bfloat16, float16 (repeatable)")
    v.add_argument("--module", action="append", metavar="NAME",
                   help=f"only this module kind (repeatable): {', '.join(_verify.MODULES)}")
    v.add_argument("--json", metavar="PATH", help="write every case's results as JSON to PATH")
    v.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads while verifying (default 1: the cases are small; 0: torch's default)")
    v.add_argument("--list", action="store_true", help="list the cases and exit without running")
    v.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar or table: only failures and the summary line")
    v.set_defaults(func=_cmd_verify)

    _add_bench_parser(sub)
    _add_train_parsers(sub)

    e = sub.add_parser("env", help="versions, devices, backends and optional packages (for bug reports)")
    e.set_defaults(func=_cmd_env)

    x = sub.add_parser(
        "explain",
        help="which elements share statistics in a norm: a summary and a picture",
        description="Print a norm's paper, formula and the axes its statistics are over; with --out, draw "
        "the N x C x (H*W) cube with the elements that share one statistic highlighted.",
    )
    x.add_argument("norm", help="a norm (batch_norm, layer_norm, instance_norm, group_norm, rms_norm, "
                   "sync_batch_norm, group_norm_silu, ...) or 'all'")
    x.add_argument("--out", metavar="PATH", help="write the picture (PNG); with 'all', a directory")
    x.set_defaults(func=_cmd_explain)
    return parser


def _cmd_explain(args: argparse.Namespace) -> int:
    from .explain import main_explain

    return main_explain(args.norm, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``normkit`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args)


# --------------------------------------------------------------------------------------------------
# normkit env
# --------------------------------------------------------------------------------------------------


def _devices_in_use() -> list[str]:
    """The device types this machine can run tensors on (for what ``auto`` picks on each)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _devices_description() -> list[str]:
    lines = ["cpu" + (f" ({torch.get_num_threads()} threads)")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i} ({torch.cuda.get_device_name(i)})")
    else:
        lines.append("cuda: not available" + ("" if torch.version.cuda else " (CPU-only torch build)"))
    return lines


#: packages that optional features use (extras ray, docs, bench; conversion targets; triton has its own row)
_OPTIONAL = ("ray", "transformers", "timm", "torchvision", "accelerate", "matplotlib", "mkdocs")


def _optional_versions() -> list[str]:
    """``name version`` of each optional package, or ``name -`` when it is not installed (read from
    the installed metadata: nothing is imported)."""
    from importlib import metadata

    out = []
    for name in _OPTIONAL:
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} -")
    return out


def _why_unavailable(name: str) -> str:
    try:
        _backends.get_backend(name)
    except ImportError as e:
        return f"{name} ({e})"
    return name


def _triton_description() -> str:
    """triton's version (the triton backend's dependency) without importing it, and whether the
    interpreter is on."""
    from importlib import metadata

    try:
        version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        return "not installed (pip install triton: the triton backend for CUDA tensors)"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return version + (" (TRITON_INTERPRET=1: kernels run on CPU tensors in the interpreter)" if interpret else "")


def _cmd_env(args: argparse.Namespace) -> int:
    console = _stdout_console()
    available = _backends.available_backends()
    registered = _backends.registered_backends()
    current = _backends.current_backend_name()
    if current == _backends.AUTO:
        picks = ", ".join(
            f"{device} tensors: {_backends.default_backend(device).name}" for device in _devices_in_use()
        )
        current += f" ({picks})"
    elif current not in registered:
        current += " (not registered: normkit's norms will raise ValueError)"
    rows = [
        ("normkit", __version__),
        ("torch", f"{torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")),
        ("triton", _triton_description()),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("devices", ", ".join(_devices_description())),
        ("registered backends", ", ".join(registered)),
        ("available backends", ", ".join(available)),
        ("unavailable backends", ", ".join(_why_unavailable(n) for n in registered if n not in available) or "none"),
        ("current backend", current),
        (_backends.ENV_VAR, os.environ.get(_backends.ENV_VAR, "(not set)")),
        ("optional packages", ", ".join(_optional_versions())),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        console.print(Text(f"{k:<{width}}  {v}"))
    return 0


# --------------------------------------------------------------------------------------------------
# normkit verify
# --------------------------------------------------------------------------------------------------


def _fmt_ratio(r: float) -> str:
    if math.isnan(r):
        return "nan"
    if math.isinf(r):
        return "inf"
    return f"{r:.3g}"


def _results_table(groups: list[_verify.GroupSummary]) -> Table:
    table = Table(
        title="normkit verify", title_justify="left",
        caption=(
            "worst err/allowed: the largest |normkit - float64 truth| / allowed of any checked element "
            "(passes when <= 1), where allowed = atol + rtol*|truth| + 2*|torch - truth|; max error: that "
            "check's largest |normkit - truth|; tolerance: the input dtype's atol/rtol. Low-precision "
            "input runs with float32 parameters unless marked."
        ),
        caption_justify="left",
    )
    table.add_column("module", overflow="fold")
    table.add_column("dtype", overflow="fold")
    table.add_column("backend", overflow="fold")
    table.add_column("device", overflow="fold")
    table.add_column("cases", justify="right", overflow="fold")
    table.add_column("checks", justify="right", overflow="fold")
    table.add_column("tolerance", justify="right", overflow="fold")
    table.add_column("worst err/allowed", justify="right", overflow="fold")
    table.add_column("max error", justify="right", overflow="fold")
    table.add_column("worst quantity", overflow="fold")
    table.add_column("result", overflow="fold")
    for g in groups:
        status = Text("pass", style="green") if g.ok else Text(
            f"FAIL {g.failed_cases}/{g.cases}", style="bold red"
        )
        cells = (g.module, g.dtype, g.backend, g.device, str(g.cases), str(g.checks), g.tolerance,
                 _fmt_ratio(g.worst_ratio), _fmt_ratio(g.worst_error), g.worst_quantity)
        table.add_row(*(Text(c) for c in cells), status)  # Text: no markup in names
    return table


def _print_failures(console: Console, failures: list[_verify.CaseResult]) -> None:
    console.print(Text(f"{len(failures)} failing case(s):", style="bold red"))
    for r in failures:
        console.print(Text(f"FAIL {r.case.id}", style="red"), soft_wrap=True)
        if r.error is not None:
            console.print(Text(f"    exception: {r.error}"), soft_wrap=True)
        for c in r.failed_checks:
            line = (
                f"    {c.quantity}: max error {c.max_error:.3g}, allowed {c.allowed:.3g},"
                f" ratio {_fmt_ratio(c.ratio)} (torch's own error {c.torch_error:.3g})"
            )
            if c.note:
                line += f"; {c.note}"
            console.print(Text(line), soft_wrap=True)


def _write_json(path: str, results: list[_verify.CaseResult], args: argparse.Namespace,
                seconds: float, checks: int, failed_checks: int) -> None:
    doc = {
        "normkit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "full": bool(args.full),
        "seconds": round(seconds, 3),
        "summary": {
            "cases": len(results),
            "checks": checks,
            "failed_cases": sum(not r.ok for r in results),
            "failed_checks": failed_checks,
            "ok": all(r.ok for r in results),
        },
        "groups": [g.to_dict() for g in _verify.summarize(results)],
        "results": [r.to_dict() for r in results],
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.write("\n")


def _stdout_console() -> Console:
    """Rich console on stdout; 160 columns wide when it is not a terminal (pipes, files, tests)."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=160)
    return console


def _cmd_verify(args: argparse.Namespace) -> int:
    console = _stdout_console()
    err_console = Console(stderr=True, highlight=False)

    registered = _backends.registered_backends()
    if args.backend:
        unknown = [b for b in args.backend if b not in registered]
        if unknown:
            err_console.print(Text(
                f"normkit verify: unknown backend {unknown[0]!r}; registered: {', '.join(registered)}"
            ))
            return 2
        backends = list(dict.fromkeys(args.backend))
    else:
        backends = _backends.available_backends()
    devices = list(dict.fromkeys(args.device)) if args.device else _verify.available_devices()
    if "cuda" in devices and not torch.cuda.is_available():
        err_console.print(Text("normkit verify: --device cuda, but torch sees no CUDA device"))
        return 2
    try:
        cases = _verify.build_matrix(
            full=args.full, backends=backends, devices=devices,
            dtypes=list(dict.fromkeys(args.dtype)) if args.dtype else None,
            modules=args.module,
        )
    except ValueError as e:
        err_console.print(Text(f"normkit verify: {e}"))
        return 2
    if not cases:
        err_console.print(Text("normkit verify: no cases match the filters"))
        return 2
    if args.list:
        for c in cases:
            console.print(Text(c.id))
        console.print(Text(f"{len(cases)} cases"))
        return 0

    threads = args.threads if args.threads and args.threads > 0 else None
    start = time.perf_counter()
    show_progress = not args.quiet and err_console.is_terminal
    if show_progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("[progress.description]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(), TimeRemainingColumn(),
        )
        with Progress(*columns, console=err_console, transient=True) as progress:
            task = progress.add_task("verify", total=len(cases), failed=0)
            failed = 0

            def on_result(r: _verify.CaseResult) -> None:
                nonlocal failed
                failed += not r.ok
                progress.update(task, advance=1, failed=failed,
                                description=f"{r.case.module} {r.case.dtype_label} {r.case.backend}")

            results = _verify.run(cases, progress=on_result, threads=threads)
    else:
        results = _verify.run(cases, threads=threads)
    seconds = time.perf_counter() - start

    failures = [r for r in results if not r.ok]
    checks, failed_checks = _verify.count_checks(results)
    if not args.quiet:
        console.print(_results_table(_verify.summarize(results)))
    if failures:
        _print_failures(console, failures)
    handed_over = [r for r in results if r.executed_by is not None and r.executed_by != r.case.backend]
    if handed_over:
        by = sorted({f"{r.case.backend} -> {r.executed_by}" for r in handed_over})
        console.print(Text(
            f"note: {len(handed_over)} case(s) ran on another backend than the one named, because it "
            f"does not support their input ({', '.join(by)})"
        ), soft_wrap=True)
    if args.json:
        _write_json(args.json, results, args, seconds, checks, failed_checks)
    verdict = "all passed" if not failures else f"{failed_checks} failed"
    summary = f"{len(results)} cases, {checks} checks: {verdict}"
    if failures:
        summary += f" (in {len(failures)} cases)"
    console.print(Text(f"{summary} ({seconds:.1f} s)", style="bold " + ("red" if failures else "green")),
                  soft_wrap=True)
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------------
# normkit bench
# --------------------------------------------------------------------------------------------------

#: what --quick changes (besides the small shapes): torch eager vs normkit only, short timing
_QUICK_TIMING = {"warmup": 1, "min_reps": 3, "max_reps": 25, "budget_s": 0.15}
_FULL_TIMING = {"warmup": 2, "min_reps": 5, "max_reps": 200, "budget_s": 2.0}


def _shape_arg(value: str) -> tuple[int, ...]:
    from .bench.matrix import parse_shape

    try:
        return parse_shape(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from .bench.ops import OP_ALIASES, OPS

    b = sub.add_parser(
        "bench",
        help="time normkit against torch eager, torch.compile and peer libraries",
        description=(
            "Time every op of the matrix (LayerNorm, RMSNorm, add+RMSNorm, add+LayerNorm, BatchNorm train "
            "and eval, GroupNorm, InstanceNorm, GroupNorm+SiLU; float32 and bfloat16; contiguous and "
            "channels_last) forward and forward+backward, for normkit and its peers, called alternately in "
            "one process; each provider is first checked against a float64 truth. Prints a table and writes "
            "bench.csv, bench.json and bench.png into --out. See docs/benchmarks.md. Exit status 1 if "
            "normkit fails a check."
        ),
    )
    b.add_argument("--quick", action="store_true",
                   help="small shapes, torch eager vs normkit only, short timing (under a minute on 2 cores)")
    b.add_argument("--op", action="append", metavar="NAME",
                   help=f"only this op (repeatable): {', '.join(OPS)}; or an alias: {', '.join(OP_ALIASES)}")
    b.add_argument("--dtype", action="append", type=_dtype_arg, metavar="DTYPE",
                   help="input dtype (repeatable; default: float32 and bfloat16)")
    b.add_argument("--layout", action="append", choices=["contiguous", "channels_last"],
                   help="only this memory layout (repeatable; channels_last applies to 4-D ops)")
    b.add_argument("--shape", action="append", type=_shape_arg, metavar="SHAPE",
                   help="replace the matrix's shapes (repeatable): ROWSxFEATURES for the row ops, NxCxHxW "
                        "for the others (C divisible by 32 for GroupNorm)")
    b.add_argument("--pass", dest="passes", action="append", choices=["fwd", "fwdbwd"],
                   help="forward only, or forward+backward (repeatable; default: both)")
    b.add_argument("--provider", action="append", metavar="NAME",
                   help="time this provider besides torch eager (repeatable): normkit, compile, or a peer "
                        "library (default: every available one; with --quick: normkit)")
    b.add_argument("--backend", metavar="NAME",
                   help="run normkit on this backend (normkit.use_backend; default: normkit's own choice)")
    b.add_argument("--reps", type=_positive_int, metavar="N",
                   help="timed repetitions per cell and pass (default: as many as fit the --budget)")
    b.add_argument("--warmup", type=int, metavar="N", help="untimed rotations first (default 2; quick: 1)")
    b.add_argument("--budget", type=float, metavar="SECONDS",
                   help="timing time per cell and pass that sets the repetitions, at least 5 and at most 200 "
                        "(default 2; quick: 0.15, 3 to 25)")
    b.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch CPU threads (default: torch's, torch.get_num_threads())")
    b.add_argument("--seed", type=int, default=0, help="seed of the input data (default 0)")
    b.add_argument("--out", metavar="DIR", default="bench-results",
                   help="where to write bench.csv, bench.json and bench.png (default: bench-results)")
    b.add_argument("--no-chart", action="store_true", help="do not draw bench.png")
    b.add_argument("--list", action="store_true", help="list the cells and providers and exit")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    b.set_defaults(func=_cmd_bench)


def _bench_settings(args: argparse.Namespace) -> _bench_runner.Settings:
    from .bench.runner import Settings

    timing = dict(_QUICK_TIMING if args.quick else _FULL_TIMING)
    if args.warmup is not None:
        timing["warmup"] = max(0, args.warmup)
    if args.budget is not None:
        timing["budget_s"] = max(0.0, args.budget)
    providers = args.provider if args.provider else (["normkit"] if args.quick else None)
    return Settings(
        passes=list(dict.fromkeys(args.passes)) if args.passes else ["fwd", "fwdbwd"],
        providers=list(dict.fromkeys(providers)) if providers is not None else None,
        reps=args.reps, seed=args.seed, backend=args.backend, threads=args.threads, **timing,
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    from .bench.peers import select_providers
    from .bench.report import problems

    console = _stdout_console()
    err_console = Console(stderr=True, highlight=False)

    def usage(message: str) -> int:
        err_console.print(Text(f"normkit bench: {message}"))
        return 2

    if args.backend is not None:
        try:
            _backends.get_backend(args.backend)
        except (ValueError, ImportError) as e:
            return usage(str(e))
    try:
        cells = bench.standard_matrix(quick=args.quick, ops=args.op, dtypes=args.dtype, layouts=args.layout,
                                      shapes=args.shape)
        settings = _bench_settings(args)
        chosen, notes = select_providers(settings.providers)
    except ValueError as e:
        return usage(str(e))
    if not cells:
        return usage("no cells match the filters")
    if args.list:
        for c in cells:
            console.print(Text(c.id))
        console.print(Text(f"{len(cells)} cells x {len(settings.passes)} passes; providers: "
                           f"{', '.join(p.name for p in chosen)}"))
        for note in notes:
            console.print(Text(f"note: {note}"))
        return 0

    machine = bench.machine_info()  # before the run: its load average is the one that matters
    load = machine.get("load_average")
    if load and load[0] > 0.5 * (machine.get("usable_cores") or 1):
        err_console.print(Text(
            f"normkit bench: warning: load average {load[0]} on {machine.get('usable_cores')} cores: other "
            "processes compete for the CPU and the timings will be noisy", style="yellow",
        ))
    total = len(cells) * len(settings.passes)
    if not args.quiet and err_console.is_terminal:
        from rich.markup import escape
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err_console, transient=True) as progress:
            task = progress.add_task("bench", total=total)

            def on_progress(description: str, advance: int) -> None:
                progress.update(task, advance=advance, description=escape(description))

            result = bench.run(cells, settings, progress=on_progress)
    else:
        result = bench.run(cells, settings)

    machine["load_average_end"] = bench.machine_info().get("load_average")
    extra = {"quick": bool(args.quick), "cells": len(cells)}
    written, chart_note = bench.write_outputs(args.out, result, settings, machine, extra, chart=not args.no_chart)
    if not args.quiet:
        console.print(bench.results_table(result))
    for line in problems(result):
        console.print(Text(line, style="red" if not line.startswith("skipped") else "yellow"), soft_wrap=True)
    for note in result.notes:
        console.print(Text(f"note: {note}"), soft_wrap=True)
    if chart_note:
        console.print(Text(f"note: {chart_note}"), soft_wrap=True)
    normkit_failed = [r for r in result.rows if r.provider == "normkit" and r.status in ("wrong", "error")]
    timed = sum(r.ok for r in result.rows)
    summary = (
        f"{len(cells)} cells ({len(result.skipped)} skipped), {timed} timings; normkit backend: "
        f"{', '.join(result.backends) or '-'}; {result.threads} threads; wrote {', '.join(map(str, written))} "
        f"({result.seconds:.1f} s)"
    )
    console.print(Text(summary, style="bold " + ("red" if normkit_failed else "green")), soft_wrap=True)
    return 1 if normkit_failed else 0


# --------------------------------------------------------------------------------------------------
# normkit train / normkit experiment batch-size
# --------------------------------------------------------------------------------------------------

_RAY_MISSING = 'normkit {command}: this command needs Ray Train and scikit-learn: pip install "normkit[ray]" ({error})'


def _int_list(value: str) -> tuple[int, ...]:
    try:
        items = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return items


def _seed_list(value: str) -> tuple[int, ...]:
    try:
        items = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not items or min(items) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {value!r}")
    return tuple(dict.fromkeys(items))


def _print_help_and_fail(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _norm_list(value: str) -> tuple[str, ...]:
    from .train.model import NORMS

    items = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in items if v not in NORMS]
    if not items or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown norm(s) {', '.join(unknown) or value!r}; choose from {', '.join(NORMS)}"
        )
    return tuple(dict.fromkeys(items))


def _add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", metavar="HOST:PORT",
                   help="join the Ray cluster whose GCS is at HOST:PORT ('auto': the one `ray start` began on this "
                        "machine); default: start a private local Ray instance, bound to 127.0.0.1, no dashboard")
    p.add_argument("--storage-path", metavar="DIR",
                   help="where checkpoints go: a local directory or a URI such as s3://bucket/prefix "
                        "(default: ./normkit-runs; for experiments, a temporary directory)")
    p.add_argument("--max-failures", type=int, default=0, metavar="N",
                   help="restart the workers up to N times after a failure, from the last checkpoint (-1: no limit)")
    p.add_argument("--verbose", action="store_true", help="Ray's info logs and the workers' output too")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress: only the results")


def _add_train_parsers(sub: argparse._SubParsersAction) -> None:
    from .train.model import NORMS
    from .train.settings import DEFAULT_LR

    t = sub.add_parser(
        "train",
        help="train a small CNN on the digits, data-parallel on Ray Train, with any normkit norm",
        description=(
            "Train a compact CNN on scikit-learn's handwritten digits (no download) with Ray Train's TorchTrainer: "
            "N workers (DDP; gloo on CPU, NCCL with --use-gpu), each on its own shard, a checkpoint per epoch, "
            "restarts from the last checkpoint after failures. Shows each epoch's metrics as it ends and a table "
            "at the end. Needs normkit[ray]. See docs/training.md."
        ),
    )
    t.add_argument("--norm", choices=NORMS, default="batch",
                   help="normalization after each convolution (default batch)")
    t.add_argument("--workers", type=_positive_int, default=2, metavar="N", help="Ray Train workers (default 2)")
    t.add_argument("--epochs", type=_positive_int, default=5, metavar="E", help="epochs (default 5)")
    t.add_argument("--batch-size", type=_positive_int, default=32, metavar="B",
                   help="images per worker per step (default 32; the global batch is N x B)")
    t.add_argument("--lr", type=float, metavar="LR",
                   help=f"peak learning rate (default {DEFAULT_LR['sgd']} for sgd, {DEFAULT_LR['adam']} for adam)")
    t.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                   help="sgd (momentum 0.9) or adam (default sgd)")
    t.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning rate schedule (default cosine decay to 0)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the split, the initial weights and the shuffles (default 0)")
    t.add_argument("--use-gpu", action="store_true", help="one GPU per worker (process group over NCCL)")
    t.add_argument("--name", metavar="NAME",
                   help="the run's directory under the storage path (default: NORM-TIMESTAMP); the name of an "
                        "earlier run resumes it from its last checkpoint")
    t.add_argument("--fail-at-epoch", type=_positive_int, metavar="K",
                   help="test hook: the last worker raises once, halfway through epoch K (1-based); "
                        "with --max-failures >= 1 the run restarts from epoch K-1's checkpoint")
    t.add_argument("--json", metavar="PATH", help="write the settings, per-epoch history and paths as JSON to PATH")
    _add_cluster_arguments(t)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("experiment",
                       help="experiments on Ray Train (batch-size: BatchNorm vs SyncBatchNorm vs GroupNorm)")
    esub = e.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    b = esub.add_parser(
        "batch-size",
        help="validation error vs images per worker, per norm (the GroupNorm paper's finding, in miniature)",
        description=(
            "Train the digits CNN for every per-worker batch size x norm x seed on one Ray instance and one "
            "worker group (same epochs and lr schedule for every cell, lr scaled linearly with the batch), and "
            "write table.md, results.csv, plot.png and run.json into --out. See docs/training.md."
        ),
    )
    b.add_argument("--out", metavar="DIR", default="experiment-batch-size",
                   help="output directory (default: experiment-batch-size)")
    b.add_argument("--workers", type=_positive_int, default=2, metavar="N", help="Ray Train workers (default 2)")
    b.add_argument("--epochs", type=_positive_int, metavar="E", help="epochs per cell (default: the experiment's, 6)")
    b.add_argument("--batch-sizes", type=_int_list, default=(2, 4, 8, 16, 32), metavar="B,B,...",
                   help="images per worker (default 2,4,8,16,32)")
    b.add_argument("--norms", type=_norm_list, default=("batch", "sync-batch", "group"), metavar="NORM,...",
                   help=f"norms to compare (default batch,sync-batch,group; from {', '.join(NORMS)})")
    b.add_argument("--seeds", type=_seed_list, default=(0,), metavar="S,S,...",
                   help="seeds: each cell is trained once per seed, the table shows the mean (default 0)")
    b.add_argument("--lr", type=float, metavar="LR",
                   help="peak lr at 32 images per worker, scaled linearly (default 0.1)")
    _add_cluster_arguments(b)
    b.set_defaults(func=_cmd_experiment_batch_size)
    e.set_defaults(func=lambda args: _print_help_and_fail(e))


def _train_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "fix the command or the cluster" (exit status 2)."""
    from .train.errors import ClusterUnreachable, InsufficientResources, RayNotInstalled

    return (ValueError, RayNotInstalled, ClusterUnreachable, InsufficientResources)


def _run_ray_work(command: str, missing: str, work: Callable[[], object], console: Console) -> tuple[object, int]:
    """Run ``work`` for ``normkit {command}``: ``(its result, 0)``, or ``(None, exit status)`` after saying
    why: 2 for a missing Ray or a bad command or cluster, 130 for Ctrl-C, 1 when training failed."""
    from .train.errors import RayNotInstalled

    try:
        return work(), 0
    except RayNotInstalled as e:
        console.print(Text(_RAY_MISSING.format(command=missing, error=e.__cause__ or e)), soft_wrap=True)
        return None, 2
    except _train_errors() as e:
        console.print(Text(f"normkit {command}: {e}"), soft_wrap=True)
        return None, 2
    except KeyboardInterrupt:
        console.print(Text(f"normkit {command}: interrupted (Ray was shut down or left)"))
        return None, 130
    except Exception as e:  # TrainingFailed, and whatever else Ray raises
        console.print(Text(f"normkit {command}: training failed: {e}", style="red"), soft_wrap=True)
        return None, 1


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainSettings, history_table
    from .train import run as train_run

    console = _stdout_console()
    err_console = Console(stderr=True, highlight=False)
    settings = None

    def work():
        nonlocal settings
        settings = TrainSettings(
            norm=args.norm, workers=args.workers, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            optimizer=args.optimizer, schedule=args.schedule, seed=args.seed, use_gpu=args.use_gpu,
            address=args.address, storage_path=args.storage_path, name=args.name, max_failures=args.max_failures,
            fail_at_epoch=None if args.fail_at_epoch is None else args.fail_at_epoch - 1,
        )
        return train_run(settings, console=err_console, quiet=args.quiet, verbose=args.verbose)

    result, status = _run_ray_work("train", "train", work, err_console)
    if status:
        return status
    console.print(history_table(result.history, title=f"normkit train: {settings.norm}, {settings.workers} workers "
                                                        f"x batch {settings.batch_size}"))
    if args.json:
        doc = {
            "settings": settings.to_dict(),
            "history": [r.to_dict() for r in result.history],
            "checkpoint": result.checkpoint_path,
            "run_path": result.run_path,
            "attempts": result.attempts,
            "wall_time_s": round(result.wall_time_s, 3),
            "fit_time_s": round(result.fit_time_s, 3),
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    restarts = f"; {result.restarts} restart(s)" if result.restarts else ""
    epochs = len(result.history)
    final = (f"val error {100 * result.final_val_error:.2f}% after {epochs} epoch{'s' if epochs != 1 else ''}"
             if result.history else "no epoch finished")
    console.print(Text(
        f"{final}{restarts}; checkpoint {result.checkpoint_path}; {result.wall_time_s:.1f} s "
        f"({result.fit_time_s:.1f} s in Ray Train)", style="bold green",
    ), soft_wrap=True)
    return 0


def _cmd_experiment_batch_size(args: argparse.Namespace) -> int:
    from .train.experiment import BatchSizeExperiment, results_table, run_batch_size_experiment

    console = _stdout_console()
    err_console = Console(stderr=True, highlight=False)
    options: dict[str, object] = {
        "batch_sizes": args.batch_sizes, "norms": args.norms, "seeds": args.seeds, "workers": args.workers,
        "address": args.address, "storage_path": args.storage_path, "max_failures": args.max_failures,
    }
    if args.epochs is not None:
        options["epochs"] = args.epochs
    if args.lr is not None:
        options["base_lr"] = args.lr
    def work():
        experiment = BatchSizeExperiment(**options)
        return run_batch_size_experiment(experiment, args.out, console=err_console, quiet=args.quiet,
                                         verbose=args.verbose)

    result, status = _run_ray_work("experiment batch-size", "experiment", work, err_console)
    if status:
        return status
    console.print(results_table(result))
    for note in result.notes:
        console.print(Text(f"note: {note}"), soft_wrap=True)
    console.print(Text(
        f"{len(result.rows)} cells in {result.wall_time_s:.1f} s; wrote {', '.join(map(str, result.files))}",
        style="bold green",
    ), soft_wrap=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
