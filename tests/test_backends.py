"""The backend layer: selection by code, context and NORMKIT_BACKEND; errors; fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import normkit
import normkit.functional as NF
from normkit import backends
from normkit.backends.reference import ReferenceBackend


@pytest.fixture(autouse=True)
def _clean_selection(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends.set_backend(None)
    yield
    backends.set_backend(None)


def test_auto_is_the_default_and_picks_the_cpu_kernels_for_cpu_tensors():
    assert backends.current_backend_name() == "auto"
    assert normkit.get_backend().name == "cpu"
    assert backends.resolve(torch.randn(2, 3)).name == "cpu"
    assert backends.resolve(torch.randn(2, 3, dtype=torch.complex64)).name == "reference"
    assert backends.resolve(torch.randn(2, 3, device="meta")).name == "reference"


def test_auto_can_be_selected_by_name(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    with normkit.use_backend("AUTO"):
        assert backends.resolve(torch.randn(2, 3)).name == "cpu"


def test_auto_skips_a_backend_that_cannot_be_built(monkeypatch):
    def broken():
        raise ImportError("no compiler here")

    monkeypatch.setitem(backends._factories, "broken", broken)
    monkeypatch.setitem(backends.DEVICE_DEFAULTS, "cpu", ("broken", "cpu"))
    monkeypatch.setattr(backends, "_auto_cache", {})
    assert backends.resolve(torch.randn(2)).name == "cpu"
    assert "broken" not in normkit.available_backends()
    with pytest.raises(ImportError, match="no compiler here"):
        normkit.get_backend("broken")
    monkeypatch.setitem(backends.DEVICE_DEFAULTS, "cpu", ("broken",))
    backends._auto_cache.clear()
    assert backends.resolve(torch.randn(2)).name == "reference"
    backends._failures.pop("broken", None)


def test_available_backends_include_reference_torch_and_cpu():
    assert {"reference", "torch", "cpu"} <= set(normkit.available_backends())


def test_environment_variable_selects(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert normkit.get_backend().name == "torch"


def test_set_backend_overrides_environment_and_none_restores_it(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    normkit.set_backend("reference")
    assert normkit.get_backend().name == "reference"
    normkit.set_backend(None)
    assert normkit.get_backend().name == "torch"


def test_use_backend_nests_and_restores():
    with normkit.use_backend("torch") as outer:
        assert outer.name == "torch" and normkit.get_backend().name == "torch"
        with normkit.use_backend("reference"):
            assert normkit.get_backend().name == "reference"
        assert normkit.get_backend().name == "torch"
    assert backends.current_backend_name() == "auto"


@pytest.mark.parametrize("select", ["set", "use", "get"])
def test_unknown_backend_is_a_clear_error(select):
    call = {
        "set": normkit.set_backend,
        "use": lambda n: normkit.use_backend(n).__enter__(),
        "get": normkit.get_backend,
    }
    with pytest.raises(ValueError, match=r"unknown normkit backend 'cuda-magic'; registered backends: .*reference"):
        call[select]("cuda-magic")


def test_unknown_backend_in_environment_fails_at_first_use(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="unknown normkit backend 'nope'"):
        NF.layer_norm(torch.randn(2, 3), (3,))


def test_environment_variable_in_a_fresh_process():
    code = (
        "import normkit, torch; normkit.functional.rms_norm(torch.randn(2, 3), (3,)); "
        "print(normkit.get_backend().name)"
    )
    env = dict(os.environ, NORMKIT_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"


class _CountingBackend(ReferenceBackend):
    name = "counting"
    calls = 0
    accept = True

    def supports(self, x):
        return self.accept

    def layer_norm(self, *args):
        type(self).calls += 1
        return super().layer_norm(*args)


@pytest.fixture
def counting():
    backends.register_backend("counting", _CountingBackend)
    _CountingBackend.calls, _CountingBackend.accept = 0, True
    yield _CountingBackend
    backends._factories.pop("counting", None)
    backends._instances.pop("counting", None)


def test_functional_and_modules_dispatch_through_the_selected_backend(counting):
    with normkit.use_backend("counting"):
        NF.layer_norm(torch.randn(2, 3), (3,))
        normkit.nn.LayerNorm(3)(torch.randn(2, 3))
    assert counting.calls == 2


def test_backend_that_cannot_take_a_tensor_falls_back_to_reference(counting):
    counting.accept = False
    x = torch.randn(2, 3, requires_grad=True)
    with normkit.use_backend("counting"):
        assert backends.resolve(x).name == "reference"
        y = NF.layer_norm(x, (3,))
    assert counting.calls == 0
    assert type(y.grad_fn).__name__ == "_NormBackward"  # the reference backend's autograd.Function


def test_backends_agree():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5)
    results = {}
    for name in normkit.available_backends():
        with normkit.use_backend(name):
            results[name] = (
                NF.group_norm(x, 3),
                NF.layer_norm(x, (5, 5)),
                NF.rms_norm(x, (5,)),
                NF.batch_norm(x, None, None, training=True),
                NF.instance_norm(x),
            )
    ref = results.pop("reference")
    for name, outs in results.items():
        for a, b in zip(outs, ref, strict=True):
            torch.testing.assert_close(a, b, msg=name)


def test_importing_normkit_does_not_import_triton():
    """The triton backend is registered lazily: importing normkit and running norms on CPU tensors never
    imports triton (building the backend does, e.g. for ``available_backends()``)."""
    code = (
        "import sys, torch, normkit; normkit.functional.layer_norm(torch.randn(2, 3), (3,)); "
        "print('triton' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cuda_tensors_default_to_triton_and_fall_back_to_the_reference(monkeypatch):
    assert backends.DEVICE_DEFAULTS["cuda"] == ("triton",)

    def unavailable():
        raise ImportError("no triton here")

    monkeypatch.setitem(backends._factories, "triton", unavailable)
    monkeypatch.setattr(backends, "_failures", {})
    assert backends.default_backend("cuda").name == "reference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the triton backend is available")
def test_triton_backend_needs_a_gpu_or_the_interpreter():
    code = (
        "import torch, normkit\n"
        "assert 'triton' not in normkit.available_backends()\n"
        "try:\n    normkit.get_backend('triton')\nexcept ImportError as e:\n    print('ImportError:', e)\n"
        "with normkit.use_backend('auto'):\n    print(normkit.backends.resolve(torch.randn(2)).name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    first, second = out.stdout.strip().splitlines()
    assert first.startswith("ImportError:") and ("triton" in first)
    assert second == "cpu"


def test_backend_choice_is_a_constant_for_torch_compile():
    """The selection reads a ContextVar, which dynamo cannot trace: it is marked the way
    torch.compiler.assume_constant_result marks a function (without importing torch._dynamo early)."""

    def probe() -> str:
        return "x"

    assert torch.compiler.assume_constant_result(probe) is probe
    assert backends.current_backend_name._dynamo_marked_constant is probe._dynamo_marked_constant is True
    assert backends._compiled_choice._dynamo_marked_constant is True


def test_torch_compile_fullgraph_through_the_dispatch():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), normkit.nn.LayerNorm(6), normkit.nn.RMSNorm(6))
    x = torch.randn(3, 4)
    with normkit.use_backend("reference"):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), model(x))
