"""Speed of normkit.convert on Hugging Face and timm models: each norm module alone, and whole models.

For every case the original and a converted deep copy run alternately in one process; each
repetition times both, and the result is the median over repetitions of the paired ratio
original/converted (> 1: the converted model is faster), with its 25th-75th percentile range, so a
noisy neighbour slows both sides of a pair instead of biasing one. Whole models are timed in
inference (``torch.no_grad``) and in a training step (forward, backward, gradients zeroed).
Needs transformers and timm (``pip install -e ".[models]"``)::

    python benchmarks/convert_speed.py                      # everything, about 10 minutes on 2 cores
    python benchmarks/convert_speed.py --only convnext --reps 15
    python benchmarks/convert_speed.py --out docs/benchmarks/convert/convert-2core.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import transformers
from timm.layers import LayerNorm2d
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import normkit
from normkit.bench.machine import machine_info


def _call(model: torch.nn.Module, inputs, train: bool) -> None:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if train:
        out = getattr(out, "logits", out)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)


def compare(name: str, original: torch.nn.Module, inputs, reps: int, train: bool = False, fused: bool = False) -> dict:
    """Paired timings of the original and its converted copy; returns the result row (and prints it)."""
    original = original.train(train)
    converted = normkit.convert(copy.deepcopy(original), fused=fused)
    name = f"{name}{', fused=True' if fused else ''}"
    if isinstance(inputs, torch.Tensor) and train:
        inputs = inputs.detach().requires_grad_()
    times: dict[str, list[float]] = {"original": [], "converted": []}
    with torch.set_grad_enabled(train):
        for model in (original, converted, original, converted):  # warm-up (allocator, caches, threads)
            _call(model, inputs, train)
        for rep in range(reps):
            # alternate which side goes first, so that neither always runs right after the other
            order = (("original", original), ("converted", converted))
            for key, model in order if rep % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                _call(model, inputs, train)
                times[key].append(time.perf_counter() - start)
    ratios = sorted(a / b for a, b in zip(times["original"], times["converted"], strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    row = {
        "case": name,
        "mode": "train step" if train else "inference",
        "reps": reps,
        "original_ms": statistics.median(times["original"]) * 1e3,
        "converted_ms": statistics.median(times["converted"]) * 1e3,
        "speedup": statistics.median(ratios),
        "speedup_p25": q[0],
        "speedup_p75": q[2],
    }
    print(
        f"{name:46s} {row['mode']:10s} original {row['original_ms']:8.2f} ms  converted "
        f"{row['converted_ms']:8.2f} ms  speedup {row['speedup']:.3f}x [{q[0]:.3f}-{q[2]:.3f}]",
        flush=True,
    )
    return row


def _llama(dtype: torch.dtype) -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=1000)
    return transformers.LlamaForCausalLM(config).to(dtype)


def cases(reps: int) -> dict[str, list[Callable[[], dict]]]:
    """The benchmark cases by group, each a thunk that builds its inputs and runs :func:`compare`."""
    images = torch.randn(8, 3, 224, 224)
    ids = {"input_ids": torch.randint(0, 1000, (4, 256))}
    cl = torch.channels_last
    return {
        "modules": [
            lambda: compare("LlamaRMSNorm(1024), 4x512x1024 fp32", LlamaRMSNorm(1024), torch.randn(4, 512, 1024),
                            3 * reps),
            lambda: compare("LlamaRMSNorm(1024), 4x512x1024 bf16", LlamaRMSNorm(1024).bfloat16(),
                            torch.randn(4, 512, 1024).bfloat16(), 3 * reps),
            lambda: compare("timm LayerNorm2d(40), 8x40x56x56 NCHW", LayerNorm2d(40), torch.randn(8, 40, 56, 56),
                            3 * reps),
            lambda: compare("timm LayerNorm2d(40), 8x40x56x56 channels_last", LayerNorm2d(40),
                            torch.randn(8, 40, 56, 56).contiguous(memory_format=cl), 3 * reps),
            lambda: compare("timm LayerNorm2d(320), 8x320x7x7 channels_last", LayerNorm2d(320),
                            torch.randn(8, 320, 7, 7).contiguous(memory_format=cl), 3 * reps),
            lambda: compare("BatchNorm2d(64), 8x64x112x112", torch.nn.BatchNorm2d(64), torch.randn(8, 64, 112, 112),
                            3 * reps),
            lambda: compare("BatchNorm2d(64), 8x64x112x112", torch.nn.BatchNorm2d(64), torch.randn(8, 64, 112, 112),
                            3 * reps, train=True),
            lambda: compare("BatchNorm2d(512), 8x512x7x7", torch.nn.BatchNorm2d(512), torch.randn(8, 512, 7, 7),
                            3 * reps),
        ],
        "llama": [
            lambda: compare("Llama (h=512, 2 layers), 4x256 tokens fp32", _llama(torch.float32), ids, reps),
            lambda: compare("Llama (h=512, 2 layers), 4x256 tokens bf16", _llama(torch.bfloat16), ids, reps),
            lambda: compare("Llama (h=512, 2 layers), 4x256 tokens fp32", _llama(torch.float32), ids, reps,
                            train=True),
        ],
        "convnext": [
            lambda: compare("timm convnext_atto, 8x3x224x224", timm.create_model("convnext_atto", num_classes=10),
                            images, reps),
            lambda: compare("timm convnext_atto, 8x3x224x224", timm.create_model("convnext_atto", num_classes=10),
                            images, reps, train=True),
        ],
        "mobilenet": [
            lambda: compare("timm mobilenetv3_large_100, 8x3x224x224",
                            timm.create_model("mobilenetv3_large_100", num_classes=10), images, reps),
            lambda: compare("timm mobilenetv3_large_100, 8x3x224x224",
                            timm.create_model("mobilenetv3_large_100", num_classes=10), images, reps, fused=True),
            lambda: compare("timm mobilenetv3_large_100, 8x3x224x224",
                            timm.create_model("mobilenetv3_large_100", num_classes=10), images, reps, train=True),
        ],
        "resnet": [
            lambda: compare("timm resnet18, 8x3x224x224", timm.create_model("resnet18", num_classes=10), images,
                            reps),
            lambda: compare("timm resnet18, 8x3x224x224", timm.create_model("resnet18", num_classes=10), images,
                            reps, train=True),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=11, help="paired repetitions per whole model (x3 per module)")
    parser.add_argument("--only", nargs="*", choices=["modules", "llama", "convnext", "mobilenet", "resnet"],
                        help="run only these groups")
    parser.add_argument("--out", type=Path, help="write the rows, machine and versions to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for group, thunks in cases(args.reps).items():
        if args.only and group not in args.only:
            continue
        rows += [thunk() for thunk in thunks]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "machine": machine_info(),
            "versions": {"torch": torch.__version__, "normkit": normkit.__version__,
                         "transformers": transformers.__version__, "timm": timm.__version__},
            "threads": torch.get_num_threads(),
            "rows": rows,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
