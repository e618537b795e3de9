"""The app's generation function without the UI: adapters, weights, tags, paths, caching, errors, PNG settings."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import make_adapter_file
from PIL import Image

import gralora_diffusion as gd
from gralora_diffusion.studio import (
    AdapterChoice,
    AdapterLibrary,
    GenerationRequest,
    Limits,
    Studio,
    StudioError,
    merge_adapter_choices,
    parse_prompt_adapters,
)
from gralora_diffusion.toy import build_toy_sdxl_pipeline


@pytest.fixture
def library(tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    make_adapter_file(
        folder / "dog.safetensors", seed=1, metadata={"trigger_prompt": "a photo of sks dog"}, b_scale=0.2
    )
    make_adapter_file(folder / "style.safetensors", seed=2, rank=16, gralora_k=4, text_encoders=(), b_scale=0.2)
    return AdapterLibrary(folder)


@pytest.fixture
def studio(library):
    return Studio(build_toy_sdxl_pipeline(0), library, base_name="toy", limits=Limits(min_size=32))


def request(**kwargs) -> GenerationRequest:
    defaults = dict(prompt="a photo of sks dog", steps=2, width=64, height=64, seed=7, guidance_scale=5.0)
    return GenerationRequest(**{**defaults, **kwargs})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def reference_image(library, adapters, prompt="a photo of sks dog", seed=7, scheduler=None, scheduler_config=None):
    """The same generation done by hand with the package API on a fresh pipeline."""
    pipe = build_toy_sdxl_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    names, weights = [], []
    for name, weight in adapters:
        gd.load_gralora_weights(pipe, library.path(name), adapter_name=name)
        names.append(name)
        weights.append(weight)
    if names:
        gd.set_gralora_adapters(pipe, names, weights)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config, **(scheduler_config or {}))
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, width=64, height=64, guidance_scale=5.0, generator=g).images[0]


# --- prompt tags -------------------------------------------------------------------------------------------------


def test_prompt_tags_are_parsed_and_stripped():
    text, tags = parse_prompt_adapters(
        "a photo of sks dog <gralora:dog:0.8>, watercolor <gralora:style:-1.25> <gralora:x>"
    )
    assert text == "a photo of sks dog, watercolor"
    assert tags == [("dog", 0.8), ("style", -1.25), ("x", 1.0)]


def test_tags_merge_with_rows_and_override_their_weight():
    rows = [AdapterChoice("dog", 0.3, unet_weight=0.1), AdapterChoice("off", 1.0, enabled=False)]
    merged = merge_adapter_choices(rows, [("dog", 0.9), ("style", 0.5)])
    assert [(c.name, c.weight, c.unet_weight) for c in merged] == [("dog", 0.9, None), ("style", 0.5, None)]


# --- generation --------------------------------------------------------------------------------------------------


def test_same_seed_and_adapters_give_the_same_image_and_match_the_api(studio, library):
    rows = [AdapterChoice("dog", 0.8), AdapterChoice("style", -0.6)]
    first = studio.generate(request(adapters=rows))
    second = studio.generate(request(adapters=rows))
    assert first.errors == {} and first.seed == 7
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))
    expected = reference_image(library, [("dog", 0.8), ("style", -0.6)])
    assert np.abs(pixels(first.images[0]) - pixels(expected)).max() <= 1  # fused vs unfused: rounding only


def test_different_weights_give_different_images(studio):
    a = studio.generate(request(adapters=[AdapterChoice("dog", 1.0)])).images[0]
    b = studio.generate(request(adapters=[AdapterChoice("dog", -1.0)])).images[0]
    none = studio.generate(request()).images[0]
    assert np.abs(pixels(a) - pixels(b)).mean() > 1
    assert np.abs(pixels(a) - pixels(none)).mean() > 1


def test_prompt_tag_applies_the_adapter(studio, library):
    tagged = studio.generate(request(prompt="a photo of sks dog <gralora:style:0.7>"))
    assert tagged.prompt == "a photo of sks dog" and tagged.applied == {"style": {"unet": 0.7}}
    expected = reference_image(library, [("style", 0.7)])
    assert np.abs(pixels(tagged.images[0]) - pixels(expected)).max() <= 1


def test_separate_unet_and_text_encoder_weights(studio, library):
    result = studio.generate(request(adapters=[AdapterChoice("dog", 1.0, unet_weight=0.5, text_encoder_weight=0.0)]))
    assert result.applied == {"dog": {"unet": 0.5, "text_encoder": 0.0, "text_encoder_2": 0.0}}
    expected = reference_image(library, [("dog", {"unet": 0.5, "text_encoder": 0.0, "text_encoder_2": 0.0})])
    assert np.abs(pixels(result.images[0]) - pixels(expected)).max() <= 1


def test_unchanged_adapters_cost_nothing_and_a_change_costs_one_switch(studio, caplog):
    rows = [AdapterChoice("dog", 0.5)]
    with caplog.at_level(logging.INFO, logger="gralora_diffusion.studio"):
        first = studio.generate(request(adapters=rows))
    assert first.switch_ms > 0 and studio.switches == 1
    assert any("adapter switch to [dog:0.5] took" in r.message for r in caplog.records)
    again = studio.generate(request(adapters=rows, seed=8))
    assert again.switch_ms == 0.0 and studio.switches == 1
    studio.generate(request(adapters=[AdapterChoice("dog", 0.75)]))
    assert studio.switches == 2
    assert gd.get_fused_gralora_adapters(studio.pipe) == ["dog"]


def test_changed_file_on_disk_is_reloaded(studio, library, tmp_path):
    before = studio.generate(request(adapters=[AdapterChoice("dog", 1.0)])).images[0]
    replacement = make_adapter_file(tmp_path / "other.safetensors", seed=9, b_scale=0.2)
    shutil.copy(replacement, library.path("dog"))
    os.utime(library.path("dog"), ns=(1, 1))  # a different mtime even on coarse clocks
    after = studio.generate(request(adapters=[AdapterChoice("dog", 1.0)])).images[0]
    assert np.abs(pixels(after) - pixels(before)).mean() > 1
    expected = reference_image(library, [("dog", 1.0)])
    assert np.abs(pixels(after) - pixels(expected)).max() <= 1


@pytest.mark.parametrize("name", ["../adapters/dog", "/etc/passwd", "sub/dog", "..", "dog.bin", "nope"])
def test_path_traversal_and_unknown_names_are_refused(studio, library, name):
    with pytest.raises(StudioError):
        library.path(name)
    result = studio.generate(request(adapters=[AdapterChoice(name, 1.0), AdapterChoice("style", 1.0)]))
    assert name in result.errors and "style" in result.applied  # the bad row is reported, the good one applied
    tagged = studio.generate(request(prompt=f"a photo <gralora:{name}:1>"))
    assert tagged.applied == {} and tagged.errors


def test_symlink_out_of_the_folder_is_refused(library, tmp_path):
    outside = make_adapter_file(tmp_path / "outside.safetensors", seed=3, text_encoders=())
    (library.folder / "sneaky.safetensors").symlink_to(outside)
    with pytest.raises(StudioError, match="not inside the adapter folder"):
        library.path("sneaky")


def test_bad_files_are_reported_per_row_and_the_pipeline_is_unchanged(studio, library):
    (library.folder / "truncated.safetensors").write_bytes(library.path("dog").read_bytes()[:200])
    other_base = make_adapter_file(
        library.folder / "sd15.safetensors", seed=4, text_encoders=(), pipeline_builder=gd.toy.build_toy_sd15_pipeline
    )
    assert other_base.exists()
    studio.generate(request(adapters=[AdapterChoice("style", 0.5)]))
    good = studio.generate(request(adapters=[AdapterChoice("style", 0.5)]))
    mixed = studio.generate(
        request(adapters=[AdapterChoice("truncated", 1.0), AdapterChoice("style", 0.5), AdapterChoice("sd15", 1.0)])
    )
    assert set(mixed.errors) == {"truncated", "sd15"}
    assert "not a readable safetensors" in mixed.errors["truncated"]
    assert "trained on another base model" in mixed.errors["sd15"]
    assert mixed.applied == {"style": {"unet": 0.5}}
    assert np.array_equal(pixels(mixed.images[0]), pixels(good.images[0]))
    assert gd.get_gralora_adapters(studio.pipe)["unet"] == ["style"]


def _grid(x=(0.0, 1.0), y=None, y_adapter=None, **kwargs):
    return ("grid", dict(request=request(**kwargs), x_adapter="dog", x_weights=list(x), y_adapter=y_adapter,
                         y_weights=list(y) if y is not None else None))  # fmt: skip


# The studio's bad-request corpus: every endpoint (Generate and its API, the X/Y grid, prompt tags) gets the same
# limits (Limits), one sentence, and nothing runs.
BAD_REQUESTS = {
    "width not a multiple of 8": (("generate", request(width=70)), "Width 70 is not allowed: use a multiple of 8"),
    "height above the maximum": (("generate", request(height=4096)), "Height 4096 is not allowed"),
    "zero steps": (("generate", request(steps=0)), "Steps 0 is not allowed"),
    "a thousand steps": (("generate", request(steps=1000)), "Steps 1000 is not allowed"),
    "99 images": (("generate", request(num_images=99)), "Number of images 99"),
    "unknown scheduler": (("generate", request(scheduler="Magic")), "Unknown scheduler 'Magic'"),
    "guidance 1e30": (("generate", request(guidance_scale=1e30)), "Guidance scale 1e+30 is not allowed"),
    "guidance nan": (("generate", request(guidance_scale=float("nan"))), "Guidance scale nan is not allowed"),
    "row weight 1e30": (
        ("generate", request(adapters=[AdapterChoice("dog", 1e30)])),
        "The weight of dog 1e+30 is not allowed",
    ),
    "row weight nan": (
        ("generate", request(adapters=[AdapterChoice("dog", float("nan"))])),
        "The weight of dog nan is not allowed",
    ),
    "UNet weight 5": (
        ("generate", request(adapters=[AdapterChoice("dog", 1.0, unet_weight=5.0)])),
        "The UNet weight of dog 5.0",
    ),
    "prompt tag weight 99999": (
        ("generate", request(prompt="a dog <gralora:dog:99999>")),
        "The prompt tag weight of dog 99999.0 is not",
    ),
    "seed 2^64": (("generate", request(seed=2**64)), "Seed 18446744073709551616 is not allowed"),
    "negative seed": (("generate", request(seed=-1)), "Seed -1 is not allowed: use a whole number from 0"),
    "a 6 x 7 grid": (
        _grid(x=[0.1 * i for i in range(6)], y=[0.1 * i for i in range(7)], y_adapter="style"),
        "A grid of 42 cells is too large: use at most 36",
    ),  # fmt: skip
    "grid x weight 1e30": (_grid(x=(0.0, 1e30)), "The X weight of dog 1e+30 is not allowed"),
    "grid y weight nan": (_grid(y=(float("nan"),), y_adapter="style"), "The Y weight of style nan is not allowed"),
    "grid with 1000 steps": (_grid(steps=1000), "Steps 1000 is not allowed"),
    "grid of 4096 px": (_grid(width=4096), "Width 4096 is not allowed"),
    "grid tag weight 99999": (_grid(prompt="<gralora:style:99999> a dog"), "The prompt tag weight of style"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_one_sentence_and_nothing_runs(studio, case, monkeypatch):
    (endpoint, payload), match = BAD_REQUESTS[case]
    before = {k: v.clone() for k, v in studio.pipe.unet.state_dict().items()}

    def no_denoising(*_, **__):
        raise AssertionError("the pipeline ran before the request was checked")

    monkeypatch.setattr(studio.pipe.unet, "forward", no_denoising)
    with pytest.raises(StudioError) as raised:
        if endpoint == "generate":
            studio.generate(payload)
        else:
            studio.xy_grid(**payload)
    message = str(raised.value)
    assert match in message and "\n" not in message and message.endswith("."), message
    assert studio.switches == 0 and gd.get_gralora_adapters(studio.pipe) == {}
    after = studio.pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_largest_seeds_work_and_wrap_per_image(studio):
    top = studio.generate(request(seed=2**64 - 1, num_images=2))
    assert top.seed == 2**64 - 1 and len(top.images) == 2
    wrapped = studio.generate(request(seed=0))  # image 2 of the first run used seed (2^64 - 1 + 1) mod 2^64 = 0
    assert np.array_equal(pixels(top.images[1]), pixels(wrapped.images[0]))
    assert not np.array_equal(pixels(top.images[0]), pixels(top.images[1]))


def test_a_non_finite_image_is_reported_not_shown(studio):
    with torch.no_grad():
        studio.pipe.vae.post_quant_conv.bias.fill_(float("nan"))  # a VAE that overflows, as SDXL's does in fp16
    with pytest.raises(StudioError, match="Image 1 came out as NaN or infinite values"):
        studio.generate(request())


def test_defaults_come_from_the_base(library):
    from gralora_diffusion.bases import base_defaults
    from gralora_diffusion.studio import generation_defaults
    from gralora_diffusion.toy import build_toy_sd15_pipeline

    toy = build_toy_sdxl_pipeline(0)
    assert toy.unet.config.sample_size * toy.vae_scale_factor == 64
    assert generation_defaults(toy) == {"width": 64, "height": 64, "guidance_scale": 5.0, "steps": 25}
    assert generation_defaults(build_toy_sd15_pipeline(0))["guidance_scale"] == 7.5
    world = Studio(toy, library, defaults=base_defaults("toy-world")).defaults
    assert (world["guidance_scale"], world["steps"], world["width"]) == (3.0, 20, 64)
    assert base_defaults("stabilityai/stable-diffusion-xl-base-1.0") == {}


def test_previews_come_from_beside_the_file_or_the_training_folder(library, tmp_path):
    folder = library.folder
    assert library.preview("dog") is None
    for step in (5, 10):
        (folder / "validation" / f"step-{step}").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / "validation" / f"step-{step}" / "prompt0-0.png")
    assert library.preview("dog") is None  # validation images of an unknown run are nobody's preview
    (folder / "train_metrics.json").write_text(json.dumps({"adapter": str(folder / "dog.safetensors")}))
    assert library.preview("dog") == folder / "validation" / "step-10" / "prompt0-0.png"  # the latest step
    assert library.preview("style") is None  # not the adapter this folder trained
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, folder / "style.png")  # a link out of the folder is not shown
    assert library.preview("style") is None
    Image.new("RGB", (8, 8)).save(folder / "dog.preview.png")
    assert library.preview("dog") == folder / "dog.preview.png"


def test_schedulers_and_random_seed(studio, library):
    from diffusers import DPMSolverMultistepScheduler

    result = studio.generate(request(scheduler="DPM++ 2M", adapters=[AdapterChoice("dog", 1.0)]))
    expected = reference_image(library, [("dog", 1.0)], scheduler=DPMSolverMultistepScheduler)
    assert np.abs(pixels(result.images[0]) - pixels(expected)).max() <= 1
    import diffusers

    from gralora_diffusion.studio import SCHEDULERS

    images = {}
    for name, (class_name, extra) in SCHEDULERS.items():  # each menu entry is the sampler it names
        got = studio.generate(request(scheduler=name, adapters=[AdapterChoice("dog", 1.0)])).images[0]
        cls = getattr(diffusers, class_name)
        expected = reference_image(library, [("dog", 1.0)], scheduler=cls, scheduler_config=extra)
        assert np.abs(pixels(got) - pixels(expected)).max() <= 1, name
        images[name] = pixels(got)
    assert np.abs(images["Euler"] - images["Euler a"]).mean() > 0.5  # the menu really switches samplers
    seeds = {studio.generate(request(random_seed=True)).seed for _ in range(3)}
    assert len(seeds) == 3
    two = studio.generate(request(num_images=2))
    single = studio.generate(request(seed=8))
    assert np.array_equal(pixels(two.images[1]), pixels(single.images[0]))  # image i uses seed + i


def test_png_text_chunk_records_the_settings(studio, tmp_path):
    result = studio.generate(request(negative_prompt="blurry", adapters=[AdapterChoice("dog", 0.8)]))
    path = studio.save_png(result.images[0], tmp_path / "out.png", result, 0)
    info = Image.open(path).info
    assert info["parameters"].startswith("a photo of sks dog\nNegative prompt: blurry\nSteps: 2, Sampler: Euler")
    assert (
        "Seed: 7, Size: 64x64, Model: toy, GraLoRA: [dog:unet=0.8/text_encoder=0.8/text_encoder_2=0.8]"
        in info["parameters"]
    )
    assert json.loads(info["gralora"])["adapters"] == {"dog": {"unet": 0.8, "text_encoder": 0.8, "text_encoder_2": 0.8}}


def test_cancel_stops_the_run(studio):
    calls = []

    def progress(fraction):
        calls.append(fraction)
        studio.cancel()

    result = studio.generate(request(steps=5), progress=progress)
    assert result.cancelled and result.images == [] and len(calls) == 1


def test_xy_grid_cells_equal_single_generations(studio):
    grid, cells = studio.xy_grid(request(), "dog", [0.0, 1.0], "style", [0.0, -1.0])
    assert grid.size == (90 + 2 * 64, 24 + 2 * 64)
    single = studio.generate(request(adapters=[AdapterChoice("dog", 1.0), AdapterChoice("style", -1.0)])).images[0]
    assert np.array_equal(pixels(cells[1][1]), pixels(single))
    assert np.abs(pixels(cells[0][0]) - pixels(cells[1][1])).mean() > 1
    assert np.array_equal(pixels(grid)[24 + 64 :, 90 + 64 :], pixels(single))


def test_library_lists_and_describes(library):
    assert library.names() == ["dog", "style"]
    info = library.info("dog")
    assert (info.trigger_prompt, info.rank, info.k) == ("a photo of sks dog", 8, 2)
    assert "trigger: 'a photo of sks dog'; r=8, k=2" in info.describe()
    assert library.load("dog") is library.load("dog")  # cached in memory


def test_the_description_counts_adapted_layers_and_convolutions(tmp_path):
    """Attention-only and LoCon-style adapters are told apart: the counts come from the toy UNet's own modules."""
    from gralora_diffusion.families import CLIP_ATTENTION, UNET_ATTENTION

    make_adapter_file(tmp_path / "attn.safetensors", seed=1, text_encoders=("text_encoder",))
    make_adapter_file(tmp_path / "conv.safetensors", seed=2, unet_targets="unet-attention-conv", text_encoders=())
    pipe = build_toy_sdxl_pipeline(0)
    unet = pipe.unet
    projections = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(UNET_ATTENTION)]
    clip = [n for n, m in pipe.text_encoder.named_modules() if isinstance(m, torch.nn.Linear)
            and n.endswith(CLIP_ATTENTION)]  # fmt: skip
    convs = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d) and n.endswith((".conv1", ".conv2"))]
    assert projections and convs
    library = AdapterLibrary(tmp_path)
    attention_only = library.info("attn")
    assert attention_only.layers["unet"] == (len(projections), 0)
    described = attention_only.describe().split("; ")[-1].split(", ")
    assert sorted(described) == [f"text_encoder {len(clip)} layers", f"unet {len(projections)} layers"]
    locon = library.info("conv").describe()
    assert locon.endswith(f"; unet {len(projections) + len(convs)} layers ({len(convs)} convolutions)")


