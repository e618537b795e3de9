"""GraLoRA -> ordinary LoRA, for every tool that loads only LoRA (diffusers' load_lora_weights, ComfyUI, A1111).

A GraLoRA delta of rank r with k blocks (plus hybrid_r) has rank at most k*r + hybrid_r, so it is an ordinary LoRA of
that rank with no loss (``exact``), or an SVD-truncated one of a smaller rank (``rank=N``) or of the smallest rank
keeping a share of the singular-value energy (``energy=0.99``). The SVD is PEFT's own
(``peft.tuners.lora.conversion.convert_to_lora``), run on PEFT GraLoRA layers rebuilt from the file around base layers
that take no memory, so no base weights are needed. What PEFT's API does not offer is added here: the lossless rank
per layer (layers are grouped by it, one ``convert_to_lora`` call per group) and the error of what is written (each
layer's dense delta compared with the exported ``B @ A`` in the output dtype).

Two key layouts:

* ``diffusers``: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (and ``text_encoder.``, ``text_encoder_2.``),
  scale 1, with diffusers' ``lora_adapter_metadata`` so layers of different ranks keep scale 1 in every diffusers
  version that reads it;
* ``kohya`` (AUTOMATIC1111, ComfyUI, sd-scripts): ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (scale 1: alpha = rank where ranks are uniform, see ``lora_tensors``), ``lora_te1_`` / ``lora_te2_``
  for SDXL's text encoders. SDXL UNet modules are
  named as in the original (LDM/SGM) UNet, e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``; the
  block numbering is derived from the UNet config (``SgmNaming``); SD 1.x keeps diffusers' module names and
  ``lora_te_``, as kohya's SD 1.x scripts do.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import GraloraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora.conversion import convert_to_lora
from safetensors.torch import save_file
from torch import nn

from .bases import resolve_base
from .families import ALL_COMPONENTS as COMPONENTS
from .families import family_named, family_of_components
from .fs import write_file_atomically
from .io import AdapterFile, looks_like_conv, read_adapter
from .layers import gralora_layers
from .names import CLIP_PREFIX, resolve_module_name
from .original_layout import LayoutError, NotInUNetLayout, SgmNaming, original_state_dict
from .peft_ops import check_fits

LAYOUTS = ("diffusers", "kohya")  # LoRA layouts; "comfyui" (GraLoRA factors, no SVD) is export_comfyui
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# The block layout of SDXL's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): used for kohya names
# when neither --base nor the adapter's recorded base can be read.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}


class ExportError(ValueError):
    """The export cannot be done as asked; the message says why and what to do."""


@dataclass
class ComponentReport:
    """How well one component's LoRA reproduces its GraLoRA delta."""

    component: str
    layers: int
    ranks: list[int]  # the LoRA rank of each layer
    relative_error: float  # sqrt(sum ||D - B A||_F^2 / sum ||D||_F^2) over the component's layers
    worst_layer_error: float  # max over layers of ||D - B A||_F / ||D||_F

    @property
    def rank_text(self) -> str:
        low, high = min(self.ranks), max(self.ranks)
        return str(low) if low == high else f"{low}-{high}"


@dataclass
class ExportResult:
    path: Path
    layout: str
    components: list[ComponentReport]
    unet_naming: str = ""  # kohya only: which UNet config the block names were derived from


# --- GraLoRA -> LoRA factors ---------------------------------------------------------------------------------------


