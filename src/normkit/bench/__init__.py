"""``normkit bench``: normkit's norms timed against torch eager, torch.compile and peer libraries.

The pieces, each in its own module:

* :mod:`.ops`: the benchmarked ops (normkit's call, torch eager's, the plain formula for torch.compile);
* :mod:`.matrix`: the cells (op × shape × dtype × layout) and their seeded inputs;
* :mod:`.peers`: the providers (normkit, torch, compile, and peer libraries keyed on import);
* :mod:`.timing`: the alternating timer (medians); :mod:`.memory`: bytes saved for backward;
* :mod:`.runner`: checks each provider against torch eager, then times it; bytes moved, floor, ratios;
* :mod:`.report`: the rich table, CSV, JSON and PNG; :mod:`.machine`: what it ran on.

``normkit bench`` (:mod:`normkit.cli`) is the command; docs/benchmarks.md explains the numbers.
"""

from .machine import machine_info
from .matrix import Cell, make_inputs, standard_matrix
from .memory import SavedBytes, saved_bytes
from .ops import OPS, OpSpec
from .peers import Provider, builtin_providers, register_peer, unregister_peer
from .report import results_table, write_outputs
from .runner import PASSES, Row, RunResult, Settings, moved_bytes, run

__all__ = [
    "OPS", "PASSES", "Cell", "OpSpec", "Provider", "Row", "RunResult", "SavedBytes", "Settings",
    "builtin_providers", "machine_info", "make_inputs", "moved_bytes", "register_peer", "results_table",
    "run", "saved_bytes", "standard_matrix", "unregister_peer", "write_outputs",
]
