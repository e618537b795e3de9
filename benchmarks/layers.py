"""One adapted linear layer: GraLoRA against LoRA at equal parameters -- operators, host time, time, memory, blending.

    python benchmarks/layers.py                      # CPU here; CUDA when available
    python benchmarks/layers.py --ranks 16 64 --repeats 21

Training variants (same base weights, same input, batch 2; every adapter has (in + out) * r parameters):
  base               the frozen nn.Linear alone (input requires grad, as inside a network)
  lora               PEFT LoRA, rank r, alpha 2r
  lora-nocast        the same LoRA without PEFT's cast of the input to the adapter's dtype (the layer's
                     ``cast_input_dtype_enabled = False``, what ``peft.helpers.disable_input_dtype_casting`` sets):
                     the fair baseline under autocast. Identical to ``lora`` in fp32, where the cast is a no-op.
  peft-gralora       PEFT's GraLoRA layer, rank r, k by the paper's default (2 for r <= 32, 4 from 64), alpha 2r
  gralora            this package's GraloraLinear (the default): two bmm on strided views of the input
  gralora-recompute  the package's layer with ``recompute_intermediate`` (the k*r-wide intermediate recomputed in
                     backward instead of stored; the trainer's --gralora_recompute)

Sections, all in one run:
  operators  aten operators dispatched by one forward + backward (``measure.OperatorCount``): total, compute (not
             views) and copies (clone / copy_ / _to_copy of at least the input's numel elements). Counted in fp32 at
             the full shape, and under mixed precision (base in bf16 -- or the run's half dtype --, adapter in fp32,
             autocast) at ``--mixed-tokens`` tokens: a bf16 matmul is slow on CPUs without bf16 units, and the count
             does not depend on the token count once the input outnumbers every adapter weight (the run checks
             that condition; at the default shapes the fp32 counts at 128 tokens equal those at the full shape).
  host       microseconds per forward + backward at a tiny shape (``--tiny``, 2 x 16 tokens x 64 features), where
             dispatch, not arithmetic, is the cost: what a GPU pays on the host per adapted layer. fp32 and mixed
             (on a CPU without bf16 units the mixed times include slow bf16 kernels, so they are not dispatch
             alone); one CPU thread (``--tiny-threads``): more cannot speed up a layer this small, only add noise.
             At this shape a k*r-wide intermediate can outnumber the input, so it may count as a copy.
  time       forward + backward at SDXL shapes, in the run's dtype (fp32 on CPU; bf16 with autocast on CUDA).
  memory     ``measure.step_memory_bytes``: CUDA peak above the step's start, or on CPU the bytes autograd saves.
  inference  no grad, unfused, TWO adapters active at weights 0.6 and 0.4 (PEFT LoRA via the layer's
             ``set_adapter([...])`` and ``set_scale``; PEFT's and the package's GraLoRA via ``set_adapter([...])``
             and ``set_adapter_weight``), all weights in the run's dtype; the blend is checked against
             W + 0.6 dW_a + 0.4 dW_b before timing.

Time: every step is timed alone; the variants run round-robin (the order rotated each round) so that machine noise
hits them alike. Reported: the median, the median of the per-round differences to ``base`` ("over base": the
adapter's own cost) and the median of the per-round ratios to lora and to lora-nocast, with the quartiles of the
ratios to lora (how far one round strays: on a shared 2-core machine a few percent). Writes JSON.

On a CPU shared with other work, run with ``OMP_WAIT_POLICY=PASSIVE``: with spinning OpenMP threads, every parallel
region can wait a scheduler slice for a descheduled thread, which turns time into a count of parallel regions (here
2-thread matmuls came out in multiples of 8 ms). The JSON records the policy.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from measure import OperatorCount, step_memory_bytes, write_report
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from gralora_diffusion.config import default_gralora_k, make_gralora_config
from gralora_diffusion.layers import inject_gralora, set_adapter_weight, use_memory_lean_training

VARIANTS = ("base", "lora", "lora-nocast", "peft-gralora", "gralora", "gralora-recompute")
INFERENCE_VARIANTS = ("base", "lora", "peft-gralora", "gralora")
BLEND = {"a": 0.6, "b": 0.4}


class OneLinear(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.proj = nn.Linear(features, features)

    def forward(self, x):
        return self.proj(x)


def _inject(model: nn.Module, variant: str, rank: int, adapter_name: str = "default", random_b: bool = False) -> None:
    """Add one adapter of ``variant``'s kind; ``random_b`` makes B non-zero (so a blend has something to blend)."""
    if variant in ("lora", "lora-nocast"):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], init_lora_weights=not random_b)
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    elif variant == "peft-gralora":
        inject_adapter_in_model(make_gralora_config(rank, ["proj"], init_weights=not random_b), model, adapter_name)
    elif variant in ("gralora", "gralora-recompute"):
        inject_gralora(model, make_gralora_config(rank, ["proj"], init_weights=not random_b), adapter_name)
    else:
        raise ValueError(variant)


