"""Pretrain the toy SDXL base on the procedural shape world, deterministically, on a CPU.

    python scripts/pretrain_toy.py --out gralora_diffusion/assets/toy-sdxl-world

Stage 1 trains the VAE to reconstruct world images and randomly coloured shapes (stage 1b, off by default, then
fine-tunes its decoder alone: see ``train_vae`` for what the shipped VAE gets wrong and what was measured), then sets
its ``scaling_factor`` to 1 / the standard deviation of its latents (what SD's authors did for their VAEs:
unit-variance latents, so the noise schedule means what it says). Stage 2 trains the UNet (epsilon prediction as
SDXL, Min-SNR-5 weighting, SDXL's text and time-id conditioning, 10% empty captions for classifier-free guidance, an
exponential moving average of the weights) on latents of a fixed set of world images (encoded once) with their
captions; the two tiny text encoders start random and, by default, train with the UNet (frozen random encoders give
an almost constant pooled embedding, and on a GPU sweep the frozen variant learned about half as fast). The held-out
subject (the teal moon) is never shown. Budgets are step counts, so a run is deterministic for a machine and thread
count. Finally the saved pipeline (EMA weights) is judged: for each seen shape x colour prompt, the share of
generated images in which the evaluator recognises both the asked shape and colour. Writes the diffusers folder
(safetensors; with ``--unet_dtype float16`` the UNet's weights in float16, which diffusers loads back as float32,
and the judged model is the rounded one) and ``pretrain_report.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gralora_diffusion.evaluator import judge, load_evaluator, recognised_share, to_pixels
from gralora_diffusion.toy import build_toy_sdxl_pipeline
from gralora_diffusion.training.text import PromptCache, encode_prompts
from gralora_diffusion.world import (
    CODEC_RANDOM_SHARE,
    SUBJECT_COLOR,
    codec_example,
    seen_prompts,
    subject_example,
    world_example,
)

WORLD_SEED = 0


def world_batch(start: int, count: int, seed: int, device) -> tuple[torch.Tensor, list[str]]:
    examples = [world_example(seed, i) for i in range(start, start + count)]
    return (to_pixels([im for im, _ in examples]) * 2 - 1).to(device), [s.caption for _, s in examples]


def cosine_lr(step: int, total: int, warmup: int = 200, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def codec_batch(
    start: int, count: int, seed: int, device, random_share: float = CODEC_RANDOM_SHARE
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE training images (world images and randomly coloured shapes) in [-1, 1] and their background RGBs."""
    examples = [codec_example(seed, i, random_share) for i in range(start, start + count)]
    pixels = (to_pixels([im for im, _ in examples]) * 2 - 1).to(device)
    return pixels, torch.tensor([bg for _, bg in examples], dtype=torch.float32)


def object_mask(pixels: torch.Tensor, backgrounds: torch.Tensor) -> torch.Tensor:
    """1 where a pixel differs from its image's background colour (RGB 0-255, one row per image), else 0."""
    backgrounds = (backgrounds / 255 * 2 - 1).to(pixels.device)[:, :, None, None]
    return ((pixels - backgrounds).abs().sum(dim=1, keepdim=True) > 0.1).float()


