"""normkit.convert / normkit.revert on torch.nn models, and on Hugging Face and timm models built from
their configs (random weights, no downloads; skipped where transformers or timm is not installed).

Outputs and gradients after conversion are compared with the original model's: in float32 under the
float32 tolerance; in bfloat16 with the three-way bound of :mod:`normkit.testing`, taking the
original model in float32 as the truth and the original model in bfloat16 as the baseline (the
converted model may be as far from float32 as the original is in bfloat16, twice over, not more).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import normkit
from normkit import conversion
from normkit.conversion import handlers
from normkit.testing import assert_close

# torch's own F.rms_norm warns that its fused kernel cannot take mixed dtypes
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norm parameters and running statistics (a fresh model's are ones and zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "norm" in name or ".bn" in name or "ln" in name or t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.75)
        for name, t in model.named_buffers():
            if name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return model


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def _run(model, inputs, grad: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = _output(model(**inputs) if isinstance(inputs, dict) else model(inputs))
    grads = {}
    if grad:
        gen = torch.Generator().manual_seed(1)
        proj = torch.randn(out.shape, generator=gen).to(out.dtype)
        (out.float() * proj.float()).sum().backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def check_equivalent(
    make_model, inputs, *, train: bool, expect: dict[str, int], fused: bool = False, kinks: bool = False
) -> None:
    """Original vs converted: float32 outputs and gradients, bfloat16 outputs, state_dict, revert.

    ``kinks``: the model has ReLUs, hard-swishes or max-pools, whose gradient jumps where an input crosses
    a kink or a tie. Two correct float32 norms one unit apart move an input that lies that close across
    it, and the gradient then differs by a whole element (torch's own ResNet-18 here does so with 1e-7
    relative noise on one BatchNorm's output): the gradients are compared in float64, where no input lies
    that close."""
    model = _randomize(make_model())
    model.train(train)
    before = _snapshot(model)
    types_before = [type(m) for m in model.modules()]
    repr_before = repr(model)
    params = dict(model.named_parameters())
    ref = copy.deepcopy(model)

    report = conversion.plan(model, fused=fused)
    assert report.counts() == expect, report
    assert not report.left, report
    assert normkit.convert(model, fused=fused) is model

    # state_dict: same keys, same values, the same parameter objects
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p is params[k] for k, p in model.named_parameters())

    out_ref, g_ref = _run(ref, inputs, grad=train)
    out, g = _run(model, inputs, grad=train)
    assert_close(out, out_ref.double(), torch.float32, msg="float32 output")
    grad_dtype = torch.float32
    if train and kinks:  # copies: the running statistics stay those of the float32 step
        grad_dtype = torch.float64
        _, g_ref = _run(copy.deepcopy(ref).double(), _to(inputs, grad_dtype), grad=True)
        _, g = _run(copy.deepcopy(model).double(), _to(inputs, grad_dtype), grad=True)
    assert g.keys() == g_ref.keys()
    # relative to the largest gradient: a norm right before another norm has a zero gradient in exact
    # arithmetic (the second undoes its scale and shift), so its own scale is rounding noise
    scale = max((float(v.abs().max()) for v in g_ref.values()), default=1.0)
    for k in g_ref:
        assert_close(g[k] / scale, g_ref[k].double() / scale, grad_dtype, msg=f"gradient of {k}")
    if train:  # running statistics updated the same way
        for k, v in ref.state_dict().items():
            if v.is_floating_point():
                assert_close(model.state_dict()[k], v.double(), torch.float32, msg=k)
            else:
                assert torch.equal(model.state_dict()[k], v), k

    # bfloat16: no further from the float32 model than the original in bfloat16 (twice over)
    if not train:
        lo_ref, lo = copy.deepcopy(ref).to(torch.bfloat16), copy.deepcopy(model).to(torch.bfloat16)
        lo_inputs = _lower(inputs)
        out_lo_ref, _ = _run(lo_ref, lo_inputs, grad=False)
        out_lo, _ = _run(lo, lo_inputs, grad=False)
        assert out_lo.dtype == out_lo_ref.dtype
        assert_no_worse(out_lo, out_ref, out_lo_ref)

    # revert: the original classes, the same objects, the same repr
    normkit.revert(model)
    assert [type(m) for m in model.modules()] == types_before
    assert repr(model) == repr_before
    assert all(p is params[k] for k, p in model.named_parameters())
    assert not any(hasattr(m, conversion._ORIGINAL) for m in model.modules())


def assert_no_worse(ours: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor) -> None:
    """A whole model's low-precision output: no further from the truth than the baseline, twice over,
    measured over the whole output (rounding differences take different paths through a deep model,
    so an elementwise bound would compare luck, not accuracy)."""
    ours, truth, baseline = ours.double(), truth.double(), baseline.double()
    err, base = (ours - truth).norm(), (baseline - truth).norm()
    allowed = 2 * base + 1e-3 * truth.norm()
    assert err <= allowed, f"|ours - truth| = {err:.4g} > {allowed:.4g} (baseline's {base:.4g})"


def _to(inputs, dtype: torch.dtype):
    if isinstance(inputs, dict):
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    return inputs.to(dtype)


def _lower(inputs):
    return _to(inputs, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# torch.nn
# --------------------------------------------------------------------------------------------------


class Every(torch.nn.Module):
    """One of every torch.nn norm class, on (N, C, L) / (N, C, H, W) / (N, C, D, H, W) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = torch.nn.BatchNorm1d(4)
        self.in1 = torch.nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
        self.ln = torch.nn.LayerNorm(6)
        self.rms = torch.nn.RMSNorm([4, 6])
        self.up = torch.nn.Conv1d(4, 8, 1)
        self.bn2 = torch.nn.BatchNorm2d(8, momentum=None)
        self.gn = torch.nn.GroupNorm(4, 8)
        self.in2 = torch.nn.InstanceNorm2d(8)
        self.bn3 = torch.nn.BatchNorm3d(8, affine=False)
        self.in3 = torch.nn.InstanceNorm3d(8, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.rms(self.ln(self.in1(self.bn1(x))))  # (N, 4, 6)
        h = self.up(h).unsqueeze(-1).expand(-1, -1, -1, 3)  # (N, 8, 6, 3)
        h = self.in2(self.gn(self.bn2(h)))
        h = self.in3(self.bn3(h.unsqueeze(2).expand(-1, -1, 2, -1, -1)))
        return h


EVERY = {"BatchNorm1d": 1, "InstanceNorm1d": 1, "LayerNorm": 1, "RMSNorm": 1, "BatchNorm2d": 1, "GroupNorm": 1,
         "InstanceNorm2d": 1, "BatchNorm3d": 1, "InstanceNorm3d": 1}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_every_torch_norm(train):
    torch.manual_seed(0)
    check_equivalent(Every, torch.randn(5, 4, 6), train=train, expect=EVERY)


def test_converted_modules_are_normkits_and_isinstance_of_torchs():
    model = normkit.convert(Every())
    assert type(model.ln) is normkit.nn.LayerNorm and isinstance(model.ln, torch.nn.LayerNorm)
    assert type(model.bn2) is normkit.nn.BatchNorm2d and type(model.in3) is normkit.nn.InstanceNorm3d
    assert type(model.up) is torch.nn.Conv1d


def test_a_norm_as_the_root_and_sync_batchnorm():
    ln = torch.nn.LayerNorm(3)
    assert normkit.convert(ln) is ln and type(ln) is normkit.nn.LayerNorm
    sbn = torch.nn.SyncBatchNorm(3)
    normkit.convert(sbn)
    assert type(sbn) is normkit.nn.SyncBatchNorm
    assert type(normkit.revert(sbn)) is torch.nn.SyncBatchNorm


def test_kinds_not_inplace_and_twice():
    model = Every()
    copy_ = normkit.convert(model, kinds=["layer_norm", "group_norm"], inplace=False)
    assert copy_ is not model and type(model.ln) is torch.nn.LayerNorm  # the original is untouched
    assert type(copy_.ln) is normkit.nn.LayerNorm and type(copy_.gn) is normkit.nn.GroupNorm
    assert type(copy_.bn1) is torch.nn.BatchNorm1d
    left = {s.name: s.reason for s in conversion.plan(copy_).left}
    assert left["ln"] == "already converted by normkit"
    assert "not selected" in conversion.plan(model, kinds=["rms_norm"]).left[0].reason
    with pytest.raises(ValueError, match="unknown kinds"):
        normkit.convert(model, kinds=["batchnorm"])


def test_subclasses_and_unknown_norms_are_left_with_reasons():
    class MyLayerNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    class MyBatchNorm(torch.nn.BatchNorm2d):
        pass

    class WeirdNorm(torch.nn.Module):
        def forward(self, x):
            return x

    class ConvNorm(torch.nn.Sequential):  # a block named after its norm: not a norm itself
        pass

    block = ConvNorm(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3))
    model = torch.nn.Sequential(MyLayerNorm(3), MyBatchNorm(3), WeirdNorm(), torch.nn.LayerNorm(3), block)
    report = conversion.plan(model)
    assert [s.name for s in report.converted] == ["3", "4.1"]
    reasons = {s.name: s.reason for s in report.left}
    assert reasons["0"] == "subclass of LayerNorm with its own forward: only exact classes are converted"
    assert reasons["1"] == "subclass of BatchNorm2d: only exact classes are converted"
    assert reasons["2"] == "no normkit handler for this class"
    text = str(report)
    assert "2 converted, 3 left" in text and "WeirdNorm" in text


def test_a_handler_that_disagrees_with_the_installed_class_is_not_used(monkeypatch):
    # pretend torch's LayerNorm became an RMSNorm-like class: the check must catch it
    class Wrong:
        def forward(self, x):
            return torch.nn.functional.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    h = handlers.handler_for(torch.nn.LayerNorm)
    monkeypatch.setitem(handlers._HANDLERS, h.qualname, handlers.Handler(
        h.qualname, h.kind, h.source, lambda original: type("W", (Wrong, original), {}), h.sample))
    model = torch.nn.Sequential(torch.nn.LayerNorm(8))
    report = conversion.plan(model)
    assert not report.converted and "differs from this version's original" in report.left[0].reason
    assert type(normkit.convert(model)[0]) is torch.nn.LayerNorm
    assert report.counts() == {}


def test_a_forward_replaced_on_the_instance_is_left():
    model = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.LayerNorm(4))
    model[0].forward = lambda x: x  # a monkeypatch: a new class would not change what runs
    report = conversion.plan(model)
    assert [s.name for s in report.converted] == ["1"]
    assert report.left[0].name == "0" and "replaced on the instance" in report.left[0].reason


