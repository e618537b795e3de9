"""Module names across library versions: the names an adapter file records vs the names a loaded model has.

Adapter files name CLIP text-encoder modules ``text_model.encoder.layers...`` (the layout of transformers 4 and of
``CLIPTextModelWithProjection``); transformers 5 flattens ``CLIPTextModel`` to ``encoder.layers...``. Both are
accepted when loading, and files are always written in the ``text_model.`` form, so an adapter works whichever
transformers made or loads it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

CLIP_PREFIX = "text_model."


def resolve_module_name(modules: Mapping[str, nn.Module], name: str) -> str | None:
    """The name under which ``modules`` (a model's ``named_modules``) holds the adapted module ``name``, or None."""
    if name in modules:
        return name
    alternative = name[len(CLIP_PREFIX) :] if name.startswith(CLIP_PREFIX) else CLIP_PREFIX + name
    return alternative if alternative in modules else None


def canonical_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For a CLIP text encoder without the ``text_model`` wrapper, write keys in the ``text_model.`` form."""
    if not type(model).__name__.startswith("CLIPText") or hasattr(model, "text_model"):
        return sd
    return {k if k.startswith(CLIP_PREFIX) else CLIP_PREFIX + k: v for k, v in sd.items()}
