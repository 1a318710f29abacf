"""One rank of a gloo process group for tests/test_distributed.py, run as its own process.

``python tests/dist_worker.py SCENARIO RANK WORLD_SIZE STORE_FILE OUT_DIR`` runs every case of the
scenario with normkit's SyncBatchNorm on this rank's slice of a deterministic global batch and saves
what it saw (outputs, gradients, running statistics, errors) to ``OUT_DIR/rank{RANK}.pt``. The test
rebuilds the same global batches with :func:`global_inputs` and checks them against torch's BatchNorm.
Plain processes (not multiprocessing) so nothing depends on how pytest imported the test module.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One SyncBatchNorm configuration, run for ``steps`` training steps on every rank."""

    name: str
    sizes: tuple[int, ...]  # per-rank batch sizes (N_r)
    shape: tuple[int, ...]  # (C, *spatial)
    dtype: str = "fp32"
    channels_last: bool = False
    affine: bool = True
    bias: bool = True
    momentum: float | None = 0.1
    track_running_stats: bool = True
    steps: int = 2
    offset: float = 0.0  # added to the data: a large common mean tests the combination's robustness
    eval_after: bool = True  # one eval step at the end (no collective, uses the running statistics)
    ranks: tuple[int, ...] = field(default=())  # sync only among these ranks (others alone); () = world


# every rank's slice of the global batch, per case and step, comes from one seeded global tensor
def global_inputs(case: Case, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + sum(map(ord, case.name)))
    n = sum(case.sizes)
    x = torch.randn(n, *case.shape, generator=gen, dtype=torch.float64) * 2.0 + case.offset
    # give each channel its own mean and spread, as real activations have
    c = case.shape[0]
    scale = torch.linspace(0.5, 3.0, c, dtype=torch.float64).view(1, c, *([1] * (len(case.shape) - 1)))
    x = x * scale + scale
    dy = torch.randn(n, *case.shape, generator=gen, dtype=torch.float64)
    return x, dy


def parameters(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    c = case.shape[0]
    return torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)


def slice_of(t: torch.Tensor, case: Case, rank: int) -> torch.Tensor:
    start = sum(case.sizes[:rank])
    return t[start : start + case.sizes[rank]]


def _layout(t: torch.Tensor, case: Case) -> torch.Tensor:
    if not case.channels_last:
        return t.contiguous()
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def make_module(case: Case, module_cls, process_group=None):
    kwargs = {} if case.bias else {"bias": False}
    m = module_cls(
        case.shape[0], momentum=case.momentum, affine=case.affine,
        track_running_stats=case.track_running_stats, **kwargs,
    )
    if process_group is not None:
        m.process_group = process_group
    if case.affine:
        w, b = parameters(case)
        with torch.no_grad():
            m.weight.copy_(w)
            if m.bias is not None:
                m.bias.copy_(b)
    return m


SCENARIOS: dict[str, list[Case]] = {
    "world3": [
        Case("uneven_fp32", sizes=(5, 2, 3), shape=(4, 6, 7)),
        Case("uneven_fp64_channels_last", sizes=(3, 4, 1), shape=(3, 5, 4), dtype="fp64", channels_last=True),
        Case("empty_rank", sizes=(4, 0, 3), shape=(5, 3, 3)),
        Case("empty_first_rank_1d", sizes=(0, 6, 2), shape=(7,)),
        Case("one_value_per_rank", sizes=(1, 1, 1), shape=(4,)),
        Case("conv3d", sizes=(2, 1, 2), shape=(3, 2, 3, 4), channels_last=True),
        Case("no_affine_cumulative", sizes=(2, 3, 4), shape=(6, 5), affine=False, momentum=None, steps=3),
        Case("no_bias", sizes=(2, 2, 2), shape=(3, 4), bias=False),
        Case("untracked", sizes=(3, 2, 2), shape=(4, 5), track_running_stats=False),
        Case("bf16", sizes=(4, 3, 2), shape=(8, 5, 5), dtype="bf16"),
        Case("fp16_channels_last", sizes=(2, 3, 3), shape=(8, 4, 4), dtype="fp16", channels_last=True),
        Case("large_mean_fp32", sizes=(6, 5, 3), shape=(4, 16), offset=3e4),
        Case("subgroup", sizes=(3, 4, 5), shape=(3, 4), ranks=(0, 1)),
        Case("global_batch_of_one", sizes=(1, 0, 0), shape=(3,), steps=1, eval_after=False),
    ],
}


