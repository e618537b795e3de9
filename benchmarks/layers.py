"""One adapted linear layer at SDXL shapes: forward+backward time and memory, GraLoRA vs LoRA at equal parameters.

    python benchmarks/layers.py                      # CPU here; CUDA when available
    python benchmarks/layers.py --ranks 16 64 --repeats 21

Variants (same base weights, same input, batch 2):
  base           the frozen nn.Linear alone (input requires grad, as inside a network)
  lora           PEFT LoRA, rank r: (in + out) * r parameters
  gralora        PEFT GraLoRA, rank r, k by the paper's default: the same parameter count
  gralora-train  this package's layer as the trainer uses it: PEFT's GraLoRA with a blending weight set and the
                 memory-lean forward (recomputes the k*r-wide intermediate in backward)

Time: median over ``--repeats`` of one forward + backward, the variants run round-robin within each repeat so that
machine noise hits all of them alike. Memory: on CUDA the peak allocated during forward + backward above what was
allocated before it; on CPU (no allocator statistics) the bytes autograd saves for backward (unique storages,
parameters excluded) -- the activation memory a training step keeps per layer. Ratios are against LoRA.
Writes a JSON file next to the printed table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from measure import step_memory_bytes, write_report
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from gralora_diffusion.config import default_gralora_k, make_gralora_config
from gralora_diffusion.layers import set_adapter_weight, use_memory_lean_training

VARIANTS = ("base", "lora", "gralora", "gralora-train")


class OneLinear(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.proj = nn.Linear(features, features)

    def forward(self, x):
        return self.proj(x)


def build(variant: str, features: int, rank: int, device, dtype) -> nn.Module:
    torch.manual_seed(0)
    model = OneLinear(features)
    if variant == "lora":
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]), model)
    elif variant.startswith("gralora"):
        inject_adapter_in_model(make_gralora_config(rank, ["proj"]), model)
    else:
        model.requires_grad_(False)
    model.to(device)
    # Frozen base in the compute dtype, trainable adapter parameters in fp32 (as mixed-precision trainers keep them).
    model.proj.get_base_layer().to(dtype) if variant != "base" else model.to(dtype)
    if variant == "gralora-train":
        set_adapter_weight(model.proj, "default", 1.0)
        use_memory_lean_training(model)
    return model


def step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()  # sum() saves nothing: memory is the layer's own


def timed(model: nn.Module, x: torch.Tensor, device) -> float:
    for p in model.parameters():
        p.grad = None
    x.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(model, x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(shapes, ranks, batch, repeats, warmup, device, dtype) -> list[dict]:
    rows = []
    for tokens, features in shapes:
        for rank in ranks:
            models = {v: build(v, features, rank, device, dtype) for v in VARIANTS}
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(batch, tokens, features, generator=g).to(device, dtype).requires_grad_(True)
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for i in range(warmup + repeats):
                for v in VARIANTS:
                    t = timed(models[v], x, device)
                    if i >= warmup:
                        times[v].append(t)
            memory = {}
            for v in VARIANTS:
                model = models[v]
                memory[v] = step_memory_bytes(model, lambda model=model, x=x: model(x).sum(), device)
            params = {
                v: sum(p.numel() for n, p in models[v].named_parameters() if "lora_" in n or "gralora_" in n)
                for v in VARIANTS
            }
            median = {v: statistics.median(times[v]) for v in VARIANTS}
            for v in VARIANTS:
                rows.append(
                    {
                        "tokens": tokens,
                        "features": features,
                        "rank": rank,
                        "k": default_gralora_k(rank) if v.startswith("gralora") else None,
                        "variant": v,
                        "adapter_params": params[v],
                        "median_ms": median[v] * 1e3,
                        "time_vs_lora": median[v] / median["lora"],
                        "memory_mib": memory[v] / 2**20,
                        "memory_vs_lora": memory[v] / memory["lora"] if memory["lora"] else None,
                    }
                )
    return rows


def print_table(rows: list[dict], memory_label: str) -> None:
    header = f"{'shape':>12} {'r':>4} {'k':>2} {'variant':>14} {'params':>9} {'ms':>9} {'t/LoRA':>7} "
    header += f"{memory_label:>12} {'m/LoRA':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        shape = f"{row['tokens']}x{row['features']}"
        k = row["k"] or "-"
        print(
            f"{shape:>12} {row['rank']:>4} {k:>2} {row['variant']:>14} {row['adapter_params']:>9} "
            f"{row['median_ms']:>9.2f} {row['time_vs_lora']:>7.2f} {row['memory_mib']:>12.2f} "
            f"{row['memory_vs_lora'] or 0:>7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 CUDA)")
    parser.add_argument("--shapes", default="4096x640,1024x1280", help="tokens x features, comma-separated")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = run(shapes, args.ranks, args.batch, args.repeats, args.warmup, device, dtype)
    memory_label = "peak MiB" if device.type == "cuda" else "saved MiB"
    print_table(rows, memory_label)
    out = args.out or Path(__file__).parent / "results" / f"layers-{device.type}.json"
    write_report(out, device, dtype, rows, repeats=args.repeats)


if __name__ == "__main__":
    main()
