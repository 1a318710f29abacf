"""Time the triton backend's launch choices on a GPU: for each case, every combination of a few values of
the choices in ``normkit.backends.triton.config.TUNABLE`` (warps, rows per program, backward programs per
SM, tile size, programs per GroupNorm set) against the heuristics' own, with the kernel benchmark's L2-cold timer.

    python benchmarks/gpu_tune.py --out gpu-results/tune.json [--time-limit 150] [--only rms_norm]
    TRITON_INTERPRET=1 python benchmarks/gpu_tune.py --tiny     # the script itself, on the CPU

The heuristics (``config.warps_for``, ``row_config``, ``row_backward_programs``, ``tile_elements``) were set
without a GPU; this is what a GPU run needs to set them from measurements. Every alternative's outputs
(and gradients) are checked against the heuristics' own (within a bfloat16 rounding step, or 1e-4 in
float32): a choice that computes something else is reported, never counted as faster. Prints a line per
case with the heuristics' time, the best alternative and its speedup, and writes every timing to JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import normkit
import normkit.functional as F
from normkit.backends.triton import config
from normkit.bench.gpu import Timer, _device_name, _versions


@dataclass
class Case:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str = "contiguous"
    #: the values tried for each choice (the cross product is timed)
    grid: dict[str, tuple[int, ...]] = field(default_factory=dict)
    passes: tuple[str, ...] = ("fwd", "fwdbwd")

    @property
    def name(self) -> str:
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]
        return f"{self.op} {'x'.join(map(str, self.shape))} {dtype}{' CL' if self.layout == 'channels_last' else ''}"


_ROW_GRID = {"warps": (2, 4, 8, 16), "row_block_m": (1, 2, 4)}
_ROW_BWD_GRID = {"warps": (4, 8, 16), "row_programs_per_sm": (1, 2, 4, 8)}
_CHAN_GRID = {"warps": (2, 4, 8, 16), "tile": (1024, 2048, 4096, 8192)}

#: the cells the H200 run found slowest against torch (docs/benchmarks/gpu-h200/gpu.md), and one that was fine
CASES = [
    Case("rms_norm", (32768, 4096), torch.bfloat16, grid=_ROW_GRID, passes=("fwd",)),
    Case("rms_norm", (32768, 4096), torch.bfloat16, grid=_ROW_BWD_GRID, passes=("fwdbwd",)),
    Case("layer_norm", (32768, 1024), torch.bfloat16, grid=_ROW_GRID, passes=("fwd",)),
    Case("layer_norm", (32768, 1024), torch.bfloat16, grid=_ROW_BWD_GRID, passes=("fwdbwd",)),
    Case("rms_norm", (32768, 4096), torch.float32, grid=_ROW_GRID, passes=("fwd",)),
    Case("group_norm", (8, 512, 64, 64), torch.bfloat16, grid=_CHAN_GRID),
    Case("group_norm", (8, 512, 64, 64), torch.bfloat16, "channels_last", grid=_CHAN_GRID),
    # few sets (a diffusion model's GroupNorm(32) at batch 1-2): programs per set, split by default
    Case("group_norm", (1, 512, 64, 64), torch.bfloat16, grid={"set_splits": (1, 2, 4, 8, 16)}),
    Case("group_norm", (2, 320, 64, 64), torch.bfloat16, "channels_last", grid={"set_splits": (1, 2, 4, 6, 8, 16)}),
    Case("batch_norm", (64, 64, 112, 112), torch.float32, grid=_CHAN_GRID),
    Case("batch_norm", (256, 64, 56, 56), torch.bfloat16, "channels_last", grid=_CHAN_GRID),
    Case("batch_norm", (64, 2048, 7, 7), torch.float32, grid=_CHAN_GRID),
]

#: the same kinds of case, small enough for the Triton interpreter (a test of the script, not of speed)
TINY_CASES = [
    Case("rms_norm", (8, 64), torch.float32, grid={"warps": (1, 2), "row_block_m": (1, 2)}),
    Case("layer_norm", (8, 64), torch.bfloat16, grid={"row_programs_per_sm": (1, 2)}, passes=("fwdbwd",)),
    Case("group_norm", (2, 8, 4, 4), torch.float32, "channels_last", grid={"tile": (32, 64), "set_splits": (1, 2)}),
    Case("batch_norm", (2, 8, 4, 4), torch.float32, grid={"warps": (1, 2), "tile": (32, 64)}),
]


def _inputs(case: Case, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(args, differentiable)``: the call's tensors and which of them get gradients."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(case.shape, generator=g).to(device=device, dtype=case.dtype)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    width = case.shape[-1] if case.op in ("rms_norm", "layer_norm") else case.shape[1]
    # parameters in the input's dtype, as a CUDA module in that dtype holds them
    w = (1 + 0.1 * torch.randn(width, generator=g)).to(device=device, dtype=case.dtype)
    b = (0.1 * torch.randn(width, generator=g)).to(device=device, dtype=case.dtype)
    if case.op == "rms_norm":
        return [x, w], [x, w]
    return [x, w, b], [x, w, b]


def _call(case: Case, args: list[torch.Tensor]):
    if case.op == "rms_norm":
        return F.rms_norm(args[0], (case.shape[-1],), args[1], 1e-6)
    if case.op == "layer_norm":
        return F.layer_norm(args[0], (case.shape[-1],), args[1], args[2], 1e-5)
    if case.op == "group_norm":
        return F.group_norm(args[0], 32 if case.shape[1] >= 32 else 2, args[1], args[2], 1e-5)
    # BatchNorm training without running statistics: batch statistics, nothing updated between timings
    return F.batch_norm(args[0], None, None, args[1], args[2], True, 0.1, 1e-5)


def _run(case: Case, pass_: str, args, leaves, grad) -> list[torch.Tensor]:
    """The outputs (and for fwdbwd the gradients) of one call."""
    if pass_ == "fwd":
        with torch.no_grad():
            return [_call(case, args)]
    for leaf in leaves:
        leaf.grad = None
    y = _call(case, args)
    torch.autograd.backward(y, grad)
    return [y.detach(), *(leaf.grad for leaf in leaves)]


def _worst(outs: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """The largest difference from the heuristics' outputs, over each reference's largest value."""
    worst = 0.0
    for a, b in zip(outs, ref, strict=True):
        scale = b.float().abs().max().item() or 1.0
        worst = max(worst, (a.float() - b.float()).abs().max().item() / scale)
    return worst


def tune_case(case: Case, pass_: str, timer: Timer, device: str, deadline: float) -> dict:
    """The heuristics' time and every alternative's for one case and pass."""
    args, diff = _inputs(case, device)
    if pass_ == "fwdbwd":
        args = [a.detach().requires_grad_() if any(a is d for d in diff) else a for a in args]
        leaves = [a for a in args if a.requires_grad]
    else:
        leaves = []
    grad = torch.randn(case.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=case.dtype)
    if case.layout == "channels_last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    tolerance = 1e-4 if case.dtype == torch.float32 else 2e-2
    ref = _run(case, pass_, args, leaves, grad)
    base_ms = timer.median_ms(lambda: _run(case, pass_, args, leaves, grad))
    rows = []
    keys = list(case.grid)
    for values in itertools.product(*(case.grid[k] for k in keys)):
        if time.monotonic() > deadline:
            break
        choice = dict(zip(keys, values, strict=True))
        row = {"choice": choice}
        try:
            with config.tuning(**choice):
                worst = _worst(_run(case, pass_, args, leaves, grad), ref)
                row["max_rel_diff"] = worst
                if worst <= tolerance:
                    row["ms"] = timer.median_ms(lambda: _run(case, pass_, args, leaves, grad))
                else:
                    row["status"] = "mismatch"
        except Exception as e:  # a choice the kernels cannot compile (registers, shared memory)
            row["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        rows.append(row)
    # the heuristics timed again after the alternatives: the first timing of a case can carry one-time costs
    # (allocator growth, clocks), which would flatter every alternative; the lower of the two is the baseline
    again_ms = timer.median_ms(lambda: _run(case, pass_, args, leaves, grad))
    heuristic_ms = min(base_ms, again_ms)
    timed = [r for r in rows if "ms" in r]
    for r in timed:
        r["speedup"] = heuristic_ms / r["ms"]
    best = min(timed, key=lambda r: r["ms"]) if timed else None
    return {"case": case.name, "pass": pass_, "heuristic_ms": heuristic_ms, "heuristic_ms_first": base_ms,
            "heuristic_ms_again": again_ms, "best": best, "rows": rows,
            "complete": len(rows) == len(list(itertools.product(*case.grid.values())))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON file for every timing")
    p.add_argument("--tiny", action="store_true", help="interpreter-sized cases (TRITON_INTERPRET=1 on the CPU)")
    p.add_argument("--only", nargs="*", default=[], help="cases whose name contains any of these")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--time-limit", type=float, default=150.0, help="seconds; the sweep stops there")
    args = p.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --tiny with TRITON_INTERPRET=1 to run the script on the CPU)")
    cases = [c for c in (TINY_CASES if args.tiny else CASES) if not args.only or any(o in c.name for o in args.only)]
    timer = Timer(device, reps=1 if args.tiny else args.reps, warmup=0 if args.tiny else 3)
    deadline = time.monotonic() + args.time_limit
    results = []
    with normkit.use_backend("triton"):
        for case in cases:
            for pass_ in case.passes:
                if time.monotonic() > deadline:
                    break
                r = tune_case(case, pass_, timer, device, deadline)
                results.append(r)
                best = r["best"]
                found = f"best {best['choice']} {best['ms']:.4f} ms: {best['speedup']:.2f}x" if best else "none timed"
                bad = [row for row in r["rows"] if "status" in row]
                print(f"{r['case']:34s} {pass_:6s} heuristics {r['heuristic_ms']:.4f} ms "
                      f"(first {r['heuristic_ms_first']:.4f}); {found}"
                      f"{'' if r['complete'] else ' (cut short by --time-limit)'}"
                      f"{f'; {len(bad)} not timed' if bad else ''}", flush=True)
                if args.out:  # after every case, so that a sweep cut short keeps what it measured
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps({"device": _device_name(device), "versions": _versions(),
                                                    "reps": timer.reps, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
