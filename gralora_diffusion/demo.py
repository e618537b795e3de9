"""The main job on the toy default: teach the pretrained toy SDXL base a subject it has never seen with the DreamBooth
trainer, then compare base and adapter, blend the adapter at half weight, and fuse it.

    python -m gralora_diffusion.demo --out outputs/demo

The base (``gralora_diffusion/assets/toy-sdxl-world``, made by ``scripts/pretrain_toy.py``) draws coloured shapes
from captions such as "a red star on a gray background"; the subject is the held-out teal crescent moon of
``examples/sks-shape/`` with the trigger prompt "a photo of sks shape". Writes ``grid.png`` (one row per prompt: the
trigger and two unrelated prompts; columns: base | adapter at 0.5 | adapter at 1.0, two seeds each) and ``demo.json``
with the training loss, the evaluator's subject similarity and recognition rate for base and adapter, the drift on
the unrelated prompts, the fused-vs-unfused difference and timings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import adapters as api
from .bases import resolve_base, shown_path
from .fs import write_file_atomically, write_text_atomically
from .world import SUBJECT_PROMPT, subject_example

UNRELATED_PROMPTS = ("a red circle on a white background", "a blue star on a yellow background")
SEEDS = (0, 1)


def write_subject_images(folder: Path, count: int = 5) -> Path:
    """The held-out subject's instance images (the same pictures as the repository's ``examples/sks-shape/``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        subject_example(i)[0].save(folder / f"sks-shape-{i}.png")
    return folder


def train_subject(out_dir: Path, base: str, steps: int, rank: int, learning_rate: float, text_encoder_lr: float | None):
    """Run the DreamBooth trainer (in this process) on the subject images; return its ``TrainResult``."""
    from .training.args import make_config
    from .training.dreambooth import train

    settings = dict(
        pretrained_model_name_or_path=base, instance_data_dir=str(write_subject_images(out_dir / "instances")),
        instance_prompt=SUBJECT_PROMPT, output_dir=str(out_dir / "sks-shape"), resolution=64, train_batch_size=4,
        rank=rank, learning_rate=learning_rate, lr_warmup_steps=0, max_train_steps=steps, checkpointing_steps=steps,
        report_to="none", overwrite_output_dir=True, seed=0,
    )  # fmt: skip
    if text_encoder_lr is not None:
        settings.update(train_text_encoder=True, text_encoder_lr=text_encoder_lr)
    return train(make_config(**settings))


def generate(pipe, prompts, seeds, steps: int, guidance: float) -> list[list[Image.Image]]:
    """Images of every prompt (rows) for every seed (columns); the same seeds give the same starting noise."""
    rows = []
    for prompt in prompts:
        rows.append(
            pipe(
                [prompt] * len(seeds), num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                generator=[torch.Generator().manual_seed(s) for s in seeds],
            ).images
        )  # fmt: skip
    return rows


def _grid(columns: dict[str, list[list[Image.Image]]], scale: int = 3) -> Image.Image:
    """Column groups side by side (each: rows of images), a label above each group."""
    groups = list(columns.items())
    rows, per_group = len(groups[0][1]), len(groups[0][1][0])
    cell, gap, header = 64 * scale, 8, 14
    width = len(groups) * (per_group * cell + gap) - gap
    picture = Image.new("RGB", (width, header + rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    for g, (label, images) in enumerate(groups):
        x0 = g * (per_group * cell + gap)
        draw.text((x0 + 2, 1), label, fill=(0, 0, 0))
        for r, row in enumerate(images):
            for c, image in enumerate(row):
                picture.paste(image.resize((cell, cell), Image.NEAREST), (x0 + c * cell, header + r * cell))
    return picture


def _pixels(rows: list[list[Image.Image]]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) for row in rows for im in row])