def train_vae(
    vae,
    steps: int,
    batch: int,
    lr: float,
    device,
    log,
    object_weight: float = 4.0,
    random_share: float = CODEC_RANDOM_SHARE,
) -> None:
    """Reconstruction (L1 + MSE, pixels of the shape weighted ``1 + object_weight``) plus a small KL term.

    The shape covers a fifth of an image or less; unweighted, a VAE could draw it in the wrong colour at little
    cost, and did (green decoded as black, red as orange). A ``random_share`` of the images are shapes in random RGB
    colours: trained on the world's eight colours alone, the VAE decoded the held-out subject's teal as blue.
    Half of them made a blurrier VAE (world images recognised after a round trip: 87%); a quarter: 94.5-96%, and teal
    survives as well (3 of the 5 subject images, as with half).

    That was not enough: with 4 latent channels and group norms of two channels each (8 groups), the VAE drew
    colours it had not been drilled on wrongly (the subject's teal foreground off by 40-66 levels, as blue): on a
    flat image a group norm over two channels keeps little more than the signs of their contrast with the
    background, and the encoder put teal's latent next to blue's (the shape's latent centre differed by about 0.06
    where the posterior's spread is 0.05-0.27). Neither 3000 decoder-only steps nor 3000 steps of the whole VAE that
    kept the world's latents in place fixed it (40-66 levels). The shipped VAE: one group per norm, half the images in
    random colours, 3000 steps, then 1500 decoder-only steps: all five subject images judged teal moons after a round
    trip (foreground colour 22-33 levels off, blurred at the crescent's thin tips), world round trips 98.4%. Eight
    latent channels drew colour no better here (28-36 levels) and came out with channel spreads of 0.7 to 3.9 under
    one scaling factor, the likely reason a UNet learned them worse (45.8% of world prompts right; see
    ``--standardise_latents``).
    """
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, warmup=50))
    vae.train()
    for step in range(steps):
        pixels, backgrounds = codec_batch(step * batch, batch, seed=100, device=device, random_share=random_share)
        weight = 1 + object_weight * object_mask(pixels, backgrounds)
        posterior = vae.encode(pixels).latent_dist
        generator = torch.Generator(device).manual_seed(step)
        recon = vae.decode(posterior.sample(generator=generator)).sample
        error = recon - pixels
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = ((error.abs() + error.square()) * weight).mean() / weight.mean() + 1e-4 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval()
    vae.requires_grad_(False)


def finetune_decoder(
    vae, steps: int, batch: int, lr: float, device, log, object_weight: float = 4.0, random_share: float = 0.5
) -> None:
    """Stage 1b: train the VAE's decoder alone (the encoder frozen, so the latents, and any UNet trained on them, stay
    valid; Stability fine-tuned SD's decoder the same way), on fresh images with ``random_share`` of them in random
    colours, with stage 1's reconstruction loss. Draws colours more exactly without touching the latent space."""
    trained = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    for param in trained:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, warmup=50))
    vae.eval()
    vae.decoder.train()
    for step in range(steps):
        pixels, backgrounds = codec_batch(step * batch, batch, seed=101, device=device, random_share=random_share)
        weight = 1 + object_weight * object_mask(pixels, backgrounds)
        with torch.no_grad():
            generator = torch.Generator(device).manual_seed(1_000_000 + step)
            latents = vae.encode(pixels).latent_dist.sample(generator=generator)
        error = vae.decode(latents).sample - pixels
        loss = ((error.abs() + error.square()) * weight).mean() / weight.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"decoder step {step}: loss {loss.item():.4f}")
    vae.eval()
    vae.requires_grad_(False)


@torch.no_grad()
def calibrate_scaling_factor(vae, device, images: int = 512) -> float:
    """Set the VAE's ``scaling_factor`` so that scaled latents of world images have unit standard deviation."""
    latents = []
    for start in range(0, images, 64):
        pixels, _ = world_batch(start, 64, seed=200, device=device)
        latents.append(vae.encode(pixels).latent_dist.sample(generator=torch.Generator(device).manual_seed(start)))
    factor = 1.0 / torch.cat(latents).float().std().item()
    vae.register_to_config(scaling_factor=factor)
    return factor


@torch.no_grad()
def standardise_latent_channels(vae, device, images: int = 512) -> dict:
    """Reparametrise the VAE so that each latent channel of world images has mean 0 and standard deviation 1, with
    ``scaling_factor`` 1: an exact change of coordinates (the mean and log-variance rows of ``quant_conv`` are shifted
    and scaled per channel, ``post_quant_conv``'s input columns undo it), so encode + decode is unchanged.

    One global factor (what SD's VAEs have) leaves channels with large offsets or spreads beside nearly flat ones;
    the UNet's noise schedule then hides the flat channels' content at small noise levels already. Returns the
    channels' means and standard deviations before."""
    latents = []
    for start in range(0, images, 64):
        pixels, _ = world_batch(start, 64, seed=200, device=device)
        latents.append(vae.encode(pixels).latent_dist.sample(generator=torch.Generator(device).manual_seed(start)))
    latents = torch.cat(latents).float()
    mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
    channels = mean.numel()
    quant, post = vae.quant_conv, vae.post_quant_conv
    # quant_conv's first `channels` outputs are the posterior mean, the next the log-variance
    quant.weight[:channels] /= std[:, None, None, None]
    quant.bias[:channels] = (quant.bias[:channels] - mean) / std
    quant.bias[channels:] -= 2 * torch.log(std)
    # post_quant_conv(z) with z = mean + std * z_new: weights scaled per input channel, the shift into the bias
    post.bias += (post.weight * mean[None, :, None, None]).sum(dim=(1, 2, 3))
    post.weight *= std[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0)
    return {"mean": mean.tolist(), "std": std.tolist()}


