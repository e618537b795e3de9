"""DreamBooth training of a GraLoRA adapter for SDXL: the driver behind train_scripts/train_dreambooth_gralora_sdxl.py.

    accelerate launch train_scripts/train_dreambooth_gralora_sdxl.py --pretrained_model_name_or_path=... \
        --instance_data_dir=dog --instance_prompt="a photo of sks dog" --output_dir=sks-dog --rank=32

Read top to bottom: set-up (flags checked before any model loads), models and adapters, data, the loop, the output.
Data, loss, latents, checkpoints and generation are small tested modules beside this one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import make_gralora_config
from ..fs import remove_stale_temporaries, write_file_atomically, write_text_atomically
from ..io import save_gralora_weights
from ..layers import GraloraConv2d, gralora_layers, use_memory_lean_training
from ..peft_ops import add_gralora_adapter
from . import checkpoint as ckpt
from .args import adapter_path, build_parser, check_args
from .data import (
    DreamBoothDataset,
    EpochBatches,
    TrainingDataError,
    collate,
    epoch_batches,
    epoch_loader,
    read_hf_dataset,
    read_image_folder,
    shard_batches,
    short_batches_message,
    smaller_than_their_bucket,
    training_buckets,
)
from .generation import ensure_class_images, generate_validation_images
from .latents import LatentEncoder
from .loss import denoising_loss
from .model_card import write_model_card
from .text import PromptCache, encode_prompts

logger = logging.getLogger("gralora_diffusion.train")
MAX_SKIPPED_STEPS = 20  # fp16: optimiser steps the gradient scaler may skip (overflow) before the run is stopped


class TrainingStopped(RuntimeError):
    """The run cannot go on (the loss became non-finite); the message names the step and what to do."""


INTERPOLATION = {"lanczos": 1, "bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image resampling codes


def step_seed(seed: int, *parts: int) -> int:
    """A seed for one micro-step that depends only on the run seed and the step's position (resume-exact)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()[:8], "little") >> 1