def test_accelerate_hooks_run_the_converted_forward(monkeypatch):
    """A model dispatched by accelerate (device_map, offloading) calls each module's forward through a hook
    that kept the forward it found: converting must reach that one, and revert restore it."""
    transformers = pytest.importorskip("transformers")
    hooks = pytest.importorskip("accelerate.hooks")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    _randomize(model)
    hooks.attach_align_device_hook(model, execution_device=torch.device("cpu"))
    ids = IDS["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    normkit.convert(model)
    calls = []
    rms_norm = normkit.functional.rms_norm
    monkeypatch.setattr(normkit.functional, "rms_norm", lambda *a, **k: calls.append(1) or rms_norm(*a, **k))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert len(calls) == 5  # every RMSNorm, each once
    assert_close(got, want.double(), torch.float32)
    normkit.revert(model)
    calls.clear()
    with torch.no_grad():
        again = model(input_ids=ids).logits
    assert not calls and torch.equal(again, want)
    # a hook removed after the conversion leaves the converted forward on the instance; revert replaces it
    norm = model.model.norm
    normkit.convert(model)
    hooks.remove_hook_from_module(norm)
    calls.clear()
    norm(torch.randn(2, 64))
    assert calls
    normkit.revert(model)
    calls.clear()
    norm(torch.randn(2, 64))
    assert not calls and type(norm).__name__ == "LlamaRMSNorm"


def test_offloaded_weights_are_left_unless_unchecked(monkeypatch):
    """accelerate's cpu_offload keeps the weights off the module (on the meta device) until a call: the
    check cannot run on them, so the module is left with the reason; check=False converts it."""
    transformers = pytest.importorskip("transformers")
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)))
    with torch.no_grad():
        want = model(input_ids=IDS["input_ids"]).logits
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    report = conversion.plan(model)
    assert not report.converted and all("meta device" in s.reason for s in report.left)
    normkit.convert(model, check=False)
    assert conversion.plan(model).counts() == {}  # all converted now
    calls = []
    rms_norm = normkit.functional.rms_norm
    monkeypatch.setattr(normkit.functional, "rms_norm", lambda *a, **k: calls.append(1) or rms_norm(*a, **k))
    with torch.no_grad():
        got = model(input_ids=IDS["input_ids"]).logits
    assert len(calls) == 5
    assert_close(got, want.double(), torch.float32)


