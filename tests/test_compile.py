"""torch.compile(fullgraph=True) of models built from normkit layers, on every available backend.

``fullgraph=True`` turns any graph break into an error, so these tests fail if dynamo cannot trace a
normkit call: the cpu backend's kernels run as custom ops with fake implementations
(:mod:`normkit.backends.cpu.ops`), the reference's math is traced as torch ops, and the backend is
chosen once, at trace time. Outputs, gradients and running statistics must equal eager mode's.
``aot_eager`` covers dynamo and AOT autograd (where graph breaks and fake-tensor errors arise) in a
second per model; one test also runs inductor's code generation.
"""

from __future__ import annotations

import copy

import pytest
import torch

import normkit
import normkit.functional as NF
import normkit.nn as N
from normkit.testing import assert_close

BACKENDS = normkit.available_backends()


class Block(torch.nn.Module):
    """Every normkit module, train-mode statistics included, on one small input."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = N.LayerNorm(12)
        self.rms = N.RMSNorm(12, eps=1e-6)
        self.add_rms = N.FusedAddRMSNorm(12)
        self.add_ln = N.FusedAddLayerNorm(12)
        self.bn = N.BatchNorm2d(6)
        self.gn = N.GroupNorm(3, 6)
        self.gn_silu = N.GroupNormSiLU(2, 6)
        self.inorm = N.InstanceNorm2d(6, affine=True, track_running_stats=True)
        # (momentum=None is left out: torch.nn.BatchNorm1d with it cannot compile fullgraph either)
        self.bn1 = N.BatchNorm1d(6, momentum=0.3)
        # the channels-first row norms (timm's LayerNorm2d, RmsNorm2d) have no module of their own
        self.cln_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(6))
        self.cln_bias = torch.nn.Parameter(0.1 * torch.randn(6))

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.rms(self.ln(x))
        a, h = self.add_rms(a, r)
        a, h = self.add_ln(a, h)
        img = a.view(a.shape[0], 6, 2, 12)  # (N, C, H, W)
        img = self.inorm(self.gn_silu(self.gn(self.bn(img))))
        img = NF.channel_rms_norm(NF.channel_layer_norm(img, self.cln_weight, self.cln_bias), self.cln_weight)
        img = img.contiguous(memory_format=torch.channels_last)
        img = self.bn(img)
        return self.bn1(img.flatten(2)), h


class Small(Block):
    """A row norm and two channel norms: inductor's compile time grows with the graph."""

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, h = self.add_rms(x, r)
        img = a.view(a.shape[0], 6, 2, 12)
        return self.gn_silu(self.bn(img)).flatten(1), h


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 12, 12, generator=gen, requires_grad=True)
    r = torch.randn(4, 12, 12, generator=gen, requires_grad=True)
    return x, r


def _step(model, x, r):
    out, h = model(x, r)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    ((out * proj).sum() + h.square().sum()).backward()
    grads = [x.grad.clone(), r.grad.clone(), *(p.grad.clone() for p in model.parameters() if p.grad is not None)]
    x.grad = r.grad = None
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _check_compiled_equals_eager(backend_name: str, compiler: str, model_cls: type = Block) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = model_cls()
    compiled_model = copy.deepcopy(eager)
    with normkit.use_backend(backend_name):
        compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
        for step in range(2):  # the second step checks the running statistics feed back correctly
            want, want_g = _step(eager, *_inputs(step))
            got, got_g = _step(compiled, *_inputs(step))
            assert_close(got, want.double(), msg=f"{backend_name} step {step} output")
            for i, (g, w) in enumerate(zip(got_g, want_g, strict=True)):
                scale = float(w.abs().max()) + 1e-6
                assert_close(g / scale, w.double() / scale, msg=f"{backend_name} step {step} gradient {i}")
        compiled_model.eval(), eager.eval()
        x, r = _inputs(5)
        with torch.no_grad():
            assert_close(compiled(x, r)[0], eager(x, r)[0].double(), msg=f"{backend_name} eval")
    for (k, a), (_, b) in zip(compiled_model.state_dict().items(), eager.state_dict().items(), strict=True):
        if a.is_floating_point():
            assert_close(a, b.double(), msg=k)
        else:
            assert torch.equal(a, b), k


