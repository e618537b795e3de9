"""GraLoRA -> ordinary LoRA, for every tool that loads only LoRA (diffusers' load_lora_weights, ComfyUI, A1111).

A GraLoRA delta of rank r with k blocks (plus hybrid_r) has rank at most k*r + hybrid_r, so it is an ordinary LoRA of
that rank with no loss (``exact``), or an SVD-truncated one of a smaller rank (``rank=N``) or of the smallest rank
keeping a share of the singular-value energy (``energy=0.99``). The SVD is PEFT's own
(``peft.tuners.lora.conversion.convert_to_lora``), run on PEFT GraLoRA layers rebuilt from the file around base layers
that take no memory, so no base model is needed and nothing of the base is allocated.

Two key layouts: diffusers/PEFT (``unet.<module>.lora_A.weight``) and kohya/webui (``lora_unet_<SGM block
path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, ``lora_te1_...``, ``lora_te2_...``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import GraloraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora.conversion import convert_to_lora
from safetensors.torch import save_file
from torch import nn

from .io import AdapterFile, _atomic_write, read_adapter
from .layers import gralora_layers


class ExportError(ValueError):
    """The export cannot be done as asked; the message says why and what to do."""


@dataclass
class ComponentReport:
    component: str
    layers: int
    ranks: list[int]  # the LoRA rank of each layer
    relative_error: float  # ||sum D - B A||_F / ||D||_F over the component's layers

    @property
    def rank_text(self) -> str:
        low, high = min(self.ranks), max(self.ranks)
        return str(low) if low == high else f"{low}-{high}"


def _rebuild(adapter: AdapterFile, component: str, modules: list[str]) -> nn.Module:
    """A module tree with meta-device Linear layers at ``modules`` carrying the component's PEFT GraLoRA adapter."""
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


def _layer_ranks(adapter: AdapterFile, component: str) -> dict[str, tuple[int, int, int]]:
    """Per module: (lossless rank, in, out)."""
    cfg = adapter.configs[component]
    sd = adapter.state_dicts[component]
    out = {}
    for name in adapter.module_names(component):
        a, b = sd[f"{name}.gralora_A"], sd[f"{name}.gralora_B"]
        in_f, out_f = a.shape[0] * a.shape[1], b.shape[0] * b.shape[2]
        out[name] = (min(cfg.gralora_k * cfg.r + cfg.hybrid_r, in_f, out_f), in_f, out_f)
    return out


def to_lora(
    adapter: AdapterFile | str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    exact: bool = False,
) -> tuple[dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], list[ComponentReport]]:
    """Per component and module, LoRA factors (A [r, in], B [out, r]) with the scale baked in, and an error report.

    Exactly one of ``rank`` (the same rank everywhere), ``energy`` (share of squared singular values kept, per layer)
    or ``exact`` (the lossless rank k*r + hybrid_r, capped by the layer's size) must be given.
    """
    if not isinstance(adapter, AdapterFile):
        adapter = read_adapter(adapter)
    if sum(x is not None and x is not False for x in (rank, energy, exact)) != 1:
        raise ExportError("Choose exactly one of --rank N, --energy F or --exact.")
    if rank is not None and rank < 1:
        raise ExportError(f"--rank must be at least 1, got {rank}.")
    if energy is not None and not 0 < energy <= 1:
        raise ExportError(f"--energy must be in (0, 1], got {energy}.")
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    reports = []
    for component in adapter.components:
        layers = _layer_ranks(adapter, component)
        if rank is not None:
            too_small = [(n, i, o) for n, (_, i, o) in layers.items() if rank > min(i, o)]
            if too_small:
                name, i, o = too_small[0]
                raise ExportError(
                    f"--rank {rank} is larger than {component}.{name} ({o} x {i}); use at most {min(i, o)} or --exact."
                )
            groups = {rank: list(layers)}
        elif exact:
            groups: dict = {}
            for name, (lossless, _, _) in layers.items():
                groups.setdefault(lossless, []).append(name)
        else:
            groups = {float(energy): list(layers)}
        factors[component] = {}
        errors: list[tuple[float, float]] = []  # (||D - BA||^2, ||D||^2) per layer
        for group_rank, modules in groups.items():
            root = _rebuild(adapter, component, modules)
            _, lora_sd = convert_to_lora(root, group_rank)
            for name in modules:
                a = lora_sd[f"{name}.lora_A.weight"]
                b = lora_sd[f"{name}.lora_B.weight"]
                factors[component][name] = (a.contiguous(), b.contiguous())
            for name, layer in gralora_layers(root):
                delta = layer.get_delta_weight("default").float()
                a, b = factors[component][name]
                errors.append((torch.sum((delta - b.float() @ a.float()) ** 2).item(), torch.sum(delta**2).item()))
        num, den = sum(e for e, _ in errors), sum(d for _, d in errors)
        reports.append(
            ComponentReport(
                component=component,
                layers=len(layers),
                ranks=[factors[component][n][0].shape[0] for n in layers],
                relative_error=math.sqrt(num / den) if den else 0.0,
            )
        )
    return factors, reports


