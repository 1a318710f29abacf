"""normkit.nn against torch.nn: every module behaviour of docs' torch-semantics.md, checked by running both.

Each test builds the torch.nn module and the normkit.nn module with the same arguments and the same
parameter/buffer values, runs both on the same input and compares. Numbers are compared with a float64
*truth* (torch's module in float64 on a float64 copy of the input) under normkit.testing's per-dtype
tolerances, with torch's own output as the same-precision baseline; structure (state_dict, repr,
dtypes, layouts, counters, errors) is compared exactly. Every numeric test runs under both normkit
backends, "reference" and "torch".
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit
import normkit.functional
import normkit.nn as NN
from normkit.backends import current_backend_name
from normkit.nn._compat import TORCH_HAS_BIAS_KWARG
from normkit.testing import assert_close

BACKENDS = ["reference", "torch"]
NAMES = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LayerNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "GroupNorm",
    "RMSNorm",
]
FUNCTIONAL_OF = {
    "BatchNorm1d": "batch_norm",
    "BatchNorm2d": "batch_norm",
    "BatchNorm3d": "batch_norm",
    "InstanceNorm1d": "instance_norm",
    "InstanceNorm2d": "instance_norm",
    "InstanceNorm3d": "instance_norm",
    "LayerNorm": "layer_norm",
    "GroupNorm": "group_norm",
    "RMSNorm": "rms_norm",
}


@pytest.fixture(params=BACKENDS)
def backend(request):
    with normkit.use_backend(request.param):
        assert current_backend_name() == request.param
        yield request.param


# --------------------------------------------------------------------------------------------------
# module specs and helpers
# --------------------------------------------------------------------------------------------------


def build_torch(name: str, *args, **kwargs) -> torch.nn.Module:
    """torch.nn's module; skips the test where the installed torch has no ``bias=`` for it (< 2.13)."""
    if "bias" in kwargs and name != "LayerNorm" and not TORCH_HAS_BIAS_KWARG:
        pytest.skip(f"torch {torch.__version__} has no bias= for {name}: nothing to compare with")
    return getattr(torch.nn, name)(*args, **kwargs)


@dataclass(frozen=True)
class Spec:
    """A module (class name and constructor arguments) and an input shape for it."""

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    shape: tuple = ()

    def build(self, ns: Any, **extra) -> torch.nn.Module:
        if ns is torch.nn:
            return build_torch(self.name, *self.args, **{**self.kwargs, **extra})
        return getattr(ns, self.name)(*self.args, **{**self.kwargs, **extra})

    @property
    def has_running_stats(self) -> bool:
        return self.kwargs.get("track_running_stats", self.name.startswith("BatchNorm"))

    @property
    def mode_matters(self) -> bool:
        """Whether train() and eval() take different paths (LayerNorm, GroupNorm, RMSNorm: no)."""
        return self.name.startswith(("BatchNorm", "InstanceNorm"))


def _ids(specs: dict[str, Spec]) -> dict[str, list]:
    """parametrize's argvalues and ids for a dict of specs."""
    return {"argvalues": list(specs.values()), "ids": list(specs)}


def _with_modes(specs: dict[str, Spec]) -> dict[str, list]:
    """(spec, training) pairs: train for every spec, eval too where the mode matters."""
    values, ids = [], []
    for key, spec in specs.items():
        for training in (True, False) if spec.mode_matters else (True,):
            values.append((spec, training))
            ids.append(f"{key}-{'train' if training else 'eval'}")
    return {"argvalues": values, "ids": ids}


SPECS: dict[str, Spec] = {
    "bn1d-2d": Spec("BatchNorm1d", (3,), {}, (6, 3)),
    "bn1d-3d": Spec("BatchNorm1d", (3,), {}, (4, 3, 5)),
    "bn2d": Spec("BatchNorm2d", (3,), {}, (2, 3, 4, 5)),
    "bn3d": Spec("BatchNorm3d", (2,), {}, (2, 2, 3, 2, 3)),
    "bn2d-no-affine": Spec("BatchNorm2d", (3,), {"affine": False}, (2, 3, 3, 5)),
    "bn2d-no-bias": Spec("BatchNorm2d", (3,), {"bias": False}, (2, 3, 3, 5)),
    "bn2d-no-tracking": Spec("BatchNorm2d", (3,), {"track_running_stats": False}, (2, 3, 3, 5)),
    "bn1d-momentum-none": Spec("BatchNorm1d", (3,), {"momentum": None}, (5, 3, 2)),
    "bn1d-eps": Spec("BatchNorm1d", (4,), {"eps": 0.3, "momentum": 0.5}, (7, 4)),
    "in1d": Spec("InstanceNorm1d", (3,), {}, (2, 3, 7)),
    "in1d-unbatched-tracking": Spec("InstanceNorm1d", (3,), {"track_running_stats": True}, (3, 7)),
    "in2d-affine": Spec("InstanceNorm2d", (3,), {"affine": True}, (2, 3, 4, 5)),
    "in2d-affine-tracking": Spec(
        "InstanceNorm2d", (3,), {"affine": True, "track_running_stats": True}, (2, 3, 4, 5)
    ),
    "in2d-unbatched": Spec("InstanceNorm2d", (2,), {"affine": True}, (2, 3, 5)),
    "in3d-no-bias": Spec("InstanceNorm3d", (2,), {"affine": True, "bias": False}, (2, 2, 3, 2, 3)),
    "gn": Spec("GroupNorm", (2, 4), {}, (2, 4, 3, 5)),
    "gn-2d-input": Spec("GroupNorm", (3, 6), {}, (5, 6)),
    "gn-3d-input": Spec("GroupNorm", (1, 3), {"eps": 1e-3}, (2, 3, 7)),
    "gn-5d-input": Spec("GroupNorm", (2, 2), {}, (2, 2, 2, 3, 2)),
    "gn-no-affine": Spec("GroupNorm", (2, 4), {"affine": False}, (2, 4, 3, 5)),
    "gn-no-bias": Spec("GroupNorm", (4, 4), {"bias": False}, (2, 4, 3, 5)),
    "ln": Spec("LayerNorm", (5,), {}, (2, 3, 5)),
    "ln-two-dims": Spec("LayerNorm", ((3, 5),), {}, (2, 3, 5)),
    "ln-no-bias": Spec("LayerNorm", (5,), {"bias": False}, (4, 5)),
    "ln-no-affine": Spec(
        "LayerNorm", ([5],), {"elementwise_affine": False, "eps": 1e-3}, (2, 3, 5)
    ),
    "ln-1d-input": Spec("LayerNorm", (5,), {}, (5,)),
    "rms": Spec("RMSNorm", (5,), {}, (2, 3, 5)),
    "rms-two-dims-eps": Spec("RMSNorm", ([3, 5],), {"eps": 1e-3}, (2, 3, 5)),
    "rms-no-affine": Spec("RMSNorm", (5,), {"elementwise_affine": False}, (4, 5)),
    "rms-1d-input": Spec("RMSNorm", (5,), {}, (5,)),
}