def build(variant: str, features: int, rank: int, device, dtype) -> nn.Module:
    """A training model: frozen base in ``dtype``, trainable adapter in fp32 (as mixed-precision trainers keep it)."""
    torch.manual_seed(0)
    model = OneLinear(features)
    if variant == "base":
        return model.requires_grad_(False).to(device, dtype)
    _inject(model, variant, rank)
    if variant == "lora-nocast":
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    use_memory_lean_training(model, variant == "gralora-recompute")
    model.to(device)
    model.proj.get_base_layer().to(dtype)
    return model


def build_blend(variant: str, features: int, rank: int, device, dtype) -> nn.Module:
    """An inference model with adapters "a" and "b" both active at ``BLEND``'s weights, unfused, all in ``dtype``."""
    torch.manual_seed(0)
    model = OneLinear(features)
    if variant != "base":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about a second adapter in one model
            for name in BLEND:
                _inject(model, variant, rank, name, random_b=True)
        layer = model.proj
        layer.set_adapter(list(BLEND))
        for name, weight in BLEND.items():
            if variant == "lora":
                layer.set_scale(name, weight)
            else:
                set_adapter_weight(layer, name, weight)
        check_blend(model)
    return model.requires_grad_(False).eval().to(device, dtype)


@torch.no_grad()
def check_blend(model: OneLinear) -> None:
    """The unfused forward must equal the base with both weighted deltas added (fp32, before timing)."""
    layer = model.proj
    base = layer.get_base_layer()
    weight = base.weight + sum(layer.get_delta_weight(name) for name in BLEND)
    x = torch.randn(3, base.in_features)
    expected = nn.functional.linear(x, weight, base.bias)
    got = model(x)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()):
        raise AssertionError(f"two-adapter blend of {type(layer).__name__} is not W + 0.6 dW_a + 0.4 dW_b")


def adapter_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "gralora_" in n)


# --- measuring ----------------------------------------------------------------------------------------------------


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, half: torch.dtype | None):
    """The trainer's mixed precision: autocast to ``half``; ``None``: plain fp32 (or the model's dtype)."""
    return torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext()


