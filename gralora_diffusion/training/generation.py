"""Images the trainer generates with the model it is training: prior-preservation class images and validation."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..fs import write_file_atomically
from .data import IMAGE_SUFFIXES


def _save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically, so an interrupted run never leaves a broken image."""
    write_file_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def ensure_class_images(
    pipe,
    class_dir: str | Path,
    class_prompt: str,
    num_class_images: int,
    *,
    seed: int,
    resolution: int,
    batch_size: int = 4,
    num_inference_steps: int = 25,
    log=print,
) -> int:
    """Top ``class_dir`` up to ``num_class_images`` images of ``class_prompt`` generated with the base ``pipe``.

    Image i is drawn with seed (seed, i) and saved as ``class-<i>.png`` as soon as it exists, so an interrupted run
    resumes where it stopped and reruns give the same images. Returns how many images were generated.
    """
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = [p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if len(existing) >= num_class_images:
        return 0
    taken = {p.name for p in existing}
    todo = [i for i in range(num_class_images) if f"class-{i:05d}.png" not in taken]
    todo = todo[: num_class_images - len(existing)]
    log(f"Generating {len(todo)} class images for prior preservation ({class_prompt!r}) in {class_dir}")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed * 100003 + i) for i in chunk]
        images = pipe(
            [class_prompt] * len(chunk),
            num_inference_steps=num_inference_steps,
            height=resolution,
            width=resolution,
            generator=generators,
        ).images
        for i, image in zip(chunk, images):
            _save_png(image, class_dir / f"class-{i:05d}.png")
    return len(todo)


def generate_validation_images(
    pipe,
    prompts: list[str],
    num_images: int,
    *,
    seed: int,
    resolution: int,
    out_dir: str | Path,
    num_inference_steps: int = 25,
) -> list[tuple[Path, str]]:
    """``num_images`` images per prompt with fixed seeds (comparable across steps), saved as PNGs in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for p, prompt in enumerate(prompts):
        for j in range(num_images):
            generator = torch.Generator().manual_seed(seed + j)
            image = pipe(
                prompt,
                num_inference_steps=num_inference_steps,
                height=resolution,
                width=resolution,
                generator=generator,
            ).images[0]
            path = out_dir / f"prompt{p}-{j}.png"
            _save_png(image, path)
            saved.append((path, prompt))
    return saved
