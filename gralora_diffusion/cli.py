"""The ``gralora`` command: export to LoRA, merge into a checkpoint, generate, inspect.

    gralora export ADAPTER.safetensors --to diffusers|kohya (--rank N | --energy 0.99 | --exact) -o OUT.safetensors
    gralora export ADAPTER.safetensors --to comfyui -o OUT.safetensors
    gralora merge [--base PATH_OR_ID_OR_FILE] ADAPTER[:WEIGHT] ... -o DIR|CHECKPOINT.safetensors
    gralora generate [--base PATH_OR_ID] --adapter FILE[:WEIGHT] ... --prompt "..." --seed 0 -o out.png
    gralora inspect ADAPTER.safetensors [--json]

Without ``--base``, merge and generate use the offline toy SDXL base (``gralora_diffusion.toy.toy_sdxl_base_dir``);
export reads the base recorded in the adapter when it is available offline, else SDXL's layout. Bad input gets one
line on stderr and exit status 2, before any output is written; outputs are written under a temporary name and
renamed, so a failed or interrupted command leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path

EXIT_BAD_INPUT = 2
BASE_HELP = "diffusers folder, hub id or one .safetensors checkpoint; toy, toy-world: offline toy bases (default: toy)"


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line like every other error of the command."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see '{self.prog} --help').\n")


def parse_weighted(spec: str) -> tuple[str, float]:
    """``path/to/file.safetensors:0.8`` -> (path, 0.8); no ``:WEIGHT`` means 1.0."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(weight):
            raise ValueError(f"The weight in {spec!r} is not a finite number; write e.g. {head}:0.8.")
        return head, weight
    return spec, 1.0


def _base_dir(base: str | None) -> str:
    from .bases import resolve_base

    return resolve_base(base)


def _skeleton(base: str, single_file_config: str | None = None) -> dict:
    """The base's adaptable models on the meta device (configs only; a single file's from its config source)."""
    from .bases import config_source
    from .export import base_skeleton

    return base_skeleton(config_source(base, single_file_config))


def _read_adapters(specs: list[tuple[str, float]], models: dict) -> list:
    """Read every adapter and check it against the base's module shapes (``_skeleton``: configs only), before any
    weight loads."""
    from .io import read_adapter
    from .peft_ops import check_fits

    if not specs:
        raise ValueError("Give at least one adapter file.")
    adapters = [read_adapter(path) for path, _ in specs]
    for adapter in adapters:
        check_fits(models, adapter)
    return adapters


