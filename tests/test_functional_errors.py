"""Bad input: normkit raises what torch raises, with the same exception type and the same message.

Every case is a function of a namespace (``torch.nn.functional`` / ``normkit.functional``, or
``torch.nn`` / ``normkit.nn``) that builds its tensors afresh from a fixed seed, so torch and normkit
see identical arguments. The error cases first assert that *torch* raises (a case torch accepts is a
broken test, not a pass); the success cases assert that torch and normkit both accept and agree.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as TF
from torch.torch_version import TorchVersion

import normkit
import normkit.functional as NF
import normkit.nn as NN
from normkit.testing import assert_close

BACKENDS = ["reference", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with normkit.use_backend(request.param):
        yield request.param


def r(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A deterministic random tensor (callers reseed before each namespace's run)."""
    if dtype.is_floating_point:
        return torch.randn(*shape, dtype=torch.float64).to(dtype)
    return torch.randint(-5, 5, shape, dtype=dtype)


class Outcome:
    """What one call did: returned ``value`` or raised ``error``, and the warnings it emitted."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.value = fn()
            except Exception as e:  # noqa: BLE001 - capturing is the point
                self.error = e
        self.warnings = [(w.category, str(w.message)) for w in caught]

    def describe(self) -> str:
        if self.error is None:
            return "no exception"
        return f"{type(self.error).__name__}: {self.error}"


def run_both(case: Callable[[Any], Any], torch_ns: Any, ours_ns: Any) -> tuple[Outcome, Outcome]:
    torch.manual_seed(0)
    expected = Outcome(lambda: case(torch_ns))
    torch.manual_seed(0)
    got = Outcome(lambda: case(ours_ns))
    return expected, got


def assert_same_error(case: Callable[[Any], Any], torch_ns: Any = TF, ours_ns: Any = NF) -> None:
    expected, got = run_both(case, torch_ns, ours_ns)
    assert expected.error is not None, "test case is wrong: torch accepts it"
    assert got.error is not None, f"normkit accepted input torch rejects with {expected.describe()}"
    assert type(got.error) is type(expected.error), (
        f"{got.describe()}  !=  torch's {expected.describe()}"
    )
    assert str(got.error) == str(expected.error), (
        f"{got.describe()}  !=  torch's {expected.describe()}"
    )


def assert_same_success(case: Callable[[Any], Any], torch_ns: Any = TF, ours_ns: Any = NF) -> None:
    expected, got = run_both(case, torch_ns, ours_ns)
    assert expected.error is None, f"test case is wrong: torch raises {expected.describe()}"
    assert got.error is None, f"normkit rejects input torch accepts: {got.describe()}"
    assert got.warnings == expected.warnings
    want, have = expected.value, got.value
    assert have.shape == want.shape and have.dtype == want.dtype
    assert_close(have, want.double(), dtype=want.dtype, baseline=want)


# --------------------------------------------------------------------------------------------------
# functional error cases: name -> case(F)
# --------------------------------------------------------------------------------------------------

FUNCTIONAL_ERRORS: dict[str, Callable[[Any], Any]] = {
    # LayerNorm
    "ln-shape-1d": lambda F: F.layer_norm(r(2, 5), [4]),
    "ln-shape-2d": lambda F: F.layer_norm(r(2, 3, 5), [4, 5]),
    "ln-shape-2d-last-ok": lambda F: F.layer_norm(r(2, 3, 5), [2, 5]),
    "ln-input-too-small": lambda F: F.layer_norm(r(5), [2, 5]),
    "ln-weight-shape": lambda F: F.layer_norm(r(2, 4), [4], r(5)),
    "ln-weight-2d-shape": lambda F: F.layer_norm(r(2, 3, 4), [3, 4], r(4, 3)),
    "ln-bias-shape": lambda F: F.layer_norm(r(2, 4), [4], r(4), r(3)),
    "ln-bias-shape-no-weight": lambda F: F.layer_norm(r(2, 4), [4], None, r(3)),
    "ln-empty-shape": lambda F: F.layer_norm(r(2, 4), []),
    "ln-int64-input": lambda F: F.layer_norm(torch.arange(8).view(2, 4), [4]),
    "ln-int32-input": lambda F: F.layer_norm(torch.arange(8, dtype=torch.int32).view(2, 4), [4]),
    "ln-bool-input": lambda F: F.layer_norm(torch.ones(2, 4, dtype=torch.bool), [4]),
    # RMSNorm
    "rms-shape-1d": lambda F: F.rms_norm(r(2, 5), [4]),
    "rms-shape-2d": lambda F: F.rms_norm(r(2, 3, 5), [4, 5]),
    "rms-input-too-small": lambda F: F.rms_norm(r(5), [2, 5]),
    "rms-weight-shape": lambda F: F.rms_norm(r(2, 4), [4], r(5)),
    "rms-weight-2d-shape": lambda F: F.rms_norm(r(2, 3, 4), [3, 4], r(4, 3)),
    "rms-input-too-small-2d": lambda F: F.rms_norm(r(3, 5), [2, 3, 5]),
    "rms-input-too-small-int": lambda F: F.rms_norm(torch.arange(5), [2, 5]),
    "rms-weight-before-dims": lambda F: F.rms_norm(r(5), [2, 5], r(3)),
    "rms-empty-shape": lambda F: F.rms_norm(r(2, 4), []),
    "rms-int64-input": lambda F: F.rms_norm(torch.arange(8).view(2, 4), [4]),
    "rms-int32-input": lambda F: F.rms_norm(torch.arange(8, dtype=torch.int32).view(2, 4), [4]),
    # GroupNorm
    "gn-1d-input": lambda F: F.group_norm(r(4), 2),
    "gn-0d-input": lambda F: F.group_norm(torch.tensor(1.0), 1),
    "gn-not-divisible": lambda F: F.group_norm(r(2, 5, 3), 2),
    "gn-negative-groups": lambda F: F.group_norm(r(2, 6, 3), -2),
    "gn-negative-groups-one-sample": lambda F: F.group_norm(r(1, 6, 1), -6),
    "bn-running-mean-requires-grad-train": lambda F: F.batch_norm(
        r(4, 3, 5), torch.zeros(3, requires_grad=True), torch.ones(3), training=True
    ),
    "bn-running-var-requires-grad-eval": lambda F: F.batch_norm(
        r(4, 3, 5), torch.zeros(3), torch.ones(3, requires_grad=True), training=False
    ),
    "in-running-mean-requires-grad": lambda F: F.instance_norm(
        r(4, 3, 5), torch.zeros(3, requires_grad=True), torch.ones(3)
    ),
    "gn-not-divisible-2d": lambda F: F.group_norm(r(3, 6), 4),
    "gn-weight-size": lambda F: F.group_norm(r(2, 4, 3), 2, r(3)),
    "gn-weight-2d": lambda F: F.group_norm(r(2, 4, 3), 2, r(2, 2)),
    "gn-bias-size": lambda F: F.group_norm(r(2, 4, 3), 2, r(4), r(5)),
    "gn-bias-size-no-weight": lambda F: F.group_norm(r(2, 4, 3), 2, None, r(5)),
    "gn-one-value-per-group": lambda F: F.group_norm(r(1, 4), 4),
    "gn-one-value-per-group-spatial": lambda F: F.group_norm(r(1, 2, 1, 1), 2),
    "gn-zero-groups": lambda F: F.group_norm(r(2, 4, 3), 0),
    "gn-int-input": lambda F: F.group_norm(torch.arange(24).view(2, 4, 3), 2),
    # BatchNorm
    "bn-one-value-training": lambda F: F.batch_norm(
        r(1, 3), torch.zeros(3), torch.ones(3), training=True
    ),
    "bn-one-value-training-3d": lambda F: F.batch_norm(r(1, 3, 1), None, None, training=True),
    "bn-one-value-training-4d": lambda F: F.batch_norm(r(1, 3, 1, 1), None, None, training=True),
    "bn-eps-zero-training": lambda F: F.batch_norm(r(4, 3), None, None, training=True, eps=0.0),
    "bn-eps-negative-training": lambda F: F.batch_norm(
        r(4, 3), None, None, training=True, eps=-1e-3
    ),
    "bn-eps-negative-eval": lambda F: F.batch_norm(
        r(4, 3), torch.zeros(3), torch.ones(3), eps=-1e-3
    ),
    "bn-running-mean-size": lambda F: F.batch_norm(r(4, 3), torch.zeros(4), torch.ones(3)),
    "bn-running-var-size": lambda F: F.batch_norm(r(4, 3), torch.zeros(3), torch.ones(2)),
    "bn-running-size-training": lambda F: F.batch_norm(
        r(4, 3, 2), torch.zeros(5), torch.ones(5), training=True
    ),
    "bn-weight-size": lambda F: F.batch_norm(r(4, 3), torch.zeros(3), torch.ones(3), r(4)),
    "bn-bias-size": lambda F: F.batch_norm(r(4, 3), torch.zeros(3), torch.ones(3), r(3), r(2)),
    "bn-eval-no-running-stats": lambda F: F.batch_norm(r(4, 3), None, None),
    "bn-only-running-mean-eval": lambda F: F.batch_norm(r(4, 3), torch.zeros(3), None),
    "bn-only-running-var-eval": lambda F: F.batch_norm(r(4, 3), None, torch.ones(3)),
    "bn-only-running-mean-training": lambda F: F.batch_norm(
        r(4, 3), torch.zeros(3), None, training=True
    ),
    "bn-only-running-var-training": lambda F: F.batch_norm(
        r(4, 3), None, torch.ones(3), training=True
    ),
    "bn-running-mean-size-var-missing-eval": lambda F: F.batch_norm(r(4, 3), torch.zeros(4), None),
    "bn-running-var-missing-weight-size-eval": lambda F: F.batch_norm(
        r(4, 3), torch.zeros(3), None, r(4)
    ),
    "bn-running-mean-size-var-missing-training": lambda F: F.batch_norm(
        r(4, 3), torch.zeros(4), None, training=True
    ),
    "bn-int-input-running-size": lambda F: F.batch_norm(
        torch.arange(12).view(4, 3), torch.zeros(4), torch.ones(4)
    ),
    "bn-int-input-weight-size-training": lambda F: F.batch_norm(
        torch.arange(12).view(4, 3), None, None, r(5), training=True
    ),
    "bn-int-input-only-running-mean-eval": lambda F: F.batch_norm(
        torch.arange(12).view(4, 3), torch.zeros(3), None
    ),
    "bn-int-input-only-running-mean-training": lambda F: F.batch_norm(
        torch.arange(12).view(4, 3), torch.zeros(3), None, training=True
    ),
    "bn-eps-before-running-check": lambda F: F.batch_norm(r(4, 3), torch.zeros(3), None, eps=-1.0),
    "bn-1d-input-eval": lambda F: F.batch_norm(r(3), torch.zeros(3), torch.ones(3)),
    "bn-int-input": lambda F: F.batch_norm(
        torch.arange(12).view(4, 3), torch.zeros(3), torch.ones(3)
    ),
    "bn-int-input-training": lambda F: F.batch_norm(
        torch.arange(12).view(4, 3), None, None, training=True
    ),
    # InstanceNorm
    "in-one-spatial": lambda F: F.instance_norm(r(2, 3, 1)),
    "in-one-spatial-2d": lambda F: F.instance_norm(r(2, 3, 1, 1)),
    "in-no-running-stats-eval": lambda F: F.instance_norm(r(2, 3, 4), use_input_stats=False),
    "in-only-mean-eval": lambda F: F.instance_norm(
        r(2, 3, 4), torch.zeros(3), None, use_input_stats=False
    ),
    "in-running-size": lambda F: F.instance_norm(r(2, 3, 4), torch.zeros(4), torch.ones(4)),
    "in-running-size-eval": lambda F: F.instance_norm(
        r(2, 3, 4), torch.zeros(4), torch.ones(4), use_input_stats=False
    ),
    "in-weight-size": lambda F: F.instance_norm(r(2, 3, 4), weight=r(4)),
    "in-bias-size": lambda F: F.instance_norm(r(2, 3, 4), weight=r(3), bias=r(2)),
    "in-only-running-mean-training": lambda F: F.instance_norm(r(2, 3, 4), torch.zeros(3), None),
    "in-only-running-var-training": lambda F: F.instance_norm(r(2, 3, 4), None, torch.ones(3)),
    "in-running-mean-size-only": lambda F: F.instance_norm(r(2, 3, 4), torch.zeros(4), None),
    "in-int-input-running-size-eval": lambda F: F.instance_norm(
        torch.arange(24).view(2, 3, 4), torch.zeros(4), torch.ones(4), use_input_stats=False
    ),
    "in-2d-input": lambda F: F.instance_norm(r(2, 3)),
    "in-int-input": lambda F: F.instance_norm(torch.arange(24).view(2, 3, 4)),
}


@pytest.mark.parametrize("case", list(FUNCTIONAL_ERRORS.values()), ids=list(FUNCTIONAL_ERRORS))
def test_functional_error_matches_torch(case):
    # the checks run before dispatch: no backend parametrization needed (the success cases have it)
    assert_same_error(case)


# --------------------------------------------------------------------------------------------------
# dtype mixes on CPU
# --------------------------------------------------------------------------------------------------

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def _params(c: int, w: torch.dtype | None, b: torch.dtype | None):
    weight = None if w is None else (1 + 0.5 * r(c)).to(w)
    bias = None if b is None else (0.5 * r(c)).to(b)
    return weight, bias


def _running(c: int, dtype: torch.dtype | None):
    if dtype is None:
        return None, None
    return (0.3 * r(c)).to(dtype), (0.5 + torch.rand(c, dtype=torch.float64)).to(dtype)


def dtype_case(
    kind: str,
    x: torch.dtype,
    w: torch.dtype | None,
    b: torch.dtype | None,
    rs: torch.dtype | None = None,
    training: bool = True,
) -> Callable[[Any], Any]:
    """One call of ``kind`` with input dtype ``x``, weight ``w``, bias ``b`` and running stats ``rs``.

    BatchNorm/InstanceNorm run in training (batch statistics) unless told otherwise: in eval they
    need running statistics, whose absence would be the error instead of the dtype mix.
    """

    def case(F):
        if kind == "layer_norm":
            return F.layer_norm(r(3, 5, dtype=x), [5], *_params(5, w, b))
        if kind == "rms_norm":
            return F.rms_norm(r(3, 5, dtype=x), [5], _params(5, w, None)[0])
        if kind == "group_norm":
            return F.group_norm(r(2, 4, 3, dtype=x), 2, *_params(4, w, b))
        if kind == "batch_norm":
            rm, rv = _running(3, rs)
            return F.batch_norm(r(4, 3, 5, dtype=x), rm, rv, *_params(3, w, b), training=training)
        if kind == "instance_norm":
            rm, rv = _running(3, rs)
            return F.instance_norm(
                r(2, 3, 5, dtype=x), rm, rv, *_params(3, w, b), use_input_stats=training
            )
        raise AssertionError(kind)

    return case


DTYPE_ERRORS = {
    "fp64-input-fp32-weight": {"x": f64, "w": f32, "b": f32},
    "fp64-input-fp32-weight-only": {"x": f64, "w": f32, "b": None},
    "fp32-input-fp16-weight": {"x": f32, "w": f16, "b": f16},
    "fp32-input-fp64-weight": {"x": f32, "w": f64, "b": f64},
    "fp32-input-fp32-weight-fp64-bias": {"x": f32, "w": f32, "b": f64},
    "bf16-input-bf16-weight-fp32-bias": {"x": bf16, "w": bf16, "b": f32},
    "bf16-input-fp32-weight-bf16-bias": {"x": bf16, "w": f32, "b": bf16},
    "fp16-input-fp16-weight-fp32-bias": {"x": f16, "w": f16, "b": f32},
    "fp16-input-bf16-weight": {"x": f16, "w": bf16, "b": bf16},
    "fp16-input-fp64-weight": {"x": f16, "w": f64, "b": f64},
}
KINDS = ["layer_norm", "group_norm", "batch_norm", "instance_norm"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mix", list(DTYPE_ERRORS.values()), ids=list(DTYPE_ERRORS))
def test_dtype_mix_error_matches_torch(kind, mix):
    assert_same_error(dtype_case(kind, **mix))


RMS_DTYPE_ERRORS = {
    "fp64-input-fp32-weight": (f64, f32),
    "fp32-input-fp16-weight": (f32, f16),
    "fp32-input-fp64-weight": (f32, f64),
    "bf16-input-fp16-weight": (bf16, f16),
}


@pytest.mark.parametrize("x,w", list(RMS_DTYPE_ERRORS.values()), ids=list(RMS_DTYPE_ERRORS))
def test_rms_dtype_mix_matches_torch(x, w):
    """torch.rms_norm's composite CPU path promotes instead of raising for some mixes: match either way."""
    expected, got = run_both(dtype_case("rms_norm", x, w, None), TF, NF)
    if expected.error is None:
        assert got.error is None, f"normkit rejects input torch accepts: {got.describe()}"
        assert got.value.dtype == expected.value.dtype
        assert_close(
            got.value, expected.value.double(), dtype=expected.value.dtype, baseline=expected.value
        )
    else:
        assert_same_error(dtype_case("rms_norm", x, w, None))


