"""The GraLoRA adapter file: one ``.safetensors`` holding every pipeline component, plus PEFT-folder interop.

Layout of a file written by ``save_adapter_file``:

* tensors ``<component>.<module path>.<param>``, where component is ``unet``, ``text_encoder`` or
  ``text_encoder_2`` (any diffusers component name is allowed) and ``<module path>.<param>`` is exactly PEFT's key
  for a GraLoRA parameter with the adapter name removed (``gralora_A`` [k, in/k, r], ``gralora_B`` [k, r, out/k],
  and for hybrid adapters ``gralora_A_general.weight`` / ``gralora_B_general.weight``);
* header metadata (strings): ``format`` = ``gralora-diffusion``, ``format_version``, ``gralora_config`` (JSON:
  component -> PEFT ``GraloraConfig`` fields), ``base_model``, and any extra user keys (trigger prompt, steps...).

Only safetensors are read; pickle files (``.bin``, ``.pt``, ``.ckpt``) are refused, never loaded. This module knows
nothing of diffusers pipelines: it turns bytes into validated tensors and configs and back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import GraloraConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .families import ALL_COMPONENTS as COMPONENTS
from .fs import write_directory_atomically, write_file_atomically
from .layers import GraloraConv2d, gralora_layers
from .names import canonical_state_dict
from .peft_ops import GraloraAdapterError, adapter_state_dict, gralora_config_of

FORMAT_NAME = "gralora-diffusion"
FORMAT_VERSION = "1"
RESERVED_METADATA_KEYS = ("format", "format_version", "gralora_config", "base_model")
# Metadata key of the adapted convolutions' kernel sizes: JSON {component: {module: [kh, kw]}} (absent: none).
CONV_KERNELS_KEY = "conv_kernels"
PARAM_SUFFIXES = ("gralora_A", "gralora_B", "gralora_A_general.weight", "gralora_B_general.weight")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


class AdapterFileError(ValueError):
    """An adapter file or state dict cannot be used; the message says why and what to do."""


@dataclass
class AdapterFile:
    """A GraLoRA adapter in memory: per component, PEFT-named tensors and the PEFT config."""

    state_dicts: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, GraloraConfig]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<state dict>"

    @property
    def base_model(self) -> str:
        return self.metadata.get("base_model", "")

    @property
    def components(self) -> list[str]:
        return list(self.state_dicts)

    def module_names(self, component: str) -> list[str]:
        """The adapted module paths of ``component``, from the tensor names."""
        return sorted({split_param_key(key)[0] for key in self.state_dicts[component]})

    def conv_kernels(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(component, module) -> (kh, kw) of every adapted 2-D convolution, as recorded when the file was saved
        (metadata ``conv_kernels``; empty for files without it). A convolution's factors are stored over its
        flattened weight [out, in * kh * kw], so the kernel is not in the tensor shapes."""
        text = self.metadata.get(CONV_KERNELS_KEY)
        if not text:
            return {}
        try:
            recorded = json.loads(text)
            return {(c, m): (int(k[0]), int(k[1])) for c, modules in recorded.items() for m, k in modules.items()}
        except (ValueError, TypeError, AttributeError, IndexError, KeyError):
            raise AdapterFileError(
                f"{self.source}: the metadata {CONV_KERNELS_KEY!r} is not a JSON object of component -> module -> "
                "[kh, kw]; the file is damaged."
            ) from None

    def conv_modules(self) -> set[tuple[str, str]]:
        """(component, module) of every adapted 2-D convolution: those the file recorded kernels for, or, in files
        saved before kernels were recorded, the modules diffusers names ``conv*`` (``looks_like_conv``)."""
        recorded = self.conv_kernels()
        if recorded:
            return set(recorded)
        return {(c, m) for c in self.components for m in self.module_names(c) if looks_like_conv(m)}

    def num_parameters(self) -> int:
        return sum(t.numel() for sd in self.state_dicts.values() for t in sd.values())


def split_param_key(key: str) -> tuple[str, str]:
    """``"a.b.to_q.gralora_A"`` -> (``"a.b.to_q"``, ``"gralora_A"``); raises if it is not a GraLoRA key."""
    for suffix in PARAM_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise AdapterFileError(f"Tensor {key!r} is not a GraLoRA parameter (expected one of {PARAM_SUFFIXES}).")


