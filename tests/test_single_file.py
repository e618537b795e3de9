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


def test_merge_and_export_read_a_single_file_base(bases, tmp_path, capsys):
    folder, single, adapter = bases
    merged = tmp_path / "merged"
    assert cli.main(["merge", str(adapter), "--base", str(single), "--single_file_config", str(folder), "-o",
                     str(merged)]) == 0  # fmt: skip
    assert (merged / "model_index.json").exists()
    out = tmp_path / "kohya.safetensors"
    assert cli.main(["export", str(adapter), "--to", "kohya", "--exact", "--base", str(single),
                     "--single_file_config", str(folder), "-o", str(out)]) == 0  # fmt: skip
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in load_file(
        out
    )  # 1 layer per block


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


BAD = {
    "a pickle checkpoint": (lambda t, f, s, a: ["merge", str(a), "--base", str(t / "model.ckpt")], "pickle checkpoint"),
    "a missing checkpoint": (
        lambda t, f, s, a: ["merge", str(a), "--base", str(t / "none.safetensors")],
        "does not exist",
    ),
    "configs that cannot be read": (
        lambda t, f, s, a: [
            "generate",
            "--adapter",
            str(a),
            "--prompt",
            "x",
            "--base",
            str(s),
            "--single_file_config",
            str(t / "no-config"),
        ],
        "does not exist",
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
