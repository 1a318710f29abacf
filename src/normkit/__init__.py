"""normkit: drop-in, correct and fast normalization layers for PyTorch.

``normkit.nn`` holds the modules (subclasses of torch.nn's), ``normkit.functional`` the functions
(torch.nn.functional's signatures), ``normkit.reference`` the readable math every backend is tested
against, and ``normkit.backends`` the dispatch layer.
"""

from . import backends, functional, nn, reference
from .backends import available_backends, get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "backends",
    "functional",
    "get_backend",
    "nn",
    "reference",
    "set_backend",
    "use_backend",
]