def test_fused_groupnorm_silu_in_sequential():
    def make():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                                   torch.nn.Conv2d(8, 4, 1), torch.nn.GroupNorm(2, 4), torch.nn.ReLU())

    torch.manual_seed(0)
    check_equivalent(make, torch.randn(2, 3, 9, 9), train=True, expect={"GroupNorm": 2}, fused=True)
    model = make()
    silu = model[2]
    normkit.convert(model, fused=True)
    assert type(model[1]) is normkit.nn.GroupNormSiLU and type(model[4]) is normkit.nn.GroupNorm
    assert isinstance(model[2], torch.nn.Identity) and "fused into the previous norm" in repr(model[2])
    normkit.revert(model)
    assert model[2] is silu and type(model[1]) is torch.nn.GroupNorm


def test_pickle_a_converted_model():
    model = normkit.convert(Every())
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone.ln) is normkit.nn.LayerNorm
    x = torch.randn(5, 4, 6)
    model.eval(), clone.eval()
    assert torch.equal(model(x), clone(x))


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------------------

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def _hf(model_cls: str, config_cls: str, **extra):
    def make():
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**TINY, **extra)
        config._attn_implementation = "eager"
        return getattr(transformers, model_cls)(config)

    return make


IDS = {"input_ids": torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))}
HF_MODELS = {
    "llama": (_hf, ("LlamaForCausalLM", "LlamaConfig"), {}, {"LlamaRMSNorm": 5}),
    "mistral": (_hf, ("MistralForCausalLM", "MistralConfig"), {}, {"MistralRMSNorm": 5}),
    "qwen2": (_hf, ("Qwen2ForCausalLM", "Qwen2Config"), {}, {"Qwen2RMSNorm": 5}),
    "qwen3": (_hf, ("Qwen3ForCausalLM", "Qwen3Config"), {"head_dim": 16}, {"Qwen3RMSNorm": 9}),
    "gemma": (_hf, ("GemmaForCausalLM", "GemmaConfig"), {"head_dim": 16}, {"GemmaRMSNorm": 5}),
    # copies of a handled class's code (normkit.conversion.families), matched by their code
    "phi3": (_hf, ("Phi3ForCausalLM", "Phi3Config"), {"pad_token_id": 0}, {"Phi3RMSNorm": 5}),
    "mixtral": (_hf, ("MixtralForCausalLM", "MixtralConfig"), {"num_local_experts": 4}, {"MixtralRMSNorm": 5}),
    "granite": (_hf, ("GraniteForCausalLM", "GraniteConfig"), {}, {"GraniteRMSNorm": 5}),
    # the weight multiplies before the cast back; Olmo2's q/k norms span all heads
    "olmo2": (_hf, ("Olmo2ForCausalLM", "Olmo2Config"), {}, {"Olmo2RMSNorm": 9}),
    "gpt_oss": (_hf, ("GptOssForCausalLM", "GptOssConfig"), {"head_dim": 16, "num_local_experts": 4},
                {"GptOssRMSNorm": 5}),
    # Llama 4: Llama's casts (its epsilon named eps) and weightless q/k norms; OLMo: LayerNorm without
    # parameters; NanoChat: weightless RMSNorms throughout
    "llama4": (_hf, ("Llama4ForCausalLM", "Llama4TextConfig"),
               {"head_dim": 16, "num_local_experts": 2, "intermediate_size_mlp": 128, "pad_token_id": 0},
               {"Llama4TextRMSNorm": 5, "Llama4TextL2Norm": 2}),
    "olmo": (_hf, ("OlmoForCausalLM", "OlmoConfig"), {"pad_token_id": 0}, {"OlmoLayerNorm": 5}),
    "nanochat": (_hf, ("NanoChatForCausalLM", "NanoChatConfig"), {}, {"NanoChatRMSNorm": 9}),
    # LayerNorm without a bias; its q/k norms have a (heads, head_dim) weight
    "cohere": (_hf, ("CohereForCausalLM", "CohereConfig"), {"use_qk_norm": True}, {"CohereLayerNorm": 7}),
    # Llama's RMSNorms, and a gated one (the gate after the norm) in its linear-attention layer
    "qwen3_next": (_hf, ("Qwen3NextForCausalLM", "Qwen3NextConfig"),
                   {"head_dim": 16, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
                    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "num_experts": 4,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                    "layer_types": ["linear_attention", "full_attention"]},
                   {"Qwen3NextRMSNorm": 7, "Qwen3NextRMSNormGated": 1}),
    # weight before the cast (an Olmo2 copy), and weightless norms whose scale is rounded before the multiply
    "deepseek_v4": (_hf, ("DeepseekV4ForCausalLM", "DeepseekV4Config"),
                    {"moe_intermediate_size": 32, "head_dim": 32, "q_lora_rank": 32, "o_lora_rank": 32,
                     "n_routed_experts": 4, "num_experts_per_tok": 2, "index_n_heads": 2, "index_head_dim": 16,
                     "index_topk": 8, "qk_rope_head_dim": 16, "sliding_window": 8},
                    {"DeepseekV4RMSNorm": 11, "DeepseekV4UnweightedRMSNorm": 7}),
    # Falcon-H1's gated norm in its Mamba-2 mixers: all in float32, over 2 groups, gated before the norm
    # (this config; the family test covers the gate after it and one group)
    "falcon_h1": (_hf, ("FalconH1ForCausalLM", "FalconH1Config"),
                  {"mamba_d_ssm": 64, "mamba_n_heads": 8, "mamba_d_head": 8, "mamba_n_groups": 2, "mamba_d_state": 16,
                   "mamba_chunk_size": 8, "mamba_rms_norm": True, "mamba_norm_before_gate": False},
                  {"FalconH1RMSNorm": 5, "FalconH1RMSNormGated": 2}),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("family", list(HF_MODELS))
def test_hugging_face_decoders(family, train):
    factory, names, extra, expect = HF_MODELS[family]
    check_equivalent(factory(*names, **extra), IDS, train=train, expect=expect)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_hugging_face_mamba2(train):
    """Mamba-2: its RMSNorms and the gated one in each mixer (the gate before the norm, over groups)."""
    transformers = pytest.importorskip("transformers")

    def make():
        torch.manual_seed(0)
        config = transformers.Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=128, state_size=16,
                                           num_heads=8, head_dim=16, n_groups=2, expand=2, chunk_size=8)
        return transformers.Mamba2ForCausalLM(config)

    check_equivalent(make, IDS, train=train, expect={"Mamba2RMSNorm": 3, "MambaRMSNormGated": 2})


