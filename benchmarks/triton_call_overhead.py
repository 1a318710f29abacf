"""CPU time per call of the triton backend's Python path, with every kernel launch stubbed out.

On a GPU a norm call costs its kernels' time on the device and its Python (argument checks, backend
choice, autograd, the launchers) on the host; when the host part is the longer one the GPU waits. This
measures the host part on any machine, GPU or not: Triton's ``JITFunction.run`` is replaced by a no-op,
the backend takes CPU tensors (as it does under the interpreter), and each case is timed in a loop
(the minimum over rounds of the mean per call). Run it from two checkouts to compare versions::

    PYTHONPATH=src python benchmarks/triton_call_overhead.py
    PYTHONPATH=/path/to/other/checkout/src python benchmarks/triton_call_overhead.py

Needs triton (no GPU). Prints one JSON object: microseconds per call by case.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
from triton.runtime.jit import JITFunction


def _no_launch(self, *args, grid, warmup, **kwargs):  # noqa: ARG001 (JITFunction.run's signature)
    return None


def cases() -> dict[str, Callable[[], object]]:
    import normkit
    import normkit.functional as NF

    x, w, b = torch.randn(64, 256), torch.randn(256), torch.randn(256)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    img, cw = torch.randn(8, 32, 8, 8), torch.randn(32)
    imgg = img.clone().requires_grad_()
    bn, bn_eval = normkit.nn.BatchNorm2d(32), normkit.nn.BatchNorm2d(32).eval()

    def layer_norm_fwd_bwd():
        y = NF.layer_norm(xg, (256,), wg, b)
        y.backward(torch.ones_like(y))

    def batch_norm_train_fwd_bwd():
        y = bn(imgg)
        y.backward(torch.ones_like(y))

    return {
        "LayerNorm forward, inference": lambda: NF.layer_norm(x, (256,), w, b),
        "LayerNorm forward+backward": layer_norm_fwd_bwd,
        "GroupNorm forward, inference": lambda: NF.group_norm(img, 8, cw, cw),
        "BatchNorm2d eval forward (parameters require grad)": lambda: bn_eval(img),
        "BatchNorm2d train forward+backward": batch_norm_train_fwd_bwd,
    }


def main(rounds: int = 7, calls: int = 300) -> dict[str, float]:
    JITFunction.run = _no_launch
    import normkit
    from normkit.backends.triton import config

    config.INTERPRET = True  # let the backend take CPU tensors; nothing is interpreted, nothing launched
    torch.set_num_threads(1)
    out = {}
    with normkit.use_backend("triton"):
        for name, fn in cases().items():
            for _ in range(50):
                fn()
            per_call = []
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                per_call.append((time.perf_counter() - start) / calls * 1e6)
            out[name] = round(min(per_call), 1)
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
