"""The main job on the toy default: build the offline SDXL base, load two GraLoRA adapters, blend, fuse, generate.

    python -m gralora_diffusion.demo --out outputs/demo

Writes ``grid.png`` (base | adapter a | adapter b | blend | fused blend) and ``demo.json`` with timings and the
fused-vs-unfused difference. Until the trainer lands, the two adapters are untrained random GraLoRA adapters, so the
images show the plumbing (each adapter changes the output, the blend differs from both, fusing changes nothing), not
a learned subject.
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


def _generate(pipe, prompt: str, seed: int, steps: int, size: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompt, num_inference_steps=steps, height=size, width=size, generator=generator, output_type="np")
    return out.images[0]


def _grid(images: list[np.ndarray], scale: int) -> Image.Image:
    row = np.concatenate([(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images], axis=1)
    picture = Image.fromarray(row)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def run_demo(out_dir: Path, base: str | None, steps: int, size: int, seed: int, prompt: str) -> dict:
    from diffusers import StableDiffusionXLPipeline

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base_path = base or str(toy_sdxl_base_dir())
    pipe = StableDiffusionXLPipeline.from_pretrained(base_path)
    pipe.set_progress_bar_config(disable=True)
    t_load = time.perf_counter() - t0

    a = save_random_toy_adapter(out_dir / "adapter_a.safetensors", seed=1, rank=8)
    b = save_random_toy_adapter(out_dir / "adapter_b.safetensors", seed=2, rank=16, gralora_k=4, text_encoders=())
    images = {"base": _generate(pipe, prompt, seed, steps, size)}
    api.load_gralora_weights(pipe, a, adapter_name="a")
    api.load_gralora_weights(pipe, b, adapter_name="b")
    for name in ("a", "b"):
        api.set_gralora_adapters(pipe, [name])
        images[name] = _generate(pipe, prompt, seed, steps, size)
    api.set_gralora_adapters(pipe, ["a", "b"], [0.7, 0.4])
    t0 = time.perf_counter()
    images["blend 0.7a+0.4b"] = _generate(pipe, prompt, seed, steps, size)
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
        "max_abs_diff_fused_vs_unfused": float(np.abs(images["fused blend"] - images["blend 0.7a+0.4b"]).max()),
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
    parser.add_argument("--prompt", default="a photo of sks dog")
    args = parser.parse_args(argv)
    report = run_demo(args.out, args.base, args.steps, args.size, args.seed, args.prompt)
    print(f"base: {report['base']}")
    for name, diff in report["mean_abs_diff_vs_base"].items():
        print(f"  {name:<16} mean |image - base| = {diff:.4f}")
    print(f"fused vs unfused blend: max abs diff {report['max_abs_diff_fused_vs_unfused']:.2e}")
    s = report["seconds"]
    print(
        f"seconds: load {s['load_base']:.2f}, generate unfused {s['generate_unfused']:.3f}, "
        f"fuse {s['fuse']:.3f}, generate fused {s['generate_fused']:.3f}"
    )
    print(f"wrote {report['grid']}")


if __name__ == "__main__":
    main()
