"""The benchmark's outputs: a rich table, ``bench.csv``, ``bench.json`` and a ``bench.png`` chart.

Every definition (bytes moved, floor, ratios, saved bytes) is written into the JSON as well
(:data:`DEFINITIONS`), so a results file explains itself; docs/benchmarks.md says the same at length.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table
from rich.text import Text

from .peers import BASELINE
from .runner import Row, RunResult, Settings

__all__ = [
    "DEFINITIONS", "CSV_COLUMNS", "results_table", "problems", "write_csv", "write_json", "write_chart",
    "write_outputs", "fmt_time",
]

DEFINITIONS = {
    "median_ms": "median over the timed repetitions; providers are called in rotation within each repetition",
    "fwd": "forward only, under torch.no_grad()",
    "fwdbwd": "forward with gradients, then backward of sum(out_i * grad_i) with fixed random grad_i "
              "(both outputs of a fused add op get one); gradients of x, residual, weight, bias",
    "bytes": "minimal memory traffic of one call. fwd: read every argument once (activations, parameters, "
             "running statistics), write every output once (+ running statistics written back by BatchNorm "
             "train). fwdbwd: fwd + read x (fused add: x + residual) + read each output's gradient + write "
             "the input gradient once + read the weight + write the weight and bias gradients (+ read "
             "running_var for BatchNorm eval)",
    "gbps": "bytes / median time, in 1e9 bytes per second",
    "speedup_vs_torch": "torch eager median time / this provider's (> 1: faster than torch eager)",
    "floor_ms": "median time of x.clone() (one read and one fresh write of x), timed in the same rotation",
    "floor_frac": "floor time / this provider's time (1: as fast as one copy of x)",
    "bw_frac": "this provider's GB/s / the clone's GB/s (2 * bytes(x) / floor time): fraction of copy bandwidth",
    "compile_s": "torch.compile: wall time of the first call (which compiles), excluded from the timing",
    "saved_bytes": "bytes saved for backward (fwdbwd rows): each distinct storage saved through "
                   "torch.autograd.graph.saved_tensors_hooks counted once at its full size",
    "saved_new_bytes": "saved_bytes without the storages of the call's own inputs (x, residual, parameters)",
    "check": "worst |provider - torch eager| / allowed over outputs (and gradients in fwdbwd); allowed = "
             "tol * (max|torch| + |torch|), tol per dtype (fp32 2e-4, bf16 2e-2); above 1 the provider is "
             "reported as wrong and not timed",
}

CSV_COLUMNS = [
    "cell", "op", "shape", "dtype", "layout", "pass", "provider", "status", "median_ms", "reps", "bytes", "gbps",
    "speedup_vs_torch", "floor_ms", "floor_frac", "bw_frac", "torch_ms", "compile_s", "check", "saved_bytes",
    "saved_new_bytes", "torch_saved_bytes", "saved_vs_torch", "backend", "note",
]

_PASS_LABEL = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}


def fmt_time(seconds: float) -> str:
    """A duration with a unit that keeps three significant digits readable (µs, ms, s)."""
    if seconds is None or math.isnan(seconds):
        return "–"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def _fmt(v: float, spec: str = ".3g") -> str:
    return "–" if v is None or math.isnan(v) or math.isinf(v) else format(v, spec)


def _mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.3g}"


def _grouped(rows: Sequence[Row]) -> dict[tuple[str, str], dict[str, Row]]:
    groups: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.cell.id, r.pass_), {})[r.provider] = r
    return groups


def _focus(providers: Sequence[str]) -> str:
    return "normkit" if "normkit" in providers else BASELINE


def _short_cell(row: Row) -> str:
    c = row.cell
    text = f"{c.op} {c.shape_str} {c.id.split()[2]}"
    return text + (" CL" if c.layout == "channels_last" else "")


def results_table(result: RunResult) -> Table:
    """The run as a rich table: one row per cell and pass, ratios against torch and the floor."""
    providers = result.providers
    focus = _focus(providers)
    others = [p for p in providers if p != BASELINE]
    table = Table(
        title=f"normkit bench ({result.threads} threads)", title_justify="left", caption_justify="left",
        caption=(
            "median time per call; ×: torch eager's time / the provider's (>1: faster than torch). floor: "
            f"x.clone() in the same rotation; floor/{focus}: floor time / {focus}'s; GB/s: minimal bytes moved "
            f"/ time; saved: MB saved for backward, {focus} / torch. CL: channels_last. WRONG: failed the "
            "check against torch eager, not timed."
        ),
    )
    table.add_column("cell", overflow="fold")
    table.add_column("pass")
    table.add_column("floor", justify="right")
    table.add_column(BASELINE, justify="right")
    for p in others:
        table.add_column(f"{p} (×)", justify="right", overflow="fold")
    table.add_column(f"{focus} GB/s", justify="right")
    table.add_column(f"floor/{focus}", justify="right")
    table.add_column("saved MB", justify="right", overflow="fold")
    for (_, pass_), by in _grouped(result.rows).items():
        any_row = next(iter(by.values()))
        cells: list[Text | str] = [Text(_short_cell(any_row)), _PASS_LABEL.get(pass_, pass_),
                                   fmt_time(any_row.floor_s)]
        for p in [BASELINE, *others]:
            r = by.get(p)
            if r is None:
                cells.append(Text("n/a", style="dim"))
            elif r.status == "wrong":
                cells.append(Text("WRONG", style="bold red"))
            elif r.status == "error":
                cells.append(Text("error", style="bold red"))
            elif p == BASELINE:
                cells.append(fmt_time(r.median_s))
            else:
                sp = r.speedup
                style = "green" if sp >= 1 else ("yellow" if sp >= 0.5 else "red")
                cells.append(Text(f"{fmt_time(r.median_s)} ×{_fmt(sp)}", style=style))
        fr = by.get(focus)
        if fr is not None and fr.ok:
            cells += [_fmt(fr.gbps), _fmt(fr.floor_frac, ".2f")]
        else:
            cells += ["–", "–"]
        tr = by.get(BASELINE)
        if pass_ == "fwdbwd" and fr is not None and fr.saved is not None:
            saved = _mb(fr.saved.total)
            if focus != BASELINE and tr is not None and tr.saved is not None:
                saved += f" / {_mb(tr.saved.total)}"
            cells.append(saved)
        else:
            cells.append("–")
        table.add_row(*cells)
    return table


def problems(result: RunResult) -> list[str]:
    """One line per provider that was wrong or raised, and per skipped cell."""
    lines = []
    for r in result.rows:
        if r.status in ("wrong", "error"):
            lines.append(f"{r.status.upper()} {r.provider} on {r.cell.id} {r.pass_}: {r.note}")
    for s in result.skipped:
        lines.append(f"skipped {s.cell.id}: {s.reason}")
    return lines


def _skipped_rows(result: RunResult, settings: Settings) -> list[dict[str, object]]:
    out = []
    for s in result.skipped:
        for pass_ in settings.passes:
            d: dict[str, object] = dict.fromkeys(CSV_COLUMNS)
            d.update(cell=s.cell.id, op=s.cell.op, shape=s.cell.shape_str, dtype=s.cell.dtype,
                     layout=s.cell.layout, provider="normkit", status="skipped", note=s.reason, **{"pass": pass_})
            out.append(d)
    return out


def write_csv(path: Path, result: RunResult, settings: Settings) -> None:
    """Every row of the run as CSV."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in result.rows:
            w.writerow(r.to_dict())
        for d in _skipped_rows(result, settings):
            w.writerow(d)