@contextlib.contextmanager
def threads(n: int | None):
    """CPU intra-op threads for a block (``None``: unchanged)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def clear_grads(model: nn.Module, x: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    x.grad = None


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()  # sum() saves nothing: time and memory are the layer's own


def training_steps(models: dict[str, nn.Module], x: torch.Tensor) -> tuple[dict, dict]:
    """Per variant: one training step on ``x``, and the reset run before it (grads cleared, outside the timing)."""
    steps = {v: functools.partial(train_step, m, x) for v, m in models.items()}
    resets = {v: functools.partial(clear_grads, m, x) for v, m in models.items()}
    return steps, resets


def interleaved(
    steps: dict[str, Callable[[], None]], resets: dict[str, Callable[[], None]], repeats: int, warmup: int, device
) -> dict[str, list[float]]:
    """Seconds of each step, ``repeats`` rounds after ``warmup``; each round runs every variant once, order rotated."""
    names = list(steps)
    times: dict[str, list[float]] = {v: [] for v in names}
    for i in range(warmup + repeats):
        shift = i % len(names)
        for v in names[shift:] + names[:shift]:
            resets[v]()
            sync(device)
            t0 = time.perf_counter()
            steps[v]()
            sync(device)
            if i >= warmup:
                times[v].append(time.perf_counter() - t0)
    return times


def paired(times: dict[str, list[float]], v: str, ref: str, ratio: bool) -> float | None:
    """Median over rounds of v/ref (``ratio``) or v - ref, measured in the same round."""
    if ref not in times:
        return None
    pairs = zip(times[v], times[ref], strict=True)
    return statistics.median(a / b if ratio else a - b for a, b in pairs)


def ratio_quartiles(times: dict[str, list[float]], v: str, ref: str) -> list[float] | None:
    """The 25th and 75th percentiles over rounds of v/ref: how far one round's ratio strays on this machine."""
    if ref not in times or len(times[v]) < 4:
        return None
    q1, _, q3 = statistics.quantiles([a / b for a, b in zip(times[v], times[ref], strict=True)], n=4)
    return [q1, q3]


def timing_summary(times: dict[str, list[float]], v: str) -> dict:
    return {
        "median_s": statistics.median(times[v]),
        "time_vs_lora_quartiles": ratio_quartiles(times, v, "lora"),
        "over_base_s": paired(times, v, "base", ratio=False),
        "time_vs_lora": paired(times, v, "lora", ratio=True),
        "time_vs_lora_nocast": paired(times, v, "lora-nocast", ratio=True),
    }


def count_ops(model: nn.Module, x: torch.Tensor, device, half, grad: bool = True) -> dict:
    """Operators of one forward (+ backward when ``grad``), from cleared grads, after one uncounted warm-up run."""

    def run() -> None:
        clear_grads(model, x)
        out = model(x)
        if grad:
            out.sum().backward()

    counter = OperatorCount(copy_numel=x.numel())
    with autocast(device, half), torch.set_grad_enabled(grad):
        run()
        with counter:
            run()
    clear_grads(model, x)
    return {"total": counter.total, "compute": counter.compute, "copies": counter.copies}


def make_input(batch: int, tokens: int, features: int, device, dtype, grad: bool) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(batch, tokens, features, generator=g).to(device, dtype).requires_grad_(grad)


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


# --- sections -----------------------------------------------------------------------------------------------------


