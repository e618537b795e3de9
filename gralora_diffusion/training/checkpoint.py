"""Training checkpoints that are never half-written, and that hold no pickle.

A checkpoint is a folder ``checkpoint-<step>`` with the adapter (``adapter.safetensors``, the package's file format),
the optimizer state (``optimizer.safetensors`` + ``optimizer.json``) and ``state.json`` (step, epoch, position in
the epoch, learning-rate schedule, loss scaler). It is assembled under a hidden temporary name and renamed into
place in one step, so killing the process at any moment leaves either a complete checkpoint or none; stray
temporary folders are ignored by ``latest_checkpoint`` and removed by ``prune_checkpoints``.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..fs import remove_stale_temporaries, write_directory_atomically

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_NAME = "state.json"
ADAPTER_NAME = "adapter.safetensors"


class CheckpointError(ValueError):
    """A checkpoint cannot be used for resuming."""


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of ``optimizer_to_files``: a state dict ``Optimizer.load_state_dict`` accepts."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in rest["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    write_adapter,
    optimizer: torch.optim.Optimizer,
    state: dict,
) -> Path:
    """Write ``checkpoint-<step>`` atomically. ``write_adapter(path)`` saves the adapter file at ``path``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        write_adapter(tmp / ADAPTER_NAME)
        tensors, rest = optimizer_to_files(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(rest))
        (tmp / STATE_NAME).write_text(json.dumps({"step": step, **state}, indent=2))

    return write_directory_atomically(output_dir / f"checkpoint-{step}", write, replace=True)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and (path / STATE_NAME).exists() and (path / ADAPTER_NAME).exists():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def check_checkpoint(path: str | Path) -> None:
    """Read every file of a checkpoint (state, optimiser, adapter, validated); raise ``CheckpointError`` naming it."""
    from ..io import read_adapter

    path = Path(path)
    try:
        state, _ = load_checkpoint(path)
        for key in ("step", "epoch", "batches_done_in_epoch", "lr_scheduler"):
            if key not in state:
                raise KeyError(f"{STATE_NAME} has no {key!r}")
        read_adapter(path / ADAPTER_NAME)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path} is damaged and cannot be resumed from ({reason}).") from None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest intact checkpoint: a damaged newer one (e.g. a disk error after it was written) is skipped with a
    warning, so a resume falls back to the one before it. None when there is none; an error when all are damaged."""
    found = list_checkpoints(output_dir)
    damaged = []
    for path in reversed(found):
        try:
            check_checkpoint(path)
        except CheckpointError as err:
            damaged.append(str(err))
            continue
        if damaged:
            warnings.warn(f"{damaged[0]} Resuming from {path.name}, the newest intact checkpoint.", stacklevel=2)
        return path
    if damaged:
        raise CheckpointError(f"No checkpoint in {output_dir} is intact: {damaged[0]}")
    return None


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """``--resume_from_checkpoint``: a path, a ``checkpoint-N`` name inside ``output_dir``, or ``latest``."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)  # none yet: start from scratch, as diffusers does
    path = Path(resume)
    if not path.exists():
        path = Path(output_dir) / resume
    if not (path / STATE_NAME).exists() or not (path / ADAPTER_NAME).exists():
        raise CheckpointError(
            f"--resume_from_checkpoint {resume} is not a complete checkpoint folder "
            f"(no {STATE_NAME} / {ADAPTER_NAME}); "
            "use 'latest' or a checkpoint-N folder of the output directory."
        )
    check_checkpoint(path)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(state.json contents, optimizer state dict) of a checkpoint; the adapter is read with ``read_adapter``."""
    path = Path(path)
    state = json.loads((path / STATE_NAME).read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    rest = json.loads((path / "optimizer.json").read_text())
    return state, optimizer_from_files(tensors, rest)


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``keep`` (and stray temporary folders); return what was deleted."""
    output_dir = Path(output_dir)
    removed = []
    remove_stale_temporaries(output_dir, r"checkpoint-\d+")  # left by a run killed inside a checkpoint write
    if keep is None or keep <= 0:
        return removed
    complete = list_checkpoints(output_dir)
    for path in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(path)
        removed.append(path)
    return removed
