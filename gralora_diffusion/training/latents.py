"""VAE encoding for training, with an optional cache keyed by what determines the pixels.

The cache stores each image variant's latent distribution (mean and std) under a key made of the image, its flip,
its crop and its bucket -- never under a batch position -- so shuffling cannot pair a latent with the wrong caption
(the bug several diffusers scripts have). Latents are sampled from the distribution with the step's generator in
both the cached and the uncached path, so caching does not change the numbers.
"""

from __future__ import annotations

import torch


class LatentEncoder:
    def __init__(self, vae, cache: bool = False):
        self.vae = vae
        self.cache_enabled = cache
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoded = 0  # number of images run through the VAE (for tests and logs)

    @torch.no_grad()
    def _distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels.to(self.vae.device, vae_dtype)).latent_dist
        self.encoded += pixels.shape[0]
        return dist.mean.float(), dist.std.float()

    def __call__(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        pixels, keys = batch["pixel_values"], batch["cache_keys"]
        if self.cache_enabled:
            missing = [i for i, key in enumerate(keys) if key not in self._cache]
            if missing:
                mean, std = self._distribution(pixels[missing])
                for j, i in enumerate(missing):
                    self._cache[keys[i]] = (mean[j], std[j])
            mean = torch.stack([self._cache[k][0] for k in keys])
            std = torch.stack([self._cache[k][1] for k in keys])
        else:
            mean, std = self._distribution(pixels)
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        latents = mean + std * noise
        config = self.vae.config
        if getattr(config, "shift_factor", None) is not None:
            latents = latents - config.shift_factor
        return latents * config.scaling_factor

    def __len__(self) -> int:
        return len(self._cache)
