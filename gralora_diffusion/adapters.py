"""GraLoRA on any diffusers pipeline: load, blend, fuse, unfuse, disable, delete, unload, save.

The names mirror diffusers' LoRA API (``load_lora_weights`` -> ``load_gralora_weights``, ``set_adapters`` ->
``set_gralora_adapters``, ``fuse_lora`` -> ``fuse_gralora``...). Semantics: with adapters a and b active at weights
wa and wb, every adapted layer computes ``base(x) + wa * delta_a(x) + wb * delta_b(x)``, fused or not.

State lives in the layers themselves (which adapters a layer has, which are active, at what blend weight -- the
package layer's own state --, which are merged), so nothing here can drift out of sync with what the model
computes. Operations on one model are in ``peft_ops``, the file format (and saving) in ``io``. Every function
validates its input completely before it changes the pipeline: after an error the pipeline is exactly as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .families import family_of
from .io import AdapterFile, adapter_from_tensors, read_adapter, validate_adapter
from .layers import GraloraLayer, adapter_weight, gralora_layers, set_adapter_weight
from .peft_ops import (
    GraloraAdapterError,
    activate,
    check_fits,
    inject_from_tensors,
    remove_adapter,
    remove_all_adapters,
)

Weight = float | Mapping[str, float]


# --- helpers -----------------------------------------------------------------------------------------------------


def pipeline_components(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's modules that can carry GraLoRA, by name, as its model family lists them (``unet`` or
    ``transformer``, then the text encoders)."""
    found = {}
    for name in family_of(pipe).components:
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


# --- loading -----------------------------------------------------------------------------------------------------


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
        validate_adapter(adapter)
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
    check_fits(pipeline_components(pipe), adapter)

    _unfuse_all(pipe)
    components = pipeline_components(pipe)
    done = []
    try:
        for component in adapter.components:
            inject_from_tensors(components[component], name, adapter.configs[component], adapter.state_dicts[component])
            done.append(component)
    except BaseException:
        for model in components.values():
            remove_adapter(model, name)
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
        activate(layer, names)
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
            activate(layer, names)
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
        activate(layer, layer.active_adapters)
    if getattr(pipe, "_gralora_fused_before_disable", None):
        _fuse_active(pipe)
    pipe._gralora_fused_before_disable = []


def delete_gralora_adapters(pipe: Any, adapter_names: str | Sequence[str]) -> None:
    """Remove adapters from the pipeline (fused ones are unfused first; the remaining fused set is re-fused)."""
    names = _normalise_names(adapter_names)
    _check_known(pipe, names)
    fused = get_fused_gralora_adapters(pipe)
    _unfuse_all(pipe)
    for name in names:
        for model in pipeline_components(pipe).values():
            remove_adapter(model, name)
    if [n for n in fused if n not in names]:
        _fuse_active(pipe)


def unload_gralora_weights(pipe: Any) -> None:
    """Remove every GraLoRA adapter and restore the plain modules.

    As with diffusers' ``unload_lora_weights``, what is fused stays fused: ``fuse_gralora`` then
    ``unload_gralora_weights`` leaves a plain pipeline with the blend baked into its weights (how ``gralora merge``
    makes a merged checkpoint). Unfused adapters simply disappear, leaving every base parameter bit-identical.
    """
    for model in pipeline_components(pipe).values():
        remove_all_adapters(model)
    pipe._gralora_fused_before_disable = []