def test_mamba2_gated_norm_of_transformers_before_groups(monkeypatch):
    """transformers 5.17's MambaRMSNormGated (the GPU machine's) has no ``group_size``: it normalizes
    ``x · silu(gate)`` over the whole row. Its modules convert (they were left alone, the converted forward
    reading the missing attribute) and compute what it does, forward and backward, in float32 and bfloat16."""
    pytest.importorskip("transformers")
    from transformers.models.mamba2 import modeling_mamba2

    def __init__(self, hidden_size, eps=1e-6):  # 5.17's code
        torch.nn.Module.__init__(self)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states, gate=None):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        if gate is not None:
            hidden_states = hidden_states * torch.nn.functional.silu(gate.to(torch.float32))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    cls = modeling_mamba2.MambaRMSNormGated
    monkeypatch.setattr(cls, "__init__", __init__)
    monkeypatch.setattr(cls, "forward", forward)
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        original = torch.nn.Sequential(cls(48)).to(dtype)
        with torch.no_grad():
            original[0].weight.copy_(torch.rand(48, generator=gen) + 0.5)
        model = normkit.convert(copy.deepcopy(original), inplace=False)
        assert type(model[0]) is not cls and isinstance(model[0], cls)
        x, gate = (torch.randn(3, 7, 48, generator=gen).to(dtype) for _ in range(2))
        results = []
        for m in (original, model):
            leaves = [x.clone().requires_grad_(), gate.clone().requires_grad_()]
            y = m[0](*leaves)
            y.backward(torch.ones_like(y))
            results.append((y.detach(), *(t.grad for t in leaves), m[0].weight.grad))
            with torch.no_grad():
                results[-1] += (m[0](x, gate),)  # inference: the one-pass kernel
        for got, want in zip(results[1], results[0], strict=True):
            assert_close(got, want.double(), dtype)
        assert type(normkit.revert(model)[0]) is cls


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_hugging_face_t5(train):
    transformers = pytest.importorskip("transformers")

    def make():
        torch.manual_seed(0)
        config = transformers.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=128,
                                       dropout_rate=0.0)
        return transformers.T5ForConditionalGeneration(config)

    inputs = {"input_ids": IDS["input_ids"], "decoder_input_ids": IDS["input_ids"][:, :5]}
    check_equivalent(make, inputs, train=train, expect={"T5LayerNorm": 12})


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_hugging_face_convnext(train):
    """transformers' own ConvNext LayerNorm (a subclass of nn.LayerNorm), channels-first and -last."""
    transformers = pytest.importorskip("transformers")

    def make():
        torch.manual_seed(0)
        config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                             num_labels=5, image_size=32)
        return transformers.ConvNextForImageClassification(config)

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    check_equivalent(make, {"pixel_values": images}, train=train, expect={"ConvNextLayerNorm": 4, "LayerNorm": 1})


