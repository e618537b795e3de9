"""The trainer's step, GraLoRA against LoRA: seconds per step and memory, on the toy UNet and a mid-size SDXL UNet.

    python benchmarks/train_step.py                 # both models, CPU here (CUDA when available)
    python benchmarks/train_step.py --models toy    # quick
    python benchmarks/train_step.py --models sdxl --batch 1 [--gradient_checkpointing]   # full SDXL UNet, on a GPU
    python benchmarks/train_step.py --variants lora-nocast gralora      # a subset (all variants' UNets stay loaded)

One step = the trainer's ``denoising_loss`` (noise, UNet forward, Min-SNR-free MSE) + backward + AdamW step, with
adapters on the UNet attention (``to_q, to_k, to_v, to_out.0``) at each rank of ``--ranks`` (default 64), all at the
same parameter count:
  lora               PEFT LoRA r, alpha=2r
  lora-nocast        the same LoRA without PEFT's cast of the input to the adapter's dtype (each layer's
                     ``cast_input_dtype_enabled = False``, what ``peft.helpers.disable_input_dtype_casting`` sets):
                     the fair baseline under autocast; identical to lora in fp32
  peft-gralora       PEFT's GraLoRA r (``inject_adapter_in_model``), k by the paper's default (2 for r <= 32, 4 above),
                     alpha=2r: PEFT's forward
  gralora            this package's GraloraLinear (``inject_gralora``), same parameters: the trainer's default
  gralora-recompute  the package's layer recomputing its k*r-wide intermediate in backward (trainer:
                     --gralora_recompute)
The mid-size UNet has SDXL's block types and widths (block_out_channels (320, 640), 2 and 10-head attention,
transformer depth 1 and 2, cross-attention 2048, text-time conditioning) with random weights, at 256 px (32 x 32
latents). The sdxl model is SDXL's UNet at full size (2.6 B parameters, its published configuration) with random
weights at 1024 px (128 x 128 latents). Frozen weights in the run's dtype, adapter weights in fp32; in bf16/fp16 the
step runs under autocast, as the trainer does. Time is the median over ``--repeats`` steps, the variants run
round-robin (order rotated each round); ratios are medians of the per-round ratios. Memory is the CUDA peak above the
step's start, or on CPU the bytes autograd saves for backward (parameters excluded). Writes JSON. On a CPU shared
with other work, run with ``OMP_WAIT_POLICY=PASSIVE`` (see ``layers.py``; here the toy step took 0.5-12 s instead of
0.15 s with spinning threads).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from measure import step_memory_bytes, write_report
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from gralora_diffusion.config import make_gralora_config
from gralora_diffusion.layers import inject_gralora, use_memory_lean_training
from gralora_diffusion.toy import build_toy_sdxl_pipeline
from gralora_diffusion.training.loss import denoising_loss

VARIANTS = ("lora", "lora-nocast", "peft-gralora", "gralora", "gralora-recompute")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def mid_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(320, 640),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1280 + 6 * 256,
    )


def sdxl_unet():
    """SDXL 1.0 base's UNet configuration (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_embed_type_num_heads=64,
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


MODELS = {"toy": lambda: build_toy_sdxl_pipeline(0).unet, "mid": mid_unet, "sdxl": sdxl_unet}


def build(model_name: str, variant: str, rank: int, device, dtype, gradient_checkpointing: bool = False):
    torch.manual_seed(0)
    with torch.device(device):  # random init where the model runs (minutes on a CPU for SDXL's 2.6 B weights)
        unet = MODELS[model_name]()
    unet.requires_grad_(False)
    unet.to(device, dtype)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if variant in ("lora", "lora-nocast"):
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS), unet)
        if variant == "lora-nocast":
            for module in unet.modules():
                if isinstance(module, BaseTunerLayer):
                    module.cast_input_dtype_enabled = False
    elif variant == "peft-gralora":
        inject_adapter_in_model(make_gralora_config(rank, TARGETS), unet)
    elif variant in ("gralora", "gralora-recompute"):
        inject_gralora(unet, make_gralora_config(rank, TARGETS))
        use_memory_lean_training(unet, variant == "gralora-recompute")
    else:
        raise ValueError(f"unknown variant {variant!r}")
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return unet, torch.optim.AdamW(params, lr=1e-4)


