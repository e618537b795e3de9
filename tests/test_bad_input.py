"""Bad input gets one clear error, raised before anything changes: the pipeline is exactly as before the call."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_same_snapshot, make_adapter_file, snapshot
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import load_file, save_file

import gralora_diffusion as gd
from gralora_diffusion.toy import build_toy_sd15_pipeline


@pytest.fixture
def loaded(sdxl, adapter_files):
    """A pipeline with 'a' and 'b' loaded, blended and fused: the richest state to protect."""
    a, b = adapter_files
    gd.load_gralora_weights(sdxl, a)
    gd.load_gralora_weights(sdxl, b)
    gd.set_gralora_adapters(sdxl, ["a", "b"], [0.5, 0.25])
    gd.fuse_gralora(sdxl)
    return sdxl


def expect_error(pipe, call, error, match):
    before = snapshot(pipe)
    with pytest.raises(error, match=match):
        call()
    assert_same_snapshot(before, snapshot(pipe))


def test_plain_lora_file_points_to_load_lora_weights(loaded, tmp_path):
    model = build_toy_sd15_pipeline(0).unet
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_v"]), model)
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    path = tmp_path / "lora.safetensors"
    save_file(sd, str(path))
    expect_error(loaded, lambda: gd.load_gralora_weights(loaded, path), gd.AdapterFileError, "LoRA.*load_lora_weights")


def test_kohya_lora_file_is_recognised(loaded, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_down_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(4, 32)}, str(path))
    expect_error(loaded, lambda: gd.load_gralora_weights(loaded, path), gd.AdapterFileError, "is a LoRA adapter")


def test_truncated_file(loaded, adapter_files, tmp_path):
    data = adapter_files[0].read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    expect_error(
        loaded, lambda: gd.load_gralora_weights(loaded, path), gd.AdapterFileError, "not a readable safetensors"
    )


def test_not_safetensors_at_all(loaded, tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, I am a text file")
    expect_error(
        loaded, lambda: gd.load_gralora_weights(loaded, path), gd.AdapterFileError, "not a readable safetensors"
    )


def test_pickle_is_refused_without_being_opened(loaded, tmp_path, monkeypatch):
    path = tmp_path / "adapter.bin"
    torch.save({"unet.x.gralora_A": torch.zeros(1)}, path)

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must never be called on user files")

    monkeypatch.setattr(torch, "load", no_torch_load)
    expect_error(loaded, lambda: gd.load_gralora_weights(loaded, path), gd.AdapterFileError, "pickle")


def test_peft_folder_with_only_pickle_weights_is_refused(loaded, tmp_path):
    folder = tmp_path / "peft_bin"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "GRALORA", "r": 8}))
    torch.save({}, folder / "adapter_model.bin")
    expect_error(loaded, lambda: gd.load_gralora_weights(loaded, folder), gd.AdapterFileError, "pickle")


def test_missing_path(loaded, tmp_path):
    missing = tmp_path / "nope.safetensors"
    expect_error(loaded, lambda: gd.load_gralora_weights(loaded, missing), gd.AdapterFileError, "does not exist")


def test_adapter_of_another_base_names_the_module_and_both_shapes(loaded, tmp_path):
    other = make_adapter_file(
        tmp_path / "sd15.safetensors",
        seed=3,
        text_encoders=(),
        pipeline_builder=build_toy_sd15_pipeline,
        metadata={"base_model": "toy-sd15"},
    )
    # SD1.5 toy cross-attention reads 32 features, the SDXL toy 64: attn2.to_k differs.
    expect_error(
        loaded,
        lambda: gd.load_gralora_weights(loaded, other),
        gd.GraloraAdapterError,
        r"another base model: unet\..*attn2\.to_k is \(in=64, out=64\) in this pipeline but \(in=32, out=64\) in the "
        r"adapter \(base toy-sd15\)",
    )


def test_adapter_module_missing_from_pipeline(loaded, adapter_files, tmp_path):
    sd = load_file(str(adapter_files[1]))
    renamed = {k.replace("down_blocks.1", "down_blocks.7"): v for k, v in sd.items()}
    path = tmp_path / "renamed.safetensors"
    from safetensors import safe_open

    with safe_open(str(adapter_files[1]), "pt") as f:
        meta = f.metadata()
    save_file(renamed, str(path), metadata=meta)
    expect_error(
        loaded, lambda: gd.load_gralora_weights(loaded, path), gd.GraloraAdapterError, "down_blocks.7.*does not have"
    )


def test_component_the_pipeline_lacks(sd15, adapter_files):
    a, _ = adapter_files  # has text_encoder_2 weights
    expect_error(sd15, lambda: gd.load_gralora_weights(sd15, a), gd.GraloraAdapterError, "no text_encoder_2")


def test_duplicate_adapter_name(loaded, adapter_files):
    a, _ = adapter_files
    expect_error(loaded, lambda: gd.load_gralora_weights(loaded, a), gd.GraloraAdapterError, "already loaded")


def test_unknown_adapter_name_in_set(loaded):
    expect_error(
        loaded,
        lambda: gd.set_gralora_adapters(loaded, ["a", "c"], [1.0, 1.0]),
        gd.GraloraAdapterError,
        "No GraLoRA adapter named 'c'.*loaded adapters: \\['a', 'b'\\]",
    )


@pytest.mark.parametrize(
    "weights,match",
    [
        ([1.0], "Got 1 weights for 2 adapters"),
        ([{"unet": 1.0, "vae": 0.5}, 1.0], "component 'vae'"),
        ([float("nan"), 1.0], "not a finite number"),
        (["0.5", 1.0], "not a finite number"),
    ],
)
def test_bad_weights(loaded, weights, match):
    expect_error(loaded, lambda: gd.set_gralora_adapters(loaded, ["a", "b"], weights), gd.GraloraAdapterError, match)


def test_unknown_names_in_fuse_and_delete(loaded):
    expect_error(loaded, lambda: gd.fuse_gralora(loaded, ["zzz"]), gd.GraloraAdapterError, "'zzz'")
    expect_error(loaded, lambda: gd.delete_gralora_adapters(loaded, ["a", "zzz"]), gd.GraloraAdapterError, "'zzz'")


def test_k_that_does_not_divide_a_layer_names_it(sdxl):
    config = gd.make_gralora_config(6, "unet-attention", gralora_k=3)
    expect_error(
        sdxl,
        lambda: gd.add_gralora_adapter(sdxl.unet, config, component="unet"),
        gd.GraloraConfigError,
        r"unet\.down_blocks\.1\..*to_q has in_features=64, out_features=64, not both divisible by gralora_k=3",
    )


def test_rank_not_divisible_by_k():
    with pytest.raises(gd.GraloraConfigError, match="rank 10 is not divisible by k=4"):
        gd.make_gralora_config(10, "unet-attention", gralora_k=4)


def test_inconsistent_file_shapes(loaded, adapter_files, tmp_path):
    from safetensors import safe_open

    with safe_open(str(adapter_files[0]), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("gralora_B"))
    tensors[key] = tensors[key][:, :4, :].contiguous()
    path = tmp_path / "bad_shapes.safetensors"
    save_file(tensors, str(path), metadata=meta)
    expect_error(
        loaded, lambda: gd.load_gralora_weights(loaded, path), gd.AdapterFileError, "do not match the recorded"
    )


def test_newer_format_version(loaded, adapter_files, tmp_path):
    from safetensors import safe_open

    with safe_open(str(adapter_files[0]), "pt") as f:
        meta = dict(f.metadata(), format_version="99")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    path = tmp_path / "future.safetensors"
    save_file(tensors, str(path), metadata=meta)
    expect_error(loaded, lambda: gd.load_gralora_weights(loaded, path), gd.AdapterFileError, "version 99.*upgrade")