def _rebuild(adapter: AdapterFile, component: str, modules: list[str]) -> nn.Module:
    """A module tree with stand-in Linear layers at ``modules`` carrying the component's PEFT GraLoRA adapter."""
    sd = adapter.state_dicts[component]
    root = nn.Module()
    for name in modules:
        a, b = sd[f"{name}.gralora_A"], sd[f"{name}.gralora_B"]
        parent = root
        parts = name.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        in_f, out_f = a.shape[0] * a.shape[1], b.shape[0] * b.shape[2]
        layer = nn.Linear(in_f, out_f, bias=False, device="meta")
        # A stand-in base weight that takes no memory (a broadcast zero): PEFT only reads its shape and device.
        layer.weight = nn.Parameter(torch.zeros(1).expand(out_f, in_f), requires_grad=False)
        parent.add_module(parts[-1], layer)
    cfg = adapter.configs[component]
    config = GraloraConfig(
        r=cfg.r, alpha=cfg.alpha, gralora_k=cfg.gralora_k, hybrid_r=cfg.hybrid_r, target_modules=modules
    )
    inject_adapter_in_model(config, root, low_cpu_mem_usage=True)
    wanted = {k: v.float() for k, v in sd.items() if k.rsplit(".gralora_", 1)[0] in modules}
    set_peft_model_state_dict(root, wanted, low_cpu_mem_usage=True)
    return root


# A ResNet block's two convolutions in diffusers' UNets (3 x 3 in every SD 1.x / SDXL UNet): what the
# ``attention-conv`` target adapts besides linear layers.
_RESNET_CONV = re.compile(r"(?:^|\.)resnets\.\d+\.conv[12]$")


def conv_kernels(
    adapter: AdapterFile, models: Mapping[str, nn.Module] | None = None
) -> dict[tuple[str, str], tuple[int, int]]:
    """(component, module) -> (kh, kw) for every 2-D convolution ``adapter`` adapts (the file stores a convolution's
    factors over its flattened weight [out, in * kh * kw], so the kernel is not in its shapes). Read from ``models``
    (the base's modules, e.g. ``base_skeleton``) where they have the component, else from the kernels the file
    recorded when it was saved, else from diffusers' UNet layout: a ResNet block's ``conv1`` / ``conv2`` is 3 x 3; any
    other convolution-like name then needs the base."""
    kernels = {}
    recorded = adapter.conv_kernels()
    for component in adapter.components:
        model = (models or {}).get(component)
        named = dict(model.named_modules()) if model is not None else None
        for module in adapter.module_names(component):
            if (component, module) in recorded and named is None:
                kernels[component, module] = recorded[component, module]
            elif named is not None:
                found = named.get(resolve_module_name(named, module) or "")
                if isinstance(found, nn.Conv2d):
                    kernels[component, module] = tuple(found.kernel_size)
            elif component == "unet" and _RESNET_CONV.search(module):
                kernels[component, module] = (3, 3)
            elif looks_like_conv(module):
                raise ExportError(
                    f"{adapter.source} adapts {component}.{module}, whose kernel size only the base model can tell; "
                    "pass the base with --base."
                )
    return kernels


def lossless_ranks(adapter: AdapterFile, component: str) -> dict[str, tuple[int, int, int]]:
    """Per adapted module of ``component``: (lossless LoRA rank min(k*r + hybrid_r, in, out), in, out)."""
    cfg = adapter.configs[component]
    sd = adapter.state_dicts[component]
    out = {}
    for name in adapter.module_names(component):
        a, b = sd[f"{name}.gralora_A"], sd[f"{name}.gralora_B"]
        in_f, out_f = a.shape[0] * a.shape[1], b.shape[0] * b.shape[2]
        out[name] = (min(cfg.gralora_k * cfg.r + cfg.hybrid_r, in_f, out_f), in_f, out_f)
    return out


