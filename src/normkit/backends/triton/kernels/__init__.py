"""The Triton kernels and their launchers: :mod:`.rows` (LayerNorm, RMSNorm, the fused residual adds),
:mod:`.channels` (GroupNorm, InstanceNorm, GroupNorm+SiLU, BatchNorm), :mod:`.reduce` (fixed-order sums of
per-program partials, the running-statistics update) and :mod:`.common` (helpers used inside kernels)."""
