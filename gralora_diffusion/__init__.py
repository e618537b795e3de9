"""gralora-diffusion: GraLoRA adapters for diffusers pipelines.

The public API mirrors diffusers' LoRA vocabulary: ``load_gralora_weights``, ``set_gralora_adapters``,
``fuse_gralora``, ``unfuse_gralora``, ``disable_gralora``, ``enable_gralora``, ``delete_gralora_adapters``,
``unload_gralora_weights``, ``get_gralora_adapters`` and ``save_gralora_weights``.
"""

from .adapters import (
    GraloraAdapterError,
    adapter_state_dict,
    add_gralora_adapter,
    delete_gralora_adapters,
    disable_gralora,
    enable_gralora,
    fuse_gralora,
    get_active_gralora_adapters,
    get_fused_gralora_adapters,
    get_gralora_adapters,
    gralora_config_of,
    load_gralora_weights,
    pipeline_components,
    save_gralora_weights,
    set_gralora_adapters,
    unfuse_gralora,
    unload_gralora_weights,
)
from .config import (
    TARGET_PRESETS,
    GraloraConfigError,
    check_gralora_fits,
    default_gralora_k,
    make_gralora_config,
)
from .export import ExportError, ExportResult, export_lora, to_lora
from .io import AdapterFile, AdapterFileError, export_peft_folder, read_adapter, save_adapter_file
from .layers import install_lora_compatible_scaling
from .pipeline import GraloraPipelineMixin, with_gralora

install_lora_compatible_scaling()

__version__ = "0.1.0"

__all__ = [
    "TARGET_PRESETS",
    "AdapterFile",
    "AdapterFileError",
    "GraloraAdapterError",
    "GraloraConfigError",
    "ExportError",
    "ExportResult",
    "GraloraPipelineMixin",
    "adapter_state_dict",
    "add_gralora_adapter",
    "check_gralora_fits",
    "default_gralora_k",
    "delete_gralora_adapters",
    "disable_gralora",
    "enable_gralora",
    "export_lora",
    "export_peft_folder",
    "fuse_gralora",
    "get_active_gralora_adapters",
    "get_fused_gralora_adapters",
    "get_gralora_adapters",
    "gralora_config_of",
    "install_lora_compatible_scaling",
    "load_gralora_weights",
    "make_gralora_config",
    "pipeline_components",
    "read_adapter",
    "save_adapter_file",
    "save_gralora_weights",
    "set_gralora_adapters",
    "to_lora",
    "unfuse_gralora",
    "unload_gralora_weights",
    "with_gralora",
]