@torch.no_grad()
def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial parameters and running statistics (so that affine and eval mode matter)."""
    for name, p in module.named_parameters():
        p.copy_(
            (1 + 0.5 * torch.randn(p.shape)) if name == "weight" else 0.5 * torch.randn(p.shape)
        )
    for name, b in module.named_buffers():
        if name == "running_mean":
            b.copy_(0.5 * torch.randn(b.shape))
        elif name == "running_var":
            b.copy_(0.5 + torch.rand(b.shape))
    return module


def make_pair(spec: Spec, training: bool = True, randomize: bool = True, **extra):
    """(torch module, normkit module) with equal arguments, state and mode."""
    ref = spec.build(torch.nn, **extra)
    ours = spec.build(NN, **extra)
    if randomize:
        randomize_(ref)
    ours.load_state_dict(ref.state_dict())
    ref.train(training)
    ours.train(training)
    return ref, ours


def fwd_bwd(
    module: torch.nn.Module,
    leaf_data: torch.Tensor,
    dy: torch.Tensor | None,
    view: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """Forward ``view(leaf)`` and backward ``dy``: (output, {"input": dleaf, <param>: dparam})."""
    leaf = leaf_data.detach().clone().requires_grad_(True)
    x = leaf if view is None else view(leaf)
    y = module(x)
    grads = {}
    if dy is not None:
        y.backward(dy)
        grads["input"] = leaf.grad
        grads.update({n: p.grad for n, p in module.named_parameters()})
    return y, grads


def compare_with_torch(
    ref: torch.nn.Module,
    ours: torch.nn.Module,
    x: torch.Tensor,
    view: Callable | None = None,
    backward: bool = True,
    msg: str = "",
):
    """Run torch's module, normkit's and a float64 copy of torch's (the truth); compare everything.

    Returns (ours' output, torch's output).
    """
    truth_mod = copy.deepcopy(ref).double()
    out_shape = (x if view is None else view(x)).shape
    dy = torch.randn(out_shape, dtype=torch.float64).to(x.dtype) if backward else None
    y_t, g_t = fwd_bwd(truth_mod, x.double(), None if dy is None else dy.double(), view)
    y_r, g_r = fwd_bwd(ref, x, dy, view)
    y_o, g_o = fwd_bwd(ours, x, dy, view)

    assert y_o.dtype == y_r.dtype, f"{msg}: output dtype {y_o.dtype} != torch's {y_r.dtype}"
    assert y_o.shape == y_r.shape
    assert_close(y_o, y_t, baseline=y_r, msg=f"{msg} output")
    assert g_o.keys() == g_r.keys()
    for k in g_r:
        assert (g_o[k] is None) == (g_r[k] is None), f"{msg}: grad of {k}"
        if g_r[k] is None:
            continue
        assert g_o[k].dtype == g_r[k].dtype, (
            f"{msg}: grad of {k} dtype {g_o[k].dtype} != {g_r[k].dtype}"
        )
        assert_close(g_o[k], g_t[k], baseline=g_r[k], msg=f"{msg} grad of {k}")
    compare_buffers(ref, ours, truth_mod, msg)
    return y_o, y_r


def compare_buffers(
    ref: torch.nn.Module, ours: torch.nn.Module, truth: torch.nn.Module | None = None, msg: str = ""
) -> None:
    ref_buffers, our_buffers = dict(ref.named_buffers()), dict(ours.named_buffers())
    assert our_buffers.keys() == ref_buffers.keys()
    truth_buffers = dict(truth.named_buffers()) if truth is not None else ref_buffers
    for k, b in ref_buffers.items():
        o = our_buffers[k]
        assert o.dtype == b.dtype, f"{msg}: buffer {k} dtype {o.dtype} != torch's {b.dtype}"
        assert o.requires_grad is False and o.grad_fn is None, f"{msg}: buffer {k} carries a graph"
        if not b.is_floating_point():
            assert torch.equal(o, b), f"{msg}: buffer {k} = {o} != torch's {b}"
        else:
            assert_close(o, truth_buffers[k], dtype=b.dtype, baseline=b, msg=f"{msg} buffer {k}")


def rand(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------------
# constructors, class hierarchy, state
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_constructor_signature_matches_torch(name):
    # eval_str: normkit's modules use postponed annotations ("float"), torch's real ones (float)
    ours = inspect.signature(getattr(NN, name), eval_str=True)
    theirs = inspect.signature(getattr(torch.nn, name), eval_str=True)
    if "bias" in ours.parameters and "bias" not in theirs.parameters:
        # torch < 2.13: normkit adds 2.13's keyword-only bias=True and is otherwise the same
        bias = inspect.Parameter("bias", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=bool)
        theirs = theirs.replace(parameters=[*theirs.parameters.values(), bias])
    assert ours == theirs
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
        (p.name, p.kind, p.default) for p in theirs.parameters.values()
    ]


@pytest.mark.parametrize("name", NAMES)
def test_is_the_torch_class(name):
    cls = getattr(NN, name)
    assert issubclass(cls, getattr(torch.nn, name))
    assert cls.__name__ == name
    args = (2, 4) if name == "GroupNorm" else (4,)
    m = cls(*args)
    assert isinstance(m, getattr(torch.nn, name))
    if name.startswith("BatchNorm"):
        assert isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        assert not isinstance(m, torch.nn.SyncBatchNorm)
    if name.startswith("InstanceNorm"):
        assert isinstance(m, torch.nn.modules.instancenorm._InstanceNorm)
        assert not isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    assert type(m)._version == getattr(torch.nn, name)._version


STATE_CONFIGS: dict[str, tuple[str, tuple, dict]] = {
    "bn1d": ("BatchNorm1d", (3,), {}),
    "bn2d-positional": ("BatchNorm2d", (3, 1e-3, 0.2, True, True), {}),
    "bn3d": ("BatchNorm3d", (3,), {}),
    "bn-no-affine": ("BatchNorm2d", (3,), {"affine": False}),
    "bn-no-tracking": ("BatchNorm2d", (3,), {"track_running_stats": False}),
    "bn-no-bias": ("BatchNorm2d", (3,), {"bias": False}),
    "bn-no-affine-no-bias": ("BatchNorm1d", (3,), {"affine": False, "bias": False}),
    "bn-momentum-none": ("BatchNorm1d", (3,), {"momentum": None}),
    "in1d": ("InstanceNorm1d", (3,), {}),
    "in2d-affine": ("InstanceNorm2d", (3,), {"affine": True}),
    "in2d-tracking": ("InstanceNorm2d", (3,), {"track_running_stats": True}),
    "in3d-affine-tracking": ("InstanceNorm3d", (3,), {"affine": True, "track_running_stats": True}),
    "in-affine-no-bias": ("InstanceNorm1d", (3,), {"affine": True, "bias": False}),
    "in-momentum-none": ("InstanceNorm1d", (3,), {"momentum": None, "track_running_stats": True}),
    "ln": ("LayerNorm", (5,), {}),
    "ln-list-shape": ("LayerNorm", ([3, 5],), {}),
    "ln-size-shape": ("LayerNorm", (torch.Size([3, 5]),), {"eps": 1e-3}),
    "ln-no-bias-positional": ("LayerNorm", (5, 1e-5, True, False), {}),
    "ln-no-affine": ("LayerNorm", (5,), {"elementwise_affine": False}),
    "gn": ("GroupNorm", (2, 4), {}),
    "gn-no-affine": ("GroupNorm", (2, 4), {"affine": False}),
    "gn-no-bias": ("GroupNorm", (2, 4), {"bias": False}),
    "rms": ("RMSNorm", (5,), {}),
    "rms-eps": ("RMSNorm", ([3, 5], 1e-6), {}),
    "rms-no-affine": ("RMSNorm", (5,), {"elementwise_affine": False}),
}


def _public_attributes(m: torch.nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(m).items() if not k.startswith("_")}


def assert_same_structure(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Attributes, parameters, buffers, state_dict (keys, order, values, dtypes), repr."""
    assert _public_attributes(ours) == _public_attributes(ref)
    for k, v in _public_attributes(ref).items():
        assert type(getattr(ours, k)) is type(v), k  # e.g. normalized_shape is a tuple
    for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert hasattr(ours, attr) == hasattr(ref, attr), attr
        if hasattr(ref, attr):
            assert (getattr(ours, attr) is None) == (getattr(ref, attr) is None), attr
    assert [(n, p.dtype, p.requires_grad, type(p)) for n, p in ours.named_parameters()] == [
        (n, p.dtype, p.requires_grad, type(p)) for n, p in ref.named_parameters()
    ]
    assert [(n, b.dtype) for n, b in ours.named_buffers()] == [
        (n, b.dtype) for n, b in ref.named_buffers()
    ]
    assert list(ours._buffers) == list(ref._buffers) and list(ours._parameters) == list(
        ref._parameters
    )
    sd_o, sd_r = ours.state_dict(), ref.state_dict()
    assert list(sd_o) == list(sd_r)
    for k in sd_r:
        assert sd_o[k].dtype == sd_r[k].dtype, k
        assert sd_o[k].shape == sd_r[k].shape, k
        assert torch.equal(sd_o[k], sd_r[k]), k
    assert sd_o._metadata[""]["version"] == sd_r._metadata[""]["version"]
    assert ours.extra_repr() == ref.extra_repr()
    assert repr(ours) == repr(ref)


