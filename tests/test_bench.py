"""``normkit bench``'s machinery on tiny cells: outputs, checks, saved bytes, the CLI. No timing is asserted."""

from __future__ import annotations

import csv
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import normkit
from normkit import cli
from normkit.bench import (
    OPS,
    Cell,
    Provider,
    Settings,
    builtin_providers,
    make_inputs,
    moved_bytes,
    register_peer,
    run,
    saved_bytes,
    standard_matrix,
    unregister_peer,
    write_outputs,
)
from normkit.bench.peers import select_providers
from normkit.bench.report import CSV_COLUMNS, write_chart
from normkit.bench.timing import Timed, alternate

# fast settings: two repetitions, one warm-up rotation, the reference backend (always registered), one
# thread (tiny ops gain nothing from two, and a thread waiting for a busy core costs milliseconds)
TINY = dict(reps=2, warmup=1, backend="reference", threads=1)
TINY_CELLS = [
    Cell("layer_norm", (8, 32)),
    Cell("rms_norm", (8, 32), "bfloat16"),
    Cell("group_norm", (2, 32, 3, 3), "float32", "channels_last"),
    Cell("batch_norm_train", (4, 8, 3, 3)),
    Cell("fused_add_rms_norm", (8, 32)),
]


def _providers(*names: str) -> list[Provider]:
    by_name = {p.name: p for p in builtin_providers()}
    return [by_name[n] for n in names]


def _tiny_provider(name: str, fn_for_spec) -> Provider:
    """A provider with its own calls; records how often each is called."""
    calls = {"n": 0}

    def build(spec):
        fn = fn_for_spec(spec)
        if fn is None:
            return None

        def call(*args):
            calls["n"] += 1
            out = fn(*args)
            return out if isinstance(out, tuple) else (out,)

        return call

    p = Provider(name, "test provider", build)
    p.calls = calls  # type: ignore[attr-defined]
    return p


# --------------------------------------------------------------------------------------------------
# A tiny run and its files
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run():
    cells = TINY_CELLS
    settings = Settings(providers=["normkit"], **TINY)
    result = run(cells, settings, providers=_providers("torch", "normkit"))
    return cells, settings, result


def test_tiny_run_times_every_cell_pass_and_provider(tiny_run):
    cells, settings, result = tiny_run
    assert result.providers == ["torch", "normkit"]
    assert result.backends == ["reference"]
    assert result.threads == 1
    has_fused = hasattr(normkit.functional, "fused_add_rms_norm")
    timed_cells = [c for c in cells if has_fused or c.op != "fused_add_rms_norm"]
    assert [s.cell.op for s in result.skipped] == ([] if has_fused else ["fused_add_rms_norm"])
    if not has_fused:
        assert "no fused_add_rms_norm" in result.skipped[0].reason
    keys = {(r.cell.id, r.pass_, r.provider) for r in result.rows}
    assert keys == {(c.id, p, prov) for c in timed_cells for p in ("fwd", "fwdbwd") for prov in ("torch", "normkit")}
    for r in result.rows:
        assert r.ok, (r.cell.id, r.pass_, r.provider, r.note)
        assert r.reps == 2 and r.median_s > 0 and r.floor_s > 0 and r.torch_s > 0
        assert r.bytes == moved_bytes(r.cell, r.pass_, make_inputs(r.cell))
        assert r.speedup == pytest.approx(r.torch_s / r.median_s)
        assert r.floor_frac == pytest.approx(r.floor_s / r.median_s)
        assert r.gbps == pytest.approx(r.bytes / r.median_s / 1e9)
        if r.provider == "torch":
            assert r.speedup == pytest.approx(1.0)
        if r.provider == "normkit":
            assert r.backend == "reference" and r.check is not None and r.check <= 1
        # saved bytes are measured in forward+backward only, for every provider, next to torch's
        assert (r.saved is not None) == (r.pass_ == "fwdbwd")
        assert (r.torch_saved is not None) == (r.pass_ == "fwdbwd")


