"""SyncBatchNorm: torch.nn.SyncBatchNorm's interface, and BatchNorm on the global batch over gloo.

The multi-process tests start real gloo process groups (2-3 plain processes running
``tests/dist_worker.py``, one start per scenario) and check every rank's results against torch's own
``torch.nn.BatchNorm*d`` run in one process on the concatenation of all ranks' batches, in float64
(the truth), under the per-dtype tolerances of :mod:`normkit.testing`; low-precision cases also pass
torch's BatchNorm in the same dtype as the baseline of the three-way bound.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import normkit
from normkit.distributed import combine_moments, local_moments
from normkit.nn._compat import TORCH_HAS_BIAS_KWARG
from normkit.testing import assert_close, tolerance

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker as W  # noqa: E402

WORKER = Path(__file__).parent / "dist_worker.py"
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="no gloo"
)


def run_world(scenario: str, world_size: int, out: Path) -> list[dict]:
    """Start ``world_size`` ranks of ``scenario`` on gloo, wait, and load what each saved."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    store = out / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(rank), str(world_size), str(store), str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(world_size)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{scenario}: a rank hung (deadlock in a collective?)") from None
    if any(p.returncode for p in procs):
        raise AssertionError(f"{scenario}: a rank failed:\n" + "\n".join(logs))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


@pytest.fixture(scope="module")
def world3(tmp_path_factory) -> list[dict]:
    return run_world("world3", 3, tmp_path_factory.mktemp("world3"))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> list[dict]:
    return run_world("ddp", 2, tmp_path_factory.mktemp("ddp"))


def _torch_bn_class(ndim: int):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[ndim]


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """The workers' parameters: the data's dtype, float32 for float16/bfloat16 data."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def torch_run(case: W.Case, ranks: tuple[int, ...], dtype: torch.dtype, truth: bool) -> dict:
    """torch's BatchNorm on the concatenation of ``ranks``' slices of ``dtype`` data: in float64 on those
    values (``truth``), or as the workers ran it, in ``dtype`` with their parameter dtype (the baseline)."""
    run_dtype = torch.float64 if truth else dtype
    m = W.make_module(case, _torch_bn_class(len(case.shape) + 1)).to(torch.float64 if truth else param_dtype(dtype))

    def global_batch(t: torch.Tensor) -> torch.Tensor:
        return W._layout(torch.cat([W.slice_of(t, case, r) for r in ranks]).to(dtype).to(run_dtype), case)

    steps = []
    for step in range(case.steps):
        x64, dy64 = W.global_inputs(case, step)
        x = global_batch(x64).requires_grad_()
        y = m(x)
        y.backward(global_batch(dy64))
        steps.append({
            "y": y.detach(), "dx": x.grad,
            "dweight": None if m.weight is None else m.weight.grad.clone(),
            "dbias": None if m.bias is None else m.bias.grad.clone(),
        })
        m.zero_grad()
    eval_y = None
    if case.eval_after:
        m.eval()
        with torch.no_grad():
            eval_y = m(global_batch(W.global_inputs(case, case.steps)[0]))
    return {"steps": steps, "m": m, "eval_y": eval_y}


def _split(t: torch.Tensor, case: W.Case, ranks: tuple[int, ...], rank: int) -> torch.Tensor:
    start = sum(case.sizes[r] for r in ranks[: ranks.index(rank)])
    return t[start : start + case.sizes[rank]]


def _eval_expected(case, ranks, rank, dtype, truth, base) -> tuple:
    """(truth, dtype, baseline) of this rank's eval output. Eval never synchronizes (as torch's): with
    running statistics it uses the global ones, without them this rank's own batch statistics."""
    if not case.track_running_stats:
        ranks = (rank,)
        truth = torch_run(case, ranks, dtype, truth=True)
        base = torch_run(case, ranks, dtype, truth=False) if base is not None else None
    baseline = None if base is None else _split(base["eval_y"], case, ranks, rank)
    return _split(truth["eval_y"], case, ranks, rank), dtype, baseline


def _groups(case: W.Case, world_size: int) -> list[tuple[int, ...]]:
    if not case.ranks:
        return [tuple(range(world_size))]
    return [case.ranks] + [(r,) for r in range(world_size) if r not in case.ranks]


CASES = [c for c in W.SCENARIOS["world3"] if c.name != "global_batch_of_one"]