def run_case(case: Case, rank: int, groups: dict) -> dict:
    import normkit

    dtype = DTYPES[case.dtype]
    group = None
    if case.ranks:
        group = groups[case.ranks] if rank in case.ranks else groups[(rank,)]
    m = make_module(case, normkit.nn.SyncBatchNorm, group)
    if dtype in (torch.float32, torch.float64):  # float32 parameters for float16/bfloat16 data
        m = m.to(dtype)
    record: dict = {"steps": []}
    for step in range(case.steps):
        x64, dy64 = global_inputs(case, step)
        x = _layout(slice_of(x64, case, rank).to(dtype), case).requires_grad_()
        dy = _layout(slice_of(dy64, case, rank).to(dtype), case)
        try:
            y = m(x)
        except ValueError as e:
            record["error"] = f"{type(e).__name__}: {e}"
            return record
        y.backward(dy)
        record["steps"].append({
            "y": y.detach(),
            "dx": x.grad,
            "y_channels_last": case.channels_last and y.is_contiguous(memory_format=_layout_format(y)),
            "dweight": None if m.weight is None else m.weight.grad.clone(),
            "dbias": None if m.bias is None else m.bias.grad.clone(),
        })
        m.zero_grad()
    record["running_mean"] = None if m.running_mean is None else m.running_mean.clone()
    record["running_var"] = None if m.running_var is None else m.running_var.clone()
    record["num_batches_tracked"] = None if m.num_batches_tracked is None else int(m.num_batches_tracked)
    if case.eval_after:
        m.eval()
        x64, _ = global_inputs(case, case.steps)
        with torch.no_grad():
            record["eval_y"] = m(_layout(slice_of(x64, case, rank).to(dtype), case))
    return record


# DDP: a small conv net converted with convert_sync_batchnorm, uneven batches, two SGD steps
DDP_SIZES = (3, 5)


def ddp_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3),
        torch.nn.BatchNorm2d(4, momentum=None),
    )


def ddp_inputs(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(50 + step)
    return torch.randn(sum(DDP_SIZES), 3, 6, 6, generator=gen)


def ddp_loss(out: torch.Tensor, step: int, start: int) -> torch.Tensor:
    """A fixed random projection of the output (a sum of squares of BatchNorm's output is nearly
    constant, so its gradients would be rounding noise)."""
    gen = torch.Generator().manual_seed(70 + step)
    target = torch.randn(sum(DDP_SIZES), *out.shape[1:], generator=gen)
    return (out * target[start : start + out.size(0)]).sum()


def run_ddp(rank: int) -> dict:
    import normkit

    model = normkit.nn.SyncBatchNorm.convert_sync_batchnorm(ddp_model())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    start = sum(DDP_SIZES[:rank])
    record = {"types": [type(mod).__name__ for mod in model], "grads": []}
    for step in range(2):
        x = ddp_inputs(step)[start : start + DDP_SIZES[rank]]
        opt.zero_grad()
        ddp_loss(ddp(x), step, start).backward()
        record["grads"].append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
    record["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    return record


def _layout_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 else torch.channels_last_3d if t.dim() == 5 else torch.contiguous_format


def main(scenario: str, rank: int, world_size: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    # every rank must create every group, in the same order
    groups = {}
    for case in SCENARIOS.get(scenario, []):
        if case.ranks and case.ranks not in groups:
            groups[case.ranks] = dist.new_group(list(case.ranks))
            for r in range(world_size):
                if r not in case.ranks and (r,) not in groups:
                    groups[(r,)] = dist.new_group([r])
    results = {}
    if scenario == "ddp":
        try:
            results["ddp"] = run_ddp(rank)
        except Exception:
            results["ddp"] = {"crash": traceback.format_exc()}
    for case in SCENARIOS.get(scenario, []):
        try:
            results[case.name] = run_case(case, rank, groups)
        except Exception:
            results[case.name] = {"crash": traceback.format_exc()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    scenario, rank, world, store, out = sys.argv[1:6]
    main(scenario, int(rank), int(world), store, out)
