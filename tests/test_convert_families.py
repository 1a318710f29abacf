"""Hugging Face norm classes converted as copies of a handled class's code (normkit.conversion.families).

Every norm class of the installed transformers that belongs to a family is built, converted and
compared with its original: float32 outputs and gradients, bfloat16 outputs against the float32
original with the original in bfloat16 as the baseline. Classes whose code differs are left alone.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import pickle

import pytest
import torch

import normkit
from normkit import conversion
from normkit.conversion.families import code_signature, family_of, members
from normkit.conversion.handlers import FAMILIES, handler_for
from normkit.testing import assert_close

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")

_FAKE_MODULE = "transformers.models.normkit_test.modeling_normkit_test"


def _instances(cls: type) -> list[torch.nn.Module]:
    """The class built with a hidden size of 24, in each of its data formats; random parameters."""
    kwargs = [{}]
    if "data_format" in inspect.signature(cls.__init__).parameters:
        kwargs = [{"data_format": "channels_last"}, {"data_format": "channels_first"}]
    params = list(inspect.signature(cls.__init__).parameters)[1:]  # after self
    signature = inspect.signature(cls.__init__).parameters
    if "group_size" in params:  # Mamba-2's gated norm and Qwen4-Exp's normalize groups of the last dim
        sizes = [8] if signature["group_size"].default is not None else [None, 8]  # Qwen4-Exp's is optional
        kwargs = [{**kw, "group_size": size} for kw in kwargs for size in sizes]
    if "n_groups" in params:  # Falcon-H1's gated norm: groups, and the gate before or after the norm
        kwargs = [{**kw, "n_groups": g, "norm_before_gate": before} for kw in kwargs for g in (1, 3)
                  for before in (True, False)]
    size = (24,) if params and params[0] != "eps" else ()  # a weightless norm may take only its epsilon
    out = []
    for kw in kwargs:
        module = cls(*size, **kw)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # frozen BatchNorms keep their weight and bias as buffers
            for t in (*module.parameters(), *module.buffers()):
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.75)
        out.append(module)
    return out


def _sample(module: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The inputs the class's handler checks it on ((N, C, H, W) for channel norms, rows otherwise; a
    gated norm's gate too)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(1)
        xs = handler_for(type(module)).sample(module)
    finally:
        torch.random.set_rng_state(state)
    return tuple((x * 2 + 0.5).to(dtype) for x in (xs if isinstance(xs, tuple) else (xs,)))


def _check(original: torch.nn.Module) -> None:
    converted = copy.deepcopy(original)
    report = conversion.plan(converted)
    assert len(report.converted) == 1 and not report.left, report
    normkit.convert(converted)
    # float32: outputs and every gradient
    xs = _sample(original, torch.float32)
    outs, grads = [], []
    for model in (original, converted):
        model.zero_grad(set_to_none=True)
        leaves = [x.clone().requires_grad_() for x in xs]
        y = model(*leaves)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
        outs.append(y.detach())
        grads.append([*(leaf.grad for leaf in leaves), *(p.grad for p in model.parameters())])
    assert outs[1].dtype == outs[0].dtype
    assert outs[1].is_contiguous() == outs[0].is_contiguous()  # laid out as the original's
    assert_close(outs[1], outs[0].double(), torch.float32, msg="float32 output")
    for got, want in zip(grads[1], grads[0], strict=True):
        assert_close(got, want.double(), torch.float32, msg="float32 gradient")
    # bfloat16: within the bound of the float32 original, with the original in bfloat16 as the baseline
    lo = _sample(original, torch.bfloat16)
    with torch.no_grad():
        truth = original(*(t.float() for t in lo)).double()
        want = copy.deepcopy(original).to(torch.bfloat16)(*lo)
        got = copy.deepcopy(converted).to(torch.bfloat16)(*lo)
    assert got.dtype == want.dtype
    assert_close(got, truth, want.dtype, baseline=want, msg="bfloat16 output")


def _canonicals() -> list[tuple[type, str]]:
    out = []
    for path in FAMILIES:
        module, _, name = path.rpartition(".")
        try:
            out.append((getattr(importlib.import_module(module), name), path))
        except (ImportError, AttributeError):  # not in this transformers version
            continue
    return out


def test_every_handled_class_and_copy_in_transformers_converts_and_matches():
    found = _canonicals() + list(members(FAMILIES))
    per_family: dict[str, int] = {}
    failures = []
    for cls, canonical in found:
        per_family[canonical] = per_family.get(canonical, 0) + 1
        for module in _instances(cls):
            try:
                _check(module)
            except AssertionError as e:
                failures.append(f"{cls.__module__}.{cls.__qualname__}: {e}")
    assert not failures, "\n".join(failures)
    # the scan found the copies (transformers 5 has over a hundred of Llama's alone)
    assert per_family.get(FAMILIES[0], 0) >= 10, per_family
    assert len(found) >= 20 + len(FAMILIES) // 2, per_family


# norm classes that live, as far as normkit can tell, in a transformers model; their code is here


def _init(self, hidden_size, eps=1e-6):
    torch.nn.Module.__init__(self)
    self.weight = torch.nn.Parameter(torch.ones(hidden_size))
    self.variance_epsilon = eps


def _llama_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's code with a docstring, annotations and comments of its own."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)  # a comment
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _olmo2_forward(self, hidden_states):
    # one change from Llama's: the weight multiplies in float32, before the cast (Olmo2's code)
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return (self.weight * hidden_states).to(input_dtype)


def _other_forward(self, hidden_states):
    # no family's: the epsilon added outside the square root
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states / (variance.sqrt() + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _model_class(name: str, forward, base: type = torch.nn.Module, module: str = _FAKE_MODULE) -> type:
    return type(name, (base,), {"__init__": _init, "forward": forward, "__module__": module})


CopiedRMSNorm = _model_class("CopiedRMSNorm", _llama_forward)
OlmoLikeRMSNorm = _model_class("OlmoLikeRMSNorm", _olmo2_forward)
OtherRMSNorm = _model_class("OtherRMSNorm", _other_forward)


def test_a_class_is_matched_by_its_code():
    llama, olmo2 = FAMILIES[0], next(f for f in FAMILIES if f.endswith("Olmo2RMSNorm"))
    assert llama.endswith("LlamaRMSNorm")
    assert family_of(CopiedRMSNorm, FAMILIES) == llama
    assert family_of(OlmoLikeRMSNorm, FAMILIES) == olmo2
    assert family_of(OtherRMSNorm, FAMILIES) is None and handler_for(OtherRMSNorm) is None
    # the same forward on another base class is not matched (its code may rely on the base's)
    assert family_of(_model_class("SubRMSNorm", _llama_forward, base=CopiedRMSNorm), FAMILIES) is None
    # outside transformers nothing is matched by its code
    assert family_of(_model_class("CopiedRMSNorm", _llama_forward, module=__name__), FAMILIES) is None
    assert code_signature(CopiedRMSNorm) != code_signature(OlmoLikeRMSNorm)


def test_copies_convert_with_their_family_s_casts_and_others_are_left():
    model = torch.nn.Sequential(CopiedRMSNorm(24), OlmoLikeRMSNorm(24), OtherRMSNorm(24))
    report = conversion.plan(model)
    assert [s.name for s in report.converted] == ["0", "1"]
    assert [(s.name, s.reason) for s in report.left] == [("2", "no normkit handler for this class")]
    for cls in (CopiedRMSNorm, OlmoLikeRMSNorm):
        _check(cls(24))


def test_each_variant_of_a_class_is_checked(monkeypatch):
    """ConvNext's LayerNorm takes a different path channels-first and channels-last: both are checked."""
    from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm

    checked = []
    agrees = conversion._agrees
    monkeypatch.setattr(conversion, "_agrees", lambda m, h: checked.append(m.data_format) or agrees(m, h))
    model = torch.nn.Sequential(
        ConvNextLayerNorm(8, data_format="channels_first"), ConvNextLayerNorm(8, data_format="channels_first"),
        ConvNextLayerNorm(8, data_format="channels_last"),
    )
    assert len(conversion.plan(model).converted) == 3
    assert checked == ["channels_first", "channels_last"]