@pytest.mark.parametrize("config", list(STATE_CONFIGS.values()), ids=list(STATE_CONFIGS))
def test_fresh_module_state_matches_torch(config):
    name, args, kwargs = config
    ref, ours = build_torch(name, *args, **kwargs), getattr(NN, name)(*args, **kwargs)
    assert_same_structure(ours, ref)
    assert ours.training is True


@pytest.mark.skipif(not TORCH_HAS_BIAS_KWARG, reason="documented facts of torch 2.13 (bias=)")
@pytest.mark.parametrize(
    "name,args,expected_keys",
    [
        (
            "BatchNorm2d",
            {},
            ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"],
        ),
        ("BatchNorm2d", {"affine": False}, ["running_mean", "running_var", "num_batches_tracked"]),
        ("BatchNorm2d", {"track_running_stats": False}, ["weight", "bias"]),
        (
            "BatchNorm2d",
            {"bias": False},
            ["weight", "running_mean", "running_var", "num_batches_tracked"],
        ),
        ("InstanceNorm2d", {}, []),
        (
            "InstanceNorm2d",
            {"affine": True, "track_running_stats": True},
            ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"],
        ),
        ("GroupNorm", {"bias": False}, ["weight"]),
    ],
)
def test_state_dict_keys_as_documented(name, args, expected_keys):
    """The documented keys (a check of the semantics notes themselves, then of normkit)."""
    cls_args = (2, 4) if name == "GroupNorm" else (4,)
    for ns in (torch.nn, NN):
        assert list(getattr(ns, name)(*cls_args, **args).state_dict()) == expected_keys


@pytest.mark.skipif(not TORCH_HAS_BIAS_KWARG, reason="documented facts of torch 2.13 (bias=)")
def test_documented_initial_values_and_extra_repr():
    bn = NN.BatchNorm1d(3)
    assert torch.equal(bn.weight, torch.ones(3)) and torch.equal(bn.bias, torch.zeros(3))
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(
        bn.running_var, torch.ones(3)
    )
    assert bn.num_batches_tracked.dtype == torch.int64 and int(bn.num_batches_tracked) == 0
    assert (
        bn.extra_repr()
        == "3, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True"
    )
    assert NN.BatchNorm1d(3, bias=False).bias is None
    assert NN.LayerNorm([2, 3]).normalized_shape == (2, 3)
    assert NN.RMSNorm(4).eps is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("config", list(STATE_CONFIGS.values()), ids=list(STATE_CONFIGS))
def test_dtype_argument_state_matches_torch(config, dtype):
    name, args, kwargs = config
    ref = build_torch(name, *args, **kwargs, dtype=dtype)
    ours = getattr(NN, name)(*args, **kwargs, dtype=dtype)
    assert_same_structure(ours, ref)
    if getattr(ours, "num_batches_tracked", None) is not None:
        assert ours.num_batches_tracked.dtype == torch.int64


