"""normkit: drop-in, correct and fast normalization layers for PyTorch.

``normkit.nn`` holds the modules (subclasses of torch.nn's), ``normkit.functional`` the functions
(torch.nn.functional's signatures), ``normkit.reference`` the readable math every backend is tested
against, ``normkit.backends`` the dispatch layer, and :func:`normkit.convert` switches the norms of an
existing model (torch.nn, Hugging Face, timm) to normkit's (:func:`normkit.revert` undoes it).
"""

from . import backends, functional, nn, reference
from .backends import available_backends, get_backend, set_backend, use_backend
from .conversion import convert, revert

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "backends",
    "convert",
    "functional",
    "get_backend",
    "nn",
    "reference",
    "revert",
    "set_backend",
    "use_backend",
]
