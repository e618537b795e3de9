"""Base models by name: the one registry of the names this project adds (the offline toy bases), and single-file
checkpoints (one ``.safetensors`` in the original layout, as most community SDXL models are shared), used only at the
entry points (the ``gralora`` command, the app, the trainer, the demo, benchmarks). Everything below them sees
diffusers folders, hub ids and loaded pipelines only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# Where a single file's architecture configs come from when none is given: SDXL base 1.0, as diffusers does for an
# SDXL checkpoint. A local diffusers folder of the same architecture works offline.
SINGLE_FILE_CONFIG = "stabilityai/stable-diffusion-xl-base-1.0"
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Generation defaults of the bases this registry adds, where the family's do not fit: the toy world base was
# pretrained and judged at guidance 3 with 20 Euler steps (stronger guidance over-saturates its colours).
_BASE_DEFAULTS = {"toy-world": {"guidance_scale": 3.0, "steps": 20}}

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


def same_base(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two ways of naming a base name the same one: a registered name and its folder ("toy-world" and the
    installed folder), or two paths to one folder. An adapter recorded either before it named its base."""
    ra, rb = resolve_base(a), resolve_base(b)
    if ra == rb:
        return True
    pa, pb = Path(ra), Path(rb)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as reports record it: relative to the repository when inside it (no machine's home folder in a
    committed JSON), otherwise as given (a hub id stays a hub id)."""
    if not Path(path).exists():
        return str(path)
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def is_single_file(base: str | os.PathLike | None) -> bool:
    """Whether ``base`` names a single checkpoint file (``.safetensors``, or a pickle format this project refuses)."""
    return base is not None and str(base).lower().endswith((".safetensors", *_PICKLE_SUFFIXES))


def check_single_file(base: str | os.PathLike) -> Path:
    """The single-file checkpoint ``base`` as a path, or one sentence saying why it cannot be read."""
    path = Path(base).expanduser()
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(
            f"{path.name} is a pickle checkpoint, which can run code when loaded; only .safetensors single files are "
            "read: use the model's .safetensors release or convert it once in a trusted environment."
        )
    if not path.is_file():
        raise ValueError(f"The single-file checkpoint {path} does not exist; check the path.")
    return path


# A key every single file of a pipeline class has (the original release's names): SDXL's second text encoder,
# SD 1.x's text encoder. A file without it is another architecture than the configs describe.
_SINGLE_FILE_MARKERS = {
    "StableDiffusionXLPipeline": ("conditioner.embedders.1.model.", "SDXL"),
    "StableDiffusionPipeline": ("cond_stage_model.", "SD 1.x"),
}


def _pipeline_class_name(path: Path, config: str) -> str:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(config)["_class_name"]
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"Cannot read the architecture configs for {path.name} from {config} ({first}); pass "
            "--single_file_config with a diffusers folder (or downloaded hub id) of the same architecture."
        ) from None


def _check_single_file_matches(path: Path, class_name: str, config: str) -> None:
    """Read only the file's header: is it a safetensors file of the architecture ``config`` describes?"""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path.name} is not a readable safetensors file ({err}); check the file.") from None
    marker = _SINGLE_FILE_MARKERS.get(class_name)
    if marker and not any(k.startswith(marker[0]) for k in keys):
        raise ValueError(
            f"{path.name} is not an {marker[1]} checkpoint like {config} (no {marker[0]}* weights); pass "
            "--single_file_config with a diffusers folder of the checkpoint's own architecture."
        )


def _single_file_source(base: str | os.PathLike, single_file_config: str | os.PathLike | None) -> tuple[Path, str, str]:
    """(path, config source, pipeline class name) of a single-file base, its header checked against the configs."""
    path = check_single_file(base)
    config = resolve_base(single_file_config or SINGLE_FILE_CONFIG)
    class_name = _pipeline_class_name(path, config)
    _check_single_file_matches(path, class_name, config)
    return path, config, class_name


def config_source(base: str | os.PathLike, single_file_config: str | os.PathLike | None = None) -> str:
    """Where the architecture configs of ``base`` are read: the base itself (a diffusers folder or hub id), or for
    a single file ``single_file_config`` (default ``SINGLE_FILE_CONFIG``), resolved like a base name, after checking
    from the file's header that it is of that architecture."""
    if not is_single_file(base):
        return str(base)
    return _single_file_source(base, single_file_config)[1]


def load_pipeline(base: str | os.PathLike, *, single_file_config: str | os.PathLike | None = None, **kwargs) -> Any:
    """The diffusers pipeline ``base`` names: ``from_pretrained`` for a folder or hub id (the class its
    model_index.json names), ``from_single_file`` for a ``.safetensors`` checkpoint, with the pipeline class and the
    component configs of ``single_file_config``. ``kwargs`` go to the loader (``torch_dtype``, component overrides)."""
    import warnings

    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        if not is_single_file(base):
            return DiffusionPipeline.from_pretrained(str(base), **kwargs)
        import diffusers

        path, config, class_name = _single_file_source(base, single_file_config)
        pipeline_class = getattr(diffusers, class_name, None)
        if pipeline_class is None or not hasattr(pipeline_class, "from_single_file"):
            raise ValueError(f"{config} names {class_name}, which cannot load single files; pass another config.")
        try:
            return pipeline_class.from_single_file(str(path), config=config, **kwargs)
        except (ValueError, RuntimeError, KeyError) as err:  # sizes that do not fit the configs, above all
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ValueError(
                f"{path.name} does not fit the architecture of {config} ({first}); pass --single_file_config with a "
                "diffusers folder of the checkpoint's own architecture."
            ) from None


def base_defaults(base: str | os.PathLike | None) -> dict[str, Any]:
    """Generation settings the base named ``base`` asks for beyond its family's (empty for most bases)."""
    return dict(_BASE_DEFAULTS.get(str(base), {})) if base is not None else {}