class EncodedWorld:
    """A fixed set of world images encoded once: the VAE posterior's mean and std of each, with its caption.

    Training steps then draw latents from it (a fresh sample of the posterior each time) instead of rendering and
    encoding images every step; ``size=0`` streams fresh images instead.
    """

    def __init__(self, vae, size: int, device, chunk: int = 64):
        self.vae, self.device, self.size = vae, device, size
        self.mean, self.std, self.captions = [], [], []
        with torch.no_grad():
            for start in range(0, size, chunk):
                pixels, captions = world_batch(start, min(chunk, size - start), seed=WORLD_SEED, device=device)
                posterior = vae.encode(pixels).latent_dist
                self.mean.append(posterior.mean)
                self.std.append(posterior.std)
                self.captions += captions
        if size:
            self.mean, self.std = torch.cat(self.mean), torch.cat(self.std)

    def batch(self, step: int, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        if self.size == 0:
            pixels, captions = world_batch(step * batch, batch, seed=WORLD_SEED, device=self.device)
            with torch.no_grad():
                posterior = self.vae.encode(pixels).latent_dist
            mean, std = posterior.mean, posterior.std
        else:
            index = torch.randint(0, self.size, (batch,), generator=gen)
            mean, std = self.mean[index.to(self.mean.device)], self.std[index.to(self.std.device)]
            captions = [self.captions[i] for i in index.tolist()]
        latents = mean + std * torch.randn(mean.shape, generator=gen).to(self.device)
        return latents * self.vae.config.scaling_factor, captions


def train_unet(
    pipe, steps, batch, lr, ema_decay, snr_gamma, train_text, device, log, on_eval=None, dataset_size: int = 0,
    compare_decays=(), uncond: str = "empty",
):  # fmt: skip
    """Train the UNet (and the text encoders if ``train_text``); returns EMA copies of what was trained, by name,
    and, for each of ``compare_decays``, another EMA copy kept alongside (0: the raw trained weights), by decay.

    ``on_eval(step, ema_modules)`` is called after every step. ``uncond`` is what a dropped caption (10% of them)
    becomes: ``"empty"`` the embeddings of the empty prompt, ``"zeros"`` zero embeddings, as SDXL was trained, and as
    diffusers' SDXL pipeline samples (``force_zeros_for_empty_prompt``: the unconditional half of classifier-free
    guidance is zeros, not the encoded empty prompt).
    """
    from diffusers import DDPMScheduler

    unet, vae = pipe.unet, pipe.vae
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = scheduler.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    if train_text:
        for encoder in encoders:
            encoder.requires_grad_(True).train()

        def embed(captions):
            return encode_prompts(encoders, tokenizers, captions)
    else:
        embed = PromptCache(encoders, tokenizers)

    params = list(unet.parameters()) + [p for e in encoders for p in e.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps))
    trained = {"unet": unet} | ({"text_encoder": encoders[0], "text_encoder_2": encoders[1]} if train_text else {})

    def copy_of_trained():
        return {name: copy.deepcopy(module).requires_grad_(False).eval() for name, module in trained.items()}

    decays = [ema_decay, *compare_decays]
    copies = [copy_of_trained() for _ in decays]
    ema_params = [[p for name in trained for p in ema[name].parameters()] for ema in copies]
    live_params = [p for name in trained for p in trained[name].parameters()]
    unet.train()
    size = 64.0
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch, device=device)
    gen = torch.Generator().manual_seed(0)
    world = EncodedWorld(vae, dataset_size, device)
    for step in range(steps):
        latents, captions = world.batch(step, batch, gen)
        drop = torch.rand(batch, generator=gen) < 0.1
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        embeds, pooled = embed(captions)
        if uncond == "zeros":  # SDXL's conditioning dropout: the dropped captions' embeddings are zeros
            keep = (~drop).to(device, embeds.dtype)
            embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        per_example = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = torch.clamp(snr[t], max=snr_gamma) / snr[t] if snr_gamma > 0 else torch.ones_like(per_example)
        loss = (per_example * weights).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for target, wanted in zip(ema_params, decays):
                torch._foreach_lerp_(target, live_params, 1 - min(wanted, (1 + step) / (10 + step)))
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f} lr {schedule.get_last_lr()[0]:.2e}")
        if on_eval is not None:
            on_eval(step + 1, copies[0])
    unet.eval()
    for encoder in encoders:
        encoder.requires_grad_(False).eval()
    return copies[0], dict(zip(compare_decays, copies[1:]))