def test_sd3_rows_weigh_the_transformer_and_all_three_text_encoders(tmp_path):
    """The studio's weights come from the pipeline's model family: on SD3 the denoiser weight goes to the
    transformer and the text-encoder weight to both CLIPs and T5; the image matches the API's."""
    from gralora_diffusion.toy import build_toy_sd3_pipeline

    folder = tmp_path / "sd3"
    folder.mkdir()
    path = make_adapter_file(folder / "moon.safetensors", seed=4, pipeline_builder=build_toy_sd3_pipeline, b_scale=0.2)
    sd3_studio = Studio(
        build_toy_sd3_pipeline(0), AdapterLibrary(folder), base_name="toy-sd3", limits=Limits(min_size=32)
    )
    result = sd3_studio.generate(
        request(adapters=[AdapterChoice("moon", 1.0, unet_weight=0.7, text_encoder_weight=0.4)])
    )
    weights = {"transformer": 0.7, "text_encoder": 0.4, "text_encoder_2": 0.4, "text_encoder_3": 0.4}
    assert result.errors == {} and result.applied == {"moon": weights}
    pipe = build_toy_sd3_pipeline(0)
    gd.load_gralora_weights(pipe, path)
    gd.set_gralora_adapters(pipe, "moon", weights)
    g = torch.Generator().manual_seed(7)
    expected = pipe("a photo of sks dog", num_inference_steps=2, width=64, height=64, guidance_scale=5.0, generator=g)
    assert np.abs(pixels(result.images[0]) - pixels(expected.images[0])).max() <= 1
    plain = sd3_studio.generate(request())
    assert np.abs(pixels(result.images[0]) - pixels(plain.images[0])).mean() > 0.5  # the adapter has an effect
