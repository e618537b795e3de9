"""What every benchmark measures the same way: the memory of one training step, and the JSON report.

Memory:

On CUDA: the peak allocated during the step above what was allocated before it. On the CPU (no allocator
statistics): the bytes autograd saves for backward during the step, unique storages, the model's parameters excluded.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


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


def write_report(out: Path, device: torch.device, dtype: torch.dtype, rows: list[dict], **settings) -> None:
    """Write the rows with the machine, dtype, threads and settings as JSON (temporary name, then rename)."""
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
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