_PIXELS = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
HF_ENCODERS = {
    # LayerNorm in float32, rounded, then the affine
    "deberta": (lambda t: t.DebertaModel(t.DebertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                         intermediate_size=64, vocab_size=128,
                                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
                IDS, {"DebertaLayerNorm": 5}),
    # LayerNorm over the channels of (N, C, H, W) in its residual blocks
    "vitdet": (lambda t: t.VitDetModel(t.VitDetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                      mlp_ratio=2, image_size=32, pretrain_image_size=32,
                                                      patch_size=8, residual_block_indices=[1])),
               _PIXELS, {"LayerNorm": 4, "VitDetLayerNorm": 3}),
    # GroupNorm with one group
    "poolformer": (lambda t: t.PoolFormerModel(t.PoolFormerConfig(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1])),
                   _PIXELS, {"PoolFormerGroupNorm": 8}),
    # LayerNorm over the channels of (N, C, W), permuted around nn.LayerNorm
    "squeezebert": (lambda t: t.SqueezeBertModel(t.SqueezeBertConfig(
        hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=128, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=2,
        output_groups=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        IDS, {"SqueezeBertLayerNorm": 4, "LayerNorm": 1}),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(HF_ENCODERS))
def test_hugging_face_encoders(name, train):
    transformers = pytest.importorskip("transformers")
    build, inputs, expect = HF_ENCODERS[name]

    def make():
        torch.manual_seed(0)
        return build(transformers)

    check_equivalent(make, inputs, train=train, expect=expect)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_hugging_face_detr(train):
    """DETR with transformers' own ResNet backbone, whose BatchNorms it freezes (DetrFrozenBatchNorm2d)."""
    transformers = pytest.importorskip("transformers")

    def make():
        torch.manual_seed(0)
        backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                             out_features=["stage4"])
        config = transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone,
                                         use_pretrained_backbone=False, d_model=32, encoder_layers=1,
                                         decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                                         encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5, dropout=0.0)
        model = transformers.DetrForObjectDetection(config)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():  # non-trivial frozen statistics and affine (buffers, not parameters)
            for name, t in model.named_buffers():
                if "running_var" in name or name.endswith(".weight"):
                    t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
                elif "running_mean" in name or name.endswith(".bias"):
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
        return model

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    check_equivalent(make, {"pixel_values": images}, train=train,
                     expect={"DetrFrozenBatchNorm2d": 16, "LayerNorm": 6})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_llama_rms_norm_in_16_bit_one_pass(dtype):
    """A 16-bit Llama RMSNorm (its weight in the same dtype) runs as one op that rounds the normalized
    value before the weight multiplies it, as the original does: outputs within the dtype's bound of the
    original's float64 math, gradients no further from it than the original's own, and less kept for
    the backward (the input and one float per row)."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from normkit.bench import saved_bytes

    original = _randomize(LlamaRMSNorm(64)).to(dtype)
    converted = normkit.convert(copy.deepcopy(original))
    truth = copy.deepcopy(original).double()
    x = (3 * torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(0))).to(dtype)
    dy = torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    outs, grads = [], []
    for model, t in ((original, x), (converted, x), (truth, x.double())):
        leaf = t.clone().requires_grad_()
        y = model(leaf)
        y.backward(dy.to(y.dtype))
        outs.append(y.detach())
        grads.append((leaf.grad, model.weight.grad))
    assert outs[1].dtype == outs[0].dtype == dtype
    assert_close(outs[1], outs[2], dtype, baseline=outs[0], msg="output")
    for i in range(2):  # the input's gradient, the weight's
        assert_no_worse(grads[1][i], grads[2][i], grads[0][i])
    kept = [saved_bytes(lambda t, *_, m=m: m(t), [x.clone().requires_grad_(), *m.parameters()]).new
            for m in (original, converted)]
    assert kept[1] == 4 * 9 * 4 < kept[0]  # float32 rstd per row, against the original's intermediates


def test_gemma_weight_offset_and_t5_half_weight_casting():
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    x = torch.randn(3, 16, dtype=torch.bfloat16)
    for make in (lambda: GemmaRMSNorm(16), lambda: T5LayerNorm(16), lambda: T5LayerNorm(16).to(torch.bfloat16)):
        original = _randomize(make())
        converted = normkit.convert(copy.deepcopy(original))
        want, got = original(x), converted(x)
        assert got.dtype == want.dtype  # T5: float32 with a float32 weight, the weight's dtype otherwise
        assert_close(got, original.float()(x.float()).double(), want.dtype, baseline=want)
    assert transformers is not None


# --------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------


def _timm(name: str, **kwargs):
    def make():
        timm = pytest.importorskip("timm")
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return make


TIMM_MODELS = {
    "resnet18": (_timm("resnet18"), {"BatchNorm2d": 20}),
    "convnext_atto": (_timm("convnext_atto"), {"LayerNorm2d": 17}),
    "mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), {"BatchNormAct2d": 34}),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_models(name, train):
    make, expect = TIMM_MODELS[name]
    check_equivalent(make, torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0)),
                     train=train, expect=expect, kinks=True)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_timm_groupnorm_efficientnet(fused, train):
    """timm's GroupNorm EfficientNet (GroupNormAct with SiLU and with no activation), plain and fused."""
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    check_equivalent(_timm("test_efficientnet_gn"), x, train=train, expect={"GroupNormAct": 13}, fused=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_timm_layers(fused):
    layers = pytest.importorskip("timm.layers")

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            layers.GroupNormAct(8, 4, act_layer=torch.nn.SiLU),
            layers.GroupNorm1(8),
            layers.GroupNorm(8, 4),
            layers.LayerNormAct2d(8, act_layer=torch.nn.GELU),
            layers.RmsNorm2d(8),
            layers.GroupNorm1Act(8, act_layer=torch.nn.ReLU),
            torch.nn.Flatten(2),
            layers.LayerNorm(25),
            layers.RmsNorm(25),
            layers.LayerNormAct(25),
        )

    expect = {"GroupNormAct": 1, "GroupNorm1": 1, "GroupNorm": 1, "LayerNormAct2d": 1, "RmsNorm2d": 1,
              "GroupNorm1Act": 1, "LayerNorm": 1, "RmsNorm": 1, "LayerNormAct": 1}
    check_equivalent(make, torch.randn(3, 8, 5, 5), train=True, expect=expect, fused=fused)
    model = normkit.convert(make(), fused=fused)
    assert isinstance(model[0], layers.GroupNormAct) and model[0]._silu_fusable() is fused