# --- key layouts -------------------------------------------------------------------------------------------------


def diffusers_to_sgm(module: str, layers_per_block: int) -> str:
    """A diffusers UNet module path in SDXL's original (SGM/LDM) block naming, as kohya and A1111 expect.

    down_blocks.i.attentions.j -> input_blocks.(1 + i*(L+1) + j).1, mid_block.attentions.0 -> middle_block.1,
    up_blocks.i.attentions.j -> output_blocks.(i*(L+1) + j).1, with L = layers_per_block (2 on SDXL).
    """
    stride = layers_per_block + 1
    m = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", module)
    if m:
        return f"input_blocks.{1 + int(m.group(1)) * stride + int(m.group(2))}.1.{m.group(3)}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", module)
    if m:
        return f"middle_block.1.{m.group(1)}"
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", module)
    if m:
        return f"output_blocks.{int(m.group(1)) * stride + int(m.group(2))}.1.{m.group(3)}"
    raise ExportError(f"No kohya name for UNet module {module!r}: only transformer (attention) blocks are mapped.")


def infer_layers_per_block(adapter: AdapterFile, default: int = 2) -> int:
    """The UNet's layers_per_block read off the adapted module names (up blocks hold layers_per_block + 1
    attentions), else the recorded ``unet_layers_per_block`` metadata, else SDXL's 2."""
    if "unet_layers_per_block" in adapter.metadata:
        return int(adapter.metadata["unet_layers_per_block"])
    if "unet" not in adapter.state_dicts:
        return default
    up = [
        int(m.group(1))
        for n in adapter.module_names("unet")
        if (m := re.match(r"up_blocks\.\d+\.attentions\.(\d+)\.", n))
    ]
    return max(up) if up else default


def kohya_key(component: str, module: str, layers_per_block: int) -> str:
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}.get(component)
    if prefix is None:
        raise ExportError(f"The kohya layout has no name for component {component!r}; use --to diffusers.")
    path = diffusers_to_sgm(module, layers_per_block) if component == "unet" else module
    return f"{prefix}_{path.replace('.', '_')}"


def lora_state_dict(
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], layout: str, layers_per_block: int = 2
) -> dict[str, torch.Tensor]:
    """Flat LoRA tensors in the ``diffusers`` or ``kohya`` layout (scale 1: alpha = rank)."""
    out = {}
    for component, modules in factors.items():
        for module, (a, b) in modules.items():
            if layout == "diffusers":
                out[f"{component}.{module}.lora_A.weight"] = a
                out[f"{component}.{module}.lora_B.weight"] = b
            elif layout == "kohya":
                key = kohya_key(component, module, layers_per_block)
                out[f"{key}.lora_down.weight"] = a
                out[f"{key}.lora_up.weight"] = b
                out[f"{key}.alpha"] = torch.tensor(float(a.shape[0]))
            else:
                raise ExportError(f"Unknown layout {layout!r}; use diffusers or kohya.")
    return out


def export_lora(
    adapter_path: str | os.PathLike,
    out_path: str | os.PathLike,
    layout: str = "diffusers",
    *,
    rank: int | None = None,
    energy: float | None = None,
    exact: bool = False,
    layers_per_block: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[ComponentReport]:
    """Write the adapter at ``adapter_path`` as a LoRA ``.safetensors`` (atomically); return the per-component report.

    ``layers_per_block`` (kohya only) defaults to what the adapter's module names show (``infer_layers_per_block``).
    """
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ExportError(f"The output must end in .safetensors, got {out_path.name}.")
    adapter = read_adapter(adapter_path)
    factors, reports = to_lora(adapter, rank=rank, energy=energy, exact=exact)
    lpb = layers_per_block or infer_layers_per_block(adapter)
    tensors = {k: v.to(dtype).contiguous() for k, v in lora_state_dict(factors, layout, lpb).items()}
    metadata = {
        "source": "gralora-diffusion export",
        "gralora_adapter": Path(adapter_path).name,
        "base_model": adapter.base_model,
        "ranks": json.dumps({r.component: r.rank_text for r in reports}),
    }
    if layout == "kohya":
        metadata["ss_network_module"] = "networks.lora"
    _atomic_write(out_path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return reports
