"""Speed of normkit.convert on Hugging Face and timm norms: each module alone, and whole models.

Times the original and the converted copy alternately in one process (median of the repetitions), with
torch's default threads. Needs transformers and timm (``pip install -e ".[models]"``)::

    python benchmarks/convert_speed.py
"""

from __future__ import annotations

import copy
import statistics
import time

import timm
import torch
import transformers
from timm.layers import LayerNorm2d
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import normkit


def compare(name: str, original: torch.nn.Module, inputs, reps: int) -> None:
    original = original.eval()
    converted = normkit.convert(copy.deepcopy(original))
    times: dict[str, list[float]] = {"original": [], "converted": []}
    with torch.no_grad():
        for model in (original, converted):  # warm-up
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
        for _ in range(reps):
            for key, model in (("original", original), ("converted", converted)):
                start = time.perf_counter()
                model(**inputs) if isinstance(inputs, dict) else model(inputs)
                times[key].append(time.perf_counter() - start)
    a, b = statistics.median(times["original"]), statistics.median(times["converted"])
    print(f"{name:52s} original {a * 1e3:8.2f} ms  converted {b * 1e3:8.2f} ms  speedup {a / b:.2f}x", flush=True)


def main() -> None:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 512, 1024, dtype=dtype)
        compare(f"LlamaRMSNorm(1024), 4x512x1024 {dtype}", LlamaRMSNorm(1024).to(dtype), x, 21)
    compare("timm LayerNorm2d(40), 8x40x56x56 float32", LayerNorm2d(40), torch.randn(8, 40, 56, 56), 21)
    compare("BatchNorm2d(64) eval, 8x64x112x112 float32", torch.nn.BatchNorm2d(64), torch.randn(8, 64, 112, 112), 21)
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                                      num_attention_heads=16, num_key_value_heads=16, vocab_size=1000)
    ids = {"input_ids": torch.randint(0, 1000, (4, 512))}
    for dtype in (torch.float32, torch.bfloat16):
        compare(f"Llama (h=1024, 2 layers), 4x512 tokens {dtype}",
                transformers.LlamaForCausalLM(config).to(dtype), ids, 7)
    images = torch.randn(8, 3, 224, 224)
    for name in ("convnext_atto", "resnet18"):
        compare(f"timm {name}, 8x3x224x224 float32", timm.create_model(name, num_classes=10), images, 7)


if __name__ == "__main__":
    main()