def config_to_dict(config: GraloraConfig) -> dict:
    """The JSON-able fields of a ``GraloraConfig`` (target modules as a sorted list)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, set):
            value = sorted(value)
        if hasattr(value, "value"):  # enums such as peft_type
            value = value.value
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[f.name] = value
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_config_values(values, component: str, source: str) -> None:
    """A saved component config is an object with typed, in-range GraLoRA settings; else one sentence."""
    where = f"{source}: the gralora_config of {component!r}"
    if not isinstance(values, dict):
        raise AdapterFileError(f"{where} is {type(values).__name__}, not an object; the file is damaged.")
    rules = (
        ("r", lambda v: _is_int(v) and v >= 1, "a positive integer"),
        ("gralora_k", lambda v: _is_int(v) and v >= 1, "a positive integer"),
        ("hybrid_r", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        ("alpha", lambda v: _is_real(v) and v > 0, "a positive finite number"),
        ("gralora_dropout", lambda v: _is_real(v) and 0 <= v < 1, "a number in [0, 1)"),
    )
    for name, ok, expected in rules:
        if name in values and not ok(values[name]):
            raise AdapterFileError(
                f"{where} has {name}={values[name]!r}, which must be {expected}; the file is damaged."
            )
    if _is_int(values.get("r")) and _is_int(values.get("gralora_k")) and values["r"] % values["gralora_k"]:
        raise AdapterFileError(f"{where} has r={values['r']} not divisible by gralora_k={values['gralora_k']}.")


def check_tensor_values(adapter: AdapterFile) -> None:
    """Every tensor is floating point and finite: a NaN or inf adapter is never applied, fused, exported or written."""
    for component, sd in adapter.state_dicts.items():
        for key, tensor in sd.items():
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise AdapterFileError(
                    f"{adapter.source}: tensor {component}.{key} is {kind}, not floating point; it is not a GraLoRA "
                    "weight."
                )
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterFileError(
                    f"{adapter.source}: tensor {component}.{key} holds NaN or infinite values; the adapter is broken "
                    "(a diverged training run?) and cannot be used."
                )


def validate_adapter(adapter: AdapterFile) -> None:
    """The checks every adapter passes before it is used: typed, in-range configs and finite floating-point tensors
    (``read_adapter`` and ``adapter_from_tensors`` run them; call this on an ``AdapterFile`` built by hand)."""
    for component, config in adapter.configs.items():
        check_config_values(config_to_dict(config), component, adapter.source)
    check_tensor_values(adapter)


def config_from_dict(values: dict) -> GraloraConfig:
    """A ``GraloraConfig`` from saved fields; unknown fields (a newer PEFT) are ignored."""
    known = {f.name for f in dataclasses.fields(GraloraConfig) if f.init}
    kwargs = {k: v for k, v in values.items() if k in known and k not in ("peft_type", "task_type")}
    return GraloraConfig(**kwargs)


def _describe_non_gralora(keys: list[str]) -> str | None:
    """If the tensor names are those of a LoRA (PEFT, diffusers or kohya naming), say so."""
    lora_markers = (
        ".lora_A.",
        ".lora_B.",
        ".lora_down.",
        ".lora_up.",
        "lora_unet_",
        "lora_te",
        ".lora.down.",
    )
    if any(marker in key for key in keys for marker in lora_markers):
        return "is a LoRA adapter, not GraLoRA; load it with diffusers' pipe.load_lora_weights(...) instead"
    return None


def infer_config(tensors: dict[str, torch.Tensor], component: str) -> GraloraConfig:
    """Rebuild a config from tensor shapes alone (for files or state dicts written without our metadata).

    k and r come from ``gralora_A`` [k, in/k, r] and hybrid_r from ``gralora_A_general.weight`` [hybrid_r, in];
    alpha is not recoverable from shapes, so the paper's default alpha = 2r is assumed, with a warning.
    """
    a_key = next(key for key in tensors if key.endswith(".gralora_A"))
    k, _, r = tensors[a_key].shape
    general = [key for key in tensors if key.endswith(".gralora_A_general.weight")]
    hybrid_r = tensors[general[0]].shape[0] if general else 0
    warnings.warn(
        f"The GraLoRA config of component {component!r} is not recorded; inferred r={r}, k={k}, "
        f"hybrid_r={hybrid_r} from the tensor shapes and assumed alpha={2 * r} (2r).",
        stacklevel=3,
    )
    modules = sorted({split_param_key(key)[0] for key in tensors})
    return GraloraConfig(r=int(r), alpha=2 * int(r), gralora_k=int(k), hybrid_r=int(hybrid_r), target_modules=modules)


def _check_component_tensors(component: str, tensors: dict[str, torch.Tensor], config: GraloraConfig, source: str):
    """Every adapted module has A and B with shapes that agree with each other and with the config."""
    k, r, hybrid_r = config.gralora_k, config.r, config.hybrid_r
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, param = split_param_key(key)
        by_module.setdefault(module, {})[param] = tensor
    for module, params in by_module.items():
        where = f"{source}: {component}.{module}"
        if "gralora_A" not in params or "gralora_B" not in params:
            raise AdapterFileError(f"{where} lacks gralora_A or gralora_B; the file is incomplete.")
        a, b = params["gralora_A"], params["gralora_B"]
        if a.ndim != 3 or b.ndim != 3 or a.shape[0] != k or b.shape[0] != k or a.shape[2] != r or b.shape[1] != r:
            raise AdapterFileError(
                f"{where} has gralora_A {tuple(a.shape)} and gralora_B {tuple(b.shape)}, which do not match the "
                f"recorded config (k={k}, r={r}); the file is inconsistent."
            )
        has_general = "gralora_A_general.weight" in params and "gralora_B_general.weight" in params
        if (hybrid_r > 0) != has_general:
            raise AdapterFileError(
                f"{where}: the config says hybrid_r={hybrid_r} but the hybrid tensors are "
                f"{'present' if has_general else 'missing'}; the file is inconsistent."
            )
        if has_general:
            ga, gb = params["gralora_A_general.weight"], params["gralora_B_general.weight"]
            in_f, out_f = a.shape[0] * a.shape[1], b.shape[0] * b.shape[2]
            if tuple(ga.shape) != (hybrid_r, in_f) or tuple(gb.shape) != (out_f, hybrid_r):
                raise AdapterFileError(f"{where} has hybrid tensors of the wrong shape; the file is inconsistent.")


def adapter_from_tensors(
    tensors: dict[str, torch.Tensor], header: dict[str, str] | None = None, source: str = "<state dict>"
) -> AdapterFile:
    """Validate a flat ``<component>.<peft key>`` tensor dict (+ header metadata) and split it by component."""
    header = dict(header or {})
    if not tensors:
        raise AdapterFileError(f"{source} holds no tensors; it is not a GraLoRA adapter.")
    keys = list(tensors)
    if not any(".gralora_" in key for key in keys):
        why = _describe_non_gralora(keys) or "holds no GraLoRA tensors (names with '.gralora_A' / '.gralora_B')"
        raise AdapterFileError(f"{source} {why}.")
    if header.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise AdapterFileError(f"{source} is a {header['format']!r} file, not a {FORMAT_NAME} adapter.")
    version = header.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise AdapterFileError(
            f"{source} has adapter format version {version}, this gralora-diffusion reads version "
            f"{FORMAT_VERSION}; upgrade gralora-diffusion."
        )
    state_dicts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS or not rest:
            raise AdapterFileError(
                f"{source}: tensor {key!r} does not start with a pipeline component ({', '.join(COMPONENTS)})."
            )
        split_param_key(rest)
        state_dicts.setdefault(component, {})[rest] = tensor
    try:
        saved_configs = json.loads(header["gralora_config"]) if "gralora_config" in header else {}
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{source}: the gralora_config metadata is not valid JSON ({err}).") from None
    if not isinstance(saved_configs, dict):
        raise AdapterFileError(f"{source}: the gralora_config metadata is not a JSON object; the file is damaged.")
    configs = {}
    for component, sd in state_dicts.items():
        if component in saved_configs:
            check_config_values(saved_configs[component], component, source)
            configs[component] = config_from_dict(saved_configs[component])
        else:
            configs[component] = infer_config(sd, component)
        _check_component_tensors(component, sd, configs[component], source)
    metadata = {k: v for k, v in header.items() if k not in ("format", "format_version", "gralora_config")}
    adapter = AdapterFile(state_dicts=state_dicts, configs=configs, metadata=metadata, source=source)
    check_tensor_values(adapter)
    return adapter


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"{path} is a pickle file; gralora-diffusion reads only .safetensors (pickle can run code). "
            "Convert it to safetensors first."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            header = dict(f.metadata() or {})
            # Copies, not views of the memory-mapped file: a file overwritten in place later must not change an
            # adapter that is already loaded.
            tensors = {key: f.get_tensor(key).clone() for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file (truncated or another format): {err}"
        ) from None
    return tensors, header


def _read_peft_folder(folder: Path, component: str) -> tuple[dict[str, torch.Tensor], dict]:
    """One standard PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    weights = folder / PEFT_WEIGHTS_NAME
    if not weights.exists():
        if (folder / "adapter_model.bin").exists():
            raise AdapterFileError(
                f"{folder} holds adapter_model.bin (pickle); only adapter_model.safetensors is read. "
                "Re-save the adapter with safe_serialization=True."
            )
        raise AdapterFileError(f"{folder} has no {PEFT_WEIGHTS_NAME}; it is not a PEFT adapter folder.")
    config_path = folder / PEFT_CONFIG_NAME
    if not config_path.exists():
        raise AdapterFileError(f"{folder} has no {PEFT_CONFIG_NAME}; it is not a PEFT adapter folder.")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "GRALORA":
        raise AdapterFileError(
            f"{folder} is a PEFT {config.get('peft_type')} adapter, not GraLoRA"
            + ("; load it with pipe.load_lora_weights(...) instead." if config.get("peft_type") == "LORA" else ".")
        )
    tensors, _ = _read_safetensors(weights)
    prefixed = {}
    for key, tensor in tensors.items():
        bare = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        prefixed[f"{component}.{bare}"] = tensor
    return prefixed, config


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and validate a GraLoRA adapter from a ``.safetensors`` file or a PEFT folder.

    A folder is either one PEFT adapter folder (taken as the UNet's adapter) or a folder with one PEFT adapter
    folder per component (``unet/``, ``text_encoder/``, ``text_encoder_2/``), as ``export_peft_folder`` writes.
    """
    path = Path(path)
    if not path.exists():
        raise AdapterFileError(f"Adapter {path} does not exist; check the path.")
    if path.is_file():
        tensors, header = _read_safetensors(path)
        return adapter_from_tensors(tensors, header, source=str(path))
    subfolders = [c for c in COMPONENTS if (path / c / PEFT_CONFIG_NAME).exists()]
    folders = {c: path / c for c in subfolders} or {"unet": path}
    tensors, configs = {}, {}
    for component, folder in folders.items():
        t, config = _read_peft_folder(folder, component)
        tensors.update(t)
        configs[component] = config
    header = {"gralora_config": json.dumps(configs)}
    base = next((c.get("base_model_name_or_path") for c in configs.values() if c.get("base_model_name_or_path")), "")
    if base:
        header["base_model"] = base
    return adapter_from_tensors(tensors, header, source=str(path))


def save_adapter_file(path: str | os.PathLike, adapter: AdapterFile) -> Path:
    """Write ``adapter`` as one ``.safetensors`` file, atomically (temporary name, then rename)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterFileError(f"Adapter files end in .safetensors; got {path.name}.")
    clash = [k for k in adapter.metadata if k in ("format", "format_version", "gralora_config")]
    if clash:
        raise AdapterFileError(f"Metadata keys {clash} are reserved by the file format; rename them.")
    bad = {k: type(v).__name__ for k, v in adapter.metadata.items() if not isinstance(v, str)}
    if bad:
        raise AdapterFileError(f"Metadata values must be strings; convert {bad} with str() or json.dumps().")
    check_tensor_values(adapter)  # nothing non-finite is ever written
    tensors = {
        f"{component}.{key}": tensor.detach().to("cpu").contiguous()
        for component, sd in adapter.state_dicts.items()
        for key, tensor in sd.items()
    }
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "gralora_config": json.dumps({c: config_to_dict(cfg) for c, cfg in adapter.configs.items()}),
        "base_model": adapter.base_model,
        **adapter.metadata,
    }
    write_file_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return path


