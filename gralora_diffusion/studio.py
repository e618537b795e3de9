"""Generation with several GraLoRA adapters, for the app and scripts: no UI code here.

``AdapterLibrary`` is a folder of ``.safetensors`` adapters that only ever hands out files inside that folder, and
keeps parsed adapters in memory until the file changes on disk. ``Studio`` owns one pipeline: ``generate`` applies
a set of adapters and weights (one unfuse/fuse when it changed, nothing when it did not), runs the pipeline and
returns images whose PNG text chunk records every setting. ``parse_prompt_adapters`` reads A1111-style
``<gralora:NAME:WEIGHT>`` tags.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from . import adapters as api
from .families import SDXL, ModelFamily, family_of
from .fs import write_file_atomically
from .io import AdapterFile, AdapterFileError, read_adapter

logger = logging.getLogger("gralora_diffusion.studio")

SCHEDULERS = {  # the samplers of UNet families (SD 1.x, SDXL): menu name -> (diffusers class, extra config)
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
}
FLOW_SCHEDULERS = {  # the samplers of flow-matching families (SD3)
    "Euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "Heun": ("FlowMatchHeunDiscreteScheduler", {}),
}


def schedulers_for(family: ModelFamily) -> dict[str, tuple[str, dict]]:
    """The sampler menu that fits ``family``."""
    return FLOW_SCHEDULERS if family.flow_matching else SCHEDULERS


PROMPT_TAG = re.compile(r"<gralora:([^:<>]+)(?::([-+]?\d*\.?\d+))?>")


class StudioError(ValueError):
    """A request the studio cannot run; the message is meant for the user."""


# --- adapters on disk --------------------------------------------------------------------------------------------


@dataclass
class AdapterInfo:
    name: str
    trigger_prompt: str
    rank: int | None
    k: int | None
    base_model: str
    components: list[str]
    # component -> (adapted layers, of which 2-D convolutions): attention-only and LoCon-style adapters look alike
    # by name and rank, and mix differently
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)

    def describe(self) -> str:
        shape = f"r={self.rank}, k={self.k}" if self.rank else "r=?"
        trigger = f"trigger: {self.trigger_prompt!r}" if self.trigger_prompt else "no trigger prompt"
        parts = []
        for component in self.components:
            count, convs = self.layers.get(component, (0, 0))
            if count:
                component += f" {count} layer" + ("" if count == 1 else "s")
            if convs:
                component += f" ({convs} convolutions)"
            parts.append(component)
        return f"{trigger}; {shape}; base: {self.base_model or 'unrecorded'}; {', '.join(parts)}"


def layer_counts(adapter: AdapterFile) -> dict[str, tuple[int, int]]:
    """Per component, how many layers ``adapter`` adapts and how many of them are 2-D convolutions."""
    convs = Counter(component for component, _ in adapter.conv_modules())
    return {c: (len(adapter.module_names(c)), convs[c]) for c in adapter.components}


class AdapterLibrary:
    """The ``.safetensors`` adapters directly inside one folder, by name (file stem)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        self._cache: dict[str, tuple[tuple[int, int], AdapterFile]] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.iterdir() if p.suffix == ".safetensors" and p.is_file())

    def path(self, name: str) -> Path:
        """The file for adapter ``name``; refuses anything that is not a plain name of a file in the folder."""
        if not isinstance(name, str) or not name or name != Path(name).name or name in (".", ".."):
            raise StudioError(f"{name!r} is not an adapter name; pick one from the list.")
        stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
        path = (self.folder / f"{stem}.safetensors").resolve()
        if path.parent != self.folder:
            raise StudioError(f"{name!r} is not inside the adapter folder.")
        if not path.is_file():
            raise StudioError(f"No adapter named {stem!r} in {self.folder}; click refresh or check the name.")
        return path

    def load(self, name: str) -> AdapterFile:
        """The parsed adapter, from memory unless the file changed (size or modification time) since it was read."""
        path = self.path(name)
        stat = path.stat()
        key = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._cache.get(path.stem)
            if cached and cached[0] == key:
                return cached[1]
        adapter = read_adapter(path)
        with self._lock:
            self._cache[path.stem] = (key, adapter)
        return adapter

    def preview(self, name: str) -> Path | None:
        """A picture of what adapter ``name`` does, inside the library's folder: ``NAME.preview.png`` (or
        ``NAME.png`` / ``.jpg`` / ``.webp``, the convention of A1111 and model sites) beside the file, else, when
        the folder is this adapter's training output (its ``train_metrics.json`` names the file), the first image of
        its latest validation step."""
        path = self.path(name)
        for suffix in (".preview.png", ".png", ".jpg", ".jpeg", ".webp"):
            candidate = path.with_name(path.stem + suffix)
            if candidate.is_file() and candidate.resolve().parent == self.folder:
                return candidate
        if self._trained_here() != path.name:
            return None
        steps = []
        for folder in (self.folder / "validation").glob("step-*"):
            if folder.is_dir() and folder.name[5:].isdigit() and folder.resolve().parent == self.folder / "validation":
                steps.append((int(folder.name[5:]), folder))
        for _, folder in sorted(steps, reverse=True):
            images = sorted(p for p in folder.glob("*.png") if p.is_file() and not p.is_symlink())
            if images:
                return images[0]
        return None

    def _trained_here(self) -> str | None:
        """The adapter file name the trainer's ``train_metrics.json`` in this folder records, if any."""
        try:
            metrics = json.loads((self.folder / "train_metrics.json").read_text(encoding="utf-8"))
            return Path(str(metrics["adapter"])).name
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def info(self, name: str) -> AdapterInfo:
        adapter = self.load(name)
        config = adapter.configs.get("unet") or next(iter(adapter.configs.values()))
        return AdapterInfo(
            name=_adapter_name(name),
            trigger_prompt=adapter.metadata.get("trigger_prompt", ""),
            rank=config.r,
            k=config.gralora_k,
            base_model=adapter.base_model,
            components=adapter.components,
            layers=layer_counts(adapter),
        )


