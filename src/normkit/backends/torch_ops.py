"""PyTorch's own ATen kernels as a backend: the explicit baseline that benchmarks compare against."""

from __future__ import annotations

import torch

from .base import Backend

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    """Calls ``torch.layer_norm``, ``torch.batch_norm``, ... (the ops under ``torch.nn.functional``)."""

    name = "torch"

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        return torch.layer_norm(x, list(normalized_shape), weight, bias, eps)

    def rms_norm(self, x, normalized_shape, weight, eps):
        return torch.rms_norm(x, list(normalized_shape), weight, eps)

    def group_norm(self, x, num_groups, weight, bias, eps):
        return torch.group_norm(x, num_groups, weight, bias, eps)

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        return torch.batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps,
            torch.backends.cudnn.enabled,
        )

    def instance_norm(self, x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
        return torch.instance_norm(
            x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
            torch.backends.cudnn.enabled,
        )
