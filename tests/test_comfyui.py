"""ComfyUI, checked with its own code (the unmodified snapshot, see comfyui_harness.py): the GraLoRA node applies
exported GraLoRA factors, and the kohya LoRA export, exactly as diffusers + load_gralora_weights does; the single-file
checkpoint's key names are the ones ComfyUI's detection and conversion expect for SDXL."""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from comfyui_harness import comfy_sdxl, import_comfyui
from helpers import make_adapter_file
from safetensors.torch import load_file

import gralora_diffusion as gd
from gralora_diffusion import cli
from gralora_diffusion.original_layout import UNET_PREFIX, original_state_dict
from gralora_diffusion.toy import build_toy_sdxl_pipeline

NODE = Path(__file__).resolve().parents[1] / "integrations" / "comfyui" / "__init__.py"
# A toy SDXL that ComfyUI's CLIP code accepts: unequal encoder widths (as SDXL's 768 / 1280), three layers (SDXL
# reads the penultimate one), CLIP's 49408-row token table. Its UNet heads are 16 channels wide.
comfy_toy = functools.partial(build_toy_sdxl_pipeline, text_widths=(32, 48), text_layers=3, vocab_padding=49408 - 661)
HEAD_CHANNELS = 16


def load_node():
    """The custom node package, imported as ComfyUI imports a folder in custom_nodes."""
    spec = importlib.util.spec_from_file_location("gralora_comfyui_node", NODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("k, r, hybrid_r, shape", [(2, 8, 0, (64, 48)), (4, 16, 4, (32, 64)), (1, 4, 2, (16, 16))])
def test_node_delta_equals_peft_get_delta_weight(k, r, hybrid_r, shape):
    from peft import GraloraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    out_f, in_f = shape
    model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f))
    config = GraloraConfig(r=r, alpha=2 * r, gralora_k=k, hybrid_r=hybrid_r, target_modules=["0"], init_weights=False)
    inject_adapter_in_model(config, model)
    layer = model[0]
    a, b = layer.gralora_A["default"].detach(), layer.gralora_B["default"].detach()
    general = (
        (layer.gralora_A_general["default"].weight.detach(), layer.gralora_B_general["default"].weight.detach())
        if hybrid_r
        else (None, None)
    )
    delta = load_node().gralora_delta(a, b, *general) * (2 * r / (r + hybrid_r))
    expected = layer.get_delta_weight("default")
    assert delta.shape == expected.shape == (out_f, in_f)
    assert torch.allclose(delta, expected, rtol=1e-5, atol=1e-6)


def test_node_registers_once_with_comfyui():
    comfy = import_comfyui()
    first, second = load_node().GraLoRAAdapter, load_node().GraLoRAAdapter
    assert first is second
    assert sum(a.name == "gralora" for a in comfy.weight_adapter.adapters) == 1
    assert first not in comfy.weight_adapter.adapter_maps.values()  # not offered by ComfyUI's LoRA trainer


@pytest.fixture(scope="module")
def comfy_base(tmp_path_factory):
    """The ComfyUI-compatible toy saved as a diffusers folder, its original-layout state dict, an adapter on it."""
    folder = tmp_path_factory.mktemp("comfy-base")
    pipe = comfy_toy(0)
    pipe.save_pretrained(folder / "base")
    adapters = {
        "hybrid": make_adapter_file(
            folder / "hybrid.safetensors", seed=5, rank=8, gralora_k=2, hybrid_r=2, pipeline_builder=comfy_toy
        ),
        # LoCon-style: also every ResNet block's conv1 / conv2 (ComfyUI's in_layers.2 / out_layers.3)
        "conv": make_adapter_file(folder / "conv.safetensors", seed=6, rank=4, gralora_k=2, hybrid_r=2,
                                  unet_targets="unet-attention-conv", pipeline_builder=comfy_toy),
    }  # fmt: skip
    return folder / "base", original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2), adapters


def diffusers_deltas(base: Path, adapter: Path, weight: float) -> dict[str, dict[str, torch.Tensor]]:
    """Per component, fused weight minus base weight of every parameter, through the package's public API."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    models = {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2")}
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    gd.load_gralora_weights(pipe, adapter, adapter_name="x")
    gd.set_gralora_adapters(pipe, ["x"], [weight])
    gd.fuse_gralora(pipe)
    gd.unload_gralora_weights(pipe)
    return {c: {k: v - before[c][k] for k, v in m.state_dict().items()} for c, m in models.items()}


def comfy_deltas(state_dict, pipe_for_sizes, lora: dict, strength: float):
    """Per component, ComfyUI's patched weight minus its base weight, keyed by diffusers / transformers names."""
    comfy = import_comfyui()
    patcher, clip, unet_config, _ = comfy_sdxl(state_dict, pipe_for_sizes, HEAD_CHANNELS)
    unet_before = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    clip_before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    model_lora, clip_lora = comfy.sd.load_lora_for_models(patcher, clip, lora, strength, strength)
    # ComfyUI's own loading (what sampling and text encoding call), which applies the patches to the weights.
    comfy.model_management.load_models_gpu([model_lora, clip_lora.patcher], force_full_load=True)
    unet_after = model_lora.model.diffusion_model.state_dict()
    clip_after = clip_lora.cond_stage_model.state_dict()
    to_original = comfy.utils.unet_to_diffusers(unet_config)  # ComfyUI's own diffusers -> original UNet map
    out = {"unet": {d: unet_after[o] - unet_before[o] for d, o in to_original.items() if o in unet_after}}
    for component, prefix in (("text_encoder", "clip_l.transformer."), ("text_encoder_2", "clip_g.transformer.")):
        out[component] = {k[len(prefix) :]: clip_after[k] - clip_before[k] for k in clip_after if k.startswith(prefix)}
    comfy.model_management.unload_all_models()
    return out