class AdapterFiles(AdapterLibrary):
    """Adapters named by explicit file paths (the command line's ``--adapter FILE``), by file stem."""

    def __init__(self, paths: list[str | Path]):
        super().__init__(Path.cwd())
        self.files = {}
        for path in paths:
            path = Path(path)
            if path.suffix != ".safetensors" or not path.is_file():
                raise StudioError(f"{path} is not a .safetensors file; give the path of a GraLoRA adapter file.")
            if path.stem in self.files:
                raise StudioError(f"Two adapters are named {path.stem!r}; rename one of the files.")
            self.files[path.stem] = path.resolve()

    def names(self) -> list[str]:
        return sorted(self.files)

    def path(self, name: str) -> Path:
        if name not in self.files:
            raise StudioError(f"No adapter named {name!r} was given; use one of {self.names()}.")
        return self.files[name]


# --- requests ----------------------------------------------------------------------------------------------------


@dataclass
class AdapterChoice:
    """One adapter row: the adapter, its weight, and optional separate denoiser (UNet or transformer) and
    text-encoder weights."""

    name: str
    weight: float = 1.0
    unet_weight: float | None = None
    text_encoder_weight: float | None = None
    enabled: bool = True

    def weights(self, family: ModelFamily = SDXL) -> dict[str, float]:
        """{component: weight} over the family's components (the denoiser and every text encoder)."""
        denoiser = self.weight if self.unet_weight is None else self.unet_weight
        te = self.weight if self.text_encoder_weight is None else self.text_encoder_weight
        return family.component_weights(denoiser, te)


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 5.0
    width: int = 1024
    height: int = 1024
    scheduler: str = "Euler"
    seed: int = 0
    random_seed: bool = False
    num_images: int = 1
    adapters: list[AdapterChoice] = field(default_factory=list)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seed: int
    prompt: str  # the prompt after removing <gralora:...> tags
    applied: dict[str, dict[str, float]]  # adapter -> component weights actually active
    errors: dict[str, str]  # adapter -> why it was skipped
    parameters: str  # the A1111-style settings line written into each PNG
    switch_ms: float
    cancelled: bool = False


