"""Base models by name: the one registry of the names this project adds (the offline toy bases), used only at the
entry points (the ``gralora`` command, the app, the trainer, the demo, benchmarks). Everything below them sees
diffusers folders and hub ids only.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# name -> toy kind; the model ids toy adapters record resolve too, so a recorded base can be read back offline
_TOY_NAMES = {
    "toy": "sdxl",
    "toy-sdxl": "sdxl",
    "toy-sd15": "sd15",
    "toy-sd3": "sd3",
    "gralora-diffusion/toy-sdxl": "sdxl",
    "gralora-diffusion/toy-sd15": "sd15",
    "gralora-diffusion/toy-sd3": "sd3",
}
NAMES = ("toy", "toy-world", "toy-sd15", "toy-sd3")  # what users may type


def resolve_base(base: str | os.PathLike | None) -> str:
    """A base given by name or path: ``None`` or ``"toy"`` is the random toy SDXL (saved once into the cache),
    ``"toy-world"`` the pretrained toy SDXL, ``"toy-sd15"`` / ``"toy-sd3"`` the other toy families; anything else (a
    folder or hub id) is returned as it is."""
    if base is None:
        base = "toy"
    text = str(base)
    if text == "toy-world":
        from .toy import toy_world_base_dir

        return str(toy_world_base_dir())
    if text in _TOY_NAMES:
        from .toy import toy_base_dir

        return str(toy_base_dir(_TOY_NAMES[text]))
    return text


def is_registered(base: str | None) -> bool:
    """Whether ``base`` is one of this registry's names (or a toy adapter's recorded id)."""
    return base is not None and (base in _TOY_NAMES or base == "toy-world")


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as reports record it: relative to the repository when inside it (no machine's home folder in a
    committed JSON), otherwise as given (a hub id stays a hub id)."""
    if not Path(path).exists():
        return str(path)
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