def train_section(shape, rank, args, device, dtype, half) -> list[dict]:
    """Operators, time and memory of forward + backward at one (tokens, features) and rank, in the run's dtype."""
    tokens, features = shape
    run_half = dtype if dtype != torch.float32 else None  # bf16/fp16 runs use the trainer's autocast
    models = {v: build(v, features, rank, device, dtype) for v in VARIANTS}
    params = {v: adapter_params(m) for v, m in models.items()}
    if len({params[v] for v in VARIANTS if v != "base"}) != 1:
        raise AssertionError(f"adapter parameter counts differ: {params}")
    x = make_input(args.batch, tokens, features, device, dtype, grad=True)

    ops_fp32 = {}
    for v in VARIANTS:
        model = build(v, features, rank, device, torch.float32) if dtype != torch.float32 else models[v]
        ops_fp32[v] = count_ops(model, x.detach().float().requires_grad_(True), device, None)
    mixed_tokens = min(tokens, args.mixed_tokens)
    if args.batch * mixed_tokens <= rank:  # the largest adapter weight has rank * features elements
        raise ValueError(f"--mixed-tokens {mixed_tokens}: the input must outnumber every adapter weight (rank {rank})")
    x_mixed = make_input(args.batch, mixed_tokens, features, device, half, grad=True)
    ops_mixed = {v: count_ops(build(v, features, rank, device, half), x_mixed, device, half) for v in VARIANTS}

    with autocast(device, run_half):
        steps, resets = training_steps(models, x)
        times = interleaved(steps, resets, args.repeats, args.warmup, device)
        memory = {}
        for v in VARIANTS:
            clear_grads(models[v], x)
            memory[v] = step_memory_bytes(models[v], lambda m=models[v]: m(x).sum(), device)
            clear_grads(models[v], x)

    rows = []
    for v in VARIANTS:
        rows.append(
            {
                "section": "train",
                "tokens": tokens,
                "features": features,
                "rank": rank,
                "k": default_gralora_k(rank) if "gralora" in v else None,
                "variant": v,
                "adapter_params": params[v],
                "ops_fp32": ops_fp32[v],
                "ops_fp32_vs_lora": ratio(ops_fp32[v]["total"], ops_fp32["lora"]["total"]),
                "ops_mixed": ops_mixed[v],
                "ops_mixed_tokens": mixed_tokens,
                "ops_mixed_vs_lora": ratio(ops_mixed[v]["total"], ops_mixed["lora"]["total"]),
                "ops_mixed_vs_lora_nocast": ratio(ops_mixed[v]["total"], ops_mixed["lora-nocast"]["total"]),
                **timing_summary(times, v),
                "memory_mib": memory[v] / 2**20,
                "memory_vs_lora": ratio(memory[v], memory["lora"]),
                "memory_vs_lora_nocast": ratio(memory[v], memory["lora-nocast"]),
            }
        )
    return rows


def host_section(shape, rank, args, device, half) -> list[dict]:
    """Microseconds per forward + backward at a tiny shape (dispatch-bound), fp32 and mixed precision."""
    tokens, features = shape
    rows = []
    for precision, base_dtype, autocast_to in (("fp32", torch.float32, None), ("mixed", half, half)):
        models = {v: build(v, features, rank, device, base_dtype) for v in VARIANTS}
        x = make_input(args.batch, tokens, features, device, base_dtype, grad=True)
        ops = {v: count_ops(models[v], x, device, autocast_to) for v in VARIANTS}
        with autocast(device, autocast_to):
            steps, resets = training_steps(models, x)
            times = interleaved(steps, resets, args.tiny_repeats, args.tiny_warmup, device)
        for v in VARIANTS:
            rows.append(
                {
                    "section": "host",
                    "precision": precision,
                    "tokens": tokens,
                    "features": features,
                    "rank": rank,
                    "k": default_gralora_k(rank) if "gralora" in v else None,
                    "variant": v,
                    "ops": ops[v]["total"],
                    "compute_ops": ops[v]["compute"],
                    **timing_summary(times, v),
                }
            )
    return rows


def inference_section(shape, rank, args, device, dtype, size: str, repeats: int, warmup: int) -> list[dict]:
    """No grad, unfused, two adapters active (0.6, 0.4): time and operators of one forward."""
    tokens, features = shape
    models = {v: build_blend(v, features, rank, device, dtype) for v in INFERENCE_VARIANTS}
    x = make_input(args.batch, tokens, features, device, dtype, grad=False)
    ops = {v: count_ops(models[v], x, device, None, grad=False) for v in INFERENCE_VARIANTS}
    with torch.no_grad():
        steps = {v: functools.partial(models[v], x) for v in INFERENCE_VARIANTS}
        resets = {v: (lambda: None) for v in INFERENCE_VARIANTS}
        times = interleaved(steps, resets, repeats, warmup, device)
    rows = []
    for v in INFERENCE_VARIANTS:
        rows.append(
            {
                "section": "inference",
                "size": size,
                "adapters": 0 if v == "base" else len(BLEND),
                "tokens": tokens,
                "features": features,
                "rank": rank,
                "k": default_gralora_k(rank) if "gralora" in v else None,
                "variant": v,
                "ops": ops[v],
                "ops_vs_lora": ratio(ops[v]["total"], ops["lora"]["total"]),
                **timing_summary(times, v),
            }
        )
    return rows