@needs_gloo
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_equals_batchnorm_on_the_global_batch(world3, case):
    if not case.bias and not TORCH_HAS_BIAS_KWARG:
        pytest.skip("bias=False needs torch >= 2.13 for the torch-side model")
    dtype = W.DTYPES[case.dtype]
    results = [r[case.name] for r in world3]
    for r in results:
        assert "crash" not in r, r.get("crash")
        assert "error" not in r, r.get("error")
    for ranks in _groups(case, len(results)):
        truth = torch_run(case, ranks, dtype, truth=True)
        # the same-precision baseline: torch's BatchNorm on the same low-precision data, fp32 parameters
        base = torch_run(case, ranks, dtype, truth=False) if dtype in (torch.bfloat16, torch.float16) else None
        for step, t in enumerate(truth["steps"]):
            b = base["steps"][step] if base else None
            for rank in ranks:
                got = results[rank]["steps"][step]
                for key in ("y", "dx"):
                    assert got[key].dtype == dtype
                    assert_close(
                        got[key], _split(t[key], case, ranks, rank), dtype,
                        None if b is None else _split(b[key], case, ranks, rank),
                        msg=f"rank {rank} step {step} {key}",
                    )
                if case.channels_last and got["y"].numel():
                    assert got["y_channels_last"], "channels_last input gives channels_last output, as torch"
            # weight/bias gradients are per rank; their sum over the group is BatchNorm's on the global batch
            for key in ("dweight", "dbias"):
                if t[key] is None:
                    assert all(results[r]["steps"][step][key] is None for r in ranks)
                    continue
                total = sum(results[r]["steps"][step][key].double() for r in ranks)
                # sums over up to a few hundred elements of the data's precision, in float32
                assert_close(total, t[key], param_dtype(dtype), msg=f"step {step} {key}")
        m = truth["m"]
        for rank in ranks:
            got = results[rank]
            for key in ("running_mean", "running_var"):
                expected = getattr(m, key)
                if expected is None:
                    assert got[key] is None
                else:
                    assert got[key].dtype == param_dtype(dtype)
                    assert_close(got[key], expected, param_dtype(dtype), msg=f"rank {rank} {key}")
            tracked = None if m.num_batches_tracked is None else int(m.num_batches_tracked)
            assert got["num_batches_tracked"] == tracked
            if case.eval_after:
                assert_close(got["eval_y"], *_eval_expected(case, ranks, rank, dtype, truth, base), msg="eval")
        # every rank of a group holds the same running statistics, bit for bit
        if len(ranks) > 1 and case.track_running_stats:
            for key in ("running_mean", "running_var"):
                assert all(torch.equal(results[r][key], results[ranks[0]][key]) for r in ranks)


@needs_gloo
def test_global_batch_of_one_value_per_channel_raises_on_every_rank(world3):
    # BatchNorm on the concatenated batch (one sample) refuses to train; every rank must say so (no hang)
    expected = "ValueError: Expected more than 1 value per channel when training, got input size torch.Size([1, 3])"
    for r in world3:
        assert r["global_batch_of_one"].get("error") == expected


@needs_gloo
def test_ddp_on_cpu_gives_global_batchnorm_gradients(ddp):
    for r in ddp:
        assert "crash" not in r["ddp"], r["ddp"].get("crash")
    assert ddp[0]["ddp"]["types"][1] == "SyncBatchNorm"
    # one process, torch's BatchNorm, the whole batch, loss summed: DDP averages, so its grads are / world
    model = W.ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1 / len(ddp))
    for step in range(2):
        opt.zero_grad()
        W.ddp_loss(model(W.ddp_inputs(step)), step, 0).backward()
        # gradients sum over the batch: compare relative to the largest (the conv bias before a
        # BatchNorm has a zero gradient in exact arithmetic, so its own scale is rounding noise)
        scale = max(float(p.grad.abs().max()) for p in model.parameters())
        for name, p in model.named_parameters():
            for rank, r in enumerate(ddp):
                got = r["ddp"]["grads"][step][name]
                assert_close(got / scale, p.grad / len(ddp) / scale, msg=f"rank {rank} step {step} {name}")
        opt.step()
    for key, value in model.state_dict().items():
        for r in ddp:
            got = r["ddp"]["state"][key]
            if value.is_floating_point():
                assert_close(got, value, msg=key)
            else:
                assert torch.equal(got, value), key


# ------------------------------------------------------------------------------------------------
# One process: interface, conversion, fallbacks, and the combination formula
# ------------------------------------------------------------------------------------------------


def test_constructor_signature_and_defaults_match_torch():
    def params(cls) -> list[tuple]:
        sig = inspect.signature(cls.__init__).parameters.values()
        return [(p.name, p.kind, p.default) for p in sig if TORCH_HAS_BIAS_KWARG or p.name != "bias"]

    assert params(normkit.nn.SyncBatchNorm) == params(torch.nn.SyncBatchNorm)
    a, b = normkit.nn.SyncBatchNorm(5, momentum=None), torch.nn.SyncBatchNorm(5, momentum=None)
    assert repr(a) == repr(b)
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in b.state_dict().items():
        assert torch.equal(a.state_dict()[key], value) and a.state_dict()[key].dtype == value.dtype
    assert a._version == b._version
    assert a.process_group is None


def test_is_a_batchnorm_but_not_torchs_syncbatchnorm():
    m = normkit.nn.SyncBatchNorm(3)
    assert isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(m, torch.nn.SyncBatchNorm)  # DDP refuses those in CPU modules


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_state_dict_loads_both_ways_with_torchs(affine, track):
    ours = normkit.nn.SyncBatchNorm(4, affine=affine, track_running_stats=track)
    theirs = torch.nn.SyncBatchNorm(4, affine=affine, track_running_stats=track)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_()
    theirs.load_state_dict(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())


