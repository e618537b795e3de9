"""How much memory one training step needs, the same way for every benchmark.

On CUDA: the peak allocated during the step above what was allocated before it. On the CPU (no allocator
statistics): the bytes autograd saves for backward during the step, unique storages, the model's parameters excluded.
"""

from __future__ import annotations

from collections.abc import Callable

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