def load_models(args, weight_dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from ..bases import is_single_file, load_pipeline

    base = args.pretrained_model_name_or_path
    kw = {"revision": args.revision}
    better_vae = None
    if args.pretrained_vae_model_name_or_path:
        better_vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
    if is_single_file(base):  # one checkpoint in the original layout: diffusers' from_single_file, then the parts
        pipe = load_pipeline(
            base, single_file_config=args.single_file_config, **({"vae": better_vae} if better_vae else {})
        )
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
        vae, unet = pipe.vae, pipe.unet
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    else:
        tokenizers = [AutoTokenizer.from_pretrained(base, subfolder=f, **kw) for f in ("tokenizer", "tokenizer_2")]
        text_encoders = [
            CLIPTextModel.from_pretrained(base, subfolder="text_encoder", variant=args.variant, **kw),
            CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", variant=args.variant, **kw),
        ]
        vae = better_vae or AutoencoderKL.from_pretrained(base, subfolder="vae", variant=args.variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=args.variant, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **kw)
    for model in [unet, vae, *text_encoders]:
        model.requires_grad_(False)
    # SDXL's VAE overflows in fp16 (black images): keep it in fp32 unless a fixed VAE was given.
    vae.to(dtype=torch.float32 if not args.pretrained_vae_model_name_or_path else weight_dtype)
    unet.to(dtype=weight_dtype)
    for encoder in text_encoders:
        encoder.to(dtype=weight_dtype)
    return tokenizers, text_encoders, vae, unet, noise_scheduler


def text_encoder_targets(encoder, uses_last_layer: bool) -> list[str]:
    """The attention projections of a CLIP text encoder that can influence SDXL's conditioning.

    SDXL reads the penultimate hidden states of both encoders and the pooled output of the second only, so the last
    layer of the first encoder never receives a gradient: adapting it would waste parameters (and make DDP fail on
    parameters without gradients).
    """
    from ..config import find_target_modules
    from ..families import CLIP_ATTENTION

    last = encoder.config.num_hidden_layers - 1
    names = find_target_modules(encoder, CLIP_ATTENTION)
    return sorted(n for n in names if uses_last_layer or f".layers.{last}." not in n)


def add_adapters(args, unet, text_encoders) -> dict:
    """GraLoRA on the UNet (and both text encoders with --train_text_encoder); trainable parameters in fp32."""
    common = {
        "gralora_k": args.gralora_k,
        "alpha": args.alpha,
        "hybrid_r": args.hybrid_r,
        "dropout": args.gralora_dropout,
    }
    models = {"unet": unet}
    unet_config = make_gralora_config(args.rank, f"unet-{args.unet_target}", **common)
    add_gralora_adapter(unet, unet_config, component="unet")
    if args.train_text_encoder:
        for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
            targets = text_encoder_targets(encoder, uses_last_layer=name == "text_encoder_2")
            add_gralora_adapter(encoder, make_gralora_config(args.rank, targets, **common), component=name)
            models[name] = encoder
    for model in models.values():
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if args.gralora_recompute:
        for model in models.values():
            use_memory_lean_training(model)
        layers = [layer for model in models.values() for _, layer in gralora_layers(model)]
        lean = [layer for layer in layers if getattr(layer, "recompute_intermediate", False)]
        convs = sum(isinstance(layer, GraloraConv2d) for layer in lean)
        logger.info(f"--gralora_recompute: {len(lean)} of {len(layers)} adapted layers ({convs} convolutions) "
                    "recompute their k*r-wide intermediate in backward")  # fmt: skip
    return models


def build_pipeline(args, unet, text_encoders, tokenizers, vae, dtype):
    """A generation pipeline sharing the training modules (for class images and validation); only the scheduler is
    read, from the base folder (or a single file's config source)."""
    from diffusers import StableDiffusionXLPipeline

    from ..bases import config_source

    pipe = StableDiffusionXLPipeline.from_pretrained(
        config_source(args.pretrained_model_name_or_path, args.single_file_config),
        unet=unet,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        vae=vae,
        revision=args.revision,
        variant=args.variant,
        torch_dtype=dtype,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_adapter(path: Path, models: dict, accelerator, args, steps: int) -> Path:
    unwrapped = {name: accelerator.unwrap_model(model) for name, model in models.items()}
    metadata = {
        "base_model": args.base_model_name,
        "trigger_prompt": args.instance_prompt,
        "steps": str(steps),
        "resolution": str(args.resolution),
        "trainer": "gralora-diffusion train_dreambooth_gralora_sdxl",
    }
    return save_gralora_weights(path, metadata=metadata, **unwrapped)


def load_adapter_state(path: Path, models: dict, accelerator) -> None:
    """Put a checkpoint's adapter tensors back into the (wrapped) training models."""
    from peft import set_peft_model_state_dict

    from ..io import read_adapter

    adapter = read_adapter(path)
    for name, model in models.items():
        target = accelerator.unwrap_model(model)
        sd = {k: v.to(torch.float32) for k, v in adapter.state_dicts[name].items()}
        result = set_peft_model_state_dict(target, sd, adapter_name="default")
        missing = [k for k in getattr(result, "unexpected_keys", []) if "gralora_" in k]
        if missing:
            raise ckpt.CheckpointError(f"{path} does not match this run's adapter ({missing[0]}); start a new run.")


@torch.no_grad()
def eval_loss(dataset, encoder, prompt_fn, unet, noise_scheduler, accelerator, weight_dtype, seed: int) -> float:
    """Loss on every instance image at fixed noise and timesteps: comparable before and after training."""
    losses = []
    for index in range(len(dataset.instances)):
        batch = collate([dataset.example(index, epoch=0)])
        gen = torch.Generator().manual_seed(seed + index)
        latents = encoder(batch, gen).to(accelerator.device, weight_dtype)
        embeds, pooled = prompt_fn(batch["captions"])
        loss, _ = denoising_loss(
            unet, noise_scheduler, latents, embeds.to(latents.device, weight_dtype),
            pooled.to(latents.device, weight_dtype), batch["time_ids"].to(latents.device, weight_dtype), gen,
            timesteps=torch.tensor([100 + (index * 211) % 800]),
        )  # fmt: skip
        losses.append(loss.item())
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)  # entry point only
    try:
        instances = read_instances(args)
    except (TrainingDataError, ckpt.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        train(args, instances)
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def read_instances(args) -> list:
    """Check every flag, then read the instance images (folder or dataset): all before any model is loaded."""
    check_args(args)
    if args.instance_data_dir:
        records = read_image_folder(args.instance_data_dir, args.instance_prompt)
    else:
        records = read_hf_dataset(
            args.dataset_name, args.image_column, args.caption_column, args.instance_prompt, args.dataset_config_name,
            args.cache_dir,
        )  # fmt: skip
    if args.no_upscale:
        buckets = training_buckets(
            args.resolution, args.enable_bucket, args.bucket_reso_steps, args.min_bucket_reso, args.max_bucket_reso
        )
        smaller_than_their_bucket(records, buckets, no_upscale=True)
    return records


@dataclass
class TrainResult:
    """What a run produced, for the demo and benchmarks (also written to ``train_metrics.json``)."""

    adapter: Path | None  # None on processes other than the main one
    steps: int
    num_processes: int
    losses: list[float] = field(default_factory=list)
    prior_losses: list[float] = field(default_factory=list)
    initial_eval_loss: float | None = None
    final_eval_loss: float | None = None
    latents_encoded: int = 0


def train(args, instances: list | None = None) -> TrainResult:
    """Run a whole training: set up, resume if asked, loop, finish. ``args`` is the command line's namespace or
    ``make_config(...)``; ``instances`` default to reading them as the command line does."""
    from ..bases import resolve_base

    # the adapter records the base as it was named ("toy-world", a hub id, a folder), the models load from where the
    # name resolves: a base from this project's registry is not recorded as this machine's path to it
    args = copy.copy(args)  # the caller's namespace keeps the base as it named it
    args.base_model_name = str(args.pretrained_model_name_or_path)
    args.pretrained_model_name_or_path = resolve_base(args.pretrained_model_name_or_path)
    if instances is None:
        instances = read_instances(args)
    trainer = DreamBoothTrainer(args, instances)
    trainer.setup()
    trainer.resume()
    trainer.run()
    return trainer.finish()


class DreamBoothTrainer:
    """The training loop in readable pieces: ``setup`` (models, adapters, data, optimiser), ``resume``, ``run``
    (``step`` per micro-batch, ``checkpoint`` and validation as scheduled), ``finish`` (evaluation, adapter, card)."""

    def __init__(self, args, instances: list):
        self.args, self.instances = args, instances
        self.out = Path(args.output_dir)
        self.global_step, self.first_epoch, self.skip_batches = 0, 0, 0
        self.metrics = {"losses": [], "prior_losses": [], "initial_eval_loss": None, "final_eval_loss": None}
        self.sizes_seen: set[tuple[int, int]] = set()  # (width, height) of the pixel batches this process trained on
        self.data_fingerprint = 0.0  # sum of the latents this process trained on: differs between DDP processes
        self.skipped_steps = 0  # fp16 steps the gradient scaler skipped
        self.validation_prompts = [p.strip() for p in (args.validation_prompt or "").split("|") if p.strip()]

    # --- set-up ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        args = self.args
        report_to = None if args.report_to == "none" else args.report_to
        if report_to == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                warnings.warn(
                    "--report_to tensorboard: tensorboard is not installed; logging to the console only.", stacklevel=2
                )
                report_to = None
        self.accelerator = accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.out), logging_dir=str(self.out / args.logging_dir)
            ),
        )
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            accelerator.mixed_precision, torch.float32
        )
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        if accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            # what a run killed inside a write left: only temporaries of what the trainer writes here
            written = (
                "|".join(re.escape(n) for n in (adapter_path(args).name, "train_metrics.json", "README.md"))
                + r"|checkpoint-\d+"
            )
            for stale in remove_stale_temporaries(self.out, written):
                logger.info(f"removed {stale.name}, left by an interrupted write")

        self.tokenizers, self.text_encoders, self.vae, unet, self.noise_scheduler = load_models(args, self.weight_dtype)
        for model in [unet, self.vae, *self.text_encoders]:
            model.to(accelerator.device)
        class_records = self._class_images(unet)

        torch.manual_seed(args.seed)  # the adapters' random init (A) is part of the run's reproducibility
        models = add_adapters(args, unet, self.text_encoders)
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if args.train_text_encoder:
                for encoder in self.text_encoders:
                    encoder.gradient_checkpointing_enable()

        self.dataset = DreamBoothDataset(
            self.instances, resolution=args.resolution, seed=args.seed, repeats=args.repeats,
            center_crop=args.center_crop, random_flip=args.random_flip, caption_dropout_rate=args.caption_dropout_rate,
            enable_bucket=args.enable_bucket, bucket_reso_steps=args.bucket_reso_steps,
            min_bucket_reso=args.min_bucket_reso, max_bucket_reso=args.max_bucket_reso, no_upscale=args.no_upscale,
            class_images=class_records, interpolation=INTERPOLATION[args.image_interpolation_mode],
        )  # fmt: skip
        self.latent_encoder = LatentEncoder(self.vae, cache=args.cache_latents)

        world = accelerator.num_processes
        lr = args.learning_rate * (
            args.train_batch_size * args.gradient_accumulation_steps * world if args.scale_lr else 1
        )
        groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": lr}]
        if args.train_text_encoder:
            te_params = [p for e in self.text_encoders for p in e.parameters() if p.requires_grad]
            groups.append({"params": te_params, "lr": args.text_encoder_lr})
        optimizer = self._optimizer_class()(
            groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
        )  # fmt: skip
        self.batches_per_epoch = len(self._my_batches(0))
        steps_per_epoch = math.ceil(self.batches_per_epoch / args.gradient_accumulation_steps)
        self.max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        self.num_epochs = math.ceil(self.max_steps / steps_per_epoch)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=self.max_steps, num_cycles=args.lr_num_cycles, power=args.lr_power,
        )  # fmt: skip
        prepared = accelerator.prepare(*models.values(), optimizer)
        self.models = dict(zip(models, prepared[:-1]))
        self.optimizer = prepared[-1]
        if args.train_text_encoder:  # through the prepared (DDP-wrapped) encoders: their gradients are synchronised
            trained = [self.models["text_encoder"], self.models["text_encoder_2"]]
            self.prompt_fn = lambda captions: encode_prompts(trained, self.tokenizers, captions)
        else:
            self.prompt_fn = PromptCache(self.text_encoders, self.tokenizers)  # frozen: each prompt encoded once

    def _class_images(self, unet) -> list | None:
        """Prior-preservation class images, generated with the base model before any adapter exists."""
        args, accelerator = self.args, self.accelerator
        if not args.with_prior_preservation:
            return None
        if accelerator.is_main_process:
            precision = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
                args.prior_generation_precision, self.weight_dtype
            )
            pipe = build_pipeline(args, unet, self.text_encoders, self.tokenizers, self.vae, precision)
            ensure_class_images(
                pipe, args.class_data_dir, args.class_prompt, args.num_class_images, seed=args.seed,
                resolution=args.resolution, batch_size=args.sample_batch_size,
                num_inference_steps=args.class_inference_steps, log=logger.info,
            )  # fmt: skip
            del pipe
        accelerator.wait_for_everyone()
        return read_image_folder(args.class_data_dir, args.class_prompt, is_class=True)

    def _optimizer_class(self):
        if self.args.use_8bit_adam:
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit
            except ImportError:
                warnings.warn("--use_8bit_adam: bitsandbytes is not installed; using torch's AdamW.", stacklevel=3)
        return torch.optim.AdamW

    # --- resume ------------------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from ``--resume_from_checkpoint`` (a path or ``latest``) if there is one; then start tracking
        and measure the instance loss before training (on a fresh run)."""
        args, accelerator = self.args, self.accelerator
        path = ckpt.resolve_resume(self.out, args.resume_from_checkpoint)
        if path is not None:
            state, optimizer_state = ckpt.load_checkpoint(path)
            load_adapter_state(path / ckpt.ADAPTER_NAME, self.models, accelerator)
            self.optimizer.load_state_dict(optimizer_state)
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if accelerator.scaler is not None and state.get("scaler"):
                accelerator.scaler.load_state_dict(state["scaler"])
            self.global_step, self.first_epoch = state["step"], state["epoch"]
            self.metrics.update(state.get("metrics", {}))
            self.skipped_steps = state.get("skipped_steps", 0)
            self.skip_batches = state["batches_done_in_epoch"]
            logger.info(f"Resumed from {path} at step {self.global_step}")
        elif args.resume_from_checkpoint:
            logger.info("No checkpoint to resume from; starting a new run.")
        if accelerator.is_main_process:
            accelerator.init_trackers(
                "gralora-dreambooth", config={k: v for k, v in vars(args).items() if v is not None}
            )
        if self.global_step == 0 and accelerator.is_main_process:
            self.metrics["initial_eval_loss"] = self._eval_loss()
        short = short_batches_message(self.dataset, args.train_batch_size)
        if short and accelerator.is_main_process:
            logger.warning(short)
        logger.info(
            f"{len(self.dataset)} examples, {self.batches_per_epoch} batches/epoch/process, "
            f"{accelerator.num_processes} processes, {self.max_steps} steps, {self.num_epochs} epochs"
        )

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        from tqdm.auto import tqdm

        args = self.args
        progress = tqdm(
            range(self.max_steps), initial=self.global_step, desc="steps",
            disable=not self.accelerator.is_local_main_process,
        )  # fmt: skip
        try:
            for epoch in range(self.first_epoch, self.num_epochs):
                for model in self.models.values():
                    model.train()
                batches = self._my_batches(epoch)
                skip = self.skip_batches if epoch == self.first_epoch else 0
                epoch_data = EpochBatches(self.dataset, batches, epoch, args.with_prior_preservation, skip)
                loader = epoch_loader(epoch_data, args.dataloader_num_workers)
                for micro, batch in enumerate(loader, skip):
                    if not self.step(batch, epoch, micro, last=micro + 1 == len(batches)):
                        continue
                    progress.update(1)
                    progress.set_postfix(loss=f"{self.metrics['losses'][-1]:.4f}")
                    if self.accelerator.is_main_process and self.global_step % args.checkpointing_steps == 0:
                        self.checkpoint(epoch, micro, len(batches))
                    if (
                        self.validation_prompts
                        and self.accelerator.is_main_process
                        and _validate_now(args, self.global_step, epoch, micro, batches)
                    ):
                        self.validate()
                    if self.global_step >= self.max_steps:
                        return
        finally:
            progress.close()  # before any error line, so the error is the last thing printed

    def step(self, batch: dict, epoch: int, micro: int, last: bool) -> bool:
        """Forward and backward one micro-batch; on the last micro-batch of an accumulation, the optimiser step.
        Returns whether an optimiser step was taken."""
        args, accelerator = self.args, self.accelerator
        seed = step_seed(args.seed, epoch, micro, accelerator.process_index)
        torch.manual_seed(seed)  # adapter dropout and anything else drawing from the global generator
        gen = torch.Generator().manual_seed(seed)
        device, dtype = accelerator.device, self.weight_dtype
        latents = self.latent_encoder(batch, gen).to(device, dtype)
        self.sizes_seen.add((int(batch["pixel_values"].shape[-1]), int(batch["pixel_values"].shape[-2])))
        self.data_fingerprint += float(latents.float().sum())
        embeds, pooled = self.prompt_fn(batch["captions"])
        accum = args.gradient_accumulation_steps
        sync = (micro + 1) % accum == 0 or last
        no_sync = contextlib.ExitStack()
        if not sync:
            for model in self.models.values():
                no_sync.enter_context(accelerator.no_sync(model))
        with no_sync, accelerator.autocast():
            loss, parts = denoising_loss(
                self.models["unet"], self.noise_scheduler, latents, embeds.to(device, dtype),
                pooled.to(device, dtype), batch["time_ids"].to(device, dtype), gen,
                is_class=torch.tensor(batch["is_class"]), noise_offset=args.noise_offset, snr_gamma=args.snr_gamma,
                prior_loss_weight=args.prior_loss_weight,
            )  # fmt: skip
            if accelerator.scaler is None and not bool(torch.isfinite(loss.detach())):
                raise TrainingStopped(
                    f"The loss became {loss.item()} at step {self.global_step + 1} (epoch {epoch}); the adapter "
                    "diverged, so nothing was saved for this run beyond its last checkpoint: lower --learning_rate "
                    "or --max_grad_norm."
                )
            accelerator.backward(loss / accum)
        if not sync:
            return False
        if args.max_grad_norm:
            accelerator.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], args.max_grad_norm
            )
        self.optimizer.step()
        if accelerator.optimizer_step_was_skipped:  # fp16: the scaler found inf/NaN gradients and skipped the step
            self.skipped_steps += 1
            if self.skipped_steps > MAX_SKIPPED_STEPS:
                raise TrainingStopped(
                    f"fp16 overflow: the gradient scaler skipped {self.skipped_steps} steps (the last at step "
                    f"{self.global_step + 1}); use --mixed_precision bf16 or a lower --learning_rate."
                )
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        logs = {"loss": loss.item(), "lr": self.lr_scheduler.get_last_lr()[0], **parts}
        accelerator.log(logs, step=self.global_step)
        self.metrics["losses"].append(logs["loss"])
        if "prior_loss" in parts:
            self.metrics["prior_losses"].append(parts["prior_loss"])
        return True

    def checkpoint(self, epoch: int, micro: int, batches_in_epoch: int) -> Path:
        """Write ``checkpoint-<step>`` (adapter, optimiser, schedule, position in the data) and prune old ones."""
        position = {"epoch": epoch, "batches_done_in_epoch": micro + 1}
        if micro + 1 == batches_in_epoch:
            position = {"epoch": epoch + 1, "batches_done_in_epoch": 0}
        scaler = self.accelerator.scaler
        state = {
            **position,
            "lr_scheduler": _jsonable(self.lr_scheduler.state_dict()),
            "scaler": scaler.state_dict() if scaler is not None else None,
            # the history so far, so that train_metrics.json and the model card survive any number of resumes
            "metrics": {k: self.metrics[k] for k in ("losses", "prior_losses", "initial_eval_loss")},
            "skipped_steps": self.skipped_steps,
        }
        step = self.global_step
        path = ckpt.save_checkpoint(
            self.out, step, lambda p: save_adapter(p, self.models, self.accelerator, self.args, step), self.optimizer,
            state,
        )  # fmt: skip
        removed = ckpt.prune_checkpoints(self.out, self.args.checkpoints_total_limit)
        logger.info(f"Saved {path}" + (f", removed {[p.name for p in removed]}" if removed else ""))
        return path

    def validate(self) -> list:
        return _validate(
            self.args, self.validation_prompts, self.models, self.text_encoders, self.tokenizers, self.vae,
            self.accelerator, self.global_step,
        )  # fmt: skip

    # --- the end -----------------------------------------------------------------------------------------------

    def finish(self) -> TrainResult:
        """Evaluate, save the adapter, the validation gallery, the model card and ``train_metrics.json``."""
        args, accelerator = self.args, self.accelerator
        accelerator.wait_for_everyone()
        replicas = self._replica_fingerprints()  # collective: every process takes part
        final = None
        if accelerator.is_main_process:
            for model in self.models.values():
                model.eval()
            self.metrics["final_eval_loss"] = self._eval_loss()
            final = save_adapter(adapter_path(args), self.models, accelerator, args, self.global_step)
            gallery = self.validate() if self.validation_prompts else []
            if gallery:  # NAME.preview.png beside the adapter: what the app (and A1111) show for it
                first = gallery[0][0].read_bytes()
                write_file_atomically(final.with_name(f"{final.stem}.preview.png"), lambda tmp: tmp.write_bytes(first))
            unet_layer = next(layer for _, layer in gralora_layers(accelerator.unwrap_model(self.models["unet"])))
            write_model_card(
                self.out, adapter_file=final.name, base_model=args.base_model_name,
                instance_prompt=args.instance_prompt, rank=args.rank, gralora_k=unet_layer.gralora_k["default"],
                alpha=unet_layer.alpha["default"], hybrid_r=args.hybrid_r, steps=self.global_step,
                train_text_encoder=args.train_text_encoder, unet_target=args.unet_target,
                learning_rate=args.learning_rate, resolution=args.resolution,
                validation_images=[(str(p.relative_to(self.out)), prompt) for p, prompt in gallery],
            )  # fmt: skip
            self.metrics.update(
                {
                    "steps": self.global_step,
                    "num_processes": accelerator.num_processes,
                    "latents_encoded": self.latent_encoder.encoded,
                    "adapter": str(final),
                    "mixed_precision": accelerator.mixed_precision,
                    "unet_dtype": str(accelerator.unwrap_model(self.models["unet"]).dtype).replace("torch.", ""),
                    "pixel_sizes": sorted(self.sizes_seen),
                    "skipped_steps": self.skipped_steps,
                    **replicas,
                }
            )
            write_text_atomically(self.out / "train_metrics.json", json.dumps(self.metrics, indent=2))
            logger.info(f"Saved the adapter to {final}")
        accelerator.wait_for_everyone()  # tear the process group down together, not while the main one still saves
        accelerator.end_training()
        m = self.metrics
        return TrainResult(
            adapter=final, steps=self.global_step, num_processes=accelerator.num_processes, losses=m["losses"],
            prior_losses=m["prior_losses"], initial_eval_loss=m["initial_eval_loss"],
            final_eval_loss=m["final_eval_loss"], latents_encoded=self.latent_encoder.encoded,
        )  # fmt: skip

    # --- helpers -----------------------------------------------------------------------------------------------

    def _replica_fingerprints(self) -> dict[str, list[float]]:
        """Per process: the sum of its trainable parameters and of the data it trained on. Under DDP the processes
        see different data, so equal parameter sums show that their gradients were synchronised."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        local = torch.tensor(
            [float(sum(p.detach().double().sum() for p in params)), self.data_fingerprint],
            dtype=torch.float64, device=self.accelerator.device,
        )  # fmt: skip
        gathered = self.accelerator.gather(local[None]).cpu().tolist()
        return {"replica_param_sums": [row[0] for row in gathered], "replica_data_sums": [row[1] for row in gathered]}

    def _eval_prompts(self, captions):
        """Unwrapped modules: evaluation runs on the main process only, outside DDP."""
        names = ("text_encoder", "text_encoder_2")
        unwrap = self.accelerator.unwrap_model
        encoders = [unwrap(self.models.get(n, e)) for n, e in zip(names, self.text_encoders)]
        with torch.no_grad():
            return encode_prompts(encoders, self.tokenizers, captions)

    def _eval_loss(self) -> float:
        return eval_loss(
            self.dataset, self.latent_encoder, self._eval_prompts, self.accelerator.unwrap_model(self.models["unet"]),
            self.noise_scheduler, self.accelerator, self.weight_dtype, self.args.seed,
        )  # fmt: skip

    def _my_batches(self, epoch: int) -> list[list[int]]:
        batches = epoch_batches(self.dataset, self.args.train_batch_size, epoch, self.args.seed)
        return shard_batches(batches, self.accelerator.process_index, self.accelerator.num_processes)


