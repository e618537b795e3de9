"""torch.compile against eager for a training step (forward + backward) of an adapted model: compile time, step time.

    python benchmarks/compile.py                              # toy UNet, lora and gralora, CPU here (CUDA if there)
    python benchmarks/compile.py --variants lora gralora gralora-recompute --repeats 21
    python benchmarks/compile.py --model layer                # one adapted linear at 4096 x 640 tokens x features

The model is the toy SDXL UNet (``gralora_diffusion.toy.build_toy_sdxl_pipeline(0).unet``) with adapters on
``to_q, to_k, to_v, to_out.0`` at ``--rank`` (variants as in ``layers.py``: PEFT LoRA alpha 2r; PEFT's GraLoRA; the
package's GraloraLinear, optionally recomputing its intermediate), or with ``--model layer`` one adapted linear.
A step is the UNet's forward on fixed noisy latents, an MSE against fixed noise, and backward (no optimizer); the
compiled model is ``torch.compile(model)`` (inductor, default mode) sharing the eager model's weights, so both
compute the same loss (checked). Everything is fp32 (the CPU trainer's precision). If the UNet fails to compile,
the error is printed in one line and the one-layer model is measured instead.

Compile time: the wall time of the first compiled step (tracing, inductor's forward and backward code generation
and the step itself) minus the steady compiled step, with inductor's caches disabled (a cold compile; a second
run in the same environment would otherwise load the kernels from disk). Step time: after ``--warmup`` steps, eager
and compiled steps of every variant run round-robin (order rotated each round); medians and medians of per-round
ratios compiled / eager. Graph breaks are counted by dynamo. Writes JSON. On a shared CPU, run with
``OMP_WAIT_POLICY=PASSIVE`` (see ``layers.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config
import torch.nn.functional as F
from measure import write_report
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from gralora_diffusion.config import default_gralora_k, make_gralora_config
from gralora_diffusion.layers import inject_gralora, use_memory_lean_training

VARIANTS = ("lora", "peft-gralora", "gralora", "gralora-recompute")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class OneLinear(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.to_q = nn.Linear(features, features)

    def forward(self, x):
        return self.to_q(x)


def adapt(model: nn.Module, variant: str, rank: int) -> nn.Module:
    model.requires_grad_(False)
    if variant == "lora":
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS), model)
    elif variant == "peft-gralora":
        inject_adapter_in_model(make_gralora_config(rank, TARGETS), model)
    elif variant in ("gralora", "gralora-recompute"):
        inject_gralora(model, make_gralora_config(rank, TARGETS))
        use_memory_lean_training(model, variant == "gralora-recompute")
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return model


def toy_case(variant: str, rank: int, batch: int, device):
    """The adapted toy UNet and a function of a model returning the step's loss on fixed inputs."""
    from gralora_diffusion.toy import build_toy_sdxl_pipeline

    torch.manual_seed(0)
    unet = adapt(build_toy_sdxl_pipeline(0).unet, variant, rank).to(device)
    cfg = unet.config
    size = cfg.sample_size
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, cfg.in_channels, size, size, generator=g).to(device)
    noise = torch.randn(latents.shape, generator=g).to(device)
    embeds = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device)
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    pooled = torch.randn(batch, pooled_dim, generator=g)
    cond = {
        "text_embeds": pooled.to(device),
        "time_ids": torch.tensor([[size * 8.0, size * 8.0, 0, 0, size * 8.0, size * 8.0]] * batch, device=device),
    }
    timesteps = torch.linspace(10, 990, batch).long().to(device)

    def loss_of(model):
        return F.mse_loss(model(latents, timesteps, embeds, added_cond_kwargs=cond).sample, noise)

    return unet, loss_of


def layer_case(variant: str, rank: int, batch: int, device, tokens: int = 4096, features: int = 640):
    torch.manual_seed(0)
    model = adapt(OneLinear(features), variant, rank).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, features, generator=g).to(device).requires_grad_(True)

    def loss_of(m):
        return m(x).square().mean()

    return model, loss_of


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(model: nn.Module, loss_of, device) -> tuple[float, float]:
    """(seconds, loss) of one forward + backward from cleared grads."""
    for p in model.parameters():
        p.grad = None
    sync(device)
    t0 = time.perf_counter()
    loss = loss_of(model)
    loss.backward()
    sync(device)
    return time.perf_counter() - t0, loss.item()