def inputs(unet, batch: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    size = cfg.sample_size
    latents = torch.randn(batch, cfg.in_channels, size, size, generator=g).to(device, dtype)
    embeds = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    pooled = torch.randn(batch, pooled_dim, generator=g).to(device, dtype)
    time_ids = torch.tensor([[size * 8.0, size * 8.0, 0, 0, size * 8.0, size * 8.0]] * batch).to(device, dtype)
    return latents, embeds, pooled, time_ids


def autocast_for(batch_inputs):
    """The trainer's mixed precision: autocast to the inputs' dtype unless that is fp32."""
    dtype = batch_inputs[0].dtype
    return torch.autocast(batch_inputs[0].device.type, dtype=dtype, enabled=dtype != torch.float32)


def one_step(unet, optimizer, scheduler, batch_inputs, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    with autocast_for(batch_inputs):
        loss, _ = denoising_loss(unet, scheduler, *batch_inputs, gen)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def memory(unet, optimizer, scheduler, batch_inputs, device) -> int:
    def forward():
        with autocast_for(batch_inputs):
            return denoising_loss(unet, scheduler, *batch_inputs, torch.Generator().manual_seed(0))[0]

    used = step_memory_bytes(unet, forward, device)
    optimizer.zero_grad(set_to_none=True)
    return used


def paired_ratio(times: dict[str, list[float]], v: str, ref: str) -> float | None:
    """Median over rounds of v's time / ref's time in the same round (None when ref did not run)."""
    if ref not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[v], times[ref], strict=True))


def run(
    model_name, rank, batch, repeats, warmup, device, dtype, gradient_checkpointing=False, variants=VARIANTS
) -> list[dict]:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    built = {v: build(model_name, v, rank, device, dtype, gradient_checkpointing) for v in variants}
    batch_inputs = inputs(built[variants[0]][0], batch, device, dtype)
    times = {v: [] for v in variants}
    for i in range(warmup + repeats):
        shift = i % len(variants)
        for v in variants[shift:] + variants[:shift]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            one_step(*built[v], scheduler, batch_inputs, i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[v].append(time.perf_counter() - t0)
    mem = {v: memory(*built[v], scheduler, batch_inputs, device) for v in variants}
    rows = []
    for v in variants:
        unet = built[v][0]
        rows.append(
            {
                "model": model_name,
                "gradient_checkpointing": gradient_checkpointing,
                "variant": v,
                "rank": rank,
                "adapter_params": sum(p.numel() for p in unet.parameters() if p.requires_grad),
                "seconds_per_step": statistics.median(times[v]),
                "time_vs_lora": paired_ratio(times, v, "lora"),
                "time_vs_lora_nocast": paired_ratio(times, v, "lora-nocast"),
                "memory_mib": mem[v] / 2**20,
                "memory_vs_lora": mem[v] / mem["lora"] if mem.get("lora") else None,
                "memory_vs_lora_nocast": mem[v] / mem["lora-nocast"] if mem.get("lora-nocast") else None,
            }
        )
    return rows


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["toy", "mid"], choices=list(MODELS))
    parser.add_argument("--ranks", type=int, nargs="+", default=[64])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    variants = tuple(v for v in VARIANTS if v in args.variants)
    rows = []
    for model_name in args.models:
        for rank in args.ranks:
            rows += run(
                model_name,
                rank,
                args.batch,
                args.repeats,
                args.warmup,
                device,
                dtype,
                args.gradient_checkpointing,
                variants,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    label = "peak MiB" if device.type == "cuda" else "saved MiB"
    header = (
        f"| {'model':>5} | {'rank':>4} | {'variant':>17} | {'params':>9} | {'s/step':>8} | {'t/LoRA':>6} | "
        f"{'t/nocast':>8} | {label:>10} | {'m/LoRA':>6} | {'m/nocast':>8} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(cell) - 1) + ":" for cell in header[1:-1].split("|")) + "|")
    for r in rows:
        print(
            f"| {r['model']:>5} | {r['rank']:>4} | {r['variant']:>17} | {r['adapter_params']:>9} | "
            f"{r['seconds_per_step']:>8.3f} | {fmt(r['time_vs_lora'], '.2f'):>6} | "
            f"{fmt(r['time_vs_lora_nocast'], '.2f'):>8} | {r['memory_mib']:>10.1f} | "
            f"{fmt(r['memory_vs_lora'], '.2f'):>6} | {fmt(r['memory_vs_lora_nocast'], '.2f'):>8} |"
        )
    suffix = "-checkpointing" if args.gradient_checkpointing else ""
    out = (
        args.out or Path(__file__).parent / "results" / f"train_step-{'-'.join(args.models)}-{device.type}{suffix}.json"
    )
    write_report(
        out,
        device,
        dtype,
        rows,
        batch=args.batch,
        repeats=args.repeats,
        warmup=args.warmup,
        timing="variants round-robin with rotated order; ratios are medians of per-round ratios",
    )


if __name__ == "__main__":
    main()
