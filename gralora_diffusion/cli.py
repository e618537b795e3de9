"""The ``gralora`` command: export to LoRA, merge into a checkpoint, generate, inspect.

    gralora export ADAPTER.safetensors --to diffusers|kohya (--rank N | --energy 0.99 | --exact) -o OUT.safetensors
    gralora merge --base PATH_OR_ID ADAPTER[:WEIGHT] ... -o DIR
    gralora generate --base PATH_OR_ID --adapter FILE[:WEIGHT] ... --prompt "..." --seed 0 -o out.png
    gralora inspect ADAPTER.safetensors [--json]

Without ``--base`` the offline toy SDXL base is used. Bad input gets one line on stderr and exit status 2, before any
output is written; outputs are written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TOY_SIZE = 64


def parse_weighted(spec: str) -> tuple[str, float]:
    """``path/to/file.safetensors:0.8`` -> (path, 0.8); no ``:WEIGHT`` means 1.0."""
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def _load_pipeline(base: str | None, dtype: str | None = None):
    import torch
    from diffusers import DiffusionPipeline

    from .toy import toy_sdxl_base_dir

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float16 if device == "cuda" else torch.float32)
    pipe = DiffusionPipeline.from_pretrained(base or str(toy_sdxl_base_dir()), torch_dtype=torch_dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- subcommands -------------------------------------------------------------------------------------------------


def cmd_export(args) -> int:
    import torch

    from .export import export_lora

    out = Path(args.output)
    reports = export_lora(
        args.adapter, out, args.to, rank=args.rank, energy=args.energy, exact=args.exact,
        layers_per_block=args.layers_per_block, dtype=getattr(torch, args.dtype),
    )  # fmt: skip
    for r in reports:
        print(f"{r.component:<15} {r.layers:>4} layers  rank {r.rank_text:<7} relative error {r.relative_error:.3e}")
    print(f"wrote {out} ({args.to} layout)")
    return 0


def cmd_merge(args) -> int:
    from . import adapters as api
    from .io import _atomic_directory

    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new output folder.")
    specs = [parse_weighted(s) for s in args.adapters]
    for path, _ in specs:
        if not Path(path).exists():
            raise ValueError(f"Adapter {path} does not exist; check the path.")
    pipe = _load_pipeline(args.base, args.dtype)
    names = [api.load_gralora_weights(pipe, path, adapter_name=f"a{i}") for i, (path, _) in enumerate(specs)]
    api.set_gralora_adapters(pipe, names, [w for _, w in specs])
    api.fuse_gralora(pipe)
    api.unload_gralora_weights(pipe)  # keeps the fused blend, drops the adapter modules
    _atomic_directory(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    print(f"merged {', '.join(f'{p}:{w:g}' for p, w in specs)} into {out}")
    return 0


def cmd_generate(args) -> int:
    from .studio import AdapterChoice, AdapterFiles, GenerationRequest, Limits, Studio

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise ValueError(f"The output must be a .png file, got {out.name}.")
    specs = [parse_weighted(s) for s in args.adapter]
    files = AdapterFiles([p for p, _ in specs])  # checks the paths before the model loads
    size = args.size or (TOY_SIZE if args.base is None else 1024)
    studio = Studio(_load_pipeline(args.base, args.dtype), files, base_name=args.base or "toy-sdxl", limits=Limits())
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
        width=args.width or size, height=args.height or size, scheduler=args.scheduler, seed=args.seed,
        adapters=[AdapterChoice(Path(p).stem, w) for p, w in specs],
    )  # fmt: skip
    result = studio.generate(request)
    if result.errors:
        raise ValueError("; ".join(f"{name}: {why}" for name, why in result.errors.items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    studio.save_png(result.images[0], out, result, 0)
    print(f"wrote {out} (seed {result.seed})")
    return 0


def adapter_summary(path: str | Path) -> dict:
    from .io import read_adapter

    adapter = read_adapter(path)
    components = {}
    for component, config in adapter.configs.items():
        components[component] = {
            "target_modules": len(adapter.module_names(component)),
            "r": config.r,
            "k": config.gralora_k,
            "alpha": config.alpha,
            "hybrid_r": config.hybrid_r,
            "parameters": sum(t.numel() for t in adapter.state_dicts[component].values()),
        }
    return {
        "file": str(path),
        "size_bytes": Path(path).stat().st_size,
        "base_model": adapter.base_model,
        "trigger_prompt": adapter.metadata.get("trigger_prompt", ""),
        "steps": adapter.metadata.get("steps", ""),
        "parameters": adapter.num_parameters(),
        "components": components,
    }


def cmd_inspect(args) -> int:
    info = adapter_summary(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['file']}: {info['size_bytes'] / 2**20:.2f} MiB, {info['parameters']:,} parameters")
    print(f"base model: {info['base_model'] or 'unrecorded'}")
    print(f"trigger prompt: {info['trigger_prompt'] or 'none recorded'}")
    print(f"training steps: {info['steps'] or 'unrecorded'}")
    for name, c in info["components"].items():
        print(
            f"  {name:<15} {c['target_modules']:>4} modules  r={c['r']} k={c['k']} alpha={c['alpha']:g} "
            f"hybrid_r={c['hybrid_r']}  {c['parameters']:,} parameters"
        )
    return 0


# --- parser ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gralora", description="GraLoRA adapters: export, merge, generate, inspect.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="write the adapter as an ordinary LoRA (diffusers or kohya/webui keys)")
    p.add_argument("adapter", help="GraLoRA .safetensors file")
    p.add_argument("--to", choices=["diffusers", "kohya"], default="diffusers", help="key layout (default diffusers)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="the same LoRA rank for every layer (SVD truncation)")
    how.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this share of the energy")
    how.add_argument("--exact", action="store_true", help="the lossless rank k*r + hybrid_r (capped by the layer)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors")
    p.add_argument("--layers_per_block", type=int, default=None, help="kohya names: the UNet's layers_per_block")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("merge", help="fuse adapters into the base and save a plain diffusers pipeline folder")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER[:WEIGHT]")
    p.add_argument("--base", default=None, help="diffusers folder or hub id (default: the offline toy base)")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("generate", help="one image with adapters blended, settings in the PNG text chunk")
    p.add_argument("--base", default=None)
    p.add_argument("--adapter", action="append", default=[], metavar="FILE[:WEIGHT]")
    p.add_argument("--prompt", required=True, help="may contain <gralora:NAME:WEIGHT> tags naming given adapters")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--size", type=int, default=None, help="width and height (default 1024; 64 on the toy base)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--scheduler", default="Euler")
    p.add_argument("--dtype", default=None)
    p.add_argument("-o", "--output", required=True, help="output .png")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="what an adapter file holds")
    p.add_argument("adapter")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # our errors are ValueError subclasses with one clear sentence
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
