"""normkit.explain: the highlighted sets are the reference's, the pictures are PNGs, the summaries say
what they should.

The set that a picture highlights is checked against the definition, not against a copy of it: the
elements that share statistics with element ``w`` are exactly those that ``y[w]`` depends on, so the
nonzero pattern of the Jacobian of the reference's output (training mode, float64, random input) is
the partition into statistics.
"""

from __future__ import annotations

import struct

import pytest
import torch

from normkit import explain, reference

N, C, HW = 3, 4, 5


def _reference_output(name: str, x: torch.Tensor, groups: int) -> torch.Tensor:
    """The reference's training-mode output of ``name`` on an (N, C, HW) input."""
    shape = tuple(x.shape[1:])
    gen = torch.Generator().manual_seed(1)
    residual = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    if name in ("batch_norm", "sync_batch_norm"):  # sync: BatchNorm of the global batch
        return reference.batch_norm(x, None, None, training=True)[0]
    if name == "layer_norm":
        return reference.layer_norm(x, shape)[0]
    if name == "rms_norm":
        return reference.rms_norm(x, shape)[0]
    if name == "instance_norm":
        return reference.instance_norm(x)[0]
    if name == "group_norm":
        return reference.group_norm(x, groups)[0]
    if name == "group_norm_silu":
        return reference.group_norm_silu(x, groups)[0]
    if name == "fused_add_rms_norm":
        return reference.rms_norm(x + residual, shape)[0]
    if name == "fused_add_layer_norm":
        return reference.layer_norm(x + residual, shape)[0]
    raise AssertionError(name)


