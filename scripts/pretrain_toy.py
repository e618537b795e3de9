"""Pretrain the toy SDXL base on the procedural shape world, deterministically, on a CPU.

    python scripts/pretrain_toy.py --out gralora_diffusion/assets/toy-sdxl-world

Stage 1 trains the VAE to reconstruct world images; stage 2 trains the UNet (epsilon prediction, SDXL's text and
time-id conditioning, 10% empty captions for classifier-free guidance) on latents of world images with their
captions; the text encoders stay frozen at their random initialisation. The held-out subject (the teal moon) is never
shown. Finally the saved pipeline is judged: for seen prompts, the share of generated images whose shape and colour
the evaluator recognises. Writes the diffusers folder (safetensors) and ``pretrain_report.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gralora_diffusion.evaluator import judge, load_evaluator, to_pixels
from gralora_diffusion.toy import build_toy_sdxl_pipeline
from gralora_diffusion.training.text import encode_prompts
from gralora_diffusion.world import COLORS, SHAPES, Scene, render, world_example


def world_batch(start: int, count: int, seed: int):
    examples = [world_example(seed, i) for i in range(start, start + count)]
    return to_pixels([im for im, _ in examples]) * 2 - 1, [s.caption for _, s in examples]


def train_vae(vae, minutes: float, log) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    deadline, step = time.time() + minutes * 60, 0
    vae.train()
    while time.time() < deadline:
        pixels, _ = world_batch(step * 32, 32, seed=100)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator=torch.Generator().manual_seed(step))).sample
        kl = posterior.kl().mean() / (pixels.shape[1] * pixels.shape[2] * pixels.shape[3])
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + 1e-4 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            log(f"vae step {step}: loss {loss.item():.4f}")
        step += 1
    vae.eval()


def train_unet(pipe, minutes: float, batch: int, log) -> int:
    from diffusers import DDPMScheduler

    unet, vae = pipe.unet, pipe.vae
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def embed(captions):
        for c in set(captions) - set(cache):
            e, p = encode_prompts(encoders, tokenizers, [c])
            cache[c] = (e[0], p[0])
        return torch.stack([cache[c][0] for c in captions]), torch.stack([cache[c][1] for c in captions])

    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    unet.train()
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)
    deadline, step = time.time() + minutes * 60, 0
    gen = torch.Generator().manual_seed(0)
    while time.time() < deadline:
        pixels, captions = world_batch(step * batch, batch, seed=0)
        captions = [c if torch.rand(1, generator=gen).item() > 0.1 else "" for c in captions]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        embeds, pooled = embed(captions)
        pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0:
            log(f"unet step {step}: loss {loss.item():.4f}")
        step += 1
    unet.eval()
    return step


@torch.no_grad()
def judge_pipeline(pipe, per_prompt: int = 2, steps: int = 20, guidance: float = 5.0) -> dict:
    evaluator = load_evaluator()
    prompts = [
        Scene(shape, color, "white" if color != "white" else "black", 15, (32, 32), 0).caption
        for shape in SHAPES
        for color in COLORS
    ]
    correct = both = 0
    rows = []
    for i, prompt in enumerate(prompts):
        images = pipe(
            [prompt] * per_prompt, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
            generator=[torch.Generator().manual_seed(1000 + i * per_prompt + j) for j in range(per_prompt)],
        ).images  # fmt: skip
        verdict = judge(evaluator, images)
        words = prompt.split()
        color, shape = words[1], words[2]
        for s, c in zip(verdict["shape"], verdict["color"]):
            correct += (s == shape) + (c == color)
            both += s == shape and c == color
        rows.append({"prompt": prompt, "shapes": verdict["shape"], "colors": verdict["color"]})
    n = len(prompts) * per_prompt
    return {"images": n, "shape_and_color_correct": both / n, "attribute_accuracy": correct / (2 * n), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gralora_diffusion/assets/toy-sdxl-world"))
    parser.add_argument("--vae_minutes", type=float, default=4)
    parser.add_argument("--unet_minutes", type=float, default=22)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    log_lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    pipe = build_toy_sdxl_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    for model in (pipe.text_encoder, pipe.text_encoder_2):
        model.requires_grad_(False)
    start = time.time()
    train_vae(pipe.vae, args.vae_minutes, log)
    pipe.vae.requires_grad_(False)
    steps = train_unet(pipe, args.unet_minutes, args.batch, log)
    trained = time.time() - start
    report = judge_pipeline(pipe)
    report.update({"unet_steps": steps, "train_seconds": trained, "vae_minutes": args.vae_minutes})
    log(f"shape and colour correct: {report['shape_and_color_correct']:.3f} over {report['images']} images")
    pipe.save_pretrained(args.out, safe_serialization=True)
    (args.out / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    # a look at what it draws
    sample = pipe(["a red circle on a white background", "a blue star on a yellow background"], num_inference_steps=20,
                  height=64, width=64, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images  # fmt: skip
    for i, im in enumerate(sample):
        im.save(args.out / f"sample{i}.png")
    _ = render  # the world renderer defines the prompts' meaning


if __name__ == "__main__":
    main()