def test_a_converted_copy_pickles():
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    module = normkit.convert(Phi3RMSNorm(16))
    again = pickle.loads(pickle.dumps(module))
    assert type(again) is type(module) and isinstance(again, Phi3RMSNorm)
    x = torch.randn(2, 16)
    assert torch.equal(again(x), module(x))


def test_converted_norms_compile_fullgraph():
    """The new handlers' forwards (their casts, broadcasting weights, frozen statistics) trace without a
    graph break and give eager mode's outputs and gradients."""
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm
    from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm
    from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm
    from transformers.models.llama4.modeling_llama4 import Llama4TextL2Norm, Llama4TextRMSNorm
    from transformers.models.olmo.modeling_olmo import OlmoLayerNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rows = torch.nn.Sequential(
                Olmo2RMSNorm(12), Gemma3nRMSNorm(12), Llama4TextRMSNorm(12), Llama4TextL2Norm(), OlmoLayerNorm(12),
                CohereLayerNorm(12),
            )
            self.per_head = CohereLayerNorm((3, 4))
            self.image = torch.nn.Sequential(ConvNextLayerNorm(12, data_format="channels_first"),
                                             DetrFrozenBatchNorm2d(12))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.per_head(self.rows(x).unflatten(-1, (3, 4))).flatten(-2)
            return self.image(h.transpose(1, 2).unsqueeze(-1))

    model = Model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    normkit.convert(model)
    assert not conversion.plan(model).converted  # all of them converted already
    x = torch.randn(2, 5, 12, generator=gen)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (model, compiled):
        leaf = x.clone().requires_grad_()
        y = fn(leaf)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), leaf.grad))
    for got, want in zip(results[1], results[0], strict=True):
        assert_close(got, want.double(), torch.float32)
    torch._dynamo.reset()