def _check_method(rank: int | None, energy: float | None, exact: bool) -> None:
    if sum((rank is not None, energy is not None, bool(exact))) != 1:
        raise ExportError("Choose exactly one of --rank N, --energy F or --exact.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ExportError(f"--rank must be a positive integer, got {rank}; use a rank of 1 or more, or --exact.")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ExportError(f"--energy must be in (0, 1], got {energy}; e.g. --energy 0.99 keeps 99% of the energy.")


def to_lora(
    adapter: AdapterFile | str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    exact: bool = False,
    dtype: torch.dtype = torch.float32,
    kernels: Mapping[tuple[str, str], tuple[int, int]] | None = None,
) -> tuple[dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], list[ComponentReport]]:
    """Per component and module, LoRA factors (A [rank, in], B [out, rank], scale baked in, in ``dtype``) and a
    report of the relative Frobenius error of ``B @ A`` against the GraLoRA delta, measured on the ``dtype`` factors.
    A 2-D convolution's factors are a LoCon pair, as PEFT's LoRA and kohya store it: A [rank, in, kh, kw] (a kh x kw
    convolution) and B [out, rank, 1, 1]; ``kernels`` ((component, module) -> (kh, kw)) defaults to
    ``conv_kernels(adapter)``.

    Exactly one of ``rank`` (the same rank everywhere), ``energy`` (per layer, the smallest rank keeping this share of
    the squared singular values) or ``exact`` (the lossless rank k*r + hybrid_r, capped by the layer's size).
    """
    _check_method(rank, energy, exact)
    if not isinstance(adapter, AdapterFile):
        adapter = read_adapter(adapter)
    if kernels is None:
        kernels = conv_kernels(adapter)
    layer_ranks = {component: lossless_ranks(adapter, component) for component in adapter.components}
    if rank is not None:
        for component, layers in layer_ranks.items():
            for name, (_, in_f, out_f) in layers.items():
                if rank > min(in_f, out_f):
                    raise ExportError(
                        f"--rank {rank} is larger than {component}.{name} ({out_f} x {in_f}); use at most "
                        f"{min(in_f, out_f)}, or --exact."
                    )
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    reports = []
    for component, layers in layer_ranks.items():
        groups: dict[int | float, list[str]] = {}
        for name, (lossless, _, _) in layers.items():
            key = rank if rank is not None else lossless if exact else float(energy)
            groups.setdefault(key, []).append(name)
        factors[component] = {}
        errors: dict[str, tuple[float, float]] = {}  # module -> (||D - BA||^2, ||D||^2)
        for group_rank, modules in groups.items():
            root = _rebuild(adapter, component, modules)
            _, lora_sd = convert_to_lora(root, group_rank)
            for name, layer in gralora_layers(root):
                a = lora_sd[f"{name}.lora_A.weight"].to(dtype).contiguous()
                b = lora_sd[f"{name}.lora_B.weight"].to(dtype).contiguous()
                delta = layer.get_delta_weight("default").double()
                residual = delta - b.double() @ a.double()
                errors[name] = (residual.square().sum().item(), delta.square().sum().item())
                if (component, name) in kernels:  # a LoCon pair: kh x kw down, 1 x 1 up
                    a, b = a.reshape(a.shape[0], -1, *kernels[component, name]), b[:, :, None, None].contiguous()
                factors[component][name] = (a, b)
        num, den = sum(e for e, _ in errors.values()), sum(d for _, d in errors.values())
        reports.append(
            ComponentReport(
                component=component,
                layers=len(layers),
                ranks=[factors[component][n][0].shape[0] for n in layers],
                relative_error=math.sqrt(num / den) if den else 0.0,
                worst_layer_error=max((math.sqrt(e / d) if d else 0.0) for e, d in errors.values()),
            )
        )
        factors[component] = {n: factors[component][n] for n in layers}  # module order, not group order
    return factors, reports


# --- kohya names -----------------------------------------------------------------------------------------------------


def kohya_prefix(component: str, family: str) -> str:
    """The family's kohya prefix: ``lora_unet`` / ``lora_te1`` / ``lora_te2`` on SDXL, ``lora_te`` for SD 1.x."""
    prefixes = family_named(family).kohya_prefixes
    if component not in prefixes:
        raise ExportError(
            f"The kohya layout has no name for {family}'s component {component!r}; export with --to diffusers."
        )
    return prefixes[component]


def kohya_module_name(component: str, module: str, naming: SgmNaming | None, family: str = "sdxl") -> str:
    """The kohya LoRA name of an adapted module, e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``
    or ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``. ``naming`` (SDXL only) maps UNet blocks."""
    prefix = kohya_prefix(component, family)
    if component == "unet":
        path = naming.name(module) if family == "sdxl" and naming is not None else module
    else:
        path = module if module.startswith(CLIP_PREFIX) else CLIP_PREFIX + module
    return f"{prefix}_{path.replace('.', '_')}"