# --- printing -----------------------------------------------------------------------------------------------------


def fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def print_table(title: str, rows: list[dict], columns: list[tuple[str, Callable[[dict], object], str]]) -> None:
    """A markdown table: ``columns`` are (header, getter, format spec)."""
    cells = [[fmt(get(row), spec) for _, get, spec in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(columns)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(s.rjust(w) for s, w in zip(c, widths, strict=True)) + " |")


def quartiles(pair: list[float] | None) -> str | None:
    return None if pair is None else f"{pair[0]:.2f}-{pair[1]:.2f}"


def shape_of(row: dict) -> str:
    return f"{row['tokens']}x{row['features']}"


# the columns every table starts with: which layer, which rank and k, which variant
KEY_COLUMNS = [
    ("shape", shape_of, ""),
    ("r", lambda r: r["rank"], ""),
    ("k", lambda r: r["k"], ""),
    ("variant", lambda r: r["variant"], ""),
]


def print_report(rows: list[dict], device, dtype, half) -> None:
    train = [r for r in rows if r["section"] == "train"]
    half_name = str(half).removeprefix("torch.")
    mem_label = "peak MiB" if device.type == "cuda" else "saved MiB"
    print_table(
        f"Operators per forward + backward (fp32 at the shape; mixed: {half_name} base + fp32 adapter under "
        f"autocast at {train[0]['ops_mixed_tokens'] if train else '-'} tokens; copies of >= input numel)",
        train,
        [
            *KEY_COLUMNS,
            ("params", lambda r: r["adapter_params"], ""),
            ("fp32 ops", lambda r: r["ops_fp32"]["total"], ""),
            ("compute", lambda r: r["ops_fp32"]["compute"], ""),
            ("copies", lambda r: r["ops_fp32"]["copies"], ""),
            ("/LoRA", lambda r: r["ops_fp32_vs_lora"], ".2f"),
            ("mixed ops", lambda r: r["ops_mixed"]["total"], ""),
            ("compute", lambda r: r["ops_mixed"]["compute"], ""),
            ("copies", lambda r: r["ops_mixed"]["copies"], ""),
            ("/LoRA", lambda r: r["ops_mixed_vs_lora"], ".2f"),
            ("/nocast", lambda r: r["ops_mixed_vs_lora_nocast"], ".2f"),
        ],
    )
    host = [r for r in rows if r["section"] == "host"]
    if host:
        print_table(
            f"Host time per forward + backward at {shape_of(host[0])} (batch 2; dispatch-bound; medians)",
            host,
            [
                ("precision", lambda r: r["precision"], ""),
                ("r", lambda r: r["rank"], ""),
                ("k", lambda r: r["k"], ""),
                ("variant", lambda r: r["variant"], ""),
                ("ops", lambda r: r["ops"], ""),
                ("compute", lambda r: r["compute_ops"], ""),
                ("us", lambda r: r["median_s"] * 1e6, ".1f"),
                ("over base us", lambda r: r["over_base_s"] * 1e6, ".1f"),
                ("t/LoRA", lambda r: r["time_vs_lora"], ".2f"),
                ("t/nocast", lambda r: r["time_vs_lora_nocast"], ".2f"),
            ],
        )
    print_table(
        f"Forward + backward at SDXL shapes ({device.type}, {str(dtype).removeprefix('torch.')}"
        f"{', autocast' if dtype != torch.float32 else ''}; batch 2; medians; ratios are per-round medians)",
        train,
        [
            *KEY_COLUMNS,
            ("ms", lambda r: r["median_s"] * 1e3, ".2f"),
            ("over base ms", lambda r: r["over_base_s"] * 1e3, ".2f"),
            ("t/LoRA", lambda r: r["time_vs_lora"], ".2f"),
            ("quartiles", lambda r: quartiles(r["time_vs_lora_quartiles"]), ""),
            ("t/nocast", lambda r: r["time_vs_lora_nocast"], ".2f"),
            (mem_label, lambda r: r["memory_mib"], ".2f"),
            ("m/LoRA", lambda r: r["memory_vs_lora"], ".2f"),
            ("m/nocast", lambda r: r["memory_vs_lora_nocast"], ".2f"),
        ],
    )
    for size, unit, scale, spec in (("tiny", "us", 1e6, ".1f"), ("sdxl", "ms", 1e3, ".2f")):
        inference = [r for r in rows if r["section"] == "inference" and r["size"] == size]
        if not inference:
            continue
        print_table(
            f"Inference ({size}): unfused blend of two adapters at {BLEND['a']} / {BLEND['b']}, no grad "
            f"({str(dtype).removeprefix('torch.')}; batch 2; medians; ratios are per-round medians)",
            inference,
            [
                *KEY_COLUMNS,
                ("ops", lambda r: r["ops"]["total"], ""),
                ("compute", lambda r: r["ops"]["compute"], ""),
                ("copies", lambda r: r["ops"]["copies"], ""),
                ("ops/LoRA", lambda r: r["ops_vs_lora"], ".2f"),
                (unit, lambda r, scale=scale: r["median_s"] * scale, spec),
                (f"over base {unit}", lambda r, scale=scale: r["over_base_s"] * scale, spec),
                ("t/LoRA", lambda r: r["time_vs_lora"], ".2f"),
                ("quartiles", lambda r: quartiles(r.get("time_vs_lora_quartiles")), ""),
            ],
        )


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 CUDA)")
    parser.add_argument("--shapes", default="4096x640,1024x1280", help="tokens x features, comma-separated")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", default="16x64", help="tokens x features of the host-time section ('' skips it)")
    parser.add_argument("--tiny-ranks", type=int, nargs="+", default=[16, 64], help="ranks there (k=2 and k=4)")
    parser.add_argument("--tiny-repeats", type=int, default=400)
    parser.add_argument("--tiny-warmup", type=int, default=20)
    parser.add_argument(
        "--tiny-threads", type=int, default=1, help="CPU threads there: intra-op threads cannot help a tiny layer"
    )
    parser.add_argument("--mixed-tokens", type=int, default=128, help="tokens of the mixed-precision operator count")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    half = dtype if dtype != torch.float32 else torch.bfloat16  # the mixed-precision dtype of the counts
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, tiny = parse_shapes(args.shapes), parse_shapes(args.tiny)
    rows: list[dict] = []
    with threads(args.tiny_threads):
        for shape in tiny:
            for rank in args.tiny_ranks:
                rows += host_section(shape, rank, args, device, half)
    for shape in shapes:
        for rank in args.ranks:
            rows += train_section(shape, rank, args, device, dtype, half)
    with threads(args.tiny_threads):
        for shape in tiny:
            for rank in args.tiny_ranks:
                rows += inference_section(shape, rank, args, device, dtype, "tiny", args.tiny_repeats, args.tiny_warmup)
    for shape in shapes:
        for rank in args.ranks:
            rows += inference_section(shape, rank, args, device, dtype, "sdxl", args.repeats, args.warmup)
    print_report(rows, device, dtype, half)
    out = args.out or Path(__file__).parent / "results" / f"layers-{device.type}.json"
    write_report(
        out,
        device,
        dtype,
        rows,
        batch=args.batch,
        repeats=args.repeats,
        warmup=args.warmup,
        tiny_repeats=args.tiny_repeats,
        tiny_threads=args.tiny_threads,
        mixed_dtype=str(half),
        mixed_tokens=args.mixed_tokens,
        blend=BLEND,
        timing="each step timed alone, variants round-robin with rotated order; ratios and over-base are medians "
        "of per-round ratios / differences",
    )


if __name__ == "__main__":
    main()
