"""GraLoRA for ComfyUI: a custom node package that teaches ComfyUI's LoRA loading to apply GraLoRA factors.

Install: copy (or link) this folder into ``ComfyUI/custom_nodes/`` (for example as ``custom_nodes/gralora``) and
restart ComfyUI. Write adapters for it with ``gralora export ADAPTER.safetensors --to comfyui -o OUT.safetensors``
(GraLoRA factors under kohya module names, the same size as the adapter) and put them in ``models/loras``; the
standard "Load LoRA" node then applies them, with its strength sliders, like any LoRA.

On import, a ``GraLoRAAdapter`` is registered with ``comfy.weight_adapter``: for each module ComfyUI maps, it finds
``<name>.gralora_A`` [k, in/k, r] and ``<name>.gralora_B`` [k, r, out/k] (and, for hybrid GraLoRA,
``<name>.gralora_A_general.weight`` / ``.gralora_B_general.weight``), and adds to the weight the dense delta PEFT's
``GraloraLayer.get_delta_weight`` builds: block (i, j) of the k x k grid, output slice i and input slice j, is
``B[i, j*r/k:(j+1)*r/k, :]^T @ A[j, :, i*r/k:(i+1)*r/k]^T``, plus ``B_general @ A_general``, scaled by
``alpha / (r + hybrid_r)`` (``<name>.alpha``; 1 when absent) times the node's strength. For an adapted convolution
(the package's ``attention-conv`` target: the ResNet blocks' ``in_layers.2`` / ``out_layers.3``) "in" is the
flattened weight's in_channels x kh x kw, and the delta is reshaped to the weight's [out, in, kh, kw].

This package imports only torch and ComfyUI; it does not need gralora-diffusion installed.
"""

from __future__ import annotations

import logging

import torch

NODE_CLASS_MAPPINGS: dict = {}  # no new node: ComfyUI's own "Load LoRA" node applies GraLoRA once this is imported
NODE_DISPLAY_NAME_MAPPINGS: dict = {}


def gralora_delta(
    a: torch.Tensor,
    b: torch.Tensor,
    a_general: torch.Tensor | None = None,
    b_general: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense [out, in] GraLoRA delta (unscaled) from ``A`` [k, in/k, r] and ``B`` [k, r, out/k] and the optional
    hybrid LoRA part ``A_general`` [hybrid_r, in] and ``B_general`` [out, hybrid_r]."""
    k, in_k, r = a.shape
    if b.ndim != 3 or b.shape[0] != k or b.shape[1] != r or r % k:
        raise ValueError(f"GraLoRA factors do not fit: A {tuple(a.shape)}, B {tuple(b.shape)}")
    out_k = b.shape[2]
    blocks_a = a.reshape(k, in_k, k, r // k)  # [input slice j, i, output slice c, s]
    blocks_b = b.reshape(k, k, r // k, out_k)  # [output slice c, input slice j, s, o]
    delta = torch.einsum("jics,cjso->coji", blocks_a, blocks_b).reshape(k * out_k, k * in_k)
    if a_general is not None and b_general is not None:
        delta = delta + b_general @ a_general
    return delta


def _adapter_class():
    import comfy.model_management
    from comfy.weight_adapter.base import WeightAdapterBase

    class GraLoRAAdapter(WeightAdapterBase):
        name = "gralora"

        def __init__(self, loaded_keys, weights):
            self.loaded_keys = loaded_keys
            self.weights = weights

        @classmethod
        def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
            if loaded_keys is None:
                loaded_keys = set()
            a_name, b_name = f"{x}.gralora_A", f"{x}.gralora_B"
            if a_name not in lora or b_name not in lora:
                return None
            names = [a_name, b_name]
            general = (f"{x}.gralora_A_general.weight", f"{x}.gralora_B_general.weight")
            a_general = b_general = None
            if all(n in lora for n in general):
                a_general, b_general = lora[general[0]], lora[general[1]]
                names += general
            loaded_keys.update(names)
            return cls(loaded_keys, (lora[a_name], lora[b_name], alpha, a_general, b_general))

        def calculate_weight(
            self,
            weight,
            key,
            strength,
            strength_model,
            offset,
            function,
            intermediate_dtype=torch.float32,
            original_weight=None,
        ):
            a, b, alpha, a_general, b_general = self.weights
            cast = comfy.model_management.cast_to_device
            a, b = cast(a, weight.device, intermediate_dtype), cast(b, weight.device, intermediate_dtype)
            if a_general is not None:
                a_general = cast(a_general, weight.device, intermediate_dtype)
                b_general = cast(b_general, weight.device, intermediate_dtype)
            rank = a.shape[2] + (a_general.shape[0] if a_general is not None else 0)
            scale = 1.0 if alpha is None else alpha / rank
            try:
                delta = gralora_delta(a, b, a_general, b_general).reshape(weight.shape)
            except (ValueError, RuntimeError) as err:
                logging.error(f"GraLoRA: {key}: {err}; the weight is left unchanged")
                return weight
            weight += function((strength * scale * delta).type(weight.dtype))
            return weight

    return GraLoRAAdapter


def register() -> type:
    """Register the GraLoRA weight adapter with ComfyUI (once); returns its class."""
    import comfy.weight_adapter as weight_adapter

    for known in weight_adapter.adapters:
        if getattr(known, "name", None) == "gralora":
            return known
    adapter = _adapter_class()
    weight_adapter.adapters.append(adapter)  # what loading consults; not adapter_maps, ComfyUI's list of trainable
    return adapter  # algorithms (this adapter applies trained GraLoRA files, it does not train them)


try:
    import comfy.weight_adapter  # noqa: F401
except ImportError:  # imported outside ComfyUI (e.g. to test gralora_delta): nothing to register
    pass
else:
    GraLoRAAdapter = register()
