"""The pipeline API against explicit computations: blending, per-component weights, fusing, unloading, PEFT interop."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    apply_explicit_blend,
    assert_same_snapshot,
    make_adapter_file,
    snapshot,
    text_out,
    unet_inputs,
    unet_out,
)
from peft import PeftModel, get_peft_model

import gralora_diffusion as gd
from gralora_diffusion.toy import build_toy_sd15_pipeline, build_toy_sdxl_pipeline


def explicit_pipeline(adapters, builder=build_toy_sdxl_pipeline):
    """A fresh base pipeline whose plain weights have sum_i w_i * delta_i added by hand."""
    ref = builder(0)
    apply_explicit_blend(ref, adapters)
    return ref


def test_load_makes_the_adapter_active_at_weight_one(sdxl, adapter_files):
    a, b = adapter_files
    assert gd.load_gralora_weights(sdxl, a) == "a"
    assert gd.get_active_gralora_adapters(sdxl) == {"a": {"unet": 1.0, "text_encoder": 1.0, "text_encoder_2": 1.0}}
    assert gd.load_gralora_weights(sdxl, b, adapter_name="style") == "style"
    assert gd.get_gralora_adapters(sdxl) == {
        "unet": ["a", "style"],
        "text_encoder": ["a"],
        "text_encoder_2": ["a"],
    }
    assert list(gd.get_active_gralora_adapters(sdxl)) == ["style"]  # like diffusers: the last loaded is active
    ref = explicit_pipeline([(b, {})])
    torch.testing.assert_close(unet_out(sdxl), unet_out(ref), atol=1e-5, rtol=1e-5)


def test_blend_matches_explicit_delta_weight_sum(sdxl, adapter_files):
    a, b = adapter_files
    gd.load_gralora_weights(sdxl, a)
    gd.load_gralora_weights(sdxl, b)
    gd.set_gralora_adapters(sdxl, ["a", "b"], [0.7, 0.4])
    ref = explicit_pipeline([(a, {"unet": 0.7, "text_encoder": 0.7, "text_encoder_2": 0.7}), (b, {"unet": 0.4})])
    torch.testing.assert_close(unet_out(sdxl), unet_out(ref), atol=1e-5, rtol=1e-5)
    for te in ("text_encoder", "text_encoder_2"):
        torch.testing.assert_close(text_out(sdxl, te), text_out(ref, te), atol=1e-5, rtol=1e-5)
    # The blend really differs from either adapter alone and from the base.
    base = build_toy_sdxl_pipeline(0)
    assert (unet_out(sdxl) - unet_out(base)).abs().max() > 1e-3


def test_per_component_and_negative_weights(sdxl, adapter_files):
    a, b = adapter_files
    gd.load_gralora_weights(sdxl, a)
    gd.load_gralora_weights(sdxl, b)
    weights = [{"unet": -0.8, "text_encoder": 0.5}, -1.5]  # text_encoder_2 left out -> 1.0
    gd.set_gralora_adapters(sdxl, ["a", "b"], weights)
    assert gd.get_active_gralora_adapters(sdxl) == {
        "a": {"unet": -0.8, "text_encoder": 0.5, "text_encoder_2": 1.0},
        "b": {"unet": -1.5},
    }
    ref = explicit_pipeline([(a, {"unet": -0.8, "text_encoder": 0.5, "text_encoder_2": 1.0}), (b, {"unet": -1.5})])
    torch.testing.assert_close(unet_out(sdxl), unet_out(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_out(sdxl), text_out(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_out(sdxl, "text_encoder_2"), text_out(ref, "text_encoder_2"), atol=1e-5, rtol=1e-5)


def test_zero_text_encoder_weight_leaves_text_encoder_at_base(sdxl, adapter_files):
    a, _ = adapter_files
    base = build_toy_sdxl_pipeline(0)
    gd.load_gralora_weights(sdxl, a)
    assert (text_out(sdxl) - text_out(base)).abs().max() > 1e-4
    gd.set_gralora_adapters(sdxl, "a", {"text_encoder": 0.0, "text_encoder_2": 0.0})
    torch.testing.assert_close(text_out(sdxl), text_out(base), atol=1e-6, rtol=0)
    assert (unet_out(sdxl) - unet_out(base)).abs().max() > 1e-3


def test_fused_equals_unfused_and_unfuse_restores_base(sdxl, adapter_files):
    a, b = adapter_files
    base_weights = {k: v.clone() for k, v in sdxl.unet.state_dict().items()}
    gd.load_gralora_weights(sdxl, a)
    gd.load_gralora_weights(sdxl, b)
    gd.set_gralora_adapters(sdxl, ["a", "b"], [0.9, -0.6])
    unfused = unet_out(sdxl)
    unfused_text = text_out(sdxl)
    gd.fuse_gralora(sdxl)
    assert gd.get_fused_gralora_adapters(sdxl) == ["a", "b"]
    assert (unet_out(sdxl) - unfused).abs().max() <= 1e-5
    assert (text_out(sdxl) - unfused_text).abs().max() <= 1e-5
    # Changing the weights while fused costs one unfuse/fuse and stays exact.
    gd.set_gralora_adapters(sdxl, ["a", "b"], [0.2, 1.1])
    fused = unet_out(sdxl)
    gd.unfuse_gralora(sdxl)
    assert gd.get_fused_gralora_adapters(sdxl) == []
    assert (unet_out(sdxl) - fused).abs().max() <= 1e-5
    ref = explicit_pipeline([(a, {"unet": 0.2}), (b, {"unet": 1.1})])
    torch.testing.assert_close(fused, unet_out(ref), atol=1e-5, rtol=1e-5)
    # After fuse + unfuse the base weights are back within 1e-6 relative.
    for module_name, layer in gd.layers.gralora_layers(sdxl.unet):
        w = layer.get_base_layer().weight
        original = base_weights[f"{module_name}.weight"]
        assert (w - original).norm() / original.norm() <= 1e-6


def test_fused_image_matches_unfused_image(sdxl, adapter_files):
    a, b = adapter_files
    gd.load_gralora_weights(sdxl, a)
    gd.load_gralora_weights(sdxl, b)
    gd.set_gralora_adapters(sdxl, ["a", "b"], [0.8, 0.5])

    def image():
        g = torch.Generator().manual_seed(3)
        return sdxl("a photo of sks dog", num_inference_steps=2, height=64, width=64, generator=g, output_type="pt")

    unfused = image().images
    gd.fuse_gralora(sdxl)
    fused = image().images
    assert (fused - unfused).abs().max() <= 1e-5


def test_fuse_subset_makes_it_the_active_set(sdxl, adapter_files):
    a, b = adapter_files
    gd.load_gralora_weights(sdxl, a)
    gd.load_gralora_weights(sdxl, b)
    gd.set_gralora_adapters(sdxl, ["a", "b"], [0.5, 0.5])
    gd.fuse_gralora(sdxl, adapter_names=["b"])
    assert list(gd.get_active_gralora_adapters(sdxl)) == ["b"]
    ref = explicit_pipeline([(b, {"unet": 0.5})])
    torch.testing.assert_close(unet_out(sdxl), unet_out(ref), atol=1e-5, rtol=1e-5)


def test_unload_restores_every_base_parameter_exactly(sdxl, adapter_files):
    a, b = adapter_files
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in gd.pipeline_components(sdxl).items()}
    types_before = {c: [type(m) for m in model.modules()] for c, model in gd.pipeline_components(sdxl).items()}
    gd.load_gralora_weights(sdxl, a)
    gd.load_gralora_weights(sdxl, b)
    gd.set_gralora_adapters(sdxl, ["a", "b"], [1.0, -0.5])
    unet_out(sdxl)
    gd.unload_gralora_weights(sdxl)
    assert gd.get_gralora_adapters(sdxl) == {}
    for component, model in gd.pipeline_components(sdxl).items():
        after = model.state_dict()
        assert after.keys() == before[component].keys()
        for key, value in before[component].items():
            assert torch.equal(after[key], value), f"{component}.{key}"
        assert [type(m) for m in model.modules()] == types_before[component]
        assert not hasattr(model, "peft_config")


def test_disable_and_enable(sdxl, adapter_files):
    a, _ = adapter_files
    base = unet_out(sdxl)
    gd.load_gralora_weights(sdxl, a)
    gd.set_gralora_adapters(sdxl, "a", 0.6)
    adapted = unet_out(sdxl)
    gd.fuse_gralora(sdxl)
    gd.disable_gralora(sdxl)
    assert gd.get_active_gralora_adapters(sdxl) == {}
    # fuse then unfuse leaves fp32 round-off in the base weights: the same 1e-5 as fused vs unfused output
    torch.testing.assert_close(unet_out(sdxl), base, atol=1e-5, rtol=1e-5)
    gd.enable_gralora(sdxl)
    assert gd.get_fused_gralora_adapters(sdxl) == ["a"]
    assert gd.get_active_gralora_adapters(sdxl)["a"]["unet"] == pytest.approx(0.6)
    torch.testing.assert_close(unet_out(sdxl), adapted, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for n, p in sdxl.unet.named_parameters() if "gralora_" in n)


def test_delete_one_adapter_keeps_the_other(sdxl, adapter_files):
    a, b = adapter_files
    gd.load_gralora_weights(sdxl, a)
    gd.load_gralora_weights(sdxl, b)
    gd.set_gralora_adapters(sdxl, ["a", "b"], [0.5, 0.75])
    gd.fuse_gralora(sdxl)
    gd.delete_gralora_adapters(sdxl, "a")
    assert gd.get_gralora_adapters(sdxl) == {"unet": ["b"]}
    assert gd.get_fused_gralora_adapters(sdxl) == ["b"]
    ref = explicit_pipeline([(b, {"unet": 0.75})])
    torch.testing.assert_close(unet_out(sdxl), unet_out(ref), atol=1e-5, rtol=1e-5)
    # The text encoders lost their only adapter: they are plain modules again.
    assert not list(gd.layers.gralora_layers(sdxl.text_encoder))


def test_hybrid_adapter_blends_like_its_explicit_delta(sdxl, tmp_path):
    h = make_adapter_file(tmp_path / "h.safetensors", seed=5, rank=8, gralora_k=2, hybrid_r=4)
    gd.load_gralora_weights(sdxl, h)
    gd.set_gralora_adapters(sdxl, "h", 1.3)
    ref = explicit_pipeline([(h, {"unet": 1.3, "text_encoder": 1.3, "text_encoder_2": 1.3})])
    torch.testing.assert_close(unet_out(sdxl), unet_out(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_out(sdxl), text_out(ref), atol=1e-5, rtol=1e-5)


def test_wide_preset_adapter(sdxl, tmp_path):
    w = make_adapter_file(tmp_path / "wide.safetensors", seed=6, unet_targets="unet-wide", text_encoders=())
    gd.load_gralora_weights(sdxl, w)
    names = {n.rsplit(".", 1)[-1] for n, _ in gd.layers.gralora_layers(sdxl.unet)}
    assert {"proj_in", "proj_out", "proj", "2", "to_q", "0"} <= names
    ref = explicit_pipeline([(w, {})])
    torch.testing.assert_close(unet_out(sdxl), unet_out(ref), atol=1e-5, rtol=1e-5)


def test_sd15_pipeline_uses_the_same_functions(sd15, tmp_path):
    f = make_adapter_file(
        tmp_path / "sd15.safetensors", seed=7, text_encoders=("text_encoder",), pipeline_builder=build_toy_sd15_pipeline
    )
    gd.load_gralora_weights(sd15, f)
    gd.set_gralora_adapters(sd15, "sd15", {"unet": 0.7, "text_encoder": -0.3})
    ref = explicit_pipeline([(f, {"unet": 0.7, "text_encoder": -0.3})], builder=build_toy_sd15_pipeline)
    torch.testing.assert_close(unet_out(sd15), unet_out(ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_out(sd15), text_out(ref), atol=1e-5, rtol=1e-5)
    unfused = unet_out(sd15)
    gd.fuse_gralora(sd15)
    assert (unet_out(sd15) - unfused).abs().max() <= 1e-5
    gd.unload_gralora_weights(sd15)
    assert gd.get_gralora_adapters(sd15) == {}


def test_diffusers_scale_hooks_work_on_gralora_layers(sdxl, adapter_files):
    """cross_attention_kwargs={"scale": s} (diffusers' LoRA scale) scales GraLoRA adapters too, then restores."""
    a, _ = adapter_files
    gd.load_gralora_weights(sdxl, a)
    scaled = unet_out(sdxl, scale=0.5)
    assert gd.get_active_gralora_adapters(sdxl)["a"]["unet"] == pytest.approx(1.0)  # restored afterwards
    gd.set_gralora_adapters(sdxl, "a", 0.5)
    torch.testing.assert_close(scaled, unet_out(sdxl), atol=1e-6, rtol=1e-6)


def test_mixin_methods(adapter_files):
    from diffusers import StableDiffusionXLPipeline

    a, _ = adapter_files
    cls = gd.with_gralora(StableDiffusionXLPipeline)
    base = build_toy_sdxl_pipeline(0)
    pipe = cls(**base.components)
    assert pipe.load_gralora_weights(a) == "a"
    pipe.set_gralora_adapters(["a"], [0.25])
    assert pipe.get_active_gralora_adapters()["a"]["unet"] == pytest.approx(0.25)
    pipe.unload_gralora_weights()
    assert pipe.get_gralora_adapters() == {}


def test_state_dict_input_is_accepted(sdxl, adapter_files):
    from safetensors.torch import load_file

    a, _ = adapter_files
    name = gd.load_gralora_weights(sdxl, load_file(str(a)))
    assert name == "default_0"
    assert gd.get_gralora_adapters(sdxl)["unet"] == ["default_0"]


# --- PEFT interoperability ---------------------------------------------------------------------------------------


def test_export_peft_folder_loads_with_plain_peft(sdxl, adapter_files, tmp_path):
    a, _ = adapter_files
    folder = gd.export_peft_folder(a, tmp_path / "peft_a")
    assert sorted(p.name for p in folder.iterdir()) == ["text_encoder", "text_encoder_2", "unet"]
    gd.load_gralora_weights(sdxl, a)
    ours_unet, ours_text = unet_out(sdxl), text_out(sdxl, "text_encoder_2")

    plain = build_toy_sdxl_pipeline(0)
    plain.unet = PeftModel.from_pretrained(plain.unet, str(folder / "unet"))
    plain.text_encoder_2 = PeftModel.from_pretrained(plain.text_encoder_2, str(folder / "text_encoder_2"))
    torch.testing.assert_close(unet_out(plain), ours_unet, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_out(plain, "text_encoder_2"), ours_text, atol=1e-5, rtol=1e-5)


def test_peft_trained_folder_loads_into_a_pipeline(sdxl, tmp_path):
    from peft import GraloraConfig

    trained = build_toy_sdxl_pipeline(0)
    torch.manual_seed(11)
    config = GraloraConfig(r=8, alpha=12, gralora_k=2, target_modules=["to_q", "to_v"], init_weights=False)
    peft_unet = get_peft_model(trained.unet, config)
    peft_unet.save_pretrained(str(tmp_path / "peft_unet"))
    trained.unet = peft_unet
    expected = unet_out(trained)

    name = gd.load_gralora_weights(sdxl, tmp_path / "peft_unet")
    assert name == "peft_unet"
    # the package's layer sums in another order than PEFT's (scale folded into B): fp32 round-off only
    torch.testing.assert_close(unet_out(sdxl), expected, atol=1e-5, rtol=1e-5)
    # alpha came from adapter_config.json, not from a default.
    layer = next(layer for _, layer in gd.layers.gralora_layers(sdxl.unet))
    assert layer.alpha["peft_unet"] == 12


def test_unload_after_fuse_keeps_the_blend_baked_in(sdxl, adapter_files):
    a, b = adapter_files
    gd.load_gralora_weights(sdxl, a)
    gd.load_gralora_weights(sdxl, b)
    gd.set_gralora_adapters(sdxl, ["a", "b"], [0.6, -0.4])
    gd.fuse_gralora(sdxl)
    fused = unet_out(sdxl)
    gd.unload_gralora_weights(sdxl)
    assert gd.get_gralora_adapters(sdxl) == {} and not list(gd.layers.gralora_layers(sdxl.unet))
    torch.testing.assert_close(unet_out(sdxl), fused, atol=1e-6, rtol=1e-6)
    ref = explicit_pipeline([(a, {"unet": 0.6}), (b, {"unet": -0.4})])
    torch.testing.assert_close(unet_out(sdxl), unet_out(ref), atol=1e-5, rtol=1e-5)


def test_text_encoder_names_work_across_transformers_layouts(sdxl, adapter_files, tmp_path):
    """Files name CLIP modules text_model.encoder...; a file with the flattened transformers-5 names loads too."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    a, _ = adapter_files
    with safe_open(str(a), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert all(k.startswith("text_encoder.text_model.") for k in tensors if k.startswith("text_encoder."))
    flat = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in tensors.items()}
    save_file(flat, str(tmp_path / "flat.safetensors"), metadata=meta)
    gd.load_gralora_weights(sdxl, tmp_path / "flat.safetensors")
    ref = build_toy_sdxl_pipeline(0)
    gd.load_gralora_weights(ref, a)
    torch.testing.assert_close(text_out(sdxl), text_out(ref), atol=1e-6, rtol=1e-6)
    assert (text_out(sdxl) - text_out(build_toy_sdxl_pipeline(0))).abs().max() > 1e-4


@torch.no_grad()
def _unet_out_in(pipe, dtype) -> torch.Tensor:
    sample, t, hidden, kwargs = unet_inputs(pipe)
    cond = {k: v.to(dtype) for k, v in kwargs["added_cond_kwargs"].items()}
    out = pipe.unet(sample.to(dtype), t, encoder_hidden_states=hidden.to(dtype), added_cond_kwargs=cond)
    return out.sample.float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_load_fuse_unfuse_stay_at_the_dtypes_precision(adapter_files, dtype):
    """In fp16/bf16 the adapted output is as close to the fp32 explicit blend as the bare base is to fp32: the
    adapter adds no error beyond the dtype's own; fuse and unfuse agree, and unloading restores the base weights."""
    a, _ = adapter_files
    weights = dict.fromkeys(("unet", "text_encoder", "text_encoder_2"), 0.8)
    reference = build_toy_sdxl_pipeline(0)
    base_fp32 = _unet_out_in(reference, torch.float32)
    apply_explicit_blend(reference, [(a, weights)])
    expected = _unet_out_in(reference, torch.float32)

    pipe = build_toy_sdxl_pipeline(0).to(dtype)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base_error = ((_unet_out_in(pipe, dtype) - base_fp32).norm() / base_fp32.norm()).item()
    gd.load_gralora_weights(pipe, a)
    gd.set_gralora_adapters(pipe, "a", 0.8)
    assert (
        pipe.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").gralora_A["a"].dtype
        == dtype
    )  # the adapter is loaded in the pipeline's dtype
    unfused = _unet_out_in(pipe, dtype)
    gd.fuse_gralora(pipe)
    fused = _unet_out_in(pipe, dtype)
    effect = ((expected - base_fp32).norm() / base_fp32.norm()).item()
    for out in (unfused, fused):
        error = ((out - expected).norm() / expected.norm()).item()
        assert error <= 2 * base_error + 0.05 * effect, (error, base_error, effect)
    gd.unfuse_gralora(pipe)
    gd.unload_gralora_weights(pipe)
    after = pipe.unet.state_dict()
    eps = torch.finfo(dtype).eps
    for key, value in before.items():
        drift = ((after[key].float() - value.float()).norm() / (value.float().norm() + 1e-12)).item()
        assert drift <= 4 * eps, (key, drift)


def test_loading_while_disabled_keeps_every_adapter_off_until_enabled(sdxl, adapter_files):
    a, b = adapter_files
    base = unet_out(sdxl)
    gd.load_gralora_weights(sdxl, a)
    gd.set_gralora_adapters(sdxl, "a", 0.5)
    gd.disable_gralora(sdxl)
    gd.load_gralora_weights(sdxl, b)
    assert gd.get_active_gralora_adapters(sdxl) == {}
    torch.testing.assert_close(unet_out(sdxl), base, atol=0, rtol=0)
    gd.enable_gralora(sdxl)
    assert list(gd.get_active_gralora_adapters(sdxl)) == ["b"]  # like diffusers: the freshly loaded one is active
    only_b = build_toy_sdxl_pipeline(0)
    gd.load_gralora_weights(only_b, b)
    torch.testing.assert_close(unet_out(sdxl), unet_out(only_b), atol=1e-6, rtol=1e-6)


def test_gralora_on_layers_that_carry_a_diffusers_lora_is_refused_in_one_sentence(sdxl, adapter_files):
    from peft import LoraConfig

    a, _ = adapter_files
    sdxl.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="lora")
    before = snapshot(sdxl)
    with pytest.raises(gd.GraloraAdapterError, match=r"already carries a lora adapter .*unload_lora_weights") as err:
        gd.load_gralora_weights(sdxl, a)
    assert "\n" not in str(err.value)
    assert_same_snapshot(before, snapshot(sdxl))
