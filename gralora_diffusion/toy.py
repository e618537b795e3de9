"""An offline, tiny Stable Diffusion XL pipeline built from configuration.

Real SDXL weights cannot be downloaded everywhere (tests, CI, a laptop on a train). This module builds a pipeline
with exactly the classes of the real model -- ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``,
``CLIPTextModel`` + ``CLIPTextModelWithProjection``, ``AutoencoderKL``, ``EulerDiscreteScheduler`` and two
``CLIPTokenizer``s -- but a few hundred thousand parameters, so every code path that runs on SDXL runs here in
milliseconds. The same seed always gives the same weights. All widths are multiples of 4 so GraLoRA with k = 2 or
k = 4 fits every targeted layer.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import torch

from .fs import write_directory_atomically

TOY_BASE_MODEL_ID = "gralora-diffusion/toy-sdxl"
TOY_SD15_MODEL_ID = "gralora-diffusion/toy-sd15"
TOY_SD3_MODEL_ID = "gralora-diffusion/toy-sd3"

# Words the toy tokenizers know as whole tokens; anything else is spelled out byte by byte, as in real CLIP.
_TOY_WORDS = (
    "a photo of sks dog cat shape red green blue yellow white black orange purple circle square triangle "
    "star cross ring heart diamond on in the with background painting watercolor style portrait landscape "
    "high quality blurry low"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_toy_tokenizer_files(directory: str | os.PathLike) -> Path:
    """Write a small CLIP BPE vocabulary (``vocab.json`` + ``merges.txt``) into ``directory``.

    Every byte is in the vocabulary (so any prompt tokenizes), and each word of a short list is merged into one token.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in _TOY_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merge = f"{symbols[0]} {symbols[1]}"
            merged = symbols[0] + symbols[1]
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(merged, len(vocab))
            symbols = [merged] + symbols[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def _toy_tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_toy_tokenizer_files(tmp)
        return CLIPTokenizer.from_pretrained(tmp, pad_token=pad_token, model_max_length=77)


def _text_encoder_config(vocab_size: int, projection: bool, width: int = 32, layers: int = 2, padding: int = 0):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size + padding,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width if projection else 512,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=1,
    )


def _vae(seed: int, channels: tuple[int, ...] = (16, 32), latent_channels: int = 4, groups: int = 8, **extra):
    """SDXL's VAE class; each block after the first halves the resolution (2 blocks: 64 px -> 32 x 32 latents).

    ``groups``: its group norms' group count. Few channels per group lose the absolute colour of flat regions (a
    group of two channels normalised over the image keeps little more than their sign), so a narrow VAE needs few
    groups to draw colours it was not drilled on."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 3)
    return AutoencoderKL(
        block_out_channels=tuple(channels),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=latent_channels,
        norm_num_groups=groups,
        sample_size=64,
        **{"scaling_factor": 0.13025, **extra},
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    # SDXL's scheduler settings.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )


def _tokenizers_and_vocab():
    tokenizer = _toy_tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = _toy_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    return tokenizer, tokenizer_2, len(tokenizer.get_vocab())


def _toy_unet(
    channels: tuple[int, int] = (32, 64), layers_per_block: int = 1, sample_size: int = 32, latent_channels: int = 4,
    attention_levels: int = 1, **extra,
):  # fmt: skip
    """The toy UNet: SDXL's block layout (plain down block, then cross-attention blocks) at toy widths;
    ``attention_levels=2`` puts cross-attention at the outer level too."""
    if attention_levels not in (1, 2):
        raise ValueError(f"attention_levels must be 1 or 2, got {attention_levels}.")
    outer_down, outer_up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if attention_levels == 2 else (
        "DownBlock2D", "UpBlock2D")  # fmt: skip
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        down_block_types=(outer_down, "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", outer_up),
        attention_head_dim=(2, 4),
        norm_num_groups=16,
        **extra,
    )


def _keeps_caller_rng(builder):
    """Run ``builder`` on a forked torch RNG: its seeding never changes the caller's random stream."""

    @functools.wraps(builder)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return builder(*args, **kwargs)

    return wrapper


