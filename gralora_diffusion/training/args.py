"""Command-line flags of the DreamBooth trainer: diffusers' names and defaults, plus GraLoRA and kohya extras.

A user of diffusers' ``train_dreambooth_lora_sdxl.py`` keeps their command line; ``--rank`` is the GraLoRA rank.
``check_args`` validates everything that can be checked before a model is loaded.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..bases import check_single_file, is_single_file, same_base
from ..config import GraloraConfigError, make_gralora_config
from ..families import SDXL
from .checkpoint import resolve_resume
from .data import TrainingDataError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DreamBooth training of a GraLoRA adapter for Stable Diffusion XL (UNet and optionally both "
        "text encoders). Flags follow diffusers' train_dreambooth_lora_sdxl.py."
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="SDXL folder, hub id or one .safetensors checkpoint (the original layout community models ship in); "
        "toy, toy-world: offline toy bases",
    )
    g.add_argument(
        "--single_file_config",
        default=None,
        help="for a single-file checkpoint: a diffusers folder or hub id with the same architecture's configs "
        "(default: stabilityai/stable-diffusion-xl-base-1.0, as diffusers does)",
    )
    g.add_argument("--pretrained_vae_model_name_or_path", default=None, help="a better VAE (e.g. the fp16-fix VAE)")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None)

    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", default=None, help="folder of instance images (+ .txt / metadata.jsonl)")
    g.add_argument("--dataset_name", default=None, help="a `datasets` dataset instead of a folder")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--image_column", default="image")
    g.add_argument("--caption_column", default=None)
    g.add_argument("--repeats", type=int, default=1, help="how many times each image is seen per epoch")
    g.add_argument("--resolution", type=int, default=1024)
    g.add_argument("--center_crop", action="store_true", help="center crop instead of random crop")
    g.add_argument("--random_flip", action="store_true", help="random horizontal flips, redrawn every epoch")
    g.add_argument(
        "--image_interpolation_mode", default="lanczos", choices=["lanczos", "bilinear", "bicubic", "nearest"]
    )
    g.add_argument("--enable_bucket", action="store_true", help="aspect-ratio bucketing (kohya)")
    g.add_argument("--min_bucket_reso", type=int, default=None)
    g.add_argument("--max_bucket_reso", type=int, default=None)
    g.add_argument("--bucket_reso_steps", type=int, default=64)
    g.add_argument("--no_upscale", action="store_true", help="refuse images smaller than their training size")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0, help="share of captions replaced by ''")
    g.add_argument(
        "--dataloader_num_workers", type=int, default=0,
        help="worker processes preparing batches (0: in the training process); results are identical either way",
    )  # fmt: skip

    g = p.add_argument_group("dreambooth")
    g.add_argument("--instance_prompt", required=True, help="trigger prompt, e.g. 'a photo of sks dog'")
    g.add_argument("--class_prompt", default=None)
    g.add_argument("--class_data_dir", default=None)
    g.add_argument("--with_prior_preservation", action="store_true")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--num_class_images", type=int, default=100)
    g.add_argument("--sample_batch_size", type=int, default=4)
    g.add_argument("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"])
    g.add_argument("--class_inference_steps", type=int, default=25)

    g = p.add_argument_group("gralora")
    g.add_argument("--rank", type=int, default=4, help="GraLoRA rank r (parameters as a LoRA of rank r)")
    g.add_argument("--gralora_k", type=int, default=None, help="k x k blocks; default 2 for r <= 32, 4 for r >= 64")
    g.add_argument("--hybrid_r", type=int, default=0, help="rank of an extra shared LoRA (added on top of r)")
    g.add_argument("--alpha", type=float, default=None, help="scale numerator; default 2 * rank")
    g.add_argument("--lora_dropout", "--gralora_dropout", dest="gralora_dropout", type=float, default=0.0)
    g.add_argument(
        "--unet_target", default="attention", choices=list(SDXL.presets["unet"]),
        help="attention: the attention projections; wide: also feed-forward and proj_in/out; attention-conv: the "
        "attention projections and every ResNet block's two 3x3 convolutions (LoCon-style, same rank)",
    )  # fmt: skip
    g.add_argument("--train_text_encoder", action="store_true")
    g.add_argument("--text_encoder_lr", type=float, default=5e-6)
    g.add_argument(
        "--gralora_recompute",
        action="store_true",
        help="recompute GraLoRA's k*r-wide intermediate in backward instead of keeping it, in linear and conv layers: "
        "less activation memory, more compute (full SDXL on an H100, PEFT's layer: 1-4%% less peak memory for 1.8x "
        "the step time)",
    )
    g.add_argument("--no_gralora_recompute", dest="gralora_recompute", action="store_false", help="the default")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=4)
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true")
    g.add_argument("--lr_scheduler", default="constant")
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--lr_num_cycles", type=int, default=1)
    g.add_argument("--lr_power", type=float, default=1.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--use_8bit_adam", action="store_true")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-4)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (5.0 is common)")
    g.add_argument("--noise_offset", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cache_latents", action="store_true")

    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompt", default=None, help="one or several prompts separated by '|'")
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_epochs", type=int, default=50)
    g.add_argument("--validation_steps", type=int, default=None, help="validate every N steps (overrides epochs)")
    g.add_argument("--validation_inference_steps", type=int, default=25)

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="gralora-dreambooth-model")
    g.add_argument("--output_name", default=None, help="adapter file name (default: the output folder's name)")
    g.add_argument("--overwrite_output_dir", action="store_true")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    g.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    g.add_argument("--logging_dir", default="logs")
    return p


def adapter_path(args) -> Path:
    out = Path(args.output_dir)
    return out / f"{args.output_name or out.resolve().name}.safetensors"


def check_args(args) -> None:
    """Everything that can be wrong before a model is loaded; raises ``TrainingDataError`` with one sentence."""
    if (args.instance_data_dir is None) == (args.dataset_name is None):
        raise TrainingDataError("Give exactly one of --instance_data_dir and --dataset_name.")
    if args.instance_data_dir is not None and not Path(args.instance_data_dir).is_dir():
        raise TrainingDataError(f"--instance_data_dir {args.instance_data_dir} does not exist or is not a folder.")
    if args.with_prior_preservation and (not args.class_prompt or not args.class_data_dir):
        raise TrainingDataError("--with_prior_preservation needs --class_prompt and --class_data_dir.")
    check_numbers(args)
    if is_single_file(args.pretrained_model_name_or_path):
        try:
            check_single_file(args.pretrained_model_name_or_path)
        except ValueError as err:
            raise TrainingDataError(str(err)) from None
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise TrainingDataError(f"--output_dir {args.output_dir} is a file, not a folder; choose a folder.")
    if args.resolution % 8:
        raise TrainingDataError(f"--resolution must be a multiple of 8, got {args.resolution}.")
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        raise TrainingDataError("--train_batch_size and --gradient_accumulation_steps must be at least 1.")
    if args.dataloader_num_workers < 0:
        raise TrainingDataError(f"--dataloader_num_workers must be 0 or more, got {args.dataloader_num_workers}.")
    try:
        make_gralora_config(args.rank, ["to_q"], gralora_k=args.gralora_k, hybrid_r=args.hybrid_r)
    except GraloraConfigError as err:
        raise TrainingDataError(str(err)) from None
    if adapter_path(args).exists() and not args.overwrite_output_dir and not args.resume_from_checkpoint:
        raise TrainingDataError(
            f"{adapter_path(args)} already holds a finished adapter; pass --overwrite_output_dir or choose "
            "another --output_dir."
        )
    resume = resolve_resume(args.output_dir, args.resume_from_checkpoint)  # raises for a damaged or missing one
    if resume is not None:
        check_resume_compatible(args, resume)


def unet_target_of(module_names) -> str:
    """The ``--unet_target`` that adapts exactly the UNet modules ``module_names`` has (by their last names)."""
    from ..families import UNET_ATTENTION, UNET_ATTENTION_CONV, UNET_WIDE

    def only(preset) -> tuple[str, ...]:
        return tuple(f".{m}" for m in preset if m not in UNET_ATTENTION)

    names = list(module_names)
    if any(name.endswith(only(UNET_ATTENTION_CONV)) for name in names):
        return "attention-conv"
    if any(name.endswith(only(UNET_WIDE)) for name in names):
        return "wide"
    return "attention"


def check_resume_compatible(args, checkpoint: Path) -> None:
    """The checkpoint was trained with this run's adapter settings and base; else one sentence naming the
    difference (instead of PEFT's shape-mismatch traceback after the models have loaded)."""
    from ..config import default_gralora_k
    from ..io import read_adapter
    from .checkpoint import ADAPTER_NAME

    adapter = read_adapter(checkpoint / ADAPTER_NAME)
    unet = adapter.configs.get("unet")
    wanted = {
        "rank": args.rank,
        "gralora_k": args.gralora_k or default_gralora_k(args.rank),
        "hybrid_r": args.hybrid_r,
        "alpha": args.alpha if args.alpha is not None else 2 * args.rank,
    }
    found = {"rank": unet.r, "gralora_k": unet.gralora_k, "hybrid_r": unet.hybrid_r, "alpha": unet.alpha}
    for name, value in wanted.items():
        if float(found[name]) != float(value):
            raise TrainingDataError(
                f"{checkpoint.name} was trained with {name} {found[name]:g} but this run asks for {value:g}; resume "
                "with the same settings or start a new --output_dir."
            )
    trained_target = unet_target_of(adapter.module_names("unet"))
    if trained_target != args.unet_target:
        raise TrainingDataError(
            f"{checkpoint.name} was trained with --unet_target {trained_target} but this run asks for "
            f"{args.unet_target}; resume with the same setting or start a new --output_dir."
        )
    if ("text_encoder" in adapter.components) != bool(args.train_text_encoder):
        trained = "with" if "text_encoder" in adapter.components else "without"
        raise TrainingDataError(
            f"{checkpoint.name} was trained {trained} --train_text_encoder; resume with the same setting or start a "
            "new --output_dir."
        )
    named = getattr(args, "base_model_name", None) or str(args.pretrained_model_name_or_path)
    if adapter.base_model and not same_base(adapter.base_model, named):  # "toy-world" and its folder are one base
        raise TrainingDataError(
            f"{checkpoint.name} was trained on {adapter.base_model}, not {named}; "
            "resume on the same base or start a new --output_dir."
        )


# flag -> (check, what it must be); None values (flag not given) are not checked
_NUMBER_RULES = {
    "learning_rate": (lambda v: v > 0, "a positive finite number"),
    "text_encoder_lr": (lambda v: v > 0, "a positive finite number"),
    "alpha": (lambda v: v > 0, "a positive finite number"),
    "max_grad_norm": (lambda v: v >= 0, "a finite number >= 0 (0 turns clipping off)"),
    "snr_gamma": (lambda v: v > 0, "a positive finite number"),
    "noise_offset": (lambda v: v >= 0, "a finite number >= 0"),
    "prior_loss_weight": (lambda v: v >= 0, "a finite number >= 0"),
    "caption_dropout_rate": (lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "gralora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "resolution": (lambda v: v > 0, "a positive multiple of 8"),
    "repeats": (lambda v: v >= 1, "at least 1"),
    "num_train_epochs": (lambda v: v >= 1, "at least 1"),
    "max_train_steps": (lambda v: v >= 1, "at least 1"),
    "checkpointing_steps": (lambda v: v >= 1, "at least 1"),
}


def check_numbers(args) -> None:
    """Every numeric flag is finite and in range (``--learning_rate nan`` would train and save an all-NaN adapter)."""
    for name, (ok, expected) in _NUMBER_RULES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value) or not ok(value):
            raise TrainingDataError(f"--{name} must be {expected}, got {value}.")


def make_config(**settings) -> argparse.Namespace:
    """A training configuration from Python: the command line's defaults with ``settings`` (flag names without the
    dashes) applied, checked like a command line. ``make_config(pretrained_model_name_or_path=..., instance_prompt=...,
    instance_data_dir=..., output_dir=...)`` is the same run as the equivalent flags."""
    required = [a for a in build_parser()._actions if a.required]
    missing = [a.dest for a in required if a.dest not in settings]
    if missing:
        raise TrainingDataError(f"The training setting {missing[0]!r} is required.")
    args = build_parser().parse_args([f"{a.option_strings[0]}={settings[a.dest]}" for a in required])
    known = set(vars(args))
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TrainingDataError(f"Unknown training setting {unknown[0]!r}; use the flag names of the trainer.")
    for name, value in settings.items():
        setattr(args, name, value)
    return args
