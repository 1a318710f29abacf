"""``benchmarks/convert_speed.py``'s machinery on tiny modules: the row it writes, the output difference it
records, and ``--compile``. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("transformers")

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "convert_speed.py"


@pytest.fixture()
def convert_speed(monkeypatch):
    spec = importlib.util.spec_from_file_location("convert_speed", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "COMPILE", False)
    return module


@pytest.mark.parametrize("train", [False, True], ids=["inference", "train"])
def test_compare_row(convert_speed, train):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    row = convert_speed.compare("rms", LlamaRMSNorm(16), torch.randn(2, 3, 16), reps=3, train=train)
    assert row["case"] == "rms" and row["mode"] == ("train step" if train else "inference")
    assert row["reps"] == 3 and not row["compiled"]
    assert row["speedup_p25"] <= row["speedup"] <= row["speedup_p75"]
    assert row["original_ms"] > 0 and row["converted_ms"] > 0
    assert row["max_diff"] < 1e-6  # float32: the converted RMSNorm gives the same bits or nearly
    if train:  # the activations saved for the backward: HF's RMSNorm keeps its intermediates, normkit x's rstd
        assert 0 < row["saved_mib_converted"] < row["saved_mib_original"]
    else:
        assert row["saved_mib_original"] is None and row["saved_mib_converted"] is None


def test_compare_compiled_and_fused(convert_speed, monkeypatch):
    layers = pytest.importorskip("timm.layers")
    monkeypatch.setattr(convert_speed, "COMPILE", True)
    model = torch.nn.Sequential(layers.GroupNormAct(8, 4, act_layer=torch.nn.SiLU))
    row = convert_speed.compare("gn", model, torch.randn(2, 8, 5, 5), reps=2, fused=True)
    assert row["case"] == "gn, fused=True, compiled" and row["compiled"]
    assert row["max_diff"] < 1e-5


def test_write_records_machine_and_versions(convert_speed, tmp_path):
    rows = [{"case": "x", "speedup": 1.0}]
    out = tmp_path / "r.json"
    convert_speed._write(out, rows, "cpu")
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["device"] == "cpu"
    assert {"torch", "normkit", "transformers", "timm"} <= saved["versions"].keys()
    assert saved["machine"]


def test_profile_convert_script_on_the_cpu(tmp_path):
    """``benchmarks/profile_convert.py`` on a tiny timm model: both sides profiled in both modes, the norm
    modules under their own rows (normkit's CPU kernels are no torch ops), the JSON written."""
    spec = importlib.util.spec_from_file_location("profile_convert", _SCRIPT.with_name("profile_convert.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "profile.json"
    assert module.main(["--model", "resnet18", "--batch", "2", "--size", "32", "--steps", "1", "--top", "40",
                        "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in results] == ["inference", "train step"]
    for r in results:
        assert r["speedup"] > 0 and r["original"]["kernel_ms"] is None  # no device time on the CPU
        kinds = {t["name"]: t["kind"] for t in r["converted"]["top"]}
        assert kinds["norm module: BatchNorm2d"] == "range"
        assert {"op", "range"} <= set(kinds.values()) and "kernel" not in kinds.values()  # no device events


@pytest.mark.parametrize("train", [False, True], ids=["inference", "train"])
def test_compare_a_module_of_two_inputs(convert_speed, train):
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

    inputs = (torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    row = convert_speed.compare("gated", Qwen3NextRMSNormGated(16), inputs, reps=2, train=train)
    assert row["case"] == "gated" and row["max_diff"] < 1e-6
    assert (row["saved_mib_converted"] is not None) == train


def test_llm_norm_cases_are_each_their_own(convert_speed):
    """Each thunk of the llm_norms group binds its own case (a lambda in a loop would see the last one)."""
    thunks = convert_speed.cases(1)["llm_norms"]
    bound = {thunk.__defaults__[:3] for thunk in thunks}
    assert len(thunks) == 2 * len(convert_speed._llm_norms()) == len(bound) * 2
    gpu = convert_speed.gpu_cases(1)["llm_norms"]  # one dtype, four times the hidden sizes
    assert len({thunk.__defaults__[:4] for thunk in gpu}) == len(gpu) == len(convert_speed._llm_norms(scale=4))
    assert {t.__defaults__[3] for t in gpu} == {4 * d for *_, d, _ in convert_speed._llm_norms()}