def test_errors_match_torch():
    for x, match in [(torch.randn(3), "expected at least 2D input"), (torch.randn(2, 0, 3), "channels")]:
        for cls in (normkit.nn.SyncBatchNorm, torch.nn.SyncBatchNorm):
            with pytest.raises(ValueError) as info:
                cls(3)(x)
            assert match in str(info.value)
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        normkit.nn.SyncBatchNorm(3)(torch.randn(3))


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.BatchNorm3d(2, affine=False), torch.nn.InstanceNorm2d(3, affine=True))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4, eps=1e-3, momentum=0.3),
        torch.nn.BatchNorm1d(5, track_running_stats=False),
        normkit.nn.BatchNorm2d(6, momentum=None),
        inner,
    )
    net[3].eval()
    net[1].qconfig = "q"
    return net


@pytest.mark.parametrize("kind", ["normkit", "torch"])
def test_convert_sync_batchnorm_matches_torchs(kind):
    cls = normkit.nn.SyncBatchNorm if kind == "normkit" else torch.nn.SyncBatchNorm
    before = _net()
    original = {k: v for k, v in before.state_dict().items()}
    params = {k: p for k, p in before.named_parameters()}
    buffers = {k: b for k, b in before.named_buffers()}
    after = cls.convert_sync_batchnorm(before)
    reference = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_net())
    assert [type(m).__name__ for m in after.modules()] == [type(m).__name__ for m in reference.modules()]
    assert isinstance(after[1], cls) and isinstance(after[4][0], cls)
    assert type(after[4][1]) is torch.nn.InstanceNorm2d
    assert after.state_dict().keys() == original.keys()
    for k, p in after.named_parameters():
        assert p is params[k]
    for k, b in after.named_buffers():
        assert b is buffers[k]
    for a, r in zip(after.modules(), reference.modules(), strict=True):
        assert repr(a) == repr(r) and a.training == r.training
    assert after[1].qconfig == "q" and after[1].momentum == 0.3 and after[1].eps == 1e-3
    assert after[3].momentum is None and not after[3].training


def test_convert_a_batchnorm_itself_returns_the_new_layer():
    bn = torch.nn.BatchNorm1d(3)
    out = normkit.nn.SyncBatchNorm.convert_sync_batchnorm(bn, process_group="pg")
    assert isinstance(out, normkit.nn.SyncBatchNorm) and out.weight is bn.weight and out.process_group == "pg"


@pytest.mark.parametrize("training", [True, False])
def test_outside_a_process_group_it_is_batchnorm(training):
    assert not torch.distributed.is_initialized()
    x = torch.randn(6, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    ours, theirs = normkit.nn.SyncBatchNorm(3).double(), torch.nn.BatchNorm2d(3).double()
    ours.train(training), theirs.train(training)
    for _ in range(2):
        ya, yb = ours(x), theirs(x)
        assert_close(ya, yb)
        (ga,) = torch.autograd.grad(ya.sum() + (ya * x).sum(), x)
        (gb,) = torch.autograd.grad(yb.sum() + (yb * x).sum(), x)
        assert_close(ga, gb)
    assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=5).filter(lambda s: sum(s) > 1),
    channels=st.integers(1, 4),
    offset=st.sampled_from([0.0, 1e3, -5e5]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_combined_moments_equal_the_whole_batchs(sizes, channels, offset, dtype):
    gen = torch.Generator().manual_seed(sum(sizes) * 31 + channels)
    x = (torch.randn(sum(sizes), channels, 3, generator=gen, dtype=torch.float64) + offset).to(dtype)
    gathered = torch.stack([local_moments(part) for part in torch.split(x, sizes)])
    n, mean, m2 = combine_moments(gathered)
    exact = x.double()
    var, mu = torch.var_mean(exact, dim=(0, 2), correction=0)
    assume(bool((var > 0).all()))  # bfloat16 far from zero can round every value to the same one
    assert n == exact.numel() // channels
    # float32 arithmetic on float32/bfloat16 data: the mean to float32 accuracy in units of the standard
    # deviation however far it is from zero (plus float64 rounding of the mean itself), and the
    # variance to float32 accuracy relative to itself
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bound = tolerance(acc).atol * var.sqrt() + 4 * torch.finfo(torch.float64).eps * mu.abs()
    assert bool(((mean - mu).abs() <= bound).all()), ((mean - mu).abs(), bound)
    assert_close(m2 / n / var, torch.ones_like(var), dtype=acc)


def test_combination_of_empty_ranks_only():
    n, mean, m2 = combine_moments(torch.zeros(3, 2 * 4 + 1, dtype=torch.float64))
    assert n == 0 and torch.equal(mean, torch.zeros(4)) and torch.equal(m2, torch.zeros(4))
