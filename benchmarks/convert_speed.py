"""Speed of normkit.convert on Hugging Face and timm models: each norm module alone, and whole models.

For every case the original and a converted deep copy run alternately in one process; each
repetition times both, and the result is the median over repetitions of the paired ratio
original/converted (> 1: the converted model is faster), with its 25th-75th percentile range, so a
noisy neighbour slows both sides of a pair instead of biasing one. Whole models are timed in
inference (``torch.no_grad``) and in a training step (forward, backward, gradients zeroed).
Each case also records how far the converted model's first output lies from the original's
(``max_diff``: the largest absolute difference over the largest absolute value) and, for a training
step, the MiB of activations one forward saves for the backward on each side (``saved_mib_*``,
exact, not timed). On a GPU (``--device cuda``) the cases are GPU-sized (larger batches, bfloat16
for the LLM), run on the triton backend, and every timed call is bracketed by
``torch.cuda.synchronize()``.
Needs transformers and timm (``pip install -e ".[models]"``)::

    python benchmarks/convert_speed.py                      # everything, about 10 minutes on 2 cores
    python benchmarks/convert_speed.py --only convnext --reps 15
    python benchmarks/convert_speed.py --only channels_last      # ResNet-50 and a BatchNorm, channels-last
    python benchmarks/convert_speed.py --only detection          # frozen BatchNorms: torchvision, RT-DETR
    python benchmarks/convert_speed.py --only llm_norms          # gated, grouped, rounded-scale LLM norms
    python benchmarks/convert_speed.py --only modules --compile   # torch.compile on both sides
    python benchmarks/convert_speed.py --out docs/benchmarks/convert/convert-2core.json
    python benchmarks/convert_speed.py --device cuda --out docs/benchmarks/convert/convert-h200.json
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
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
from normkit.bench import saved_bytes
from normkit.bench.machine import machine_info

#: set by ``--compile``: time ``torch.compile`` of the original against ``torch.compile`` of the converted copy
COMPILE = False
#: set by ``--device``: where :func:`compare` runs both sides. Cases are built on the CPU and moved there
#: rather than built under ``with torch.device(...)``: that context is a TorchFunctionMode, which puts a
#: Python call in front of every torch op and every normkit function while it is active, and it skewed
#: the ratios it was timed under (a converted DeepSeek-V4 norm: 0.89x inside it, 2.19x outside)
DEVICE = "cpu"


def _to_device(inputs):
    if isinstance(inputs, dict):
        return {k: v.to(DEVICE) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(t.to(DEVICE) for t in inputs)
    return inputs.to(DEVICE)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _forward(model: torch.nn.Module, inputs):
    if isinstance(inputs, dict):
        out = model(**inputs)
    else:  # a tuple: a module of several inputs (the gated norms' rows and gate)
        out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    return getattr(out, "logits", out)


def _saved_mib(model: torch.nn.Module, inputs) -> float:
    """MiB of activations that one forward keeps alive for the backward: every distinct saved storage
    once, less the parameters and the inputs, which live anyway (see :mod:`normkit.bench.memory`)."""
    given = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, tuple) else [inputs]
    live = [*model.parameters(), *given]
    return saved_bytes(lambda *_: _forward(model, inputs), live).new / 2**20


def _call(model: torch.nn.Module, inputs, train: bool) -> torch.Tensor:
    out = _forward(model, inputs)
    if train:
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    return out.detach()


def _max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference over the largest absolute value (0: identical)."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def compare(name: str, original: torch.nn.Module, inputs, reps: int, train: bool = False, fused: bool = False) -> dict:
    """Paired timings of the original and its converted copy; returns the result row (and prints it)."""
    original, inputs = original.to(DEVICE).train(train), _to_device(inputs)
    converted = normkit.convert(copy.deepcopy(original), fused=fused)
    name = f"{name}{', fused=True' if fused else ''}"
    if COMPILE:  # both sides compiled: inductor fuses torch's norms itself, normkit's ops stay opaque calls
        original, converted = torch.compile(original), torch.compile(converted)
        name += ", compiled"
    if isinstance(inputs, torch.Tensor) and train:
        inputs = inputs.detach().requires_grad_()
    elif isinstance(inputs, tuple) and train:
        inputs = tuple(t.detach().requires_grad_() for t in inputs)
    times: dict[str, list[float]] = {"original": [], "converted": []}
    with torch.set_grad_enabled(train):
        # warm-up (allocator, caches, threads, kernel compilation); both sides see the same calls in the
        # same order, so training-mode running statistics stay equal and the first outputs are comparable
        first = _call(original, inputs, train), _call(converted, inputs, train)
        max_diff = _max_diff(first[1], first[0])
        for model in (original, converted):
            _call(model, inputs, train)
        for rep in range(reps):
            # alternate which side goes first, so that neither always runs right after the other
            order = (("original", original), ("converted", converted))
            for key, model in order if rep % 2 == 0 else order[::-1]:
                _sync()
                start = time.perf_counter()
                _call(model, inputs, train)
                _sync()
                times[key].append(time.perf_counter() - start)
        # the same extra forward on both sides, so running statistics stay equal
        saved = [_saved_mib(model, inputs) for model in (original, converted)] if train else [None, None]
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
        "max_diff": max_diff,
        "compiled": COMPILE,
        "saved_mib_original": saved[0],
        "saved_mib_converted": saved[1],
    }
    print(
        f"{name:46s} {row['mode']:10s} original {row['original_ms']:8.2f} ms  converted "
        f"{row['converted_ms']:8.2f} ms  speedup {row['speedup']:.3f}x [{q[0]:.3f}-{q[2]:.3f}]  "
        f"max_diff {max_diff:.1e}" + (f"  saved for backward {saved[0]:.1f} -> {saved[1]:.1f} MiB" if train else ""),
        flush=True,
    )
    return row


def _llama(dtype: torch.dtype, hidden: int = 512, layers: int = 2, vocab: int = 1000) -> torch.nn.Module:
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                      num_key_value_heads=hidden // 64, vocab_size=vocab)
    return transformers.LlamaForCausalLM(config).to(dtype)


def _frozen_backbone() -> torch.nn.Module:
    """torchvision's ResNet-50 as its detection models build it, with FrozenBatchNorm2d, and non-trivial
    frozen statistics (a fresh one's are the identity)."""
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    gen = torch.Generator().manual_seed(0)  # on the CPU, whatever the default device (--device cuda)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                c = m.running_var.shape
                m.running_var.copy_(torch.rand(c, generator=gen, device="cpu") + 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen, device="cpu") * 0.1)
                m.weight.copy_(torch.rand(c, generator=gen, device="cpu") + 0.5)
    return model


