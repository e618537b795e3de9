"""PEFT operations on one model: check an adapter fits, inject one (fresh or from tensors), read its config and
state dict back, remove it. No pipelines here: ``adapters`` applies these to each component of a pipeline.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from peft import GraloraConfig, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

from .config import adapted_features, check_gralora_fits
from .layers import GraloraLayer, gralora_layers, inject_gralora
from .names import resolve_module_name

if TYPE_CHECKING:
    from .io import AdapterFile


class GraloraAdapterError(ValueError):
    """A request cannot be applied to this pipeline or model; raised before anything is changed."""


def check_fits(models: Mapping[str, nn.Module], adapter: AdapterFile) -> None:
    """Every component of ``adapter`` is in ``models`` ({component: model}) and every adapted module exists there
    as a linear or convolution layer with the shapes the adapter was trained on; else one sentence naming the first
    mismatch."""
    for component in adapter.components:
        if component not in models:
            raise GraloraAdapterError(
                f"{adapter.source} has weights for {component!r} but the pipeline has no {component} "
                f"(it has {sorted(models)}); use a pipeline of the adapter's base model."
            )
        modules = dict(models[component].named_modules())
        sd = adapter.state_dicts[component]
        for module_name in adapter.module_names(component):
            resolved = resolve_module_name(modules, module_name)
            module = modules.get(resolved) if resolved else None
            a, b = sd[f"{module_name}.gralora_A"], sd[f"{module_name}.gralora_B"]
            expected = (a.shape[0] * a.shape[1], b.shape[0] * b.shape[2])  # (in, out)
            if module is None:
                raise GraloraAdapterError(
                    f"{adapter.source} adapts {component}.{module_name}, which this pipeline does not have; the "
                    f"adapter was trained on another base model ({adapter.base_model or 'unrecorded'})."
                )
            features = adapted_features(module)
            if features is None:
                raise GraloraAdapterError(
                    f"{adapter.source} adapts {component}.{module_name}, which is a {type(module).__name__} here, "
                    "neither a linear layer nor a 2-D convolution; the adapter was trained on another base model."
                )
            if features != expected:
                raise GraloraAdapterError(
                    f"{adapter.source} was trained on another base model: {component}.{module_name} is "
                    f"(in={features[0]}, out={features[1]}) in this pipeline but (in={expected[0]}, "
                    f"out={expected[1]}) in the adapter (base {adapter.base_model or 'unrecorded'})."
                )
            if isinstance(module, BaseTunerLayer) and not isinstance(module, GraloraLayer):
                raise GraloraAdapterError(
                    f"{component}.{module_name} already carries a {type(module).__module__.split('.')[-2]} adapter "
                    "(e.g. from diffusers' load_lora_weights); GraLoRA and LoRA cannot share layers: call "
                    "pipe.unload_lora_weights() first."
                )


def inject_from_tensors(
    model: nn.Module, adapter_name: str, config: GraloraConfig, sd: Mapping[str, torch.Tensor]
) -> None:
    """Inject GraLoRA layers for exactly the modules in ``sd`` (PEFT keys) and load the tensors into them, in the
    dtype and on the device of each base layer."""
    named = dict(model.named_modules())
    placed = {}
    for key, tensor in sd.items():
        module, param = key.rsplit(".gralora_", 1)
        resolved = resolve_module_name(named, module)
        base = named[resolved]
        weight = base.get_base_layer().weight if isinstance(base, GraloraLayer) else base.weight
        placed[f"{resolved}.gralora_{param}"] = tensor.to(device=weight.device, dtype=weight.dtype)
    config = GraloraConfig(
        r=config.r,
        alpha=config.alpha,
        gralora_k=config.gralora_k,
        hybrid_r=config.hybrid_r,
        gralora_dropout=config.gralora_dropout,
        target_modules=sorted({key.rsplit(".gralora_", 1)[0] for key in placed}),
        inference_mode=True,
    )
    inject_gralora(model, config, adapter_name, low_cpu_mem_usage=True)
    result = set_peft_model_state_dict(model, placed, adapter_name=adapter_name, low_cpu_mem_usage=True)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".gralora_" in k]
    if unexpected:
        raise GraloraAdapterError(f"PEFT did not place {len(unexpected)} tensors, e.g. {unexpected[0]!r}.")


def add_gralora_adapter(
    model: nn.Module, config: GraloraConfig, adapter_name: str = "default", component: str = "model"
) -> list[str]:
    """Inject a new, trainable GraLoRA adapter into ``model`` (a UNet, transformer or text encoder).

    The config is checked against every targeted layer first (``check_gralora_fits``), so a k that does not divide
    a layer fails with the layer's name and sizes before the model is touched. Returns the adapted module names.
    """
    if any(adapter_name in layer.gralora_A for _, layer in gralora_layers(model)):
        raise GraloraAdapterError(f"The {component} already has an adapter named {adapter_name!r}.")
    modules = check_gralora_fits(model, config, component)
    inject_gralora(model, config, adapter_name, low_cpu_mem_usage=False)
    for _, layer in gralora_layers(model):
        if adapter_name in layer.gralora_A:
            layer.set_adapter([adapter_name])
    return modules


def gralora_config_of(model: nn.Module, adapter_name: str = "default") -> GraloraConfig:
    """The ``GraloraConfig`` of ``adapter_name`` in ``model``, read back from its layers (exact module names)."""
    layers = [(n, layer) for n, layer in gralora_layers(model) if adapter_name in layer.gralora_A]
    if not layers:
        raise GraloraAdapterError(f"The model has no GraLoRA adapter named {adapter_name!r}.")
    settings = {
        (layer.r[adapter_name], layer.alpha[adapter_name], layer.gralora_k[adapter_name], layer.hybrid_r[adapter_name])
        for _, layer in layers
    }
    if len(settings) != 1:
        raise GraloraAdapterError(
            f"Adapter {adapter_name!r} uses several (r, alpha, k, hybrid_r) settings {sorted(settings)}; the file "
            "format stores one per component."
        )
    r, alpha, k, hybrid_r = settings.pop()
    dropout = layers[0][1].gralora_dropout[adapter_name]
    return GraloraConfig(
        r=r,
        alpha=alpha,
        gralora_k=k,
        hybrid_r=hybrid_r,
        gralora_dropout=getattr(dropout, "p", 0.0),
        target_modules=sorted(n for n, _ in layers),
    )


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's state dict of ``adapter_name`` in ``model`` (keys without the adapter name)."""
    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v for k, v in sd.items() if ".gralora_" in k}


