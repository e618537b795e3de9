"""One spec per model family: what differs between SD 1.x, SDXL and SD3 lives here, and everything else asks it.

A spec names the family's adaptable components (the denoiser, ``unet`` or ``transformer``, and its text encoders),
the target presets of each, the kohya/ComfyUI module-name prefixes, and the kind of sampler it takes. It is looked
up from the pipeline class, as diffusers keeps one LoRA loader mixin per family, or from the components a pipeline
(or a set of models) has when the class is not known.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# UNet: the attention projections of every transformer block (what diffusers' SDXL LoRA script targets); the wider
# preset adds the feed-forward (GEGLU input projection and output linear) and the linear proj_in / proj_out.
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_WIDE = UNET_ATTENTION + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
# LoCon-style: the attention projections plus both 3x3 convolutions of every ResNet block (``GraloraConv2d``), where
# a UNet draws shapes at the resolutions that have no attention.
UNET_ATTENTION_CONV = UNET_ATTENTION + ("conv1", "conv2")
# SD3's MMDiT: the image stream's and the text stream's attention projections (diffusers' SD3 LoRA script targets);
# the wider preset adds both streams' feed-forward.
MMDIT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MMDIT_WIDE = MMDIT_ATTENTION + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
# CLIP text encoders: self-attention projections; the wider preset adds the MLP.
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
CLIP_WIDE = CLIP_ATTENTION + ("fc1", "fc2")
# T5 encoder (SD3's third text encoder): self-attention projections; the wider preset adds the gated MLP.
T5_ATTENTION = ("q", "k", "v", "o")
T5_WIDE = T5_ATTENTION + ("wi_0", "wi_1", "wo")

PRESETS: dict[str, tuple[str, ...]] = {
    "unet-attention": UNET_ATTENTION,
    "unet-wide": UNET_WIDE,
    "unet-attention-conv": UNET_ATTENTION_CONV,
    "mmdit-attention": MMDIT_ATTENTION,
    "mmdit-wide": MMDIT_WIDE,
    "text-encoder-attention": CLIP_ATTENTION,
    "text-encoder-wide": CLIP_WIDE,
    "t5-attention": T5_ATTENTION,
    "t5-wide": T5_WIDE,
}

# Every component name an adapter file may hold, in the order diffusers names them.
ALL_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class ModelFamily:
    """What the package needs to know about one family of diffusers pipelines."""

    name: str
    pipeline_classes: tuple[str, ...]  # diffusers class names (text-to-image and its img2img/inpaint siblings)
    denoiser: str  # "unet" or "transformer"
    text_encoders: tuple[str, ...]
    presets: Mapping[str, Mapping[str, str]]  # component -> {"attention": preset, "wide": preset}
    kohya_prefixes: Mapping[str, str] = field(default_factory=dict)  # component -> kohya prefix; empty: no kohya
    flow_matching: bool = False  # sampled with flow-matching schedulers (SD3), not the epsilon/v ones
    default_guidance: float = 5.0  # the guidance scale the family's diffusers pipeline defaults to

    @property
    def components(self) -> tuple[str, ...]:
        return (self.denoiser, *self.text_encoders)

    def component_weights(self, denoiser: float, text_encoders: float) -> dict[str, float]:
        """A per-component blend weight: one for the denoiser, one for every text encoder."""
        return {self.denoiser: denoiser, **dict.fromkeys(self.text_encoders, text_encoders)}


_UNET = {"attention": "unet-attention", "wide": "unet-wide", "attention-conv": "unet-attention-conv"}
_CLIP = {"attention": "text-encoder-attention", "wide": "text-encoder-wide"}

SD1 = ModelFamily(
    name="sd1",
    pipeline_classes=(
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    ),
    denoiser="unet",
    text_encoders=("text_encoder",),
    presets={"unet": _UNET, "text_encoder": _CLIP},
    kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te"},
    default_guidance=7.5,
)
SDXL = ModelFamily(
    name="sdxl",
    pipeline_classes=(
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    ),
    denoiser="unet",
    text_encoders=("text_encoder", "text_encoder_2"),
    presets={
        "unet": _UNET,
        "text_encoder": _CLIP,
        "text_encoder_2": _CLIP,
    },
    kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
)
SD3 = ModelFamily(
    name="sd3",
    pipeline_classes=(
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
    ),
    denoiser="transformer",
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    presets={
        "transformer": {"attention": "mmdit-attention", "wide": "mmdit-wide"},
        "text_encoder": _CLIP,
        "text_encoder_2": _CLIP,
        "text_encoder_3": {"attention": "t5-attention", "wide": "t5-wide"},
    },
    flow_matching=True,
    default_guidance=7.0,
)
FAMILIES: tuple[ModelFamily, ...] = (SD1, SDXL, SD3)


def family_of_components(names: Iterable[str]) -> ModelFamily:
    """The family whose components best match ``names`` (e.g. the components of an adapter file or base folder)."""
    present = set(names)
    if "transformer" in present or "text_encoder_3" in present:
        return SD3
    if "text_encoder_2" in present:
        return SDXL
    return SD1 if present else SDXL


def family_of(pipe: Any) -> ModelFamily:
    """The family of a diffusers pipeline: by class (its own or a base class), else by the modules it carries."""
    for cls in type(pipe).__mro__:
        for family in FAMILIES:
            if cls.__name__ in family.pipeline_classes:
                return family
    return family_of_components(c for c in ALL_COMPONENTS if getattr(pipe, c, None) is not None)


def family_named(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"Unknown model family {name!r}; use one of {[f.name for f in FAMILIES]}.")
