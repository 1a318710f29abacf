"""Drop-in normalization modules: subclasses of the torch.nn classes of the same names.

Constructors, parameters, buffers, state_dict, ``extra_repr`` and errors are torch's; ``forward``
runs through :mod:`normkit.functional` and so through the selected normkit backend. The fused modules
(``FusedAddRMSNorm``, ``FusedAddLayerNorm``, ``GroupNormSiLU``) subclass normkit's RMSNorm, LayerNorm
and GroupNorm with their constructors and state_dict. ``SyncBatchNorm`` has torch.nn.SyncBatchNorm's
interface on torch's BatchNorm base class (not torch's SyncBatchNorm, which DDP refuses on CPU).
"""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .normalization import FusedAddLayerNorm, FusedAddRMSNorm, GroupNorm, GroupNormSiLU, LayerNorm, RMSNorm
from .sync_batchnorm import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FusedAddLayerNorm",
    "FusedAddRMSNorm",
    "GroupNorm",
    "GroupNormSiLU",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
    "SyncBatchNorm",
]
