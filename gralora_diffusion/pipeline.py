"""GraLoRA methods on a pipeline class, for those who prefer ``pipe.load_gralora_weights(...)``.

The module-level functions in ``gralora_diffusion.adapters`` are the API; this mixin only forwards to them.
"""

from __future__ import annotations

from . import adapters


class GraloraPipelineMixin:
    """Adds ``load_gralora_weights``, ``set_gralora_adapters``, ``fuse_gralora``... as methods of a pipeline."""

    def load_gralora_weights(self, path_or_state_dict, adapter_name=None) -> str:
        return adapters.load_gralora_weights(self, path_or_state_dict, adapter_name)

    def set_gralora_adapters(self, adapter_names, adapter_weights=None) -> None:
        adapters.set_gralora_adapters(self, adapter_names, adapter_weights)

    def fuse_gralora(self, adapter_names=None) -> None:
        adapters.fuse_gralora(self, adapter_names)

    def unfuse_gralora(self) -> None:
        adapters.unfuse_gralora(self)

    def disable_gralora(self) -> None:
        adapters.disable_gralora(self)

    def enable_gralora(self) -> None:
        adapters.enable_gralora(self)

    def delete_gralora_adapters(self, adapter_names) -> None:
        adapters.delete_gralora_adapters(self, adapter_names)

    def unload_gralora_weights(self) -> None:
        adapters.unload_gralora_weights(self)

    def get_gralora_adapters(self) -> dict[str, list[str]]:
        return adapters.get_gralora_adapters(self)

    def get_active_gralora_adapters(self) -> dict[str, dict[str, float]]:
        return adapters.get_active_gralora_adapters(self)


def with_gralora(pipeline_class: type) -> type:
    """A subclass of a diffusers pipeline class with the GraLoRA methods, e.g.
    ``with_gralora(StableDiffusionXLPipeline).from_pretrained(...)``."""
    return type(f"Gralora{pipeline_class.__name__}", (GraloraPipelineMixin, pipeline_class), {})
