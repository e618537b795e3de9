"""What every benchmark measures the same way: the memory of one training step, and the JSON report.

Memory:

On CUDA: the peak allocated during the step above what was allocated before it. On the CPU (no allocator
statistics): the bytes autograd saves for backward during the step, unique storages, the model's parameters excluded.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def step_memory_bytes(model: nn.Module, forward: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Memory of ``forward()`` (returning a scalar loss of ``model``) plus its backward, by the metric of ``device``.

    On the CPU only the forward is recorded: what backward recomputes (checkpointing) is transient, not kept.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        forward().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    return sum(storages.values())


class OperatorCount(TorchDispatchMode):
    """Counts the operators a region dispatches to the backend: after autograd, composite ops decomposed.

    This is what a GPU pays host time for, whatever the device: ``total`` every operator, ``compute`` those that are
    not views (each of them launches at least one kernel on a GPU), ``copies`` the memory copies (clone, copy_,
    contiguous, dtype casts) of at least ``copy_numel`` elements, e.g. an activation-sized re-layout.
    """

    VIEWS = {"_unsafe_view", "_reshape_alias", "detach", "alias", "lift_fresh"}
    COPIES = {"clone", "copy_", "_to_copy", "contiguous"}

    def __init__(self, copy_numel: int = 0):
        super().__init__()
        self.copy_numel = copy_numel
        self.total = self.compute = self.copies = 0
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.total += 1
        self.names[name] = self.names.get(name, 0) + 1
        if not (func.is_view or name in self.VIEWS):
            self.compute += 1
        if name in self.COPIES and isinstance(out, torch.Tensor) and out.numel() >= max(self.copy_numel, 1):
            self.copies += 1
        return out


def write_report(out: Path, device: torch.device, dtype: torch.dtype, rows: list[dict], **settings) -> None:
    """Write the rows with the machine, dtype, threads and settings as JSON (temporary name, then rename)."""
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "memory_metric": "cuda peak allocated above start" if device.type == "cuda" else "bytes saved for backward",
        **settings,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