def _load_pipeline(base: str, dtype: str | None = None, single_file_config: str | None = None):
    import torch

    from .bases import load_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype) if dtype else (torch.float16 if device == "cuda" else torch.float32)
    pipe = load_pipeline(base, single_file_config=single_file_config, torch_dtype=torch_dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- subcommands -------------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from .bases import config_source, is_registered, resolve_base
    from .export import export_comfyui, export_lora
    from .io import read_adapter

    base = args.base
    if base is None:  # a toy adapter's recorded base is readable offline through the registry
        recorded = read_adapter(args.adapter).base_model
        base = recorded if is_registered(recorded) else None
    if base is not None:
        base = config_source(resolve_base(base), args.single_file_config)  # a single file: names from its configs
    if args.to == "comfyui":
        if args.rank is not None or args.energy is not None or args.exact:
            raise ValueError("--to comfyui writes the GraLoRA factors as they are; drop --rank, --energy and --exact.")
        result = export_comfyui(args.adapter, args.output, base=base, dtype=args.dtype)
        layers = sum(r.layers for r in result.components)
        print(
            f"wrote {result.path} (GraLoRA factors of {layers} layers for ComfyUI with the gralora node; UNet blocks "
            f"named for {result.unet_naming})"
        )
        return 0
    result = export_lora(
        args.adapter, args.output, args.to, rank=args.rank, energy=args.energy, exact=args.exact, base=base,
        dtype=args.dtype,
    )  # fmt: skip
    print(f"{'component':<15} {'layers':>6}  {'rank':<7} {'relative error':>14}  {'worst layer':>11}")
    for r in result.components:
        print(
            f"{r.component:<15} {r.layers:>6}  {r.rank_text:<7} {r.relative_error:>14.3e}  {r.worst_layer_error:>11.3e}"
        )
    named = "UNet blocks named" if any(r.component == "unet" for r in result.components) else "names"
    naming = f"; {named} for {result.unet_naming}" if result.unet_naming else ""
    print(f"wrote {result.path} ({result.layout} layout{naming})")
    if args.to == "diffusers":
        print(
            "note: this layout is for diffusers' load_lora_weights; ComfyUI and AUTOMATIC1111 do not map its UNet "
            "attention layers: use --to kohya (a LoRA) or --to comfyui (GraLoRA, with the gralora node) for them."
        )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from . import adapters as api
    from .export import save_single_file
    from .families import family_of_components
    from .fs import write_directory_atomically

    out = Path(args.output)
    single_file = out.suffix.lower() == ".safetensors"
    if single_file and out.exists():
        raise ValueError(f"{out} exists; choose a new file name.")
    if not single_file and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose a new output folder.")
    specs = [parse_weighted(s) for s in args.adapters]
    base = _base_dir(args.base)
    skeleton = _skeleton(base, args.single_file_config)
    adapters = _read_adapters(specs, skeleton)
    if single_file and family_of_components(skeleton).name != "sdxl":
        raise ValueError(
            "A single-file checkpoint (-o NAME.safetensors) is written for SDXL bases only; give a folder."
        )
    pipe = _load_pipeline(base, args.dtype, args.single_file_config)
    names = [api.load_gralora_weights(pipe, adapter, adapter_name=f"a{i}") for i, adapter in enumerate(adapters)]
    api.set_gralora_adapters(pipe, names, [w for _, w in specs])
    api.fuse_gralora(pipe)
    api.unload_gralora_weights(pipe)  # keeps the fused blend, drops the adapter modules: a plain pipeline
    record = {
        "base": args.base or "toy-sdxl",
        "adapters": [
            {"file": Path(path).name, "weight": weight, "base_model": adapter.base_model}
            for (path, weight), adapter in zip(specs, adapters)
        ],
    }
    if single_file:
        save_single_file(pipe, out, {"gralora_merge": json.dumps(record)})
    else:

        def write(tmp: Path) -> None:
            pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / "gralora_merge.json").write_text(json.dumps(record, indent=2))

        write_directory_atomically(out, write)
    print(f"merged {', '.join(f'{Path(p).name}:{w:g}' for p, w in specs)} into {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .bases import base_defaults
    from .studio import (
        FLOW_SCHEDULERS,
        SCHEDULERS,
        AdapterChoice,
        AdapterFiles,
        GenerationRequest,
        Limits,
        Studio,
        check_request,
    )

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise ValueError(f"The output must be a .png file, got {out.name}; rename it.")
    specs = [parse_weighted(s) for s in args.adapter]
    files = AdapterFiles([p for p, _ in specs])  # .safetensors files, distinct names
    limits = Limits()

    def make_request(defaults: dict) -> GenerationRequest:
        """The flags given, the rest from ``defaults`` (the base's own, once it is loaded, as in the app)."""
        size = args.size or defaults["width"]
        return GenerationRequest(
            prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps or defaults["steps"],
            guidance_scale=defaults["guidance_scale"] if args.guidance_scale is None else args.guidance_scale,
            width=args.width or size, height=args.height or size, scheduler=args.scheduler, seed=args.seed,
            adapters=[AdapterChoice(Path(p).stem, w) for p, w in specs],
        )  # fmt: skip

    # the flags given are checked before anything loads (placeholders for the rest; the base's sampler menu is
    # checked once it is loaded)
    placeholders = {"width": limits.min_size, "steps": 1, "guidance_scale": 0.0}
    check_request(make_request(placeholders), limits, {**SCHEDULERS, **FLOW_SCHEDULERS})
    base = _base_dir(args.base)
    if specs:
        _read_adapters(specs, _skeleton(base, args.single_file_config))
    pipe = _load_pipeline(base, args.dtype, args.single_file_config)
    studio = Studio(pipe, files, base_name=args.base or "toy-sdxl", limits=limits, defaults=base_defaults(args.base))
    result = studio.generate(make_request(studio.defaults))
    if result.errors:
        raise ValueError("; ".join(f"{name}: {why}" for name, why in result.errors.items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    studio.save_png(result.images[0], out, result, 0)
    print(f"wrote {out} (seed {result.seed})")
    return 0


def adapter_summary(path: str | Path) -> dict:
    """What ``gralora inspect`` shows, as a JSON-able dict."""
    from .export import lossless_ranks
    from .io import read_adapter

    path = Path(path)
    adapter = read_adapter(path)
    components = {}
    for component, config in adapter.configs.items():
        ranks = [rank for rank, _, _ in lossless_ranks(adapter, component).values()]
        components[component] = {
            "target_modules": len(adapter.module_names(component)),
            "r": config.r,
            "k": config.gralora_k,
            "alpha": config.alpha,
            "hybrid_r": config.hybrid_r,
            "parameters": sum(t.numel() for t in adapter.state_dicts[component].values()),
            "exact_lora_rank": max(ranks),
        }
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return {
        "file": str(path),
        "size_bytes": sum(p.stat().st_size for p in files),
        "base_model": adapter.base_model,
        "trigger_prompt": adapter.metadata.get("trigger_prompt", ""),
        "steps": adapter.metadata.get("steps", ""),
        "parameters": adapter.num_parameters(),
        "components": components,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
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
            f"hybrid_r={c['hybrid_r']}  {c['parameters']:,} parameters  lossless LoRA rank {c['exact_lora_rank']}"
        )
    return 0


# --- parser ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``gralora`` argument parser with its four subcommands."""
    parser = _Parser(prog="gralora", description="GraLoRA adapters: export, merge, generate, inspect.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{export,merge,generate,inspect}")

    p = sub.add_parser(
        "export",
        help="write the adapter as an ordinary LoRA (diffusers or kohya keys) or for the ComfyUI node",
        description="Write a GraLoRA adapter as an ordinary LoRA: lossless (--exact, rank k*r + hybrid_r) or "
        "SVD-truncated (--rank, --energy). Prints per component the rank and the relative Frobenius error of the "
        "delta.",
    )
    p.add_argument("adapter", help="GraLoRA .safetensors file")
    p.add_argument(
        "--to", choices=["diffusers", "kohya", "comfyui"], default="diffusers",
        help="diffusers (pipe.load_lora_weights), kohya (a LoRA for AUTOMATIC1111, Forge, ComfyUI) or comfyui (the "
        "GraLoRA factors, no SVD, for ComfyUI with integrations/comfyui installed); default diffusers",
    )  # fmt: skip
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rank", type=int, help="the same LoRA rank for every layer (SVD truncation)")
    how.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this share (0-1] of the energy")
    how.add_argument("--exact", action="store_true", help="the lossless rank k*r + hybrid_r (capped by the layer)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors")
    p.add_argument(
        "--base", default=None,
        help="the adapter's base (diffusers folder or hub id): checks the adapter fits and names kohya UNet blocks by "
        "its config; default: the adapter's recorded base if available offline, else SDXL's layout",
    )  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="tensor dtype")
    p.add_argument(
        "--single_file_config", default=None,
        help="for a --base that is one .safetensors checkpoint: a diffusers folder or hub id with the same "
        "architecture's configs (default: stabilityai/stable-diffusion-xl-base-1.0)",
    )  # fmt: skip
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "merge",
        help="fuse adapters into the base and save a plain pipeline folder or single-file checkpoint",
        description="Fuse adapters at the given weights into the base and save the pipeline: a diffusers folder "
        "(save_pretrained, safetensors; from_pretrained loads it with no adapter code), or with -o NAME.safetensors "
        "one SDXL checkpoint in the original layout.",
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER[:WEIGHT]", help="GraLoRA files, weight 1 by default")
    p.add_argument("--base", default=None, help=BASE_HELP)
    p.add_argument(
        "-o", "--output", required=True,
        help="output folder (must not exist or be empty), or NAME.safetensors: one checkpoint in the original SDXL "
        "layout (AUTOMATIC1111, Forge, ComfyUI, diffusers' from_single_file)",
    )  # fmt: skip
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default: fp16 on GPU")
    p.add_argument(
        "--single_file_config", default=None,
        help="for a --base that is one .safetensors checkpoint: a diffusers folder or hub id with the same "
        "architecture's configs (default: stabilityai/stable-diffusion-xl-base-1.0)",
    )  # fmt: skip
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "generate",
        help="one image with adapters blended, settings in the PNG text chunk",
        description="Generate one image (the scripted twin of the app); the settings go into the PNG text chunk.",
    )
    p.add_argument("--base", default=None, help=BASE_HELP)
    p.add_argument(
        "--single_file_config", default=None,
        help="for a --base that is one .safetensors checkpoint: a diffusers folder or hub id with the same "
        "architecture's configs (default: stabilityai/stable-diffusion-xl-base-1.0)",
    )  # fmt: skip
    p.add_argument("--adapter", action="append", default=[], metavar="FILE[:WEIGHT]", help="repeat for several")
    p.add_argument("--prompt", required=True, help="may contain <gralora:NAME:WEIGHT> tags naming given adapters")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: the base's (25; 20 on toy-world)")
    p.add_argument(
        "--guidance_scale", type=float, default=None,
        help="default: the base's (SDXL 5, SD 1.x 7.5, SD3 7; 3 on toy-world)",
    )  # fmt: skip
    p.add_argument(
        "--size", type=int, default=None,
        help="width and height; default: the base's (its UNet sample size times the VAE scale: 1024 on SDXL, 64 on "
        "the toy bases)",
    )  # fmt: skip
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--scheduler", default="Euler")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default: fp16 on GPU")
    p.add_argument("-o", "--output", required=True, help="output .png")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="what an adapter file holds", description="Show what a GraLoRA file holds.")
    p.add_argument("adapter", help="GraLoRA .safetensors file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    return parser


@contextmanager
def _quiet_libraries():
    """Silence diffusers' and transformers' progress bars and transformers' notices while a command runs: stderr
    is kept for this command's own error line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    silenced = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in silenced:
        lib.disable_progress_bar()
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        for lib in silenced:
            lib.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the ``gralora`` command; returns the exit status (0, or 2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        with _quiet_libraries():
            return args.func(args)
    except (ValueError, OSError) as err:  # the package's errors are ValueErrors with one clear sentence
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
