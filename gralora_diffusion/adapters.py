"""GraLoRA on any diffusers pipeline: load, blend, fuse, unfuse, disable, delete, unload, save.

The names mirror diffusers' LoRA API (``load_lora_weights`` -> ``load_gralora_weights``, ``set_adapters`` ->
``set_gralora_adapters``, ``fuse_lora`` -> ``fuse_gralora``...). Semantics: with adapters a and b active at weights
wa and wb, every adapted layer computes ``base(x) + wa * delta_a(x) + wb * delta_b(x)``, fused or not.

State lives in the PEFT layers themselves (which adapters a layer has, which are active, at what scale, which are
merged), so nothing here can drift out of sync with what the model computes. Every function validates its input
completely before it changes the pipeline: after an error the pipeline is exactly as it was.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import GraloraConfig, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from torch import nn

from .config import COMPONENTS, linear_features
from .io import (
    AdapterFile,
    AdapterFileError,
    adapter_from_tensors,
    config_to_dict,
    read_adapter,
    save_adapter_file,
)
from .layers import GraloraLayer, adapter_weight, gralora_layers, inject_gralora, set_adapter_weight

Weight = float | Mapping[str, float]


class GraloraAdapterError(ValueError):
    """A request cannot be applied to this pipeline; raised before anything is changed."""


# --- helpers -----------------------------------------------------------------------------------------------------


def pipeline_components(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's modules that can carry GraLoRA (``unet``/``transformer`` and text encoders), by name."""
    found = {}
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            found[name] = module
    return found


def _layers(pipe: Any) -> Iterable[tuple[str, str, GraloraLayer]]:
    for component, model in pipeline_components(pipe).items():
        for name, layer in gralora_layers(model):
            yield component, name, layer


def get_gralora_adapters(pipe: Any) -> dict[str, list[str]]:
    """Component -> names of the GraLoRA adapters loaded into it (like diffusers' ``get_list_adapters``)."""
    out: dict[str, list[str]] = {}
    for component, model in pipeline_components(pipe).items():
        names: set[str] = set()
        for _, layer in gralora_layers(model):
            names.update(layer.gralora_A.keys())
        if names:
            out[component] = sorted(names)
    return out


def _all_adapter_names(pipe: Any) -> set[str]:
    return {n for names in get_gralora_adapters(pipe).values() for n in names}


def get_active_gralora_adapters(pipe: Any) -> dict[str, dict[str, float]]:
    """Active adapter -> {component: weight}, in activation order; empty while adapters are disabled."""
    out: dict[str, dict[str, float]] = {}
    for component, _, layer in _layers(pipe):
        if layer.disable_adapters:
            continue
        for name in layer.active_adapters:
            if name in layer.gralora_A and component not in out.get(name, {}):
                out.setdefault(name, {})[component] = adapter_weight(layer, name)
    return out


def get_fused_gralora_adapters(pipe: Any) -> list[str]:
    """Names of the adapters currently merged into the base weights (empty when unfused)."""
    fused: list[str] = []
    for _, _, layer in _layers(pipe):
        for name in layer.merged_adapters:
            if name not in fused:
                fused.append(name)
    return fused


def _activate(layer: GraloraLayer, names: Sequence[str]) -> None:
    """Make exactly ``names`` (those this layer has) active, frozen (inference)."""
    layer.set_adapter([n for n in names if n in layer.gralora_A], inference_mode=True)


def _unfuse_all(pipe: Any) -> None:
    for _, _, layer in _layers(pipe):
        while layer.merged_adapters:
            layer.unmerge()


def _fuse_active(pipe: Any) -> None:
    for _, _, layer in _layers(pipe):
        names = [n for n in layer.active_adapters if n in layer.gralora_A and n not in layer.merged_adapters]
        if names and not layer.disable_adapters:
            layer.merge(adapter_names=names)


def _normalise_names(adapter_names: str | Sequence[str]) -> list[str]:
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if len(set(names)) != len(names):
        raise GraloraAdapterError(f"Adapter names {names} contain a duplicate; name each adapter once.")
    return names


