"""gralora-diffusion: GraLoRA adapters for diffusers pipelines.

The public API mirrors diffusers' LoRA vocabulary: ``load_gralora_weights``, ``set_gralora_adapters``,
``fuse_gralora``, ``unfuse_gralora``, ``disable_gralora``, ``enable_gralora``, ``delete_gralora_adapters``,
``unload_gralora_weights``, ``get_gralora_adapters`` and ``save_gralora_weights``.

Names are imported lazily on first use (PEP 562), so importing a leaf module such as ``gralora_diffusion.world``
does not pay for torch, diffusers and PEFT, and importing the package has no side effects.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, ...]] = {
    "adapters": (
        "GraloraAdapterError",
        "delete_gralora_adapters",
        "disable_gralora",
        "enable_gralora",
        "fuse_gralora",
        "get_active_gralora_adapters",
        "get_fused_gralora_adapters",
        "get_gralora_adapters",
        "load_gralora_weights",
        "pipeline_components",
        "set_gralora_adapters",
        "unfuse_gralora",
        "unload_gralora_weights",
    ),
    "config": (
        "TARGET_PRESETS",
        "GraloraConfigError",
        "check_gralora_fits",
        "default_gralora_k",
        "make_gralora_config",
    ),
    "export": ("ExportError", "ExportResult", "export_lora", "to_lora"),
    "io": (
        "AdapterFile",
        "AdapterFileError",
        "export_peft_folder",
        "read_adapter",
        "save_adapter_file",
        "save_gralora_weights",
    ),
    "peft_ops": ("adapter_state_dict", "add_gralora_adapter", "gralora_config_of"),
    "families": ("ModelFamily", "family_of"),
    "layers": ("GraloraConv2d", "GraloraLinear", "inject_gralora"),
    "pipeline": ("GraloraPipelineMixin", "with_gralora"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # a submodule, without importing it first
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