RUNNING_DTYPE_MIXES = {
    "bf16-input-fp32-weight-bf16-running": {"x": bf16, "w": f32, "b": f32, "rs": bf16},
    "fp16-input-fp32-weight-fp16-running": {"x": f16, "w": f32, "b": f32, "rs": f16},
    "fp32-input-fp32-weight-fp64-running": {"x": f32, "w": f32, "b": f32, "rs": f64},
    "fp64-input-fp64-weight-fp32-running": {"x": f64, "w": f64, "b": f64, "rs": f32},
    "bf16-input-no-params-fp64-running": {"x": bf16, "w": None, "b": None, "rs": f64},
    "fp32-input-fp32-weight-fp16-bias-bf16-running": {"x": f32, "w": f32, "b": f16, "rs": bf16},
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mix", list(RUNNING_DTYPE_MIXES.values()), ids=list(RUNNING_DTYPE_MIXES))
def test_batch_norm_running_stats_dtype_mix_error_matches_torch(mix, training):
    assert_same_error(dtype_case("batch_norm", training=training, **mix))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "mix",
    [m for m in RUNNING_DTYPE_MIXES.values() if m["b"] in (m["w"], None)],
    ids=[k for k, m in RUNNING_DTYPE_MIXES.items() if m["b"] in (m["w"], None)],
)
def test_instance_norm_takes_running_stats_of_any_dtype(mix, training, backend):
    """torch's instance_norm does not check the running statistics' dtype (it updates them in place)."""
    assert_same_success(dtype_case("instance_norm", training=training, **mix))