def _check_known(pipe: Any, names: Iterable[str]) -> None:
    loaded = _all_adapter_names(pipe)
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise GraloraAdapterError(
            f"No GraLoRA adapter named {unknown[0]!r} is loaded; loaded adapters: {sorted(loaded) or 'none'}."
        )


# --- module names across transformers versions ------------------------------------------------------------------

CLIP_PREFIX = "text_model."


def resolve_module_name(modules: Mapping[str, nn.Module], name: str) -> str | None:
    """The name under which ``modules`` holds the adapted module ``name``.

    Adapter files name CLIP text-encoder modules ``text_model.encoder.layers...`` (the layout of transformers 4 and of
    ``CLIPTextModelWithProjection``); transformers 5 flattens ``CLIPTextModel`` to ``encoder.layers...``. Both are
    accepted, so an adapter works whichever transformers made or loads it.
    """
    if name in modules:
        return name
    alternative = name[len(CLIP_PREFIX) :] if name.startswith(CLIP_PREFIX) else CLIP_PREFIX + name
    return alternative if alternative in modules else None


def canonical_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For a CLIP text encoder without the ``text_model`` wrapper, write keys in the ``text_model.`` form."""
    if not type(model).__name__.startswith("CLIPText") or hasattr(model, "text_model"):
        return sd
    return {k if k.startswith(CLIP_PREFIX) else CLIP_PREFIX + k: v for k, v in sd.items()}


# --- loading -----------------------------------------------------------------------------------------------------


def check_fits_pipeline(pipe: Any, adapter: AdapterFile) -> None:
    """Every component exists and every adapted module exists with the shapes the adapter was trained on."""
    components = pipeline_components(pipe)
    for component in adapter.components:
        if component not in components:
            raise GraloraAdapterError(
                f"{adapter.source} has weights for {component!r} but the pipeline has no {component} "
                f"(it has {sorted(components)}); use a pipeline of the adapter's base model."
            )
        model = components[component]
        modules = dict(model.named_modules())
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
            features = linear_features(module)
            if features is None:
                raise GraloraAdapterError(
                    f"{adapter.source} adapts {component}.{module_name}, which is a {type(module).__name__} here, "
                    "not a linear layer; the adapter was trained on another base model."
                )
            if features != expected:
                raise GraloraAdapterError(
                    f"{adapter.source} was trained on another base model: {component}.{module_name} is "
                    f"(in={features[0]}, out={features[1]}) in this pipeline but (in={expected[0]}, "
                    f"out={expected[1]}) in the adapter (base {adapter.base_model or 'unrecorded'})."
                )


def _inject(model: nn.Module, adapter_name: str, config: GraloraConfig, sd: dict[str, torch.Tensor]) -> None:
    """Inject PEFT GraLoRA layers for exactly the modules in ``sd`` and load the tensors into them."""
    named = dict(model.named_modules())
    sd = {
        f"{resolve_module_name(named, key.rsplit('.gralora_', 1)[0])}.gralora_{key.rsplit('.gralora_', 1)[1]}": value
        for key, value in sd.items()
    }
    modules = sorted({key.rsplit(".gralora_", 1)[0] for key in sd})
    config = GraloraConfig(
        r=config.r,
        alpha=config.alpha,
        gralora_k=config.gralora_k,
        hybrid_r=config.hybrid_r,
        gralora_dropout=config.gralora_dropout,
        target_modules=modules,
        inference_mode=True,
    )
    named = dict(model.named_modules())
    converted = {}
    for key, tensor in sd.items():
        base = named[key.rsplit(".gralora_", 1)[0]]
        weight = base.get_base_layer().weight if isinstance(base, GraloraLayer) else base.weight
        converted[key] = tensor.to(device=weight.device, dtype=weight.dtype)
    inject_gralora(model, config, adapter_name, low_cpu_mem_usage=True)
    result = set_peft_model_state_dict(model, converted, adapter_name=adapter_name, low_cpu_mem_usage=True)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".gralora_" in k]
    if unexpected:
        raise GraloraAdapterError(f"PEFT did not place {len(unexpected)} tensors, e.g. {unexpected[0]!r}.")


def _forget_config(model: nn.Module, adapter_name: str | None = None) -> None:
    """Drop PEFT's record of a GraLoRA adapter (all GraLoRA ones when None) from ``model.peft_config``."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    gralora_names = [n for n, c in configs.items() if isinstance(c, GraloraConfig)]
    for name in [adapter_name] if adapter_name else gralora_names:
        configs.pop(name, None)
    if not configs:
        del model.peft_config