@pytest.mark.parametrize("convert", ["half", "bfloat16", "double", "to-float16"])
@pytest.mark.parametrize(
    "config",
    [STATE_CONFIGS[k] for k in ("bn2d-positional", "in3d-affine-tracking", "ln", "gn", "rms")],
    ids=["bn", "in", "ln", "gn", "rms"],
)
def test_dtype_conversion_state_matches_torch(config, convert):
    name, args, kwargs = config
    ref, ours = build_torch(name, *args, **kwargs), getattr(NN, name)(*args, **kwargs)
    for m in (ref, ours):
        if convert == "to-float16":
            m.to(torch.float16)
        else:
            getattr(m, convert)()
    assert_same_structure(ours, ref)
    if getattr(ours, "num_batches_tracked", None) is not None:
        assert ours.num_batches_tracked.dtype == torch.int64


def test_group_norm_divisibility_error_at_construction():
    with pytest.raises(ValueError) as theirs:
        torch.nn.GroupNorm(2, 5)
    with pytest.raises(ValueError) as ours:
        NN.GroupNorm(2, 5)
    assert (
        str(ours.value)
        == str(theirs.value)
        == "num_channels (5) must be divisible by num_groups (2)"
    )


@pytest.mark.parametrize("config", list(STATE_CONFIGS.values()), ids=list(STATE_CONFIGS))
def test_reset_parameters_and_running_stats_match_torch(config):
    name, args, kwargs = config
    torch.manual_seed(0)
    ref, ours = build_torch(name, *args, **kwargs), getattr(NN, name)(*args, **kwargs)
    randomize_(ref)
    ours.load_state_dict(ref.state_dict())
    if hasattr(ref, "num_batches_tracked") and ref.num_batches_tracked is not None:
        ref.num_batches_tracked.fill_(7)
        ours.num_batches_tracked.fill_(7)
    if hasattr(ref, "reset_running_stats"):
        ref.reset_running_stats()
        ours.reset_running_stats()
        assert_same_structure(ours, ref)
        randomize_(ref)
        ours.load_state_dict(ref.state_dict())
    ref.reset_parameters()
    ours.reset_parameters()
    assert_same_structure(ours, ref)


# --------------------------------------------------------------------------------------------------
# state_dict loading
# --------------------------------------------------------------------------------------------------


def _load_outcome(module: torch.nn.Module, sd: dict, strict: bool = True):
    try:
        result = module.load_state_dict(sd, strict=strict)
    except Exception as e:  # noqa: BLE001
        return ("raised", type(e), str(e))
    return ("loaded", sorted(result.missing_keys), sorted(result.unexpected_keys))


def _old_state_dict(sd: dict, version: int | None) -> dict:
    """A copy of ``sd`` as saved before num_batches_tracked existed (version < 2, or no metadata)."""
    old = copy.copy(sd)
    old._metadata = copy.deepcopy(sd._metadata)
    old.pop("num_batches_tracked", None)
    if version is None:
        old._metadata[""].pop("version", None)
    else:
        old._metadata[""]["version"] = version
    return old


@pytest.mark.parametrize("version", [None, 0, 1])
@pytest.mark.parametrize("trained_steps", [0, 3])
@pytest.mark.parametrize(
    "config",
    [
        STATE_CONFIGS[k]
        for k in (
            "bn1d",
            "bn-no-affine",
            "bn-momentum-none",
            "in3d-affine-tracking",
            "in2d-tracking",
        )
    ],
    ids=["bn", "bn-no-affine", "bn-momentum-none", "in-affine-tracking", "in-tracking"],
)
def test_loading_old_state_dict_without_num_batches_tracked(config, trained_steps, version):
    name, args, kwargs = config
    torch.manual_seed(0)
    source = randomize_(build_torch(name, *args, **kwargs))
    old = _old_state_dict(source.state_dict(), version)
    ref, ours = build_torch(name, *args, **kwargs), getattr(NN, name)(*args, **kwargs)
    for m in (ref, ours):
        m.num_batches_tracked.fill_(trained_steps)
    assert _load_outcome(ours, _old_state_dict(old, version)) == _load_outcome(
        ref, _old_state_dict(old, version)
    )
    assert_same_structure(ours, ref)
    assert ours.num_batches_tracked.dtype == torch.int64
    if trained_steps == 0:
        assert int(ours.num_batches_tracked) == 0
    # version 2 without the key is an error (strict), the same one
    current = source.state_dict()
    current.pop("num_batches_tracked")
    assert _load_outcome(ours, current) == _load_outcome(ref, copy.copy(current))


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("version", [None, 1])
def test_loading_pre_0_4_instance_norm_state_dict_with_running_stats(version, strict):
    """Untracked InstanceNorm given running stats by an old checkpoint: torch's error (or warning) exactly."""
    sd = NN.InstanceNorm1d(3, track_running_stats=True).state_dict()
    sd = _old_state_dict(sd, version)
    ref, ours = torch.nn.InstanceNorm1d(3), NN.InstanceNorm1d(3)
    assert _load_outcome(ours, _old_state_dict(sd, version), strict) == _load_outcome(
        ref, _old_state_dict(sd, version), strict
    )


@pytest.mark.parametrize("config", list(STATE_CONFIGS.values()), ids=list(STATE_CONFIGS))
def test_state_dict_round_trips_between_torch_and_normkit(config):
    name, args, kwargs = config
    torch.manual_seed(0)
    ours = randomize_(getattr(NN, name)(*args, **kwargs))
    ref = build_torch(name, *args, **kwargs)
    assert _load_outcome(ref, ours.state_dict()) == ("loaded", [], [])
    assert_same_structure(ours, ref)
    fresh = getattr(NN, name)(*args, **kwargs)
    assert _load_outcome(fresh, ref.state_dict()) == ("loaded", [], [])
    assert_same_structure(fresh, ref)


# --------------------------------------------------------------------------------------------------
# forward and backward against torch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,training", **_with_modes(SPECS))
def test_forward_backward_matches_torch(spec, training, backend):
    torch.manual_seed(0)
    ref, ours = make_pair(spec, training)
    x = rand(spec.shape)
    compare_with_torch(ref, ours, x, msg=f"{spec.name} {backend}")
    # a second call on the updated state (running statistics moved, num_batches_tracked counted)
    compare_with_torch(
        ref, ours, 1.5 * rand(spec.shape) + 0.3, msg=f"{spec.name} {backend} second call"
    )


@pytest.mark.parametrize("dtype", [torch.float64])
@pytest.mark.parametrize(
    "spec", **_ids({k: SPECS[k] for k in ("bn2d", "in2d-affine-tracking", "gn", "ln", "rms")})
)
def test_float64_modules_match_torch(spec, dtype, backend):
    torch.manual_seed(0)
    ref, ours = make_pair(spec, True, dtype=dtype)
    compare_with_torch(ref, ours, rand(spec.shape, dtype), msg=f"{spec.name} fp64")
    ref.eval(), ours.eval()
    compare_with_torch(ref, ours, rand(spec.shape, dtype), msg=f"{spec.name} fp64 eval")