def forget_config(model: nn.Module, adapter_name: str | None = None) -> None:
    """Drop PEFT's record of a GraLoRA adapter (all GraLoRA ones when None) from ``model.peft_config``."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    gralora_names = [n for n, c in configs.items() if isinstance(c, GraloraConfig)]
    for name in [adapter_name] if adapter_name else gralora_names:
        configs.pop(name, None)
    if not configs:
        del model.peft_config


def _replace_with_base(model: nn.Module, module_name: str, layer: GraloraLayer) -> None:
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer.get_base_layer())


def activate(layer: GraloraLayer, names: list[str]) -> None:
    """Make exactly ``names`` (those this layer has) active, frozen (inference)."""
    layer.set_adapter([n for n in names if n in layer.gralora_A], inference_mode=True)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete ``name`` from every layer of ``model``; layers left with no adapter become their plain base module."""
    forget_config(model, name)
    for module_name, layer in list(gralora_layers(model)):
        if name not in layer.gralora_A:
            continue
        active = [n for n in layer.active_adapters if n != name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns when it picks a new active adapter; we set it below
            layer.delete_adapter(name)
        if not layer.gralora_A:
            _replace_with_base(model, module_name, layer)
        else:
            activate(layer, active)


def remove_all_adapters(model: nn.Module) -> None:
    """Replace every GraLoRA layer of ``model`` by its base module (merged deltas stay in the base weights)."""
    for module_name, layer in list(gralora_layers(model)):
        _replace_with_base(model, module_name, layer)
    forget_config(model)
