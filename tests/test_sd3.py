"""Stable Diffusion 3 through the same public API: the model-family seam, on a tiny SD3 pipeline built offline.

The transformer (MMDiT, image and text streams), both CLIP text encoders and the T5 encoder carry GraLoRA; every
result is compared with an explicit sum of dense delta weights written into a plain copy of the pipeline.
"""

from __future__ import annotations

import pytest
import torch
from helpers import apply_explicit_blend

import gralora_diffusion as gd
from gralora_diffusion.families import SD3
from gralora_diffusion.toy import build_toy_sd3_pipeline, save_random_toy_adapter

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.fixture(scope="module")
def sd3_adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    a = save_random_toy_adapter(folder / "a.safetensors", 1, pipeline_builder=build_toy_sd3_pipeline, b_scale=0.2)
    b = save_random_toy_adapter(
        folder / "b.safetensors", 2, rank=16, gralora_k=4, text_encoders=("text_encoder_3",),
        pipeline_builder=build_toy_sd3_pipeline, b_scale=0.2,
    )  # fmt: skip
    return a, b


@pytest.fixture
def sd3():
    return build_toy_sd3_pipeline(0)


@torch.no_grad()
def outputs(pipe) -> dict[str, torch.Tensor]:
    """The transformer's output and each text encoder's last hidden state on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 200, (2, 12), generator=g)
    out = {name: getattr(pipe, name)(ids).last_hidden_state for name in ("text_encoder", "text_encoder_2")}
    out["text_encoder_3"] = pipe.text_encoder_3(ids).last_hidden_state
    out["transformer"] = pipe.transformer(
        hidden_states=torch.randn(2, 4, 32, 32, generator=g),
        encoder_hidden_states=torch.randn(2, 20, 64, generator=g),
        pooled_projections=torch.randn(2, 64, generator=g),
        timestep=torch.tensor([500.0, 20.0]),
    ).sample
    return out


def assert_outputs_close(got, expected, tol=1e-5):
    for name in COMPONENTS:
        torch.testing.assert_close(got[name], expected[name], atol=tol, rtol=tol, msg=name)


def test_family_and_components(sd3):
    assert gd.family_of(sd3) is SD3
    assert list(gd.pipeline_components(sd3)) == list(COMPONENTS)


def test_blend_matches_explicit_delta_weight_sum(sd3, sd3_adapters):
    a, b = sd3_adapters
    base = outputs(sd3)
    gd.load_gralora_weights(sd3, a)
    gd.load_gralora_weights(sd3, b)
    assert gd.get_gralora_adapters(sd3) == {c: ["a"] if c in ("text_encoder", "text_encoder_2") else ["a", "b"]
                                            for c in COMPONENTS}  # fmt: skip
    weights_a = {"transformer": 0.8, "text_encoder": 0.5, "text_encoder_2": 1.0, "text_encoder_3": -0.7}
    weights_b = {"transformer": 0.6, "text_encoder_3": 0.9}
    gd.set_gralora_adapters(sd3, ["a", "b"], [weights_a, weights_b])
    blended = outputs(sd3)
    for name in COMPONENTS:
        assert (blended[name] - base[name]).abs().max() > 1e-3, f"{name}: the adapters must have an effect"

    plain = build_toy_sd3_pipeline(0)
    apply_explicit_blend(plain, [(a, weights_a), (b, weights_b)])
    expected = outputs(plain)
    assert_outputs_close(blended, expected)

    gd.fuse_gralora(sd3)
    assert_outputs_close(outputs(sd3), expected)
    gd.unfuse_gralora(sd3)
    assert_outputs_close(outputs(sd3), expected)


def test_unload_restores_every_parameter_and_save_round_trips(sd3, sd3_adapters, tmp_path):
    a, _ = sd3_adapters
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in gd.pipeline_components(sd3).items()}
    gd.load_gralora_weights(sd3, a)
    gd.set_gralora_adapters(sd3, "a", 0.5)
    adapted = outputs(sd3)
    # save what is loaded (all four components, T5 and the transformer included) and load it into a fresh pipeline
    saved = gd.save_gralora_weights(
        tmp_path / "resaved.safetensors", **{c: getattr(sd3, c) for c in COMPONENTS}, adapter_name="a"
    )
    assert sorted(gd.read_adapter(saved).components) == sorted(COMPONENTS)
    gd.unload_gralora_weights(sd3)
    for component, model in gd.pipeline_components(sd3).items():
        state = model.state_dict()
        assert state.keys() == before[component].keys()
        assert all(torch.equal(state[k], before[component][k]) for k in state), component
    fresh = build_toy_sd3_pipeline(0)
    gd.load_gralora_weights(fresh, saved)
    gd.set_gralora_adapters(fresh, "resaved", 0.5)
    assert_outputs_close(outputs(fresh), adapted, tol=1e-6)


def test_pipeline_generates_the_same_image_fused_and_unfused(sd3, sd3_adapters):
    a, _ = sd3_adapters
    gd.load_gralora_weights(sd3, a)

    def image():
        g = torch.Generator().manual_seed(3)
        return sd3("a red circle", num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images

    unfused = image()
    gd.fuse_gralora(sd3)
    fused = image()
    assert abs(fused - unfused).max() <= 1e-4
    gd.unload_gralora_weights(sd3)
    assert abs(image() - unfused).max() <= 1e-4  # unload after fuse keeps the blend baked in, as diffusers does


def test_sdxl_adapter_on_sd3_is_refused_in_one_sentence(sd3, tmp_path):
    sdxl_adapter = save_random_toy_adapter(tmp_path / "x.safetensors", 1, text_encoders=())
    with pytest.raises(gd.GraloraAdapterError, match="has weights for 'unet' but the pipeline has no unet"):
        gd.load_gralora_weights(sd3, sdxl_adapter)
    assert gd.get_gralora_adapters(sd3) == {}