def test_outputs_written_with_expected_columns(tiny_run, tmp_path):
    cells, settings, result = tiny_run
    machine = normkit.bench.machine_info()
    written, why = write_outputs(tmp_path / "out", result, settings, machine, {"quick": False})
    names = sorted(p.name for p in written)
    assert why is None and names == ["bench.csv", "bench.json", "bench.png"]

    with open(tmp_path / "out" / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == len(result.rows) + len(result.skipped) * 2
    timed = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in timed} == {"torch", "normkit"}
    for r in timed:
        assert float(r["median_ms"]) > 0 and float(r["floor_ms"]) > 0 and int(r["bytes"]) > 0
        assert float(r["speedup_vs_torch"]) > 0 and float(r["gbps"]) > 0
        assert (r["saved_bytes"] != "") == (r["pass"] == "fwdbwd")
    assert all(r["status"] == "skipped" and r["note"] for r in rows if r["status"] != "ok")

    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    for key in ("cpu", "cores", "torch_threads", "python", "torch", "normkit", "backend", "date"):
        assert doc["machine"][key] not in (None, ""), key
    assert doc["machine"]["backend"] == "reference"
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["normkit"] == normkit.__version__
    assert doc["settings"]["reps"] == 2 and doc["settings"]["quick"] is False
    assert doc["providers"] == ["torch", "normkit"]
    assert set(doc["results"][0]) == set(CSV_COLUMNS)
    assert len(doc["results"]) == len(result.rows)
    for key in ("bytes", "floor_frac", "speedup_vs_torch", "saved_bytes", "check"):
        assert key in doc["definitions"]

    png = (tmp_path / "out" / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_skipped_without_matplotlib(tiny_run, tmp_path, monkeypatch):
    _, settings, result = tiny_run
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    why = write_chart(tmp_path / "bench.png", result, {})
    assert why is not None and "matplotlib is not installed" in why
    assert not (tmp_path / "bench.png").exists()
    written, why = write_outputs(tmp_path, result, settings, {})
    assert [p.name for p in written] == ["bench.csv", "bench.json"] and "matplotlib" in why


# --------------------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------------------


def test_saved_bytes_of_torch_layer_norm():
    # torch's LayerNorm saves its input and the per-row mean and rstd (float32 here)
    x = torch.randn(16, 64, requires_grad=True)
    s = saved_bytes(lambda t: F.layer_norm(t, (64,)), [x])
    assert s.total == 16 * 64 * 4 + 2 * 16 * 4
    assert s.new == 2 * 16 * 4  # x is the caller's
    assert s.storages == 3
    # with an affine weight and bias the parameters are saved too (already alive: not "new")
    w, b = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)
    s = saved_bytes(lambda t, w, b: F.layer_norm(t, (64,), w, b), [x, w, b])
    assert s.total == 16 * 64 * 4 + 2 * 16 * 4 + 2 * 64 * 4 and s.new == 2 * 16 * 4


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(10, 10, requires_grad=True)
    s = saved_bytes(lambda t: t * t, [x])  # saves x twice
    assert (s.tensors, s.storages, s.total, s.new) == (2, 1, 400, 0)
    s = saved_bytes(lambda t: (t + 1).exp(), [x])  # saves its own result: a new storage
    assert (s.storages, s.total, s.new) == (1, 400, 400)
    assert saved_bytes(lambda t: t.detach() + 1, [x]).total == 0