FAMILY_SPECS = {
    k: SPECS[k]
    for k in ("bn2d", "bn1d-2d", "in2d-affine", "in1d-unbatched-tracking", "gn", "ln", "rms")
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spec", **_ids(FAMILY_SPECS))
def test_forward_goes_through_normkit(spec, training, backend, monkeypatch):
    """The module's forward calls normkit.functional (and, under "reference", normkit's autograd Function)."""
    fn_name = FUNCTIONAL_OF[spec.name]
    real = getattr(normkit.functional, fn_name)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(normkit.functional, fn_name, spy)
    torch.manual_seed(0)
    _, ours = make_pair(spec, training)
    x = rand(spec.shape).requires_grad_(True)
    y = ours(x)
    assert len(calls) == 1
    if backend == "reference" and len(spec.shape) > 1 + spec.name.startswith("InstanceNorm"):
        assert "_Norm" in type(y.grad_fn).__name__, type(y.grad_fn).__name__
    if backend == "torch":
        assert "_Norm" not in type(y.grad_fn).__name__


# --------------------------------------------------------------------------------------------------
# BatchNorm running statistics
# --------------------------------------------------------------------------------------------------


BN_STEP_SPECS = {
    "bn1d-2d": Spec("BatchNorm1d", (3,), {}, (5, 3)),
    "bn1d-3d": Spec("BatchNorm1d", (3,), {}, (2, 3, 4)),
    "bn2d": Spec("BatchNorm2d", (2,), {}, (3, 2, 2, 3)),
    "bn3d": Spec("BatchNorm3d", (2,), {}, (2, 2, 2, 2, 3)),
}


@pytest.mark.parametrize("momentum", [0.1, 0.7, None], ids=["m0.1", "m0.7", "cumulative"])
@pytest.mark.parametrize("spec", **_ids(BN_STEP_SPECS))
def test_batch_norm_running_stats_over_training_steps(spec, momentum, backend):
    torch.manual_seed(0)
    ref, ours = make_pair(spec, True, randomize=False, momentum=momentum)
    inputs = [rand(spec.shape) * (1 + i) + i for i in range(4)]
    for step, x in enumerate(inputs, start=1):
        compare_with_torch(ref, ours, x, msg=f"step {step}")
        assert int(ours.num_batches_tracked) == step
    # the documented rule, independently of torch: unbiased variance; momentum None = plain average
    dims = [0] + list(range(2, len(spec.shape)))
    expect_mean, expect_var = (
        torch.zeros(ours.num_features, dtype=torch.float64),
        torch.ones(ours.num_features, dtype=torch.float64),
    )
    for step, x in enumerate(inputs, start=1):
        m = 1.0 / step if momentum is None else momentum
        xd = x.double()
        expect_mean = (1 - m) * expect_mean + m * xd.mean(dims)
        expect_var = (1 - m) * expect_var + m * xd.var(dims, unbiased=True)
    assert_close(ours.running_mean, expect_mean, dtype=torch.float32)
    assert_close(ours.running_var, expect_var, dtype=torch.float32)
    # eval normalizes with the running statistics and moves nothing
    ref.eval(), ours.eval()
    compare_with_torch(ref, ours, inputs[0], msg="eval")
    assert int(ours.num_batches_tracked) == len(inputs)


@pytest.mark.parametrize("how", ["track_running_stats=False", "buffers set to None"])
def test_batch_norm_eval_without_running_stats_uses_batch_stats(how, backend):
    spec = Spec("BatchNorm2d", (3,), {}, (4, 3, 2, 3))
    torch.manual_seed(0)
    if how == "track_running_stats=False":
        ref, ours = make_pair(spec, False, track_running_stats=False)
    else:
        ref, ours = make_pair(spec, False)
        for m in (ref, ours):
            m.running_mean = None
            m.running_var = None
    x = rand(spec.shape) * 3 + 2
    y_o, _ = compare_with_torch(ref, ours, x)
    # batch statistics: every channel comes out with (weight-scaled) zero mean
    w, b = ours.weight.detach().view(1, -1, 1, 1), ours.bias.detach().view(1, -1, 1, 1)
    assert_close(
        ((y_o.detach() - b) / w).mean((0, 2, 3)),
        torch.zeros(3, dtype=torch.float64),
        dtype=torch.float32,
    )


def test_batch_norm_no_tracking_in_training_passes_no_buffers(backend):
    spec = Spec("BatchNorm1d", (3,), {"track_running_stats": False}, (4, 3))
    torch.manual_seed(0)
    ref, ours = make_pair(spec, True)
    compare_with_torch(ref, ours, rand(spec.shape))
    assert ours.running_mean is None and ours.num_batches_tracked is None


@pytest.mark.parametrize(
    "shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2)], ids=["0xC", "0xCxL", "0xCxHxW"]
)
def test_batch_norm_empty_batch_in_training(shape, backend):
    name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d"}[len(shape)]
    spec = Spec(name, (3,), {}, shape)
    torch.manual_seed(0)
    ref, ours = make_pair(spec, True)
    before = {k: v.clone() for k, v in ours.named_buffers()}
    y_o, _y_r = compare_with_torch(ref, ours, rand(shape))
    assert y_o.shape == shape
    assert torch.equal(ours.running_mean, before["running_mean"])
    assert torch.equal(ours.running_var, before["running_var"])
    assert (
        int(ours.num_batches_tracked)
        == int(before["num_batches_tracked"]) + 1
        == int(ref.num_batches_tracked)
    )


@pytest.mark.parametrize(
    "spec",
    **_ids(
        {
            k: SPECS[k]
            for k in (
                "bn2d",
                "bn1d-momentum-none",
                "in2d-affine-tracking",
                "in1d-unbatched-tracking",
            )
        }
    ),
)
def test_running_stats_never_carry_a_graph(spec, backend):
    torch.manual_seed(0)
    _ref, ours = make_pair(spec, True)
    x = rand(spec.shape).requires_grad_(True)
    y = ours(x)
    for name, b in ours.named_buffers():
        assert not b.requires_grad and b.grad_fn is None and b.is_leaf, name
    y.sum().backward()
    for name, b in ours.named_buffers():
        assert not b.requires_grad and b.grad_fn is None and b.grad is None, name
    # a second step with the parameters requiring grad too: still no graph
    y = ours(x * 2)
    (y * y).sum().backward()
    for name, b in ours.named_buffers():
        assert not b.requires_grad and b.grad_fn is None, name


# --------------------------------------------------------------------------------------------------
# InstanceNorm
# --------------------------------------------------------------------------------------------------


IN_STEP_SPECS = {
    "in1d": Spec("InstanceNorm1d", (3,), {"track_running_stats": True}, (2, 3, 5)),
    "in1d-unbatched": Spec("InstanceNorm1d", (3,), {"track_running_stats": True}, (3, 5)),
    "in2d-affine": Spec(
        "InstanceNorm2d", (2,), {"track_running_stats": True, "affine": True}, (3, 2, 2, 3)
    ),
    "in2d-unbatched": Spec("InstanceNorm2d", (2,), {"track_running_stats": True}, (2, 3, 3)),
    "in3d": Spec(
        "InstanceNorm3d", (2,), {"track_running_stats": True, "affine": True}, (2, 2, 2, 2, 3)
    ),
    "in3d-unbatched": Spec("InstanceNorm3d", (2,), {"track_running_stats": True}, (2, 2, 2, 3)),
}


@pytest.mark.parametrize("momentum", [0.1, 0.6, None], ids=["m0.1", "m0.6", "none"])
@pytest.mark.parametrize("spec", **_ids(IN_STEP_SPECS))
def test_instance_norm_running_stats_over_training_steps(spec, momentum, backend):
    torch.manual_seed(0)
    ref, ours = make_pair(spec, True, randomize=False, momentum=momentum)
    unbatched = len(spec.shape) == int(spec.name[-2]) + 1
    inputs = [rand(spec.shape) * (1 + i) + i for i in range(3)]
    for step, x in enumerate(inputs, start=1):
        compare_with_torch(ref, ours, x, msg=f"step {step}")
        assert int(ours.num_batches_tracked) == 0  # InstanceNorm never counts
    # documented rule: EMA of the batch-average of per-instance means / unbiased variances
    m = 0.0 if momentum is None else momentum
    expect_mean = torch.zeros(ours.num_features, dtype=torch.float64)
    expect_var = torch.ones(ours.num_features, dtype=torch.float64)
    for x in inputs:
        xd = x.double().unsqueeze(0) if unbatched else x.double()
        dims = tuple(range(2, xd.dim()))
        expect_mean = (1 - m) * expect_mean + m * xd.mean(dims).mean(0)
        expect_var = (1 - m) * expect_var + m * xd.var(dims, unbiased=True).mean(0)
    assert_close(ours.running_mean, expect_mean, dtype=torch.float32)
    assert_close(ours.running_var, expect_var, dtype=torch.float32)
    if momentum is None:  # frozen
        assert torch.equal(ours.running_mean, torch.zeros(ours.num_features))
        assert torch.equal(ours.running_var, torch.ones(ours.num_features))
    # eval with running statistics: uses them, moves nothing
    ref.eval(), ours.eval()
    before = ours.running_mean.clone()
    compare_with_torch(ref, ours, inputs[-1] + 1, msg="eval")
    assert torch.equal(ours.running_mean, before)


@pytest.mark.parametrize(
    "spec", **_ids({k: SPECS[k] for k in ("in1d", "in2d-affine", "in2d-unbatched")})
)
def test_instance_norm_eval_without_running_stats_uses_instance_stats(spec, backend):
    torch.manual_seed(0)
    ref, ours = make_pair(spec, False)
    x = rand(spec.shape) * 2 + 1
    y_o, _ = compare_with_torch(ref, ours, x)
    y = y_o.detach()
    if ours.affine:
        y = (y - ours.bias.detach().view(-1, 1, 1)) / ours.weight.detach().view(-1, 1, 1)
    spatial = tuple(range(y.dim() - int(spec.name[-2]), y.dim()))
    assert_close(
        y.mean(spatial),
        torch.zeros(y.mean(spatial).shape, dtype=torch.float64),
        dtype=torch.float32,
    )


@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("name", ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"])
def test_instance_norm_channel_mismatch(name, unbatched, backend):
    k = int(name[-2])
    shape = (5,) + (3,) * k if unbatched else (2, 5) + (3,) * k
    x = rand(shape)
    # with affine: torch's ValueError, word for word
    with pytest.raises(ValueError) as theirs:
        getattr(torch.nn, name)(3, affine=True)(x)
    with pytest.raises(ValueError) as ours:
        getattr(NN, name)(3, affine=True)(x)
    assert str(ours.value) == str(theirs.value)
    assert "to match num_features (3), but got: 5." in str(ours.value)
    # without: torch's UserWarning, and the same output
    outcomes = []
    for ns in (torch.nn, NN):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = getattr(ns, name)(3)(x)
        outcomes.append((y, [(w.category, str(w.message)) for w in caught]))
    (y_r, w_r), (y_o, w_o) = outcomes
    assert len(w_r) == 1 and w_r[0][0] is UserWarning
    assert w_o == w_r
    assert_close(y_o, y_r.double(), baseline=y_r)


# --------------------------------------------------------------------------------------------------
# RMSNorm eps=None
# --------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")
@pytest.mark.parametrize(
    "dtype,scale",
    [(torch.float32, 1e-4), (torch.float64, 1e-8), (torch.float16, 1e-3), (torch.bfloat16, 1e-3)],
    ids=["fp32", "fp64", "fp16", "bf16"],
)
def test_rms_norm_default_eps(dtype, scale, backend):
    """eps=None: float32's machine epsilon (float64's for float64 input). The input is scaled so that
    mean(x^2) is of the order of that epsilon: a wrong eps changes the output by a large factor."""
    torch.manual_seed(0)
    spec = Spec("RMSNorm", (6,), {}, (3, 6))
    ref, ours = make_pair(spec, True)
    for m in (ref, ours):
        m.to(dtype if dtype == torch.float64 else torch.float32)
    x = (rand(spec.shape, torch.float64) * scale).to(dtype)
    compare_with_torch(ref, ours, x, msg=f"RMSNorm eps=None {dtype}")
    # against the documented formula
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    xd = x.double()
    expect = (
        xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + eps) * ours.weight.detach().double()
    )
    assert_close(ours(x), expect, dtype=dtype, baseline=ref(x))


# --------------------------------------------------------------------------------------------------
# dtypes, autocast, layouts
# --------------------------------------------------------------------------------------------------

LOW_PRECISION_SPECS = {
    k: SPECS[k]
    for k in (
        "bn1d-2d",
        "bn2d",
        "bn2d-no-tracking",
        "in1d",
        "in2d-affine-tracking",
        "in2d-unbatched",
        "gn",
        "gn-2d-input",
        "ln",
        "ln-no-bias",
        "rms",
        "rms-no-affine",
    )
}


# torch's own F.rms_norm warns that it cannot use its fused kernel for fp16 input with an fp32 weight
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("spec,training", **_with_modes(LOW_PRECISION_SPECS))
def test_low_precision_input_with_fp32_parameters(spec, dtype, training, backend):
    torch.manual_seed(0)
    ref, ours = make_pair(spec, training)
    x = rand(spec.shape, dtype)
    y_o, _y_r = compare_with_torch(ref, ours, x, msg=f"{spec.name} {dtype}")
    assert y_o.dtype == dtype
    for name, p in ours.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
    for name, b in ours.named_buffers():
        assert b.dtype == (torch.int64 if name == "num_batches_tracked" else torch.float32), name


AUTOCAST_SPECS = {
    k: SPECS[k]
    for k in (
        "bn2d",
        "bn1d-2d",
        "in2d-affine-tracking",
        "in1d",
        "gn",
        "ln",
        "ln-no-bias",
        "rms",
        "rms-no-affine",
    )
}


@pytest.mark.parametrize("spec,training", **_with_modes(AUTOCAST_SPECS))
def test_cpu_autocast_bf16_keeps_fp32(spec, training, backend):
    torch.manual_seed(0)
    ref, ours = make_pair(spec, training)
    x = rand(spec.shape)
    truth = copy.deepcopy(ref).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_r = ref(x)
        y_o = ours(x)
    assert y_r.dtype == torch.float32  # the documented behaviour
    assert y_o.dtype == y_r.dtype
    assert_close(y_o, truth(x.double()), baseline=y_r)
    compare_buffers(ref, ours, truth)


CHANNELS_LAST_SPECS = {
    "bn2d": (Spec("BatchNorm2d", (3,), {}, (2, 3, 4, 5)), torch.channels_last),
    "bn3d": (Spec("BatchNorm3d", (3,), {}, (2, 3, 2, 3, 4)), torch.channels_last_3d),
    "bn2d-no-tracking": (
        Spec("BatchNorm2d", (3,), {"track_running_stats": False}, (2, 3, 4, 5)),
        torch.channels_last,
    ),
    "gn": (Spec("GroupNorm", (3, 6), {}, (2, 6, 3, 4)), torch.channels_last),
    "gn-5d": (Spec("GroupNorm", (1, 3), {}, (2, 3, 2, 3, 2)), torch.channels_last_3d),
    "rms": (Spec("RMSNorm", (5,), {}, (2, 3, 4, 5)), torch.channels_last),
    "rms-two-dims": (Spec("RMSNorm", ([4, 5],), {}, (2, 3, 4, 5)), torch.channels_last),
    "in2d": (Spec("InstanceNorm2d", (3,), {"affine": True}, (2, 3, 4, 5)), torch.channels_last),
    "in3d": (Spec("InstanceNorm3d", (3,), {}, (2, 3, 2, 3, 4)), torch.channels_last_3d),
    "ln": (Spec("LayerNorm", (5,), {}, (2, 3, 4, 5)), torch.channels_last),
    "ln-two-dims": (Spec("LayerNorm", ([4, 5],), {}, (2, 3, 4, 5)), torch.channels_last),
}


def _cases_with_modes(cases: dict[str, tuple]) -> dict[str, list]:
    """(spec, *rest, training) tuples: train, and eval too where the mode matters."""
    values, ids = [], []
    for key, (spec, *rest) in cases.items():
        for training in (True, False) if spec.mode_matters else (True,):
            values.append((spec, *rest, training))
            ids.append(f"{key}-{'train' if training else 'eval'}")
    return {"argvalues": values, "ids": ids}


@pytest.mark.parametrize("spec,fmt,training", **_cases_with_modes(CHANNELS_LAST_SPECS))
def test_channels_last_input_output_layout_matches_torch(spec, fmt, training, backend):
    torch.manual_seed(0)
    ref, ours = make_pair(spec, training)
    x = rand(spec.shape).contiguous(memory_format=fmt)
    assert not x.is_contiguous()
    y_o, y_r = compare_with_torch(ref, ours, x, msg=f"{spec.name} channels_last")
    for f in (torch.contiguous_format, fmt):
        assert y_o.is_contiguous(memory_format=f) == y_r.is_contiguous(memory_format=f), f
    assert y_o.stride() == y_r.stride()


def test_channels_last_layouts_as_documented():
    """The documented torch layouts (so that the comparison above cannot pass vacuously)."""
    x = rand((2, 3, 4, 5)).contiguous(memory_format=torch.channels_last)
    for ns in (torch.nn, NN):
        assert ns.BatchNorm2d(3)(x).is_contiguous(memory_format=torch.channels_last)
        assert ns.GroupNorm(3, 3)(x).is_contiguous(memory_format=torch.channels_last)
        assert ns.RMSNorm(5)(x).is_contiguous(memory_format=torch.channels_last)
        assert ns.InstanceNorm2d(3)(x).is_contiguous()
        assert ns.LayerNorm(5)(x).is_contiguous()


def _transpose_last(t):
    return t.transpose(-1, -2)


NONCONTIGUOUS = {
    # name: (spec, base shape, view)
    "bn2d-transposed": (Spec("BatchNorm2d", (3,), {}), (2, 3, 5, 4), _transpose_last),
    "bn1d-strided-batch": (Spec("BatchNorm1d", (3,), {}), (8, 3, 5), lambda t: t[::2]),
    "bn1d-2d-transposed": (Spec("BatchNorm1d", (3,), {}), (3, 6), lambda t: t.t()),
    "bn1d-permuted": (Spec("BatchNorm1d", (3,), {}), (4, 5, 3), lambda t: t.permute(0, 2, 1)),
    "in1d-strided-length": (
        Spec("InstanceNorm1d", (3,), {"affine": True}),
        (2, 3, 10),
        lambda t: t[..., ::2],
    ),
    "in2d-transposed": (
        Spec("InstanceNorm2d", (3,), {"track_running_stats": True}),
        (2, 3, 5, 4),
        _transpose_last,
    ),
    "gn-transposed": (Spec("GroupNorm", (2, 4), {}), (2, 4, 5, 3), _transpose_last),
    "gn-channel-slice": (Spec("GroupNorm", (2, 4), {}), (2, 8, 3), lambda t: t[:, 2:6]),
    "ln-strided-last": (Spec("LayerNorm", (5,), {}), (3, 10), lambda t: t[:, 1::2]),
    "ln-transposed": (Spec("LayerNorm", (4,), {}), (2, 4, 3), _transpose_last),
    "ln-two-dims-transposed": (Spec("LayerNorm", ((3, 4),), {}), (2, 4, 3), _transpose_last),
    "rms-strided-last": (Spec("RMSNorm", (5,), {}), (3, 10), lambda t: t[:, ::2]),
    "rms-transposed": (Spec("RMSNorm", (4,), {}), (2, 4, 3), _transpose_last),
    "rms-expanded": (Spec("RMSNorm", (4,), {}), (1, 4), lambda t: t.expand(3, 4)),
    "ln-expanded": (Spec("LayerNorm", (4,), {}), (1, 4), lambda t: t.expand(3, 4)),
}


@pytest.mark.parametrize("spec,base_shape,view,training", **_cases_with_modes(NONCONTIGUOUS))
def test_noncontiguous_input_matches_torch(spec, base_shape, view, training, backend):
    torch.manual_seed(0)
    ref, ours = make_pair(spec, training)
    base = rand(base_shape)
    assert not view(base).is_contiguous()
    y_o, y_r = compare_with_torch(ref, ours, base, view=view, msg=f"{spec.name} non-contiguous")
    assert y_o.is_contiguous() == y_r.is_contiguous()


# --------------------------------------------------------------------------------------------------
# train / eval
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", **_ids({k: SPECS[k] for k in ("bn2d", "in2d-affine-tracking", "gn", "ln", "rms")})
)
def test_train_eval_switching_matches_torch(spec, backend):
    """Alternate train and eval on one module pair: outputs, grads and buffers stay equal to torch's."""
    torch.manual_seed(0)
    ref, ours = make_pair(spec, True)
    for training in (True, False, True, True, False):
        ref.train(training)
        ours.train(training)
        compare_with_torch(ref, ours, rand(spec.shape) * 2 - 0.5, msg=f"training={training}")
    # and the result of eval differs from train for the running-stat norms (the mode is really used)
    x = rand(spec.shape)
    with torch.no_grad():
        ours.train()
        y_train = ours(x)
        ours.eval()
        y_eval = ours(x)
    differs = not torch.allclose(y_train, y_eval)
    assert differs == spec.has_running_stats


