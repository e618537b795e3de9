"""Single-file checkpoints, in and out: ``gralora merge -o NAME.safetensors`` writes SDXL in the original layout, read
back by diffusers' own ``from_single_file``; a ``.safetensors`` base works in merge, generate, export, the app and the
trainer, through ``from_single_file`` with the architecture's configs from ``--single_file_config``. (ComfyUI's view
of the same layout is checked in test_comfyui.py.)"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_adapter_file
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import gralora_diffusion as gd
from gralora_diffusion import cli
from gralora_diffusion.export import save_single_file
from gralora_diffusion.original_layout import CLIP_G_PREFIX, CLIP_L_PREFIX, UNET_PREFIX, VAE_PREFIX
from gralora_diffusion.toy import build_toy_sd15_pipeline, build_toy_sdxl_pipeline

# Unequal text-encoder widths, as SDXL's 768 and 1280: diffusers' single-file loader tells the encoders apart by them.
sf_toy = functools.partial(build_toy_sdxl_pipeline, text_widths=(32, 48))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The toy as a diffusers folder and as one original-layout checkpoint, and an adapter made on it."""
    folder = tmp_path_factory.mktemp("single-file")
    pipe = sf_toy(0)
    pipe.save_pretrained(folder / "toy")
    save_single_file(pipe, folder / "toy.safetensors")
    adapter = make_adapter_file(
        folder / "subject.safetensors", seed=7, rank=8, hybrid_r=2, pipeline_builder=sf_toy, b_scale=0.5
    )
    return folder / "toy", folder / "toy.safetensors", adapter


