"""What each Ray Train worker runs: data-parallel SGD/Adam on its shard, validation, a checkpoint per epoch.

:func:`train_loop_per_worker` is the function :class:`ray.train.torch.TorchTrainer` starts in every worker
process. Ray Train has already joined the workers into a ``torch.distributed`` process group (gloo on
CPU, NCCL on GPU); ``prepare_model`` wraps the model in DistributedDataParallel, which averages the
gradients; on a single machine, :func:`rendezvous_on_loopback` first rebuilds that group so that none of
its sockets listens beyond 127.0.0.1. Each epoch:

1. every rank trains on its own shard (:func:`normkit.train.data.shard_indices`), the same number of
   steps of exactly ``batch_size`` images; the learning rate follows the schedule step by step;
2. the ranks take rank 0's buffers (each rank's BatchNorm running statistics follow its own batches)
   and each evaluates a slice of the validation set in eval mode; the sums are all-reduced, so every rank
   knows the loss and error of the model that rank 0 saves;
3. rank 0 writes a checkpoint (model, optimizer, epoch, history) and every rank calls
   ``ray.train.report`` (a barrier); after it returns, rank 0 sends the epoch's record to the driver.

On a restart after a failure, ``ray.train.get_checkpoint()`` holds the last reported checkpoint; the loop
loads it and continues at the next epoch. Everything random is a function of the seed and the epoch
(initial weights, shuffles) and the learning rate of the step number, so a resumed run computes what an
uninterrupted one would have.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .data import DigitsSplit, load_digits_split, shard_bounds, shard_indices
from .model import build_model
from .settings import TrainSettings

__all__ = [
    "InjectedFailure",
    "evaluate",
    "failure_marker",
    "learning_rate_at",
    "make_optimizer",
    "prepare",
    "rendezvous_on_loopback",
    "train_epoch",
    "train_loop_per_worker",
]

#: settings that change what training computes: a checkpoint is resumed only if they all match
_RESUME_KEYS = (
    "norm",
    "workers",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "schedule",
    "seed",
    "split_seed",
    "val_fraction",
)


#: collectives wait this long for a slow rank (Ray Train's own default for the group it creates)
_PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


class InjectedFailure(RuntimeError):
    """The failure that ``fail_at_epoch`` injects (a test hook for Ray Train's restarts)."""


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    lr = settings.learning_rate
    if settings.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def learning_rate_at(settings: TrainSettings, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``: cosine to 0, or constant."""
    peak = settings.learning_rate
    if settings.schedule == "constant":
        return peak
    return 0.5 * peak * (1.0 + math.cos(math.pi * step / total_steps))


def failure_marker(run_dir: str | os.PathLike[str], epoch: int) -> Path:
    """The file whose existence means the failure injected at ``epoch`` has happened."""
    return Path(run_dir) / f".normkit-injected-failure-epoch-{epoch}"


def _inject_failure_once(run_dir: str, epoch: int, rank: int, at_step: int, step: int) -> None:
    """Raise :class:`InjectedFailure` at step ``at_step`` of ``epoch``, unless an earlier attempt did."""
    if step != at_step:
        return
    marker = failure_marker(run_dir, epoch)
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: exactly one attempt creates the marker, and that one fails.
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return
    raise InjectedFailure(f"injected failure in epoch {epoch + 1} (fail_at_epoch={epoch}), rank {rank}, step {step}")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: Tensor) -> Tensor:
    if _world()[1] > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _loopback_interface() -> str | None:
    """The loopback network interface's name (``lo`` on Linux, ``lo0`` on macOS), if there is one."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n == "lo" or (n.startswith("lo") and n[2:].isdigit())), None)


def rendezvous_on_loopback(device: torch.device, node_ip: str | None = None) -> bool:
    """On one machine, re-create the default process group with every socket on 127.0.0.1.

    Ray Train starts the process group through torch's TCP rendezvous, whose store server (opened by
    rank 0 for the group's lifetime) listens on every network interface whatever address it is given:
    torch has no option for the address, only for a socket bound beforehand (``master_listen_fd``).
    When this worker's node address is a loopback one, every worker is on this machine, so the group is
    rebuilt over such a socket on 127.0.0.1, and gloo's sockets are pinned to the loopback interface
    (gloo otherwise binds the address the host name resolves to). The old group's store closes with it.
    Every rank decides alike (they share the node address) and must call this together.

    ``node_ip``: this node's address (default: Ray's). Returns True if the group was rebuilt.
    """
    from .cluster import is_loopback

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    if node_ip is None:
        import ray

        node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip):
        return False
    rank, world, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    listener = None
    port = torch.zeros(1, dtype=torch.int64, device=device)
    if rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port[0] = listener.getsockname()[1]
    dist.broadcast(port, src=0)
    dist.destroy_process_group()
    interface = _loopback_interface()
    if interface is not None and backend == "gloo":
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    store = dist.TCPStore(
        "127.0.0.1",
        int(port.item()),
        world,
        rank == 0,
        timeout=_PROCESS_GROUP_TIMEOUT,
        master_listen_fd=listener.detach() if listener is not None else None,  # the store owns it now
    )
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=_PROCESS_GROUP_TIMEOUT)
    return True