def write_json(path: Path, result: RunResult, settings: Settings, machine: dict[str, object],
               extra: dict[str, object] | None = None) -> None:
    """The run as JSON: settings, machine and versions, and every row."""
    doc = {
        "machine": {**machine, "torch_threads": result.threads,
                    "backend": ", ".join(result.backends) or None},
        "settings": {**settings.to_dict(), **(extra or {})},
        "providers": result.providers,
        "notes": result.notes,
        "seconds": round(result.seconds, 3),
        "definitions": DEFINITIONS,
        "results": [r.to_dict() for r in result.rows],
        "skipped": [{"cell": s.cell.id, "reason": s.reason} for s in result.skipped],
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def write_chart(path: Path, result: RunResult, machine: dict[str, object]) -> str | None:
    """Draw the chart; returns None, or why it was not drawn (matplotlib missing, nothing timed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: no chart (pip install 'normkit[bench]')"
    groups = [(key, by) for key, by in _grouped(result.rows).items()
              if BASELINE in by and by[BASELINE].ok]
    if not groups:
        return "nothing was timed: no chart"
    providers = [p for p in result.providers if p != BASELINE]
    labels = [f"{_short_cell(next(iter(by.values())))} {_PASS_LABEL.get(k[1], k[1])}" for k, by in groups]
    n = len(groups)
    width = max(8.0, 0.32 * n * max(1, len(providers)) + 2)
    fig = Figure(figsize=(min(width, 60.0), 10), layout="constrained")
    ax_speed, ax_floor = fig.subplots(2, 1, sharex=True)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    bar = 0.8 / max(1, len(providers))
    for j, p in enumerate(providers):
        xs = [i - 0.4 + bar * (j + 0.5) for i in range(n)]
        speed = [by[p].speedup if p in by and by[p].ok else math.nan for _, by in groups]
        ax_speed.bar(xs, speed, bar, label=p, color=colors[j % len(colors)])
    floor_providers = [BASELINE, *providers]
    fbar = 0.8 / len(floor_providers)
    for j, p in enumerate(floor_providers):
        xs = [i - 0.4 + fbar * (j + 0.5) for i in range(n)]
        frac = [by[p].floor_frac if p in by and by[p].ok else math.nan for _, by in groups]
        color = "tab:gray" if p == BASELINE else colors[(j - 1) % len(colors)]
        ax_floor.bar(xs, frac, fbar, label=p, color=color)
    ax_speed.axhline(1.0, color="black", linewidth=1)
    ax_speed.set_yscale("log")
    ax_speed.set_ylabel("speed-up vs torch eager (torch time / time)")
    ax_speed.legend(loc="upper left", fontsize="small")
    ax_floor.axhline(1.0, color="black", linewidth=1)
    fracs = [by[p].floor_frac for _, by in groups for p in floor_providers if p in by and by[p].ok]
    top = max([f for f in fracs if not math.isnan(f)], default=1.0)
    ax_floor.set_ylim(0, max(1.1, min(2.0, top * 1.05)))  # noise can push a few far above 1: clip at 2
    ax_floor.set_ylabel("floor fraction (x.clone() time / time)")
    ax_floor.legend(loc="upper left", fontsize="small")
    ax_floor.set_xticks(range(n), labels, rotation=90, fontsize="small")
    ax_floor.set_xlim(-0.6, n - 0.4)
    fig.suptitle(
        f"normkit bench: {machine.get('cpu')}, {result.threads} threads, torch {machine.get('torch')}, "
        f"normkit backend {', '.join(result.backends) or '–'}", fontsize="medium",
    )
    fig.savefig(path, dpi=110)
    return None


def write_outputs(out_dir: str | Path, result: RunResult, settings: Settings, machine: dict[str, object],
                  extra: dict[str, object] | None = None, chart: bool = True) -> tuple[list[Path], str | None]:
    """Write bench.csv, bench.json and (when it can) bench.png into ``out_dir``.

    Returns the paths written and, when the chart was not drawn, why.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.csv", out / "bench.json"]
    write_csv(written[0], result, settings)
    write_json(written[1], result, settings, machine, extra)
    why = write_chart(out / "bench.png", result, machine) if chart else "chart not requested (--no-chart)"
    if why is None:
        written.append(out / "bench.png")
    return written, why
