"""A small CNN that judges toy-world images, standing in for DINO/CLIP: shape and colour classes plus an embedding.

Trained on procedural images of every shape and colour of ``gralora_diffusion.world`` (the held-out subject's shape
and colour included: the judge knows what the base model does not) by ``scripts/train_evaluator.py``; the weights
ship with the package (``assets/evaluator.safetensors``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .world import ALL_COLORS, ALL_SHAPES

WEIGHTS = Path(__file__).parent / "assets" / "evaluator.safetensors"


class ShapeEvaluator(nn.Module):
    """Conv features -> a unit-norm embedding (for cosine similarity) -> shape and colour logits."""

    def __init__(self, embedding_dim: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.GroupNorm(8, 128), nn.SiLU(),
            nn.Conv2d(128, 128, 3, stride=2, padding=1), nn.GroupNorm(8, 128), nn.SiLU(),
        )  # fmt: skip
        self.project = nn.Linear(128 * 2, embedding_dim)
        self.shape_head = nn.Linear(embedding_dim, len(ALL_SHAPES))
        self.color_head = nn.Linear(embedding_dim, len(ALL_COLORS))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of images in [0, 1], shape [B, 3, H, W]."""
        h = self.features(pixels * 2 - 1)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return F.normalize(self.project(pooled), dim=1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding = self.embed(pixels)
        return embedding, self.shape_head(embedding * 8), self.color_head(embedding * 8)


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_evaluator(path: str | Path = WEIGHTS) -> ShapeEvaluator:
    from safetensors.torch import load_file

    model = ShapeEvaluator()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def judge(model: ShapeEvaluator, images: list[Image.Image]) -> dict:
    """Embeddings, predicted shape and colour names for ``images``."""
    embedding, shape_logits, color_logits = model(to_pixels(images))
    return {
        "embedding": embedding,
        "shape": [ALL_SHAPES[i] for i in shape_logits.argmax(1).tolist()],
        "color": [list(ALL_COLORS)[i] for i in color_logits.argmax(1).tolist()],
    }


def _subject_hits(verdict: dict) -> list[bool]:
    from .world import SUBJECT_COLOR, SUBJECT_SHAPE

    return [s == SUBJECT_SHAPE and c == SUBJECT_COLOR[0] for s, c in zip(verdict["shape"], verdict["color"])]


def recognised_share(verdict: dict) -> float:
    """Share of the images in a ``judge`` verdict judged to be the held-out subject (a teal moon)."""
    hits = _subject_hits(verdict)
    return sum(hits) / len(hits)


def misses(verdict: dict) -> dict[str, int]:
    """What a ``judge`` verdict saw instead of the subject: "<colour> <shape>" -> count, most frequent first."""
    seen = [f"{c} {s}" for s, c, hit in zip(verdict["shape"], verdict["color"], _subject_hits(verdict)) if not hit]
    return dict(Counter(seen).most_common())


@torch.no_grad()
def subject_scores(
    model: ShapeEvaluator,
    instances: list[Image.Image],
    subject_images: list[Image.Image],
    unrelated: list[Image.Image] | None = None,
    unrelated_base: list[Image.Image] | None = None,
) -> dict:
    """DreamBooth metrics in the manner of PEFT's image benchmark, with this evaluator in DINO's place.

    ``similarity``: mean cosine between the embeddings of ``subject_images`` (generations of the trigger prompt) and
    of the ``instances``. ``recognised``: share of ``subject_images`` judged to be the held-out subject (a teal moon).
    ``drift`` (when ``unrelated`` and ``unrelated_base`` are given, pairwise from the same seeds): mean 1 - cosine
    between the tuned and the base model's images of unrelated prompts.
    """
    reference = judge(model, instances)["embedding"]
    subject = judge(model, subject_images)
    scores = {
        "similarity": (subject["embedding"] @ reference.T).mean().item(),
        "recognised": recognised_share(subject),
    }
    if unrelated is not None and unrelated_base is not None:
        if len(unrelated) != len(unrelated_base):
            raise ValueError("drift compares images pairwise: pass as many tuned as base images of unrelated prompts")
        tuned, base = judge(model, unrelated)["embedding"], judge(model, unrelated_base)["embedding"]
        scores["drift"] = (1 - (tuned * base).sum(dim=1)).mean().item()
    return scores
