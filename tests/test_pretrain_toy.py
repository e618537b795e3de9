"""scripts/pretrain_toy.py's latent standardisation: an exact change of the VAE's latent coordinates."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import pretrain_toy  # noqa: E402


def test_standardised_latents_have_unit_channels_and_decode_the_same():
    from diffusers import AutoencoderKL

    from gralora_diffusion.toy import toy_world_base_dir

    vae = AutoencoderKL.from_pretrained(toy_world_base_dir(), subfolder="vae").eval()
    before = copy.deepcopy(vae)
    stats = pretrain_toy.standardise_latent_channels(vae, "cpu", images=128)
    assert vae.config.scaling_factor == 1.0 and len(stats["std"]) == vae.config.latent_channels
    pixels, _ = pretrain_toy.world_batch(5000, 8, seed=9, device="cpu")  # images the statistics never saw
    with torch.no_grad():
        old = before.encode(pixels).latent_dist
        new = vae.encode(pixels).latent_dist
        # the new coordinates are the old ones shifted and scaled per channel, by the statistics returned
        mean, std = torch.tensor(stats["mean"])[None, :, None, None], torch.tensor(stats["std"])[None, :, None, None]
        assert torch.allclose(new.mean, (old.mean - mean) / std, atol=1e-4)
        assert torch.allclose(new.std, old.std / std, rtol=1e-4)
        assert (vae.decode(new.mode()).sample - before.decode(old.mode()).sample).abs().max() < 1e-4
        held_out, _ = pretrain_toy.world_batch(6000, 64, seed=10, device="cpu")
        latents = vae.encode(held_out).latent_dist.mode()
    assert latents.mean(dim=(0, 2, 3)).abs().max() < 0.25
    assert (latents.std(dim=(0, 2, 3)) - 1).abs().max() < 0.2