# --------------------------------------------------------------------------------------------------
# hypothesis: random (odd, prime) shapes, forward and backward against torch
# --------------------------------------------------------------------------------------------------

SIZES = st.sampled_from([1, 2, 3, 5, 7])
HYPOTHESIS = settings(max_examples=25, deadline=None, database=None)


def _check_random(spec: Spec, training: bool, backend: str, dtype: torch.dtype, seed: int) -> None:
    torch.manual_seed(seed)
    with normkit.use_backend(backend):
        ref, ours = make_pair(spec, training)
        if dtype == torch.float64:
            ref.double(), ours.double()
        compare_with_torch(
            ref, ours, rand(spec.shape, dtype) * 2 + 0.5, msg=f"{spec} {backend} {dtype}"
        )


COMMON = {
    "training": st.booleans(),
    "backend": st.sampled_from(BACKENDS),
    "dtype": st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    "seed": st.integers(0, 2**16),
}


@HYPOTHESIS
@given(data=st.data(), **COMMON)
def test_random_shapes_batch_norm(data, training, backend, dtype, seed):
    k = data.draw(st.integers(0, 3), label="spatial dims")
    n, c = data.draw(SIZES, label="N"), data.draw(SIZES, label="C")
    spatial = tuple(data.draw(SIZES) for _ in range(k))
    if training and n * math.prod(spatial) == 1:
        n = 2
    name = {0: "BatchNorm1d", 1: "BatchNorm1d", 2: "BatchNorm2d", 3: "BatchNorm3d"}[k]
    kwargs = {
        "affine": data.draw(st.booleans()),
        "momentum": data.draw(st.sampled_from([0.1, 0.5, None])),
    }
    _check_random(Spec(name, (c,), kwargs, (n, c) + spatial), training, backend, dtype, seed)


