"""Training checkpoints: one directory with ``state.pt`` (tensors) and ``history.json`` (metrics).

``state.pt`` holds the model's and the optimizer's state_dicts, the last finished epoch and the run's
settings, written with ``torch.save``. It is read back only with ``torch.load(..., weights_only=True)``:
torch's restricted unpickler accepts tensors and plain containers of numbers and strings, and refuses
anything that would run code, so a checkpoint from an untrusted storage location cannot execute code
in the process that loads it (a plain ``torch.load`` runs whatever the pickle names).

``history.json`` is the per-epoch record of the run so far, kept as JSON so that any tool can read it.
Both files are written by rank 0 into a temporary directory that Ray Train then copies to storage.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["FORMAT", "HISTORY_FILE", "STATE_FILE", "TrainState", "load_checkpoint", "save_checkpoint"]

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
#: stored in every checkpoint; bumped when the layout changes so old checkpoints fail clearly
FORMAT = "normkit.train/1"


@dataclass
class TrainState:
    """What a checkpoint holds: everything needed to continue training at ``epoch + 1``."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    epoch: int
    settings: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(directory: str | os.PathLike[str], state: TrainState) -> None:
    """Write ``state`` into ``directory`` (created if missing) as ``state.pt`` and ``history.json``."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "epoch": int(state.epoch),
        "model": state.model,
        "optimizer": state.optimizer,
        "settings": state.settings,
    }
    torch.save(payload, path / STATE_FILE)
    with open(path / HISTORY_FILE, "w", encoding="utf-8") as f:
        json.dump(state.history, f, indent=1)
        f.write("\n")


def load_checkpoint(directory: str | os.PathLike[str]) -> TrainState:
    """Read a checkpoint written by :func:`save_checkpoint`; tensors are loaded onto the CPU.

    Raises:
        CheckpointError: a file is missing or malformed, the format is unknown, or ``state.pt`` holds
            anything but tensors and plain data (torch's ``weights_only`` unpickler refused it).
    """
    path = Path(directory)
    state_file, history_file = path / STATE_FILE, path / HISTORY_FILE
    for f in (state_file, history_file):
        if not f.is_file():
            raise CheckpointError(f"not a normkit checkpoint: {f} is missing")
    try:
        payload = torch.load(state_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's restricted unpickler raises this both for a pickle that names code to run and for
        # bytes that are no pickle at all; its message tells which.
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:
            raise CheckpointError(f"cannot read {state_file}: not a checkpoint torch can load ({e})") from e
        raise CheckpointError(
            f"refused to load {state_file}: it names {found.group(1)}, code that unpickling would call; "
            "normkit checkpoints hold only tensors and plain data. Load checkpoints only from storage you trust."
        ) from e
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"cannot read {state_file}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{state_file} is not a {FORMAT} checkpoint (found {found!r})")
    try:
        with open(history_file, encoding="utf-8") as f:
            history = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {history_file}: {e}") from e
    if not isinstance(history, list):
        raise CheckpointError(f"{history_file} must hold a JSON list of epoch records")
    return TrainState(
        model=payload["model"],
        optimizer=payload["optimizer"],
        epoch=int(payload["epoch"]),
        settings=dict(payload.get("settings") or {}),
        history=history,
    )
