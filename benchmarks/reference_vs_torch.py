"""How much slower the readable reference backend is than torch's kernels (README, "Backends today").

Times the two backends alternately in one process (three rounds; the best median of each) and prints
the ratio reference time / torch time, forward and forward+backward. A script, not a test: timings
depend on the machine and its load.

    python benchmarks/reference_vs_torch.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import normkit
import normkit.functional as NF

CASES: dict[str, tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "LayerNorm 8192x4096 fp32": (lambda: torch.randn(8192, 4096), lambda x: NF.layer_norm(x, (4096,))),
    "RMSNorm 8192x4096 fp32": (lambda: torch.randn(8192, 4096), lambda x: NF.rms_norm(x, (4096,))),
    "RMSNorm 8192x4096 bf16": (lambda: torch.randn(8192, 4096).bfloat16(), lambda x: NF.rms_norm(x, (4096,))),
    "GroupNorm(32) 32x256x32x32 fp32": (lambda: torch.randn(32, 256, 32, 32), lambda x: NF.group_norm(x, 32)),
    "BatchNorm train 32x256x32x32 fp32": (
        lambda: torch.randn(32, 256, 32, 32),
        lambda x: NF.batch_norm(x, None, None, training=True),
    ),
    "LayerNorm 64x768 fp32": (lambda: torch.randn(64, 768), lambda x: NF.layer_norm(x, (768,))),
}
BACKENDS = ("reference", "torch")


def median_time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(make: Callable[[], torch.Tensor], op: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, list[float]]:
    """{backend: [best forward time, best forward+backward time]} over three alternating rounds."""
    x = make()
    xg = x.clone().requires_grad_()

    def forward() -> None:
        op(x)

    def forward_backward() -> None:
        y = op(xg)
        y.backward(torch.ones_like(y))

    reps = 50 if x.numel() < 1_000_000 else 3
    best = {b: [float("inf"), float("inf")] for b in BACKENDS}
    for _ in range(3):
        for backend in BACKENDS:
            with normkit.use_backend(backend):
                best[backend][0] = min(best[backend][0], median_time(forward, reps))
                best[backend][1] = min(best[backend][1], median_time(forward_backward, reps))
    return best


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, (make, op) in CASES.items():
        t = measure(make, op)
        fwd, fwd_bwd = (t["reference"][i] / t["torch"][i] for i in (0, 1))
        print(f"{name}: reference takes {fwd:.1f}x torch's time forward, {fwd_bwd:.1f}x forward+backward")


if __name__ == "__main__":
    main()