def one_line(error: BaseException) -> str:
    lines = [s.strip() for s in str(error).splitlines() if s.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def measure(model_name: str, variants, args, device) -> list[dict]:
    """Build, compile (first step timed) and time eager vs compiled for every variant."""
    cases, first = {}, {}
    for v in variants:
        model, loss_of = (toy_case if model_name == "toy" else layer_case)(v, args.rank, args.batch, device)
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model)
        eager_first, eager_loss = timed_step(model, loss_of, device)
        compiled_first, compiled_loss = timed_step(compiled, loss_of, device)  # compiles forward and backward
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        if not torch.isclose(torch.tensor(compiled_loss), torch.tensor(eager_loss), rtol=1e-3, atol=1e-6):
            raise AssertionError(f"{v}: compiled loss {compiled_loss} != eager loss {eager_loss}")
        cases[v] = (model, compiled, loss_of)
        first[v] = (eager_first, compiled_first, breaks)
        print(f"{model_name} {v}: first compiled step {compiled_first:.1f} s, {breaks} graph breaks", flush=True)
    runs = [(v, mode) for v in variants for mode in ("eager", "compiled")]
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for i in range(args.warmup + args.repeats):
        shift = i % len(runs)
        for v, mode in runs[shift:] + runs[:shift]:
            model, compiled, loss_of = cases[v]
            seconds, _ = timed_step(model if mode == "eager" else compiled, loss_of, device)
            if i >= args.warmup:
                times[(v, mode)].append(seconds)
    rows = []
    for v in variants:
        eager, compiled = times[(v, "eager")], times[(v, "compiled")]
        compiled_median = statistics.median(compiled)
        rows.append(
            {
                "model": model_name,
                "variant": v,
                "rank": args.rank,
                "k": default_gralora_k(args.rank) if "gralora" in v else None,
                "adapter_params": sum(p.numel() for p in cases[v][0].parameters() if p.requires_grad),
                "eager_first_s": first[v][0],
                "compiled_first_s": first[v][1],
                "compile_s": first[v][1] - compiled_median,
                "graph_breaks": first[v][2],
                "eager_ms": statistics.median(eager) * 1e3,
                "compiled_ms": compiled_median * 1e3,
                "compiled_vs_eager": statistics.median(c / e for c, e in zip(compiled, eager, strict=True)),
            }
        )
    for row in rows:
        for mode, ref in (("eager", "eager"), ("compiled", "eager"), ("compiled", "compiled")):
            mine, lora = times[(row["variant"], mode)], times.get(("lora", ref))
            row[f"{mode}_vs_{ref}_lora"] = (
                statistics.median(a / b for a, b in zip(mine, lora, strict=True)) if lora else None
            )
    return rows


def print_rows(rows: list[dict]) -> None:
    header = (
        "| model | variant | r | k | first eager s | first compiled s | compile s | breaks | eager ms | compiled ms | "
        "compiled/eager | eager/eager-LoRA | compiled/eager-LoRA | compiled/compiled-LoRA |"
    )
    print(header)
    print("|" + "|".join("-" * (len(cell) - 1) + ":" for cell in header[1:-1].split("|")) + "|")

    def f(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        print(
            f"| {r['model']} | {r['variant']} | {r['rank']} | {r['k'] or '-'} | {r['eager_first_s']:.2f} | "
            f"{r['compiled_first_s']:.1f} | {r['compile_s']:.1f} | {r['graph_breaks']} | {r['eager_ms']:.1f} | "
            f"{r['compiled_ms']:.1f} | {r['compiled_vs_eager']:.2f} | {f(r['eager_vs_eager_lora'], '.2f')} | "
            f"{f(r['compiled_vs_eager_lora'], '.2f')} | {f(r['compiled_vs_compiled_lora'], '.2f')} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy", choices=["toy", "layer"])
    parser.add_argument("--variants", nargs="+", default=["lora", "gralora"], choices=list(VARIANTS))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._inductor.config.force_disable_caches = True  # a cold compile, every run
    variants = [v for v in VARIANTS if v in args.variants]
    model_name, error = args.model, None
    try:
        rows = measure(model_name, variants, args, device)
    except Exception as exc:  # report the failure in one line, then fall back to one layer
        if model_name != "toy":
            raise
        error = one_line(exc)
        print(f"torch.compile of the toy UNet failed: {error}")
        torch._dynamo.reset()
        model_name = "layer"
        rows = measure(model_name, variants, args, device)
    print_rows(rows)
    out = args.out or Path(__file__).parent / "results" / f"compile-{model_name}-{device.type}.json"
    write_report(
        out,
        device,
        torch.float32,
        rows,
        model=model_name,
        toy_compile_error=error,
        batch=args.batch,
        repeats=args.repeats,
        warmup=args.warmup,
        caches="inductor caches disabled (cold compile)",
    )


if __name__ == "__main__":
    main()