def _detr() -> torch.nn.Module:
    """Hugging Face DETR from its config, with transformers' own ResNet-50 as the backbone (not timm's),
    whose BatchNorms DETR replaces with its frozen ones."""
    backbone = transformers.ResNetConfig(out_features=["stage4"])
    config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False)
    return transformers.DetrForObjectDetection(config)


def _rt_detr() -> torch.nn.Module:
    """Hugging Face RT-DETR from its default config (ResNet-50-vd backbone with frozen BatchNorms)."""
    return transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(use_pretrained_backbone=False))


def _llm_norms(scale: int = 1) -> list[tuple[type, Callable[[], torch.nn.Module], str, int, int]]:
    """(class, builder, label, hidden size, number of inputs) of the LLM norms timed by the ``llm_norms``
    groups: hidden sizes of 1024 to 4096 times ``scale``."""
    # each class from its own module, by name: a transformers release older than these models lacks some,
    # and those cases are left out (and said so) instead of the whole group failing
    wanted = {
        "deepseek_v4": ["DeepseekV4UnweightedRMSNorm"], "falcon_h1": ["FalconH1RMSNormGated"],
        "glm5_next": ["Glm5NextTextRMSNormGated"], "mamba2": ["MambaRMSNormGated"],
        "muse_spark": ["MuseSparkTextCenteredRMSNorm", "MuseSparkTextInputScaledRMSNorm"],
        "qwen3_next": ["Qwen3NextRMSNormGated"], "qwen4_exp": ["Qwen4ExpTextRMSNorm"],
    }
    found: dict[str, type] = {}
    for model, names in wanted.items():
        try:
            module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
        except ImportError:
            print(f"llm_norms: transformers {transformers.__version__} has no {model}; its cases are left out")
            continue
        found.update({name: getattr(module, name) for name in names if hasattr(module, name)})

    h = 1024 * scale

    def offset(cls: type) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:  # their weights start at 0 (an offset from 1): give them a value
            module = cls(h)
            torch.nn.init.normal_(module.weight, std=0.1)
            return module

        return build

    mamba = found.get("MambaRMSNormGated")
    if mamba is None or "group_size" in inspect.signature(mamba).parameters:
        mamba_entry = ("MambaRMSNormGated", lambda cls: cls(2 * h, group_size=h), f" (groups of {h})", 2 * h, 2)
    else:  # transformers before groups (5.17): the whole row, its second argument eps
        mamba_entry = ("MambaRMSNormGated", lambda cls: cls(2 * h), " (whole row)", 2 * h, 2)
    entries = [
        ("Glm5NextTextRMSNormGated", lambda cls: cls(h), "", h, 2),
        ("Qwen3NextRMSNormGated", lambda cls: cls(h), "", h, 2),
        mamba_entry,
        ("FalconH1RMSNormGated", lambda cls: cls(h), "", h, 2),
        ("FalconH1RMSNormGated", lambda cls: cls(2 * h, n_groups=2, norm_before_gate=False),
         " (2 groups, gate first)", 2 * h, 2),
        ("DeepseekV4UnweightedRMSNorm", lambda cls: cls(1e-6), "", h, 1),
        ("Qwen4ExpTextRMSNorm", None, "", h, 1),
        ("Qwen4ExpTextRMSNorm", lambda cls: cls(4 * h, group_size=h), f" (groups of {h})", 4 * h, 1),
        ("MuseSparkTextCenteredRMSNorm", None, "", h, 1),
        ("MuseSparkTextInputScaledRMSNorm", None, "", h, 1),
    ]
    return [(cls, offset(cls) if make is None else (lambda cls=cls, make=make: make(cls)), label, d, n)
            for name, make, label, d, n in entries if (cls := found.get(name)) is not None]


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
        "groupnorm": [
            lambda: compare("timm efficientnet_b0_gn, 8x3x224x224", timm.create_model("efficientnet_b0_gn"),
                            images, reps),
            lambda: compare("timm efficientnet_b0_gn, 8x3x224x224", timm.create_model("efficientnet_b0_gn"),
                            images, reps, fused=True),
            lambda: compare("timm efficientnet_b0_gn, 8x3x224x224", timm.create_model("efficientnet_b0_gn"),
                            images, reps, train=True, fused=True),
            lambda: compare("timm resnet50_gn, 8x3x224x224", timm.create_model("resnet50_gn"), images, reps),
            lambda: compare("timm resnet50_gn, 8x3x224x224", timm.create_model("resnet50_gn"), images, reps,
                            train=True),
        ],
        "channels_last": [  # what CPU users run CNNs in for oneDNN's convolutions
            lambda: compare("BatchNorm2d(512), 32x512x7x7 channels_last", torch.nn.BatchNorm2d(512),
                            torch.randn(32, 512, 7, 7).contiguous(memory_format=cl), 3 * reps, train=True),
            lambda: compare("timm resnet50 channels_last, 8x3x160x160",
                            timm.create_model("resnet50", num_classes=10).to(memory_format=cl),
                            torch.randn(8, 3, 160, 160).contiguous(memory_format=cl), reps),
            lambda: compare("timm resnet50 channels_last, 8x3x160x160",
                            timm.create_model("resnet50", num_classes=10).to(memory_format=cl),
                            torch.randn(8, 3, 160, 160).contiguous(memory_format=cl), reps, train=True),
        ],
        "detection": [  # frozen BatchNorms: the original folds them into 6 torch ops, 2 of them full passes
            lambda: compare("torchvision resnet50, FrozenBatchNorm2d, 8x3x160x160", _frozen_backbone(),
                            torch.randn(8, 3, 160, 160), reps),
            lambda: compare("transformers DETR (ResNet-50), 2x3x320x320", _detr(),
                            {"pixel_values": torch.randn(2, 3, 320, 320)}, reps),
            lambda: compare("transformers RT-DETR (r50vd), 2x3x320x320", _rt_detr(),
                            {"pixel_values": torch.randn(2, 3, 320, 320)}, reps),
        ],
        # the LLM norms whose originals are several ops over the hidden states: gated (rows and gate),
        # grouped, with a rounded scale or an offset weight
        "llm_norms": [
            # default arguments bind each case's values now, not the loop's last ones
            lambda cls=cls, build=build, label=label, d=d, n_inputs=n_inputs, dtype=dtype: compare(
                f"{cls.__name__}{label}, 4x128x{d} {str(dtype)[6:]}", build().to(dtype),
                tuple(torch.randn(4, 128, d, dtype=dtype) for _ in range(n_inputs)), 3 * reps)
            for cls, build, label, d, n_inputs in _llm_norms()
            for dtype in (torch.float32, torch.bfloat16)
        ],
        "resnet": [
            lambda: compare("timm resnet18, 8x3x224x224", timm.create_model("resnet18", num_classes=10), images,
                            reps),
            lambda: compare("timm resnet18, 8x3x224x224", timm.create_model("resnet18", num_classes=10), images,
                            reps, train=True),
        ],
    }