def test_moved_bytes_formula():
    ln = Cell("layer_norm", (8, 32))
    inp = make_inputs(ln)
    act, par = 8 * 32 * 4, 32 * 4
    assert moved_bytes(ln, "fwd", inp) == act + 2 * par + act  # read x, w, b; write y
    # + read x and dy, write dx, read w, write dw and db
    assert moved_bytes(ln, "fwdbwd", inp) == (2 * act + 2 * par) + (3 * act + 3 * par)
    fused = Cell("fused_add_rms_norm", (8, 32), "bfloat16")
    inp = make_inputs(fused)
    act, par = 8 * 32 * 2, 32 * 2
    assert moved_bytes(fused, "fwd", inp) == 2 * act + par + 2 * act  # read x, r, w; write y, h
    # + read h, dy and dh, write one dx (the residual's gradient is the same), read w, write dw
    assert moved_bytes(fused, "fwdbwd", inp) == (4 * act + par) + (4 * act + 2 * par)
    bn = Cell("batch_norm_train", (4, 8, 3, 3))
    inp = make_inputs(bn)
    act, c = 4 * 8 * 9 * 4, 8 * 4
    assert moved_bytes(bn, "fwd", inp) == act + 4 * c + act + 2 * c  # running stats read and written


# --------------------------------------------------------------------------------------------------
# Checks: a wrong provider is reported, not timed
# --------------------------------------------------------------------------------------------------


def test_wrong_provider_is_reported_not_timed():
    off = _tiny_provider("off", lambda spec: lambda *a: tuple(t * 1.05 for t in spec.eager(*a)))
    raising = _tiny_provider("raising", lambda spec: (_ for _ in ()).throw(RuntimeError("no kernel")))
    no_grad = _tiny_provider(  # right forward, but x gets no gradient
        "nograd", lambda spec: (lambda x, w, b: spec.eager(x.detach(), w, b)) if spec.name == "layer_norm" else None
    )
    good = _tiny_provider("good", lambda spec: spec.formula_call)
    cells = [Cell("layer_norm", (8, 32)), Cell("rms_norm", (8, 32), "bfloat16")]
    providers = [*_providers("torch"), off, raising, no_grad, good]
    result = run(cells, Settings(reps=3, warmup=1, threads=1), providers=providers)
    by = {(r.cell.op, r.pass_, r.provider): r for r in result.rows}
    for op in ("layer_norm", "rms_norm"):
        for pass_ in ("fwd", "fwdbwd"):
            r = by[(op, pass_, "off")]
            assert r.status == "wrong" and r.check > 1 and "max |diff|" in r.note
            assert math.isnan(r.median_s) and r.reps == 0
            e = by[(op, pass_, "raising")]
            assert e.status == "error" and "no kernel" in e.note and e.reps == 0
            assert by[(op, pass_, "good")].ok and by[(op, pass_, "good")].reps == 3
            assert by[(op, pass_, "torch")].ok
    assert off.calls["n"] == 4  # one check call per cell and pass: never timed
    assert by[("layer_norm", "fwd", "nograd")].ok
    bad_grad = by[("layer_norm", "fwdbwd", "nograd")]
    assert bad_grad.status == "wrong" and "grad of x" in bad_grad.note
    assert ("rms_norm", "fwd", "nograd") not in by  # it does not implement rms_norm: not listed


def test_check_allows_torchs_own_low_precision_error():
    # torch eager's bfloat16 LayerNorm bias gradient sums 1024 rows inexactly; a float32-accumulating
    # implementation (the plain formula) is closer to the float64 truth and must pass
    formula = _tiny_provider("formula", lambda spec: spec.formula_call)
    result = run([Cell("layer_norm", (1024, 64), "bfloat16")], Settings(reps=1, warmup=0, passes=["fwdbwd"], threads=1),
                 providers=[*_providers("torch"), formula])
    assert all(r.ok for r in result.rows), [r.note for r in result.rows]


@pytest.mark.parametrize("op", list(OPS))
def test_plain_formula_matches_torch_eager(op):
    # what torch.compile is given computes the same as torch eager (checked here uncompiled, in float64)
    shape = (6, 40) if OPS[op].kind == "rows" else (3, 64, 4, 5)
    spec = OPS[op]
    inputs = {k: v.double() for k, v in make_inputs(Cell(op, shape)).items()}
    results = []
    for fn in (spec.eager, spec.formula_call):
        args = [inputs[a].clone().requires_grad_(a in spec.grad_args) for a in spec.args]
        outs = fn(*args)
        torch.autograd.backward(outs, [inputs[f"grad:{i}"] for i in range(spec.outputs)])
        stats = [t for name, t in zip(spec.args, args, strict=True) if name.startswith("running_")]
        results.append(list(outs) + [a.grad for a in args if a.requires_grad] + stats)
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# The matrix, the timer, the peers
# --------------------------------------------------------------------------------------------------


