"""The main job on the toy default: build the offline SDXL base, train a GraLoRA adapter on a small subject with the
DreamBooth trainer, then blend it with a second adapter, fuse, and generate.

    python -m gralora_diffusion.demo --out outputs/demo

Writes ``grid.png`` (base | subject adapter | style adapter | blend | fused blend) and ``demo.json`` with the training
loss before and after, timings and the fused-vs-unfused difference. The toy base is randomly initialised and the
"style" adapter is untrained (random), so the pictures are noise: the demo shows the whole path working (training
lowers the loss on the subject, each adapter changes the output, fusing changes nothing), not image quality.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import adapters as api
from .toy import save_random_toy_adapter, toy_sdxl_base_dir


def write_subject_images(folder: Path, count: int = 4) -> Path:
    """A tiny DreamBooth subject: a red disc on white, in a few positions."""
    from PIL import ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        ImageDraw.Draw(image).ellipse((8 + 4 * i, 10, 48 + 4 * i, 50), fill=(220, 30, 40))
        image.save(folder / f"subject{i}.png")
    return folder


def train_subject(out_dir: Path, base: str, steps: int, prompt: str) -> Path:
    """Run the DreamBooth trainer (in this process) on the subject images; return the adapter file."""
    from .training.dreambooth import main as train_main

    instances = write_subject_images(out_dir / "instances")
    train_dir = out_dir / "sks-shape"
    code = train_main(
        [
            f"--pretrained_model_name_or_path={base}", f"--instance_data_dir={instances}",
            f"--instance_prompt={prompt}", f"--output_dir={train_dir}", "--resolution=64", "--train_batch_size=2",
            "--rank=8", "--learning_rate=5e-3", "--lr_warmup_steps=0", f"--max_train_steps={steps}",
            f"--checkpointing_steps={steps}", "--report_to=none", "--overwrite_output_dir", "--seed=0",
        ]
    )  # fmt: skip
    if code != 0:
        raise SystemExit(code)
    return train_dir / "sks-shape.safetensors"


def _generate(pipe, prompt: str, seed: int, steps: int, size: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompt, num_inference_steps=steps, height=size, width=size, generator=generator, output_type="np")
    return out.images[0]


def _grid(images: list[np.ndarray], scale: int) -> Image.Image:
    row = np.concatenate([(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images], axis=1)
    picture = Image.fromarray(row)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def run_demo(
    out_dir: Path, base: str | None, steps: int, size: int, seed: int, prompt: str, train_steps: int = 30
) -> dict:
    from diffusers import StableDiffusionXLPipeline

    out_dir.mkdir(parents=True, exist_ok=True)
    base_path = base or str(toy_sdxl_base_dir())
    t0 = time.perf_counter()
    subject = train_subject(out_dir, base_path, train_steps, prompt)
    t_train = time.perf_counter() - t0
    training = json.loads((subject.parent / "train_metrics.json").read_text())

    t0 = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(base_path)
    pipe.set_progress_bar_config(disable=True)
    t_load = time.perf_counter() - t0
    style = save_random_toy_adapter(out_dir / "style.safetensors", seed=2, rank=16, gralora_k=4, text_encoders=())
    images = {"base": _generate(pipe, prompt, seed, steps, size)}
    api.load_gralora_weights(pipe, subject, adapter_name="subject")
    api.load_gralora_weights(pipe, style, adapter_name="style")
    for name in ("subject", "style"):
        api.set_gralora_adapters(pipe, [name])
        images[name] = _generate(pipe, prompt, seed, steps, size)
    api.set_gralora_adapters(pipe, ["subject", "style"], [0.7, 0.4])
    t0 = time.perf_counter()
    images["blend 0.7 subject + 0.4 style"] = _generate(pipe, prompt, seed, steps, size)
    t_unfused = time.perf_counter() - t0
    t0 = time.perf_counter()
    api.fuse_gralora(pipe)
    t_fuse = time.perf_counter() - t0
    t0 = time.perf_counter()
    images["fused blend"] = _generate(pipe, prompt, seed, steps, size)
    t_fused = time.perf_counter() - t0

    grid_path = out_dir / "grid.png"
    _grid(list(images.values()), scale=max(1, 256 // size)).save(grid_path)
    report = {
        "base": base_path,
        "prompt": prompt,
        "columns": list(images),
        "training": {
            "steps": training["steps"],
            "eval_loss_before": training["initial_eval_loss"],
            "eval_loss_after": training["final_eval_loss"],
            "seconds": t_train,
        },
        "max_abs_diff_fused_vs_unfused": float(
            np.abs(images["fused blend"] - images["blend 0.7 subject + 0.4 style"]).max()
        ),
        "mean_abs_diff_vs_base": {
            k: float(np.abs(v - images["base"]).mean()) for k, v in images.items() if k != "base"
        },
        "seconds": {"load_base": t_load, "fuse": t_fuse, "generate_unfused": t_unfused, "generate_fused": t_fused},
        "grid": str(grid_path),
    }
    (out_dir / "demo.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    parser.add_argument("--base", default=None, help="diffusers SDXL folder or id (default: the offline toy base)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="a photo of sks shape")
    parser.add_argument("--train_steps", type=int, default=30)
    args = parser.parse_args(argv)
    report = run_demo(args.out, args.base, args.steps, args.size, args.seed, args.prompt, args.train_steps)
    t = report["training"]
    print(f"base: {report['base']}")
    print(
        f"trained 'subject' for {t['steps']} steps in {t['seconds']:.1f} s: loss on the subject images "
        f"{t['eval_loss_before']:.4f} -> {t['eval_loss_after']:.4f}"
    )
    for name, diff in report["mean_abs_diff_vs_base"].items():
        print(f"  {name:<30} mean |image - base| = {diff:.4f}")
    print(f"fused vs unfused blend: max abs diff {report['max_abs_diff_fused_vs_unfused']:.2e}")
    s = report["seconds"]
    print(
        f"seconds: load {s['load_base']:.2f}, generate unfused {s['generate_unfused']:.3f}, "
        f"fuse {s['fuse']:.3f}, generate fused {s['generate_fused']:.3f}"
    )
    print(f"wrote {report['grid']}")


if __name__ == "__main__":
    main()
