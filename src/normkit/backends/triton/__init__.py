"""The ``triton`` backend: normkit's Triton kernels for CUDA tensors (and, under ``TRITON_INTERPRET=1``,
for CPU tensors, which is how it is tested without a GPU). Importing this package imports triton;
:mod:`normkit.backends` registers it lazily, so ``import normkit`` does not."""

from .backend import TritonBackend

__all__ = ["TritonBackend"]
