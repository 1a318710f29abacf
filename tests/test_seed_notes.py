"""The origin notes' six checks, rewritten against normkit, and the case their GroupNorm gets wrong.

The notes (shared/seed/normalization-notes.txt) compared hand-built layers with torch.nn on one input
each. Here normkit's layers take the hand-built ones' place. Their GroupNorm reduced over the spatial
dims only, computing InstanceNorm; it "passed" only where every channel had the same distribution.
"""

from __future__ import annotations

import torch

import normkit.nn as nkn


def _notes_group_norm(x: torch.Tensor, num_groups: int, eps: float = 1e-5) -> torch.Tensor:
    """The notes' GroupNorm forward (weight 1, bias 0), kept here only to show that it is wrong."""
    n, c, h, w = x.shape
    xg = x.view(n, num_groups, -1, h, w)
    mean = xg.mean(dim=(3, 4), keepdim=True)  # the bug: dims (2, 3, 4) are a group's elements
    var = xg.var(dim=(3, 4), unbiased=False, keepdim=True)
    return ((xg - mean) / torch.sqrt(var + eps)).view(n, c, h, w)


def test_rms_norm_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 128)
    ours, theirs = nkn.RMSNorm(128), torch.nn.RMSNorm(128)
    assert torch.allclose(ours(x), theirs(x))


def test_group_norm_matches_torch():
    torch.manual_seed(0)
    n, c, h, w = 4, 6, 56, 56  # the notes used 224x224; the point does not need the size
    x = torch.rand(n, c, h, w) * 10
    ours, theirs = nkn.GroupNorm(num_groups=1, num_channels=c), torch.nn.GroupNorm(num_groups=1, num_channels=c)
    assert torch.allclose(theirs(x), ours(x), atol=1e-5)
    # The notes' version misses by a few hundredths here: every channel of this input has the same
    # distribution, so per-channel and per-group statistics nearly agree. See the last test below.
    assert (theirs(x) - _notes_group_norm(x, 1)).abs().max() > 1e-3


def test_instance_norm_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    assert torch.allclose(torch.nn.InstanceNorm2d(3)(x), nkn.InstanceNorm2d(3)(x), atol=1e-5)


def test_layer_norm_over_chw_matches_torch():
    torch.manual_seed(0)
    c, h, w = 3, 64, 64
    x = torch.randn(4, c, h, w)
    assert torch.allclose(nkn.LayerNorm((c, h, w))(x), torch.nn.LayerNorm((c, h, w))(x), atol=1e-5)


def test_batch_norm_train_then_eval_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32) * 2 + 1
    theirs, ours = torch.nn.BatchNorm2d(3), nkn.BatchNorm2d(3)
    theirs.train(), ours.train()
    assert torch.allclose(theirs(x), ours(x), atol=1e-6)
    theirs.eval(), ours.eval()
    assert torch.allclose(theirs(x), ours(x), atol=1e-6)
    # the running variance is the unbiased one; the notes stored the biased one
    assert torch.allclose(theirs.running_var, ours.running_var)


def test_group_norm_where_per_channel_and_per_group_statistics_differ():
    """Channels of one group with different means and scales: only a true GroupNorm matches torch."""
    torch.manual_seed(0)
    scale = torch.tensor([1.0, 5.0, 0.2, 3.0, 0.5, 8.0]).view(1, 6, 1, 1)
    shift = torch.tensor([0.0, 10.0, -4.0, 2.0, 7.0, -1.0]).view(1, 6, 1, 1)
    x = torch.randn(2, 6, 8, 8) * scale + shift
    expected = torch.nn.GroupNorm(3, 6)(x)
    torch.testing.assert_close(nkn.GroupNorm(3, 6)(x), expected)
    notes = _notes_group_norm(x, 3)
    assert (notes - expected).abs().max() > 0.5
    # what the notes computed is InstanceNorm, for any number of groups
    torch.testing.assert_close(notes, nkn.InstanceNorm2d(6)(x), atol=1e-5, rtol=1e-5)