def _outcomes_differ(expected: Outcome, got: Outcome) -> str | None:
    if expected.error is not None or got.error is not None:
        if (type(expected.error), str(expected.error)) != (type(got.error), str(got.error)):
            return f"normkit: {got.describe()} / torch: {expected.describe()}"
        return None
    want, have = expected.value, got.value
    if have.dtype != want.dtype or have.shape != want.shape:
        return f"normkit gives {have.dtype} {tuple(have.shape)}, torch {want.dtype} {tuple(want.shape)}"
    if (
        not (have.double() - want.double()).abs().max() <= 0.05
    ):  # a wrong-formula check, not a tolerance one
        return "values differ"
    return None


DTYPES_OR_NONE = [None, f16, bf16, f32, f64]


@pytest.mark.parametrize("kind", ["batch_norm", "instance_norm"])
def test_running_norm_dtype_grid_matches_torch(kind):
    """Every (input, weight, bias, running stats) dtype combination, train and eval: same outcome as torch."""
    mismatches = []
    for x, w, b, rs, training in itertools.product(
        DTYPES_OR_NONE[1:], DTYPES_OR_NONE, DTYPES_OR_NONE, DTYPES_OR_NONE, (True, False)
    ):
        if rs is None and not training:
            continue
        expected, got = run_both(dtype_case(kind, x, w, b, rs, training=training), TF, NF)
        problem = _outcomes_differ(expected, got)
        if problem:
            mismatches.append(f"x={x} w={w} b={b} running={rs} training={training}: {problem}")
    assert not mismatches, "\n".join(mismatches[:20])


