"""Compile every Triton kernel the triton backend launches for an H100 (sm_90), on a machine without a GPU.

Run as a script (``python tests/compile_for_gpu.py``), *without* ``TRITON_INTERPRET``: the launchers are
called on small CPU tensors with ``JITFunction.run`` replaced by a recorder, so each launch gives the
kernel, its argument types and its compile-time constants exactly as the launcher chose them for a GPU
(the tile heuristics see no interpreter), and the specialization a real launch gives its arguments (an int
equal to 1 becomes a constant; a pointer or int divisible by 16 is marked so, which is what lets the
compiler vectorize loads: without the marks every load compiles to one element a thread); each distinct
specialization is then compiled to a cubin with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (triton ships ptxas). The interpreter checks what
the kernels compute; this checks that the same source also compiles for the hardware, which the
interpreter never does (loop-carried types, constexpr branches, layouts). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

try:  # how a launch specializes its arguments (Triton 3.4 and later)
    from triton._C.libtriton import native_specialize_impl as _native_specialize
except ImportError:
    _native_specialize = None

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
launches: dict[str, tuple] = {}


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _specialize(param, value) -> tuple[str, str | None]:
    """``(type, attribute)`` of one argument as Triton's launcher specializes it (``("constexpr", 1)`` for an
    int 1; attribute ``"D"``: divisible by 16), with Triton's own function where it has one."""
    if _native_specialize is None:  # an older Triton: the types alone, no divisibility marks
        return _type(value), None
    from triton.backends.compiler import BaseBackend

    return _native_specialize(BaseBackend, value, param.is_const, not param.do_not_specialize,
                              not param.do_not_specialize_on_alignment)