def _dependence(name: str, groups: int) -> torch.Tensor:
    """(N·C·HW, N·C·HW) bool: entry [w, e] is True when output w depends on input e."""
    x = torch.randn(N, C, HW, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    jac = torch.autograd.functional.jacobian(lambda t: _reference_output(name, t, groups), x)
    return (jac.reshape(N * C * HW, N * C * HW).abs() > 1e-12)


def test_names():
    assert explain.NORMS[:5] == explain.FIVE
    assert set(explain.FIVE) == {"batch_norm", "layer_norm", "instance_norm", "group_norm", "rms_norm"}
    assert {"sync_batch_norm", "group_norm_silu"} <= set(explain.NORMS)
    assert explain.normalize_name("GroupNorm") == "group_norm"
    assert explain.normalize_name("group-norm") == "group_norm"
    assert explain.normalize_name("RMS_Norm") == "rms_norm"


@pytest.mark.parametrize("name", explain.NORMS)
@pytest.mark.parametrize("groups", [1, 2, C])
def test_shared_mask_is_the_set_the_reference_normalizes_together(name, groups):
    depends = _dependence(name, groups)
    ids = explain.statistic_index(name, N, C, HW, groups).flatten()
    # the partition into statistics is the reference's, element for element
    assert torch.equal(depends, ids[:, None] == ids[None, :])
    for which in [(0, 0, 0), (N - 1, C - 1, HW - 1), (1, 2, 3)]:
        mask = explain.shared_mask(name, N, C, HW, groups, which=which)
        assert mask.shape == (N, C, HW) and mask.dtype == torch.bool
        w = (which[0] * C + which[1]) * HW + which[2]
        assert torch.equal(mask.flatten(), depends[w])
        assert mask[which]


def test_the_sets_themselves():
    """The sets spelled out, for the default picture's element (0, 0, 0)."""
    n, c, hw, g = 4, 6, 5, 3
    bn = explain.shared_mask("batch_norm", n, c, hw, g)
    assert bn[:, 0, :].all() and not bn[:, 1:, :].any()  # channel 0, every sample and position
    ln = explain.shared_mask("layer_norm", n, c, hw, g)
    assert ln[0].all() and not ln[1:].any()  # sample 0, every channel and position
    assert torch.equal(explain.shared_mask("rms_norm", n, c, hw, g), ln)
    inorm = explain.shared_mask("instance_norm", n, c, hw, g)
    assert inorm[0, 0].all() and inorm.sum() == hw  # one channel map
    gn = explain.shared_mask("group_norm", n, c, hw, g)
    assert gn[0, : c // g].all() and gn.sum() == (c // g) * hw  # the C/G channels of group 0
    assert torch.equal(explain.shared_mask("group_norm_silu", n, c, hw, g), gn)
    # the origin notes' mistake: GroupNorm with per-channel statistics is InstanceNorm
    assert not torch.equal(gn, inorm)
    assert torch.equal(explain.shared_mask("group_norm", n, c, hw, groups=c), inorm)
    assert torch.equal(explain.shared_mask("group_norm", n, c, hw, groups=1), ln)
    assert torch.equal(explain.shared_mask("sync_batch_norm", n, c, hw, g), bn)


def test_rank_of_sample():
    assert explain.rank_of_sample(4, 2) == [0, 0, 1, 1]
    assert explain.rank_of_sample(5, 2) == [0, 0, 0, 1, 1]
    assert explain.rank_of_sample(3, 3) == [0, 1, 2]
    with pytest.raises(ValueError):
        explain.rank_of_sample(2, 3)


def test_bad_sizes():
    with pytest.raises(ValueError, match=r"num_channels \(5\) must be divisible by num_groups \(2\)"):
        explain.shared_mask("group_norm", 2, 5, 3, groups=2)
    with pytest.raises(ValueError, match="out of range"):
        explain.shared_mask("layer_norm", 2, 4, 3, 1, which=(2, 0, 0))
    with pytest.raises(ValueError, match="positive"):
        explain.statistic_index("layer_norm", 0, 4, 3, 1)


@pytest.mark.parametrize("call", [
    lambda: explain.describe("weight_norm"),
    lambda: explain.shared_mask("batchnorm3"),
    lambda: explain.statistic_index("spectral_norm"),
    lambda: explain.draw("weight_norm"),
])
def test_unknown_names_raise_and_list_the_known_ones(call):
    with pytest.raises(ValueError) as info:
        call()
    for name in explain.NORMS:
        assert name in str(info.value)


_YEARS = {
    "batch_norm": "2015", "layer_norm": "2016", "instance_norm": "2016", "group_norm": "2018",
    "rms_norm": "2019", "sync_batch_norm": "2018", "group_norm_silu": "2018",
    "fused_add_rms_norm": "2019", "fused_add_layer_norm": "2016",
}
_ARXIV = {
    "batch_norm": "1502.03167", "layer_norm": "1607.06450", "instance_norm": "1607.08022",
    "group_norm": "1803.08494", "rms_norm": "1910.07467", "sync_batch_norm": "1711.07240",
    "group_norm_silu": "1803.08494", "fused_add_rms_norm": "1910.07467", "fused_add_layer_norm": "1607.06450",
}


@pytest.mark.parametrize("name", explain.NORMS)
def test_describe(name):
    text = explain.describe(name)
    assert _YEARS[name] in text and f"arXiv:{_ARXIV[name]}" in text
    assert "Axes" in text and "Learnable" in text and "normkit.nn." in text
    axes = next(line for line in text.splitlines() if line.startswith("Axes"))
    assert any(word in axes for word in ("H, W", "normalized_shape", "channels"))
    assert explain.describe(name.replace("_", "-").upper()) == text


def _words(name: str) -> str:
    return " ".join(explain.describe(name).split())  # the summary's lines are wrapped


def test_describe_states_the_torch_semantics():
    assert "unbiased batch variance" in _words("batch_norm") and "biased variance" in _words("batch_norm")
    assert "affine=False" in _words("instance_norm")
    assert "track_running_stats=False" in _words("instance_norm")
    assert "finfo(torch.float32).eps" in _words("rms_norm")
    assert "no bias" in _words("rms_norm") and "Nothing is subtracted" in _words("rms_norm")
    assert "shape normalized_shape" in _words("layer_norm")
    assert "bias (β) of shape (C,)" in _words("group_norm")  # per-channel affine, not per group


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_draw_all_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    paths = explain.draw_all(tmp_path / "images", dpi=40)  # every picture, small: the test stays fast
    assert sorted(p.name for p in paths) == sorted([f"{n}.png" for n in explain.NORMS] + ["overview.png"])
    for path in paths:
        width, height = _png_size(path)
        assert height == round(6.0 * 40) or path.name == "overview.png"
        assert width >= (3.5 * height if path.name == "overview.png" else height)


def test_pictures_at_full_size(tmp_path):
    pytest.importorskip("matplotlib")
    path = explain.draw("group_norm", tmp_path / "gn.png")
    assert 20_000 < path.stat().st_size < 500_000
    assert _png_size(path) == (round(6.4 * explain.DPI), round(6.0 * explain.DPI))
    path = explain.draw_overview(tmp_path / "overview.png")
    width, height = _png_size(path)
    assert 50_000 < path.stat().st_size < 1_000_000 and width > 3.5 * height


def test_draw_returns_a_figure_and_validates():
    pytest.importorskip("matplotlib")
    fig = explain.draw("group_norm", n=2, c=8, hw=3, groups=4)
    assert fig.axes and fig.texts
    assert any("GroupNorm" in t.get_text() for t in fig.texts)
    assert any("only the scale" in t.get_text() for t in explain.draw("rms_norm").texts)
    with pytest.raises(ValueError, match="divisible"):
        explain.draw("group_norm", c=6, groups=4)
    with pytest.raises(ValueError, match="ranks"):
        explain.draw("sync_batch_norm", n=2, ranks=3)


def test_main_explain(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert explain.main_explain("GroupNorm", None) == 0
    out = capsys.readouterr().out
    assert "Wu" in out and "1803.08494" in out and "mean[n, g]" in out  # brackets are not rich markup
    assert explain.main_explain("rms-norm", str(tmp_path / "rms.png")) == 0
    _png_size(tmp_path / "rms.png")
    assert explain.main_explain("layer_norm", str(tmp_path)) == 0  # a directory: <name>.png in it
    assert (tmp_path / "layer_norm.png").is_file()
    assert explain.main_explain("weight_norm", None) == 2
    assert "group_norm" in capsys.readouterr().err
    assert explain.main_explain("all", None) == 0
    assert "instance_norm" in capsys.readouterr().out
