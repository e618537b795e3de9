"""The offline toy SDXL base: real classes, deterministic, loadable with from_pretrained and no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from gralora_diffusion.bases import REPO_ROOT, shown_path
from gralora_diffusion.toy import build_toy_sdxl_pipeline, save_toy_sdxl_pipeline


def test_real_sdxl_classes():
    pipe = build_toy_sdxl_pipeline(0)
    assert isinstance(pipe.unet, UNet2DConditionModel) and pipe.unet.config.addition_embed_type == "text_time"
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_2, CLIPTokenizer)
    ids = pipe.tokenizer("a photo of sks dog").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert len(ids) == 2 + 5  # every word of the prompt is one token


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = build_toy_sdxl_pipeline(0), build_toy_sdxl_pipeline(0), build_toy_sdxl_pipeline(1)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].numel() > 1)


def test_saved_base_loads_with_from_pretrained_and_generates_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = save_toy_sdxl_pipeline(tmp_path / "toy", seed=0)
    loaded = StableDiffusionXLPipeline.from_pretrained(directory)
    loaded.set_progress_bar_config(disable=True)
    built = build_toy_sdxl_pipeline(0)

    def image(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=g, output_type="pt").images

    out = image(loaded)
    assert out.shape == (1, 3, 64, 64)
    torch.testing.assert_close(out, image(built), atol=1e-5, rtol=0)


def test_reports_record_paths_inside_the_repository_relative_and_others_as_given(tmp_path, monkeypatch):
    """Committed JSON reports must not carry a machine's home folder."""
    inside = REPO_ROOT / "gralora_diffusion" / "assets" / "toy-sdxl-world"
    assert shown_path(inside) == str(Path("gralora_diffusion") / "assets" / "toy-sdxl-world")
    assert shown_path(str(inside)) == shown_path(inside)
    (tmp_path / "base").mkdir()
    assert shown_path(tmp_path / "base") == str(tmp_path / "base")
    monkeypatch.chdir(REPO_ROOT / "tests")
    assert shown_path("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert shown_path("../gralora_diffusion") == "gralora_diffusion"


def test_toy_builders_leave_the_callers_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_toy_sdxl_pipeline(5)
    assert torch.equal(torch.rand(3), expected)


def test_attention_at_both_levels_adds_adaptable_attention_at_full_resolution():
    """``attention_levels=2`` (a probe layout for issue 20): transformer blocks at the outer level too, which the
    attention preset then adapts; 1 keeps the shipped layout; anything else is one sentence."""
    from gralora_diffusion.config import find_target_modules

    one = build_toy_sdxl_pipeline(0).unet
    two = build_toy_sdxl_pipeline(0, attention_levels=2).unet
    assert one.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert two.config.down_block_types == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert two.config.up_block_types == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    outer_level = ("down_blocks.0.", "up_blocks.1.")
    assert [n for n in find_target_modules(two, targets) if n.startswith(outer_level)]
    assert not [n for n in find_target_modules(one, targets) if n.startswith(outer_level)]
    sample = torch.randn(1, 4, 32, 32)
    cond = {"text_embeds": torch.randn(1, 32), "time_ids": torch.zeros(1, 6)}
    assert two(sample, 10, torch.randn(1, 5, 64), added_cond_kwargs=cond).sample.shape == sample.shape
    with pytest.raises(ValueError, match="attention_levels must be 1 or 2"):
        build_toy_sdxl_pipeline(0, attention_levels=3)