def run_demo(
    out_dir: Path,
    base: str | None = None,
    *,
    train_steps: int = 300,
    rank: int = 16,
    learning_rate: float = 1e-3,
    text_encoder_lr: float | None = None,
    sampling_steps: int = 20,
    guidance: float = 3.0,
) -> dict:
    from diffusers import StableDiffusionXLPipeline

    from .evaluator import load_evaluator, subject_scores

    out_dir.mkdir(parents=True, exist_ok=True)
    base_path = resolve_base("toy-world" if base is None else base)
    t0 = time.perf_counter()
    training = train_subject(out_dir, base_path, train_steps, rank, learning_rate, text_encoder_lr)
    adapter = training.adapter
    t_train = time.perf_counter() - t0

    pipe = StableDiffusionXLPipeline.from_pretrained(base_path)
    pipe.set_progress_bar_config(disable=True)
    prompts = (SUBJECT_PROMPT, *UNRELATED_PROMPTS)
    settings = (SEEDS, sampling_steps, guidance)
    t0 = time.perf_counter()
    columns = {"base": generate(pipe, prompts, *settings)}
    t_generate = time.perf_counter() - t0
    api.load_gralora_weights(pipe, adapter, adapter_name="sks")
    api.set_gralora_adapters(pipe, ["sks"], [0.5])
    columns["sks x 0.5"] = generate(pipe, prompts, *settings)
    api.set_gralora_adapters(pipe, ["sks"], [1.0])
    columns["sks x 1.0"] = generate(pipe, prompts, *settings)
    t0 = time.perf_counter()
    api.fuse_gralora(pipe)
    t_fuse = time.perf_counter() - t0
    fused = generate(pipe, prompts, *settings)

    evaluator = load_evaluator()
    instances = [subject_example(i)[0] for i in range(5)]
    base_unrelated = [im for row in columns["base"][1:] for im in row]
    scores = {
        name: subject_scores(evaluator, instances, rows[0], [im for row in rows[1:] for im in row], base_unrelated)
        for name, rows in columns.items()
    }

    grid_path = out_dir / "grid.png"
    grid = _grid(columns)
    write_file_atomically(grid_path, lambda tmp: grid.save(tmp, format="PNG"))
    report = {
        "base": shown_path(base_path),
        "prompts": list(prompts),
        "seeds": list(SEEDS),
        "columns": list(columns),
        "training": {
            "steps": training.steps,
            "rank": rank,
            "learning_rate": learning_rate,
            "eval_loss_before": training.initial_eval_loss,
            "eval_loss_after": training.final_eval_loss,
            "seconds": t_train,
        },
        "scores": scores,
        "max_abs_pixel_diff_fused_vs_unfused": float(np.abs(_pixels(fused) - _pixels(columns["sks x 1.0"])).max()),
        "seconds": {"generate_6_images": t_generate, "fuse": t_fuse},
        "grid": str(grid_path),
    }
    write_text_atomically(out_dir / "demo.json", json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    parser.add_argument("--base", default=None, help="SDXL folder, or toy / toy-world (default: toy-world)")
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="the quality benchmark's pick at rank 16")
    parser.add_argument(
        "--text_encoder_lr", type=float, default=None, help="also train both text encoders' adapters at this lr"
    )
    parser.add_argument("--sampling_steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args(argv)
    report = run_demo(
        args.out,
        args.base,
        train_steps=args.train_steps,
        rank=args.rank,
        learning_rate=args.learning_rate,
        text_encoder_lr=args.text_encoder_lr,
        sampling_steps=args.sampling_steps,
        guidance=args.guidance,
    )
    t = report["training"]
    print(f"base: {report['base']}")
    print(
        f"trained a rank-{t['rank']} GraLoRA adapter for {t['steps']} steps in {t['seconds']:.0f} s: loss on the "
        f"subject images {t['eval_loss_before']:.4f} -> {t['eval_loss_after']:.4f}"
    )
    print(f"{'':<10} similarity to the subject  recognised as the subject  drift on unrelated prompts")
    for name, s in report["scores"].items():
        print(f"{name:<10} {s['similarity']:>25.3f}  {s['recognised']:>25.0%}  {s['drift']:>26.3f}")
    print(f"fused vs unfused adapter: max abs pixel difference {report['max_abs_pixel_diff_fused_vs_unfused']:.0f}")
    print(f"wrote {report['grid']}")


if __name__ == "__main__":
    main()
