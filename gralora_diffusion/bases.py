"""Base models by name: the one registry of the names this project adds (the offline toy bases), used only at the
entry points (the ``gralora`` command, the app, the trainer, the demo, benchmarks). Everything below them sees
diffusers folders and hub ids only.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

_TOY_NAMES = {"toy": "sdxl", "toy-sdxl": "sdxl", "toy-sd15": "sd15", "toy-sd3": "sd3"}  # name -> toy kind


def _toy_kind(name: str) -> str | None:
    """The toy kind a name (or a toy adapter's recorded model id) stands for, else None."""
    if name in _TOY_NAMES:
        return _TOY_NAMES[name]
    from .toy import TOY_KINDS

    return next((kind for kind, (_, model_id) in TOY_KINDS.items() if model_id == name), None)


def resolve_base(base: str | os.PathLike | None) -> str:
    """A base given by name or path: ``None`` or ``"toy"`` is the random toy SDXL (saved once into the cache),
    ``"toy-world"`` the pretrained toy SDXL, ``"toy-sd15"`` / ``"toy-sd3"`` the other toy families (a toy adapter's
    recorded id resolves too); anything else (a folder or hub id) is returned as it is."""
    text = "toy" if base is None else str(base)
    if text == "toy-world":
        from .toy import toy_world_base_dir

        return str(toy_world_base_dir())
    kind = _toy_kind(text)
    if kind is None:
        return text
    from .toy import toy_base_dir

    return str(toy_base_dir(kind))


def is_registered(base: str | None) -> bool:
    """Whether ``base`` is one of this registry's names (or a toy adapter's recorded id)."""
    return base is not None and (base == "toy-world" or _toy_kind(base) is not None)


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as reports record it: relative to the repository when inside it (no machine's home folder in a
    committed JSON), otherwise as given (a hub id stays a hub id)."""
    if not Path(path).exists():
        return str(path)
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
