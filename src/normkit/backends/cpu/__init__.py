"""normkit's CPU backend: C kernels compiled on first use (see :mod:`.build`), run under autograd."""

from .backend import CpuBackend

__all__ = ["CpuBackend"]