@torch.no_grad()
def judge_round_trip(vae, pixels: torch.Tensor) -> dict:
    """The evaluator's verdict on ``pixels`` (in [-1, 1]) after a VAE encode + decode."""
    decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    arrays = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return judge(load_evaluator(), [Image.fromarray(a) for a in arrays])


def vae_round_trip_accuracy(vae, device, images: int = 256) -> float:
    """Share of world images whose shape and colour the evaluator still recognises after encode + decode."""
    pixels, captions = world_batch(0, images, seed=300, device=device)
    verdict = judge_round_trip(vae, pixels)
    truth = [c.split()[1:3] for c in captions]
    hits = [s == shape and c == color for s, c, (color, shape) in zip(verdict["shape"], verdict["color"], truth)]
    return sum(hits) / images


@torch.no_grad()
def subject_round_trip(vae) -> dict:
    """The five subject instance images after encode + decode (the VAE must be able to draw what DreamBooth runs will
    teach): the share still judged a teal moon, and per image the foreground colour error, the largest per-channel
    difference in pixel levels between the mean colours of the instance's solid teal pixels before and after."""
    images = [subject_example(i)[0] for i in range(5)]
    pixels = (to_pixels(images) * 2 - 1).to(vae.device)
    verdict = judge_round_trip(vae, pixels)
    decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).cpu().numpy()
    errors = [foreground_colour_error(np.asarray(image), after) for image, after in zip(images, decoded)]
    verdicts = list(zip(verdict["shape"], verdict["color"]))
    return {"recognised": recognised_share(verdict), "colour_error": errors, "verdicts": verdicts}


def vae_summary(round_trip: float, subject_trip: dict) -> str:
    errors = [round(e, 1) for e in subject_trip["colour_error"]]
    return (f"world images recognised after a round trip {round_trip:.3f}, subject images "
            f"{subject_trip['recognised']:.1f} (foreground colour errors {errors})")  # fmt: skip


def foreground_colour_error(before: np.ndarray, after: np.ndarray) -> float:
    """Largest per-channel difference (pixel levels) between the mean colours of ``before``'s subject-coloured
    pixels (within 30 levels of teal, summed over channels: the shape's solid inside) in ``before`` and ``after``."""
    before, after = before.astype(np.float64), after.astype(np.float64)
    inside = np.abs(before - SUBJECT_COLOR[1]).sum(axis=-1) < 30
    return float(np.abs(after[inside].mean(axis=0) - before[inside].mean(axis=0)).max())