def gpu_cases(reps: int) -> dict[str, list[Callable[[], dict]]]:
    """GPU-sized cases (built on the CPU; :func:`compare` moves them to the GPU). The CNNs
    with many small BatchNorms come first: they are what a short GPU run most needs to measure."""
    cl = torch.channels_last

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, 224, 224)

    def llama_ids() -> dict:
        return {"input_ids": torch.randint(0, 32000, (4, 1024))}

    bf16 = torch.bfloat16
    return {
        "resnet": [
            lambda: compare("timm resnet50, 64x3x224x224", timm.create_model("resnet50"), images(64), reps),
            lambda: compare("timm resnet50, 64x3x224x224", timm.create_model("resnet50"), images(64), reps,
                            train=True),
        ],
        "mobilenet": [
            lambda: compare("timm mobilenetv3_large_100, 128x3x224x224", timm.create_model("mobilenetv3_large_100"),
                            images(128), reps, fused=True),
        ],
        "groupnorm": [
            lambda: compare("timm efficientnet_b0_gn, 64x3x224x224", timm.create_model("efficientnet_b0_gn"),
                            images(64), reps, fused=True),
            lambda: compare("timm efficientnet_b0_gn, 64x3x224x224", timm.create_model("efficientnet_b0_gn"),
                            images(64), reps, train=True, fused=True),
        ],
        "detection": [
            lambda: compare("torchvision resnet50, FrozenBatchNorm2d, 64x3x224x224", _frozen_backbone(), images(64),
                            reps),
        ],
        "modules": [
            lambda: compare("LlamaRMSNorm(4096), 8x2048x4096 bf16", LlamaRMSNorm(4096).to(bf16),
                            torch.randn(8, 2048, 4096, dtype=bf16), 3 * reps),
            lambda: compare("LlamaRMSNorm(4096), 8x2048x4096 bf16", LlamaRMSNorm(4096).to(bf16),
                            torch.randn(8, 2048, 4096, dtype=bf16), 3 * reps, train=True),
            lambda: compare("LayerNorm(4096), 8x2048x4096 bf16", torch.nn.LayerNorm(4096).to(bf16),
                            torch.randn(8, 2048, 4096, dtype=bf16), 3 * reps, train=True),
            lambda: compare("timm LayerNorm2d(96), 64x96x56x56 channels_last", LayerNorm2d(96),
                            torch.randn(64, 96, 56, 56).contiguous(memory_format=cl), 3 * reps),
            lambda: compare("BatchNorm2d(64), 64x64x112x112", torch.nn.BatchNorm2d(64),
                            torch.randn(64, 64, 112, 112), 3 * reps),
            lambda: compare("BatchNorm2d(64), 64x64x112x112", torch.nn.BatchNorm2d(64),
                            torch.randn(64, 64, 112, 112), 3 * reps, train=True),
            lambda: compare("GroupNorm(32, 512), 8x512x64x64", torch.nn.GroupNorm(32, 512),
                            torch.randn(8, 512, 64, 64), 3 * reps, train=True),
        ],
        "llama": [
            lambda: compare("Llama (h=2048, 4 layers), 4x1024 tokens bf16", _llama(bf16, 2048, 4, 32000),
                            llama_ids(), reps),
            lambda: compare("Llama (h=2048, 4 layers), 4x1024 tokens bf16", _llama(bf16, 2048, 4, 32000),
                            llama_ids(), reps, train=True),
        ],
        # the LLM norms of the CPU group at four times the hidden size, bfloat16, 8x2048 tokens
        "llm_norms": [
            lambda cls=cls, build=build, label=label, d=d, n_inputs=n_inputs: compare(
                f"{cls.__name__}{label}, 8x2048x{d} bf16", build().to(bf16),
                tuple(torch.randn(8, 2048, d, dtype=bf16) for _ in range(n_inputs)), 3 * reps)
            for cls, build, label, d, n_inputs in _llm_norms(scale=4)
        ],
        "convnext": [
            lambda: compare("timm convnext_tiny, 64x3x224x224", timm.create_model("convnext_tiny"), images(64), reps),
            lambda: compare("timm convnext_tiny, 64x3x224x224", timm.create_model("convnext_tiny"), images(64), reps,
                            train=True),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=11, help="paired repetitions per whole model (x3 per module)")
    groups = ["modules", "llama", "convnext", "mobilenet", "groupnorm", "channels_last", "detection", "llm_norms",
              "resnet"]
    parser.add_argument("--only", nargs="*", choices=groups, help="run only these groups")
    parser.add_argument("--out", type=Path, help="write the rows, machine and versions to this JSON file")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: GPU-sized cases on the GPU (the triton backend)")
    parser.add_argument("--compile", action="store_true",
                        help="compile both sides with torch.compile (the first calls, untimed, compile)")
    args = parser.parse_args()
    global COMPILE, DEVICE
    COMPILE, DEVICE = args.compile, args.device
    torch.manual_seed(0)
    rows = []
    groups = gpu_cases(args.reps) if args.device == "cuda" else cases(args.reps)
    for group, thunks in groups.items():
        if args.only and group not in args.only:
            continue
        for thunk in thunks:
            rows.append(thunk())
            if args.device == "cuda":
                torch.cuda.empty_cache()
            if args.out:  # after every case, so that an interrupted run keeps what it measured
                _write(args.out, rows, args.device)
    if args.out:
        print(f"wrote {args.out}")


def _write(path: Path, rows: list[dict], device: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine_info(),
        "versions": {"torch": torch.__version__, "normkit": normkit.__version__,
                     "transformers": transformers.__version__, "timm": timm.__version__},
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "rows": rows,
    }
    path.write_text(json.dumps(result, indent=2) + "\n")

if __name__ == "__main__":
    main()