def _record(self: JITFunction, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    names = self.arg_names
    bound = dict(zip(names, args, strict=False)) | kwargs
    constexprs = {names[i]: bound[names[i]] for i in self.constexprs}
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind, attr = _specialize(self.params[i], bound[name])
        if kind == "constexpr":  # an int specialized to its value (1)
            signature[name], constexprs[name] = "constexpr", attr
        else:
            signature[name] = kind
            if attr == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    key = (f"{self.fn.__name__} {sorted(signature.items())} {sorted(constexprs.items())} {sorted(options.items())} "
           f"{sorted(attrs)}")
    launches[key] = (self, signature, constexprs, options, attrs)


def _launch_everything() -> None:
    """Call every launcher on small CPU tensors with the GPU heuristics (nothing runs): each kernel with
    each of its compile-time branches at least once, the dtypes spread over the cases."""
    from normkit.backends.triton import config
    from normkit.backends.triton.kernels import batch, rows, sets
    from normkit.backends.triton.kernels.reduce import update_running_stats

    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    # rows: (dtype, n, rms, residual, weight, bias); 20000 is longer than any tile (column blocks)
    for dtype, n, rms, residual, weight, bias in (
        (bf16, 96, False, True, True, True), (bf16, 20000, False, True, True, True),
        (f32, 20000, True, False, True, False), (f16, 96, True, True, False, False),
        (f32, 96, False, False, False, False), (bf16, 4096, True, False, True, False),
        (bf16, 65536, False, True, True, True), (f32, 4096, False, False, True, True),
    ):
        x = torch.zeros(3, n, dtype=dtype)
        w = torch.zeros(n, dtype=f32) if weight else None
        b = torch.zeros(n, dtype=dtype) if bias else None
        r = x if residual else None
        y, h, mean, rstd = rows.row_forward(x, r, w, b, n, 1e-5, rms)
        rows.row_backward(x, x, r, w, mean, rstd, n, rms, weight, bias)
    for dtype, n in ((bf16, 4096), (f16, 20000)):  # Llama's order: rounded before the weight (one tile, blocks)
        rows.row_forward(torch.zeros(3, n, dtype=dtype), None, torch.zeros(n, dtype=dtype), None, n, 1e-6, True,
                         round_first=True)
    for dtype, n in ((bf16, 1024), (f16, 20000)):  # DeepSeek-V4's order: the scale rounded (one tile, blocks)
        rows.row_forward(torch.zeros(3, n, dtype=dtype), None, None, None, n, 1e-6, True, round_rstd=True)
    # the gated norms: SiLU and sigmoid gates, float32 or Llama's rounding first, the gate after or before
    # the norm, over the row or groups of it (one tile, blocks)
    for dtype, n, act, round_first, gate_first, groups in (
        (bf16, 1024, "silu", True, False, 1), (bf16, 20000, "sigmoid", False, False, 1),
        (f32, 2048, "sigmoid", False, False, 2), (f16, 20000, "silu", True, False, 1),
        (bf16, 1024, "silu", True, True, 4), (f32, 20000, "silu", False, True, 2), (bf16, 2048, "silu", False, True, 1),
    ):
        x = torch.zeros(3, n * groups, dtype=dtype)
        w = torch.zeros(n * groups, dtype=dtype if round_first else f32)
        rows.row_forward(x, None, w, None, n, 1e-6, True, round_first=round_first, gate=x, gate_act=act,
                         gate_first=gate_first, weight_groups=groups)
    # groups: every dtype x layout x (shape, groups) x SiLU, so that each tile shape the heuristics pick
    # is compiled: InstanceNorm of few channels and positions, GroupNorm(32) of small and large images
    # (positions in blocks), one wide group; then float16 without affine parameters
    set_cases = [
        (dtype, layout, shape, groups, silu, True)
        for dtype in (bf16, f32)
        for layout in (torch.contiguous_format, torch.channels_last)
        for shape, groups in (((2, 8, 3, 3), 8), ((2, 64, 6, 6), 32), ((2, 512, 64, 64), 32), ((2, 64, 6, 6), 1))
        for silu in (False, True)
    ] + [(f16, torch.contiguous_format, (2, 64, 6, 6), 8, False, False)]
    for dtype, layout, shape, groups, silu, affine in set_cases:
        img = torch.zeros(shape, dtype=dtype).contiguous(memory_format=layout)
        c = shape[1]
        w, b = (torch.zeros(c, dtype=f32), torch.zeros(c, dtype=dtype)) if affine else (None, None)
        y, mean, rstd, var = sets.set_forward(img, groups, w, b, 1e-5, silu)
        sets.set_backward(img, img, groups, w, b, mean, rstd, silu, affine, affine)
    # the same sets split over programs (few sets: small batches), each tile shape of both sizes
    with config.tuning(set_splits=2):
        for dtype, layout, shape, groups, silu, affine in set_cases:
            if shape[2] < 6:
                continue
            img = torch.zeros(shape, dtype=dtype).contiguous(memory_format=layout)
            c = shape[1]
            w, b = (torch.zeros(c, dtype=f32), torch.zeros(c, dtype=dtype)) if affine else (None, None)
            y, mean, rstd, var = sets.set_forward(img, groups, w, b, 1e-5, silu)
            sets.set_backward(img, img, groups, w, b, mean, rstd, silu, affine, affine)
    # BatchNorm: (dtype, layout, training, affine, shape); the larger shape splits positions over programs
    small, large = (2, 64, 6, 6), (16, 64, 56, 56)
    for dtype, layout, training, affine, shape in (
        (bf16, torch.channels_last, True, True, small), (f32, torch.contiguous_format, False, True, small),
        (f16, torch.channels_last, True, False, small), (bf16, torch.channels_last, True, True, large),
        (f32, torch.contiguous_format, True, True, large),
    ):
        img = torch.zeros(shape, dtype=dtype).contiguous(memory_format=layout)
        w, b = (torch.zeros(64, dtype=f32), torch.zeros(64, dtype=dtype)) if affine else (None, None)
        fixed = None if training else torch.ones(64)
        y, mean, rstd, var = batch.batch_forward(img, w, b, fixed, fixed, 1e-5)
        batch.batch_backward(img, img, w, mean, rstd, training, affine, affine)
        if fixed is not None:  # inference: the fixed statistics applied without saving them
            batch.batch_forward(img, w, b, fixed, fixed, 1e-5, need_stats=False)
    for mean in (torch.zeros(64), torch.zeros(2, 64)):  # InstanceNorm's (C,) mean, BatchNorm's (2, C) pair
        update_running_stats(torch.zeros(64, dtype=bf16), torch.ones(64, dtype=bf16), mean, torch.ones(64), 0.1, 10)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET: the kernels must be JIT functions, not interpreted")
    JITFunction.run = _record
    _launch_everything()
    target = GPUTarget("cuda", 90, 32)
    failures, spills, registers, table, start = [], [], 0, [], time.perf_counter()
    for key, (fn, signature, constexprs, options, attrs) in launches.items():
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
            assert compiled.asm.get("cubin"), "no cubin"
        except Exception as e:  # report every failure, not just the first
            failures.append(f"{key}: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}")
            continue
        usage = _resource_usage(compiled.asm["cubin"])
        if usage:
            registers = max(registers, usage["REG"])
            if usage["LOCAL"]:  # registers spilled to local memory: a slow kernel, though a correct one
                spills.append(f"{fn.fn.__name__} {constexprs} {options}: {usage['LOCAL']} bytes")
            table.append((usage["REG"], fn.fn.__name__, options.get("num_warps", 4), constexprs))
    if "--registers" in sys.argv:  # one line per specialization, most registers first
        for regs, name, warps, constexprs in sorted(table, key=lambda row: -row[0]):
            flags = {k: v for k, v in constexprs.items() if k.isupper() and v not in (False, 0)}
            print(f"{regs:4d} registers  {warps:2d} warps  {blocks_per_sm(regs, warps):2d} blocks/SM  {name} {flags}")
    print(json.dumps({"compiled": len(launches) - len(failures), "failures": failures, "max_registers": registers,
                      "spills": spills, "seconds": round(time.perf_counter() - start, 1)}))
    return 1 if failures else 0


def blocks_per_sm(registers: int, warps: int) -> int:
    """Programs of ``warps`` warps one sm_90 SM holds at once: 65,536 registers (allocated per warp in
    units of 256), 64 warps and 32 blocks at most."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(32, 64 // warps, 65536 // (per_warp * warps))


def _resource_usage(cubin: bytes) -> dict[str, int] | None:
    """Registers per thread and bytes of local memory (spills) of a cubin's kernel, read by the
    ``cuobjdump`` Triton ships (None without it)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in found.items()} if "REG" in found else None


if __name__ == "__main__":
    sys.exit(main())