def _default_name(path_or_state_dict: Any, pipe: Any) -> str:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = Path(path_or_state_dict)
        return path.stem if path.is_file() else path.name
    loaded = _all_adapter_names(pipe)
    i = 0
    while f"default_{i}" in loaded:
        i += 1
    return f"default_{i}"


def load_gralora_weights(
    pipe: Any,
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor] | AdapterFile,
    adapter_name: str | None = None,
) -> str:
    """Load a GraLoRA adapter into ``pipe`` and make it the active adapter (weight 1), like ``load_lora_weights``.

    ``path_or_state_dict`` is a GraLoRA ``.safetensors`` file, a PEFT adapter folder (or a folder of per-component
    PEFT folders), a flat state dict with ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` prefixed PEFT keys, or
    an ``AdapterFile``. The adapter is named ``adapter_name`` or, by default, after the file stem. Returns the name.
    A pipeline that is fused is unfused first. Raises ``AdapterFileError`` / ``GraloraAdapterError`` with one clear
    sentence, before anything is changed, for a file that is not GraLoRA, a truncated file, an adapter of another
    base model, a component the pipeline lacks, or a duplicate name.
    """
    if isinstance(path_or_state_dict, AdapterFile):
        adapter = path_or_state_dict
    elif isinstance(path_or_state_dict, Mapping):
        adapter = adapter_from_tensors(dict(path_or_state_dict))
    else:
        adapter = read_adapter(path_or_state_dict)
    name = adapter_name or _default_name(path_or_state_dict, pipe)
    if not isinstance(name, str) or not name or "." in name:
        raise GraloraAdapterError(f"Adapter name {name!r} is not usable; give a non-empty name without dots.")
    if name in _all_adapter_names(pipe):
        raise GraloraAdapterError(
            f"An adapter named {name!r} is already loaded; pass another adapter_name or delete it first."
        )
    check_fits_pipeline(pipe, adapter)

    _unfuse_all(pipe)
    components = pipeline_components(pipe)
    done = []
    try:
        for component in adapter.components:
            _inject(components[component], name, adapter.configs[component], adapter.state_dicts[component])
            done.append(component)
    except BaseException:
        _remove_adapter(pipe, name)
        raise
    set_gralora_adapters(pipe, [name])
    return name


# --- blending ----------------------------------------------------------------------------------------------------


def _expand_weights(
    pipe: Any, names: list[str], adapter_weights: Weight | Sequence[Weight] | None
) -> list[dict[str, float]]:
    """Per adapter, a weight for every component of the pipeline (missing components of a dict weigh 1.0)."""
    components = list(pipeline_components(pipe))
    if adapter_weights is None:
        per_adapter: list[Weight] = [1.0] * len(names)
    elif isinstance(adapter_weights, (int, float, Mapping)):
        per_adapter = [adapter_weights] * len(names)
    else:
        per_adapter = list(adapter_weights)
        if len(per_adapter) != len(names):
            raise GraloraAdapterError(
                f"Got {len(per_adapter)} weights for {len(names)} adapters; give one weight per adapter."
            )
    expanded = []
    for name, weight in zip(names, per_adapter):
        if isinstance(weight, Mapping):
            unknown = [c for c in weight if c not in components]
            if unknown:
                raise GraloraAdapterError(
                    f"Weight for {name!r} names component {unknown[0]!r}, which this pipeline does not have; "
                    f"use {components}."
                )
            values = {c: weight.get(c, 1.0) for c in components}
        else:
            values = dict.fromkeys(components, weight)
        for c, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
                raise GraloraAdapterError(f"Weight {v!r} for {name!r} ({c}) is not a finite number.")
        expanded.append({c: float(v) for c, v in values.items()})
    return expanded