@HYPOTHESIS
@given(data=st.data(), **COMMON)
def test_random_shapes_instance_norm(data, training, backend, dtype, seed):
    k = data.draw(st.integers(1, 3), label="spatial dims")
    n, c = data.draw(SIZES, label="N"), data.draw(SIZES, label="C")
    spatial = tuple(data.draw(SIZES) for _ in range(k))
    if math.prod(spatial) == 1:
        spatial = (2,) + spatial[1:]
    unbatched = data.draw(st.booleans(), label="unbatched")
    kwargs = {"affine": data.draw(st.booleans()), "track_running_stats": data.draw(st.booleans())}
    shape = ((c,) if unbatched else (n, c)) + spatial
    _check_random(Spec(f"InstanceNorm{k}d", (c,), kwargs, shape), training, backend, dtype, seed)


@HYPOTHESIS
@given(data=st.data(), **COMMON)
def test_random_shapes_group_norm(data, training, backend, dtype, seed):
    groups, per_group = data.draw(SIZES, label="G"), data.draw(SIZES, label="C/G")
    k = data.draw(st.integers(0, 3), label="spatial dims")
    n = data.draw(SIZES, label="N")
    spatial = tuple(data.draw(SIZES) for _ in range(k))
    if n * per_group * math.prod(spatial) == 1:
        per_group = 2
    c = groups * per_group
    kwargs = {"affine": data.draw(st.booleans()), "eps": data.draw(st.sampled_from([1e-5, 1e-2]))}
    _check_random(
        Spec("GroupNorm", (groups, c), kwargs, (n, c) + spatial), training, backend, dtype, seed
    )


@HYPOTHESIS
@given(data=st.data(), **COMMON)
def test_random_shapes_layer_norm(data, training, backend, dtype, seed):
    shape = tuple(data.draw(st.lists(SIZES, min_size=1, max_size=4), label="shape"))
    k = data.draw(st.integers(1, len(shape)), label="normalized dims")
    kwargs = {"elementwise_affine": data.draw(st.booleans()), "bias": data.draw(st.booleans())}
    _check_random(Spec("LayerNorm", (shape[-k:],), kwargs, shape), training, backend, dtype, seed)


@HYPOTHESIS
@given(data=st.data(), **COMMON)
def test_random_shapes_rms_norm(data, training, backend, dtype, seed):
    shape = tuple(data.draw(st.lists(SIZES, min_size=1, max_size=4), label="shape"))
    k = data.draw(st.integers(1, len(shape)), label="normalized dims")
    kwargs = {
        "elementwise_affine": data.draw(st.booleans()),
        "eps": data.draw(st.sampled_from([None, 1e-6, 1e-2])),
    }
    _check_random(
        Spec("RMSNorm", (list(shape[-k:]),), kwargs, shape), training, backend, dtype, seed
    )
