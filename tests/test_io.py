"""The adapter file: PEFT key names and shapes, header metadata, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_adapter_file
from safetensors import safe_open

import gralora_diffusion as gd
from gralora_diffusion import io as gio


def test_file_layout_uses_peft_names_and_records_configs(tmp_path):
    path = make_adapter_file(
        tmp_path / "subject.safetensors",
        seed=1,
        rank=16,
        gralora_k=4,
        metadata={"trigger_prompt": "a photo of sks dog"},
    )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        a = f.get_tensor("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.gralora_A")
        b = f.get_tensor("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.gralora_B")
    assert meta["format"] == "gralora-diffusion" and meta["format_version"] == "1"
    assert meta["base_model"] == "gralora-diffusion/toy-sdxl" and meta["trigger_prompt"] == "a photo of sks dog"
    configs = json.loads(meta["gralora_config"])
    assert set(configs) == {"unet", "text_encoder", "text_encoder_2"}
    assert configs["unet"]["r"] == 16 and configs["unet"]["gralora_k"] == 4 and configs["unet"]["alpha"] == 32
    assert {k.split(".", 1)[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(k.endswith((".gralora_A", ".gralora_B")) for k in keys)
    assert tuple(a.shape) == (4, 64 // 4, 16) and tuple(b.shape) == (
        4,
        16,
        64 // 4,
    )  # PEFT's [k, in/k, r], [k, r, out/k]
    adapter = gd.read_adapter(path)
    assert adapter.num_parameters() == sum(t.numel() for sd in adapter.state_dicts.values() for t in sd.values())


def test_round_trip_through_read_and_save(tmp_path):
    path = make_adapter_file(tmp_path / "x.safetensors", seed=2, hybrid_r=2)
    adapter = gd.read_adapter(path)
    out = gd.save_adapter_file(tmp_path / "y.safetensors", adapter)
    again = gd.read_adapter(out)
    assert again.metadata == adapter.metadata
    for component, sd in adapter.state_dicts.items():
        assert again.state_dicts[component].keys() == sd.keys()
        assert all(torch.equal(again.state_dicts[component][k], v) for k, v in sd.items())
        assert gio.config_to_dict(again.configs[component]) == gio.config_to_dict(adapter.configs[component])


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    adapter = gd.read_adapter(make_adapter_file(tmp_path / "x.safetensors", seed=2, text_encoders=()))
    target = tmp_path / "out" / "new.safetensors"

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(gio, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        gd.save_adapter_file(target, adapter)
    assert list(target.parent.iterdir()) == []


def test_existing_file_is_replaced_whole(tmp_path):
    first = gd.read_adapter(make_adapter_file(tmp_path / "one.safetensors", seed=1, text_encoders=()))
    second = gd.read_adapter(make_adapter_file(tmp_path / "two.safetensors", seed=2, text_encoders=()))
    target = tmp_path / "final.safetensors"
    gd.save_adapter_file(target, first)
    gd.save_adapter_file(target, second)
    got = gd.read_adapter(target)
    key = next(iter(second.state_dicts["unet"]))
    assert torch.equal(got.state_dicts["unet"][key], second.state_dicts["unet"][key])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_metadata_must_be_strings_and_not_reserved(tmp_path):
    adapter = gd.read_adapter(make_adapter_file(tmp_path / "x.safetensors", seed=2, text_encoders=()))
    adapter.metadata = {"steps": 500}
    with pytest.raises(gd.AdapterFileError, match="must be strings"):
        gd.save_adapter_file(tmp_path / "y.safetensors", adapter)
    adapter.metadata = {"format": "mine"}
    with pytest.raises(gd.AdapterFileError, match="reserved"):
        gd.save_adapter_file(tmp_path / "y.safetensors", adapter)
    assert not (tmp_path / "y.safetensors").exists()


def test_save_gralora_weights_stringifies_metadata(tmp_path):
    path = make_adapter_file(tmp_path / "x.safetensors", seed=2, text_encoders=(), metadata={"steps": 500})
    assert gd.read_adapter(path).metadata["steps"] == "500"


def test_export_peft_folder_refuses_a_non_empty_target(tmp_path):
    path = make_adapter_file(tmp_path / "x.safetensors", seed=2, text_encoders=())
    target = tmp_path / "peft"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(gd.AdapterFileError, match="not empty"):
        gd.export_peft_folder(path, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_loaded_adapter_does_not_change_when_the_file_is_overwritten_in_place(tmp_path):
    import shutil

    first = make_adapter_file(tmp_path / "first.safetensors", seed=1, text_encoders=())
    second = make_adapter_file(tmp_path / "second.safetensors", seed=2, text_encoders=())
    target = tmp_path / "live.safetensors"
    shutil.copy(first, target)
    adapter = gd.read_adapter(target)
    key = next(iter(adapter.state_dicts["unet"]))
    before = adapter.state_dicts["unet"][key].clone()
    shutil.copy(second, target)  # same inode, new bytes
    assert torch.equal(adapter.state_dicts["unet"][key], before)