def images(pipe, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    out = pipe(["a red circle", "a photo of sks shape"], num_inference_steps=3, height=64, width=64, generator=g,
               output_type="np")  # fmt: skip
    return (out.images * 255).round()


def test_the_checkpoint_has_only_original_sdxl_names(bases):
    _, single, _ = bases
    with safe_open(str(single), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, CLIP_G_PREFIX)
    assert all(k.startswith(prefixes) for k in keys)
    assert {p: sum(k.startswith(p) for k in keys) > 0 for p in prefixes} == dict.fromkeys(prefixes, True)
    assert f"{UNET_PREFIX}input_blocks.0.0.weight" in keys and f"{VAE_PREFIX}decoder.up.0.block.0.conv1.weight" in keys
    assert f"{CLIP_G_PREFIX}transformer.resblocks.0.attn.in_proj_weight" in keys


def test_merge_to_a_single_file_loads_in_diffusers_like_the_fused_pipeline(bases, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    folder, _, adapter = bases
    out = tmp_path / "merged.safetensors"
    assert cli.main(["merge", f"{adapter}:0.8", "--base", str(folder), "-o", str(out)]) == 0
    loaded = StableDiffusionXLPipeline.from_single_file(str(out), config=str(folder))
    loaded.set_progress_bar_config(disable=True)
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    base_images = images(reference)
    gd.load_gralora_weights(reference, adapter, adapter_name="s")
    gd.set_gralora_adapters(reference, ["s"], [0.8])
    gd.fuse_gralora(reference)
    expected, got = images(reference), images(loaded)
    assert np.abs(expected - base_images).max() > 10  # the adapter changes the images
    assert np.abs(expected - got).max() <= 1  # within 1 pixel level
    with safe_open(str(out), "pt") as f:
        record = json.loads(f.metadata()["gralora_merge"])
    assert record["adapters"] == [{"file": adapter.name, "weight": 0.8, "base_model": "gralora-diffusion/toy-sdxl"}]


def test_a_single_file_base_generates_what_its_folder_generates(bases, tmp_path, capsys):
    folder, single, adapter = bases
    common = ["generate", "--adapter", f"{adapter}:0.7", "--prompt", "a photo of sks shape", "--size", "64",
              "--steps", "3", "--seed", "5"]  # fmt: skip
    assert cli.main([*common, "--base", str(folder), "-o", str(tmp_path / "folder.png")]) == 0
    assert cli.main(
        [*common, "--base", str(single), "--single_file_config", str(folder), "-o", str(tmp_path / "single.png")]
    ) == 0  # fmt: skip
    a, b = (np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("folder.png", "single.png"))
    assert np.abs(a - b).max() <= 1


def test_merge_and_export_from_a_single_file_equal_those_from_its_folder(bases, tmp_path, capsys):
    folder, single, adapter = bases
    from_file = ["--base", str(single), "--single_file_config", str(folder)]
    for source, base_flags in (("folder", ["--base", str(folder)]), ("file", from_file)):
        assert cli.main(["merge", f"{adapter}:0.6", *base_flags, "-o", str(tmp_path / f"merged-{source}")]) == 0
        assert cli.main(["export", str(adapter), "--to", "kohya", "--exact", *base_flags, "-o",
                         str(tmp_path / f"kohya-{source}.safetensors")]) == 0  # fmt: skip
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = (load_file(next((tmp_path / f"merged-{s}" / part).glob("*.safetensors"))) for s in ("folder", "file"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    a, b = (load_file(tmp_path / f"kohya-{s}.safetensors") for s in ("folder", "file"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the toy has one layer per block, so its first attention block is input_blocks.3 (SDXL's: input_blocks.4)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in a


def test_the_app_loads_a_single_file_base(bases):
    from gralora_diffusion.ui import load_studio

    folder, single, _ = bases
    studio = load_studio(str(single), folder.parent, device="cpu", dtype="float32", single_file_config=str(folder))
    reference = sf_toy(0)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(studio.pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_training_on_a_single_file_equals_training_on_its_folder(bases, tmp_path):
    from gralora_diffusion.training.args import make_config
    from gralora_diffusion.training.dreambooth import train

    folder, single, _ = bases
    instances = Path(__file__).resolve().parents[1] / "examples" / "sks-shape"
    common = dict(instance_data_dir=str(instances), instance_prompt="a photo of sks shape", resolution=64,
                  train_batch_size=2, rank=8, max_train_steps=3, learning_rate=1e-3, report_to="none",
                  validation_prompt=None, seed=3)  # fmt: skip
    train(make_config(pretrained_model_name_or_path=str(folder), output_dir=str(tmp_path / "a"), **common))
    train(make_config(pretrained_model_name_or_path=str(single), single_file_config=str(folder),
                      output_dir=str(tmp_path / "b"), **common))  # fmt: skip
    a, b = (load_file(next((tmp_path / d).glob("*.safetensors"))) for d in ("a", "b"))
    assert a.keys() == b.keys()
    assert any(v.abs().max() > 0 for k, v in a.items() if "gralora_B" in k)  # it trained
    # Not bit-identical: the loaders build the models differently (measured: 3e-6 apart on values up to 0.18), so
    # float rounding differs; training itself is deterministic (two folder runs are bit-identical).
    scale = max(v.abs().max().item() for v in a.values())
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4 * scale


def _sd15_base(tmp_path: Path) -> Path:
    pipe = build_toy_sd15_pipeline(0)
    pipe.save_pretrained(tmp_path / "sd15")
    return tmp_path / "sd15"


def _sd15_single_file(tmp_path: Path) -> Path:
    """An SD 1.x-layout file (its text encoder under cond_stage_model.): the wrong architecture for SDXL configs."""
    from safetensors.torch import save_file

    path = tmp_path / "sd15.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4)}, str(path))
    return path


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00" * 64)
    return path


def _generate_on(adapter: Path, base: Path, config: Path) -> list[str]:
    return ["generate", "--adapter", str(adapter), "--prompt", "x", "--base", str(base), "--single_file_config",
            str(config)]  # fmt: skip


BAD = {
    "a pickle checkpoint": (lambda t, f, s, a: ["merge", str(a), "--base", str(t / "model.ckpt")], "pickle checkpoint"),
    "a missing checkpoint": (
        lambda t, f, s, a: ["merge", str(a), "--base", str(t / "none.safetensors")],
        "does not exist",
    ),
    "configs that cannot be read": (
        lambda t, f, s, a: _generate_on(a, s, t / "no-config"),
        "Cannot read the architecture configs for toy.safetensors",
    ),  # fmt: skip
    "an SD 1.x file with SDXL configs": (
        lambda t, f, s, a: ["merge", str(a), "--base", str(_sd15_single_file(t)), "--single_file_config", str(f)],
        "sd15.safetensors is not an SDXL checkpoint like",
    ),
    "not a safetensors file": (
        lambda t, f, s, a: _generate_on(a, _garbage(t), f),
        "garbage.safetensors is not a readable safetensors file",
    ),  # fmt: skip
    "a single file out of an SD 1.x base": (
        lambda t, f, s, a: [
            "merge",
            str(
                make_adapter_file(
                    t / "sd15a.safetensors", seed=1, text_encoders=(), pipeline_builder=build_toy_sd15_pipeline
                )
            ),
            "--base",
            str(_sd15_base(t)),
        ],
        "for SDXL bases only",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_single_file_input_is_one_line_and_writes_nothing(case, bases, tmp_path, capsys, monkeypatch):
    folder, single, adapter = bases
    make_args, expected = BAD[case]
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    args = make_args(tmp_path, folder, single, adapter)
    out = tmp_path / "out" / ("image.png" if args[0] == "generate" else "merged.safetensors")
    out.parent.mkdir()

    def no_model_load(*_, **__):
        raise AssertionError("the base model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load_pipeline", no_model_load)
    capsys.readouterr()
    assert cli.main([*args, "-o", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert list(out.parent.iterdir()) == []


def test_merge_refuses_an_existing_checkpoint_file(bases, tmp_path, capsys):
    _, _, adapter = bases
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"keep me")
    assert cli.main(["merge", str(adapter), "-o", str(out)]) == 2
    assert "exists; choose a new file name" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_full_size_sdxl_names_convert_back_with_diffusers_own_converters():
    """SDXL base 1.0's four models at their published sizes (on the meta device: names and shapes only), written in
    the original layout: diffusers identifies the state dict as SDXL base and its own converters map every UNet, VAE
    and text-encoder key back to the models' own names and shapes, none missing, none extra."""
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as convert
    from test_comfyui import sdxl_unet_on_meta
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from gralora_diffusion.original_layout import original_state_dict

    unet = sdxl_unet_on_meta()
    with torch.device("meta"):
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
        )  # fmt: skip
        clip_l = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                projection_dim=768,
                hidden_act="quick_gelu",
            )
        )
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                             num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
                                             hidden_act="gelu"))  # fmt: skip
    checkpoint = original_state_dict(unet, vae, clip_l, clip_g)
    assert convert.infer_diffusers_model_type(checkpoint) == "xl_base"

    def same(ours: dict, converted: dict, what: str) -> None:
        ours = {k.removeprefix("text_model."): v.shape for k, v in ours.items() if not k.endswith("position_ids")}
        converted = {k.removeprefix("text_model."): v.shape for k, v in converted.items()}
        assert converted == ours, what

    same(unet.state_dict(), convert.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)), "unet")
    vae_converted = convert.convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))
    same(vae.state_dict(), {k: v.reshape(vae.state_dict()[k].shape) for k, v in vae_converted.items()}, "vae")
    assert {k: v.shape[:2] for k, v in vae_converted.items()} == {k: v.shape[:2] for k, v in vae.state_dict().items()}
    same(clip_l.state_dict(), convert.convert_ldm_clip_checkpoint(checkpoint), "text_encoder")
    prefix = "conditioner.embedders.1.model."
    same(clip_g.state_dict(), convert.convert_open_clip_checkpoint(clip_g, checkpoint, prefix=prefix), "text_encoder_2")