def set_gralora_adapters(
    pipe: Any, adapter_names: str | Sequence[str], adapter_weights: Weight | Sequence[Weight] | None = None
) -> None:
    """Activate ``adapter_names`` with ``adapter_weights`` (all other adapters become inactive).

    A weight is a number (negative subtracts the adapter) or a per-component dict such as
    ``{"unet": 0.8, "text_encoder": 0.5, "text_encoder_2": 0.5}`` (components left out weigh 1.0). One weight
    applies to all adapters; a list gives one per adapter. If the pipeline is fused, it is unfused and the new set is
    fused again, so a change costs one unfuse/fuse and fused output always equals unfused output.
    """
    names = _normalise_names(adapter_names)
    _check_known(pipe, names)
    weights = _expand_weights(pipe, names, adapter_weights)
    fused = bool(get_fused_gralora_adapters(pipe))
    if fused:
        _unfuse_all(pipe)
    for component, _, layer in _layers(pipe):
        _activate(layer, names)
        for name, weight in zip(names, weights):
            set_adapter_weight(layer, name, weight[component])
    if fused:
        _fuse_active(pipe)


# --- fusing ------------------------------------------------------------------------------------------------------


def fuse_gralora(pipe: Any, adapter_names: str | Sequence[str] | None = None) -> None:
    """Merge adapters, at their current weights, into the base weights: inference then costs nothing extra.

    ``adapter_names`` defaults to the active adapters; naming others makes exactly those the active (fused) set,
    keeping their weights. Fused output equals unfused output; ``unfuse_gralora`` undoes it.
    """
    active = get_active_gralora_adapters(pipe)
    if adapter_names is None:
        names = list(active)
    else:
        names = _normalise_names(adapter_names)
        _check_known(pipe, names)
    if not names:
        raise GraloraAdapterError("No GraLoRA adapter is active; load one or call set_gralora_adapters first.")
    if any(layer.disable_adapters for _, _, layer in _layers(pipe)):
        raise GraloraAdapterError("GraLoRA adapters are disabled; call enable_gralora(pipe) before fusing.")
    if get_fused_gralora_adapters(pipe):
        _unfuse_all(pipe)
    if names != list(active):
        for _, _, layer in _layers(pipe):
            _activate(layer, names)
    _fuse_active(pipe)


def unfuse_gralora(pipe: Any) -> None:
    """Take every fused adapter back out of the base weights (they stay loaded and active, unfused)."""
    _unfuse_all(pipe)


# --- enabling, deleting, unloading -------------------------------------------------------------------------------


def disable_gralora(pipe: Any) -> None:
    """Run the pipeline without its GraLoRA adapters (a fused pipeline is unfused; ``enable_gralora`` re-fuses)."""
    fused = get_fused_gralora_adapters(pipe)
    _unfuse_all(pipe)
    for _, _, layer in _layers(pipe):
        layer.enable_adapters(False)
    pipe._gralora_fused_before_disable = fused


def enable_gralora(pipe: Any) -> None:
    """Undo ``disable_gralora``: the same active adapters and weights, fused again if they were fused."""
    for _, _, layer in _layers(pipe):
        layer.enable_adapters(True)
        _activate(layer, layer.active_adapters)
    if getattr(pipe, "_gralora_fused_before_disable", None):
        _fuse_active(pipe)
    pipe._gralora_fused_before_disable = []


def _replace_with_base(model: nn.Module, module_name: str, layer: GraloraLayer) -> None:
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer.get_base_layer())


def _remove_adapter(pipe: Any, name: str) -> None:
    """Delete ``name`` from every layer; layers left with no adapter go back to their plain base module."""
    for model in pipeline_components(pipe).values():
        _forget_config(model, name)
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
                _activate(layer, active)


