"""``normkit verify`` / ``normkit env`` and the conformance matrix behind them (normkit.verify).

Everything here runs small filtered matrices, so the file takes seconds; the full sweep is
``normkit verify --full``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import normkit
from normkit import backends, cli, verify
from normkit.backends.reference import ReferenceBackend
from normkit.nn._compat import TORCH_HAS_BIAS_KWARG


class BrokenLayerNorm(ReferenceBackend):
    """The reference backend with a LayerNorm whose output is off by 1e-2 (gradients stay right)."""

    name = "broken"

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        return super().layer_norm(x, normalized_shape, weight, bias, eps) + 1e-2


class RaisingGroupNorm(ReferenceBackend):
    name = "raising"

    def group_norm(self, x, num_groups, weight, bias, eps):
        raise RuntimeError("deliberately unimplemented")


class SupportsNothing(ReferenceBackend):
    """A backend that hands every tensor to the reference (as a CUDA-only backend does on CPU)."""

    name = "picky"

    def supports(self, x):
        return False


@pytest.fixture
def extra_backends():
    """Register the deliberately wrong backends for one test, and restore the registry after."""
    factories = dict(backends._factories)
    instances = dict(backends._instances)
    backends.register_backend("broken", BrokenLayerNorm)
    backends.register_backend("raising", RaisingGroupNorm)
    backends.register_backend("picky", SupportsNothing)
    try:
        yield
    finally:
        backends._factories.clear()
        backends._factories.update(factories)
        backends._instances.clear()
        backends._instances.update(instances)


def _run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------------
# normkit verify
# --------------------------------------------------------------------------------------------------


def test_verify_small_matrix_passes_and_prints_table(capsys):
    code, out, _ = _run_cli(
        capsys, "verify", "--backend", "reference", "--module", "LayerNorm", "--dtype", "float32"
    )
    assert code == 0, out
    n = len(verify.build_matrix(backends=["reference"], devices=verify.available_devices(),
                                dtypes=["float32"], modules=["LayerNorm"]))
    assert n > 0
    for header in ("module", "dtype", "backend", "device", "cases", "worst err/allowed", "result"):
        assert header in out
    assert "LayerNorm" in out and "reference" in out and "pass" in out
    assert "FAIL" not in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith(f"{n} cases, ") and ": all passed" in summary


def test_verify_all_backends_by_default(capsys):
    code, out, _ = _run_cli(capsys, "verify", "--module", "RMSNorm", "--dtype", "bf16")
    assert code == 0, out
    for name in normkit.available_backends():
        assert name in out
    assert "bfloat16" in out


def test_verify_quiet_prints_only_the_summary(capsys):
    code, out, err = _run_cli(capsys, "verify", "-q", "--backend", "torch", "--module", "GroupNorm",
                              "--dtype", "float64")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("s)") and ": all passed" in lines[0]
    assert err == ""


def test_broken_backend_is_reported_and_fails(capsys, extra_backends):
    code, out, _ = _run_cli(
        capsys, "verify", "--backend", "broken", "--module", "LayerNorm", "--dtype", "float32"
    )
    assert code == 1
    n = len(verify.build_matrix(backends=["broken"], dtypes=["float32"], modules=["LayerNorm"]))
    assert "FAIL" in out
    # every case listed in detail, each with its failing quantity: the output (gradients are right)
    assert out.count("FAIL LayerNorm") == n
    assert "output: max error" in out
    assert "grad_input: max error" not in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith(f"{n} cases, ") and f"{n} failed (in {n} cases)" in summary


def test_broken_backend_other_modules_still_pass(capsys, extra_backends):
    code, out, _ = _run_cli(capsys, "verify", "--backend", "broken", "--module", "BatchNorm1d",
                            "--dtype", "float32", "-q")
    assert code == 0, out


def test_exception_in_normkit_is_a_failure_not_a_crash(capsys, extra_backends):
    code, out, _ = _run_cli(capsys, "verify", "--backend", "raising", "--module", "GroupNorm",
                            "--dtype", "float16", "-q")
    assert code == 1
    assert "exception: RuntimeError: deliberately unimplemented" in out


def test_hand_over_to_the_reference_is_noted(capsys, extra_backends):
    code, out, _ = _run_cli(capsys, "verify", "--backend", "picky", "--module", "RMSNorm",
                            "--dtype", "float32", "-q")
    assert code == 0
    n = len(verify.build_matrix(backends=["picky"], dtypes=["float32"], modules=["RMSNorm"]))
    assert f"note: {n} case(s) ran on another backend" in out and "picky -> reference" in out


def test_broken_backend_python_api(extra_backends):
    case = verify.Case("LayerNorm", (17,), (), (5, 17), torch.float32, backend="broken")
    result = verify.run_case(case)
    assert not result.ok and result.error is None
    assert result.executed_by == "broken"
    by_name = {c.quantity: c for c in result.checks}
    assert set(by_name) == {"output", "grad_input", "grad_weight", "grad_bias"}
    out = by_name["output"]
    assert not out.ok and out.max_error == pytest.approx(1e-2, rel=1e-3)
    assert out.max_error > out.allowed and out.ratio > 1
    assert all(by_name[q].ok for q in ("grad_input", "grad_weight", "grad_bias"))
    # the same case on the reference backend passes, with the same seed (data) whatever the backend
    good = verify.run_case(verify.Case("LayerNorm", (17,), (), (5, 17), torch.float32))
    assert good.ok and good.case.seed == case.seed


def test_json_results(capsys, tmp_path):
    path = tmp_path / "results.json"
    code, out, _ = _run_cli(capsys, "verify", "--backend", "reference", "--module", "BatchNorm2d",
                            "--dtype", "float16", "--json", str(path), "-q")
    assert code == 0
    doc = json.loads(path.read_text())
    results = doc["results"]
    assert doc["summary"]["ok"] is True
    assert doc["summary"]["cases"] == len(results) > 0
    assert doc["summary"]["checks"] == sum(len(r["checks"]) for r in results)
    assert f"{len(results)} cases, {doc['summary']['checks']} checks: all passed" in out
    assert {g["module"] for g in doc["groups"]} == {"BatchNorm2d"}
    modes, formats = set(), set()
    for r in results:
        assert r["module"] == "BatchNorm2d" and r["dtype"] == "float16" and r["backend"] == "reference"
        assert r["ok"] is True and r["error"] is None
        modes.add(r["mode"])
        formats.add(r["memory_format"])
        quantities = {c["quantity"] for c in r["checks"]}
        assert {"output", "grad_input"} <= quantities
        for c in r["checks"]:
            assert c["ok"] is True
            assert isinstance(c["max_error"], float) and isinstance(c["allowed"], float)
            assert c["max_error"] <= c["allowed"] or c["ratio"] <= 1
    assert modes == {"train", "eval"} and formats == {"contiguous", "channels_last"}
    # running statistics are checked (BatchNorm2d tracks them by default)
    assert any(c["quantity"] == "running_var" for r in results for c in r["checks"])


def test_json_records_failures(capsys, tmp_path, extra_backends):
    path = tmp_path / "results.json"
    code, _, _ = _run_cli(capsys, "verify", "--backend", "broken", "--module", "LayerNorm",
                          "--dtype", "float64", "--json", str(path), "-q")
    assert code == 1
    doc = json.loads(path.read_text())
    assert doc["summary"]["ok"] is False
    assert doc["summary"]["failed_cases"] == len(doc["results"])
    for r in doc["results"]:
        failed = [c["quantity"] for c in r["checks"] if not c["ok"]]
        assert failed == ["output"]


def test_list_and_usage_errors(capsys):
    code, out, _ = _run_cli(capsys, "verify", "--list", "--backend", "reference", "--module",
                            "InstanceNorm3d", "--dtype", "float32")
    n = len(verify.build_matrix(backends=["reference"], dtypes=["float32"], modules=["InstanceNorm3d"]))
    assert code == 0 and out.strip().splitlines()[-1] == f"{n} cases"
    assert _run_cli(capsys, "verify", "--backend", "no-such-backend")[0] == 2
    assert _run_cli(capsys, "verify", "--module", "NoSuchNorm")[0] == 2
    with pytest.raises(SystemExit):
        cli.main(["verify", "--dtype", "int8"])
    if not torch.cuda.is_available():
        assert _run_cli(capsys, "verify", "--device", "cuda")[0] == 2
    assert cli.main([]) == 2


def test_progress_bar_on_a_terminal(capsys, monkeypatch):
    # rich treats FORCE_COLOR as "this is a terminal": the progress bar path runs (on stderr)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    code, out, err = _run_cli(capsys, "verify", "--backend", "reference", "--module", "RMSNorm",
                              "--dtype", "float32")
    assert code == 0
    assert "all passed" in out
    assert "failed" in err  # the bar's "N failed" column, drawn on stderr


# --------------------------------------------------------------------------------------------------
# normkit env
# --------------------------------------------------------------------------------------------------


def test_env_names_versions_and_backends(capsys, monkeypatch):
    monkeypatch.setenv("NORMKIT_BACKEND", "torch")
    code, out, _ = _run_cli(capsys, "env")
    assert code == 0
    assert normkit.__version__ in out and torch.__version__ in out
    assert "python" in out and "cpu" in out
    for name in backends.registered_backends():
        assert name in out
    lines = {line.split("  ", 1)[0].strip(): line.split("  ", 1)[1].strip()
             for line in out.splitlines() if "  " in line}
    assert lines["available backends"] == ", ".join(normkit.available_backends())
    assert lines["current backend"] == "torch"
    assert lines["NORMKIT_BACKEND"] == "torch"
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        assert lines["triton"].startswith("not installed")
    else:
        assert lines["triton"].startswith(triton_version)


# --------------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------------


def _matrix(full: bool) -> list[verify.Case]:
    return verify.build_matrix(full=full, backends=["reference"], devices=["cpu"])


@pytest.mark.skipif(not TORCH_HAS_BIAS_KWARG, reason="the documented sizes include bias=False variants")
def test_matrix_sizes_as_documented():
    # verify's module docstring: per backend and device, 440 cases by default and 9056 with full
    assert len(_matrix(False)) == 440
    assert len(_matrix(True)) == 9056
    assert "440 cases by default, 9056 with ``full=True``" in verify.__doc__


def test_matrix_coverage():
    default, full = _matrix(False), _matrix(True)
    assert len(full) > 10 * len(default)
    for cases in (default, full):
        assert len({c.id for c in cases}) == len(cases)  # no duplicates
        assert {c.module for c in cases} == set(verify.MODULES)
        assert {c.dtype for c in cases} == set(verify.DTYPES.values())
        assert {c.memory_format for c in cases} == {"contiguous", "channels_last", "channels_last_3d"}
        assert {c.train for c in cases} == {True, False}
        assert {c.distribution for c in cases} == {"normal", "offset"}
        # low precision runs with float32 parameters (mixed precision), and also with its own
        assert any(c.dtype == torch.bfloat16 and c.params_dtype == torch.float32 for c in cases)
        assert any(c.dtype == torch.bfloat16 and c.params_dtype == torch.bfloat16 for c in cases)
        # InstanceNorm both with its defaults and with affine + running statistics
        inorm = {c.kwargs for c in cases if c.module.startswith("InstanceNorm")}
        assert () in inorm and (("affine", True), ("track_running_stats", True)) in inorm
        # odd and prime sizes
        assert any(any(s in (7, 13, 17, 4099) for s in c.shape) for c in cases)
        # channels_last only for 4-D input
        assert all(len(c.shape) == 4 for c in cases if c.memory_format == "channels_last")
    # default: eval only where running statistics make it differ from train; full: everywhere
    assert all(c.module.startswith(("BatchNorm", "SyncBatchNorm", "InstanceNorm")) for c in default if not c.train)
    assert any(c.module == "LayerNorm" and not c.train for c in full)
    assert {c.key for c in default} <= {c.key for c in full}  # full is a superset
    # backends and devices multiply the matrix
    both = verify.build_matrix(backends=["reference", "torch"], devices=["cpu"])
    assert len(both) == 2 * len(default)
    assert {c.seed for c in both if c.backend == "torch"} == {c.seed for c in default}


def test_run_reports_every_quantity_and_restores_threads():
    threads = torch.get_num_threads()
    cases = verify.build_matrix(backends=["reference"], devices=["cpu"], modules=["InstanceNorm2d"],
                                dtypes=["bfloat16"])
    seen = []
    results = verify.run(cases, progress=seen.append)
    assert torch.get_num_threads() == threads
    assert seen == results and len(results) == len(cases)
    assert all(r.ok for r in results), [str(c) for r in results for c in r.failed_checks]
    tracked = [r for r in results if dict(r.case.kwargs).get("track_running_stats")]
    assert tracked
    for r in tracked:
        assert {c.quantity for c in r.checks} == {
            "output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var",
            "num_batches_tracked",
        }
    groups = verify.summarize(results)
    assert sum(g.cases for g in groups) == len(results)
    assert all(g.ok and 0 <= g.worst_ratio <= 1 for g in groups)


# --------------------------------------------------------------------------------------------------
# The installed console script and python -m normkit
# --------------------------------------------------------------------------------------------------


def _script() -> str:
    exe = Path(sys.executable).parent / ("normkit.exe" if os.name == "nt" else "normkit")
    found = str(exe) if exe.exists() else shutil.which("normkit")
    if found is None:
        pytest.skip("the normkit console script is not installed")
    return found


def test_console_script():
    proc = subprocess.run(
        [_script(), "verify", "--backend", "reference", "--dtype", "float32", "--module", "LayerNorm", "-q"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": all passed" in proc.stdout


def test_python_dash_m():
    proc = subprocess.run(
        [sys.executable, "-m", "normkit", "verify", "--list", "--module", "GroupNorm", "--backend", "torch"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].endswith(" cases")


def test_env_says_what_auto_runs(capsys, monkeypatch):
    monkeypatch.delenv("NORMKIT_BACKEND", raising=False)
    code, out, _ = _run_cli(capsys, "env")
    lines = {line.split("  ", 1)[0].strip(): line.split("  ", 1)[1].strip()
             for line in out.splitlines() if "  " in line}
    assert code == 0 and lines["current backend"] == f"auto (cpu tensors: {backends.default_backend('cpu').name})"


def test_explain_command_prints_and_draws(tmp_path, capsys):
    out = tmp_path / "gn.png"
    assert cli.main(["explain", "group_norm", "--out", str(out)]) == 0
    assert "Group Normalization" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["explain", "no_such_norm"]) == 2


def test_env_lists_optional_packages(capsys):
    assert cli.main(["env"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("optional packages"))
    assert "ray " in line and "transformers " in line and "timm " in line and "accelerate " in line


def test_verify_matrix_on_cuda_gives_layer_and_group_norm_their_input_dtype():
    """torch's CUDA LayerNorm and GroupNorm take no float32 parameters with 16-bit input (tested against
    torch in tests/test_triton_backend.py on a GPU), so the CUDA matrix gives their stateful 16-bit
    cases 16-bit parameters; the CPU matrix keeps mixed precision, and the other norms keep it on CUDA."""
    from normkit import verify

    def param_dtypes(device, modules):
        cases = verify.build_matrix(devices=[device], backends=["reference"], dtypes=["bfloat16"], modules=modules)
        return {c.params_dtype for c in cases if verify._has_state(c.module, dict(c.kwargs))}

    assert param_dtypes("cuda", ["LayerNorm", "GroupNorm"]) == {torch.bfloat16}
    assert param_dtypes("cpu", ["LayerNorm", "GroupNorm"]) == {torch.float32, torch.bfloat16}
    assert torch.float32 in param_dtypes("cuda", ["BatchNorm2d", "RMSNorm"])