@pytest.mark.parametrize("kind", ["layer_norm", "group_norm", "rms_norm"])
def test_dtype_grid_matches_torch(kind):
    """Every (input, weight, bias) dtype combination: same outcome as torch."""
    mismatches = []
    for x, w, b in itertools.product(DTYPES_OR_NONE[1:], DTYPES_OR_NONE, DTYPES_OR_NONE):
        if kind == "rms_norm" and b is not None:
            continue
        expected, got = run_both(dtype_case(kind, x, w, b), TF, NF)
        problem = _outcomes_differ(expected, got)
        if problem:
            mismatches.append(f"x={x} w={w} b={b}: {problem}")
    assert not mismatches, "\n".join(mismatches[:20])


DTYPE_OK = {
    "fp16-input-fp32-params": {"x": f16, "w": f32, "b": f32},
    "bf16-input-fp32-params": {"x": bf16, "w": f32, "b": f32},
    "fp16-input-fp32-weight-only": {"x": f16, "w": f32, "b": None},
    "bf16-input-bf16-params": {"x": bf16, "w": bf16, "b": bf16},
    "fp64-input-fp64-params": {"x": f64, "w": f64, "b": f64},
    "fp16-input-no-params": {"x": f16, "w": None, "b": None},
}


@pytest.mark.parametrize("kind", KINDS + ["rms_norm"])
@pytest.mark.parametrize("mix", list(DTYPE_OK.values()), ids=list(DTYPE_OK))
def test_dtype_mix_accepted_like_torch(kind, mix, backend):
    assert_same_success(dtype_case(kind, **mix))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", ["batch_norm", "instance_norm"])
