"""DreamBooth quality on the toy world's held-out subject: full fine-tuning vs LoRA vs GraLoRA at equal parameters.

    python benchmarks/quality.py --base gralora_diffusion/assets/toy-sdxl-world            # the full table
    python benchmarks/quality.py --base DIR --methods lora-16 gralora-16 --seeds 0 --lrs 3e-3 --steps 20   # a look

Modelled on PEFT's image-generation benchmark (method_comparison/image-gen: DreamBooth "sks cat", DINO similarity to
the subject, "drift" on unrelated prompts), with the toy world's evaluator in DINO's place. Every method trains the
same UNet on the same five instance images of the teal moon (examples/sks-shape/, "a photo of sks shape", never seen
by the base), with the same steps, batch, noise, timesteps and adapter init (all drawn from the run's seed), AdamW at
a constant learning rate; the text encoders stay frozen. Methods:

  full           every UNet weight trained
  lora-R         PEFT LoRA rank R, alpha = R (diffusers' DreamBooth-LoRA default), UNet attention projections
  gralora-R      PEFT GraLoRA rank R, k and alpha by the paper's defaults, the same layers and parameter count
  hybrid-16      GraLoRA r = 12 with a plain-LoRA part hybrid_r = 4 (same parameters as rank 16)

The learning rate of each method is picked from ``--lrs`` (``--full_lrs`` for full fine-tuning) on the first seed by
subject similarity minus drift; the other seeds then run at that rate. Metrics, over fixed sampling seeds:
  similarity   mean cosine between evaluator embeddings of "a photo of sks shape" generations and the instances
  recognised   share of those generations the evaluator calls a teal moon
  drift        for unrelated prompts, mean (1 - cosine) between the embeddings of the base's and the tuned model's
               images from the same seed: how much fine-tuning changed what it was not asked to change
Writes ``benchmarks/results/quality.json`` and ``quality.md`` (median and range over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gralora_diffusion.bases import shown_path
from gralora_diffusion.evaluator import load_evaluator, subject_scores, to_pixels
from gralora_diffusion.training.loss import denoising_loss
from gralora_diffusion.training.text import PromptCache
from gralora_diffusion.world import SUBJECT_PROMPT

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
UNRELATED = ["a red circle on a white background", "a blue star on a yellow background",
             "a green square on a black background", "a purple heart on a gray background"]  # fmt: skip
METHODS = ["full", "lora-16", "gralora-16", "hybrid-16", "lora-64", "gralora-64", "lora-128", "gralora-128"]


def load_base(base: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    return pipe


def prepare(unet, method: str) -> list[torch.nn.Parameter]:
    """Make ``unet`` trainable the way ``method`` says; return the trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    from gralora_diffusion import add_gralora_adapter, make_gralora_config

    if method == "full":
        unet.requires_grad_(True)
    else:
        kind, rank = method.split("-")
        rank = int(rank)
        if kind == "lora":
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS), unet)
        elif kind == "gralora":
            add_gralora_adapter(unet, make_gralora_config(rank, "unet-attention"), component="unet")
        elif kind == "hybrid":
            config = make_gralora_config(rank - rank // 4, "unet-attention", hybrid_r=rank // 4)
            add_gralora_adapter(unet, config, component="unet")
        else:
            raise SystemExit(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return [p for p in unet.parameters() if p.requires_grad]


REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "sks-shape"


def instance_images() -> list:
    from PIL import Image

    paths = sorted(EXAMPLES.glob("*.png"))
    if not paths:
        raise SystemExit(f"no instance images in {EXAMPLES}: restore the repository's examples/ folder")
    return [Image.open(p).convert("RGB") for p in paths]


def instance_batch(pipe):
    images = instance_images()
    pixels = to_pixels(images) * 2 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    return images, latents


def train(pipe, method: str, lr: float, steps: int, batch: int, seed: int) -> tuple[int, float]:
    from diffusers import DDPMScheduler

    _, latents = instance_batch(pipe)
    torch.manual_seed(seed)  # adapter init draws from the global generator: a run depends on its own seed only
    params = prepare(pipe.unet, method)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    embed = PromptCache([pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
    embeds, pooled = embed([SUBJECT_PROMPT] * batch)
    size = float(latents.shape[-1] * pipe.vae_scale_factor)
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch)
    generator = torch.Generator().manual_seed(seed)
    pipe.unet.train()
    start = time.perf_counter()
    for _ in range(steps):
        pick = torch.randint(0, len(latents), (batch,), generator=generator)
        loss, _ = denoising_loss(pipe.unet, scheduler, latents[pick], embeds, pooled, time_ids, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    pipe.unet.eval()
    return sum(p.numel() for p in params), time.perf_counter() - start


@torch.no_grad()
def generate(pipe, prompts: list[str], per_prompt: int, steps: int, guidance: float):
    images = []
    for i, prompt in enumerate(prompts):
        seeds = [10_000 + 100 * i + j for j in range(per_prompt)]
        images += pipe(
            [prompt] * per_prompt, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
        ).images  # fmt: skip
    return images


def render(base_score: dict, steps: int, batch: int, seeds: list[int], table: list[dict], runs: list[dict]) -> str:
    """The markdown report: the table, then GraLoRA against LoRA at each rank seed by seed (a seed fixes the training
    noise and timesteps for both methods, so pairing removes the part of the seed-to-seed spread that they cause)."""
    lines = [
        f"Base: similarity {base_score['similarity']:.3f}, recognised {base_score['recognised']:.2f}. "
        f"{steps} steps, batch {batch}, median [min, max] over seeds {seeds}.",
        "",
        "| method | trainable params | lr | similarity | recognised | drift | train s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(row, key, fmt):
        m = row[key]
        return f"{m['median']:{fmt}} [{m['min']:{fmt}}, {m['max']:{fmt}}]"

    for row in table:
        lines.append(
            f"| {row['method']} | {row['params']:,} | {row['lr']:.0e} | {cell(row, 'similarity', '.3f')} | "
            f"{cell(row, 'recognised', '.2f')} | {cell(row, 'drift', '.3f')} | {row['train_seconds']['median']:.0f} |"
        )
    chosen = {row["method"]: row["lr"] for row in table}
    pairs = [(m, m.removeprefix("gra")) for m in chosen if m.startswith("gralora-") and m.removeprefix("gra") in chosen]
    if pairs:
        lines += ["", "GraLoRA - LoRA at equal rank, per seed (each at its picked lr):", ""]
    for mine, theirs in pairs:
        by_seed = [{r["seed"]: r for r in runs if r["method"] == m and r["lr"] == chosen[m]} for m in (mine, theirs)]
        common = sorted(by_seed[0].keys() & by_seed[1].keys())
        gaps = {k: [by_seed[0][s][k] - by_seed[1][s][k] for s in common] for k in ("similarity", "drift")}
        wins = sum(g > 0 for g in gaps["similarity"])
        lines.append(
            f"- {mine} vs {theirs}: similarity higher on {wins} of {len(common)} seeds, median gap "
            f"{statistics.median(gaps['similarity']):+.3f} [{min(gaps['similarity']):+.3f}, "
            f"{max(gaps['similarity']):+.3f}]; drift median gap {statistics.median(gaps['drift']):+.3f}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=Path("gralora_diffusion/assets/toy-sdxl-world"))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="adapters' lr grid")
    parser.add_argument("--full_lrs", type=float, nargs="+", default=[1e-4, 3e-4, 6e-4, 1e-3], help="full FT's lr grid")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=16, help="generations of the trigger prompt per run")
    parser.add_argument("--sampling_steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    args = parser.parse_args()
    if not (args.base / "model_index.json").exists():
        raise SystemExit(
            f"{args.base} is not a diffusers pipeline folder: pass --base (scripts/pretrain_toy.py makes one)"
        )
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}: use any of {', '.join(METHODS)}")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    torch.manual_seed(0)
    evaluator = load_evaluator()
    base = load_base(args.base)
    instances, _ = instance_batch(base)
    generation = (args.sampling_steps, args.guidance)
    base_subject = generate(base, [SUBJECT_PROMPT], args.images, *generation)
    base_unrelated = generate(base, UNRELATED, 2, *generation)
    base_score = subject_scores(evaluator, instances, base_subject, base_unrelated, base_unrelated)
    print(f"base: similarity {base_score['similarity']:.3f}, recognised {base_score['recognised']:.2f}")

    def run(method: str, lr: float, seed: int) -> dict:
        pipe = load_base(args.base)
        params, seconds = train(pipe, method, lr, args.steps, args.batch, seed)
        subject = generate(pipe, [SUBJECT_PROMPT], args.images, *generation)
        unrelated = generate(pipe, UNRELATED, 2, *generation)
        result = {"method": method, "lr": lr, "seed": seed, "params": params, "train_seconds": seconds}
        result |= subject_scores(evaluator, instances, subject, unrelated, base_unrelated)
        print(f"{method:>12} lr {lr:.0e} seed {seed}: sim {result['similarity']:.3f} "
              f"rec {result['recognised']:.2f} drift {result['drift']:.3f} ({seconds:.0f} s)", flush=True)  # fmt: skip
        return result

    runs, chosen = [], {}
    for method in args.methods:
        grid = args.full_lrs if method == "full" else args.lrs
        tuning = [run(method, lr, args.seeds[0]) for lr in grid]
        runs += tuning
        best = max(tuning, key=lambda r: r["similarity"] - r["drift"])
        chosen[method] = best["lr"]
        runs += [run(method, best["lr"], seed) for seed in args.seeds[1:]]

    table = []
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method and r["lr"] == chosen[method]]
        row = {"method": method, "lr": chosen[method], "params": mine[0]["params"], "seeds": len(mine)}
        for key in ("similarity", "recognised", "drift", "train_seconds"):
            values = [r[key] for r in mine]
            row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        table.append(row)
    markdown = render(base_score, args.steps, args.batch, args.seeds, table, runs)
    print(markdown)
    settings = {k: shown_path(v) if isinstance(v, Path) else str(v) for k, v in vars(args).items() if k != "out"}
    report = {"base": shown_path(args.base), "base_score": base_score, "settings": settings,
              "table": table, "runs": runs, "threads": torch.get_num_threads()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((args.out, json.dumps(report, indent=2)), (args.out.with_suffix(".md"), markdown)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
