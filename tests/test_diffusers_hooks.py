"""diffusers' own LoRA hooks on GraLoRA layers: ``cross_attention_kwargs={"scale": s}`` and ``pipe.set_adapters``.

The blend weight belongs to the package: a transient scale acts on unfused adapters only, never rewrites fused base
weights and never changes the stored weight (diffusers' ``scale=0.0`` path included).
"""

from __future__ import annotations

import pytest
import torch
from helpers import unet_out

import gralora_diffusion as gd


def unet_state(pipe) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in pipe.unet.state_dict().items()}


def test_scaled_forwards_leave_fused_weights_bit_identical(sdxl, adapter_files):
    a, _ = adapter_files
    gd.load_gralora_weights(sdxl, a)
    gd.set_gralora_adapters(sdxl, "a", 0.7)
    gd.fuse_gralora(sdxl)
    fused = unet_out(sdxl)
    before = unet_state(sdxl)
    for scale in (0.5, 2.0, 0.0, 0.5, 0.0, 1.5):
        out = unet_out(sdxl, scale=scale)
        torch.testing.assert_close(out, fused, atol=0, rtol=0)  # as for LoRA: a fused adapter ignores the scale
    after = unet_state(sdxl)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert gd.get_active_gralora_adapters(sdxl)["a"]["unet"] == 0.7
    assert gd.get_fused_gralora_adapters(sdxl) == ["a"]


def test_scale_multiplies_unfused_adapters_and_never_changes_the_stored_weight(sdxl, adapter_files):
    a, _ = adapter_files
    base = unet_out(sdxl)
    gd.load_gralora_weights(sdxl, a)
    gd.set_gralora_adapters(sdxl, "a", 0.35)
    at_035 = unet_out(sdxl)
    gd.set_gralora_adapters(sdxl, "a", 0.7)
    at_07 = unet_out(sdxl)
    assert (at_07 - base).abs().max() > 1e-3  # the adapter has a visible effect
    torch.testing.assert_close(unet_out(sdxl, scale=0.5), at_035, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unet_out(sdxl, scale=0.0), base, atol=1e-6, rtol=1e-6)
    # diffusers ends the scale-0 forward with set_scale(name, 1.0): the user's 0.7 must survive it
    assert gd.get_active_gralora_adapters(sdxl)["a"] == {"unet": 0.7, "text_encoder": 0.7, "text_encoder_2": 0.7}
    torch.testing.assert_close(unet_out(sdxl), at_07, atol=0, rtol=0)


def test_scale_zero_with_two_active_adapters_keeps_both_weights(sdxl, adapter_files):
    a, b = adapter_files
    gd.load_gralora_weights(sdxl, a)
    gd.load_gralora_weights(sdxl, b)
    gd.set_gralora_adapters(sdxl, ["a", "b"], [0.6, -0.3])
    blended = unet_out(sdxl)
    unet_out(sdxl, scale=0.0)
    active = gd.get_active_gralora_adapters(sdxl)
    assert active["a"]["unet"] == 0.6 and active["b"]["unet"] == -0.3
    torch.testing.assert_close(unet_out(sdxl), blended, atol=0, rtol=0)


def test_diffusers_set_adapters_sets_the_gralora_weight(sdxl, adapter_files):
    a, b = adapter_files
    gd.load_gralora_weights(sdxl, a)
    gd.load_gralora_weights(sdxl, b)
    gd.set_gralora_adapters(sdxl, ["a", "b"], [0.5, 0.25])
    expected = unet_out(sdxl)
    gd.set_gralora_adapters(sdxl, "a")
    sdxl.set_adapters(["a", "b"], [0.5, 0.25])  # diffusers' own API
    assert gd.get_active_gralora_adapters(sdxl)["a"]["unet"] == pytest.approx(0.5)
    assert gd.get_active_gralora_adapters(sdxl)["b"]["unet"] == pytest.approx(0.25)
    torch.testing.assert_close(unet_out(sdxl), expected, atol=1e-6, rtol=1e-6)


def test_diffusers_set_adapters_on_a_fused_pipeline_keeps_fused_equal_to_unfused(sdxl, adapter_files):
    a, _ = adapter_files
    gd.load_gralora_weights(sdxl, a)
    gd.set_gralora_adapters(sdxl, "a", 0.3)
    at_03 = unet_out(sdxl)
    gd.set_gralora_adapters(sdxl, "a", 0.9)
    gd.fuse_gralora(sdxl)
    sdxl.set_adapters(["a"], [0.3])
    assert gd.get_fused_gralora_adapters(sdxl) == ["a"]
    assert gd.get_active_gralora_adapters(sdxl)["a"]["unet"] == pytest.approx(0.3)
    torch.testing.assert_close(unet_out(sdxl), at_03, atol=1e-5, rtol=1e-5)