def test_gated_and_rounded_scale_norms_compile_fullgraph():
    """The gated RMSNorms (two inputs), DeepSeek-V4's rounded-scale norm, VideoPrism's offset weight, Qwen4-Exp's
    grouped norm and MuseSpark's trace without a graph break and give eager mode's outputs and gradients, in
    float32 and bfloat16."""
    def norm(model: str, name: str, *args, **kwargs):
        """The norm module, or None where the installed transformers lacks the model (5.17 has no MuseSpark)."""
        try:
            module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
        except ImportError:
            return None
        return getattr(module, name)(*args, **kwargs)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # (module, takes the gate), in the order they run; Mamba-2's groups need transformers >= 5.2x
            grouped_mamba = "group_size" in inspect.signature(
                importlib.import_module("transformers.models.mamba2.modeling_mamba2").MambaRMSNormGated
            ).parameters
            chain = [
                (norm("mamba2", "MambaRMSNormGated", 16, **({"group_size": 8} if grouped_mamba else {})), True),
                (norm("qwen3_next", "Qwen3NextRMSNormGated", 16), True),
                (norm("glm5_next", "Glm5NextTextRMSNormGated", 16), True),
                (norm("deepseek_v4", "DeepseekV4UnweightedRMSNorm"), False),
                (norm("videoprism", "VideoPrismLayerNorm", 16), False),
                (norm("falcon_h1", "FalconH1RMSNormGated", 16, n_groups=2, norm_before_gate=False), True),
                (norm("qwen4_exp", "Qwen4ExpTextRMSNorm", 16, group_size=8), False),
                (norm("muse_spark", "MuseSparkTextCenteredRMSNorm", 16), False),
                (norm("muse_spark", "MuseSparkTextInputScaledRMSNorm", 16), False),
            ]
            self.norms = torch.nn.ModuleList(m for m, _ in chain if m is not None)
            self.gated = [gated for m, gated in chain if m is not None]

        def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            for module, gated in zip(self.norms, self.gated, strict=True):
                x = module(x, gate) if gated else module(x)
            return x

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        model = Model().to(dtype)
        with torch.no_grad():
            for t in model.parameters():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        normkit.convert(model)
        assert not conversion.plan(model).converted
        x, gate = (torch.randn(2, 5, 16, generator=gen).to(dtype) for _ in range(2))
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        results = []
        for fn in (model, compiled):
            leaves = [x.clone().requires_grad_(), gate.clone().requires_grad_()]
            y = fn(*leaves)
            y.backward(torch.ones_like(y))
            results.append((y.detach(), *(leaf.grad for leaf in leaves)))
        for got, want in zip(results[1], results[0], strict=True):
            assert_close(got, want.double(), dtype)
    torch._dynamo.reset()


def test_docstring_examples_run():
    import doctest

    from normkit.conversion import families

    result = doctest.testmod(families, extraglobs={"normkit": normkit}, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0
