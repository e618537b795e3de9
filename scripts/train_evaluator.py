"""Train the toy-world evaluator (shape/colour classifier + embedding) on procedural images, deterministically.

    python scripts/train_evaluator.py            # writes gralora_diffusion/assets/evaluator.safetensors (+ .json)

About four minutes on 2 CPU cores. Reports accuracy on fresh procedural images it never trained on.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import ImageFilter
from safetensors.torch import save_file

from gralora_diffusion.evaluator import WEIGHTS, ShapeEvaluator, to_pixels
from gralora_diffusion.world import ALL_COLORS, ALL_SHAPES, render, sample_scene


def make_set(seed: int, count: int):
    """Images of every shape (the held-out moon included) in every colour, degraded like generations.

    Half are blurred, all get a little pixel noise, half get a colour cast (each channel shifted by up to 15/255) and
    half lose some contrast: what a small VAE's round trip and a diffusion sampler do to an image, and what DINO or
    CLIP would shrug off. The classes stay far apart (the closest two colours differ by 90/255 in one channel).
    """
    rng = random.Random(f"evaluator:{seed}")
    images, shapes, colors = [], [], []
    color_names = list(ALL_COLORS)
    for _ in range(count):
        shape, color = rng.choice(ALL_SHAPES), rng.choice(color_names)
        scene = sample_scene(rng, shape=shape, color=color)
        image = render(scene)
        if rng.random() < 0.5:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
        images.append(image)
        shapes.append(ALL_SHAPES.index(shape))
        colors.append(color_names.index(color))
    pixels = to_pixels(images)
    noise = torch.Generator().manual_seed(seed)
    n = len(images)
    pixels = pixels + 0.04 * torch.rand(n, 1, 1, 1, generator=noise) * torch.randn(pixels.shape, generator=noise)
    cast = (torch.rand(n, 3, 1, 1, generator=noise) * 2 - 1) * (15 / 255)
    pixels = pixels + cast * (torch.rand(n, 1, 1, 1, generator=noise) < 0.5)
    contrast = 1 - 0.2 * torch.rand(n, 1, 1, 1, generator=noise) * (torch.rand(n, 1, 1, 1, generator=noise) < 0.5)
    mean = pixels.mean(dim=(1, 2, 3), keepdim=True)
    pixels = (mean + (pixels - mean) * contrast).clamp(0, 1)
    return pixels, torch.tensor(shapes), torch.tensor(colors)


@torch.no_grad()
def accuracy(model, pixels, shapes, colors) -> tuple[float, float]:
    model.eval()
    _, s, c = model(pixels)
    return (s.argmax(1) == shapes).float().mean().item(), (c.argmax(1) == colors).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_images", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.time()
    train = make_set(0, args.train_images)
    held_out = make_set(1, 2000)
    model = ShapeEvaluator()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * (args.train_images // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    order = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(args.train_images, generator=order)
        for i in range(0, args.train_images - 127, 128):
            idx = perm[i : i + 128]
            _, s, c = model(train[0][idx])
            loss = F.cross_entropy(s, train[1][idx]) + F.cross_entropy(c, train[2][idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        shape_acc, color_acc = accuracy(model, *held_out)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out shape {shape_acc:.3f}, colour {color_acc:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(args.out)
    report = {"held_out_shape_accuracy": shape_acc, "held_out_color_accuracy": color_acc, "held_out_images": 2000,
              "train_images": args.train_images, "epochs": args.epochs, "seconds": time.time() - start}  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