def parse_prompt_adapters(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove ``<gralora:NAME:WEIGHT>`` tags (weight optional, default 1) from ``prompt``; return text and tags."""
    tags = [(m.group(1).strip(), float(m.group(2)) if m.group(2) else 1.0) for m in PROMPT_TAG.finditer(prompt)]
    text = re.sub(r"\s+([,.;])", r"\1", re.sub(r"\s{2,}", " ", PROMPT_TAG.sub("", prompt))).strip(" ,")
    return text, tags


def _adapter_name(name: str) -> str:
    """A row's or tag's adapter name without a ``.safetensors`` suffix; anything path-like is kept for refusal."""
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


def merge_adapter_choices(rows: list[AdapterChoice], tags: list[tuple[str, float]]) -> list[AdapterChoice]:
    """Enabled rows plus prompt tags; a tag for an adapter that also has a row sets that row's weight."""
    merged: dict[str, AdapterChoice] = {}
    for row in rows:
        if row.enabled and row.name:
            merged[_adapter_name(row.name)] = AdapterChoice(**{**asdict(row), "name": _adapter_name(row.name)})
    for name, weight in tags:
        stem = _adapter_name(name)
        if stem in merged:
            merged[stem].weight, merged[stem].unet_weight, merged[stem].text_encoder_weight = weight, None, None
        else:
            merged[stem] = AdapterChoice(name=stem, weight=weight)
    return list(merged.values())


SEED_RANGE = 2**64  # seeds are unsigned 64-bit, as torch.Generator takes them


@dataclass
class Limits:
    """What every endpoint accepts (the Generate button and its API, the X/Y grid, prompt tags, ``gralora generate``):
    the UI's sliders show the same ranges, so the API cannot go beyond them."""

    min_size: int = 64
    max_size: int = 2048
    max_steps: int = 150
    max_images: int = 8
    max_guidance: float = 20.0
    max_weight: float = 2.0  # |adapter weight|, rows and <gralora:NAME:WEIGHT> tags alike
    max_grid_cells: int = 36  # X values x Y values of one grid


def check_weight(label: str, value: Any, limits: Limits) -> float:
    """A finite adapter weight within +-``limits.max_weight``, or one sentence."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not -limits.max_weight <= value <= limits.max_weight
    ):
        raise StudioError(
            f"{label} {value} is not allowed: use a number from {-limits.max_weight:g} to {limits.max_weight:g}."
        )
    return float(value)


def check_seed(seed: Any) -> int:
    """A seed in [0, 2^64), or one sentence."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_RANGE:
        raise StudioError(f"Seed {seed} is not allowed: use a whole number from 0 to {SEED_RANGE - 1}.")
    return seed


def check_request(request: GenerationRequest, limits: Limits, schedulers: Mapping[str, Any] = SCHEDULERS) -> None:
    """Out-of-range settings get one clear sentence each, before anything runs (prompt tags included)."""
    for label, value in (("Width", request.width), ("Height", request.height)):
        if not limits.min_size <= value <= limits.max_size or value % 8:
            raise StudioError(
                f"{label} {value} is not allowed: use a multiple of 8 from {limits.min_size} to {limits.max_size}."
            )
    if not 1 <= request.steps <= limits.max_steps:
        raise StudioError(f"Steps {request.steps} is not allowed: use 1 to {limits.max_steps}.")
    if not 1 <= request.num_images <= limits.max_images:
        raise StudioError(f"Number of images {request.num_images} is not allowed: use 1 to {limits.max_images}.")
    if request.scheduler not in schedulers:
        raise StudioError(f"Unknown scheduler {request.scheduler!r}; use one of {', '.join(schedulers)}.")
    if not 0 <= request.guidance_scale <= limits.max_guidance:
        raise StudioError(f"Guidance scale {request.guidance_scale} is not allowed: use 0 to {limits.max_guidance:g}.")
    if not request.random_seed:
        check_seed(request.seed)
    for choice in request.adapters:
        for label, value in (("weight", choice.weight), ("UNet weight", choice.unet_weight),
                             ("text-encoder weight", choice.text_encoder_weight)):  # fmt: skip
            if value is not None:
                check_weight(f"The {label} of {choice.name}", value, limits)
    for name, weight in parse_prompt_adapters(request.prompt)[1]:
        check_weight(f"The prompt tag weight of {name}", weight, limits)


def generation_defaults(pipe, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings a new request starts from, from the base itself: width and height are the denoiser's sample size
    times the VAE's scale (1024 on SDXL, 64 on the toy bases), guidance the family's default; ``overrides`` (a base's
    own, see ``bases.base_defaults``) win."""
    family = family_of(pipe)
    denoiser = getattr(pipe, family.denoiser)
    size = int(denoiser.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    defaults = {"width": size, "height": size, "guidance_scale": family.default_guidance, "steps": 25}
    return {**defaults, **(overrides or {})}


# --- the studio --------------------------------------------------------------------------------------------------


class Studio:
    """One pipeline, loaded once, with the adapters of a library applied on demand."""

    def __init__(
        self,
        pipe,
        library: AdapterLibrary,
        base_name: str = "",
        limits: Limits | None = None,
        defaults: Mapping[str, Any] | None = None,
    ):
        self.pipe = pipe
        self.library = library
        self.base_name = base_name
        self.limits = limits or Limits()
        self.defaults = generation_defaults(pipe, defaults)
        self._loaded: dict[str, int] = {}  # adapter name -> id of the AdapterFile loaded into the pipeline
        self._applied: dict[str, dict[str, float]] = {}
        self.schedulers = schedulers_for(family_of(pipe))  # the sampler menu of the pipeline's family
        self._schedulers: dict[str, Any] = {}
        self._lock = threading.Lock()  # one generation at a time touches the pipeline
        self._cancel = threading.Event()
        self.switches = 0  # how many times the adapter set actually changed (unfuse/fuse)

    # adapters
    def _ensure_loaded(self, name: str) -> None:
        adapter = self.library.load(name)
        if self._loaded.get(name) == id(adapter):
            return
        if name in self._loaded:  # the file changed on disk: replace the stale copy
            api.delete_gralora_adapters(self.pipe, [name])
            del self._loaded[name]
        api.load_gralora_weights(self.pipe, adapter, adapter_name=name)
        self._loaded[name] = id(adapter)

    def apply(self, choices: list[AdapterChoice]) -> tuple[dict[str, dict[str, float]], dict[str, str], float]:
        """Make exactly ``choices`` active (fused). Returns (applied weights, errors per adapter, milliseconds)."""
        errors: dict[str, str] = {}
        components = api.pipeline_components(self.pipe)
        wanted: dict[str, dict[str, float]] = {}
        started = time.perf_counter()
        stale = False
        for choice in choices:
            try:
                adapter = self.library.load(choice.name)
                stale |= self._loaded.get(choice.name) not in (None, id(adapter))
                weights = choice.weights(family_of(self.pipe))
                wanted[choice.name] = {c: w for c, w in weights.items() if c in adapter.components}
            except (StudioError, AdapterFileError) as err:
                errors[choice.name] = str(err)
        if wanted == self._applied and not stale:
            return self._applied, errors, 0.0
        api.unfuse_gralora(self.pipe)
        for name in list(wanted):
            try:
                self._ensure_loaded(name)
            except (StudioError, AdapterFileError, api.GraloraAdapterError) as err:
                errors[name] = str(err)
                del wanted[name]
        if wanted:
            weights = [{c: w for c, w in per.items() if c in components} for per in wanted.values()]
            api.set_gralora_adapters(self.pipe, list(wanted), weights)
            api.fuse_gralora(self.pipe)
        elif self._loaded:
            api.set_gralora_adapters(self.pipe, [])
        self._applied = wanted
        self.switches += 1
        elapsed = (time.perf_counter() - started) * 1e3
        denoiser = family_of(self.pipe).denoiser
        described = (
            ", ".join(f"{n}:{w.get(denoiser, next(iter(w.values()), 0)):g}" for n, w in wanted.items()) or "none"
        )
        logger.info(f"adapter switch to [{described}] took {elapsed:.1f} ms")
        return wanted, errors, elapsed

    # generation
    def _scheduler(self, name: str):
        if name not in self._schedulers:
            import diffusers

            class_name, extra = self.schedulers[name]
            self._schedulers[name] = getattr(diffusers, class_name).from_config(self.pipe.scheduler.config, **extra)
        return self._schedulers[name]

    def cancel(self) -> None:
        """Ask the running generation to stop after its current denoising step."""
        self._cancel.set()

    def generate(self, request: GenerationRequest, progress=None) -> GenerationResult:
        check_request(request, self.limits, self.schedulers)
        prompt, tags = parse_prompt_adapters(request.prompt)
        choices = merge_adapter_choices(request.adapters, tags)
        seed = secrets.randbelow(2**31) if request.random_seed else int(request.seed)
        with self._lock:
            self._cancel.clear()
            applied, errors, switch_ms = self.apply(choices)
            self.pipe.scheduler = self._scheduler(request.scheduler)
            total = request.steps * request.num_images
            done = [0]

            def on_step(pipe, step, timestep, kwargs):
                done[0] += 1
                if progress is not None:
                    progress(done[0] / total)
                if self._cancel.is_set():
                    pipe._interrupt = True
                return kwargs

            images = []
            for i in range(request.num_images):
                generator = torch.Generator().manual_seed((seed + i) % SEED_RANGE)
                out = self.pipe(
                    prompt,
                    negative_prompt=request.negative_prompt or None,
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance_scale,
                    width=request.width,
                    height=request.height,
                    generator=generator,
                    callback_on_step_end=on_step,
                    output_type="np",
                )
                if self._cancel.is_set():
                    return GenerationResult([], seed, prompt, applied, errors, "", switch_ms, cancelled=True)
                pixels = out.images[0]
                if not np.isfinite(pixels).all():  # shown, it would be a black square
                    raise StudioError(
                        f"Image {i + 1} came out as NaN or infinite values (typically SDXL's VAE overflowing in "
                        "float16): nothing was saved; run in float32 or use the fp16-fix VAE."
                    )
                images.append(Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8)))
        parameters = self.parameters_text(request, prompt, seed, applied)
        return GenerationResult(images, seed, prompt, applied, errors, parameters, switch_ms)

    def parameters_text(self, request: GenerationRequest, prompt: str, seed: int, applied) -> str:
        adapters = ", ".join(
            f"{name}:" + "/".join(f"{c}={w:g}" for c, w in weights.items()) for name, weights in applied.items()
        )
        lines = [prompt]
        if request.negative_prompt:
            lines.append(f"Negative prompt: {request.negative_prompt}")
        lines.append(
            f"Steps: {request.steps}, Sampler: {request.scheduler}, CFG scale: {request.guidance_scale:g}, "
            f"Seed: {seed}, Size: {request.width}x{request.height}, Model: {self.base_name}, "
            f"GraLoRA: [{adapters}]"
        )
        return "\n".join(lines)

    def save_png(self, image: Image.Image, path: str | Path, result: GenerationResult, index: int) -> Path:
        """Write ``image`` as PNG with the settings in its text chunk (``parameters`` and JSON ``gralora``)."""
        info = PngInfo()
        info.add_text("parameters", result.parameters)
        info.add_text(
            "gralora",
            json.dumps(
                {
                    "prompt": result.prompt,
                    "seed": (result.seed + index) % SEED_RANGE,
                    "adapters": result.applied,
                    "base": self.base_name,
                }
            ),
        )
        path = Path(path)
        write_file_atomically(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
        return path

    def xy_grid(
        self,
        request: GenerationRequest,
        x_adapter: str,
        x_weights: list[float],
        y_adapter: str | None = None,
        y_weights: list[float] | None = None,
    ) -> tuple[Image.Image, list[list[Image.Image]]]:
        """The same prompt and seed over weights of one adapter (x) and optionally a second (y), labelled."""
        if not x_weights:
            raise StudioError("Give at least one X weight.")
        y_values = y_weights if (y_adapter and y_weights) else [None]
        cells_wanted = len(x_weights) * len(y_values)
        if cells_wanted > self.limits.max_grid_cells:
            raise StudioError(
                f"A grid of {cells_wanted} cells is too large: use at most {self.limits.max_grid_cells} (X values "
                "times Y values)."
            )
        check_request(request, self.limits, self.schedulers)
        for value in x_weights:
            check_weight(f"The X weight of {x_adapter}", value, self.limits)
        for value in y_values if y_values != [None] else []:
            check_weight(f"The Y weight of {y_adapter}", value, self.limits)
        base_rows = [c for c in request.adapters if c.enabled and _adapter_name(c.name) not in (x_adapter, y_adapter)]
        cells: list[list[Image.Image]] = []
        for yw in y_values:
            row = []
            for xw in x_weights:
                extra = [AdapterChoice(x_adapter, xw)] + ([AdapterChoice(y_adapter, yw)] if yw is not None else [])
                single = GenerationRequest(**{**asdict(request), "adapters": [], "num_images": 1, "random_seed": False})
                single.adapters = base_rows + extra
                result = self.generate(single)
                if result.errors:
                    raise StudioError("; ".join(result.errors.values()))
                row.append(result.images[0])
            cells.append(row)
        return label_grid(cells, x_adapter, x_weights, y_adapter, y_values), cells


def label_grid(cells, x_name: str, x_values, y_name: str | None, y_values) -> Image.Image:
    """Paste images into a grid with the weights written along the top and the left."""
    w, h = cells[0][0].size
    pad_top, pad_left = 24, 90 if y_name else 0
    grid = Image.new("RGB", (pad_left + w * len(x_values), pad_top + h * len(cells)), "white")
    draw = ImageDraw.Draw(grid)
    for j, value in enumerate(x_values):
        draw.text((pad_left + j * w + 4, 6), f"{x_name}: {value:g}", fill="black")
    for i, row in enumerate(cells):
        if y_name:
            draw.text((4, pad_top + i * h + h // 2), f"{y_name}: {y_values[i]:g}", fill="black")
        for j, image in enumerate(row):
            grid.paste(image, (pad_left + j * w, pad_top + i * h))
    return grid