def test_standard_and_quick_matrix():
    full, quick = standard_matrix(), standard_matrix(quick=True)
    assert len(full) == 40 and len(quick) == 40
    assert {c.op for c in full} == set(OPS)
    assert {c.dtype for c in full} == {"float32", "bfloat16"}
    assert {c.shape for c in full} == {(8192, 4096), (64, 768), (32, 256, 32, 32)}
    assert all(c.layout == "contiguous" for c in full if OPS[c.op].kind == "rows")
    assert {c.layout for c in full if OPS[c.op].kind == "spatial"} == {"contiguous", "channels_last"}
    assert max(math.prod(c.shape) for c in quick) <= 1024 * 1024
    bn = standard_matrix(ops=["bn"], dtypes=["float32"], layouts=["channels_last"], shapes=[(2, 32, 3, 3), (4, 8)])
    assert [c.id for c in bn] == ["batch_norm_train 2x32x3x3 fp32 channels_last",
                                  "batch_norm_eval 2x32x3x3 fp32 channels_last"]
    with pytest.raises(ValueError, match="unknown op"):
        standard_matrix(ops=["softmax"])
    # inputs depend on the seed and the cell only
    a, b = make_inputs(Cell("layer_norm", (4, 8))), make_inputs(Cell("layer_norm", (4, 8)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x"], make_inputs(Cell("layer_norm", (4, 8)), seed=1)["x"])
    cl = make_inputs(Cell("group_norm", (2, 32, 3, 3), layout="channels_last"))
    assert cl["x"].is_contiguous(memory_format=torch.channels_last) and not cl["x"].is_contiguous()


def test_alternate_rotates_and_drops_failures():
    order: list[str] = []
    prepared: list[str] = []

    def make(name: str, fail_at: int | None = None) -> Timed:
        def go() -> None:
            order.append(name)
            if fail_at is not None and order.count(name) == fail_at:
                raise ValueError("boom")

        return Timed(go, lambda: prepared.append(name))

    t = alternate({"a": make("a"), "b": make("b"), "c": make("c", fail_at=3)}, reps=4, warmup=1)
    # warm-up a b c; then rotations starting at a, b, ... with c dropped on its third call
    assert order == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "a", "b", "b", "a"]
    assert prepared == order
    assert len(t.times["a"]) == len(t.times["b"]) == 4 and t.times["c"] == []
    assert isinstance(t.errors["c"], ValueError) and math.isnan(t.median("c"))
    t = alternate({"a": Timed(lambda: None)}, warmup=1, min_reps=3, max_reps=7, budget_s=0.0)
    assert t.reps == 3 and len(t.times["a"]) == 3


def test_peer_registry_keyed_on_import():
    register_peer("jsonpeer", "json", {"layer_norm": lambda m: lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)},
                  passes={"fwd"})
    register_peer("missingpeer", "no_such_module_for_normkit_bench", {"layer_norm": lambda m: None})
    try:
        chosen, notes = select_providers(None)
        names = [p.name for p in chosen]
        assert names[0] == "torch" and "jsonpeer" in names and "missingpeer" not in names
        assert any("missingpeer" in n and "not installed" in n for n in notes)
        with pytest.raises(ValueError, match="unknown provider"):
            select_providers(["nope"])
        chosen, _ = select_providers(["jsonpeer"])
        result = run([Cell("layer_norm", (4, 16)), Cell("rms_norm", (4, 16))], Settings(reps=1, warmup=0, threads=1),
                     providers=chosen)
        rows = {(r.cell.op, r.pass_, r.provider) for r in result.rows}
        assert ("layer_norm", "fwd", "jsonpeer") in rows
        assert ("layer_norm", "fwdbwd", "jsonpeer") not in rows  # forward-only peer
        assert ("rms_norm", "fwd", "jsonpeer") not in rows  # op it does not implement
        assert all(r.ok for r in result.rows)
    finally:
        unregister_peer("jsonpeer")
        unregister_peer("missingpeer")


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def test_cli_bench_tiny(capsys, tmp_path):
    out = tmp_path / "res"
    code = cli.main(["bench", "--quick", "--shape", "4x32", "--shape", "2x32x3x3", "--op", "ln", "--op", "gn",
                     "--dtype", "fp32", "--reps", "2", "--backend", "reference", "--threads", "1", "--out", str(out)])
    stdout, _ = capsys.readouterr()
    assert code == 0, stdout
    assert "layer_norm 4x32 fp32" in stdout and "group_norm 2x32x3x3 fp32 CL" in stdout
    assert "normkit (×)" in stdout and "compile (×)" not in stdout
    assert "normkit backend: reference" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["bench.csv", "bench.json", "bench.png"]
    doc = json.loads((out / "bench.json").read_text())
    assert doc["settings"]["quick"] is True and doc["settings"]["providers"] == ["normkit"]
    assert {r["provider"] for r in doc["results"]} == {"torch", "normkit"}
    assert {r["pass"] for r in doc["results"]} == {"fwd", "fwdbwd"}
    assert {r["cell"] for r in doc["results"]} == {"layer_norm 4x32 fp32", "group_norm 2x32x3x3 fp32",
                                                   "group_norm 2x32x3x3 fp32 channels_last"}