def _validate_now(args, step: int, epoch: int, micro: int, batches) -> bool:
    """Every --validation_steps steps, else at the end of every --validation_epochs-th epoch."""
    if args.validation_steps:
        return step % args.validation_steps == 0
    return micro + 1 == len(batches) and (epoch + 1) % args.validation_epochs == 0


def _validate(args, prompts, models, text_encoders, tokenizers, vae, accelerator, step: int):
    unet = accelerator.unwrap_model(models["unet"])
    encoders = [
        accelerator.unwrap_model(models.get(n, e)) for n, e in zip(("text_encoder", "text_encoder_2"), text_encoders)
    ]
    was_training = unet.training
    unet.eval()
    pipe = build_pipeline(args, unet, encoders, tokenizers, vae, unet.dtype)
    saved = generate_validation_images(
        pipe, prompts, args.num_validation_images, seed=args.seed, resolution=args.resolution,
        out_dir=Path(args.output_dir) / "validation" / f"step-{step}",
        num_inference_steps=args.validation_inference_steps,
    )  # fmt: skip
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np
            from PIL import Image

            images = np.stack([np.asarray(Image.open(p)) for p, _ in saved])
            tracker.writer.add_images("validation", images, step, dataformats="NHWC")
    unet.train(was_training)
    return saved


def _jsonable(state: dict) -> dict:
    return {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool, list, type(None)))}


if __name__ == "__main__":
    sys.exit(main())
