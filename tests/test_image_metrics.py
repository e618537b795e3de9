"""DINOv2 and CLIP image embeddings for real-model benchmarks, checked offline on tiny randomly initialised models
built from configs (the same classes as the published ones): preprocessing against transformers' own image
processors, embeddings against the model run by hand, the similarity against an explicit double loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from gralora_diffusion.image_metrics import METRICS, load_image_embedder, mean_cosine


def tiny(metric: str, folder):
    torch.manual_seed(0)
    if metric == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, image_size=56, patch_size=14))  # fmt: skip
    else:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, image_size=56,
                                              patch_size=14, projection_dim=24))  # fmt: skip
    model.save_pretrained(folder)
    return model.eval()


def pictures() -> list[Image.Image]:
    out = []
    for i, colour in enumerate([(27, 159, 159), (220, 30, 40), (27, 159, 159)]):
        image = Image.new("RGB", (80 + 16 * i, 64), "white")  # not square: the crop matters
        ImageDraw.Draw(image).ellipse((10 + 5 * i, 8, 50 + 5 * i, 48), fill=colour)
        out.append(image)
    return out


@pytest.mark.parametrize("metric", list(METRICS))
def test_embeddings_equal_the_model_run_on_transformers_preprocessing(metric, tmp_path):
    from transformers import BitImageProcessorPil, CLIPImageProcessorPil

    model = tiny(metric, tmp_path / metric)
    embed = load_image_embedder(metric, tmp_path / metric, device="cpu")
    assert embed.size == 56
    images = pictures()
    _, mean, std = METRICS[metric]
    processor = (BitImageProcessorPil if metric == "dinov2" else CLIPImageProcessorPil)(
        size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, image_mean=mean, image_std=std,
        resample=Image.BICUBIC, do_convert_rgb=True,
    )  # fmt: skip
    reference = torch.as_tensor(np.stack(processor(images)["pixel_values"]))
    ours = embed.preprocess(images)
    assert ours.shape == reference.shape == (3, 3, 56, 56)
    assert (ours - reference).abs().max() < 1e-6  # the same recipe, the same pixels
    with torch.no_grad():
        out = model(pixel_values=ours)
        by_hand = out.pooler_output if metric == "dinov2" else out.image_embeds
    got = embed(images)
    assert torch.allclose(got, by_hand / by_hand.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-6)


def test_mean_cosine_is_the_mean_over_pairs():
    torch.manual_seed(1)
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    pairs = [float(a[i] @ b[j]) for i in range(4) for j in range(3)]
    assert math.isclose(mean_cosine(a, b), sum(pairs) / len(pairs), rel_tol=1e-5, abs_tol=1e-6)
    own = [float(a[i] @ a[j]) for i in range(4) for j in range(4) if i != j]
    assert math.isclose(mean_cosine(a, a, exclude_diagonal=True), sum(own) / len(own), rel_tol=1e-5, abs_tol=1e-6)
    with pytest.raises(ValueError, match="exclude_diagonal needs one set"):
        mean_cosine(a, b, exclude_diagonal=True)


def test_same_image_scores_one_and_bad_names_are_one_sentence(tmp_path):
    tiny("dinov2", tmp_path / "d")
    embed = load_image_embedder("dinov2", tmp_path / "d", device="cpu")
    e = embed(pictures())
    assert math.isclose(mean_cosine(e[:1], e[:1]), 1.0, rel_tol=1e-5, abs_tol=1e-6)
    with pytest.raises(ValueError, match="Unknown metric 'lpips'; use one of dinov2, clip"):
        load_image_embedder("lpips")
    with pytest.raises(ValueError, match="Cannot load the dinov2 model"):
        load_image_embedder("dinov2", tmp_path / "missing")
