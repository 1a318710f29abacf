"""Where a converted model's time goes: torch.profiler on the original and the converted copy.

``convert_speed.py`` measures *whether* a converted model is faster; this says *why not* when it is not.
Each model (original, then a converted deep copy) runs a few warm-up steps and then a few profiled ones
(inference under ``torch.no_grad``, or a training step). For each side it reports the wall time per step,
the device time the kernels took (on a GPU: the sum over kernel events alone; a step whose kernel time is
far below its wall time is waiting on the host, not on the GPU) and the events that took the most time,
each marked ``kernel``, ``op`` (a torch op or an autograd Function: its device time is that of the kernels
it launched itself, which are also rows of their own) or ``range``: one per norm class, a profiler range
around each norm module's forward (on the CPU normkit's kernels are no torch ops and would show under no
other name). On a GPU a range's device time is the span from the first to the last kernel of each call,
idle gaps included: a range that takes far longer than its kernels is a module during which the GPU
waited on the host. On the CPU only host time exists, so the table is of the ops' CPU time.

Needs timm (``pip install -e ".[models]"``)::

    python benchmarks/profile_convert.py --device cuda                        # ResNet-50, 64x3x224x224
    python benchmarks/profile_convert.py --device cuda --model mobilenetv3_large_100 --batch 128
    python benchmarks/profile_convert.py --model resnet18 --batch 2 --size 64 --out profile.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import normkit
from normkit.bench.machine import machine_info


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _annotate_norms(model: torch.nn.Module, labels: dict[str, str]) -> None:
    """A profiler range around every norm module's forward, named after the original's class, so that each
    side's table has a row for its norms: on the CPU normkit's kernels are not torch ops, and their time
    would otherwise show under no name."""
    stack: list = []

    def enter(module, args, label):
        ctx = torch.profiler.record_function(f"norm module: {label}")
        ctx.__enter__()
        stack.append(ctx)

    def leave(module, args, output):
        stack.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        label = labels.get(name, "")
        if "Norm" in label and next(module.children(), None) is None:
            module.register_forward_pre_hook(lambda m, a, label=label: enter(m, a, label))
            module.register_forward_hook(leave)


def _step(model: torch.nn.Module, x: torch.Tensor, train: bool) -> None:
    if train:
        model(x).float().sum().backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(x)


def _profile_side(model: torch.nn.Module, x: torch.Tensor, train: bool, steps: int, top: int) -> dict:
    """Warm up, then profile ``steps`` steps: wall ms per step, device kernel ms per step, and the top ops."""
    device = x.device.type
    for _ in range(2):
        _step(model, x, train)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            _step(model, x, train)
        _sync(device)
        wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"

    def self_time(e) -> float:
        return float(getattr(e, key))

    rows = sorted(events, key=self_time, reverse=True)
    # the kernels alone: an op's or a range's device time is its kernels' again (or their span)
    kernel_us = sum(self_time(e) for e in events if _kind(e) == "kernel") if device == "cuda" else None
    return {
        "wall_ms": wall * 1e3,
        "kernel_ms": None if kernel_us is None else kernel_us / steps / 1e3,
        "top": [
            {"name": e.key, "kind": _kind(e), "calls": e.count // steps, "ms": self_time(e) / steps / 1e3,
             "cpu_ms": e.self_cpu_time_total / steps / 1e3}
            for e in rows[:top]
        ],
    }


def _kind(event) -> str:
    """``kernel`` (device work), ``range`` (a ``record_function`` range, either side) or ``op``."""
    # by name too: a range's GPU-side copy, whose flag only a GPU run shows, must not count as a kernel
    if event.is_user_annotation or event.key.startswith("norm module: "):
        return "range"
    return "kernel" if event.device_type != torch.autograd.DeviceType.CPU else "op"


def run(model_name: str, batch: int, size: int, device: str, train: bool, steps: int, top: int,
        dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    original = timm.create_model(model_name).to(device=device, dtype=dtype)
    original.train(train)
    converted = normkit.convert(copy.deepcopy(original))
    labels = {name: type(module).__name__ for name, module in original.named_modules()}
    for model in (original, converted):
        _annotate_norms(model, labels)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    result = {"model": model_name, "input": list(x.shape), "dtype": str(dtype).removeprefix("torch."),
              "mode": "train step" if train else "inference", "steps": steps}
    for side, model in (("original", original), ("converted", converted)):
        result[side] = _profile_side(model, x, train, steps, top)
    o, c = result["original"], result["converted"]
    result["speedup"] = o["wall_ms"] / c["wall_ms"]
    return result


def _print(result: dict) -> None:
    print(f"\n{result['model']} {result['input']} {result['dtype']} {result['mode']}: "
          f"original/converted wall time {result['speedup']:.2f}x (> 1: the converted model is faster)")
    for side in ("original", "converted"):
        r = result[side]
        kernel = "" if r["kernel_ms"] is None else (
            f", kernels {r['kernel_ms']:.2f} ms ({r['kernel_ms'] / r['wall_ms']:.0%} of the wall time)")
        print(f"  {side}: {r['wall_ms']:.2f} ms per step{kernel}")
        for t in r["top"]:
            print(f"    {t['ms']:9.3f} ms  {t['kind']:6s} {t['calls']:5d} calls  cpu {t['cpu_ms']:8.3f} ms  "
                  f"{t['name'][:90]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", help="a timm architecture (random weights)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 64 on cuda, 8 on cpu)")
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per side and mode")
    parser.add_argument("--top", type=int, default=12, help="ops listed per side")
    parser.add_argument("--mode", choices=["inference", "train", "both"], default="both")
    parser.add_argument("--out", type=Path, help="write the results, machine and versions to this JSON file")
    args = parser.parse_args(argv)
    batch = args.batch or (64 if args.device == "cuda" else 8)
    modes = {"inference": [False], "train": [True], "both": [False, True]}[args.mode]
    results = [
        run(args.model, batch, args.size, args.device, train, args.steps, args.top, getattr(torch, args.dtype))
        for train in modes
    ]
    for result in results:
        _print(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine_info(), "results": results}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