@torch.no_grad()
def judge_pipeline(pipe, per_prompt: int = 3, steps: int = 20, guidance: float = 3.0, device="cpu") -> dict:
    """Generate ``per_prompt`` images for each seen shape x colour prompt; the evaluator names shape and colour."""
    evaluator = load_evaluator()
    pipe.set_progress_bar_config(disable=True)
    prompts = seen_prompts()
    both = attributes = 0
    rows = []
    for i, prompt in enumerate(prompts):
        images = pipe(
            [prompt] * per_prompt, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
            generator=[torch.Generator(device).manual_seed(1000 + i * per_prompt + j) for j in range(per_prompt)],
        ).images  # fmt: skip
        verdict = judge(evaluator, images)
        _, color, shape = prompt.split()[:3]
        hits = [(s == shape, c == color) for s, c in zip(verdict["shape"], verdict["color"])]
        both += sum(s and c for s, c in hits)
        attributes += sum(s + c for s, c in hits)
        rows.append({"prompt": prompt, "shapes": verdict["shape"], "colors": verdict["color"]})
    n = len(prompts) * per_prompt
    return {"images": n, "shape_and_color_correct": both / n, "attribute_accuracy": attributes / (2 * n), "rows": rows}


def same_pipeline(pipe, modules: dict):
    """``pipe`` with some of its models replaced (EMA copies), and its settings (the unconditional input) kept."""
    return type(pipe)(**(pipe.components | modules),
                      force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt)  # fmt: skip


