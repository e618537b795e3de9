"""DreamBooth quality, v2: full fine-tuning vs LoRA vs GraLoRA at equal parameters over a range of r / d, two step
budgets, many seeds, paired differences with bootstrap confidence intervals.

    python benchmarks/quality.py                                     # the toy world's full table (hours on 2 cores)
    python benchmarks/quality.py --methods lora-8 gralora-8 --seeds 0 1 --tune_seeds 100 --lrs 1e-3 --budgets 20
    python benchmarks/quality.py --base stabilityai/stable-diffusion-xl-base-1.0 --metric dinov2 \\
        --instance_dir dog --prompt "a photo of sks dog" --unrelated "a photo of a cat" "a red car" \\
        --ranks 16 32 64 --budgets 500 1500 --autocast bf16 --gradient_checkpointing      # a real SDXL on a GPU

Modelled on PEFT's image-generation benchmark (method_comparison/image-gen: DreamBooth on a subject, a DINO score,
"drift" on unrelated prompts). Every method trains the same UNet on the same instance images with the same trigger
prompt, steps, batch, noise, timesteps and adapter init (all drawn from the run's seed), AdamW at a constant learning
rate, text encoders frozen. Methods (R a rank):

  full           every UNet weight trained
  lora-R         PEFT LoRA rank R, alpha = R (diffusers' DreamBooth-LoRA default), on the UNet attention projections
  gralora-R      PEFT GraLoRA rank R with the paper's k and alpha = 2R, the same layers and parameter count
  hybrid-R       GraLoRA rank 3R/4 plus a plain-LoRA part of rank R/4 (the same parameter count as rank R)

Ranks are read as r / d, d the width of the adapted attention layers (the toy world's is 96; SDXL's 640 and 1280,
where r 16-128 is 1/80 to 1/5): the default ranks 4, 6, 8 and 12 on the toy are 1/24 to 1/8, GraLoRA's k = 2 keeps
the sub-block rank r / k >= 2 and k * r <= d / 4. Each method's learning rate is picked per budget from ``--lrs``
(``--full_lrs`` for full fine-tuning) by the mean of similarity minus drift over ``--tune_seeds``, which are never
reported; then every reported seed runs at that rate.

Metrics, over fixed sampling seeds:
  similarity   mean cosine between embeddings of trigger-prompt generations and of the instance images (the toy
               world's evaluator, or ``--metric dinov2`` / ``clip`` through transformers: the DINO score / CLIP-I)
  recognised   (toy world only) share of those generations the evaluator calls the subject, a teal moon
  drift        mean (1 - cosine) between the base's and the tuned model's images of unrelated prompts, same seeds
The report pairs methods seed by seed (a seed fixes noise, timesteps and init for both): GraLoRA - LoRA and
hybrid - LoRA at equal parameters, with the mean difference and a bootstrap 95% interval over seeds. Writes
``benchmarks/results/quality.json``, ``quality.md`` and ``quality.png`` (similarity and drift against r / d per method,
with 95% intervals, one column per budget).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from gralora_diffusion.bases import base_defaults, load_pipeline, resolve_base, shown_path
from gralora_diffusion.training.loss import denoising_loss
from gralora_diffusion.training.text import PromptCache
from gralora_diffusion.world import SUBJECT_PROMPT

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
UNRELATED = ["a red circle on a white background", "a blue star on a yellow background",
             "a green square on a black background", "a purple heart on a gray background"]  # fmt: skip
RANKS = (4, 6, 8, 12)
METHODS = ["full", *(f"{kind}-{r}" for r in RANKS for kind in ("lora", "gralora")), "hybrid-8"]
REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "sks-shape"
BOOTSTRAP_SAMPLES = 10_000


def parse_method(method: str) -> tuple[str, int]:
    """``"gralora-8"`` -> ``("gralora", 8)``; ``"full"`` -> ``("full", 0)``; one sentence for anything else."""
    if method == "full":
        return "full", 0
    kind, _, rank = method.partition("-")
    if kind not in ("lora", "gralora", "hybrid") or not rank.isdigit() or int(rank) <= 0:
        raise SystemExit(f"unknown method {method!r}: use full, lora-R, gralora-R or hybrid-R with R a positive rank")
    if kind == "hybrid" and int(rank) % 4:
        raise SystemExit(f"{method}: a hybrid rank must be a multiple of 4 (GraLoRA 3R/4 + LoRA R/4)")
    return kind, int(rank)


def prepare(unet, method: str) -> list[torch.nn.Parameter]:
    """Make ``unet`` trainable the way ``method`` says; return the trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    from gralora_diffusion import add_gralora_adapter, make_gralora_config

    kind, rank = parse_method(method)
    if kind == "full":
        unet.requires_grad_(True)
    elif kind == "lora":
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS), unet)
    elif kind == "gralora":
        add_gralora_adapter(unet, make_gralora_config(rank, TARGETS), component="unet")
    else:
        config = make_gralora_config(rank - rank // 4, TARGETS, hybrid_r=rank // 4)
        add_gralora_adapter(unet, config, component="unet")
    return [p for p in unet.parameters() if p.requires_grad]


def adapted_widths(unet) -> list[int]:
    """The distinct widths d (the smaller side) of the layers the adapters target, ascending."""
    widths = {
        min(module.in_features, module.out_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in TARGETS)
    }
    return sorted(widths)


def attention_width(unet) -> int:
    """d for r / d: the width of the attention layers' query projections (their hidden size), the smallest when the
    model has several (SDXL: 640)."""
    return min(m.in_features for n, m in unet.named_modules() if n.endswith("to_q") and isinstance(m, torch.nn.Linear))


def ratio_text(rank: int, width: int) -> str:
    ratio = Fraction(rank, width)
    return f"{ratio.numerator}/{ratio.denominator}"


def load_images(folder: Path) -> list:
    from PIL import Image

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not paths:
        raise SystemExit(f"no instance images (.png, .jpg, .webp) in {folder}: pass --instance_dir")
    return [Image.open(p).convert("RGB") for p in paths]


class Judge:
    """Similarity, recognition (toy evaluator only) and drift, with the toy evaluator or a DINOv2 / CLIP model."""

    def __init__(self, metric: str, model: str | None, device):
        self.metric = metric
        if metric == "evaluator":
            from gralora_diffusion.evaluator import load_evaluator

            self.evaluator = load_evaluator()
        else:
            from gralora_diffusion.image_metrics import load_image_embedder

            self.embedder = load_image_embedder(metric, model, device=device)

    def embed(self, images) -> torch.Tensor:
        if self.metric == "evaluator":
            from gralora_diffusion.evaluator import judge

            return judge(self.evaluator, images)["embedding"]
        return self.embedder(images)

    def scores(self, instances, subject, unrelated, unrelated_base) -> dict:
        reference, generated = self.embed(instances), self.embed(subject)
        tuned, base = self.embed(unrelated), self.embed(unrelated_base)
        out = {
            "similarity": float((generated @ reference.T).mean()),
            "drift": float((1 - (tuned * base).sum(dim=1)).mean()),
        }
        if self.metric == "evaluator":
            from gralora_diffusion.evaluator import judge, recognised_share

            out["recognised"] = recognised_share(judge(self.evaluator, subject))
        return out


class Bench:
    """The base loaded once, its instance latents, prompt embeddings and baseline images; ``run`` trains a fresh copy
    of the UNet by one method and scores it."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        pipe = load_pipeline(args.base)
        pipe.set_progress_bar_config(disable=True)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False)
        self.pipe = pipe.to(self.device)
        self.base_unet = pipe.unet
        self.instances = load_images(args.instance_dir)
        self.resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.latents = self.encode(self.instances)
        embed = PromptCache([pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
        self.embeds, self.pooled = embed([args.prompt] * args.batch)
        size = float(self.resolution)
        self.time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]] * args.batch, device=self.device)
        self.judge = Judge(args.metric, args.metric_model, self.device)
        self.base_subject, self.base_unrelated = self.generate()
        if self.device.type != "cpu":  # one UNet on the accelerator at a time: each run copies the base from RAM
            self.base_unet = pipe.unet.to("cpu")

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        vae = self.pipe.vae
        pixels = []
        for image in images:  # centre crop to a square, then the training resolution
            w, h = image.size
            side = min(w, h)
            square = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            pixels.append(square.resize((self.resolution, self.resolution)))
        batch = []
        for image in pixels:
            x = _to_tensor(image) * 2 - 1
            batch.append(vae.encode(x.to(self.device, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor)
        return torch.cat(batch).float()

    @torch.no_grad()
    def generate(self) -> tuple[list, list]:
        args, pipe = self.args, self.pipe
        out = []
        for prompts, per_prompt in (([args.prompt], args.images), (args.unrelated, 2)):
            images = []
            for i, prompt in enumerate(prompts):
                seeds = [10_000 + 100 * i + j for j in range(per_prompt)]
                for start in range(0, per_prompt, args.generation_batch):
                    chunk = seeds[start : start + args.generation_batch]
                    with self.autocast():
                        images += pipe(
                            [prompt] * len(chunk), num_inference_steps=args.sampling_steps,
                            guidance_scale=args.guidance, height=self.resolution, width=self.resolution,
                            generator=[torch.Generator().manual_seed(s) for s in chunk],
                        ).images  # fmt: skip
            out.append(images)
        return out[0], out[1]

    def autocast(self):
        if self.args.autocast == "no":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=getattr(torch, self.args.autocast))

    def train(self, method: str, lr: float, steps: int, seed: int) -> tuple[int, float]:
        from diffusers import DDPMScheduler

        args = self.args
        torch.manual_seed(seed)  # adapter init draws from the global generator: a run depends on its own seed only
        params = prepare(self.pipe.unet, method)
        if args.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        generator = torch.Generator().manual_seed(seed)
        self.pipe.unet.train()
        start = time.perf_counter()
        for _ in range(steps):
            pick = torch.randint(0, len(self.latents), (args.batch,), generator=generator)
            with self.autocast():
                loss, _ = denoising_loss(self.pipe.unet, scheduler, self.latents[pick.to(self.latents.device)],
                                         self.embeds, self.pooled, self.time_ids, generator)  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.pipe.unet.eval()
        return sum(p.numel() for p in params), seconds

    def run(self, method: str, lr: float, steps: int, seed: int) -> dict:
        self.pipe.unet = copy.deepcopy(self.base_unet).to(self.device)
        try:
            params, seconds = self.train(method, lr, steps, seed)
            subject, unrelated = self.generate()
        finally:
            self.pipe.unet = self.base_unet
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        result = {"method": method, "lr": lr, "steps": steps, "seed": seed, "params": params, "train_seconds": seconds}
        result |= self.judge.scores(self.instances, subject, unrelated, self.base_unrelated)
        recognised = f" rec {result['recognised']:.2f}" if "recognised" in result else ""
        print(f"{method:>12} {steps:>5} steps lr {lr:.0e} seed {seed}: sim {result['similarity']:.3f}{recognised} "
              f"drift {result['drift']:.3f} ({seconds:.0f} s)", flush=True)  # fmt: skip
        return result


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def bootstrap_interval(values, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarise(values) -> dict:
    low, high = bootstrap_interval(values)
    return {"mean": float(np.mean(values)), "ci95": [low, high], "median": statistics.median(values),
            "min": min(values), "max": max(values), "n": len(values)}  # fmt: skip


def pick_lr(tuning: list[dict]) -> float:
    """The learning rate with the best mean similarity - drift over the tuning seeds (the first listed on a tie)."""
    by_lr: dict[float, list[float]] = {}
    for r in tuning:
        by_lr.setdefault(r["lr"], []).append(r["similarity"] - r["drift"])
    return max(by_lr, key=lambda lr: statistics.fmean(by_lr[lr]))


def tabulate(runs: list[dict], chosen: dict, width: int, seeds: list[int], keys: list[str]) -> tuple[list, list]:
    """Rows (one per budget and method: mean, interval, median and range over the reported seeds at the chosen lr)
    and paired differences (GraLoRA or hybrid minus LoRA at the same rank and budget, seed by seed)."""
    rows, pairs = [], []
    reported = [r for r in runs if r["seed"] in seeds and r["lr"] == chosen.get((r["steps"], r["method"]))]
    for (steps, method), lr in chosen.items():
        mine = sorted((r for r in reported if (r["steps"], r["method"]) == (steps, method)), key=lambda r: r["seed"])
        if not mine:
            continue
        _, rank = parse_method(method)
        row = {"steps": steps, "method": method, "rank": rank, "r_over_d": rank / width if rank else None,
               "lr": lr, "params": mine[0]["params"], "seeds": [r["seed"] for r in mine]}  # fmt: skip
        for key in keys + ["train_seconds"]:
            row[key] = summarise([r[key] for r in mine])
        rows.append(row)
    for steps, method in chosen:
        kind, rank = parse_method(method)
        if kind not in ("gralora", "hybrid") or (steps, f"lora-{rank}") not in chosen:
            continue
        mine = {r["seed"]: r for r in reported if (r["steps"], r["method"]) == (steps, method)}
        theirs = {r["seed"]: r for r in reported if (r["steps"], r["method"]) == (steps, f"lora-{rank}")}
        common = sorted(mine.keys() & theirs.keys())
        if not common:
            continue
        pair = {"steps": steps, "method": method, "against": f"lora-{rank}", "rank": rank, "seeds": common}
        for key in keys:
            gaps = [mine[s][key] - theirs[s][key] for s in common]
            pair[key] = summarise(gaps) | {"wins": sum(g > 0 for g in gaps)}
        pairs.append(pair)
    return rows, pairs


def render(report: dict) -> str:
    """The markdown report: one table per budget, then the paired differences."""
    width, keys = report["attention_width"], report["metrics"]
    base = report["base_score"]
    head = ", ".join(f"{k} {base[k]:.3f}" for k in keys if k in base)
    lines = [
        f"Base {report['base']} ({report['metric']}): {head}. Attention width d = {width} "
        f"(adapted layer widths {report['adapted_widths']}); batch {report['settings']['batch']}; "
        f"lr picked per budget on tuning seeds {report['tune_seeds']}, reported seeds {report['seeds']}. "
        "Cells: mean [95% bootstrap interval] over the reported seeds.",
    ]
    for steps in report["budgets"]:
        lines += ["", f"**{steps} steps**", "",
                  "| method | r / d | params | lr | " + " | ".join(keys) + " | train s |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in keys) + " | --- |"]  # fmt: skip
        for row in (r for r in report["table"] if r["steps"] == steps):
            ratio = ratio_text(row["rank"], width) if row["rank"] else "full"
            cells = [f"{row[k]['mean']:.3f} [{row[k]['ci95'][0]:.3f}, {row[k]['ci95'][1]:.3f}]" for k in keys]
            lines.append(f"| {row['method']} | {ratio} | {row['params']:,} | {row['lr']:.0e} | " + " | ".join(cells)
                         + f" | {row['train_seconds']['median']:.0f} |")  # fmt: skip
        pairs = [p for p in report["pairs"] if p["steps"] == steps]
        if pairs:
            lines += ["", "Paired, minus LoRA at the same rank (mean difference [95% bootstrap interval], higher on "
                      "how many seeds):", ""]  # fmt: skip
            for p in pairs:
                parts = [f"{k} {p[k]['mean']:+.3f} [{p[k]['ci95'][0]:+.3f}, {p[k]['ci95'][1]:+.3f}] "
                         f"({p[k]['wins']} of {len(p['seeds'])})" for k in keys]  # fmt: skip
                lines.append(f"- {p['method']} - {p['against']}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Similarity and drift against r / d per method (means with 95% intervals), one column per budget; full
    fine-tuning as a horizontal band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets, keys = report["budgets"], ["similarity", "drift"]
    fig, axes = plt.subplots(2, len(budgets), figsize=(4.5 * len(budgets), 6.5), squeeze=False)
    colours = {"lora": "tab:blue", "gralora": "tab:red", "hybrid": "tab:green"}
    for col, steps in enumerate(budgets):
        rows = [r for r in report["table"] if r["steps"] == steps]
        for row_index, key in enumerate(keys):
            ax = axes[row_index][col]
            for kind, colour in colours.items():
                mine = sorted((r for r in rows if parse_method(r["method"])[0] == kind), key=lambda r: r["rank"])
                if not mine:
                    continue
                x = [r["r_over_d"] for r in mine]
                y = [r[key]["mean"] for r in mine]
                err = [[r[key]["mean"] - r[key]["ci95"][0] for r in mine], [r[key]["ci95"][1] - r[key]["mean"]
                                                                              for r in mine]]  # fmt: skip
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colour, label=kind)
            for r in rows:
                if r["method"] == "full":
                    ax.axhspan(*r[key]["ci95"], color="gray", alpha=0.25, label="full")
                    ax.axhline(r[key]["mean"], color="gray")
            ax.set_xscale("log", base=2)
            ratios = sorted({r["r_over_d"] for r in rows if r["rank"]})
            ax.set_xticks(ratios, [ratio_text(round(x * report["attention_width"]), report["attention_width"])
                                   for x in ratios])  # fmt: skip
            ax.minorticks_off()
            ax.set_xlabel("r / d")
            ax.set_ylabel(key)
            ax.set_title(f"{key}, {steps} steps")
            if row_index == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="toy-world", help="SDXL folder, hub id or single file (default: toy-world)")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--ranks", type=int, nargs="+", default=None,
                        help="lora-R and gralora-R for each R (keeps --methods' full and hybrid)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="reported seeds")
    parser.add_argument("--tune_seeds", type=int, nargs="+", default=[100], help="seeds picking the lr (unreported)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="adapters' lr grid")
    parser.add_argument("--full_lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3], help="full FT's lr grid")
    parser.add_argument("--budgets", type=int, nargs="+", default=[300, 1200],
                        help="training steps (the demo's 300 and a long budget)")  # fmt: skip
    parser.add_argument("--long_methods", nargs="*", default=None,
                        help="methods run at budgets after the first (default: all)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--instance_dir", type=Path, default=EXAMPLES)
    parser.add_argument("--prompt", default=SUBJECT_PROMPT)
    parser.add_argument("--unrelated", nargs="+", default=UNRELATED, help="prompts for drift (2 images each)")
    parser.add_argument("--images", type=int, default=16, help="generations of the trigger prompt per run")
    parser.add_argument("--metric", choices=["evaluator", "dinov2", "clip"], default=None,
                        help="evaluator (toy world, the default there) or DINOv2 / CLIP image embeddings")  # fmt: skip
    parser.add_argument("--metric_model", default=None, help="folder or hub id of the DINOv2 / CLIP model")
    parser.add_argument("--resolution", type=int, default=None, help="default: the base's native size")
    parser.add_argument("--sampling_steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--generation_batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=["no", "bfloat16", "float16"], default="no")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    parser.add_argument("--resume", action="store_true", help="reuse the finished runs logged in OUT.runs.jsonl")
    args = parser.parse_args(argv)
    toy = args.base == "toy-world"
    defaults = base_defaults(args.base)
    args.base = resolve_base(args.base)
    args.metric = args.metric or ("evaluator" if toy else "dinov2")
    args.sampling_steps = args.sampling_steps or defaults.get("steps", 30)
    args.guidance = defaults.get("guidance_scale", 5.0) if args.guidance is None else args.guidance
    if args.ranks:
        args.methods = [m for m in args.methods if not m.startswith(("lora-", "gralora-"))]
        args.methods += [f"{kind}-{r}" for r in args.ranks for kind in ("lora", "gralora")]
    for method in args.methods + (args.long_methods or []):
        parse_method(method)
    if set(args.seeds) & set(args.tune_seeds):
        raise SystemExit("--tune_seeds must differ from the reported --seeds: a seed that picks the lr is not reported")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (the plot comes last: fail before hours of runs, not after)
    except ImportError:
        raise SystemExit('the plot needs matplotlib: pip install -e ".[bench]"') from None
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    torch.manual_seed(0)
    bench = Bench(args)
    width, widths = attention_width(bench.base_unet), adapted_widths(bench.base_unet)
    keys = ["similarity", "recognised", "drift"] if args.metric == "evaluator" else ["similarity", "drift"]
    reference = bench.judge.embed(bench.instances)
    base_score = bench.judge.scores(bench.instances, bench.base_subject, bench.base_unrelated, bench.base_unrelated)
    n = len(bench.instances)
    base_score["instances_among_themselves"] = float(((reference @ reference.T).sum() - n) / max(1, n * n - n))
    print(f"base: {base_score}; attention width {width}, adapted layer widths {widths}")

    # Every finished run goes to OUT.runs.jsonl at once; --resume reuses those of the same settings (a long run
    # that was stopped goes on where it was).
    log_path = args.out.with_suffix(".runs.jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    fingerprint = {k: str(getattr(args, k)) for k in ("base", "batch", "instance_dir", "prompt", "unrelated", "images",
                                                       "metric", "metric_model", "resolution", "sampling_steps",
                                                       "guidance", "autocast")}  # fmt: skip
    if args.resume and log_path.exists():
        for line in log_path.read_text().splitlines():
            r = json.loads(line)
            if r.pop("settings", None) == fingerprint:
                done[(r["method"], r["lr"], r["steps"], r["seed"])] = r
        print(f"resuming: {len(done)} finished runs with these settings in {log_path}")
    elif log_path.exists():
        log_path.unlink()

    def run(method: str, lr: float, steps: int, seed: int) -> dict:
        if (method, lr, steps, seed) in done:
            return done[(method, lr, steps, seed)]
        result = bench.run(method, lr, steps, seed)
        with log_path.open("a") as f:
            f.write(json.dumps(result | {"settings": fingerprint}) + "\n")
        return result

    runs, chosen = [], {}
    for index, steps in enumerate(args.budgets):
        methods = args.methods if index == 0 or args.long_methods is None else args.long_methods
        for method in methods:
            grid = args.full_lrs if method == "full" else args.lrs
            tuning = [run(method, lr, steps, seed) for lr in grid for seed in args.tune_seeds]
            runs += tuning
            chosen[(steps, method)] = pick_lr(tuning) if len(grid) > 1 else grid[0]
            runs += [run(method, chosen[(steps, method)], steps, seed) for seed in args.seeds]

    table, pairs = tabulate(runs, chosen, width, args.seeds, keys)
    settings = {k: shown_path(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    report = {"base": shown_path(args.base), "metric": args.metric, "metrics": keys, "base_score": base_score,
              "attention_width": width, "adapted_widths": widths, "budgets": args.budgets, "seeds": args.seeds,
              "tune_seeds": args.tune_seeds, "settings": settings, "table": table, "pairs": pairs, "runs": runs,
              "threads": torch.get_num_threads(), "device": str(bench.device)}  # fmt: skip
    markdown = render(report)
    print(markdown)
    write_atomically(args.out, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    write_atomically(args.out.with_suffix(".md"), lambda tmp: tmp.write_text(markdown))
    write_atomically(args.out.with_suffix(".png"), lambda tmp: plot(report, tmp))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
