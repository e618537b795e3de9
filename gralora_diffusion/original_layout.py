"""SDXL's original single-file layout: the key names of Stability's SDXL release (the SGM/LDM code base), which
AUTOMATIC1111, Forge, ComfyUI, kohya's scripts and diffusers' ``from_single_file`` read.

diffusers names modules by block type (``down_blocks.1.attentions.0``); the original UNet numbers them in flat lists
(``input_blocks.4.1``). ``SgmNaming`` derives that numbering from a UNet config, so a tiny UNet and SDXL's map by the
same rule; the kohya LoRA names (``lora_unet_input_blocks_4_1_...``) and the single-file checkpoint both use it.
``original_state_dict`` turns the four models of a diffusers SDXL pipeline into one state dict under the original
names (UNet ``model.diffusion_model.``, VAE ``first_stage_model.``, CLIP-L ``conditioner.embedders.0.transformer.``,
OpenCLIP-G ``conditioner.embedders.1.model.``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."


class LayoutError(ValueError):
    """A module or parameter has no name in the original layout."""


class NotInUNetLayout(LayoutError):
    """A UNet module has no place in the UNet layout the names are derived from (another base model)."""


_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?")
# Modules outside the blocks, diffusers -> SGM.
_SGM_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Inside a ResnetBlock2D, diffusers -> SGM's ResBlock.
_SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


@dataclass(frozen=True)
class SgmNaming:
    """diffusers UNet module paths in the original (LDM/SGM) UNet's naming.

    The SGM UNet numbers its blocks in flat lists: ``input_blocks`` = conv_in, then per down block its layers
    (resnet ``.0`` + attention ``.1``) and, except after the last block, a downsampler ``.0.op``; ``middle_block`` =
    resnet, attention, resnet; ``output_blocks`` = per up block its layers (layers_per_block + 1), the upsampler inside
    the last layer of each block but the last. The numbering is derived from the UNet config (``from_unet_config``).
    """

    down_layers: tuple[int, ...]  # layers (resnets) per down block
    down_attention: tuple[bool, ...]
    up_layers: tuple[int, ...]  # layers per up block
    up_attention: tuple[bool, ...]
    mid_attention: bool

    @classmethod
    def from_unet_config(cls, config: Mapping[str, Any]) -> SgmNaming:
        down_types = tuple(config["down_block_types"])
        up_types = tuple(config["up_block_types"])
        per_block = config.get("layers_per_block", 2)
        down = (per_block,) * len(down_types) if isinstance(per_block, int) else tuple(per_block)
        return cls(
            down_layers=down,
            down_attention=tuple("Attn" in t for t in down_types),
            up_layers=tuple(n + 1 for n in reversed(down)),
            up_attention=tuple("Attn" in t for t in up_types),
            mid_attention="Attn" in str(config.get("mid_block_type", "UNetMidBlock2DCrossAttn")),
        )

    def name(self, module: str) -> str:
        """``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``input_blocks.4.1.transformer_...``
        (on SDXL); raises ``NotInUNetLayout`` for a module this UNet layout does not have."""
        if module in _SGM_TOP:
            return _SGM_TOP[module]
        m = _BLOCK.fullmatch(module)
        if m:
            side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            layers, attention = (
                (self.down_layers, self.down_attention) if side == "down" else (self.up_layers, self.up_attention)
            )
            if i >= len(layers):
                raise NotInUNetLayout(f"UNet module {module!r} does not exist in the UNet")
            first = 1 + sum(n + 1 for n in layers[:i]) if side == "down" else sum(layers[:i])
            block = "input_blocks" if side == "down" else "output_blocks"
            if kind in ("downsamplers", "upsamplers"):
                last = i == len(layers) - 1
                if j != 0 or last or (kind == "downsamplers") != (side == "down") or rest not in ("conv", None):
                    raise NotInUNetLayout(f"UNet module {module!r} does not exist in the UNet")
                if side == "down":
                    return f"{block}.{first + layers[i]}.0.op"
                return f"{block}.{first + layers[i] - 1}.{2 if attention[i] else 1}.conv"
            if j >= layers[i] or (kind == "attentions" and not attention[i]):
                raise NotInUNetLayout(f"UNet module {module!r} does not exist in the UNet")
            return f"{block}.{first + j}.{self._inner(module, kind, rest)}"
        m = _MID.fullmatch(module)
        if m:
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            index = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((kind, j))
            if index is None or (kind == "attentions" and not self.mid_attention):
                raise NotInUNetLayout(f"UNet module {module!r} does not exist in the UNet")
            return f"middle_block.{index}.{self._inner(module, kind, rest, mid=True)}"
        raise LayoutError(f"UNet module {module!r} has no name in the original SDXL layout")

    @staticmethod
    def _inner(module: str, kind: str, rest: str | None, mid: bool = False) -> str:
        if rest is None:
            raise LayoutError(f"UNet module {module!r} is a whole block, not a layer")
        if kind == "attentions":
            return rest if mid else f"1.{rest}"
        if rest not in _SGM_RESNET:
            raise LayoutError(f"UNet module {module!r} has no name in the original SDXL layout")
        return _SGM_RESNET[rest] if mid else f"0.{_SGM_RESNET[rest]}"

    def parameter(self, key: str) -> str:
        """A UNet parameter (``conv_in.weight``) under its original name (``input_blocks.0.0.weight``)."""
        module, _, leaf = key.rpartition(".")
        return f"{self.name(module)}.{leaf}"


# --- the VAE ---------------------------------------------------------------------------------------------------------

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_SAME = (
    "quant_conv",
    "post_quant_conv",
    "encoder.conv_in",
    "encoder.conv_out",
    "decoder.conv_in",
    "decoder.conv_out",
)


def vae_parameter(key: str, up_blocks: int) -> str:
    """An ``AutoencoderKL`` parameter under the original VAE's name; ``up_blocks`` is the decoder's block count
    (the original numbers decoder levels from the lowest resolution up, diffusers from the top down)."""
    module, _, leaf = key.rpartition(".")
    if module in _VAE_SAME:
        return key
    half, _, rest = module.partition(".")
    if rest == "conv_norm_out":
        return f"{half}.norm_out.{leaf}"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
    if m:
        side, i, kind, j, inner = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        level = f"down.{i}" if side == "down" else f"up.{up_blocks - 1 - i}"
        if kind == "resnets" and inner in _VAE_RESNET:
            return f"{half}.{level}.block.{j}.{_VAE_RESNET[inner]}.{leaf}"
        if kind in ("downsamplers", "upsamplers") and inner == "conv":
            return f"{half}.{level}.{kind[:-2]}.conv.{leaf}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
    if m:
        kind, j, inner = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets" and inner in _VAE_RESNET:
            return f"{half}.mid.block_{j + 1}.{_VAE_RESNET[inner]}.{leaf}"
        if kind == "attentions" and j == 0 and inner in _VAE_ATTENTION:
            return f"{half}.mid.attn_1.{_VAE_ATTENTION[inner]}.{leaf}"
    raise LayoutError(f"VAE parameter {key!r} has no name in the original SDXL layout")


# --- the text encoders -----------------------------------------------------------------------------------------------

_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def openclip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` state dict in OpenCLIP's layout (SDXL's second encoder):
    q/k/v concatenated into ``in_proj``, the projection stored as [hidden, projection] (``x @ text_projection``)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key == "text_model.embeddings.position_ids":
            continue
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rpartition(".")[2]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        else:
            m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
            if m is None:
                raise LayoutError(f"Text encoder 2 parameter {key!r} has no name in the original SDXL layout")
            layer, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, leaf), {})[module[10]] = value
            elif module in _OPENCLIP_LAYER:
                out[f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER[module]}.{leaf}"] = value
            else:
                raise LayoutError(f"Text encoder 2 parameter {key!r} has no name in the original SDXL layout")
    for (layer, leaf), parts in sorted(qkv.items()):
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# --- the whole pipeline ----------------------------------------------------------------------------------------------


def _plain(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict; refuses a model that still carries adapter layers (fuse and unload them first)."""
    sd = module.state_dict()
    if any(".base_layer." in k or "gralora_" in k or "lora_" in k for k in sd):
        raise LayoutError("The model still carries adapter layers; fuse and unload them before writing a checkpoint.")
    return sd


def original_state_dict(
    unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module
) -> dict[str, torch.Tensor]:
    """SDXL's four models as one state dict under the original release's names (see the module docstring)."""
    naming = SgmNaming.from_unet_config(unet.config)
    out = {UNET_PREFIX + naming.parameter(k): v for k, v in _plain(unet).items()}
    up_blocks = len(vae.config.up_block_types)
    for key, value in _plain(vae).items():
        name = vae_parameter(key, up_blocks)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", name) and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        out[VAE_PREFIX + name] = value
    for key, value in _plain(text_encoder).items():
        if key != "text_model.embeddings.position_ids":
            out[CLIP_L_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)] = value
    out.update({CLIP_G_PREFIX + k: v for k, v in openclip_state_dict(_plain(text_encoder_2)).items()})
    return out
