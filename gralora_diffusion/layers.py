"""The one place where PEFT's GraLoRA layer is extended.

PEFT (``peft.tuners.gralora.layer``) owns the GraLoRA math: parameters, forward, ``get_delta_weight``, merge and
unmerge. What it lacks for image generation is a per-adapter *weight*: every adapted layer should compute
``base(x) + w_a * delta_a(x) + w_b * delta_b(x)`` with user-chosen weights, and fusing should bake those weights in.
PEFT's forward and ``get_delta_weight`` both multiply by ``layer.scaling[adapter]`` (= alpha / (r + hybrid_r)), so a
weight is expressed exactly as ``scaling = weight * alpha / (r + hybrid_r)``: forward, fuse and unfuse then all see
the same number, and nothing of PEFT's math is duplicated.

The LoRA layers of PEFT expose the same idea as ``set_scale`` / ``scale_layer`` / ``unscale_layer``, which diffusers
calls from ``set_adapters``, ``fuse_lora(lora_scale=...)`` and ``cross_attention_kwargs={"scale": ...}``.
``install_lora_compatible_scaling`` gives GraLoRA layers those three methods (only where PEFT does not define them
already), so those diffusers code paths work on GraLoRA layers too instead of raising ``AttributeError``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from peft.tuners.gralora.layer import GraloraLayer
from peft.tuners.gralora.layer import Linear as GraloraLinear
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "GraloraLayer",
    "MemoryLeanGraloraLinear",
    "adapter_weight",
    "base_scaling",
    "gralora_layers",
    "install_lora_compatible_scaling",
    "set_adapter_weight",
    "use_memory_lean_training",
]


def gralora_layers(model: nn.Module) -> Iterator[tuple[str, GraloraLayer]]:
    """Every GraLoRA layer of ``model`` with its dotted module name."""
    for name, module in model.named_modules():
        if isinstance(module, GraloraLayer):
            yield name, module


def base_scaling(layer: GraloraLayer, adapter: str) -> float:
    """PEFT's scale of ``adapter`` at weight 1: alpha / (r + hybrid_r)."""
    return layer.alpha[adapter] / (layer.r[adapter] + layer.hybrid_r[adapter])


def adapter_weight(layer: GraloraLayer, adapter: str) -> float:
    """The blending weight currently applied to ``adapter`` in ``layer``."""
    return layer.scaling[adapter] / base_scaling(layer, adapter)


@torch.no_grad()
def set_adapter_weight(layer: GraloraLayer, adapter: str, weight: float) -> None:
    """Make ``layer`` apply ``adapter`` at ``weight`` (any real number; negative subtracts the adapter).

    If the adapter is currently merged into the base weight, the merged delta is updated in place (old delta out,
    new delta in), so fused and unfused layers stay consistent and a later unmerge removes exactly what is there.
    """
    if adapter not in layer.gralora_A:
        return
    new_scaling = float(weight) * base_scaling(layer, adapter)
    if new_scaling == layer.scaling[adapter]:
        return
    if adapter in layer.merged_adapters:
        base = layer.get_base_layer()
        base.weight.data -= layer.get_delta_weight(adapter)
        layer.scaling[adapter] = new_scaling
        base.weight.data += layer.get_delta_weight(adapter)
    else:
        layer.scaling[adapter] = new_scaling


# --- LoRA-compatible method names, so diffusers' scaling hooks work on GraLoRA layers --------------------------


def _set_scale(self: GraloraLayer, adapter: str, scale: float) -> None:
    """Like ``LoraLayer.set_scale``: apply ``adapter`` at ``scale`` times its configured alpha / (r + hybrid_r)."""
    set_adapter_weight(self, adapter, scale)


def _scale_layer(self: GraloraLayer, scale: float) -> None:
    """Like ``LoraLayer.scale_layer``: multiply the scale of every active adapter by ``scale``."""
    if scale == 1:
        return
    for adapter in self.active_adapters:
        if adapter in self.gralora_A:
            set_adapter_weight(self, adapter, adapter_weight(self, adapter) * scale)


def _unscale_layer(self: GraloraLayer, scale: float | None = None) -> None:
    """Like ``LoraLayer.unscale_layer``: divide by ``scale``, or reset active adapters to weight 1 when None."""
    for adapter in self.active_adapters:
        if adapter in self.gralora_A:
            new_weight = 1.0 if scale is None else adapter_weight(self, adapter) / scale
            set_adapter_weight(self, adapter, new_weight)


def install_lora_compatible_scaling() -> None:
    """Add ``set_scale`` / ``scale_layer`` / ``unscale_layer`` to PEFT's GraLoRA layer where PEFT lacks them."""
    for name, method in (
        ("set_scale", _set_scale),
        ("scale_layer", _scale_layer),
        ("unscale_layer", _unscale_layer),
    ):
        if not hasattr(GraloraLayer, name):
            setattr(GraloraLayer, name, method)


# --- memory-lean training forward ---------------------------------------------------------------------------------


def _routed_block_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GraLoRA's block-routed product for A [k, in/k, r] and B [k, r, out/k], laid out as PEFT stores them.

    Input slice j is projected by A[j] to r features; chunk c (r/k wide) of that projection feeds output slice c,
    whose B[c] reads the k chunks (one per input slice) stacked. Used only inside the recomputing training forward.
    """
    k, in_k, r = a.shape
    lead = x.shape[:-1]
    h = torch.einsum("...ji,jir->...jr", x.reshape(*lead, k, in_k), a)
    h = h.reshape(*lead, k, k, r // k).transpose(-3, -2).reshape(*lead, k, r)
    return torch.einsum("...cr,cro->...co", h, b).reshape(*lead, k * b.shape[-1])


class MemoryLeanGraloraLinear(GraloraLinear):
    """PEFT's GraLoRA ``Linear`` whose training forward recomputes the k*r-wide intermediate during backward.

    GraLoRA's intermediate activation is k times LoRA's (k*r per token instead of r); saving it for backward costs
    activation memory that LoRA does not pay. Under autograd this layer stores only the adapter input (already kept
    by the frozen base layer) and recomputes the intermediate in backward (``torch.utils.checkpoint``). Parameters,
    state dict, merging and inference are PEFT's own; only the gradient-recording forward differs.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged or not torch.is_grad_enabled():
            return super().forward(x, *args, **kwargs)
        previous_dtype = x.dtype
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.gralora_A:
                continue
            a, b = self.gralora_A[name], self.gralora_B[name]
            dropout, scaling = self.gralora_dropout[name], self.scaling[name]
            x_in = dropout(x.to(a.dtype))
            delta = checkpoint(_routed_block_delta, x_in, a, b, use_reentrant=False)
            result = result + scaling * delta.to(result.dtype)
            if self.hybrid_r[name] > 0:
                hybrid = self.gralora_B_general[name](self.gralora_A_general[name](x_in))
                result = result + scaling * hybrid.to(result.dtype)
        return result.to(previous_dtype)


def use_memory_lean_training(model: nn.Module, enabled: bool = True) -> int:
    """Switch every GraLoRA linear layer of ``model`` to (or back from) the recomputing training forward.

    The layer keeps its identity as a PEFT GraLoRA layer (same parameters and state dict); returns how many layers
    were switched.
    """
    target = MemoryLeanGraloraLinear if enabled else GraloraLinear
    count = 0
    for _, layer in gralora_layers(model):
        if type(layer) in (GraloraLinear, MemoryLeanGraloraLinear) and type(layer) is not target:
            layer.__class__ = target
            count += 1
    return count