@pytest.mark.parametrize("x", [f16, bf16])
def test_low_precision_input_with_fp32_params_and_running_stats_accepted(
    kind, x, training, backend
):
    assert_same_success(dtype_case(kind, x, f32, f32, rs=f32, training=training))


# --------------------------------------------------------------------------------------------------
# module-level errors
# --------------------------------------------------------------------------------------------------

MODULE_ERRORS: dict[str, Callable[[Any], Any]] = {
    "bn1d-4d-input": lambda nn: nn.BatchNorm1d(3)(r(2, 3, 4, 5)),
    "bn1d-1d-input": lambda nn: nn.BatchNorm1d(3)(r(3)),
    "bn2d-3d-input": lambda nn: nn.BatchNorm2d(3)(r(2, 3, 4)),
    "bn2d-5d-input": lambda nn: nn.BatchNorm2d(3)(r(2, 3, 4, 5, 2)),
    "bn3d-4d-input": lambda nn: nn.BatchNorm3d(3)(r(2, 3, 4, 5)),
    "bn1d-one-value-per-channel": lambda nn: nn.BatchNorm1d(3)(r(1, 3)),
    "bn2d-one-value-per-channel": lambda nn: nn.BatchNorm2d(3)(r(1, 3, 1, 1)),
    "bn1d-channel-mismatch": lambda nn: nn.BatchNorm1d(3)(r(4, 5)),
    "bn2d-channel-mismatch-eval": lambda nn: nn.BatchNorm2d(3).eval()(r(2, 4, 3, 3)),
    "bn1d-eval-eps-negative": lambda nn: nn.BatchNorm1d(3, eps=-1.0).eval()(r(4, 3)),
    "bn1d-train-eps-zero": lambda nn: nn.BatchNorm1d(3, eps=0.0)(r(4, 3)),
    "in1d-4d-input": lambda nn: nn.InstanceNorm1d(3)(r(2, 3, 4, 5)),
    "in1d-1d-input": lambda nn: nn.InstanceNorm1d(3)(r(3)),
    "in2d-2d-input": lambda nn: nn.InstanceNorm2d(3)(r(3, 4)),
    "in3d-3d-input": lambda nn: nn.InstanceNorm3d(3)(r(3, 4, 5)),
    "in1d-one-spatial": lambda nn: nn.InstanceNorm1d(3)(r(2, 3, 1)),
    "in1d-one-spatial-unbatched": lambda nn: nn.InstanceNorm1d(3)(r(3, 1)),
    "in1d-affine-channel-mismatch": lambda nn: nn.InstanceNorm1d(3, affine=True)(r(2, 5, 4)),
    "in2d-affine-channel-mismatch-unbatched": lambda nn: nn.InstanceNorm2d(3, affine=True)(
        r(5, 4, 4)
    ),
    "gn-1d-input": lambda nn: nn.GroupNorm(2, 4)(r(4)),
    "gn-channel-mismatch": lambda nn: nn.GroupNorm(2, 4)(r(2, 6, 3)),
    "gn-one-value-per-group-eval": lambda nn: nn.GroupNorm(4, 4).eval()(r(1, 4)),
    "ln-shape": lambda nn: nn.LayerNorm(4)(r(2, 5)),
    "ln-shape-2d": lambda nn: nn.LayerNorm([3, 4])(r(2, 4, 4)),
    "rms-shape": lambda nn: nn.RMSNorm(4)(r(2, 5)),
    "rms-shape-2d": lambda nn: nn.RMSNorm([3, 4])(r(2, 4, 4)),
}