def test_timm_float32_and_rms_act_layers():
    layers = pytest.importorskip("timm.layers")

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            layers.LayerNorm2dFp32(8), layers.RmsNorm2dFp32(8), layers.RmsNormAct2d(8, act_layer=torch.nn.GELU),
            layers.LayerNormAct2dFp32(8, act_layer=torch.nn.SiLU), layers.RmsNormAct2dFp32(8), torch.nn.Flatten(2),
            layers.LayerNormFp32(25), layers.RmsNormFp32(25), layers.RmsNormAct(25),
            layers.LayerNormActFp32(25), layers.RmsNormActFp32(25, act_layer=torch.nn.SiLU),
        )

    expect = {name: 1 for name in ("LayerNorm2dFp32", "RmsNorm2dFp32", "RmsNormAct2d", "LayerNormAct2dFp32",
                                   "RmsNormAct2dFp32", "LayerNormFp32", "RmsNormFp32", "RmsNormAct",
                                   "LayerNormActFp32", "RmsNormActFp32")}
    for train in (True, False):
        check_equivalent(make, torch.randn(3, 8, 5, 5), train=train, expect=expect)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_timm_channel_norms_keep_the_original_layout(channels_last):
    """A view downstream works on the converted output where it worked on the original's."""
    layers = pytest.importorskip("timm.layers")
    x = torch.randn(2, 8, 5, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for make in (lambda: layers.LayerNorm2d(8), lambda: layers.RmsNorm2d(8), lambda: layers.LayerNorm2dFp32(8),
                 lambda: layers.RmsNorm2dFp32(8), lambda: layers.RmsNormAct2d(8), lambda: layers.LayerNormAct2d(8)):
        original = make()
        want, got = original(x), normkit.convert(copy.deepcopy(original))(x)
        assert got.is_contiguous() == want.is_contiguous(), type(original).__name__
        assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(
            memory_format=torch.channels_last), type(original).__name__


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_timm_metaformer_norms_without_bias(train):
    pytest.importorskip("timm")
    from timm.models.metaformer import LayerNorm2dNoBias, LayerNormNoBias

    def make():
        return torch.nn.Sequential(LayerNorm2dNoBias(6), torch.nn.Conv2d(6, 6, 1), Permute(), LayerNormNoBias(6))

    check_equivalent(make, torch.randn(2, 6, 5, 4), train=train, expect={"LayerNorm2dNoBias": 1, "LayerNormNoBias": 1})


class Permute(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def test_frozen_batch_norms():
    """torchvision's FrozenBatchNorm2d, DETR's copy and timm's FrozenBatchNormAct2d: inference BatchNorm
    from buffers; the input's gradient flows, nothing else has one."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from timm.layers import FrozenBatchNormAct2d
    from torchvision.ops.misc import FrozenBatchNorm2d
    from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d

    gen = torch.Generator().manual_seed(0)
    for make in (lambda: FrozenBatchNorm2d(6, eps=1e-3), lambda: DetrFrozenBatchNorm2d(6),
                 lambda: FrozenBatchNormAct2d(6, act_layer=torch.nn.SiLU)):
        original = make()
        for name, t in original.named_buffers():
            t.copy_(torch.rand(6, generator=gen) + 0.5 if name == "running_var" else torch.randn(6, generator=gen))
        converted = normkit.convert(copy.deepcopy(original))
        assert type(converted) is not type(original) and isinstance(converted, type(original))
        x = torch.randn(2, 6, 5, 4, generator=gen) * 2
        outs, grads = [], []
        for model in (original, converted):
            leaf = x.clone().requires_grad_()
            y = model(leaf)
            y.backward(torch.ones_like(y))
            outs.append(y.detach())
            grads.append(leaf.grad)
        assert_close(outs[1], outs[0].double(), torch.float32, msg=f"{type(original).__name__} output")
        assert_close(grads[1], grads[0].double(), torch.float32, msg=f"{type(original).__name__} input gradient")
        with torch.no_grad():
            lo = x.to(torch.bfloat16)
            want, got = copy.deepcopy(original).to(torch.bfloat16)(lo), copy.deepcopy(converted).to(torch.bfloat16)(lo)
        assert got.dtype == want.dtype
        assert_close(got, outs[0].double(), torch.bfloat16, baseline=want)


def test_timm_subclass_with_its_own_forward_is_left():
    layers = pytest.importorskip("timm.layers")
    report = conversion.plan(torch.nn.Sequential(layers.norm.LayerNormExp2d(8), layers.SimpleNorm(8)))
    reasons = [s.reason for s in report.left]
    assert reasons[0].startswith("subclass of LayerNorm with its own forward")
    assert reasons[1] == "no normkit handler for this class"


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("act", ["ReLU", "Hardswish", "SiLU", "Identity"])
def test_timm_batchnorm_act_inference(fused, act):
    """BatchNormAct2d in inference runs batch_norm_act (ReLU always, Hardswish/SiLU when fused) and
    gives the original's outputs: exactly with ReLU and Hardswish in float32."""
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    original = layers.BatchNormAct2d(8, act_layer=getattr(torch.nn, act)).eval()
    original.running_mean.normal_()
    original.running_var.uniform_(0.5, 2.0)
    converted = normkit.convert(copy.deepcopy(original), fused=fused)
    calls = []
    real = normkit.functional.batch_norm_act
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(normkit.functional, "batch_norm_act", lambda *a, **k: calls.append(k) or real(*a, **k))
        x = torch.randn(3, 8, 6, 5)
        with torch.no_grad():
            y, r = converted(x), original(x)
    expected = {"ReLU": True, "Hardswish": fused, "SiLU": fused, "Identity": False}[act]
    assert bool(calls) is expected
    if act == "SiLU" and fused:
        torch.testing.assert_close(y, r, rtol=2e-6, atol=2e-6)
    else:
        torch.testing.assert_close(y, r, rtol=1e-6, atol=1e-6)


def test_timm_mobilenet_inference_fused():
    """A MobileNetV3 (BatchNormAct2d with ReLU and Hardswish) converted with fused=True, under no_grad."""
    make = _timm("mobilenetv3_small_050")
    original = make().eval()
    converted = normkit.convert(copy.deepcopy(original), fused=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-5)
