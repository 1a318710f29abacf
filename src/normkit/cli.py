"""The ``normkit`` command line: ``normkit verify`` (the conformance matrix) and ``normkit env``.

``normkit verify`` runs :mod:`normkit.verify`'s matrix, shows a progress bar on stderr (when it is a
terminal), a table of results grouped by module × dtype × backend × device, every failing case in
detail, and a one-line summary; it exits with status 1 when any check fails, 0 otherwise (2 for
usage errors). ``python -m normkit`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from . import backends as _backends
from . import verify as _verify

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

    e = sub.add_parser("env", help="versions, devices and backends")
    e.set_defaults(func=_cmd_env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args)


# --------------------------------------------------------------------------------------------------
# normkit env
# --------------------------------------------------------------------------------------------------


def _devices_description() -> list[str]:
    lines = ["cpu" + (f" ({torch.get_num_threads()} threads)")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"cuda:{i} ({torch.cuda.get_device_name(i)})")
    else:
        lines.append("cuda: not available" + ("" if torch.version.cuda else " (CPU-only torch build)"))
    return lines


def _why_unavailable(name: str) -> str:
    try:
        _backends.get_backend(name)
    except ImportError as e:
        return f"{name} ({e})"
    return name


def _cmd_env(args: argparse.Namespace) -> int:
    console = _stdout_console()
    available = _backends.available_backends()
    registered = _backends.registered_backends()
    current = _backends.current_backend_name()
    if current not in registered:
        current += " (not registered: normkit's norms will raise ValueError)"
    rows = [
        ("normkit", __version__),
        ("torch", f"{torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("devices", ", ".join(_devices_description())),
        ("registered backends", ", ".join(registered)),
        ("available backends", ", ".join(available)),
        ("unavailable backends", ", ".join(_why_unavailable(n) for n in registered if n not in available) or "none"),
        ("current backend", current),
        (_backends.ENV_VAR, os.environ.get(_backends.ENV_VAR, "(not set)")),
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