def relative_errors(expected: dict, got: dict) -> dict[str, float]:
    """Per component, ||got - expected|| / ||expected|| over the parameters the adapter changed."""
    errors = {}
    for component, deltas in expected.items():
        changed = {k: d for k, d in deltas.items() if d.abs().max() > 0}
        assert changed, component
        num = den = 0.0
        for key, d in changed.items():
            other = got[component].get(key, got[component].get(key.removeprefix("text_model.")))
            if other is None:
                other = got[component].get("text_model." + key)
            assert other is not None, f"{component}.{key} missing in ComfyUI"
            num += (other.double() - d.double()).square().sum().item()
            den += d.double().square().sum().item()
        unchanged = [k for k, d in got[component].items() if k not in changed and k.removeprefix("text_model.") not in
                     {c.removeprefix("text_model.") for c in changed} and d.abs().max() > 0]  # fmt: skip
        assert not unchanged, f"ComfyUI changed {component} parameters diffusers did not: {unchanged[:3]}"
        errors[component] = (num / den) ** 0.5
    return errors


@pytest.mark.parametrize("kind", ["hybrid", "conv"])
@pytest.mark.parametrize("layout", ["comfyui", "kohya"])
def test_comfyui_applies_export_like_diffusers(layout, kind, comfy_base, tmp_path, caplog, capsys):
    base, state_dict, adapters = comfy_base
    adapter = adapters[kind]
    out = tmp_path / f"{layout}.safetensors"
    method = ["--exact"] if layout == "kohya" else []
    assert cli.main(["export", str(adapter), "--to", layout, *method, "--base", str(base), "-o", str(out)]) == 0
    if layout == "comfyui":
        import_comfyui()  # first, so that the node finds ComfyUI to register with
        load_node()
        assert out.stat().st_size < 1.05 * adapter.stat().st_size  # the factors, not a rank k*r LoRA
    caplog.set_level(logging.WARNING)
    got = comfy_deltas(state_dict, comfy_toy(0), load_file(out), 0.7)
    not_loaded = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not_loaded == []
    errors = relative_errors(diffusers_deltas(base, adapter, 0.7), got)
    assert set(errors) == {"unet", "text_encoder", "text_encoder_2"}
    assert max(errors.values()) < 1e-5, errors


def sdxl_unet_on_meta():
    """SDXL base 1.0's UNet (its published unet/config.json values), built on the meta device: names and shapes."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )  # fmt: skip


@pytest.mark.parametrize("which", ["sdxl", "toy"])
def test_single_file_unet_names_are_comfyuis(which):
    """The original-layout UNet keys equal ComfyUI's own diffusers -> original map, key for key, and on SDXL's real
    sizes ComfyUI's detection recognises the checkpoint as SDXL."""
    from gralora_diffusion.original_layout import SgmNaming

    comfy = import_comfyui()
    unet = sdxl_unet_on_meta() if which == "sdxl" else comfy_toy(0).unet
    naming = SgmNaming.from_unet_config(unet.config)
    ours = {k: naming.parameter(k) for k in unet.state_dict()}
    state_dict = {UNET_PREFIX + v: unet.state_dict()[k] for k, v in ours.items()}
    unet_config = comfy.model_detection.detect_unet_config(state_dict, UNET_PREFIX)
    theirs = comfy.utils.unet_to_diffusers(unet_config)  # lists shortcut convolutions every resnet may have
    assert {k: v for k, v in theirs.items() if k in ours} == ours
    if which == "sdxl":
        model_config = comfy.model_detection.model_config_from_unet(state_dict, UNET_PREFIX)
        assert type(model_config).__name__ == "SDXL"


def test_single_file_text_encoders_load_in_comfyui(comfy_base):
    """ComfyUI's SDXL CLIP conversion reads both encoders from the checkpoint, every weight equal."""
    _, state_dict, _ = comfy_base
    pipe = comfy_toy(0)
    _, clip, _, (missing, unexpected) = comfy_sdxl(state_dict, pipe, HEAD_CHANNELS)
    assert unexpected == []
    assert set(missing) <= {"clip_l.logit_scale", "clip_g.logit_scale", "clip_l.transformer.text_projection.weight"}
    loaded = clip.cond_stage_model.state_dict()
    for component, prefix in (("text_encoder", "clip_l.transformer."), ("text_encoder_2", "clip_g.transformer.")):
        for key, value in getattr(pipe, component).state_dict().items():
            name = prefix + (key if key.startswith(("text_model.", "text_projection")) else "text_model." + key)
            assert torch.equal(loaded[name], value), name


def test_the_diffusers_layout_loses_the_unet_in_comfyui_as_the_command_says(comfy_base, tmp_path, caplog, capsys):
    """Why `--to diffusers` points ComfyUI users elsewhere: ComfyUI maps its text-encoder keys but none of its UNet
    attention keys (measured, so that the note stays true)."""
    base, state_dict, adapters = comfy_base
    adapter = adapters["hybrid"]
    out = tmp_path / "diffusers.safetensors"
    assert cli.main(["export", str(adapter), "--to", "diffusers", "--exact", "--base", str(base), "-o", str(out)]) == 0
    assert "use --to kohya (a LoRA) or --to comfyui" in capsys.readouterr().out
    lora = load_file(out)
    caplog.set_level(logging.WARNING)
    comfy_deltas(state_dict, comfy_toy(0), lora, 1.0)
    lost = {r.getMessage().split(": ", 1)[1] for r in caplog.records if "lora key not loaded" in r.getMessage()}
    assert lost == {k for k in lora if k.startswith("unet.")}  # every UNet key, no text-encoder key