def prepare(model: nn.Module) -> nn.Module:
    """Ray Train's ``prepare_model`` (to the worker's device; DDP when there are several workers).

    DDP's ``broadcast_buffers`` is off: by default it copies rank 0's buffers to every rank before each
    forward, one more collective per step. It changes nothing that is used: in training BatchNorm
    normalizes with batch statistics, rank 0's running statistics only ever see rank 0's batches
    either way, and :func:`evaluate` and the checkpoint use rank 0's buffers.
    """
    import ray.train.torch

    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DigitsSplit,
    settings: TrainSettings,
    epoch: int,
    device: torch.device,
    before_step: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """One epoch on this rank's shard; returns the mean training loss over every rank and the global samples.

    ``before_step(step)`` runs before each step (the failure hook).
    """
    rank, world = _world()
    steps = settings.steps_per_epoch
    batch = settings.batch_size
    total_steps = settings.epochs * steps
    indices = shard_indices(len(data.train_y), world, rank, epoch=epoch, seed=settings.seed)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        rows = indices[step * batch : (step + 1) * batch]
        x, y = data.train_x[rows].to(device), data.train_y[rows].to(device)
        lr = learning_rate_at(settings, epoch * steps + step, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * len(rows)
    totals = _all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(steps * batch), device=device).double()]))
    return (totals[0] / totals[1]).item(), int(totals[1].item())


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> tuple[float, float]:
    """Validation ``(mean loss, error rate)`` of rank 0's model, each rank evaluating a slice of ``x``."""
    module = _unwrap(model)
    rank, world = _world()
    if world > 1:
        # After the last step every rank holds its own running statistics; use rank 0's, the saved ones.
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
    start, stop = shard_bounds(len(y), world, rank)
    xs, ys = x[start:stop].to(device), y[start:stop].to(device)
    module.eval()
    try:
        logits = module(xs) if len(ys) else torch.empty(0, 10, device=device)
        loss = F.cross_entropy(logits, ys, reduction="sum") if len(ys) else torch.zeros((), device=device)
        wrong = (logits.argmax(dim=1) != ys).sum()
    finally:
        module.train()
    totals = _all_reduce_sum(torch.stack([loss.double(), wrong.double(), torch.tensor(float(len(ys)), device=device)]))
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


def _check_resumable(saved: dict[str, Any], settings: TrainSettings) -> None:
    current = settings.to_dict()
    changed = [k for k in _RESUME_KEYS if k in saved and saved[k] != current[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise ValueError(
            f"the run's checkpoint was made with other settings ({diffs}); resume it with the same settings, "
            "or start a new run under another name"
        )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point.

    ``config``: ``settings`` (:class:`TrainSettings`); ``data``, the :class:`DigitsSplit` (the driver
    loads it once and Ray ships it, 0.5 MB, so workers need no scikit-learn; loaded here if absent);
    ``run_dir``, the run's local directory for the failure marker (or None); ``events``, a
    ``ray.util.queue.Queue`` for live progress (or None).
    """
    import ray.train
    import ray.train.torch

    settings: TrainSettings = config["settings"]
    events = config.get("events")
    run_dir: str | None = config.get("run_dir")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if world != settings.workers:
        raise RuntimeError(f"Ray Train started {world} workers, the settings ask for {settings.workers}")
    device = ray.train.torch.get_device()
    rebuilt = rendezvous_on_loopback(device)
    data: DigitsSplit = config.get("data") or load_digits_split(settings.split_seed, settings.val_fraction)

    model = build_model(settings.norm, seed=settings.seed)
    state: TrainState | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)
        _check_resumable(state.settings, settings)
        model.load_state_dict(state.model)
    model = prepare(model)
    optimizer = make_optimizer(model, settings)
    if state is not None:
        optimizer.load_state_dict(state.optimizer)  # after the move, so its tensors follow the parameters
    start_epoch = state.epoch + 1 if state is not None else 0
    history: list[dict[str, Any]] = list(state.history) if state is not None else []
    resumed_from_epoch = state.epoch if state is not None else None
    resumed_from_checkpoint = checkpoint.path if checkpoint is not None else None
    if rank == 0 and events is not None:
        events.put(
            {
                "event": "start",
                "resumed_from_epoch": resumed_from_epoch,
                "resumed_from_checkpoint": resumed_from_checkpoint,
                "start_epoch": start_epoch,
                "rendezvous_on_loopback": rebuilt,
            }
        )

    for epoch in range(start_epoch, settings.epochs):
        started = time.perf_counter()
        hook = None
        if settings.fail_at_epoch == epoch and rank == world - 1 and run_dir is not None:
            hook = functools.partial(_inject_failure_once, run_dir, epoch, rank, settings.steps_per_epoch // 2)
        train_loss, samples = train_epoch(model, optimizer, data, settings, epoch, device, before_step=hook)
        val_loss, val_error = evaluate(model, data.val_x, data.val_y, device)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_error": val_error,
            "val_accuracy": 1.0 - val_error,
            "lr": optimizer.param_groups[0]["lr"],
            "samples": samples,
            "epoch_time_s": time.perf_counter() - started,
            "resumed_from_epoch": resumed_from_epoch,
            "resumed_from_checkpoint": resumed_from_checkpoint,
        }
        history.append(record)
        with tempfile.TemporaryDirectory(prefix="normkit-checkpoint-") as directory:
            reported = None
            if rank == 0:
                save_checkpoint(
                    directory,
                    TrainState(
                        model=_unwrap(model).state_dict(),
                        optimizer=optimizer.state_dict(),
                        epoch=epoch,
                        settings=settings.to_dict(),
                        history=history,
                    ),
                )
                reported = ray.train.Checkpoint.from_directory(directory)
            # A barrier: returns once the checkpoint is in storage, so the record sent below is never
            # one that a restart would compute again.
            ray.train.report(record, checkpoint=reported)
        if rank == 0 and events is not None:
            events.put({"event": "epoch", **record})
