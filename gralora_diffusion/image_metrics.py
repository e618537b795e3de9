"""Image embeddings for judging DreamBooth runs on real models, through transformers: DINOv2 (the DreamBooth paper's
DINO score, with DINOv2 in place of DINO ViT-S/16) and CLIP image embeddings (CLIP-I).

The toy world has its own evaluator (``evaluator.py``); these are what a user with SDXL and a GPU measures instead:
``load_image_embedder("dinov2")`` gives a callable from PIL images to L2-normalised embeddings, and
``mean_cosine(generated, references)`` the subject similarity (mean pairwise cosine). Preprocessing follows each
model's published recipe (resize the shorter side to size * 256 / 224 with bicubic filtering, centre crop, normalise
with the model's mean and std); any model folder or hub id with the same architecture works, so a tiny randomly
initialised one built from a config exercises every line offline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

METRICS = {  # metric -> (default model, mean, std)
    "dinov2": ("facebook/dinov2-small", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ("openai/clip-vit-base-patch32", (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


@dataclass
class ImageEmbedder:
    """PIL images -> L2-normalised embeddings [n, d] with one vision model (``metric``: ``dinov2`` or ``clip``)."""

    model: nn.Module
    metric: str
    size: int  # the centre crop's side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    batch_size: int = 16

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[n, 3, size, size] model inputs: shorter side to size * 256 / 224 (bicubic), centre crop, normalise."""
        short = round(self.size * 256 / 224)
        out = []
        for image in images:
            image = image.convert("RGB")
            w, h = image.size
            scale = short / min(w, h)
            image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BICUBIC)
            w, h = image.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
            out.append((pixels - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None])
        return torch.stack(out)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            raise ValueError("Give at least one image to embed.")
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start : start + self.batch_size]).to(self.device)
            out = self.model(pixel_values=pixels)
            # DINOv2: the layer-normalised class token; CLIP: the projected image embedding
            chunks.append((out.pooler_output if self.metric == "dinov2" else out.image_embeds).float().cpu())
        return nn.functional.normalize(torch.cat(chunks), dim=-1)


def load_image_embedder(
    metric: str = "dinov2",
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    size: int | None = None,
) -> ImageEmbedder:
    """The embedder for ``metric`` (``dinov2`` or ``clip``) from ``model`` (a folder or hub id; default the
    metric's usual model). ``size`` defaults to 224 or the model's own image size if smaller."""
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; use one of {', '.join(METRICS)}.")
    default_model, mean, std = METRICS[metric]
    source = str(model or default_model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if metric == "dinov2":
            from transformers import Dinov2Model

            network = Dinov2Model.from_pretrained(source)
        else:
            from transformers import CLIPVisionModelWithProjection

            network = CLIPVisionModelWithProjection.from_pretrained(source)
    except OSError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"Cannot load the {metric} model {source} ({first}); give a downloaded folder.") from None
    size = size or min(224, int(network.config.image_size))
    return ImageEmbedder(network.eval().to(device), metric, size, mean, std, device)


def mean_cosine(a: torch.Tensor, b: torch.Tensor, *, exclude_diagonal: bool = False) -> float:
    """Mean cosine over all pairs (a_i, b_j) of normalised embeddings; ``exclude_diagonal`` for a set against itself
    (the references' own spread, the ceiling a subject similarity is read against)."""
    sims = a @ b.T
    if exclude_diagonal:
        if sims.shape[0] != sims.shape[1] or sims.shape[0] < 2:
            raise ValueError("exclude_diagonal needs one set of at least two embeddings against itself.")
        n = sims.shape[0]
        return float((sims.sum() - sims.diagonal().sum()) / (n * n - n))
    return float(sims.mean())