@pytest.mark.parametrize("case", list(MODULE_ERRORS.values()), ids=list(MODULE_ERRORS))
def test_module_error_matches_torch(case):
    assert_same_error(case, torch.nn, NN)


def test_group_norm_constructor_divisibility_error():
    assert_same_error(lambda nn: nn.GroupNorm(2, 5), torch.nn, NN)


# --------------------------------------------------------------------------------------------------
# inputs torch accepts must be accepted (and give torch's result)
# --------------------------------------------------------------------------------------------------

FUNCTIONAL_OK: dict[str, Callable[[Any], Any]] = {
    "ln-empty-rows": lambda F: F.layer_norm(r(0, 4), [4], r(4), r(4)),
    "ln-empty-rows-3d": lambda F: F.layer_norm(r(2, 0, 4), [4]),
    "ln-1d-input": lambda F: F.layer_norm(r(4), [4], r(4), r(4)),
    "ln-2-normalized-dims": lambda F: F.layer_norm(r(2, 3, 4), [3, 4], r(3, 4), r(3, 4)),
    "ln-size-shape": lambda F: F.layer_norm(r(2, 4), torch.Size([4])),
    "rms-empty-rows": lambda F: F.rms_norm(r(0, 4), [4], r(4)),
    "rms-empty-rows-3d": lambda F: F.rms_norm(r(3, 0, 4), [4]),
    "rms-1d-input": lambda F: F.rms_norm(r(4), [4], r(4)),
    "rms-2-normalized-dims": lambda F: F.rms_norm(r(2, 3, 4), [3, 4], r(3, 4), eps=1e-6),
    "gn-zero-batch": lambda F: F.group_norm(r(0, 4, 3), 2, r(4), r(4)),
    "gn-2d-input": lambda F: F.group_norm(r(3, 6), 3, r(6), r(6)),
    "gn-5d-input": lambda F: F.group_norm(r(2, 4, 2, 3, 2), 2),
    "gn-one-sample-two-per-group": lambda F: F.group_norm(r(1, 4), 2),
    "bn-zero-batch-training": lambda F: F.batch_norm(
        r(0, 3), torch.zeros(3), torch.ones(3), training=True
    ),
    "bn-zero-batch-training-3d": lambda F: F.batch_norm(
        r(0, 3, 4), None, None, r(3), r(3), training=True
    ),
    "bn-zero-batch-eval": lambda F: F.batch_norm(r(0, 3, 2, 2), torch.zeros(3), torch.ones(3)),
    "bn-one-sample-spatial-training": lambda F: F.batch_norm(r(1, 3, 4), None, None, training=True),
    "bn-eval-eps-zero": lambda F: F.batch_norm(
        r(4, 3), torch.zeros(3), 0.5 + torch.rand(3), eps=0.0
    ),
    "bn-one-value-eval": lambda F: F.batch_norm(r(1, 3), torch.zeros(3), torch.ones(3)),
    "bn-training-no-running": lambda F: F.batch_norm(
        r(4, 3), None, None, r(3), r(3), training=True
    ),
    "in-zero-batch": lambda F: F.instance_norm(r(0, 3, 4)),
    "in-zero-batch-running": lambda F: F.instance_norm(r(0, 3, 4), torch.zeros(3), torch.ones(3)),
    "in-one-spatial-eval": lambda F: F.instance_norm(
        r(2, 3, 1), torch.zeros(3), torch.ones(3), use_input_stats=False
    ),
    "in-weight-bias": lambda F: F.instance_norm(r(2, 3, 4), weight=r(3), bias=r(3)),
}