def delete_gralora_adapters(pipe: Any, adapter_names: str | Sequence[str]) -> None:
    """Remove adapters from the pipeline (fused ones are unfused first; the remaining fused set is re-fused)."""
    names = _normalise_names(adapter_names)
    _check_known(pipe, names)
    fused = get_fused_gralora_adapters(pipe)
    _unfuse_all(pipe)
    for name in names:
        _remove_adapter(pipe, name)
    if [n for n in fused if n not in names]:
        _fuse_active(pipe)


def unload_gralora_weights(pipe: Any) -> None:
    """Remove every GraLoRA adapter and restore the plain modules.

    As with diffusers' ``unload_lora_weights``, what is fused stays fused: ``fuse_gralora`` then
    ``unload_gralora_weights`` leaves a plain pipeline with the blend baked into its weights (how ``gralora merge``
    makes a merged checkpoint). Unfused adapters simply disappear, leaving every base parameter bit-identical.
    """
    for model in pipeline_components(pipe).values():
        for module_name, layer in list(gralora_layers(model)):
            _replace_with_base(model, module_name, layer)
        _forget_config(model)
    pipe._gralora_fused_before_disable = []


# --- training: a fresh adapter, and saving ------------------------------------------------------------------------


def add_gralora_adapter(
    model: nn.Module, config: GraloraConfig, adapter_name: str = "default", component: str = "model"
) -> list[str]:
    """Inject a new, trainable GraLoRA adapter into ``model`` (a UNet or text encoder) with PEFT.

    The config is checked against every targeted layer first (``check_gralora_fits``), so a k that does not divide
    a layer fails with the layer's name and sizes before the model is touched. Returns the adapted module names.
    """
    from .config import check_gralora_fits

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
        (
            layer.r[adapter_name],
            layer.alpha[adapter_name],
            layer.gralora_k[adapter_name],
            layer.hybrid_r[adapter_name],
        )
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


def save_gralora_weights(
    path: str | os.PathLike,
    unet: nn.Module | Mapping[str, torch.Tensor] | None = None,
    text_encoder: nn.Module | Mapping[str, torch.Tensor] | None = None,
    text_encoder_2: nn.Module | Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    adapter_name: str = "default",
    configs: Mapping[str, GraloraConfig] | None = None,
    transformer: nn.Module | Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Save GraLoRA adapters of pipeline components into one ``.safetensors`` file (atomically).

    Each component is a model carrying the GraLoRA adapter ``adapter_name`` (its config is read from the layers) or
    a PEFT state dict of it (config from ``configs[component]`` or, failing that, inferred from shapes with
    alpha = 2r). ``metadata`` holds string-able extras such as ``base_model``, ``trigger_prompt``, ``steps``.
    """
    given = {
        "unet": unet,
        "transformer": transformer,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
    }
    given = {c: v for c, v in given.items() if v is not None}
    if not given:
        raise GraloraAdapterError("Nothing to save: pass at least one of unet, text_encoder, text_encoder_2.")
    state_dicts, cfgs = {}, {}
    for component, value in given.items():
        if isinstance(value, nn.Module):
            cfgs[component] = gralora_config_of(value, adapter_name)
            state_dicts[component] = canonical_state_dict(value, adapter_state_dict(value, adapter_name))
        else:
            state_dicts[component] = dict(value)
            if configs and component in configs:
                cfgs[component] = configs[component]
    extras = {k: v if isinstance(v, str) else str(v) for k, v in (metadata or {}).items()}
    flat = {f"{c}.{k}": t for c, sd in state_dicts.items() for k, t in sd.items()}
    header = {"gralora_config": json.dumps({c: config_to_dict(cfg) for c, cfg in cfgs.items()})} if cfgs else {}
    adapter = adapter_from_tensors(flat, header, source=str(path))  # validates before writing
    for component in state_dicts:
        if component not in cfgs:
            cfgs[component] = adapter.configs[component]
    adapter.configs = cfgs
    adapter.metadata = extras
    try:
        return save_adapter_file(path, adapter)
    except AdapterFileError as err:
        raise GraloraAdapterError(str(err)) from None