# --- the base model's layout -------------------------------------------------------------------------------------


@dataclass
class BaseLayout:
    """What an export needs to know of the base: where it came from, its UNet config and its family."""

    source: str
    unet_config: Mapping[str, Any] | None
    family: str = "sdxl"  # a ``families`` name: "sdxl" (SGM UNet names), "sd1" or "sd3"
    models: dict[str, nn.Module] = field(default_factory=dict)  # meta-device skeletons, for the shape check


def base_skeleton(base: str | os.PathLike, *, local_files_only: bool = False) -> dict[str, nn.Module]:
    """The adaptable models of a diffusers pipeline (UNet / transformer, text encoders), built from their configs on
    the meta device: module names and shapes, with no weights read or allocated."""
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    text = str(base)
    if not Path(text).exists() and (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1):
        raise ExportError(f"The base model folder {base} does not exist; give a diffusers pipeline folder or a hub id.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hub-client deprecation chatter about download options
            index = DiffusionPipeline.load_config(text, local_files_only=local_files_only)
        models = {}
        for component in COMPONENTS:
            library, class_name = (index.get(component) or [None, None])[:2]
            cls = getattr({"diffusers": diffusers, "transformers": transformers}.get(library), class_name or "", None)
            if cls is None:
                continue
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if library == "diffusers":
                    config = cls.load_config(text, subfolder=component, local_files_only=local_files_only)
                    models[component] = cls.from_config(config)
                else:
                    config = cls.config_class.from_pretrained(
                        text, subfolder=component, local_files_only=local_files_only
                    )
                    models[component] = cls(config)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(
            f"Cannot read the base model {base} ({first}); give a diffusers pipeline folder or a downloaded hub id."
        ) from None
    if not models:
        raise ExportError(f"{base} has no UNet, transformer or text encoder; give a diffusers pipeline folder.")
    return models


def _layout_from_models(source: str, models: dict[str, nn.Module]) -> BaseLayout:
    unet = models.get("unet")
    unet_config = dict(unet.config) if unet is not None else None
    family = family_of_components(models).name
    if family == "sd1" and (unet_config or {}).get("addition_embed_type") == "text_time":
        family = "sdxl"  # an SDXL UNet on its own
    return BaseLayout(source, unet_config, family, models)


# The text embedding width the UNet's cross-attention reads (attn2.to_k / to_v inputs) in the published bases: CLIP-L
# for SD 1.x, OpenCLIP-H for SD 2.x, both encoders concatenated for SDXL.
_CROSS_WIDTHS = {768: "sd1", 1024: "sd1", 2048: "sdxl"}


def family_from_tensors(adapter: AdapterFile) -> str | None:
    """The base family an adapter was trained for, where its own tensors tell (``sd3``, ``sdxl`` or ``sd1``; SD 2.x
    counts as ``sd1``, whose kohya names it shares), else None: a transformer or a third text encoder is SD3's; a
    second text encoder, or cross-attention projections reading 2048 channels, SDXL's; 768 or 1024, SD 1.x / 2.x's; a
    single text encoder alone of those widths, SD 1.x / 2.x's too."""
    if {"transformer", "text_encoder_3"} & set(adapter.components):
        return "sd3"
    if "text_encoder_2" in adapter.components:
        return "sdxl"
    if "unet" not in adapter.components:
        return _family_of_text_encoder_alone(adapter)
    families = {_CROSS_WIDTHS.get(w) for w in _input_widths(adapter, "unet", ("attn2.to_k", "attn2.to_v"))}
    return families.pop() if len(families) == 1 else None


_READS_HIDDEN_WIDTH = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")


def _input_widths(adapter: AdapterFile, component: str, suffixes: tuple[str, ...]) -> set[int]:
    """The input widths of ``component``'s adapted modules whose names end with one of ``suffixes``."""
    tensors = adapter.state_dicts[component]
    shapes = [tensors[f"{m}.gralora_A"].shape for m in adapter.module_names(component) if m.endswith(suffixes)]
    return {k * block for k, block, _ in shapes}  # A is [k, in / k, r]


def _family_of_text_encoder_alone(adapter: AdapterFile) -> str | None:
    """SD 1.x / 2.x for an adapter on one text encoder of CLIP-L's 768 or OpenCLIP-H's 1024 channels, else None.
    768 is also SDXL's first encoder, but SDXL trainers (ours, diffusers', kohya's) adapt both encoders or none."""
    if set(adapter.components) != {"text_encoder"}:
        return None
    widths = _input_widths(adapter, "text_encoder", _READS_HIDDEN_WIDTH)
    return "sd1" if len(widths) == 1 and widths <= {768, 1024} else None


def resolve_base_layout(adapter: AdapterFile, base: str | os.PathLike | None = None) -> BaseLayout:
    """The base whose layout names the export: ``base`` if given, else the adapter's recorded base if it can be read
    offline (a local folder or a downloaded hub id), else the family its tensors tell (``family_from_tensors``: SD 1.x
    names need no UNet config), else SDXL's published UNet layout. The adapter is checked against a base that could
    be read (module names and shapes)."""
    if base is not None:
        models = base_skeleton(base)
        source = str(base)
    else:
        recorded = adapter.base_model
        models, source = None, f"the recorded base {recorded}"
        if recorded:
            try:  # a name from this project's registry ("toy-world") reads the base it names
                models = base_skeleton(resolve_base(recorded), local_files_only=True)
            except (ExportError, OSError):  # a registered base missing or unbuildable here: read the file instead
                models = None
        if models is None:
            family = family_from_tensors(adapter)
            if family == "sd1":
                told = "the adapter's cross-attention width" if "unet" in adapter.components else (
                    "the width of the adapter's one text encoder")  # fmt: skip
                return BaseLayout(f"SD 1.x / 2.x (told by {told}; pass --base to read the base itself)", None, "sd1")
            if family == "sd3":
                return BaseLayout("SD3 (the adapter adapts a transformer)", None, "sd3")
            return BaseLayout("SDXL (built-in layout; pass --base to read another)", SDXL_UNET_CONFIG, "sdxl")
    check_fits(models, adapter)
    return _layout_from_models(source, models)


# --- writing -----------------------------------------------------------------------------------------------------


def kohya_names(adapter: AdapterFile, layout: BaseLayout) -> dict[tuple[str, str], str]:
    """(component, module) -> kohya name for every adapted module; raises before anything is computed or written."""
    naming = SgmNaming.from_unet_config(layout.unet_config) if layout.unet_config else None
    if naming is None and "unet" in adapter.components and layout.family == "sdxl":
        raise ExportError(f"{layout.source} has no UNet config to name the UNet blocks by; pass --base.")
    names = {}
    for component in adapter.components:
        kohya_prefix(component, layout.family)
        for module in adapter.module_names(component):
            try:
                names[component, module] = kohya_module_name(component, module, naming, layout.family)
            except NotInUNetLayout as err:
                raise ExportError(
                    f"{adapter.source}: {err} of {layout.source}, so the adapter was made for another base; "
                    "pass the adapter's base model with --base."
                ) from None
            except LayoutError as err:
                raise ExportError(f"{adapter.source}: {err}; export with --to diffusers instead.") from None
    clashes = [n for n, c in Counter(names.values()).items() if c > 1]
    if clashes:
        raise ExportError(f"Two modules share the kohya name {clashes[0]!r}; export with --to diffusers.")
    return names


def diffusers_metadata(factors: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata``: per component the LoRA config (r, alpha = r, rank/alpha patterns for
    layers of another rank), so scale stays 1 in every layer. Text-encoder names drop ``text_model.`` so they match
    CLIP with and without that wrapper (PEFT matches patterns as name suffixes)."""
    meta: dict[str, Any] = {}
    for component, modules in factors.items():
        strip = CLIP_PREFIX if component.startswith("text_encoder") else ""
        ranks = {m.removeprefix(strip) if strip else m: a.shape[0] for m, (a, _) in modules.items()}
        common = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {m: r for m, r in ranks.items() if r != common}
        meta.update(
            {
                f"{component}.r": common,
                f"{component}.lora_alpha": common,
                f"{component}.rank_pattern": pattern,
                f"{component}.alpha_pattern": dict(pattern),
                f"{component}.target_modules": sorted(ranks),
            }
        )
    return meta


def lora_tensors(
    factors: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
    layout: str,
    names: Mapping[tuple[str, str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """Flat LoRA tensors in the ``diffusers`` or ``kohya`` layout; every loader computes ``B @ A`` (scale 1).

    kohya: ``.alpha`` is the component's most common rank, so it equals the rank wherever the ranks are uniform
    (``--rank``, and ``--exact`` on a uniform model). A layer of another rank (``--energy``) keeps that alpha and
    carries rank/alpha in its up factor: A1111, ComfyUI and sd-scripts scale each layer by its own alpha/rank, while
    diffusers' kohya loader uses one alpha per component and mis-scales files whose alphas differ between layers.
    """
    out = {}
    for component, modules in factors.items():
        if layout == "diffusers":
            for module, (a, b) in modules.items():
                out[f"{component}.{module}.lora_A.weight"] = a
                out[f"{component}.{module}.lora_B.weight"] = b
            continue
        alpha = Counter(a.shape[0] for a, _ in modules.values()).most_common(1)[0][0]
        for module, (a, b) in modules.items():
            key = names[component, module]
            out[f"{key}.lora_down.weight"] = a
            out[f"{key}.lora_up.weight"] = b if a.shape[0] == alpha else (b.double() * (a.shape[0] / alpha)).to(b.dtype)
            out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=a.dtype)
    return out


def _read_for_export(
    adapter: AdapterFile | str | os.PathLike, out_path: str | os.PathLike, dtype: torch.dtype | str
) -> tuple[AdapterFile, Path, torch.dtype]:
    """The checks every export makes before any work (a ``.safetensors`` output that is not the adapter itself, a
    known dtype), then the adapter read and validated."""
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ExportError(f"The output must end in .safetensors, got {out_path.name}; rename it.")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    if not isinstance(adapter, AdapterFile):
        source = Path(adapter)
        if source.exists() and out_path.exists() and out_path.resolve() == source.resolve():
            raise ExportError(f"The output {out_path} is the adapter itself; choose another output name.")
        adapter = read_adapter(source)
    return adapter, out_path, dtype


def export_lora(
    adapter: AdapterFile | str | os.PathLike,
    out_path: str | os.PathLike,
    layout: str = "diffusers",
    *,
    rank: int | None = None,
    energy: float | None = None,
    exact: bool = False,
    base: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> ExportResult:
    """Write ``adapter`` as a LoRA ``.safetensors`` in ``layout`` (``diffusers`` or ``kohya``); return the report.

    ``base`` (a diffusers folder or hub id) checks that the adapter fits it and, for kohya, names the UNet blocks by
    its config; without it the adapter's recorded base is used if readable offline, else SDXL's layout. Every check
    runs before the SVD; the file is written under a temporary name and renamed, so it is never half-written.
    """
    if layout not in LAYOUTS:
        raise ExportError(f"Unknown layout {layout!r}; use diffusers or kohya.")
    _check_method(rank, energy, exact)
    adapter, out_path, dtype = _read_for_export(adapter, out_path, dtype)
    names = None
    naming_source = ""
    models = None
    if layout == "kohya":
        base_layout = resolve_base_layout(adapter, base)
        names = kohya_names(adapter, base_layout)
        naming_source = base_layout.source
        models = base_layout.models
    elif base is not None:
        models = base_skeleton(base)
        check_fits(models, adapter)
    kernels = conv_kernels(adapter, models)
    factors, reports = to_lora(adapter, rank=rank, energy=energy, exact=exact, dtype=dtype, kernels=kernels)
    tensors = lora_tensors(factors, layout, names)
    metadata = {
        "format": "pt",
        "source": "gralora-diffusion export",
        "gralora_adapter": Path(adapter.source).name,
        "base_model": adapter.base_model,
        "ranks": json.dumps({r.component: r.rank_text for r in reports}),
        "relative_errors": json.dumps({r.component: r.relative_error for r in reports}),
    }
    if layout == "diffusers":
        metadata["lora_adapter_metadata"] = json.dumps(diffusers_metadata(factors), sort_keys=True)
    else:
        ranks = {rk for r in reports for rk in r.ranks}
        dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
        metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": dim})
    for key in ("trigger_prompt", "steps"):
        if adapter.metadata.get(key):
            metadata[key] = adapter.metadata[key]
    write_file_atomically(out_path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return ExportResult(out_path, layout, reports, naming_source)


def comfyui_tensors(adapter: AdapterFile, names: Mapping[tuple[str, str], str], dtype: torch.dtype) -> dict:
    """The adapter's own factors under kohya module names, as the ComfyUI node (``integrations/comfyui``) reads them:
    ``<name>.gralora_A`` / ``.gralora_B`` (and the hybrid ``.gralora_A_general.weight`` / ``.gralora_B_general.weight``)
    and a per-layer ``<name>.alpha``, so ComfyUI scales each layer by alpha / (r + hybrid_r) as PEFT does."""
    out = {}
    for component in adapter.components:
        cfg = adapter.configs[component]
        sd = adapter.state_dicts[component]
        for module in adapter.module_names(component):
            key = names[component, module]
            for suffix in ("gralora_A", "gralora_B", "gralora_A_general.weight", "gralora_B_general.weight"):
                if f"{module}.{suffix}" in sd:
                    out[f"{key}.{suffix}"] = sd[f"{module}.{suffix}"].to(dtype).contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(cfg.alpha), dtype=torch.float32)  # exact in any --dtype
    return out


def export_comfyui(
    adapter: AdapterFile | str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> ExportResult:
    """Write ``adapter`` for ComfyUI with the GraLoRA node: its factors as they are (no SVD, no loss, the adapter's
    size) under the kohya module names ComfyUI maps. ``base`` names the UNet blocks as for ``export_lora``."""
    adapter, out_path, dtype = _read_for_export(adapter, out_path, dtype)
    base_layout = resolve_base_layout(adapter, base)
    if not family_named(base_layout.family).kohya_prefixes:
        raise ExportError(
            "--to comfyui names layers as kohya does, which exists for SD 1.x and SDXL only, not "
            f"{base_layout.family}; export --to diffusers instead."
        )
    names = kohya_names(adapter, base_layout)
    tensors = comfyui_tensors(adapter, names, dtype)
    metadata = {
        "format": "pt",
        "source": "gralora-diffusion export",
        "gralora_adapter": Path(adapter.source).name,
        "base_model": adapter.base_model,
        "ss_network_module": "gralora",
    }
    for key in ("trigger_prompt", "steps"):
        if adapter.metadata.get(key):
            metadata[key] = adapter.metadata[key]
    write_file_atomically(out_path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    reports = [
        ComponentReport(c, len(adapter.module_names(c)), [adapter.configs[c].r], 0.0, 0.0) for c in adapter.components
    ]
    return ExportResult(out_path, "comfyui", reports, base_layout.source)


def save_single_file(pipe: Any, out_path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write an SDXL pipeline (adapters fused and unloaded) as one ``.safetensors`` checkpoint in the original
    layout (``original_layout``): what AUTOMATIC1111, Forge, ComfyUI and diffusers' ``from_single_file`` load. Every
    tensor is checked finite first; the file is written under a temporary name, fsynced and renamed."""
    from .families import family_of

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ExportError(f"The output must end in .safetensors, got {out_path.name}; rename it.")
    if family_of(pipe).name != "sdxl":
        raise ExportError("Single-file checkpoints are written for SDXL pipelines only; save a diffusers folder.")
    try:
        tensors = original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    except LayoutError as err:
        raise ExportError(str(err)) from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ExportError(f"{name} holds NaN or infinite values; nothing was written.")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", "modelspec.architecture": "stable-diffusion-xl-v1-base", **(metadata or {})}
    write_file_atomically(out_path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return out_path