def looks_like_conv(module: str) -> bool:
    """For files without recorded kernels: diffusers names every ResNet / sampler convolution ``conv*``."""
    return module.rsplit(".", 1)[-1].startswith("conv")


def export_peft_folder(adapter: AdapterFile | str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Write each component as a standard PEFT adapter folder (``directory/<component>/``).

    ``peft.PeftModel.from_pretrained(pipe.unet, directory / "unet")`` loads the UNet part with plain PEFT.
    The whole folder is built under a temporary name and renamed into place, so it is never half-written.
    """
    if not isinstance(adapter, AdapterFile):
        adapter = read_adapter(adapter)
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise AdapterFileError(f"{directory} exists and is not empty; choose a new output folder.")
    convs = sorted(f"{c}.{m}" for c, m in adapter.conv_modules())
    if convs:
        raise AdapterFileError(
            f"{adapter.source} adapts convolutions ({convs[0]}, ...), which PEFT's GraLoRA (linear layers only) cannot "
            "load; load it with load_gralora_weights, or export a LoRA (gralora export --to diffusers), which PEFT's "
            "LoRA loads."
        )

    def write(tmp: Path) -> None:
        for component, sd in adapter.state_dicts.items():
            folder = tmp / component
            folder.mkdir()
            config = config_from_dict(config_to_dict(adapter.configs[component]))
            config.base_model_name_or_path = adapter.base_model or None
            config.inference_mode = True
            config.save_pretrained(str(folder))
            tensors = {_PEFT_PREFIX + key: t.detach().to("cpu").contiguous() for key, t in sd.items()}
            save_file(tensors, str(folder / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})

    return write_directory_atomically(directory, write)


def save_gralora_weights(
    path: str | os.PathLike,
    unet: nn.Module | Mapping[str, torch.Tensor] | None = None,
    text_encoder: nn.Module | Mapping[str, torch.Tensor] | None = None,
    text_encoder_2: nn.Module | Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    adapter_name: str = "default",
    configs: Mapping[str, GraloraConfig] | None = None,
    transformer: nn.Module | Mapping[str, torch.Tensor] | None = None,
    text_encoder_3: nn.Module | Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Save GraLoRA adapters of pipeline components into one ``.safetensors`` file (atomically).

    Each component is a model carrying the GraLoRA adapter ``adapter_name`` (its config is read from the layers) or
    a PEFT state dict of it (config from ``configs[component]`` or, failing that, inferred from shapes with
    alpha = 2r). ``metadata`` holds string-able extras such as ``base_model``, ``trigger_prompt``, ``steps``.
    """
    given = {
        "unet": unet,
        "transformer": transformer,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": text_encoder_3,
    }
    given = {c: v for c, v in given.items() if v is not None}
    if not given:
        raise GraloraAdapterError(f"Nothing to save to {path}: pass at least one of {', '.join(COMPONENTS)}.")
    state_dicts, cfgs, kernels = {}, {}, {}
    for component, value in given.items():
        if isinstance(value, nn.Module):
            cfgs[component] = gralora_config_of(value, adapter_name)
            state_dicts[component] = canonical_state_dict(value, adapter_state_dict(value, adapter_name))
            convs = {n: list(layer.get_base_layer().kernel_size) for n, layer in gralora_layers(value)
                     if isinstance(layer, GraloraConv2d) and adapter_name in layer.gralora_A}  # fmt: skip
            if convs:
                kernels[component] = convs
        else:
            state_dicts[component] = dict(value)
            if configs and component in configs:
                cfgs[component] = configs[component]
    extras = {k: v if isinstance(v, str) else str(v) for k, v in (metadata or {}).items()}
    if kernels:
        extras[CONV_KERNELS_KEY] = json.dumps(kernels, sort_keys=True)
    flat = {f"{c}.{k}": t for c, sd in state_dicts.items() for k, t in sd.items()}
    header = {"gralora_config": json.dumps({c: config_to_dict(cfg) for c, cfg in cfgs.items()})} if cfgs else {}
    adapter = adapter_from_tensors(flat, header, source=str(path))  # validates before writing
    for component in state_dicts:
        if component not in cfgs:
            cfgs[component] = adapter.configs[component]
    adapter.configs = cfgs
    adapter.metadata = extras
    try:
        return save_adapter_file(path, adapter)
    except AdapterFileError as err:
        raise GraloraAdapterError(str(err)) from None
