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
from torch import nn

__all__ = [
    "GraloraLayer",
    "adapter_weight",
    "base_scaling",
    "gralora_layers",
    "install_lora_compatible_scaling",
    "set_adapter_weight",
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
