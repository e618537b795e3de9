"""The diffusion training objective: noise, Min-SNR weighting, prior preservation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like ``latents``; ``noise_offset`` adds a per-channel constant (helps very dark/bright images)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, dtype=torch.float32)
        noise = noise + noise_offset * offset.to(latents.device, latents.dtype)
    return noise


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    clipped = torch.minimum(snr_values, torch.full_like(snr_values, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    return clipped / snr_values


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict under the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Prediction type {kind!r} is not supported for training; use epsilon or v_prediction.")


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    is_class: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    snr_gamma: float | None = None,
    prior_loss_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-example MSE (Min-SNR weighted when ``snr_gamma``), instance mean + prior_loss_weight * class mean."""
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if snr_gamma:
        per_example = per_example * min_snr_weights(snr(alphas_cumprod, timesteps), snr_gamma, prediction_type)
    instance = per_example[~is_class]
    loss = instance.mean()
    parts = {"instance_loss": loss.item()}
    if is_class.any():
        prior = per_example[is_class].mean()
        loss = loss + prior_loss_weight * prior
        parts["prior_loss"] = prior.item()
    return loss, parts


def denoising_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    time_ids: torch.Tensor,
    generator: torch.Generator,
    *,
    is_class: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    prior_loss_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One SDXL training objective evaluation: noise the latents, predict with the UNet, weigh the error.

    All randomness (noise, timesteps) comes from ``generator``; ``timesteps`` may be fixed (evaluation).
    """
    noise = sample_noise(latents, generator, noise_offset)
    if timesteps is None:
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
        )
    timesteps = timesteps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    cond = {"text_embeds": pooled_embeds, "time_ids": time_ids}
    pred = unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=cond).sample
    if is_class is None:
        is_class = torch.zeros(latents.shape[0], dtype=torch.bool)
    return diffusion_loss(
        pred,
        training_target(noise_scheduler, latents, noise, timesteps),
        timesteps,
        is_class.to(pred.device),
        alphas_cumprod=noise_scheduler.alphas_cumprod,
        prediction_type=noise_scheduler.config.prediction_type,
        snr_gamma=snr_gamma,
        prior_loss_weight=prior_loss_weight,
    )