@pytest.mark.parametrize("case_id", list(FUNCTIONAL_OK))
def test_functional_accepts_what_torch_accepts(case_id, backend):
    if case_id == "bn-eval-eps-zero" and TorchVersion(torch.__version__) < "2.13":
        assert_same_error(FUNCTIONAL_OK[case_id])  # before 2.13 torch rejected eps == 0 in eval too
        return
    assert_same_success(FUNCTIONAL_OK[case_id])


MODULE_OK: dict[str, Callable[[Any], Any]] = {
    "bn1d-zero-batch": lambda nn: nn.BatchNorm1d(3)(r(0, 3)),
    "bn2d-zero-batch": lambda nn: nn.BatchNorm2d(3)(r(0, 3, 2, 2)),
    "bn1d-one-sample-with-length": lambda nn: nn.BatchNorm1d(3)(r(1, 3, 4)),
    "bn1d-one-value-eval": lambda nn: nn.BatchNorm1d(3).eval()(r(1, 3)),
    "in1d-unbatched": lambda nn: nn.InstanceNorm1d(3)(r(3, 4)),
    "in2d-unbatched": lambda nn: nn.InstanceNorm2d(3, affine=True)(r(3, 4, 4)),
    "in3d-unbatched": lambda nn: nn.InstanceNorm3d(3)(r(3, 2, 2, 2)),
    "in1d-zero-batch": lambda nn: nn.InstanceNorm1d(3)(r(0, 3, 4)),
    "in1d-channel-mismatch-warns": lambda nn: nn.InstanceNorm1d(3)(r(2, 5, 4)),
    "in1d-2d-input-is-unbatched": lambda nn: nn.InstanceNorm1d(3)(r(4, 3)),
    "gn-zero-batch": lambda nn: nn.GroupNorm(2, 4)(r(0, 4, 3)),
    "gn-2d-input": lambda nn: nn.GroupNorm(2, 4)(r(3, 4)),
    "ln-1d-input": lambda nn: nn.LayerNorm(4)(r(4)),
    "ln-empty-rows": lambda nn: nn.LayerNorm(4)(r(0, 4)),
    "rms-empty-rows": lambda nn: nn.RMSNorm(4)(r(0, 4)),
}