def save_atomically(out: Path, model, report_name: str, report: dict, subfolder: str = "") -> None:
    """``model.save_pretrained`` (safetensors) into ``out/subfolder`` plus ``out/report_name``, written under a
    temporary name and renamed, so ``out`` is never left half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp / subfolder, safe_serialization=True)
    (tmp / report_name).write_text(json.dumps(report, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gralora_diffusion/assets/toy-sdxl-world"))
    parser.add_argument("--unet_channels", type=int, nargs=2, default=[48, 96])
    parser.add_argument("--layers_per_block", type=int, default=1)
    parser.add_argument("--mid_block", type=int, default=1, help="1: keep SDXL's middle block (0: leave it out)")
    parser.add_argument("--text_width", type=int, default=32, help="hidden size of each text encoder")
    parser.add_argument(
        "--transformer_layers", type=int, nargs=2, default=[1, 1], help="transformer blocks per attention, per level"
    )
    parser.add_argument("--vae_channels", type=int, nargs="+", default=[16, 32, 32])
    parser.add_argument("--vae_groups", type=int, default=1, help="group count of the VAE's group norms")
    parser.add_argument("--latent_channels", type=int, default=4, help="channels of the VAE's latents")
    parser.add_argument("--vae_steps", type=int, default=3000)
    parser.add_argument("--vae_batch", type=int, default=8)
    parser.add_argument("--vae_lr", type=float, default=3e-3)
    parser.add_argument("--vae_random_share", type=float, default=0.5, help="share of random-colour VAE images")
    parser.add_argument("--decoder_steps", type=int, default=1500, help="stage 1b: decoder-only steps (0: none)")
    parser.add_argument("--decoder_lr", type=float, default=1e-3)
    parser.add_argument("--decoder_random_share", type=float, default=0.5, help="share of random-colour images")
    parser.add_argument(
        "--finetune_decoder", type=Path, default=None,
        help="run only stage 1b on the saved base in this folder, re-judge it and rewrite its VAE and report "
        "(the UNet never sees the decoder, so this equals running stage 1b in a full run)",
    )  # fmt: skip
    parser.add_argument(
        "--standardise_latents", type=int, default=0,
        help="1: give each latent channel mean 0 and std 1 by an exact reparametrisation of the VAE (scaling_factor "
        "1) instead of one global scaling_factor",
    )  # fmt: skip
    parser.add_argument("--vae_only", action="store_true", help="stop after the VAE (writes the VAE and its report)")
    parser.add_argument(
        "--attention_levels", type=int, choices=[1, 2], default=1, help="UNet levels with attention (2: also the outer)"
    )
    parser.add_argument("--unet_steps", type=int, default=3400)
    parser.add_argument(
        "--unet_dtype", choices=["float16", "float32"], default="float32",
        help="dtype the UNet's weights are saved in (the base is judged with exactly the saved weights)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dataset_size", type=int, default=16384, help="world images encoded once (0: stream)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema_decay", type=float, default=0.995)
    parser.add_argument("--snr_gamma", type=float, default=5.0)
    parser.add_argument(
        "--uncond", choices=["empty", "zeros"], default="empty",
        help="dropped captions (10%%) train on the empty prompt's embeddings (the shipped base) or on zeros (SDXL's "
        "way)",
    )  # fmt: skip
    parser.add_argument(
        "--force_zeros_for_empty_prompt", type=int, choices=[0, 1], default=1,
        help="the saved pipeline's setting: 1 (SDXL's default, the shipped base) samples guidance's unconditional half "
        "from zero embeddings, 0 from the encoded empty prompt; see the README's seventh round for what each gives",
    )  # fmt: skip
    parser.add_argument("--train_text_encoders", type=int, default=1, help="1: train both text encoders with the UNet")
    parser.add_argument("--eval_at", type=int, nargs="*", default=[], help="also judge the EMA UNet at these steps")
    parser.add_argument(
        "--compare_ema", type=float, nargs="*", default=[],
        help="diagnostic: also keep EMA copies at these decays (0: the raw weights) and judge them at the end",
    )  # fmt: skip
    parser.add_argument("--vae_from", type=Path, default=None, help="reuse the VAE of an earlier run (skips stage 1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.finetune_decoder is not None:
        return finetune_saved_decoder(args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    random.seed(0)
    log_lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    arch = {"unet_channels": tuple(args.unet_channels), "layers_per_block": args.layers_per_block,
            "vae_channels": tuple(args.vae_channels), "transformer_layers": tuple(args.transformer_layers),
            "text_widths": (args.text_width, args.text_width), "mid_block": bool(args.mid_block),
            "vae_groups": args.vae_groups, "latent_channels": args.latent_channels,
            "attention_levels": args.attention_levels}  # fmt: skip
    pipe = build_toy_sdxl_pipeline(0, **arch)
    pipe.register_to_config(force_zeros_for_empty_prompt=bool(args.force_zeros_for_empty_prompt))
    pipe.set_progress_bar_config(disable=True)
    for model in (pipe.text_encoder, pipe.text_encoder_2):
        model.requires_grad_(False)
    pipe.to(device)
    start = time.time()
    reused_seconds = 0.0
    if args.vae_from:
        from diffusers import AutoencoderKL

        pipe.vae.load_state_dict(AutoencoderKL.from_pretrained(args.vae_from / "vae").state_dict())
        pipe.vae.requires_grad_(False).eval()
        earlier = args.vae_from / "vae_report.json"  # a --vae_only run: its time counts toward this base's
        if earlier.exists():
            earlier = json.loads(earlier.read_text())
            reused_seconds = earlier.get("vae_seconds", 0.0) + earlier.get("decoder_seconds", 0.0)
    else:
        train_vae(pipe.vae, args.vae_steps, args.vae_batch, args.vae_lr, device, log,
                  random_share=args.vae_random_share)  # fmt: skip
    vae_seconds = time.time() - start
    if args.decoder_steps and not args.vae_from:
        finetune_decoder(pipe.vae, args.decoder_steps, args.vae_batch, args.decoder_lr, device, log,
                         random_share=args.decoder_random_share)  # fmt: skip
    decoder_seconds = time.time() - start - vae_seconds
    if args.standardise_latents:
        channel_stats = standardise_latent_channels(pipe.vae, device)
        factor = 1.0
        log(f"latent channels standardised: means {[round(m, 2) for m in channel_stats['mean']]}, "
            f"stds {[round(v, 2) for v in channel_stats['std']]}")  # fmt: skip
    else:
        factor = calibrate_scaling_factor(pipe.vae, device)
    round_trip, subject_trip = vae_round_trip_accuracy(pipe.vae, device), subject_round_trip(pipe.vae)
    log(f"vae trained in {vae_seconds:.0f} s, decoder in {decoder_seconds:.0f} s; scaling_factor {factor:.4f}; "
        f"{vae_summary(round_trip, subject_trip)}")  # fmt: skip
    if args.vae_only:
        vae_report = {"vae_round_trip": round_trip, "vae_subject_round_trip": subject_trip,
                      "vae_seconds": vae_seconds, "decoder_seconds": decoder_seconds,
                      "settings": vars(args)}  # fmt: skip
        save_atomically(
            args.out, pipe.vae.to("cpu"), "vae_report.json", vae_report | {"log": log_lines}, subfolder="vae"
        )
        return
    checkpoints = {}

    def on_eval(step, ema):
        if step in args.eval_at:
            score = judge_pipeline(same_pipeline(pipe, ema), device=device)
            checkpoints[step] = {k: v for k, v in score.items() if k != "rows"} | {"seconds": time.time() - start}
            log(f"step {step}: shape and colour correct {score['shape_and_color_correct']:.3f}")

    ema, compared = train_unet(pipe, args.unet_steps, args.batch, args.lr, args.ema_decay, args.snr_gamma,
                               bool(args.train_text_encoders), device, log, on_eval, args.dataset_size,
                               args.compare_ema, args.uncond)  # fmt: skip
    for name, module in ema.items():
        getattr(pipe, name).load_state_dict(module.state_dict())
    saved_dtype = getattr(torch, args.unet_dtype)
    pipe.unet.to(saved_dtype).to(torch.float32)  # judge the weights that will be saved, rounding included
    trained = time.time() - start + reused_seconds
    variants = {decay: same_pipeline(pipe, modules) for decay, modules in compared.items()}
    for decay, variant in variants.items():
        score = judge_pipeline(variant, device=device)
        checkpoints[f"ema {decay}"] = {k: v for k, v in score.items() if k != "rows"}
        log(f"EMA decay {decay}: shape and colour correct {score['shape_and_color_correct']:.3f}")
    report = judge_pipeline(pipe, device=device)
    report.update({"architecture": arch, "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
                   "scaling_factor": factor, "vae_round_trip": round_trip, "vae_subject_round_trip": subject_trip,
                   "vae_seconds": vae_seconds, "decoder_seconds": decoder_seconds,
                   "reused_vae_seconds": reused_seconds, "train_seconds": trained, "threads": torch.get_num_threads(),
                   "checkpoints": checkpoints})  # fmt: skip
    log(f"shape and colour correct: {report['shape_and_color_correct']:.3f} over {report['images']} images")
    pipe.to("cpu").unet.to(saved_dtype)  # diffusers loads it back as float32
    save_atomically(args.out, pipe, "pretrain_report.json", report | {"log": log_lines})
    for decay, variant in variants.items():  # next to --out, for a closer look at each compared copy
        save_atomically(args.out.with_name(f"{args.out.name}-ema{decay}"), variant.to("cpu"), "checkpoint.json",
                        {"decay": decay})  # fmt: skip


def finetune_saved_decoder(args) -> None:
    """``--finetune_decoder DIR``: stage 1b on a saved base, then the base judged again and rewritten."""
    from diffusers import StableDiffusionXLPipeline

    folder = args.finetune_decoder
    report = json.loads((folder / "pretrain_report.json").read_text())
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    lines = report.pop("log", [])

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    start = time.time()
    finetune_decoder(pipe.vae, args.decoder_steps, report["settings"]["vae_batch"], args.decoder_lr, "cpu", log,
                     random_share=args.decoder_random_share)  # fmt: skip
    seconds = time.time() - start
    round_trip, subject_trip = vae_round_trip_accuracy(pipe.vae, "cpu"), subject_round_trip(pipe.vae)
    log(f"decoder fine-tuned in {seconds:.0f} s; {vae_summary(round_trip, subject_trip)}")
    judged = judge_pipeline(pipe)
    log(f"shape and colour correct: {judged['shape_and_color_correct']:.3f} over {judged['images']} images")
    report.update(judged)
    report["before_decoder_finetune"] = {k: report.get(k) for k in ("vae_round_trip", "vae_subject_round_trip")}
    report.update({"vae_round_trip": round_trip, "vae_subject_round_trip": subject_trip, "decoder_seconds": seconds})
    report["train_seconds"] += seconds
    report["settings"].update(decoder_steps=args.decoder_steps, decoder_lr=args.decoder_lr,
                              decoder_random_share=args.decoder_random_share)  # fmt: skip
    unet_dtype = report["settings"].get("unet_dtype", "float32")
    pipe.unet.to(getattr(torch, unet_dtype))
    save_atomically(folder, pipe, "pretrain_report.json", report | {"log": lines})


if __name__ == "__main__":
    main()
