"""The model card (README.md) written next to a trained adapter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ..bases import is_registered
from ..fs import write_text_atomically

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def hub_model_id(base: str) -> str | None:
    """``base`` when it names a model on the Hugging Face Hub ("owner/name"), else ``None``: the Hub rejects a card
    whose ``base_model`` is not a model id, and a local folder, a single file or one of this project's toy bases is
    none."""
    text = str(base)
    if not _HUB_ID.fullmatch(text) or ".." in text or is_registered(text) or Path(text).exists():
        return None
    return None if text.lower().endswith((".safetensors", ".ckpt", ".bin")) else text


def _yaml_string(text: str) -> str:
    """``text`` as one double-quoted YAML scalar that reads back as itself (emoji, line breaks, '#', ':' included)."""
    return yaml.safe_dump(text, allow_unicode=True, default_style='"', width=float("inf")).strip()


def _python_string(text: str) -> str:
    """``text`` as a double-quoted Python string literal (JSON's escapes are Python's)."""
    return json.dumps(str(text), ensure_ascii=False)


def model_card(
    *,
    adapter_file: str,
    base_model: str,
    instance_prompt: str,
    rank: int,
    gralora_k: int,
    alpha: float,
    hybrid_r: int,
    steps: int,
    train_text_encoder: bool,
    unet_target: str,
    learning_rate: float,
    resolution: int,
    validation_images: list[tuple[str, str]],
) -> str:
    """Markdown with YAML front matter (tags for the Hub), settings, gallery and how to load the adapter."""
    gallery = "\n".join(f"![{prompt}]({path})" for path, prompt in validation_images) or "(no validation images)"
    loader = "from_single_file" if str(base_model).lower().endswith(".safetensors") else "from_pretrained"
    source = _python_string(base_model)
    imports = "from gralora_diffusion import load_gralora_weights, set_gralora_adapters"
    if is_registered(base_model):  # one of this project's toy bases: diffusers reads it from where it is installed
        source = f"resolve_base({_python_string(base_model)})"
        imports += "\nfrom gralora_diffusion.bases import resolve_base"
    hub_id = hub_model_id(base_model)
    front = f"base_model: {hub_id}\n" if hub_id else ""  # the body still names the base, whatever it is
    return f"""---
{front}tags:
- gralora
- text-to-image
- stable-diffusion-xl
- diffusers
- dreambooth
instance_prompt: {_yaml_string(instance_prompt)}
---

# GraLoRA DreamBooth adapter: `{Path(adapter_file).stem}`

A GraLoRA (Granular Low-Rank Adaptation) adapter for `{base_model}`, trained with gralora-diffusion's DreamBooth
trainer. Trigger prompt: **{instance_prompt}**.

| setting | value |
| --- | --- |
| rank r | {rank} |
| blocks k (k x k) | {gralora_k} |
| alpha | {alpha} |
| hybrid_r | {hybrid_r} |
| UNet targets | {unet_target} |
| text encoders trained | {"yes" if train_text_encoder else "no"} |
| steps | {steps} |
| learning rate | {learning_rate} |
| resolution | {resolution} |

## Validation images

{gallery}

## Use it with diffusers

```python
import torch
from diffusers import StableDiffusionXLPipeline
{imports}

pipe = StableDiffusionXLPipeline.{loader}({source}, torch_dtype=torch.float16).to("cuda")
load_gralora_weights(pipe, {_python_string(adapter_file)}, adapter_name="subject")
set_gralora_adapters(pipe, ["subject"], [1.0])
image = pipe({_python_string(instance_prompt)}).images[0]
```

## Use it in the app

Put `{adapter_file}` in the app's adapter folder, start `gralora-app --base {base_model} --adapters <that folder>`,
pick it in an adapter row, or write `<gralora:{Path(adapter_file).stem}:0.8>` in the prompt.
"""


def write_model_card(output_dir: str | Path, **fields) -> Path:
    path = Path(output_dir) / "README.md"
    return write_text_atomically(path, model_card(**fields))
