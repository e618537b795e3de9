"""Target presets and paper defaults."""

from __future__ import annotations

import pytest

import gralora_diffusion as gd
from gralora_diffusion.config import find_target_modules


@pytest.mark.parametrize("rank,k", [(4, 2), (16, 2), (32, 2), (64, 4), (128, 4)])
def test_paper_defaults(rank, k):
    config = gd.make_gralora_config(rank, "unet-attention")
    assert config.gralora_k == k == gd.default_gralora_k(rank)
    assert config.alpha == 2 * rank
    assert config.hybrid_r == 0


def test_explicit_settings_win():
    config = gd.make_gralora_config(64, "unet-attention", gralora_k=2, alpha=8, hybrid_r=4)
    assert (config.gralora_k, config.alpha, config.hybrid_r) == (2, 8, 4)


def test_presets_select_the_sdxl_layers(sdxl):
    attention = find_target_modules(sdxl.unet, gd.TARGET_PRESETS["unet-attention"])
    wide = find_target_modules(sdxl.unet, gd.TARGET_PRESETS["unet-wide"])
    # Every transformer block has self- (attn1) and cross-attention (attn2), 4 projections each.
    n_blocks = len([n for n, _ in sdxl.unet.named_modules() if n.rsplit(".", 1)[-1] == "attn1"])
    assert n_blocks == 8  # toy: 1 attention x 2 layers down, 2 x 2 up, 1 x 2 mid
    assert len(attention) == 8 * n_blocks
    assert set(attention) < set(wide)
    suffixes = {n.split("transformer_blocks.0.", 1)[-1] for n in wide}
    assert {"ff.net.0.proj", "ff.net.2"} <= suffixes
    assert any(n.endswith("proj_in") for n in wide) and any(n.endswith("proj_out") for n in wide)
    te = find_target_modules(sdxl.text_encoder_2, gd.TARGET_PRESETS["text-encoder-attention"])
    assert len(te) == 4 * sdxl.text_encoder_2.config.num_hidden_layers
    te_wide = find_target_modules(sdxl.text_encoder_2, gd.TARGET_PRESETS["text-encoder-wide"])
    assert len(te_wide) == 6 * sdxl.text_encoder_2.config.num_hidden_layers


def test_add_adapter_covers_exactly_the_checked_modules(sdxl):
    config = gd.make_gralora_config(8, "unet-wide")
    names = gd.add_gralora_adapter(sdxl.unet, config, component="unet")
    adapted = sorted(n for n, _ in gd.layers.gralora_layers(sdxl.unet))
    assert adapted == names
    trainable = [n for n, p in sdxl.unet.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(names)  # gralora_A and gralora_B of each adapted layer, base frozen
    assert all(".gralora_A." in n or ".gralora_B." in n for n in trainable)


def test_unknown_preset():
    with pytest.raises(gd.GraloraConfigError, match="Unknown target preset 'unet-everything'"):
        gd.make_gralora_config(8, "unet-everything")


def test_targets_that_match_nothing(sdxl):
    config = gd.make_gralora_config(8, ["not_a_layer"])
    with pytest.raises(gd.GraloraConfigError, match="No module of the unet matches"):
        gd.add_gralora_adapter(sdxl.unet, config, component="unet")