@pytest.mark.parametrize("case_id", list(MODULE_OK))
def test_module_accepts_what_torch_accepts(case_id, backend):
    assert_same_success(MODULE_OK[case_id], torch.nn, NN)


def test_channel_mismatch_warning_is_torchs():
    """The UserWarning without affine has torch's category and text (and is emitted, once)."""
    expected, got = run_both(lambda nn: nn.InstanceNorm2d(3)(r(2, 5, 3, 3)), torch.nn, NN)
    assert expected.error is None and got.error is None
    assert len(expected.warnings) == 1 and expected.warnings[0][0] is UserWarning
    assert got.warnings == expected.warnings


@pytest.mark.parametrize(
    "call,x_dtype,w_dtype,message",
    [
        # LayerNorm: parameters in the input's dtype only
        ("layer_norm", torch.bfloat16, torch.float32, "expected scalar type BFloat16 but found Float"),
        ("layer_norm", torch.float32, torch.float64, "expected scalar type Float but found Double"),
        # GroupNorm: torch's mixed-dtype check first (its "(CPU)" message on CUDA too), then the same rule
        ("group_norm", torch.float32, torch.bfloat16,
         "mixed dtype (CPU): expect parameter to have scalar type of Float"),
        ("group_norm", torch.bfloat16, torch.float32, "expected scalar type BFloat16 but found Float"),
        ("group_norm_silu", torch.float16, torch.float32, "expected scalar type Half but found Float"),
        ("channel_layer_norm", torch.bfloat16, torch.float32, "expected scalar type BFloat16 but found Float"),
        # RMSNorm, BatchNorm, InstanceNorm: any dtypes
        ("rms_norm", torch.bfloat16, torch.float32, None),
        ("batch_norm", torch.bfloat16, torch.float32, None),
        ("instance_norm", torch.bfloat16, torch.float32, None),
    ],
)
def test_parameter_dtype_rules_off_the_cpu(call, x_dtype, w_dtype, message):
    """torch's CUDA kernels have their own dtype rules (observed on an H200 with torch 2.11, where
    tests/test_triton_backend.py compares normkit with torch directly). They apply to every tensor that
    is not on the CPU; meta tensors stand in for CUDA ones here (the checks run before dispatch)."""
    x = torch.empty(4, 6, 5, 5, device="meta", dtype=x_dtype)
    w = torch.empty(6, device="meta", dtype=w_dtype)
    calls = {
        "layer_norm": lambda: NF.layer_norm(x.movedim(1, -1), (6,), w, w),
        "group_norm": lambda: NF.group_norm(x, 3, w, w),
        "group_norm_silu": lambda: NF.group_norm_silu(x, 3, w, w),
        "channel_layer_norm": lambda: NF.channel_layer_norm(x, w, w),
        "rms_norm": lambda: normkit.functional._rms_norm_checks(x.movedim(1, -1), (6,), w),
        "batch_norm": lambda: normkit.functional._batch_norm_checks(x, None, None, w, w, True, 1e-5),
        "instance_norm": lambda: normkit._checks.parameter_dtypes(x, w, w),
    }
    if message is None:
        calls[call]()
    else:
        with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
            calls[call]()