@_keeps_caller_rng
def build_toy_sdxl_pipeline(
    seed: int = 0,
    *,
    unet_channels: tuple[int, int] = (32, 64),
    layers_per_block: int = 1,
    vae_channels: tuple[int, ...] = (16, 32),
    transformer_layers: tuple[int, int] = (1, 2),
    text_widths: tuple[int, int] = (32, 32),
    text_layers: int = 2,
    vocab_padding: int = 0,
    mid_block: bool = True,
    vae_groups: int = 8,
    latent_channels: int = 4,
    attention_levels: int = 1,
):
    """Return a tiny randomly initialised ``StableDiffusionXLPipeline``; the same seed gives the same weights.

    The keyword arguments size the UNet (``transformer_layers``: transformer blocks per attention of each UNet level),
    the VAE (the pretrained toy-world base is a wider variant) and the two text encoders (``text_widths``: their hidden
    sizes, which SDXL has unequal, 768 and 1280, and single-file loaders tell apart by; ``vocab_padding``: extra
    embedding rows, for loaders that expect CLIP's 49408-token table); ``mid_block=False`` leaves out SDXL's middle
    block (the toy-world base spends its compute on a wider attention level instead); ``attention_levels=2`` adds
    transformer blocks at the outer, full-resolution level as well; ``vae_groups`` and ``latent_channels`` shape the
    VAE. The defaults are the few-hundred-thousand-parameter model the tests use.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2, vocab_size = _tokenizers_and_vocab()
    torch.manual_seed(seed)
    unet = _toy_unet(
        unet_channels,
        layers_per_block,
        sample_size=64 // 2 ** (len(vae_channels) - 1),
        latent_channels=latent_channels,
        attention_levels=attention_levels,
        transformer_layers_per_block=tuple(transformer_layers),
        use_linear_projection=True,
        cross_attention_dim=sum(text_widths),  # hidden size of text encoder 1 + text encoder 2, as in SDXL
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=text_widths[1] + 6 * 8,  # pooled text embedding + 6 time ids
        **({} if mid_block else {"mid_block_type": None}),
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_text_encoder_config(vocab_size, False, text_widths[0], text_layers, vocab_padding))
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_encoder_config(vocab_size, True, text_widths[1], text_layers, vocab_padding)
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed, vae_channels, latent_channels, vae_groups),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@_keeps_caller_rng
def build_toy_sd15_pipeline(seed: int = 0):
    """Return a tiny ``StableDiffusionPipeline`` (one text encoder), for code that must work beyond SDXL."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer, _, vocab_size = _tokenizers_and_vocab()
    torch.manual_seed(seed)
    unet = _toy_unet(cross_attention_dim=32)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_text_encoder_config(vocab_size, projection=False))
    pipe = StableDiffusionPipeline(
        vae=_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@_keeps_caller_rng
def build_toy_sd3_pipeline(seed: int = 0):
    """Return a tiny randomly initialised ``StableDiffusion3Pipeline``: SD3's MMDiT transformer, two CLIP text
    encoders with projection and a T5 encoder, built from configs (no network), for code that must work on SD3.

    The T5 tokenizer is stood in for by the toy CLIP tokenizer (the pipeline only needs token ids within T5's
    vocabulary); T5's width (64) holds the two CLIP embeddings side by side, as SD3 pads them to T5's width.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, tokenizer_2, vocab_size = _tokenizers_and_vocab()
    tokenizer_3 = _toy_tokenizer(pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # T5's width
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two CLIP projections side by side
        pos_embed_max_size=32,
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModelWithProjection(_text_encoder_config(vocab_size, projection=True))
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(vocab_size, projection=True))
    torch.manual_seed(seed + 4)
    t5 = T5Config(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=1,
    )  # fmt: skip
    text_encoder_3 = T5EncoderModel(t5).eval()  # a model built from a config starts in training mode
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TOY_KINDS = {  # kind -> (builder, the model id its adapters record)
    "sdxl": (build_toy_sdxl_pipeline, TOY_BASE_MODEL_ID),
    "sd15": (build_toy_sd15_pipeline, TOY_SD15_MODEL_ID),
    "sd3": (build_toy_sd3_pipeline, TOY_SD3_MODEL_ID),
}


def save_toy_pipeline(directory: str | os.PathLike, seed: int = 0, kind: str = "sdxl") -> Path:
    """Build a toy pipeline (``kind``: sdxl, sd15 or sd3) and save it with ``save_pretrained`` (safetensors) into
    ``directory``; ``DiffusionPipeline.from_pretrained(directory)`` then loads it with no network."""
    builder, model_id = TOY_KINDS[kind]
    pipe = builder(seed)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "toy_base.json").write_text(json.dumps({"model_id": model_id, "seed": seed}))

    return write_directory_atomically(Path(directory), write, replace=True)


def save_toy_sdxl_pipeline(directory: str | os.PathLike, seed: int = 0) -> Path:
    """``save_toy_pipeline`` for the toy SDXL."""
    return save_toy_pipeline(directory, seed, "sdxl")


def toy_base_dir(kind: str = "sdxl", seed: int = 0) -> Path:
    """The saved toy base of ``kind`` for ``seed``, built once into the user's cache directory and reused."""
    cache = Path(os.environ.get("GRALORA_DIFFUSION_CACHE", Path.home() / ".cache" / "gralora_diffusion"))
    directory = cache / f"toy-{kind}-seed{seed}"
    if not (directory / "model_index.json").exists():
        save_toy_pipeline(directory, seed, kind)
    return directory


def toy_sdxl_base_dir(seed: int = 0) -> Path:
    """The saved toy SDXL base for ``seed`` (see ``toy_base_dir``)."""
    return toy_base_dir("sdxl", seed)


WORLD_BASE_DIR = Path(__file__).parent / "assets" / "toy-sdxl-world"


def toy_world_base_dir() -> Path:
    """The committed toy base pretrained on the shape world (``scripts/pretrain_toy.py`` reproduces it).

    Unlike the random toy base it draws what it is asked ("a red star on a gray background"), so fine-tuning on the
    held-out subject shows in the pictures and in the evaluator's scores.
    """
    if not (WORLD_BASE_DIR / "model_index.json").exists():
        raise FileNotFoundError(
            f"the pretrained toy base is missing from {WORLD_BASE_DIR}: reinstall the package, or rebuild it with "
            "python scripts/pretrain_toy.py"
        )
    return WORLD_BASE_DIR


@_keeps_caller_rng
def save_random_toy_adapter(
    path: str | os.PathLike,
    seed: int,
    *,
    rank: int = 8,
    gralora_k: int | None = None,
    hybrid_r: int = 0,
    unet_targets: str | None = None,
    text_encoders: tuple[str, ...] | None = None,
    pipeline_builder=build_toy_sdxl_pipeline,
    b_scale: float = 0.05,
    metadata: dict | None = None,
) -> Path:
    """An untrained GraLoRA adapter for a toy base with random A and B, saved in the package's file format.

    Stands in for a trained adapter wherever only the plumbing matters (tests, the demo before training): both
    factors are random (PEFT's ``init_weights=False``) and B is scaled by ``b_scale`` so the change is visible but
    sane. The denoiser (``unet`` or ``transformer``) gets ``unet_targets`` (default: its family's attention preset),
    each of ``text_encoders`` (default: all of the family's) its attention preset.
    """
    from .config import make_gralora_config
    from .families import family_of
    from .io import save_gralora_weights
    from .peft_ops import add_gralora_adapter

    pipe = pipeline_builder(0)
    family = family_of(pipe)
    torch.manual_seed(seed)
    denoiser_targets = unet_targets or family.presets[family.denoiser]["attention"]
    models = {family.denoiser: (getattr(pipe, family.denoiser), denoiser_targets)}
    for name in family.text_encoders if text_encoders is None else text_encoders:
        models[name] = (getattr(pipe, name), family.presets[name]["attention"])
    for component, (model, targets) in models.items():
        config = make_gralora_config(rank, targets, gralora_k=gralora_k, hybrid_r=hybrid_r, init_weights=False)
        add_gralora_adapter(model, config, component=component)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "gralora_B" in name:
                    param.mul_(b_scale)
    base = {
        build_toy_sd15_pipeline: TOY_SD15_MODEL_ID,
        build_toy_sd3_pipeline: TOY_SD3_MODEL_ID,
    }.get(pipeline_builder, TOY_BASE_MODEL_ID)
    meta = {"base_model": base, **(metadata or {})}
    return save_gralora_weights(path, metadata=meta, **{c: m for c, (m, _) in models.items()})
