"""What a backend provides: the five norms after argument checking, with the ATen ops' signatures."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


class Backend:
    """Base class of normkit backends.

    :mod:`normkit.functional` has already checked shapes, dtypes and arguments when it calls these
    methods, and it fixes the output's memory layout afterwards, so a backend only computes. Each
    method must support autograd with respect to ``x``, ``weight`` and ``bias``, return the input's
    dtype, and update running statistics in place (never recording them in the autograd graph).
    """

    #: the registry name
    name: str = "base"

    def supports(self, x: Tensor) -> bool:
        """Whether this backend can run on ``x`` (its device, dtype); otherwise the reference does."""
        return True

    def layer_norm(
        self, x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor:
        raise NotImplementedError

    def rms_norm(
        self, x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float | None
    ) -> Tensor:
        raise NotImplementedError

    def group_norm(
        self, x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor:
        raise NotImplementedError

    def batch_norm(
        self,
        x: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> Tensor:
        raise NotImplementedError

    def instance_norm(
        self,
        x: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        use_input_stats: bool,
        momentum: float,
        eps: float,
    ) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<normkit backend {self.name!r}>"