def test_cli_bench_progress_bar_on_a_terminal(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: "this is a terminal", so the progress bar is drawn
    monkeypatch.delenv("NO_COLOR", raising=False)
    code = cli.main(["bench", "--quick", "--shape", "4x32", "--op", "rms", "--dtype", "fp32", "--reps", "1",
                     "--threads", "1", "--no-chart", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0
    assert "1 cells (0 skipped), 4 timings" in out and "chart not requested" in out
    assert "0/2" in err  # the bar's "done/total" column (one cell, two passes), drawn on stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.csv", "bench.json"]


def test_cli_bench_arguments(capsys):
    parser = cli.build_parser()
    quick = cli._bench_settings(parser.parse_args(["bench", "--quick"]))
    assert quick.providers == ["normkit"] and quick.passes == ["fwd", "fwdbwd"] and quick.budget_s < 1
    full = cli._bench_settings(parser.parse_args(["bench", "--pass", "fwd", "--provider", "compile", "--threads", "1"]))
    assert full.providers == ["compile"] and full.passes == ["fwd"] and full.threads == 1 and full.reps is None
    args = parser.parse_args(["bench", "--dtype", "bf16", "--layout", "channels_last", "--out", "x", "--seed", "3"])
    assert args.dtype == ["bfloat16"] and args.layout == ["channels_last"] and args.out == "x" and args.seed == 3

    assert cli.main(["bench", "--quick", "--list"]) == 0
    out = capsys.readouterr()[0].strip().splitlines()
    assert out[-1].startswith("40 cells x 2 passes; providers: torch, normkit")
    assert "layer_norm 1024x1024 fp32" in out and "group_norm_silu 8x64x32x32 bf16 channels_last" in out

    assert cli.main(["bench", "--op", "softmax", "--list"]) == 2
    assert cli.main(["bench", "--provider", "nope", "--list"]) == 2
    assert cli.main(["bench", "--backend", "no-such-backend", "--list"]) == 2
    assert cli.main(["bench", "--op", "gn", "--shape", "2x30x3x3", "--list"]) == 2  # C % 32: no cells
    for bad in (["--shape", "3x4x5"], ["--pass", "bwd"], ["--dtype", "int8"], ["--reps", "0"]):
        with pytest.raises(SystemExit):
            cli.main(["bench", *bad])
    capsys.readouterr()
