"""One adapted 3x3 convolution (a ResNet block's conv1 / conv2): GraLoRA (``GraloraConv2d``) against LoRA (PEFT's
LoCon layer) at equal parameters, in one run.

    python benchmarks/conv_layers.py                      # SDXL's three ResNet widths at 1024 px, CPU, fp32
    python benchmarks/conv_layers.py --device cuda --dtype bfloat16

Per shape (channels, latent side) and rank: operators dispatched per forward + backward (a count, deterministic),
the median over interleaved rounds of the paired time ratio to LoRA (one training step: forward, ``sum``, backward,
the base conv frozen, the input requiring grad as inside a UNet), and the memory of the step by ``measure``'s metric
(CPU: bytes saved for backward). ``base`` is the frozen convolution alone; ``gralora-recompute`` is the trainer's
``--gralora_recompute`` (the k*r-channel intermediate recomputed in backward instead of stored). GraLoRA's k is the
paper's default for the rank (2 up to r = 32, 4 from 64); LoRA's alpha is r, GraLoRA's 2r (the scale does not change
the cost).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from layers import autocast, count_ops, interleaved, ratio, threads, timing_summary, training_steps
from measure import step_memory_bytes, write_report
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from gralora_diffusion import make_gralora_config
from gralora_diffusion.layers import inject_gralora, use_memory_lean_training

VARIANTS = ("base", "lora", "gralora", "gralora-recompute")
# SDXL's ResNet widths and their latent sides at 1024 px (128 x 128 latents): 320 at 128, 640 at 64, 1280 at 32.
SDXL_SHAPES = ((320, 128), (640, 64), (1280, 32))


class OneConv(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def build(variant: str, channels: int, rank: int, device, dtype, base_dtype=None) -> nn.Module:
    """One conv in ``variant``, adapter weights in ``dtype``, the frozen conv in ``base_dtype`` (default ``dtype``):
    the trainer's mixed precision keeps frozen weights in bf16 and trainable ones in fp32."""
    torch.manual_seed(0)
    model = OneConv(channels)
    if variant == "lora":
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["conv"]), model)
    elif variant in ("gralora", "gralora-recompute"):
        inject_gralora(model, make_gralora_config(rank, ["conv"]))
        use_memory_lean_training(model, variant == "gralora-recompute")
    base = model.conv.get_base_layer() if variant != "base" else model.conv
    base.requires_grad_(False)
    with torch.no_grad():  # B starts at zero: make the update non-zero so nothing is skipped
        for name, p in model.named_parameters():
            if "lora_B" in name or "gralora_B" in name:
                p.normal_(0, 0.01)
    model.to(device, dtype)
    if base_dtype is not None:
        for name, p in model.named_parameters():
            if "lora_" not in name and "gralora_" not in name:  # the frozen conv; the adapter stays in dtype
                p.data = p.data.to(base_dtype)
    return model


def run_shape(channels: int, side: int, rank: int, args, device, dtype, half) -> list[dict]:
    x = torch.randn(args.batch, channels, side, side, generator=torch.Generator().manual_seed(0))
    x = x.to(device, dtype).requires_grad_(True)
    models = {v: build(v, channels, rank, device, dtype, half) for v in VARIANTS}
    rows = []
    with autocast(device, half):
        steps, resets = training_steps(models, x)
        times = interleaved(steps, resets, args.repeats, args.warmup, device)
        memory = {}
        for v, model in models.items():
            resets[v]()
            memory[v] = step_memory_bytes(model, lambda model=model: model(x).sum(), device)
    for v, model in models.items():
        params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
        rows.append({
            "variant": v, "channels": channels, "side": side, "rank": rank, "params": params,
            "ops": count_ops(model, x, device, half), **timing_summary(times, v), "memory_bytes": memory[v],
        })  # fmt: skip
    for row in rows:
        row["memory_vs_lora"] = ratio(row["memory_bytes"], memory["lora"])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16: a bf16 base conv under autocast, fp32 adapter weights and input (the "
                        "trainer's mixed precision; a ResNet conv's input comes from a group norm, fp32 under CUDA "
                        "autocast)")  # fmt: skip
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--shapes", default=",".join(f"{c}x{s}" for c, s in SDXL_SHAPES),
                        help="CHANNELSxSIDE,... (default: SDXL's ResNet widths at 1024 px)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "conv_layers-cpu.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    half = torch.bfloat16 if args.dtype == "bfloat16" else None
    shapes = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
    rows = []
    with threads(args.threads):
        for channels, side in shapes:
            for rank in args.ranks:
                rows += run_shape(channels, side, rank, args, device, torch.float32, half)
                for row in rows[-len(VARIANTS) :]:
                    ops, mem = row["ops"], row["memory_vs_lora"]
                    vs = row["time_vs_lora"]
                    print(f"{channels:>5} ch {side:>3}^2 r {rank:>3} {row['variant']:>17}: {row['params']:>9,} params, "
                          f"{ops['total']:>3} ops ({ops['compute']} compute, {ops['copies']} act. copies), "
                          f"{row['median_s'] * 1e3:8.1f} ms, time vs LoRA {vs if vs is None else f'{vs:.3f}'}, "
                          f"memory vs LoRA {mem if mem is None else f'{mem:.2f}'}", flush=True)  # fmt: skip
        # inside the block, so the report records the thread count the rows ran with
        write_report(args.out, device, torch.float32, rows, autocast=args.dtype, batch=args.batch,
                     repeats=args.repeats)  # fmt: skip


if __name__ == "__main__":
    main()