# The torch backend calls ATen directly; in this model AOT autograd's backward graph then views the
# CPU kernel's channels_last grad_input of native_batch_norm_backward as contiguous (the op's fake
# strides disagree with the kernel's), a torch issue outside normkit's code.
TORCH_BN_BACKWARD_STRIDES = "torch: native_batch_norm_backward's fake strides differ from the CPU kernel's"


@pytest.mark.parametrize(
    "backend_name",
    [pytest.param(b, marks=pytest.mark.xfail(reason=TORCH_BN_BACKWARD_STRIDES, strict=False)) if b == "torch" else b
     for b in BACKENDS],
)
def test_fullgraph_aot_eager(backend_name):
    _check_compiled_equals_eager(backend_name, "aot_eager")


def test_fullgraph_inductor_default_backend():
    # inductor generates and compiles C++ for the surrounding graph; normkit's kernels stay custom ops
    _check_compiled_equals_eager(normkit.backends.default_backend("cpu").name, "inductor", Small)


def test_the_backend_is_chosen_when_traced():
    calls = []

    class Spy(normkit.backends.Backend):
        name = "spy"

        def layer_norm(self, x, normalized_shape, weight, bias, eps):
            calls.append("spy")
            return torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)

    normkit.backends.register_backend("spy", Spy)
    try:
        torch._dynamo.reset()
        model = torch.compile(N.LayerNorm(8), fullgraph=True, backend="aot_eager")
        with normkit.use_backend("spy"):
            model(torch.randn(2, 8))
        assert calls == ["spy"]  # traced once, through the backend selected at the time
    finally:
        normkit.backends._factories.pop("spy")
        normkit.backends._instances.pop("spy", None)
        torch._dynamo.reset()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_batch_norm_act_compiles(backend_name):
    """batch_norm_act traces as its composition (the cpu backend's one-pass inference stays eager)."""
    torch._dynamo.reset()
    bn = torch.nn.BatchNorm2d(6).eval()
    bn.running_mean.normal_()

    def fn(x):
        return NF.batch_norm_act(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, activation="hardswish")

    x = torch.randn(2, 6, 4, 5)
    with normkit.use_backend(backend_name), torch.no_grad():
        eager = fn(x)
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
    assert_close(compiled, eager.double(), baseline=eager)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_rms_norm_rounded_rstd_compiles(backend_name):
    """DeepSeek-V4's weightless RMSNorm traces as its composition (the one-pass kernels stay eager), with
    eager mode's bits (the same rounding order) and gradients."""
    torch._dynamo.reset()

    def fn(x):
        return NF._rms_norm_rounded_rstd(x, (16,), 1e-6)

    x = torch.randn(3, 5, 16).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(3, 5, 16).to(torch.bfloat16)
    with normkit.use_backend(backend_name):
        eager = fn(x)
        (eager_grad,) = torch.autograd.grad(eager, (x,), dy)
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
        (compiled_grad,) = torch.autograd.grad(compiled, (x,), dy)
    assert torch.equal(compiled, eager)
    assert_close(compiled_grad, eager_grad.double(), baseline=eager_grad)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_rms_norm_rounded_scale_compiles(backend_name):
    """The 16-bit Llama-order RMSNorm traces as its composition (the cpu backend's one pass stays eager),
    outputs and gradients as in eager mode."""
    torch._dynamo.reset()
    w = (1 + 0.2 * torch.randn(16)).to(torch.bfloat16).requires_grad_()

    def fn(x):
        return NF._rms_norm_rounded_scale(x, (16,), w, 1e-6)

    x = torch.randn(3, 5, 16).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(3, 5, 16).to(torch.bfloat16)
    with normkit.use_backend(backend_name):
        eager = fn(x)
        eager_grads = torch.autograd.grad(eager, (x, w), dy)
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
        compiled_grads = torch.autograd.grad(compiled, (x, w), dy)
    assert torch.equal(compiled, eager)  # the same rounding order either way
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        assert_close(a, b.double(), baseline=b)
